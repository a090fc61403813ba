"""The store's file layer: every byte the store writes goes through here.

The real layer, :class:`FileLayer`, is a thin wrapper over ``os`` calls at known
offsets (``os.pwrite``), so durability arguments can be made per call. A test
layer, :class:`PowerLossFileLayer`, remembers what was durable at the last
``fsync`` of each file (and of each directory entry) and can ``power_loss()``:
every file goes back to its durable bytes, and files whose creation was never
made durable by a directory fsync disappear. The store takes a layer through
``StoreConfig(file_layer=...)``; applications never need to.
"""

from __future__ import annotations

import os
import threading

__all__ = ["FileLayer", "PowerLossFileLayer"]


class FileLayer:
    """Plain POSIX file operations. Stateless; one instance may serve many stores."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """Open ``path`` with ``os.open`` flags; returns the descriptor."""
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)

    def close(self, fd: int) -> None:
        """Close a descriptor."""
        os.close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (loops over short writes)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:  # pragma: no cover - the kernel reports errors by raising
                raise OSError("pwrite wrote nothing")
            view = view[written:]
            offset += written

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (short only at end of file)."""
        chunks = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def size(self, fd: int) -> int:
        """The current length of the open file."""
        return os.fstat(fd).st_size

    def truncate(self, fd: int, length: int) -> None:
        """Cut (or extend with zeros) the open file to ``length`` bytes."""
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        """Make the file's data and metadata durable."""
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (creates, renames, unlinks) durable."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` with ``src``."""
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        """Remove a file."""
        os.unlink(path)


class PowerLossFileLayer(FileLayer):
    """A test layer that can simulate a power cut.

    It behaves exactly like :class:`FileLayer` (real files, real descriptors) and
    additionally keeps, for every file it has opened for writing, a copy of the
    bytes that were durable at that file's last ``fsync``. :meth:`power_loss`
    rewrites every such file to its durable copy and removes files whose
    directory entry was never made durable, as a kernel that lost its page cache
    would. Memory use is the size of the files, so use it on small stores only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}
        # path -> durable bytes, or None while the file's directory entry is not durable
        self._durable: dict[str, bytes] = {}
        self._entry_durable: dict[str, bool] = {}
        self.fsyncs = 0

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        existed = os.path.exists(path)
        fd = super().open(path, flags, mode)
        path = os.path.abspath(path)
        with self._lock:
            self._paths[fd] = path
            if path not in self._durable:
                # A file that existed before this layer saw it counts as durable as it is.
                self._durable[path] = _read_all(path) if existed else b""
                self._entry_durable[path] = existed
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._paths.pop(fd, None)
        super().close(fd)

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        with self._lock:
            self.fsyncs += 1
            path = self._paths.get(fd)
            if path is not None:
                self._durable[path] = _read_all(path)

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        directory = os.path.abspath(path)
        with self._lock:
            for name in list(self._entry_durable):
                if os.path.dirname(name) == directory:
                    if os.path.exists(name):
                        self._entry_durable[name] = True
                    else:
                        # an unlink made durable: forget the file
                        del self._entry_durable[name]
                        del self._durable[name]

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        with self._lock:
            if src in self._durable:
                self._durable[dst] = self._durable.pop(src)
                self._entry_durable[dst] = False
                self._entry_durable.pop(src, None)

    def power_loss(self) -> None:
        """Drop everything not made durable: the state a machine reboots into.

        Call it only when no store built on this layer is open (close the store's
        descriptors first, or abandon the store object without closing it and
        call :meth:`forget_descriptors`).
        """
        with self._lock:
            for path, data in self._durable.items():
                if not self._entry_durable.get(path, False):
                    if os.path.exists(path):
                        os.unlink(path)
                    continue
                with open(path, "wb") as f:
                    f.write(data)
            self._durable = {p: d for p, d in self._durable.items() if self._entry_durable.get(p, False)}
            self._entry_durable = {p: True for p in self._durable}

    def forget_descriptors(self) -> None:
        """Close every descriptor this layer opened (a crashed process's files)."""
        with self._lock:
            fds = list(self._paths)
            self._paths.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_all(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""

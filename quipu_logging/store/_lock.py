"""The single-writer lock of a store root, and the platform checks made before taking it.

Two layers: an in-process registry keyed by the root's real path (so a second
``AuditStore.open`` in the same process fails at once with a clear error), and
``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``ROOT/LOCK`` (so does one in another
process; the kernel releases it when the holder dies).

``flock`` belongs to the *open file description*, which a forked child shares.
Unlocking in the child would free the parent's lock, so after ``fork`` the child
only closes its copy of the descriptor (the lock stays with the parent) and
marks every store it inherited as foreign: a child never writes its parent's
store.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from ..errors import StoreLockedError, UnsupportedFilesystemError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["WriterLock", "check_platform", "filesystem_type"]

# File systems whose flock is not a real cross-host lock, or that do not keep POSIX semantics.
_REFUSED_FS = {
    "nfs": "NFS",
    "nfs4": "NFS",
    "cifs": "CIFS/SMB",
    "smb3": "CIFS/SMB",
    "smbfs": "CIFS/SMB",
    "9p": "9P",
    "fuse.sshfs": "SSHFS",
    "afs": "AFS",
    "ceph": "CephFS",
    "glusterfs": "GlusterFS",
    "fuse.glusterfs": "GlusterFS",
}

_registry_lock = threading.Lock()
_held: dict[str, WriterLock] = {}
_fork_callbacks: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


class _ForkAware(Protocol):
    """Something that must drop its descriptors in a forked child."""

    def _after_fork_in_child(self) -> None: ...


def register_fork_callback(obj: _ForkAware) -> None:
    """Asks for ``obj._after_fork_in_child()`` to run in every forked child."""
    _fork_callbacks.add(obj)


def _after_fork_in_child() -> None:
    # Runs in the child with one thread; the registry lock may have been held by
    # another parent thread at fork time, so replace it instead of acquiring it.
    global _registry_lock
    _registry_lock = threading.Lock()
    for obj in list(_fork_callbacks):
        try:
            obj._after_fork_in_child()
        except Exception:  # pragma: no cover - best effort in a fresh child
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file system type of the mount holding ``path``, from Linux's mountinfo.

    Args:
        path: an existing path.
        mountinfo: the mount table to read (tests pass their own).

    Returns:
        The type (``ext4``, ``tmpfs``, ``nfs4``, ...) or ``None`` when unknown.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5:
            continue
        mount_point = _unescape(fields[4])
        fstype = right.split()[0] if right.split() else ""
        if real == mount_point or real.startswith(mount_point.rstrip("/") + "/") or mount_point == "/":
            if best is None or len(mount_point) >= best[0]:
                best = (len(mount_point), fstype)
    return None if best is None else best[1]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out = field
    for code in ("\\040", "\\011", "\\012", "\\134"):
        out = out.replace(code, chr(int(code[1:], 8)))
    return out


def check_platform(root: str, *, fstype_of: Callable[[str], str | None] = filesystem_type) -> None:
    """Refuses platforms and file systems where a single-writer lock cannot be trusted.

    Args:
        root: an existing directory.
        fstype_of: how to find the file system type (tests substitute it).

    Raises:
        UnsupportedFilesystemError: Windows, or a network file system.
    """
    if os.name == "nt" or fcntl is None or sys.platform == "win32":
        raise UnsupportedFilesystemError(
            "quipu_logging stores need POSIX file locking (Linux or macOS); Windows is not supported"
        )
    fstype = fstype_of(root)
    if fstype is not None:
        base = fstype.lower()
        name = _REFUSED_FS.get(base) or _REFUSED_FS.get(base.split(".")[0])
        if name is not None:
            raise UnsupportedFilesystemError(
                f"store root {root!r} is on {name} ({fstype}), whose locks cannot guarantee a single "
                "writer; put the store on a local file system"
            )


class WriterLock:
    """The writer lock of one store root, held until :meth:`release`."""

    def __init__(self, root: str, fd: int) -> None:
        self.root = root
        self._fd: int | None = fd
        self._owner_pid = os.getpid()

    @classmethod
    def acquire(cls, root: str) -> WriterLock:
        """Takes the lock of ``root`` (an existing directory) without waiting.

        Raises:
            StoreLockedError: another store object or process holds it.
        """
        real = os.path.realpath(root)
        with _registry_lock:
            if real in _held:
                raise StoreLockedError(root, os.getpid())
            path = os.path.join(real, "LOCK")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise StoreLockedError(root, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # Record the holder for "store is live (pid N)" messages; informative only.
            data = f"{os.getpid()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            lock = cls(real, fd)
            _held[real] = lock
        register_fork_callback(lock)
        return lock

    @property
    def held(self) -> bool:
        """True while this process holds the lock."""
        return self._fd is not None and self._owner_pid == os.getpid()

    def release(self) -> None:
        """Releases the lock (idempotent). In a forked child it only closes the descriptor."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _registry_lock:
            if _held.get(self.root) is self:
                del _held[self.root]
        if self._owner_pid == os.getpid():
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _after_fork_in_child(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)  # never LOCK_UN: the lock is the parent's
            except OSError:
                pass


def read_holder_pid(root: str) -> int | None:
    """The pid written by the current (or last) writer of ``root``, if readable."""
    try:
        fd = os.open(os.path.join(root, "LOCK"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def is_locked(root: str) -> bool:
    """True when some process holds ``root``'s writer lock right now (a live store).

    On Linux this reads ``/proc/locks`` and takes no lock at all, so asking never
    makes a writer's own ``LOCK_NB`` attempt fail. Elsewhere it probes with a
    shared ``flock`` that it drops at once.
    """
    real = os.path.realpath(root)
    with _registry_lock:
        if real in _held:
            return True
    path = os.path.join(real, "LOCK")
    try:
        st = os.stat(path)
    except OSError:
        return False
    found = _locked_per_proc_locks(st.st_dev, st.st_ino)
    if found is not None:
        return found
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _locked_per_proc_locks(dev: int, ino: int, table: str = "/proc/locks") -> bool | None:
    try:
        with open(table, encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters carry "->")
        if "->" in parts:
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE" and parts[5] == want:
            return True
    return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None

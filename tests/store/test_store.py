"""AuditStore write path: append, receipts, bad input, the single-writer lock, fork, platforms."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from quipu_logging import (
    AuditStore,
    NotAStoreError,
    PayloadTooLargeError,
    StoreClosedError,
    StoreConfig,
    StoreLockedError,
    UnsupportedFilesystemError,
)
from quipu_logging.store import _lock


def _records(store: AuditStore) -> list[dict[str, object]]:
    return [r.payload for r in store.scan()]


class TestAppend:
    def test_receipt_matches_stored_bytes(self, tmp_path: Path) -> None:
        """A receipt's seq, ts and leaf hash describe exactly the stored payload."""
        with AuditStore.open(tmp_path / "s") as store:
            receipt = store.append({"actor": "alice", "action": "update", "ts": 1_700_000_000_000_000})
            (rec,) = list(store.scan())
        assert receipt.seq == 0 and rec.seq == 0
        assert receipt.ts == rec.ts == 1_700_000_000_000_000
        assert receipt.leaf_hash == rec.leaf_hash == hashlib.sha256(b"\x00" + rec.raw).digest()
        assert rec.raw == orjson.dumps(
            {"action": "update", "actor": "alice", "seq": 0, "ts": 1_700_000_000_000_000},
            option=orjson.OPT_SORT_KEYS,
        )

    def test_batch_seqs_are_contiguous_and_persist(self, tmp_path: Path) -> None:
        """append_batch numbers records contiguously, and a reopen continues the numbering."""
        with AuditStore.open(tmp_path / "s") as store:
            first = store.append_batch([{"i": i} for i in range(5)])
        with AuditStore.open(tmp_path / "s") as store:
            second = store.append_batch([{"i": i} for i in range(5, 8)])
            assert [r.seq for r in first + second] == list(range(8))
            assert [p["i"] for p in _records(store)] == list(range(8))
            assert store.tree_size == 8
            assert store.verify().ok

    def test_ts_defaults_to_now(self, tmp_path: Path) -> None:
        """Without a ts field, the record gets the current time in µs."""
        before = datetime.now(timezone.utc).timestamp() * 1e6
        with AuditStore.open(tmp_path / "s") as store:
            receipt = store.append({"x": 1})
        after = datetime.now(timezone.utc).timestamp() * 1e6
        assert before - 1 <= receipt.ts <= after + 1

    def test_hostile_content_never_raises(self, tmp_path: Path) -> None:
        """Cycles, bytes, sets, datetimes, NaN, huge ints, surrogates, deep nesting, bad reprs: all stored."""

        class BadRepr:
            def __repr__(self) -> str:
                raise RuntimeError("no")

        cyclic: list[object] = []
        cyclic.append(cyclic)
        deep: list[object] = []
        node = deep
        for _ in range(10_000):
            child: list[object] = []
            node.append(child)
            node = child
        event = {
            "cycle": cyclic,
            "bytes": b"\x00\xff",
            "set": {3, 1, 2},
            "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
            "nan": math.nan,
            "huge": 2**80,
            "surrogate": "bad \udc80 text",
            "deep": deep,
            "bad": BadRepr(),
            1: "int key",
            "$sys": "forged",
        }
        with AuditStore.open(tmp_path / "s") as store:
            store.append(event)
            (payload,) = _records(store)
            assert store.verify().ok
        assert payload["$lossy"] is True
        assert payload["surrogate"] == "bad \ufffd text"
        assert payload["huge"] == str(2**80)
        assert payload["nan"] == "NaN"
        assert payload["bad"] == {
            "$unrepresentable": "TestAppend.test_hostile_content_never_raises.<locals>.BadRepr"
        }
        assert "$sys" not in payload and payload["$$sys"] == "forged"
        assert payload["1"] == "int key"

    @pytest.mark.parametrize("bad", [["not", "a", "mapping"], "text", 42, None])
    def test_non_mapping_is_refused(self, tmp_path: Path, bad: object) -> None:
        """A non-mapping raises TypeError naming the type, and nothing is written."""
        with AuditStore.open(tmp_path / "s") as store:
            with pytest.raises(TypeError, match="must be a mapping"):
                store.append(bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                store.append_batch([{"ok": 1}, bad])  # type: ignore[list-item]
            assert store.tree_size == 0
            assert store.append({"ok": 1}).seq == 0

    def test_oversized_payload_is_refused_and_store_stays_usable(self, tmp_path: Path) -> None:
        """A record over 16 MiB raises PayloadTooLargeError; the store keeps working."""
        with AuditStore.open(tmp_path / "s") as store:
            store.append({"before": True})
            with pytest.raises(PayloadTooLargeError, match="16777216") as info:
                store.append({"blob": "x" * (16 * 1024 * 1024)})
            assert info.value.size > info.value.limit == 16 * 1024 * 1024
            assert store.append({"after": True}).seq == 1
            assert store.verify().ok
        with AuditStore.open(tmp_path / "s") as store:
            assert [sorted(p)[0] for p in _records(store)] == ["before", "after"]

    def test_closed_store_refuses_appends(self, tmp_path: Path) -> None:
        """After close(), append raises StoreClosedError; close() is idempotent."""
        store = AuditStore.open(tmp_path / "s")
        store.close()
        store.close()
        with pytest.raises(StoreClosedError):
            store.append({"x": 1})

    def test_reader_cannot_write(self, tmp_path: Path) -> None:
        """A reader refuses appends and takes no lock."""
        AuditStore.open(tmp_path / "s").close()
        with AuditStore.open_reader(tmp_path / "s") as reader, AuditStore.open(tmp_path / "s") as writer:
            writer.append({"x": 1})
            with pytest.raises(StoreClosedError, match="open_reader"):
                reader.append({"x": 2})


class TestOpen:
    def test_creates_missing_parents(self, tmp_path: Path) -> None:
        """A missing directory is created with its parents."""
        root = tmp_path / "a" / "b" / "c"
        with AuditStore.open(root):
            pass
        assert (root / "FORMAT").is_file()
        info = orjson.loads((root / "FORMAT").read_bytes())
        assert info["format"] == "quipu-log" and info["version"] == 1

    def test_refuses_non_store_directory(self, tmp_path: Path) -> None:
        """A non-empty directory that is not a store is refused and left untouched."""
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(NotAStoreError, match="not an audit store"):
            AuditStore.open(tmp_path)
        assert sorted(os.listdir(tmp_path)) == ["notes.txt"]

    def test_refuses_a_file(self, tmp_path: Path) -> None:
        """A path that is a file is refused."""
        (tmp_path / "f").write_text("x")
        with pytest.raises(NotAStoreError):
            AuditStore.open(tmp_path / "f")

    def test_reader_of_missing_store(self, tmp_path: Path) -> None:
        """open_reader of a missing directory raises NotAStoreError."""
        with pytest.raises(NotAStoreError):
            AuditStore.open_reader(tmp_path / "missing")


class TestSingleWriter:
    def test_second_open_in_process_fails(self, tmp_path: Path) -> None:
        """A second writer in the same process fails at once, naming the root."""
        root = tmp_path / "s"
        with AuditStore.open(root):
            with pytest.raises(StoreLockedError, match=str(root)) as info:
                AuditStore.open(root)
            assert info.value.root == str(root)
            with pytest.raises(StoreLockedError):
                AuditStore.open(Path(str(root) + "/../s"))  # same real path, other spelling
        with AuditStore.open(root):  # released by close()
            pass

    def test_second_open_in_other_process_fails(self, tmp_path: Path) -> None:
        """Another process cannot open a store this one holds; it can once the holder closes."""
        root = tmp_path / "s"
        code = (
            "import sys\nfrom quipu_logging import AuditStore, StoreLockedError\n"
            "try:\n    AuditStore.open(sys.argv[1]).close()\nexcept StoreLockedError as e:\n"
            "    print('locked', e.pid); sys.exit(3)\nprint('opened')\n"
        )
        with AuditStore.open(root):
            held = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
        assert held.returncode == 3, held.stderr
        assert held.stdout.split() == ["locked", str(os.getpid())]
        free = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
        assert free.returncode == 0 and free.stdout.strip() == "opened", free.stderr

    def test_lock_released_when_holder_dies(self, tmp_path: Path) -> None:
        """A SIGKILLed writer's lock is released by the kernel."""
        root = tmp_path / "s"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, os, signal\nfrom quipu_logging import AuditStore\n"
                "s = AuditStore.open(sys.argv[1]); s.append({'x': 1}); print('ready', flush=True)\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n",
                str(root),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.wait()
        child.stdout.close()
        with AuditStore.open(root) as store:
            assert store.tree_size == 1

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_fork_child_never_writes_and_parent_keeps_lock(self, tmp_path: Path) -> None:
        """After fork the child cannot append, and its exit leaves the parent's lock held."""
        root = tmp_path / "s"
        with AuditStore.open(root) as store:
            store.append({"parent": 1})
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(read_end)
                outcome = b"?"
                try:
                    store.append({"child": 1})
                    outcome = b"wrote"
                except StoreClosedError:
                    outcome = b"refused"
                except BaseException:
                    outcome = b"other"
                try:
                    store.close()
                finally:
                    os.write(write_end, outcome)
                    os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                outcome = pipe.read()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert outcome == b"refused"
            assert _lock.is_locked(str(root))
            code = "import sys\nfrom quipu_logging import AuditStore\nAuditStore.open(sys.argv[1])\n"
            other = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
            assert other.returncode != 0 and "StoreLockedError" in other.stderr
            store.append({"parent": 2})
            assert [p.get("parent") for p in _records(store)] == [1, 2]
            assert store.verify().ok


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:40 / /mnt/nfs rw,relatime shared:2 - nfs4 server:/export rw\n"
    "41 22 0:41 / /mnt/smb\\040share rw - cifs //host/share rw\n"
    "42 22 0:42 / /mnt/nfs/local rw - tmpfs tmpfs rw\n"
)


class TestPlatform:
    def test_filesystem_type_longest_mount_wins(self, tmp_path: Path) -> None:
        """The mount table lookup picks the longest matching mount point."""
        table = tmp_path / "mountinfo"
        table.write_text(MOUNTINFO)
        fstype = _lock.filesystem_type
        assert fstype("/mnt/nfs/x", str(table)) == "nfs4"
        assert fstype("/mnt/nfs/local/x", str(table)) == "tmpfs"
        assert fstype("/mnt/smb share/y", str(table)) == "cifs"
        assert fstype("/home", str(table)) == "ext4"

    @pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs"])
    def test_network_filesystems_refused(self, tmp_path: Path, fstype: str) -> None:
        """Roots on NFS/CIFS-like file systems are refused with a clear error."""
        with pytest.raises(UnsupportedFilesystemError, match="local file system"):
            _lock.check_platform(str(tmp_path), fstype_of=lambda _p: fstype)

    def test_local_filesystem_accepted(self, tmp_path: Path) -> None:
        """The test machine's own file system is accepted, and really is detected."""
        assert (
            _lock.filesystem_type(str(tmp_path)) not in (None, "nfs", "nfs4", "cifs")
            or sys.platform != "linux"
        )
        _lock.check_platform(str(tmp_path))

    def test_config_carries_root(self, tmp_path: Path) -> None:
        """StoreConfig roots may be Path objects."""
        with AuditStore.open(StoreConfig(root=tmp_path / "p")) as store:
            assert store.root == str(tmp_path / "p")

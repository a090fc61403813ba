"""The ``quipu-log`` command line (DESIGN §3 "CLI", issue 5 requirement 3).

Most tests call :func:`quipu_logging.cli.main` in-process and read ``capsys``; a
few run the real console entry (``python -m quipu_logging``) in a subprocess to
check exit codes, one-line errors, ``tail -f`` and the "store is live" refusal
against a writer held by another process. Tampering is done on the bytes of a
closed store with ``struct`` and ``zlib``, the way an operator with file access
would do it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import quipu_logging
from quipu_logging import AuditStore, StoreConfig
from quipu_logging import cli as cli_module
from quipu_logging.cli import main
from quipu_logging.store import merkle

SEG_HEADER = struct.Struct("<4sB3sQ")
FRAME = struct.Struct("<II")
HOUR_US = 3600 * 1_000_000
DAY_US = 24 * HOUR_US
LEVELS = [(10, "DEBUG"), (20, "INFO"), (30, "WARNING"), (40, "ERROR")]
LOGGERS = ["app", "app.db", "apple", "web"]
N = 24  # records in the standard store
COMMANDS = ["verify", "query", "tail", "export", "prove", "checkpoint", "retention", "stats"]
# The directory holding the package under test, for the subprocesses' PYTHONPATH.
PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
WAIT = 30.0  # seconds: an upper bound for a subprocess to answer, never a synchronisation delay


# ---------------------------------------------------------------------------- helpers


def now_us() -> int:
    return time.time_ns() // 1000


def event(i: int, ts: int) -> dict[str, Any]:
    """Record ``i`` of the standard store: levels, loggers, actors and ``ref`` types vary with ``i``."""
    levelno, level = LEVELS[i % 4]
    return {
        "ts": ts,
        "message": f"msg {i}",
        "levelno": levelno,
        "level": level,
        "logger": LOGGERS[i % 4],
        "actor": f"user-{i % 3}",
        "ref": 30 if i % 2 else "30",
        "i": i,
    }


def hours_ago(i: int) -> float:
    """How long before the build record ``i`` of the standard store happened: 23.5 h (i=0) .. 0.5 h."""
    return N - 0.5 - i


def build(root: Path, n: int = N, *, limit: int | str = 700, key: Path | None = None, start: int = 0) -> int:
    """Writes the standard records ``start .. n-1`` (ts ``hours_ago(i)`` before now); returns that now."""
    now = now_us()
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit, signing_key=key)) as store:
        for i in range(start, n):
            store.append(event(i, now - int(hours_ago(i) * HOUR_US)))
    return now


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """``main([...])`` in-process: ``(exit code, stdout, stderr)``."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def seqs(text: str) -> list[int]:
    return [r["seq"] for r in json_lines(text)]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, e.get("PYTHONPATH")) if p)
    return e


def console(*args: Any) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m quipu_logging ARGS`` (the console entry) with stdout and stderr piped."""
    return subprocess.run(
        [sys.executable, "-m", "quipu_logging", *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        check=False,
    )


def assert_one_line_error(err: str, *words: str) -> None:
    """``err`` is exactly one line, names the program, has no traceback and holds ``words``."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("quipu-log"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def segment_files(root: Path) -> list[Path]:
    return sorted((root / "log").glob("seg-*.log"))


def frames(data: bytes) -> list[tuple[int, int]]:
    """``[(offset, payload length)]`` of a segment's frames (lengths trusted)."""
    out = []
    pos = SEG_HEADER.size
    while pos + FRAME.size <= len(data):
        length = FRAME.unpack_from(data, pos)[0]
        out.append((pos, length))
        pos += FRAME.size + length
    return out


def flip_payload_byte(root: Path, seq: int) -> Path:
    """Changes one byte of record ``seq``'s payload and fixes its frame CRC; returns the segment."""
    for seg in segment_files(root):
        data = bytearray(seg.read_bytes())
        base = SEG_HEADER.unpack_from(data, 0)[3]
        fr = frames(bytes(data))
        if base <= seq < base + len(fr):
            pos, length = fr[seq - base]
            body = pos + FRAME.size
            k = bytes(data[body : body + length]).index(b"msg")
            data[body + k] = ord("n")  # "msg 5" -> "nsg 5": still valid JSON
            FRAME.pack_into(data, pos, length, zlib.crc32(bytes(data[body : body + length])))
            seg.write_bytes(bytes(data))
            return seg
    raise LookupError(seq)


def write_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair as PEM files: ``(private, public)``."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def set_format_version(root: Path, version: int) -> None:
    info = json.loads((root / "FORMAT").read_bytes())
    info["version"] = version
    (root / "FORMAT").write_text(json.dumps(info))


def tty(monkeypatch: pytest.MonkeyPatch, stream: str) -> None:
    """Makes the captured ``sys.stdout`` / ``sys.stderr`` claim to be a terminal."""
    monkeypatch.setattr(getattr(sys, stream), "isatty", lambda: True)


def follow(root: Path, n: int) -> subprocess.Popen[bytes]:
    """``quipu-log tail ROOT -n N -f`` in a subprocess, polling every 50 ms, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "quipu_logging", "tail", str(root), "-n", str(n), "-f", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )


class Lines:
    """Reads whole lines from a pipe with a deadline (select + os.read, no sleeping)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buffer = b""

    def read(self, count: int, timeout: float = WAIT) -> list[str]:
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {count} lines; got {self.buffer!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"the process closed its output; got {self.buffer!r}"
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n", count)
        return [line.decode() for line in lines]


HOLDER = """
import sys
from quipu_logging import AuditStore
store = AuditStore.open(sys.argv[1])
store.append({"message": "held"})
store.sync()
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A closed store of N standard records over several segments."""
    root = tmp_path / "store"
    build(root)
    assert len(segment_files(root)) >= 3
    return root


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A store whose writer lock is held by another process (waiting on its stdin): ``(root, pid)``."""
    root = tmp_path / "live"
    build(root, 5)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env(),
    )
    try:
        assert proc.stdout is not None
        assert Lines(proc.stdout).read(1) == ["ready"]
        yield root, proc.pid
    finally:
        proc.communicate(b"\n", timeout=WAIT)  # the holder closes the store and exits
    assert proc.returncode == 0


# ------------------------------------------------------------------ every subcommand


class TestEverySubcommand:
    """What all subcommands share: --help with an example, and exit 2 for paths that are not stores."""

    @pytest.mark.parametrize("command", COMMANDS)
    def test_help_shows_an_example(self, capsys: pytest.CaptureFixture[str], command: str) -> None:
        """`CMD --help` exits 0 and shows an example of that command."""
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        assert "example" in out.lower()
        assert f"quipu-log {command}" in out

    def test_top_level_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--help` lists every subcommand and the exit codes."""
        code, out, _ = run(capsys, "--help")
        assert code == 0
        assert all(command in out for command in COMMANDS)
        assert "exit codes" in out

    @staticmethod
    def _args(command: str, root: Path) -> list[Any]:
        return {"prove": [command, root, 0], "retention": [command, root, "--max-age", "1d"]}.get(
            command, [command, root]
        )

    @pytest.mark.parametrize("command", COMMANDS)
    def test_missing_path(self, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
        """A path that does not exist: exit 2, one line, and nothing is created."""
        root = tmp_path / "nowhere"
        code, out, err = run(capsys, *self._args(command, root))
        assert (code, out) == (2, "")
        assert_one_line_error(err, "nowhere")
        assert not root.exists()

    @pytest.mark.parametrize("command", COMMANDS)
    def test_regular_file(self, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
        """A regular file instead of a store directory: exit 2."""
        path = tmp_path / "file.txt"
        path.write_text("hello\n")
        code, _, err = run(capsys, *self._args(command, path))
        assert code == 2
        assert_one_line_error(err, "file.txt")
        assert path.read_text() == "hello\n"

    @pytest.mark.parametrize("command", COMMANDS)
    def test_directory_that_is_not_a_store(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
    ) -> None:
        """A non-empty directory without FORMAT: exit 2, "not ... store", and the directory is untouched."""
        root = tmp_path / "photos"
        root.mkdir()
        (root / "cat.jpg").write_bytes(b"\xff\xd8")
        code, _, err = run(capsys, *self._args(command, root))
        assert code == 2
        assert_one_line_error(err, "not", "store")
        assert sorted(p.name for p in root.iterdir()) == ["cat.jpg"]

    @pytest.mark.parametrize("command", COMMANDS)
    def test_empty_directory(self, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
        """An empty directory is not a store either, and no command turns it into one."""
        root = tmp_path / "empty"
        root.mkdir()
        code, _, err = run(capsys, *self._args(command, root))
        assert code == 2
        assert_one_line_error(err, "store")
        assert list(root.iterdir()) == []

    @pytest.mark.parametrize("command", COMMANDS)
    def test_format_version_2(self, capsys: pytest.CaptureFixture[str], store: Path, command: str) -> None:
        """A store written in format version 2: exit 2, naming the version."""
        set_format_version(store, 2)
        code, _, err = run(capsys, *self._args(command, store))
        assert code == 2
        assert_one_line_error(err, "version", "2")

    @pytest.mark.parametrize(
        "argv",
        [
            [],
            ["frobnicate"],
            ["query"],
            ["query", "{root}", "--limit", "many"],
            ["query", "{root}", "--bogus"],
            ["tail", "{root}", "-n"],
        ],
    )
    def test_argparse_errors_are_one_line(
        self, capsys: pytest.CaptureFixture[str], store: Path, argv: list[str]
    ) -> None:
        """Errors argparse finds exit 2 with one line on stderr, not the whole usage."""
        code, out, err = run(capsys, *[a.format(root=store) for a in argv])
        assert code == 2
        assert out == ""
        assert_one_line_error(err, "error", "--help")


class TestConsoleEntry:
    """The real `python -m quipu_logging` entry: exit codes and error lines as a shell sees them."""

    def test_exit_codes(self, store: Path, tmp_path: Path) -> None:
        """0 for an intact store, 1 once tampered, 2 for a missing path, a usage error and a live store."""
        ok = console("verify", store)
        assert (ok.returncode, ok.stderr) == (0, "")
        assert ok.stdout.startswith("ok:")
        usage = console("query", store, "--where", "oops")
        assert usage.returncode == 2
        assert_one_line_error(usage.stderr, "FIELD=VALUE")
        missing = console("stats", tmp_path / "missing")
        assert missing.returncode == 2
        assert_one_line_error(missing.stderr, "missing")
        flip_payload_byte(store, 7)
        bad = console("verify", store)
        assert bad.returncode == 1
        assert "seq 7" in bad.stdout.splitlines()[0]

    def test_verbose_shows_the_traceback_and_keeps_the_code(self, tmp_path: Path) -> None:
        """--verbose (before or after the command) adds a traceback; the exit code stays 2."""
        for argv in (["--verbose", "verify", tmp_path / "x"], ["verify", tmp_path / "x", "--verbose"]):
            done = console(*argv)
            assert done.returncode == 2
            assert done.stderr.startswith("Traceback")
            assert "NotAStoreError" in done.stderr
            assert done.stderr.splitlines()[-1].startswith("quipu-log: ")

    def test_verbose_in_process(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """In-process, --verbose prints the traceback and still returns 2."""
        code, _, err = run(capsys, "--verbose", "query", tmp_path / "x")
        assert code == 2
        assert "Traceback" in err and "NotAStoreError" in err

    def test_piped_query_is_json_lines(self, store: Path) -> None:
        """A piped query prints JSON lines, newest first, and the next cursor on stderr."""
        done = console("query", store, "--limit", "4")
        assert done.returncode == 0
        assert seqs(done.stdout) == [23, 22, 21, 20]
        assert done.stderr.startswith("next page: --cursor ")

    def test_help(self) -> None:
        """`verify --help` through the console entry exits 0 with an example."""
        done = console("verify", "--help")
        assert done.returncode == 0
        assert "example" in done.stdout and "quipu-log verify" in done.stdout


# --------------------------------------------------------------------------- verify


def tmp_clean(damaged: Path) -> Path:
    """An intact store beside ``damaged`` (for the exit-0 side of a comparison)."""
    root = damaged.parent / (damaged.name + "-clean")
    if not root.exists():
        build(root)
    return root


def tamper_payload(root: Path) -> None:
    flip_payload_byte(root, 5)


def tamper_delete_middle_segment(root: Path) -> None:
    middle = segment_files(root)[1]
    middle.unlink()
    middle.with_suffix(".idx").unlink(missing_ok=True)


def tamper_checkpoint_line(root: Path) -> None:
    path = root / "checkpoints.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    cp = json.loads(lines[-1])
    cp["tree_size"] -= 1
    lines[-1] = json.dumps(cp).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def tamper_segment_magic(root: Path) -> None:
    seg = segment_files(root)[1]
    data = bytearray(seg.read_bytes())
    data[0:4] = b"QLOX"
    seg.write_bytes(bytes(data))


def tamper_segment_version(root: Path) -> None:
    seg = segment_files(root)[0]
    data = bytearray(seg.read_bytes())
    data[4] = 9
    seg.write_bytes(bytes(data))


class TestVerify:
    """`quipu-log verify`: exit 0 intact, 1 with the first problem, --json, keys and anchors."""

    def test_intact(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """An intact store: exit 0 and one line with the count, tree size and root."""
        root_hex = AuditStore.open_reader(store).merkle_root().hex()
        code, out, err = run(capsys, "verify", store)
        assert (code, err) == (0, "")
        assert out == f"ok: {N} records verified; tree size {N}, root {root_hex}\n"

    def test_json(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--json gives ok, tree_size, root, records_checked, pending, problems and warnings."""
        code, out, _ = run(capsys, "verify", store, "--json")
        assert code == 0
        [report] = json_lines(out)
        assert report == {
            "ok": True,
            "tree_size": N,
            "root": AuditStore.open_reader(store).merkle_root().hex(),
            "records_checked": N,
            "pending": 0,
            "problems": [],
            "warnings": [],
        }

    def test_flipped_payload_byte(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """A payload byte changed with its CRC fixed: exit 1, the first problem names file, offset and seq."""
        seg = flip_payload_byte(store, 5)
        code, out, _ = run(capsys, "verify", store)
        assert code == 1
        first = out.splitlines()[0]
        assert first.startswith("TAMPERED OR DAMAGED")
        assert str(seg) in first and "seq 5" in first and "offset" in first
        code, out, _ = run(capsys, "verify", store, "--json")
        assert code == 1
        [report] = json_lines(out)
        assert report["ok"] is False
        assert {"file", "offset", "seq", "reason"} == set(report["problems"][0])
        assert any(p["seq"] == 5 and p["file"] == str(seg) and p["reason"] for p in report["problems"])

    @pytest.mark.parametrize(
        "tamper",
        [
            tamper_payload,
            tamper_delete_middle_segment,
            tamper_checkpoint_line,
            tamper_segment_magic,
            tamper_segment_version,
        ],
    )
    def test_tampering_exits_1(self, capsys: pytest.CaptureFixture[str], store: Path, tamper: Any) -> None:
        """Every kind of damage (payload, missing segment, checkpoint line, segment header) exits 1."""
        tamper(store)
        code, out, err = run(capsys, "verify", store)
        assert code == 1, out
        assert out.startswith("TAMPERED OR DAMAGED")
        assert err == ""
        code, out, _ = run(capsys, "verify", store, "--json")
        assert code == 1
        assert json_lines(out)[0]["problems"]

    def test_bad_header_names_the_segment(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """A bad segment header is reported on that segment at offset 0."""
        seg = segment_files(store)[1]
        tamper_segment_magic(store)
        code, out, _ = run(capsys, "verify", store, "--json")
        assert code == 1
        problems = json_lines(out)[0]["problems"]
        assert any(p["file"] == str(seg) and p["offset"] == 0 for p in problems), problems

    def test_public_key(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A signed store verifies with its public key (exit 0) and fails with another one (exit 1)."""
        private, public = write_key(tmp_path, "right")
        _, other = write_key(tmp_path, "wrong")
        root = tmp_path / "signed"
        build(root, key=private)
        assert run(capsys, "verify", root, "--public-key", public)[0] == 0
        code, out, _ = run(capsys, "verify", root, "--public-key", other)
        assert code == 1
        assert out.startswith("TAMPERED OR DAMAGED")
        assert run(capsys, "verify", root, "--public-key", other, "--public-key", public)[0] == 0

    def test_unsigned_store_with_a_key(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """Given a public key, unsigned checkpoints fail: exit 1."""
        _, public = write_key(tmp_path, "k")
        assert run(capsys, "verify", store, "--public-key", public)[0] == 1

    def test_unreadable_public_key(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """A --public-key path that does not exist is a usage error: exit 2, one line."""
        code, _, err = run(capsys, "verify", store, "--public-key", tmp_path / "none.pub")
        assert code == 2
        assert_one_line_error(err, "none.pub")

    def test_anchor(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """An anchor the store extends passes; the anchor of another store fails with exit 1."""
        anchor = tmp_path / "anchor.json"
        assert run(capsys, "checkpoint", store, "--export", anchor)[0] == 0
        build(store, N + 5, start=N)  # the store grows after the anchor was taken
        assert run(capsys, "verify", store, "--anchor", anchor)[0] == 0
        other = tmp_path / "other"
        build(other, N + 3)
        foreign = tmp_path / "foreign.json"
        assert run(capsys, "checkpoint", other, "--export", foreign)[0] == 0
        code, out, _ = run(capsys, "verify", store, "--anchor", foreign)
        assert code == 1
        assert "anchor" in out

    def test_missing_anchor_file(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """An --anchor file that does not exist is an unreadable path (exit 2), not tampering."""
        code, out, err = run(capsys, "verify", store, "--anchor", tmp_path / "lost.json")
        assert (code, out) == (2, "")
        assert_one_line_error(err, "lost.json")

    @pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"[1, 2]\n", b"\xff\xfe\x00"])
    def test_anchor_file_that_is_not_a_checkpoint(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path, content: bytes
    ) -> None:
        """An --anchor file holding no checkpoint line is a usage error (exit 2), never "TAMPERED"."""
        wrong = tmp_path / "wrong.json"
        wrong.write_bytes(content)
        code, out, err = run(capsys, "verify", store, "--anchor", wrong)
        assert (code, out) == (2, "")
        assert_one_line_error(err, "wrong.json", "checkpoint")

    def test_exit_code_survives_a_closed_pipe(self, store: Path) -> None:
        """`verify ... | head` of a damaged store still exits 1 (the outcome, not the pipe's fate).

        The reading end of stdout is closed before the process starts, so its first write
        fails with EPIPE (BrokenPipeError) every time.
        """
        flip_payload_byte(store, 3)
        for args in (["verify", store, "--json"], ["verify", store], ["verify", tmp_clean(store)]):
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "quipu_logging", *map(str, args)],
                    stdout=write_end,
                    stderr=subprocess.PIPE,
                    env=env(),
                    timeout=120,
                    check=False,
                )
            finally:
                os.close(write_end)
            expected = 0 if args[1] != store else 1
            assert proc.returncode == expected, (args, proc.stderr)
            assert b"Traceback" not in proc.stderr and b"Exception ignored" not in proc.stderr

    def test_problem_places_never_say_none(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """The first problem's place names only what is known (no "offset None, seq None")."""
        tamper_checkpoint_line(store)
        code, out, _ = run(capsys, "verify", store)
        assert code == 1
        assert "None" not in out.splitlines()[0], out

    def test_works_on_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """verify takes no lock: it runs while another process writes."""
        root, _ = live
        code, out, _ = run(capsys, "verify", root)
        assert code == 0, out

    def test_no_progress_bar_when_not_a_terminal(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """With stderr not a terminal no bar is made (and stderr stays empty)."""
        made: list[object] = []
        real = cli_module._ProgressBar

        class Spy(real):  # type: ignore[misc,valid-type]
            def __init__(self) -> None:
                super().__init__()
                made.append(self)

        monkeypatch.setattr(cli_module, "_ProgressBar", Spy)
        code, _, err = run(capsys, "verify", store)
        assert (code, err, made) == (0, "", [])

    def test_progress_on_a_terminal(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """On a terminal verify feeds the bar (done, total); a small store draws nothing; --json: no bar."""
        calls: list[tuple[int, int]] = []
        real = cli_module._ProgressBar

        class Spy(real):  # type: ignore[misc,valid-type]
            def update(self, done: int, total: int) -> None:
                calls.append((done, total))
                super().update(done, total)

        monkeypatch.setattr(cli_module, "_ProgressBar", Spy)
        tty(monkeypatch, "stderr")
        code, _, err = run(capsys, "verify", store)
        assert (code, err) == (0, "")
        assert calls and calls[-1] == (N, N)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
        calls.clear()
        assert run(capsys, "verify", store, "--json")[0] == 0
        assert calls == []


class TestProgressBar:
    """`_ProgressBar`: drawn on stderr for large stores only, and cleared at the end."""

    def test_small_store_draws_nothing(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Below 200,000 records nothing is written."""
        bar = cli_module._ProgressBar()
        bar.update(500, 1000)
        bar.finish()
        assert capsys.readouterr() == ("", "")

    def test_large_store_draws_and_clears(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A large store gets a bar with counts on stderr, erased by finish(); stdout is untouched."""
        bar = cli_module._ProgressBar()
        bar.update(250_000, 1_000_000)
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("\rverifying [")
        assert "250,000/1,000,000" in err
        assert err.count("#") == 7  # a quarter of 30
        bar.finish()
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("\r") and err.endswith("\r") and err.strip() == ""


# ---------------------------------------------------------------------------- query


def standard_ids(predicate: Any) -> list[int]:
    """The ``i`` of the standard records matching ``predicate(i)``, newest first."""
    return [i for i in reversed(range(N)) if predicate(i)]


def ids(text: str) -> list[int]:
    return [r["i"] for r in json_lines(text)]


def page_through(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[list[int], list[int]]:
    """Follows `next page: --cursor X` to the end; returns every seq seen and the page sizes."""
    seen: list[int] = []
    cursor: list[Any] = []
    sizes: list[int] = []
    while True:
        code, out, err = run(capsys, "query", *args, *cursor)
        assert code == 0, err
        sizes.append(len(seqs(out)))
        seen += seqs(out)
        hints = [line for line in err.splitlines() if line.startswith("next page: --cursor ")]
        if not hints:
            assert err == ""
            return seen, sizes
        assert err == hints[0] + "\n"
        cursor = ["--cursor", hints[0].split()[-1]]
        assert len(sizes) < 100


class TestQuery:
    """`quipu-log query`: filters, paging, and table vs JSON lines output."""

    def test_default_is_every_record_newest_first(
        self, capsys: pytest.CaptureFixture[str], store: Path
    ) -> None:
        """Without filters: JSON lines (piped) of every record, newest first, exactly as stored."""
        code, out, err = run(capsys, "query", store)
        assert (code, err) == (0, "")
        records = json_lines(out)
        assert [r["seq"] for r in records] == list(reversed(range(N)))
        stored = {r.seq: r.payload for r in AuditStore.open_reader(store).scan()}
        assert all(r == stored[r["seq"]] for r in records)

    def test_since_and_until_ages(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--since 5h keeps records of the last five hours; --until 2h drops the last two; 7d keeps all."""
        assert ids(run(capsys, "query", store, "--since", "5h")[1]) == standard_ids(
            lambda i: hours_ago(i) <= 5
        )
        assert ids(run(capsys, "query", store, "--since", "300m")[1]) == standard_ids(
            lambda i: hours_ago(i) <= 5
        )
        assert ids(run(capsys, "query", store, "--until", "2h")[1]) == standard_ids(
            lambda i: hours_ago(i) > 2
        )
        both = run(capsys, "query", store, "--since", "10h", "--until", "120m")[1]
        assert ids(both) == standard_ids(lambda i: 2 < hours_ago(i) <= 10)
        assert ids(run(capsys, "query", store, "--since", "7d")[1]) == standard_ids(lambda i: True)
        assert run(capsys, "query", store, "--until", "2d")[1] == ""

    def test_since_and_until_iso(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """ISO times work with Z, with an offset, and without a zone (taken as UTC)."""
        ts = {r.payload["i"]: r.ts for r in AuditStore.open_reader(store).scan()}
        since = datetime.fromtimestamp(ts[14] / 1e6, timezone.utc)  # inclusive: record 14 is in
        until = datetime.fromtimestamp(ts[20] / 1e6, timezone.utc)  # exclusive: record 20 is out
        want = list(range(19, 13, -1))
        for text in (
            since.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            since.astimezone(timezone(timedelta(hours=2))).isoformat(),
            since.replace(tzinfo=None).isoformat(),
        ):
            code, out, err = run(capsys, "query", store, "--since", text, "--until", until.isoformat())
            assert (code, err) == (0, ""), text
            assert ids(out) == want, text

    def test_bad_time(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """A time that is neither ISO nor an age: exit 2, one line naming the option."""
        for bad in ("yesterday", "5 parsecs", "2026-13-45"):
            code, out, err = run(capsys, "query", store, "--since", bad)
            assert (code, out) == (2, "")
            assert_one_line_error(err, "--since")

    def test_level_maps_to_min_levelno(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """--level WARNING asks the store for min_levelno=30 and returns WARNING and ERROR records."""
        asked: list[dict[str, Any]] = []
        real = AuditStore.query

        def spy(self: AuditStore, **kwargs: Any) -> Any:
            asked.append(kwargs)
            return real(self, **kwargs)

        monkeypatch.setattr(AuditStore, "query", spy)
        code, out, _ = run(capsys, "query", store, "--level", "WARNING")
        assert code == 0
        assert asked[-1]["min_levelno"] == 30
        assert ids(out) == standard_ids(lambda i: LEVELS[i % 4][0] >= 30)
        for text, levelno in (("warning", 30), ("error", 40), ("DEBUG", 10), ("25", 25)):
            assert run(capsys, "query", store, "--level", text)[0] == 0
            assert asked[-1]["min_levelno"] == levelno

    def test_unknown_level(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """An unknown level name: exit 2."""
        code, _, err = run(capsys, "query", store, "--level", "LOUD")
        assert code == 2
        assert_one_line_error(err, "--level", "LOUD")

    def test_logger(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--logger app matches app and app.db, not apple."""
        out = run(capsys, "query", store, "--logger", "app")[1]
        assert ids(out) == standard_ids(lambda i: LOGGERS[i % 4] in ("app", "app.db"))
        assert ids(run(capsys, "query", store, "--logger", "app.db")[1]) == standard_ids(lambda i: i % 4 == 1)

    def test_where_values(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--where VALUE is JSON when it parses (an int matches ints only), text otherwise."""
        assert ids(run(capsys, "query", store, "--where", "levelno=30")[1]) == standard_ids(
            lambda i: i % 4 == 2
        )
        assert ids(run(capsys, "query", store, "--where", "ref=30")[1]) == standard_ids(lambda i: i % 2 == 1)
        assert ids(run(capsys, "query", store, "--where", 'ref="30"')[1]) == standard_ids(
            lambda i: i % 2 == 0
        )
        assert ids(run(capsys, "query", store, "--where", "actor=user-1")[1]) == standard_ids(
            lambda i: i % 3 == 1
        )
        assert run(capsys, "query", store, "--where", "levelno=30.0")[1] == ""
        assert run(capsys, "query", store, "--where", "levelno=true")[1] == ""

    def test_where_repeated(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """Repeated --where options must all match."""
        out = run(
            capsys, "query", store, "--where", "actor=user-2", "--where", "ref=30", "--where", "logger=app.db"
        )[1]
        assert ids(out) == standard_ids(lambda i: i % 3 == 2 and i % 2 == 1 and i % 4 == 1)
        assert ids(out)  # not vacuous

    def test_where_without_equals(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--where without FIELD=VALUE: exit 2."""
        for bad in ("actor", "=x"):
            code, _, err = run(capsys, "query", store, "--where", bad)
            assert code == 2
            assert_one_line_error(err, "--where")

    def test_contains(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--contains matches a substring of the message."""
        out = run(capsys, "query", store, "--contains", "msg 1")[1]
        assert ids(out) == standard_ids(lambda i: f"msg {i}".find("msg 1") >= 0)

    def test_filters_combine(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """Every filter given applies at once."""
        out = run(
            capsys, "query", store, "--since", "20h", "--level", "INFO", "--logger", "app", "--contains", "1"
        )[1]
        want = standard_ids(
            lambda i: hours_ago(i) <= 20 and LEVELS[i % 4][0] >= 20 and i % 4 in (0, 1) and "1" in f"msg {i}"
        )
        assert ids(out) == want and want

    def test_oldest_and_limit(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--oldest reverses the order; --limit cuts the page and prints the next cursor on stderr."""
        code, out, err = run(capsys, "query", store, "--oldest", "--limit", "3")
        assert code == 0
        assert seqs(out) == [0, 1, 2]
        assert err.startswith("next page: --cursor ") and err.count("\n") == 1
        code, out, err = run(capsys, "query", store, "--limit", str(N + 1))
        assert seqs(out) == list(reversed(range(N)))
        assert err == ""  # the last page has no cursor

    @pytest.mark.parametrize("order", [[], ["--oldest"]])
    def test_cursor_pages_return_every_record_once(
        self, capsys: pytest.CaptureFixture[str], store: Path, order: list[str]
    ) -> None:
        """Following the cursors pages through the whole store: every record exactly once, in order."""
        seen, sizes = page_through(capsys, store, "--limit", "5", *order)
        expected = list(range(N)) if order else list(reversed(range(N)))
        assert seen == expected
        assert sizes == [5, 5, 5, 5, 4]

    def test_cursor_with_filters(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """Paging a filtered query returns each match once."""
        seen, sizes = page_through(capsys, store, "--level", "WARNING", "--limit", "2", "--oldest")
        assert seen == [i for i in range(N) if i % 4 >= 2]
        # 12 matches: six full pages, then (the store's choice) possibly an empty one.
        assert sizes[:6] == [2] * 6 and sizes[6:] in ([], [0])

    def test_bad_cursor(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """A garbled cursor, or one made for another query: exit 2."""
        code, _, err = run(capsys, "query", store, "--cursor", "garbage")
        assert code == 2
        assert_one_line_error(err, "cursor")
        err = run(capsys, "query", store, "--limit", "2")[2]
        cursor = err.split()[-1]
        code, _, err = run(capsys, "query", store, "--limit", "2", "--level", "ERROR", "--cursor", cursor)
        assert code == 2
        assert_one_line_error(err, "cursor")

    def test_bad_limit(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--limit 0: exit 2."""
        code, _, err = run(capsys, "query", store, "--limit", "0")
        assert code == 2
        assert_one_line_error(err, "--limit")

    def test_table_on_a_terminal(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """On a terminal: an aligned table with a header; extra fields at the end."""
        tty(monkeypatch, "stdout")
        code, out, _ = run(capsys, "query", store, "--limit", "6")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == ["SEQ", "TIME", "(UTC)", "LEVEL", "LOGGER", "MESSAGE", "FIELDS"]
        assert len(rows) == 6
        records = {r.seq: r.payload for r in AuditStore.open_reader(store).scan()}
        columns = {name: header.index(name) for name in ("SEQ", "LEVEL", "LOGGER", "MESSAGE", "FIELDS")}
        for row, seq in zip(rows, range(N - 1, N - 7, -1), strict=True):
            rec = records[seq]
            assert row[columns["SEQ"] :].startswith(f"{seq} ")
            assert row[columns["LEVEL"] :].startswith(rec["level"] + " ")
            assert row[columns["LOGGER"] :].startswith(rec["logger"] + " ")
            assert row[columns["MESSAGE"] :].startswith(rec["message"] + " ")
            assert row[columns["FIELDS"] :].startswith('actor="')
            assert f"i={rec['i']}" in row[columns["FIELDS"] :]
        when = datetime.fromtimestamp(records[N - 1]["ts"] / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        assert when in rows[0]

    def test_json_on_a_terminal(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """--json gives JSON lines even on a terminal."""
        tty(monkeypatch, "stdout")
        assert seqs(run(capsys, "query", store, "--json", "--limit", "2")[1]) == [N - 1, N - 2]

    def test_works_on_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """query takes no lock: it sees the live writer's records."""
        root, _ = live
        code, out, _ = run(capsys, "query", root, "--limit", "1")
        assert code == 0
        assert json_lines(out)[0]["message"] == "held"


# ----------------------------------------------------------------------------- tail


class TestTail:
    """`quipu-log tail`: the last N records, and with -f the new ones as they are written."""

    def test_last_n_oldest_first(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """-n 3 prints the three newest records, oldest of them first; the default is 10."""
        code, out, err = run(capsys, "tail", store, "-n", "3")
        assert (code, err) == (0, "")
        assert seqs(out) == [N - 3, N - 2, N - 1]
        assert seqs(run(capsys, "tail", store)[1]) == list(range(N - 10, N))
        assert seqs(run(capsys, "tail", store, "-n", "1000")[1]) == list(range(N))
        assert run(capsys, "tail", store, "-n", "0") == (0, "", "")

    def test_negative_n(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """-n -1: exit 2."""
        code, _, err = run(capsys, "tail", store, "-n", "-1")
        assert code == 2
        assert_one_line_error(err, "-n")

    def test_table_on_a_terminal(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Path
    ) -> None:
        """On a terminal tail prints the table; --json forces JSON lines."""
        tty(monkeypatch, "stdout")
        header, *rows = run(capsys, "tail", store, "-n", "2")[1].splitlines()
        assert header.startswith("SEQ") and "MESSAGE" in header
        assert [r.split()[0] for r in rows] == [str(N - 2), str(N - 1)]
        assert seqs(run(capsys, "tail", store, "-n", "2", "--json")[1]) == [N - 2, N - 1]

    def test_table_escapes_control_characters(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Logged text cannot forge table rows: escapes, line breaks, bidi overrides are shown escaped."""
        root = tmp_path / "hostile"
        forged = "x\x1b[1A\x1b[2K\r0    2026-12-04 07:55:00.579Z  INFO  app  login ok for admin"
        with AuditStore.open(root) as st:
            st.append({"message": forged, "level": "WARNING\x1b]0;pwned\x07", "logger": "app\nfake"})
            st.append({"message": "line1\nline2 \u202egnp.exe", "note": "\x1b[31mred"})
            st.append({"message": "m" * 500})
        tty(monkeypatch, "stdout")
        out = run(capsys, "tail", root, "-n", "3")[1]
        lines = out.splitlines()
        assert len(lines) == 4, out  # the header and exactly one line per record
        assert not any(c in out.replace("\n", "") for c in "\x1b\r\x07\u202e"), out
        assert "\\u001b[1A" in lines[1] and "\\n" in lines[2] and "\\u202e" in lines[2]
        assert len(lines[3]) < 250 and lines[3].rstrip().endswith("…")  # long messages are cut

    def test_damaged_store_warns(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """Reads skip damage, but say so: one stderr warning naming verify; stats counts the
        unreadable records and the segment bytes on disk."""
        root = tmp_path / "store"
        build(root, limit="64MiB")
        [seg] = segment_files(root)
        size = seg.stat().st_size
        data = bytearray(seg.read_bytes())
        data[size // 2] ^= 0x01
        seg.write_bytes(bytes(data))
        for command in (["tail", root, "-n", "1"], ["query", root, "--limit", "3"], ["stats", root]):
            code, _, err = run(capsys, *command)
            assert code == 0
            assert "could not be read" in err and "quipu-log verify" in err, (command, err)
        info = json.loads(run(capsys, "stats", root, "--json")[1])
        assert info["unreadable"] > 0 and info["records"] + info["unreadable"] == N
        assert info["bytes"] == size
        intact = tmp_path / "intact"
        build(intact)
        assert run(capsys, "tail", intact, "-n", "1")[2] == ""

    def test_empty_store(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A store without records: nothing printed, exit 0."""
        root = tmp_path / "empty-store"
        AuditStore.open(root).close()
        assert run(capsys, "tail", root) == (0, "", "")

    def test_follow_a_set(self, tmp_path: Path) -> None:
        """-f on a store set prints records appended to existing shards and to a shard born later."""
        from quipu_logging import StoreSet

        root = tmp_path / "set"
        s = StoreSet.open(root, shards=3)
        first = s.acquire()[1]
        first.append({"message": "before", "ts": now_us()})
        first.sync()
        with follow(root, 5) as proc:
            try:
                lines = Lines(proc.stdout)
                assert [json.loads(x)["message"] for x in lines.read(1)] == ["before"]
                first.append({"message": "on shard-000", "ts": now_us()})
                first.sync()
                [line] = lines.read(1)
                assert (json.loads(line)["message"], json.loads(line)["$shard"]) == (
                    "on shard-000",
                    "shard-000",
                )
                second = s.acquire()[1]  # a shard created after tail started
                second.append({"message": "on shard-001", "ts": now_us()})
                second.sync()
                [line] = lines.read(1)
                assert (json.loads(line)["message"], json.loads(line)["$shard"]) == (
                    "on shard-001",
                    "shard-001",
                )
                second.close()
            finally:
                proc.kill()
                proc.communicate(timeout=WAIT)
        first.close()

    def test_follow(self, tmp_path: Path) -> None:
        """-f prints the records a writer appends afterwards, in order, across segment rollovers."""
        root = tmp_path / "store"
        build(root, 5, limit=600)
        with follow(root, 2) as proc:
            try:
                lines = Lines(proc.stdout)
                assert [json.loads(x)["seq"] for x in lines.read(2)] == [3, 4]  # tail now follows
                with AuditStore.open(StoreConfig(root=root, max_segment_bytes=600)) as writer:
                    segments_before = len(segment_files(root))
                    writer.append({"message": "first new"})
                    writer.sync()
                    [line] = lines.read(1)
                    assert json.loads(line)["message"] == "first new"
                    writer.append_batch([{"message": f"batch {k}"} for k in range(12)])
                    writer.sync()
                    new = [json.loads(x) for x in lines.read(12)]
                    assert len(segment_files(root)) > segments_before  # the batch rolled over
                assert [r["seq"] for r in new] == list(range(6, 18))
                assert [r["message"] for r in new] == [f"batch {k}" for k in range(12)]
                proc.terminate()
                rest, err = proc.communicate(timeout=WAIT)
                assert proc.returncode == -signal.SIGTERM
                assert err == b""
                assert lines.buffer + rest == b""  # nothing extra, e.g. the checkpoint close() writes
            finally:
                if proc.poll() is None:
                    proc.kill()  # the with block then closes the pipes and reaps it


# --------------------------------------------------------------------------- export


def check_exported(lines: list[dict[str, Any]]) -> None:
    """Each line: seq, leaf_hash = SHA-256(0x00 || raw), raw decodes to record."""
    for line in lines:
        assert set(line) == {"seq", "leaf_hash", "raw", "record"}
        raw = base64.b64decode(line["raw"], validate=True)
        assert hashlib.sha256(b"\x00" + raw).hexdigest() == line["leaf_hash"]
        assert json.loads(raw) == line["record"]
        assert line["record"]["seq"] == line["seq"]


class TestExport:
    """`quipu-log export`: NDJSON with the exact stored bytes, which proofs then cover."""

    def test_every_record_with_its_bytes(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """One line per record, oldest first, with seq, leaf_hash, raw and record; raw is the stored bytes."""
        code, out, err = run(capsys, "export", store)
        assert (code, err) == (0, "")
        lines = json_lines(out)
        assert [x["seq"] for x in lines] == list(range(N))
        check_exported(lines)
        stored = {r.seq: r.raw for r in AuditStore.open_reader(store).scan()}
        assert all(base64.b64decode(x["raw"]) == stored[x["seq"]] for x in lines)

    def test_leaf_verifies_with_an_inclusion_proof(
        self, capsys: pytest.CaptureFixture[str], store: Path
    ) -> None:
        """Re-hashing an exported raw and checking it with `prove`'s path gives the store's root."""
        lines = json_lines(run(capsys, "export", store)[1])
        root = AuditStore.open_reader(store).merkle_root()
        for line in (lines[0], lines[9], lines[-1]):
            proof = json.loads(run(capsys, "prove", store, line["seq"])[1])
            leaf = merkle.leaf_hash(base64.b64decode(line["raw"]))
            assert leaf.hex() == line["leaf_hash"] == proof["leaf_hash"]
            path = [bytes.fromhex(h) for h in proof["path"]]
            assert merkle.verify_inclusion(leaf, line["seq"], proof["tree_size"], path, root)
            assert not merkle.verify_inclusion(
                merkle.leaf_hash(b"{}"), line["seq"], proof["tree_size"], path, root
            )

    def test_since(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--since (and --until) restrict the export by time."""
        lines = json_lines(run(capsys, "export", store, "--since", "5h")[1])
        assert [x["record"]["i"] for x in lines] == [i for i in range(N) if hours_ago(i) <= 5]
        check_exported(lines)
        lines = json_lines(run(capsys, "export", store, "--since", "10h", "--until", "2h")[1])
        assert [x["record"]["i"] for x in lines] == [i for i in range(N) if 2 < hours_ago(i) <= 10]

    def test_out_file(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """--out FILE writes the lines there, prints nothing on stdout and a count on stderr."""
        target = tmp_path / "audit.ndjson"
        code, out, err = run(capsys, "export", store, "--out", target)
        assert (code, out) == (0, "")
        assert err == f"exported {N} records to {target}\n"
        lines = json_lines(target.read_text())
        assert len(lines) == N
        check_exported(lines)

    def test_unwritable_out(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """--out in a missing directory: exit 2, one line."""
        code, _, err = run(capsys, "export", store, "--out", tmp_path / "no" / "such" / "file")
        assert code == 2
        assert_one_line_error(err, "file")

    def test_more_than_one_page(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A store larger than the export's internal page is exported whole, each record once."""
        root = tmp_path / "big"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes="64KiB")) as writer:
            writer.append_batch([{"message": f"m{k}", "k": k} for k in range(2500)])
        lines = json_lines(run(capsys, "export", root)[1])
        assert [x["seq"] for x in lines] == list(range(2500))
        check_exported(lines[::97])

    def test_works_on_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """export takes no lock."""
        root, _ = live
        code, out, _ = run(capsys, "export", root)
        assert code == 0
        assert json_lines(out)[-1]["record"]["message"] == "held"


# ---------------------------------------------------------------------------- prove


class TestProve:
    """`quipu-log prove`: inclusion and consistency proof JSON, and `--check` offline."""

    def test_inclusion_json_verifies_with_merkle_alone(
        self, capsys: pytest.CaptureFixture[str], store: Path
    ) -> None:
        """The inclusion proof JSON holds what merkle.verify_inclusion needs, and it verifies."""
        code, out, err = run(capsys, "prove", store, 6)
        assert (code, err) == (0, "")
        proof = json.loads(out)
        assert proof["type"] == "inclusion"
        assert (proof["seq"], proof["tree_size"]) == (6, N)
        reader = AuditStore.open_reader(store)
        assert proof["root"] == reader.merkle_root().hex()
        assert proof["leaf_hash"] == next(reader.scan(6)).leaf_hash.hex()
        path = [bytes.fromhex(h) for h in proof["path"]]
        leaf, root = bytes.fromhex(proof["leaf_hash"]), bytes.fromhex(proof["root"])
        assert merkle.verify_inclusion(leaf, 6, N, path, root)
        assert not merkle.verify_inclusion(leaf, 7, N, path, root)

    def test_inclusion_at_an_older_size(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--size proves against an older tree."""
        proof = json.loads(run(capsys, "prove", store, 3, "--size", 10)[1])
        assert proof["tree_size"] == 10
        assert proof["root"] == AuditStore.open_reader(store).merkle_root(10).hex()
        path = [bytes.fromhex(h) for h in proof["path"]]
        assert merkle.verify_inclusion(
            bytes.fromhex(proof["leaf_hash"]), 3, 10, path, bytes.fromhex(proof["root"])
        )

    @pytest.mark.parametrize("sizes", [(5,), (5, 12), (0, 7), (N, N), (1, N)])
    def test_consistency_json_verifies_with_merkle_alone(
        self, capsys: pytest.CaptureFixture[str], store: Path, sizes: tuple[int, ...]
    ) -> None:
        """--consistency OLD [NEW] JSON verifies with merkle.verify_consistency and the store's roots."""
        code, out, _ = run(capsys, "prove", store, "--consistency", *sizes)
        assert code == 0
        proof = json.loads(out)
        old, new = sizes[0], sizes[1] if len(sizes) == 2 else N
        assert proof["type"] == "consistency"
        assert (proof["old_size"], proof["new_size"]) == (old, new)
        reader = AuditStore.open_reader(store)
        assert proof["old_root"] == reader.merkle_root(old).hex()
        assert proof["new_root"] == reader.merkle_root(new).hex()
        path = [bytes.fromhex(h) for h in proof["path"]]
        args = (bytes.fromhex(proof["old_root"]), bytes.fromhex(proof["new_root"]))
        assert merkle.verify_consistency(old, new, *args, path)

    def test_check_inclusion(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """`prove --check FILE` accepts an honest proof; with --root the trusted root too."""
        proof_file = tmp_path / "proof.json"
        proof_file.write_text(run(capsys, "prove", store, 11)[1])
        root_hex = json.loads(proof_file.read_text())["root"]
        code, out, err = run(capsys, "prove", "--check", proof_file)
        assert (code, err) == (0, "")
        assert out.startswith("ok: seq 11 is in the tree of 24 records")
        code, out, _ = run(capsys, "prove", "--check", proof_file, "--root", root_hex)
        assert code == 0 and out.startswith("ok:")

    def test_check_consistency(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """`prove --check` accepts an honest consistency proof and rejects it with an edited old root."""
        proof_file = tmp_path / "consistency.json"
        proof_file.write_text(run(capsys, "prove", store, "--consistency", 9, 20)[1])
        code, out, _ = run(capsys, "prove", "--check", proof_file)
        assert code == 0
        assert out.startswith("ok: tree 20 extends tree 9")
        proof = json.loads(proof_file.read_text())
        proof["old_root"] = AuditStore.open_reader(store).merkle_root(8).hex()
        proof_file.write_text(json.dumps(proof))
        code, out, _ = run(capsys, "prove", "--check", proof_file)
        assert code == 1
        assert out.startswith("FAILED")

    @pytest.mark.parametrize("field", ["path", "leaf_hash", "seq", "tree_size", "root"])
    def test_check_edited_proof(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path, field: str
    ) -> None:
        """An inclusion proof with any field edited fails `--check`: exit 1."""
        proof = json.loads(run(capsys, "prove", store, 11)[1])
        if field == "path":
            proof["path"][1] = hashlib.sha256(b"forged").hexdigest()
        elif field in ("seq", "tree_size"):
            proof[field] += 1
        else:
            proof[field] = hashlib.sha256(proof[field].encode()).hexdigest()
        proof_file = tmp_path / "edited.json"
        proof_file.write_text(json.dumps(proof))
        code, out, _ = run(capsys, "prove", "--check", proof_file)
        assert code == 1
        assert out.startswith("FAILED")

    def test_check_root_of_another_tree(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """An honest proof checked against another tree's root (--root): exit 1."""
        proof_file = tmp_path / "proof.json"
        proof_file.write_text(run(capsys, "prove", store, 2)[1])
        other = tmp_path / "other"
        build(other, N + 1)
        other_root = AuditStore.open_reader(other).merkle_root().hex()
        code, out, _ = run(capsys, "prove", "--check", proof_file, "--root", other_root)
        assert code == 1
        assert out.startswith("FAILED") and other_root in out
        older = AuditStore.open_reader(store).merkle_root(N - 1).hex()
        assert run(capsys, "prove", "--check", proof_file, "--root", older)[0] == 1

    def test_check_proof_without_checkpoint(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """A proof at a size no checkpoint states (checkpoint null) still checks by its path."""
        stated = {
            json.loads(line)["tree_size"] for line in (store / "checkpoints.jsonl").read_text().splitlines()
        }
        size = min(set(range(5, N)) - stated)
        proof_file = tmp_path / "proof.json"
        proof_file.write_text(run(capsys, "prove", store, 3, "--size", size)[1])
        assert json.loads(proof_file.read_text())["checkpoint"] is None
        code, out, _ = run(capsys, "prove", "--check", proof_file)
        assert code == 0
        assert out.startswith(f"ok: seq 3 is in the tree of {size} records")

    def test_check_not_a_proof(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A file that is no proof at all (not JSON, not an object, another type) is a usage
        error, exit 2; a proof object with missing or bad fields fails the check, exit 1."""
        bad = tmp_path / "bad.json"
        for text in ("not json", "[1, 2]", '{"type": "passwd"}'):
            bad.write_text(text)
            code, out, err = run(capsys, "prove", "--check", bad)
            assert (code, out) == (2, ""), text
            assert_one_line_error(err, "bad.json", "not a proof file")
        bad.write_text('{"type": "inclusion"}')
        code, out, _ = run(capsys, "prove", "--check", bad)
        assert code == 1
        assert out.startswith("FAILED")

    def test_check_usage_errors(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """A missing proof file or a --root that is not hex: exit 2."""
        code, _, err = run(capsys, "prove", "--check", tmp_path / "gone.json")
        assert code == 2
        assert_one_line_error(err, "gone.json")
        proof_file = tmp_path / "proof.json"
        proof_file.write_text(run(capsys, "prove", store, 2)[1])
        code, _, err = run(capsys, "prove", "--check", proof_file, "--root", "xyz")
        assert code == 2
        assert_one_line_error(err, "--root")

    @pytest.mark.parametrize(
        "args",
        [
            [],
            ["{root}"],
            ["{root}", "99"],
            ["{root}", "3", "--size", "99"],
            ["{root}", "--consistency", "1", "2", "3"],
            ["{root}", "--consistency", "30"],
            ["{root}", "--consistency", "9", "5"],
        ],
    )
    def test_usage_errors(self, capsys: pytest.CaptureFixture[str], store: Path, args: list[str]) -> None:
        """Missing arguments and out-of-range sizes or seqs: exit 2, one line."""
        code, out, err = run(capsys, "prove", *[a.format(root=store) for a in args])
        assert (code, out) == (2, "")
        assert_one_line_error(err)

    def test_check_console(self, store: Path, tmp_path: Path) -> None:
        """Through the console entry: a proof saved from stdout checks (0) and fails on another root (1)."""
        proof_file = tmp_path / "proof.json"
        made = console("prove", store, 8)
        assert made.returncode == 0
        proof_file.write_text(made.stdout)
        root_hex = json.loads(made.stdout)["root"]
        assert console("prove", "--check", proof_file, "--root", root_hex).returncode == 0
        failed = console("prove", "--check", proof_file, "--root", "00" * 32)
        assert failed.returncode == 1
        assert failed.stdout.startswith("FAILED") and failed.stderr == ""

    def test_works_on_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """prove takes no lock."""
        root, _ = live
        code, out, _ = run(capsys, "prove", root, 0)
        assert code == 0
        assert json.loads(out)["type"] == "inclusion"


# ----------------------------------------------------------------------- checkpoint


class TestCheckpoint:
    """`quipu-log checkpoint`: a new checkpoint line, signed with --key, exported as an anchor."""

    def test_writes_a_checkpoint(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """It appends one checkpoint line to the store and prints it."""
        before = (store / "checkpoints.jsonl").read_text().splitlines()
        code, out, err = run(capsys, "checkpoint", store)
        assert (code, err) == (0, "")
        after = (store / "checkpoints.jsonl").read_text().splitlines()
        assert len(after) == len(before) + 1
        printed = json.loads(out)
        assert printed == json.loads(after[-1])
        assert printed["tree_size"] == N
        assert printed["root"] == AuditStore.open_reader(store).merkle_root().hex()
        assert run(capsys, "verify", store)[0] == 0
        assert not is_held(store)

    def test_key(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """--key signs the checkpoint: verify passes with the public key and fails with another."""
        private, public = write_key(tmp_path, "ops")
        _, stranger = write_key(tmp_path, "stranger")
        root = tmp_path / "signed"
        build(root, key=private)
        code, out, _ = run(capsys, "checkpoint", root, "--key", private)
        assert code == 0
        assert json.loads(out)["key_id"] != "sha256"
        assert run(capsys, "verify", root, "--public-key", public)[0] == 0
        assert run(capsys, "verify", root, "--public-key", stranger)[0] == 1

    def test_missing_key(self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path) -> None:
        """A --key file that does not exist: exit 2, and no checkpoint line is added."""
        before = (store / "checkpoints.jsonl").read_bytes()
        code, _, err = run(capsys, "checkpoint", store, "--key", tmp_path / "none.pem")
        assert code == 2
        assert_one_line_error(err, "none.pem")
        assert (store / "checkpoints.jsonl").read_bytes() == before

    def test_export_then_verify_anchor(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """--export FILE writes the line as an anchor; `verify --anchor FILE` passes, also after growth."""
        anchor = tmp_path / "anchor.json"
        code, out, err = run(capsys, "checkpoint", store, "--export", anchor)
        assert code == 0
        assert anchor.read_text() == out
        assert str(anchor) in err
        assert run(capsys, "verify", store, "--anchor", anchor)[0] == 0
        build(store, N + 4, start=N)
        assert run(capsys, "verify", store, "--anchor", anchor)[0] == 0

    def test_anchor_catches_a_rewritten_history(
        self, capsys: pytest.CaptureFixture[str], store: Path, tmp_path: Path
    ) -> None:
        """A store rebuilt with other content does not extend the exported anchor: exit 1."""
        anchor = tmp_path / "anchor.json"
        assert run(capsys, "checkpoint", store, "--export", anchor)[0] == 0
        forged = tmp_path / "forged"
        now = now_us()
        with AuditStore.open(forged) as writer:
            writer.append_batch([{**event(i, now), "message": f"forged {i}"} for i in range(N + 2)])
        assert run(capsys, "verify", forged)[0] == 0
        code, out, _ = run(capsys, "verify", forged, "--anchor", anchor)
        assert code == 1
        assert "anchor" in out

    def test_refuses_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """While another process writes: exit 2 and "store is live (pid N)" with the holder's pid."""
        root, pid = live
        before = (root / "checkpoints.jsonl").read_bytes()
        code, out, err = run(capsys, "checkpoint", root)
        assert (code, out) == (2, "")
        assert_one_line_error(err, f"store is live (pid {pid})")
        assert (root / "checkpoints.jsonl").read_bytes() == before

    def test_refuses_a_live_store_console(self, live: tuple[Path, int]) -> None:
        """The console entry exits 2 with the holder's pid."""
        root, pid = live
        done = console("checkpoint", root)
        assert done.returncode == 2
        assert_one_line_error(done.stderr, f"store is live (pid {pid})")

    def test_lock_taken_between_check_and_open(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, live: tuple[Path, int]
    ) -> None:
        """A writer that appears after the liveness check is still reported as live, with its pid."""
        root, pid = live
        monkeypatch.setattr(cli_module, "is_locked", lambda _root: False)
        code, _, err = run(capsys, "checkpoint", root)
        assert code == 2
        assert_one_line_error(err, "store is live")
        assert "(pid None)" not in err
        assert f"(pid {pid})" in err


def is_held(root: Path) -> bool:
    from quipu_logging.store._lock import is_locked

    return is_locked(str(root))


# ------------------------------------------------------------------------ retention


def aged_store(root: Path) -> list[Path]:
    """A closed store: 12 records 100 days old, then 12 from the last hour, over many segments.

    Returns the sealed segments holding old records only (what ``--max-age 90d`` removes).
    """
    now = now_us()
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=700)) as writer:
        for i in range(24):
            age = 100 * DAY_US if i < 12 else HOUR_US // 2
            writer.append(event(i, now - age + i))
    *sealed, _active = segment_files(root)
    doomed = []
    for seg in sealed:
        data = seg.read_bytes()
        items = [json.loads(data[p + FRAME.size : p + FRAME.size + n])["i"] for p, n in frames(data)]
        if max(items) >= 12:
            break
        doomed.append(seg)
    return doomed


class TestRetention:
    """`quipu-log retention`: removes old sealed segments; the store still verifies."""

    def test_max_age(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """--max-age 90d removes the segments whose records are all older; verify passes after."""
        root = tmp_path / "aged"
        doomed = aged_store(root)
        assert len(doomed) >= 2
        before = segment_files(root)
        code, out, err = run(capsys, "retention", root, "--max-age", "90d")
        assert (code, err) == (0, "")
        assert out == f"removed {len(doomed)} sealed segment(s)\n"
        after = segment_files(root)
        assert set(before) - set(after) == set(doomed)
        code, out, err = run(capsys, "verify", root)
        assert (code, err) == (0, ""), out
        kept = {r["record"]["i"] for r in json_lines(run(capsys, "export", root)[1]) if "i" in r["record"]}
        assert kept >= set(range(12, 24))  # every recent record survives
        assert not is_held(root)

    def test_max_bytes(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--max-bytes removes the oldest segments until the rest fit; verify passes after."""
        before = segment_files(store)
        code, out, _ = run(capsys, "retention", store, "--max-bytes", "1KiB")
        assert code == 0
        removed = int(out.split()[1])
        assert removed >= 1
        assert set(before) - set(segment_files(store)) == set(before[:removed])  # the oldest ones
        code, out, _ = run(capsys, "verify", store)
        assert code == 0, out

    def test_nothing_to_remove(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """When every segment is young enough nothing is removed."""
        before = segment_files(store)
        assert run(capsys, "retention", store, "--max-age", "30d") == (0, "removed 0 sealed segment(s)\n", "")
        assert segment_files(store) == before

    def test_needs_a_limit(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """Without --max-age or --max-bytes, or with a bad value: exit 2."""
        for args in ([], ["--max-age", "soon"], ["--max-bytes", "lots"]):
            code, _, err = run(capsys, "retention", store, *args)
            assert code == 2, args
            assert_one_line_error(err)

    def test_refuses_a_live_store(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """While another process writes: exit 2, "store is live (pid N)", nothing removed."""
        root, pid = live
        before = segment_files(root)
        code, _, err = run(capsys, "retention", root, "--max-bytes", "1")
        assert code == 2
        assert_one_line_error(err, f"store is live (pid {pid})")
        assert segment_files(root) == before

    def test_refuses_a_live_store_console(self, live: tuple[Path, int]) -> None:
        """The console entry exits 2 with the holder's pid."""
        root, pid = live
        done = console("retention", root, "--max-age", "1d")
        assert done.returncode == 2
        assert_one_line_error(done.stderr, f"store is live (pid {pid})")


# ---------------------------------------------------------------------------- stats


class TestStats:
    """`quipu-log stats`: a summary of the store, as text or --json."""

    def test_json_fields(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """--json holds counts, bytes, time span, tree size, root, last checkpoint, DLQ and liveness."""
        code, out, err = run(capsys, "stats", store, "--json")
        assert (code, err) == (0, "")
        [info] = json_lines(out)
        reader = AuditStore.open_reader(store)
        stamps = [r.ts for r in reader.scan()]
        segs = segment_files(store)
        assert info["records"] == N and info["tree_size"] == N
        assert info["segments"] == len(segs)
        assert info["bytes"] == sum(p.stat().st_size for p in segs)
        assert (info["first_ts"], info["last_ts"]) == (min(stamps), max(stamps))
        assert info["root"] == reader.merkle_root().hex()
        last_line = (store / "checkpoints.jsonl").read_text().splitlines()[-1]
        assert info["last_checkpoint"] == json.loads(last_line)
        assert (info["dlq_files"], info["dlq_bytes"], info["live"]) == (0, 0, False)

    def test_text(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        """The text form has one aligned line per item."""
        code, out, _ = run(capsys, "stats", store)
        assert code == 0
        rows = out.splitlines()
        keys = ["records", "segments", "time span", "root", "last checkpoint", "dead letters", "live"]
        assert [r for r in rows if not any(r.startswith(k) for k in keys)] == []
        assert len(rows) == len(keys)
        value_columns = {len(r) - len(r[len(k) :].lstrip()) for r, k in zip(rows, keys, strict=True)}
        assert len(value_columns) == 1  # the values line up
        assert rows[0].split()[1] == str(N)
        assert AuditStore.open_reader(store).merkle_root().hex() in rows[3]
        assert rows[-1].endswith("no")

    def test_dead_letters_and_live(self, capsys: pytest.CaptureFixture[str], live: tuple[Path, int]) -> None:
        """DLQ files are counted; a store held by a writer shows live."""
        root, _ = live
        (root / "dlq").mkdir(exist_ok=True)
        (root / "dlq" / "parked-0000000001.dlq").write_bytes(b"QDLQ\x01\x00\x00\x00" + b"x" * 92)
        [info] = json_lines(run(capsys, "stats", root, "--json")[1])
        assert (info["dlq_files"], info["dlq_bytes"], info["live"]) == (1, 100, True)
        assert info["records"] == 6
        text = run(capsys, "stats", root)[1]
        assert "1 file(s), 100 bytes" in text
        assert "yes" in text.splitlines()[-1]

    def test_empty_store(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A store without records: zero counts and an empty time span."""
        root = tmp_path / "empty-store"
        AuditStore.open(root).close()
        [info] = json_lines(run(capsys, "stats", root, "--json")[1])
        assert (info["records"], info["tree_size"], info["first_ts"]) == (0, 0, None)
        assert "(empty)" in run(capsys, "stats", root)[1]


class TestCheckpointExportAndAnchors:
    def test_unwritable_export_writes_no_checkpoint(
        self, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--export to a path that cannot be written: exit 2 before any checkpoint line is written."""
        before = (store / "checkpoints.jsonl").read_bytes()
        code, out, err = run(capsys, "checkpoint", store, "--export", tmp_path / "no" / "such" / "a.json")
        assert (code, out) == (2, "")
        assert_one_line_error(err, "--export", "cannot write")
        assert (store / "checkpoints.jsonl").read_bytes() == before

    def test_failed_checkpoint_leaves_no_export_file(
        self, live: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A checkpoint refused (live store) removes the export file it had created."""
        root, _pid = live
        code, _out, _err = run(capsys, "checkpoint", root, "--export", tmp_path / "a.json")
        assert code == 2
        assert not (tmp_path / "a.json").exists()

    def test_export_replaces_an_older_anchor(
        self, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An existing export file is replaced by the new line (not appended to, not left longer)."""
        target = tmp_path / "a.json"
        target.write_text("x" * 5000 + "\n")
        code, out, _err = run(capsys, "checkpoint", store, "--export", target)
        assert code == 0
        assert target.read_text() == out

    def test_anchor_of_the_other_kind_is_named(
        self, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A set checkpoint given to a store (and back) is a usage error that says which is which."""
        from quipu_logging import StoreSet

        StoreSet.open(tmp_path / "set", shards=2)
        code, set_line, _ = run(capsys, "checkpoint", tmp_path / "set")
        assert code == 0
        (tmp_path / "set.json").write_text(set_line)
        code, _out, err = run(capsys, "verify", store, "--anchor", tmp_path / "set.json")
        assert code == 2
        assert_one_line_error(err, "store set's checkpoint", "single store")
        code, store_line, _ = run(capsys, "checkpoint", store)
        (tmp_path / "store.json").write_text(store_line)
        code, _out, err = run(capsys, "verify", tmp_path / "set", "--anchor", tmp_path / "store.json")
        assert code == 2
        assert_one_line_error(err, "single store's checkpoint", "store set")

    @pytest.mark.parametrize(
        "line",
        [
            '{"created_at": 1, "set": "00", "prev": "00", "key_id": "k", "sig": ""}',
            '{"created_at": 1, "set": "00", "shards": 5, "prev": "00", "key_id": "k", "sig": ""}',
            '{"created_at": 1, "set": "00", "shards": [7], "prev": "00", "key_id": "k", "sig": ""}',
        ],
    )
    def test_bad_set_anchor_says_what_is_wrong_in_words(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
    ) -> None:
        """A malformed set anchor names the field, never a Python exception repr."""
        from quipu_logging import StoreSet

        StoreSet.open(tmp_path / "set", shards=2)
        (tmp_path / "a.json").write_text(line + "\n")
        code, _out, err = run(capsys, "verify", tmp_path / "set", "--anchor", tmp_path / "a.json")
        assert code == 2
        assert_one_line_error(err, "--anchor", "not a set checkpoint")
        assert "Error(" not in err and "shards" in err


class TestOutputsInsideTheStore:
    @pytest.mark.parametrize("target", ["merkle.spine", "checkpoints.jsonl", "new-anchor.json"])
    def test_checkpoint_export_into_the_store_is_refused(
        self, store: Path, capsys: pytest.CaptureFixture[str], target: str
    ) -> None:
        """--export naming a file inside the store: exit 2, the store's files untouched, no checkpoint."""
        before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
        code, out, err = run(capsys, "checkpoint", store, "--export", store / target)
        assert (code, out) == (2, "")
        assert_one_line_error(err, "--export", "inside the store")
        assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before

    def test_set_files_are_protected_too(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The same for a set root: its SET file cannot be overwritten by an export."""
        from quipu_logging import StoreSet

        StoreSet.open(tmp_path / "set", shards=2)
        before = (tmp_path / "set" / "SET").read_bytes()
        code, _out, err = run(capsys, "checkpoint", tmp_path / "set", "--export", tmp_path / "set" / "SET")
        assert code == 2 and "inside the store" in err
        assert (tmp_path / "set" / "SET").read_bytes() == before

    def test_export_out_into_the_store_or_nowhere(
        self, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """export --out inside the store, or to a path that cannot be written: exit 2, in words."""
        code, _out, err = run(capsys, "export", store, "--out", store / "merkle.spine")
        assert code == 2
        assert_one_line_error(err, "--out", "inside the store")
        code, _out, err = run(capsys, "export", store, "--out", tmp_path / "no" / "such" / "x.ndjson")
        assert code == 2
        assert_one_line_error(err, "--out", "cannot write")
        assert "Errno" not in err

    def test_a_shard_root_protects_its_whole_set(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Given a shard as the root, --out/--export may not land in its set (SET, set checkpoints)."""
        from quipu_logging import StoreSet

        s = StoreSet.open(tmp_path / "set", shards=2)
        s.acquire()[1].close()
        s.acquire()[1].close()
        before = {n: (tmp_path / "set" / n).read_bytes() for n in ("SET", "set-checkpoints.jsonl")}
        shard = tmp_path / "set" / "shard-000"
        assert run(capsys, "export", shard, "--out", tmp_path / "set" / "SET")[0] == 2
        assert (
            run(capsys, "checkpoint", shard, "--export", tmp_path / "set" / "set-checkpoints.jsonl")[0] == 2
        )
        other = tmp_path / "set" / "shard-001" / "checkpoints.jsonl"
        assert run(capsys, "checkpoint", shard, "--export", other)[0] == 2
        assert {n: (tmp_path / "set" / n).read_bytes() for n in before} == before


class TestProveShardNames:
    @pytest.mark.parametrize(
        "bad",
        ["../other/shard-000", "/tmp", "shard-1", "\u0661", "-1", "", "9" * 5000, "shard-" + "1" * 5000],
    )
    def test_only_a_shard_name_or_number(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
    ) -> None:
        """--shard takes shard-NNN or an ASCII number, never a path (it would prove another store)."""
        from quipu_logging import StoreSet

        s = StoreSet.open(tmp_path / "set", shards=2)
        with s.acquire()[1] as store:
            store.append({"message": "x"})
        shard = bad.encode().decode("unicode_escape")
        code, out, err = run(capsys, "prove", tmp_path / "set", "0", "--shard", shard)
        assert (code, out) == (2, "")
        assert "--shard" in err
        assert run(capsys, "prove", tmp_path / "set", "0", "--shard", "0")[0] == 0
        assert run(capsys, "prove", tmp_path / "set", "0", "--shard", "shard-000")[0] == 0


class TestSigningWarnings:
    def test_unchecked_signatures_and_an_unsigned_line_after_signed_ones(
        self, tmp_path: Path, ed25519_pem: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --public-key verify passes, warning of unchecked signatures and unsigned-after-signed."""
        pem, public = ed25519_pem
        root = tmp_path / "store"
        build(root, 5, key=pem)
        code, out, err = run(capsys, "verify", root)
        assert code == 0 and out.startswith("ok:")
        assert "not checked against a key" in err and "is unsigned" not in err
        build(root, 8, start=5)  # a writer without the key appends and checkpoints
        code, out, err = run(capsys, "verify", root, "--json")
        report = json.loads(out)
        assert code == 0 and report["ok"]
        assert any("is unsigned although an earlier checkpoint is signed" in w for w in report["warnings"])
        (tmp_path / "pub.pem").write_bytes(public)
        code, _out, _err = run(capsys, "verify", root, "--public-key", tmp_path / "pub.pem")
        assert code == 1  # with the key, the unsigned checkpoint is a problem

    def test_set_checkpoint_unsigned_after_signed(
        self, tmp_path: Path, ed25519_pem: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same warning for set checkpoints."""
        from quipu_logging import StoreSet

        pem, _public = ed25519_pem
        s = StoreSet.open(tmp_path / "set", shards=2)
        s.acquire()[1].close()
        assert run(capsys, "checkpoint", tmp_path / "set", "--key", pem)[0] == 0
        code, _out, err = run(capsys, "verify", tmp_path / "set")
        assert code == 0 and "is unsigned" not in err
        assert run(capsys, "checkpoint", tmp_path / "set")[0] == 0
        code, _out, err = run(capsys, "verify", tmp_path / "set")
        assert code == 0
        assert "set checkpoint line 3 is unsigned although an earlier checkpoint is signed" in err

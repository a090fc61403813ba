"""Checkpoints: signed (or digested) statements of a tree size and root, chained.

A checkpoint is one JSON line of ``checkpoints.jsonl``::

    {"created_at": µs, "key_id": "...", "prev": hex, "root": hex, "segment_seq": n,
     "sig": hex, "tree_size": n}

The signed message is, byte by byte::

    b"quipu-checkpoint-v1\\n"
    tree_size    u64 BE
    created_at   u64 BE  (UTC µs)
    segment_seq  u64 BE  (the active segment's number when written)
    root         32 bytes
    prev         32 bytes: SHA-256 of the previous checkpoint's message (zeros for the first)

``sig`` is an Ed25519 signature of the message (``key_id`` = hex of the first 8
bytes of SHA-256 of the raw 32-byte public key), or, for an unsigned store, the
hex SHA-256 of the message with ``key_id = "sha256"``. Because each message
names its predecessor's digest, the lines form a chain: a removed or edited line
breaks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, MalformedError

__all__ = ["DOMAIN", "Checkpoint", "Signer", "load_public_keys", "parse_checkpoint_lines"]

DOMAIN = b"quipu-checkpoint-v1\n"
UNSIGNED_KEY_ID = "sha256"
ZERO_DIGEST = b"\0" * 32
_U64x3 = struct.Struct(">QQQ")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint line.

    Attributes:
        tree_size: the number of leaves the checkpoint covers.
        root: the Merkle root at ``tree_size`` (32 bytes).
        created_at: when it was written, UTC µs.
        segment_seq: the number of the active segment then.
        prev: SHA-256 of the previous checkpoint's message (32 zero bytes for the first).
        key_id: the signing key's id, or ``"sha256"`` for an unsigned checkpoint.
        sig: the signature (or digest), hex.
    """

    tree_size: int
    root: bytes
    created_at: int
    segment_seq: int
    prev: bytes
    key_id: str
    sig: str

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return DOMAIN + _U64x3.pack(self.tree_size, self.created_at, self.segment_seq) + self.root + self.prev

    def digest(self) -> bytes:
        """SHA-256 of :meth:`message`: what the next checkpoint's ``prev`` holds."""
        return hashlib.sha256(self.message()).digest()

    @property
    def signed(self) -> bool:
        """True for an Ed25519-signed checkpoint."""
        return self.key_id != UNSIGNED_KEY_ID

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as a JSON-ready dict (hex for bytes)."""
        return {
            "created_at": self.created_at,
            "key_id": self.key_id,
            "prev": self.prev.hex(),
            "root": self.root.hex(),
            "segment_seq": self.segment_seq,
            "sig": self.sig,
            "tree_size": self.tree_size,
        }

    def to_json(self) -> str:
        """The checkpoint as its one-line JSON form."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Checkpoint | Mapping[str, Any] | str | bytes | os.PathLike[str]) -> Checkpoint:
        """Reads a checkpoint from a ``Checkpoint``, a dict, a JSON line, or a path to a file holding one.

        A file holding several lines (a copy of ``checkpoints.jsonl``) gives its last line.

        Raises:
            MalformedError: the input is not a checkpoint (a ``ValueError`` too).
        """
        if isinstance(data, Checkpoint):
            return data
        if isinstance(data, os.PathLike) or (
            isinstance(data, str) and not data.lstrip().startswith("{") and os.path.exists(data)
        ):
            with open(os.fspath(data), "rb") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
            if not lines:
                raise MalformedError(f"{os.fspath(data)}: no checkpoint in this file")
            data = lines[-1]
        if isinstance(data, (str, bytes)):
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                raise MalformedError("checkpoint is not valid JSON") from None
        else:
            obj = data
        if not isinstance(obj, Mapping):
            raise MalformedError("checkpoint must be a JSON object")
        try:
            cp = cls(
                tree_size=_uint(obj["tree_size"]),
                root=_hash(obj["root"]),
                created_at=_uint(obj["created_at"]),
                segment_seq=_uint(obj["segment_seq"]),
                prev=_hash(obj["prev"]),
                key_id=_text(obj["key_id"], "key_id"),
                sig=_text(obj["sig"], "sig"),
            )
        except KeyError as e:
            raise MalformedError(f"checkpoint lacks field {e.args[0]!r}") from None
        return cp


def _uint(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise MalformedError(f"checkpoint field must be an unsigned 64-bit integer, got {value!r:.40}")
    return value


def _hash(value: Any) -> bytes:
    if not isinstance(value, str):
        raise MalformedError("checkpoint hash fields must be hex strings")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MalformedError("checkpoint hash fields must be hex strings") from None
    if len(raw) != 32:
        raise MalformedError("checkpoint hash fields must be 32 bytes")
    return raw


def _text(value: Any, name: str) -> str:
    # str() of a nested list or dict would be accepted and then mean nothing; say what is wrong.
    if not isinstance(value, str):
        raise MalformedError(f"checkpoint field {name!r} must be a string")
    return value


def parse_checkpoint_lines(data: bytes) -> tuple[list[tuple[int, Checkpoint | None, str]], int]:
    """Splits ``checkpoints.jsonl`` into parsed lines.

    Args:
        data: the file's bytes.

    Returns:
        ``(lines, torn_at)``: each line as ``(byte offset, checkpoint or None, error)``,
        and the offset where a torn (newline-less) last line starts, or ``len(data)``.
    """
    out: list[tuple[int, Checkpoint | None, str]] = []
    pos = 0
    size = len(data)
    while pos < size:
        nl = data.find(b"\n", pos)
        if nl == -1:
            return out, pos
        line = data[pos:nl]
        if line.strip():
            try:
                out.append((pos, Checkpoint.from_json(line), ""))
            except ValueError as e:
                out.append((pos, None, str(e)))
        pos = nl + 1
    return out, size


class Signer:
    """Signs checkpoint messages with an Ed25519 private key, or digests them when there is none."""

    def __init__(self, key_path: str | None) -> None:
        self._key: Any = None
        self.key_id = UNSIGNED_KEY_ID
        if key_path is None:
            return
        ed25519, serialization = _crypto()
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"signing_key {key_path!r}: cannot load a PEM private key: {e}") from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"signing_key {key_path!r}: checkpoints are signed with Ed25519 keys only")
        self._key = key
        self.key_id = key_id_of(key.public_key())

    def sign(self, message: bytes) -> str:
        """The ``sig`` field for ``message``."""
        if self._key is None:
            return hashlib.sha256(message).hexdigest()
        return str(self._key.sign(message).hex())


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "signed checkpoints need the 'cryptography' package: pip install 'quipu-logging[crypto]'"
        ) from None
    return ed25519, serialization


def key_id_of(public_key: Any) -> str:
    """The ``key_id`` of an Ed25519 public key: hex of the first 8 bytes of SHA-256 of its raw bytes."""
    _, serialization = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def load_public_keys(keys: Iterable[Any]) -> dict[str, Any]:
    """Loads verification keys: PEM ``bytes``/``str``, paths to PEM files, or Ed25519 public key objects.

    Returns:
        ``{key_id: public key}``.

    Raises:
        ConfigError: a key cannot be read or is not Ed25519.
    """
    out: dict[str, Any] = {}
    keys = list(keys)
    if not keys:
        return out
    ed25519, serialization = _crypto()
    for key in keys:
        obj = key
        if isinstance(key, os.PathLike) or (isinstance(key, str) and "-----BEGIN" not in key):
            try:
                with open(os.fspath(key), "rb") as f:
                    obj = f.read()
            except OSError as e:
                raise ConfigError(f"public key {os.fspath(key)!r}: {e.strerror}") from e
        if isinstance(obj, str):
            obj = obj.encode()
        if isinstance(obj, bytes):
            try:
                obj = serialization.load_pem_public_key(obj)
            except ValueError as e:
                raise ConfigError(f"public key: not a PEM public key ({e})") from e
        if isinstance(obj, ed25519.Ed25519PrivateKey):
            obj = obj.public_key()
        if not isinstance(obj, ed25519.Ed25519PublicKey):
            raise ConfigError(
                f"public key: checkpoints are verified with Ed25519 keys only, got {type(obj).__name__}"
            )
        out[key_id_of(obj)] = obj
    return out


UNSIGNED_UNDER_KEYS = "checkpoint is unsigned but public keys were given"


def signing_warnings(entries: Iterable[tuple[str, bool]], keys_given: bool) -> list[str]:
    """Warnings about signatures verify could not rely on, for ``(where, signed)`` checkpoints in order.

    Without public keys a signature cannot be checked, so: say how many went unchecked,
    and point at an unsigned checkpoint after a signed one (someone without the key wrote
    it). With keys, an unsigned checkpoint is a problem already (:func:`check_signature`).
    """
    out: list[str] = []
    signed = 0
    for where, is_signed in entries:
        if is_signed:
            signed += 1
        elif signed and not keys_given:
            out.append(
                f"{where} is unsigned although an earlier checkpoint is signed: it was written without "
                "the signing key (verify with the public key to make this a failure)"
            )
    if signed and not keys_given:
        out.append(
            f"{signed} signed checkpoint(s) were not checked against a key: give the public key "
            "(--public-key / public_keys=) to verify their signatures"
        )
    return out


def check_signature(cp: Checkpoint, keys: Mapping[str, Any]) -> str | None:
    """Checks one checkpoint's ``sig``; returns why it fails, or ``None``.

    With ``keys`` given, every checkpoint must carry a valid signature by one of
    them (an unsigned one is a problem). Without keys, signed checkpoints cannot be
    checked (only the chain is), and unsigned ones must carry their digest.
    """
    message = cp.message()
    if not cp.signed:
        if keys:
            return UNSIGNED_UNDER_KEYS + " (expected a signature)"
        if cp.sig != hashlib.sha256(message).hexdigest():
            return "checkpoint digest does not match its fields (edited)"
        return None
    if not keys:
        return None
    key = keys.get(cp.key_id)
    if key is None:
        return f"checkpoint is signed by key {cp.key_id}, which is not among the public keys given"
    try:
        key.verify(bytes.fromhex(cp.sig), message)
    except Exception:
        return "checkpoint signature is invalid (edited, or signed by another key)"
    return None

"""Store configuration: :class:`StoreConfig`, :class:`SyncPolicy`, :class:`RetentionPolicy`.

Each is a frozen, keyword-only dataclass validated in ``__post_init__``; string
forms (``"group:1000:20"``, ``"64MiB"``, ``"90d"``) are parsed there, once, and
a typo raises :class:`~quipu_logging.errors.ConfigError` naming the value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ._fileio import FileLayer

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "RetentionPolicy",
    "StoreConfig",
    "SyncPolicy",
    "parse_duration_us",
    "parse_size",
]

MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_DURATION_UNITS_US = {
    "us": 1,
    "ms": 1000,
    "s": 1_000_000,
    "m": 60_000_000,
    "min": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 7 * 86_400_000_000,
}


def parse_size(value: int | str, what: str = "size") -> int:
    """Parses a byte size: an int, or a string like ``"64MiB"``, ``"10GiB"``, ``"500kB"``, ``"4096"``.

    Args:
        value: the size.
        what: the setting's name, for the error message.

    Returns:
        The size in bytes.

    Raises:
        ConfigError: the value is not a size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size such as 4096 or '64MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(
        f"{what}: expected a byte size such as 4096, '500kB', '64MiB' or '10GiB', got {value!r}"
    )


def parse_duration_us(value: int | float | str, what: str = "duration") -> int:
    """Parses a duration: seconds as a number, or a string like ``"90d"``, ``"12h"``, ``"15m"``, ``"20ms"``.

    Args:
        value: the duration.
        what: the setting's name, for the error message.

    Returns:
        The duration in microseconds.

    Raises:
        ConfigError: the value is not a duration.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration such as '90d' or '12h', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: a duration cannot be negative, got {value}")
        return int(value * 1_000_000)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", value)
        if m and m.group(2).lower() in _DURATION_UNITS_US:
            return int(float(m.group(1)) * _DURATION_UNITS_US[m.group(2).lower()])
    raise ConfigError(
        f"{what}: expected a duration such as '90d', '12h', '15m', '30s' or '20ms', got {value!r}"
    )


SyncMode = Literal["always", "every", "group", "os"]


@dataclass(frozen=True, kw_only=True)
class SyncPolicy:
    """When the store calls ``fsync``.

    * ``always``: before ``append`` returns.
    * ``every:N``: after every N records.
    * ``group:N:MS`` (the default, ``group:1000:20``; ``group`` alone means that):
      when N records are pending or the oldest pending one is MS milliseconds old,
      honoured even when nothing else is appended (the owner polls
      :meth:`AuditStore.sync_due`, see there).
    * ``os``: never in the background; the OS writes back when it likes.

    Whatever the policy, ``sync()``, ``flush()`` and ``close()`` fsync.

    Attributes:
        mode: one of ``always``, ``every``, ``group``, ``os``.
        n: the record count bound (``every`` and ``group``).
        ms: the age bound in milliseconds (``group``).
    """

    mode: SyncMode = "group"
    n: int = 1000
    ms: float = 20.0

    def __post_init__(self) -> None:
        if self.mode not in ("always", "every", "group", "os"):
            raise ConfigError(
                f"sync policy: unknown mode {self.mode!r}; expected always, every:N, group:N:MS, group or os"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"sync policy: N must be an integer >= 1, got {self.n!r}")
        if isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not self.ms > 0:
            raise ConfigError(f"sync policy: MS must be a number > 0, got {self.ms!r}")

    @classmethod
    def parse(cls, value: SyncPolicy | str) -> SyncPolicy:
        """Builds a policy from its string form (``always``, ``every:N``, ``group:N:MS``, ``group``, ``os``).

        Args:
            value: a policy, returned as it is, or its string form.

        Returns:
            The policy.

        Raises:
            ConfigError: the string is not a policy.
        """
        if isinstance(value, SyncPolicy):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"sync policy: expected a string such as 'group:1000:20', got {value!r}")
        text = value.strip().lower()
        parts = text.split(":")
        try:
            if text == "always":
                return cls(mode="always", n=1)
            if text == "os":
                return cls(mode="os")
            if text == "group":
                return cls(mode="group")
            if parts[0] == "every" and len(parts) == 2:
                return cls(mode="every", n=int(parts[1]))
            if parts[0] == "group" and len(parts) == 3:
                return cls(mode="group", n=int(parts[1]), ms=float(parts[2]))
        except ValueError:
            pass
        raise ConfigError(
            f"sync policy: cannot parse {value!r}; expected always, every:N, group:N:MS, group or os"
        )

    def __str__(self) -> str:
        if self.mode == "every":
            return f"every:{self.n}"
        if self.mode == "group":
            ms = int(self.ms) if float(self.ms).is_integer() else self.ms
            return f"group:{self.n}:{ms}"
        return self.mode


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """How long sealed segments are kept: by age OR by total size (either may be ``None``).

    A segment's age is its largest ``ts``; ``max_bytes`` counts segment files only.
    Deletion removes whole sealed segments, oldest first, never the active one and
    never the Merkle spine, so every proof and checkpoint keeps verifying.

    Attributes:
        max_age: ``"90d"``-style string or seconds; stored as microseconds in ``max_age_us``.
        max_bytes: ``"10GiB"``-style string or bytes.
    """

    max_age: int | float | str | None = None
    max_bytes: int | str | None = None
    max_age_us: int | None = field(init=False, default=None)
    max_bytes_int: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        age = None if self.max_age is None else parse_duration_us(self.max_age, "retention max_age")
        size = None if self.max_bytes is None else parse_size(self.max_bytes, "retention max_bytes")
        object.__setattr__(self, "max_age_us", age)
        object.__setattr__(self, "max_bytes_int", size)

    @property
    def keeps_everything(self) -> bool:
        """True when neither limit is set."""
        return self.max_age_us is None and self.max_bytes_int is None


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """How one store root is opened.

    Attributes:
        root: the store directory (created with its parents when missing).
        sync: a :class:`SyncPolicy` or its string form; default ``group:1000:20``.
        max_segment_bytes: a segment is sealed before a record would push it past this
            size (default 64 MiB; int or ``"64MiB"``).
        retention: the default policy of ``apply_retention()``; ``None`` keeps everything.
        signing_key: path of a PEM Ed25519 private key that signs checkpoints (needs the
            ``crypto`` extra); ``None`` writes unsigned (SHA-256 digest) checkpoints.
        file_layer: the layer every write goes through; tests pass a
            ``PowerLossFileLayer``. Leave it ``None``.
    """

    root: str | os.PathLike[str]
    sync: SyncPolicy | str = "group"
    max_segment_bytes: int | str = 64 * 1024 * 1024
    retention: RetentionPolicy | None = None
    signing_key: str | os.PathLike[str] | None = None
    file_layer: FileLayer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)):
            raise ConfigError(f"store root: expected a path, got {self.root!r}")
        object.__setattr__(self, "root", os.fspath(self.root))
        if not str(self.root).strip():
            # "" would silently mean the current directory (an unset environment variable, say).
            raise ConfigError("store root is empty: give the directory of the audit store")
        object.__setattr__(self, "sync", SyncPolicy.parse(self.sync))
        size = parse_size(self.max_segment_bytes, "max_segment_bytes")
        if size < 64:
            raise ConfigError(f"max_segment_bytes: at least 64 bytes, got {size}")
        object.__setattr__(self, "max_segment_bytes", size)
        if self.retention is not None and not isinstance(self.retention, RetentionPolicy):
            raise ConfigError(f"retention: expected a RetentionPolicy, got {self.retention!r}")
        if self.signing_key is not None:
            object.__setattr__(self, "signing_key", os.fspath(self.signing_key))

    @property
    def sync_policy(self) -> SyncPolicy:
        """The parsed sync policy."""
        assert isinstance(self.sync, SyncPolicy)
        return self.sync

    @property
    def segment_limit(self) -> int:
        """The parsed segment size limit in bytes."""
        assert isinstance(self.max_segment_bytes, int)
        return self.max_segment_bytes

    @classmethod
    def coerce(cls, value: StoreConfig | str | os.PathLike[str], **overrides: Any) -> StoreConfig:
        """Returns ``value`` if it is a config, else a config for the root path ``value``."""
        if isinstance(value, StoreConfig):
            return value
        return cls(root=value, **overrides)

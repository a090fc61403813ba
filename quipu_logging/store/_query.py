"""Query filters and cursors.

The store's filters are generic (DESIGN §2): type-exact equality on top-level
fields, ``ts >= since`` / ``ts < until``, ``levelno >= min_levelno``, a dotted
``logger`` prefix, and a substring of ``message``. A cursor is an opaque,
URL-safe string naming the store, the direction, the filter it was made for,
the ``seq`` of the last record returned, and (newest-first) the snapshot's
upper bound, so paging returns every match exactly once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from ..errors import QueryError

__all__ = ["Cursor", "QueryFilter", "to_us"]

_EXACT_TYPES = (str, int, float, bool, type(None))


def _readable(given: datetime | int | None, us: int) -> str:
    """A time for an error message: ISO 8601 (UTC) with the microseconds it was given as."""
    if isinstance(given, datetime):
        return given.isoformat()
    try:
        return f"{datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat()}, {us} µs"
    except (OverflowError, OSError, ValueError):
        return f"{us} µs"


def to_us(value: datetime | int | None, name: str) -> int | None:
    """Converts a ``since``/``until`` bound to UTC µs.

    Raises:
        QueryError: a naive datetime, or a value of another type.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise QueryError(
                f"{name}: naive datetime {value.isoformat()}; pass an aware one, "
                "e.g. datetime(..., tzinfo=timezone.utc)"
            )
        delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise QueryError(f"{name}: expected a datetime or integer microseconds, got {type(value).__name__}")


def _stored_key(key: str) -> str:
    # User keys starting with "$" are stored escaped ("$x" -> "$$x"); filters use the user's spelling.
    return "$" + key if key.startswith("$") else key


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """A conjunction of the store's generic filters over one record's payload."""

    where: tuple[tuple[str, Any], ...] = ()
    since: int | None = None
    until: int | None = None
    min_levelno: int | None = None
    logger_prefix: str | None = None
    contains: str | None = None

    @classmethod
    def build(
        cls,
        *,
        where: Mapping[str, Any] | None,
        since: datetime | int | None,
        until: datetime | int | None,
        min_levelno: int | None,
        logger_prefix: str | None,
        contains: str | None,
    ) -> QueryFilter:
        """Validates the query arguments.

        Raises:
            QueryError: a bad type, a non-scalar ``where`` value, or ``since`` after ``until``.
        """
        pairs: list[tuple[str, Any]] = []
        if where is not None:
            if not isinstance(where, Mapping):
                raise QueryError(f"where: expected a mapping of field to value, got {type(where).__name__}")
            for key, value in where.items():
                if not isinstance(key, str):
                    raise QueryError(f"where: field names are strings, got {key!r}")
                if not isinstance(value, _EXACT_TYPES):
                    raise QueryError(
                        f"where[{key!r}]: cannot match a {type(value).__name__}; "
                        "use a str, int, float, bool or None"
                    )
                if isinstance(value, float) and not math.isfinite(value):
                    raise QueryError(
                        f"where[{key!r}]: {value!r} is stored as the string {str(value)!r} (JSON has no "
                        f"{value!r}), so it can never match; use the string"
                    )
                if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                    raise QueryError(
                        f"where[{key!r}]: integers outside ±2**63 are stored as strings; use the string"
                    )
                pairs.append((_stored_key(key), value))
        lo, hi = to_us(since, "since"), to_us(until, "until")
        if lo is not None and hi is not None and lo > hi:
            raise QueryError(
                f"since ({_readable(since, lo)}) is after until ({_readable(until, hi)}): the range is empty"
            )
        if min_levelno is not None and (not isinstance(min_levelno, int) or isinstance(min_levelno, bool)):
            raise QueryError(f"min_levelno: expected an int, got {min_levelno!r}")
        if logger_prefix is not None and not isinstance(logger_prefix, str):
            raise QueryError(f"logger_prefix: expected a str, got {logger_prefix!r}")
        if contains is not None and not isinstance(contains, str):
            raise QueryError(f"contains: expected a str, got {contains!r}")
        return cls(tuple(sorted(pairs)), lo, hi, min_levelno, logger_prefix, contains)

    @property
    def unfiltered(self) -> bool:
        """True when every record matches."""
        return (
            not self.where
            and self.since is None
            and self.until is None
            and (self.min_levelno is None and self.logger_prefix is None and self.contains is None)
        )

    def misses_time_span(self, min_ts: int | None, max_ts: int | None) -> bool:
        """True when no record with ``min_ts <= ts <= max_ts`` can match the time range."""
        if min_ts is None or max_ts is None:
            return False
        if self.since is not None and max_ts < self.since:
            return True
        return self.until is not None and min_ts >= self.until

    def matches(self, payload: Mapping[str, Any]) -> bool:
        """True when the record's payload passes every filter."""
        if self.since is not None or self.until is not None:
            ts = payload.get("ts")
            if not isinstance(ts, int):
                return False
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        for key, value in self.where:
            got = payload.get(key, _MISSING)
            if type(got) is not type(value) or got != value:
                return False
        if self.min_levelno is not None:
            level = payload.get("levelno")
            if not isinstance(level, int) or isinstance(level, bool) or level < self.min_levelno:
                return False
        if self.logger_prefix is not None:
            name = payload.get("logger")
            prefix = self.logger_prefix
            if not isinstance(name, str):
                return False
            # Dotted-hierarchy prefix, like logging: "app" matches "app" and "app.db", not "apple".
            if not (name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")):
                return False
        if self.contains is not None:
            message = payload.get("message")
            if not isinstance(message, str) or self.contains not in message:
                return False
        return True

    def fingerprint(self) -> str:
        """A short digest binding a cursor to the filter it was made for."""
        body = orjson.dumps(
            [
                list(map(list, self.where)),
                self.since,
                self.until,
                self.min_levelno,
                self.logger_prefix,
                self.contains,
            ],
            default=repr,
        )
        return hashlib.sha256(body).hexdigest()[:16]


_MISSING = object()


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts (see the module docstring)."""

    store_id: str
    newest_first: bool
    last_seq: int
    high: int
    fingerprint: str

    def encode(self) -> str:
        """The opaque, URL-safe string form."""
        body = orjson.dumps(
            {
                "v": 1,
                "s": self.store_id,
                "d": "n" if self.newest_first else "o",
                "l": self.last_seq,
                "h": self.high,
                "f": self.fingerprint,
            }
        )
        return base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str, *, store_id: str, newest_first: bool, fingerprint: str) -> Cursor:
        """Parses a cursor and checks it belongs to this store, direction and filter.

        Raises:
            QueryError: garbled, from another store, or made for another query.
        """
        if not isinstance(text, str):
            raise QueryError(f"cursor: expected the string from Page.next_cursor, got {type(text).__name__}")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            obj = orjson.loads(raw)
            cursor = cls(
                store_id=str(obj["s"]),
                newest_first=obj["d"] == "n",
                last_seq=int(obj["l"]),
                high=int(obj["h"]),
                fingerprint=str(obj["f"]),
            )
            if obj.get("v") != 1 or obj["d"] not in ("n", "o") or cursor.last_seq < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise QueryError("cursor: garbled; pass Page.next_cursor exactly as returned") from None
        if cursor.store_id != store_id:
            raise QueryError(
                "cursor: it was made by another store; cursors work only with the store that made them"
            )
        if cursor.newest_first != newest_first or cursor.fingerprint != fingerprint:
            raise QueryError("cursor: it was made for a different query; repeat the same filters and order")
        return cursor

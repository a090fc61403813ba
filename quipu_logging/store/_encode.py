"""Turn any mapping into the exact payload bytes the store hashes.

A payload is ``orjson.dumps(record, option=orjson.OPT_SORT_KEYS)`` of a *normalised*
record: a tree of ``dict`` (``str`` keys only), ``list``, ``str``, ``int``, ``float``,
``bool`` and ``None``, nothing else, so orjson never serialises anything its own way and
the same event always gives the same bytes, whichever orjson (3.9 or later) is installed
and whatever int-to-str limit the process sets. Normalisation is iterative (an explicit
stack, never Python recursion) and never raises, whatever the mapping holds. The
tables below are the rules; ``tests/store/test_encoding.py`` pins them as byte vectors.

Record level
============

================  =============================================================================
``ts``            always present: UTC integer microseconds since the epoch. Taken from the
                  event's ``"ts"`` when that is an ``int`` (not ``bool``; ``int`` subclasses
                  become plain ints) in ``[0, 2**63)`` or an aware ``datetime`` at or after
                  the epoch; otherwise the logging call's time is used and the original value,
                  normalised, is kept as ``"$displaced": {"ts": value}``.
``seq``           always present: the record's global index. An event's own ``"seq"`` is
                  always replaced, its value kept as ``"$displaced": {"seq": value}``.
``$displaced``    only when the event carried an invalid ``ts`` and/or any ``seq``. Displaced
                  values are normalised as if still in place (a container there is depth 1).
``$lossy``        ``true`` when any surrogate code point in a key or a value (at any depth,
                  ``$displaced`` included) was replaced by U+FFFD. Nothing else sets it: the
                  other losses are marked where they happen.
``$sys``          only in system records written by the store (:func:`encode_system`); a user
                  key ``"$sys"`` is stored as ``"$$sys"``, so an event can never produce one.
================  =============================================================================

An event that is a ``Mapping`` but not a ``dict`` is read once through ``items()``; if
that raises, the record is ``{"$repr": repr(event), "seq": ..., "ts": ...}`` (or
``$unrepresentable``).

The event's ``"ts"`` / ``"seq"`` entries are the first keys (iteration order) that are
``str`` (subclasses included) equal to ``"ts"`` / ``"seq"``. Any other top-level key whose
text comes out as ``ts`` or ``seq`` (say an object whose ``repr`` is ``"ts"``) is
de-duplicated like any collision (``"ts#2"``).

Keys
====

Each key becomes a string, then is surrogate-cleaned, then ``$``-escaped, then
de-duplicated within its dict:

==============================  ===============================================================
``str`` (and subclasses)        itself, as a plain ``str``
``bool``                        ``"true"`` / ``"false"``
``None``                        ``"null"``
``int`` (and subclasses)        decimal text (``IntEnum.A`` gives ``"1"``); more than 4300
                                digits gives ``"int"``, as for a failing ``repr`` below
``float`` (and subclasses)      ``repr`` text (``"1.5"``, ``"-0.0"``, ``"1e+100"``); NaN and
                                infinities give ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
anything else                   ``repr(key)``; when ``repr`` raises, the type's
                                ``__qualname__`` (the text a ``$unrepresentable`` marker has)
==============================  ===============================================================

- **Reserved ``$``**: a key whose text starts with ``$`` gets one more ``$`` in front, at
  every depth (``"$x"`` is stored as ``"$$x"``, ``"$$x"`` as ``"$$$x"``). The markers this
  library adds (``$bytes``, ``$cycle``, ``$depth``, ``$displaced``, ``$lossy``, ``$naive``,
  ``$repr``, ``$sys``, ``$truncated``, ``$unrepresentable``) are written after escaping
  and are the only unescaped ``$`` keys.
- **Collisions**: when a key's final text is already used in its dict (two keys with the
  same text, e.g. ``1`` and ``"1"``, or two strings differing only in surrogates), the
  first keeps it and each later one takes the first free ``"<text>#2"``, ``"<text>#3"``,
  ... in the dict's iteration order. At the record's top level ``ts`` and ``seq`` always
  count as used.

Values
======

====================================  ==========================================================
``str`` (and subclasses)              plain ``str``; each surrogate code point (U+D800 to
                                      U+DFFF: Python strings hold no real pairs) becomes
                                      U+FFFD and the record gets ``"$lossy": true``
``bool``, ``None``                    themselves
``int`` (and subclasses, IntEnum)     plain ``int`` when in ``[-2**63, 2**63)``; outside it,
                                      the decimal text as a string; more than 4300 digits
                                      (Python's default ``int``-to-``str`` limit, applied here
                                      whatever the process sets) ``{"$unrepresentable": "int"}``
``float`` (and subclasses)            plain ``float``; NaN ``"NaN"``, +inf ``"Infinity"``,
                                      -inf ``"-Infinity"``. Written as orjson writes it,
                                      except that magnitudes from ``1e16`` up are written as
                                      Python's ``repr`` (``1e+16``, ``-1.5e+300``) whatever
                                      the orjson version (older ones omit the ``+``)
``bytes``, ``bytearray``,             ``{"$bytes": "<standard base64 with padding>"}``
``memoryview``
``Mapping`` (``dict`` and any         ``dict`` (keys as above), from ``items()``
``collections.abc.Mapping``)
``list``, ``tuple`` (and subclasses)  ``list``
``set``, ``frozenset`` (and           ``list`` of the normalised items sorted by their own
subclasses)                           ``orjson.dumps(item, option=OPT_SORT_KEYS)`` bytes
aware ``datetime``                    RFC 3339 UTC with exactly six fractional digits:
                                      ``"2026-12-03T18:22:50.123456Z"``
naive ``datetime``                    ``{"$naive": "2026-12-03T18:22:50.123456"}`` (its zone
                                      is unknown)
``date``                              ``"YYYY-MM-DD"``
``time``                              ``time.isoformat()``
``uuid.UUID``, ``decimal.Decimal``,   ``str(value)`` (the base class's ``__str__``)
``pathlib.PurePath``
``enum.Enum`` (other than the int,    its ``.value``, normalised in the enum's place
str and float mixins above)
anything else                         ``{"$repr": repr(value)}`` (surrogate-cleaned)
====================================  ==========================================================

- **Depth** counts from the record's top level: the top-level dict is depth 0, containers
  among its values depth 1, and so on. A container that would sit deeper than 64 becomes
  ``{"$depth": "<type __qualname__>"}`` (checked before any of its methods is called).
  Leaf markers (``$bytes``, ``$naive``, ``$repr``, ...) are not containers and are not
  subject to it.
- **Cycles**: a container that is its own ancestor on the current path becomes
  ``{"$cycle": true}`` (checked before depth). A container reached twice without a cycle is
  rendered twice in full.
- **Failures**: whenever the value's own code raises while being read (``repr``,
  ``items()``, iteration, ``utcoffset()``, a ``__class__`` or ``__qualname__`` trick, ...)
  the value becomes ``{"$repr": repr(value)}``, or ``{"$unrepresentable": "<type
  __qualname__>"}`` when ``repr`` raises too. Everything is caught except
  ``KeyboardInterrupt`` and ``SystemExit``. Classification uses ``type(value)``, never
  ``value.__class__``, so objects that lie about their class are rendered with ``repr``.
  Containers are snapshotted before they are walked, so another thread changing one
  cannot break the walk. An aware ``datetime`` whose UTC value falls outside what
  ``datetime`` can hold is rendered with ``repr``.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import decimal
import enum
import math
import pathlib
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeAlias

import orjson

__all__ = ["encode_event", "encode_system", "normalise"]

_SORT_KEYS: Final = orjson.OPT_SORT_KEYS

MAX_DEPTH: Final = 64
"""Deepest nesting level a container may sit at; deeper ones become ``$depth`` markers."""

MAX_INT_DIGITS: Final = 4300
"""Longest decimal text for an out-of-range ``int`` (CPython's default conversion limit)."""

_INT_MIN: Final = -(1 << 63)
_INT_END: Final = 1 << 63  # exclusive
# 2**14_300 has 4305 decimal digits, so anything wider is certainly over the limit and
# never costs a conversion.
_INT_MAX_BITS: Final = 14_300
# Chunks of 600 digits stay under the smallest limit CPython lets a process configure
# (640), so the conversion below works whatever ``sys.set_int_max_str_digits`` says.
_CHUNK_DIGITS: Final = 600
_CHUNK: Final = 10**_CHUNK_DIGITS
_MAX_ENUM_HOPS: Final = 16

_SURROGATES: Final = re.compile("[\ud800-\udfff]")
_EPOCH: Final = _dt.datetime(1970, 1, 1)
_ONE_US: Final = _dt.timedelta(microseconds=1)
_TOP_RESERVED: Final = frozenset({"ts", "seq"})
_MISSING: Final = object()
_type_qualname: Final[Any] = type.__dict__["__qualname__"]
_isfinite: Final = math.isfinite

_KIND_DICT: Final = 0
_KIND_LIST: Final = 1
_KIND_SET: Final = 2

# (iterator over a snapshot, output container being filled, kind, depth, source object)
_Frame: TypeAlias = tuple[Iterator[Any], Any, int, int, object]
# A normalised value; orjson.Fragment stands in for a wide float (see _wide_float).
_Json: TypeAlias = dict[str, Any] | list[Any] | str | int | float | bool | orjson.Fragment | None


class _State:
    """Per-call mutable state: the lossy flag and collision-suffix counters."""

    __slots__ = ("counters", "lossy", "wide")

    def __init__(self) -> None:
        self.lossy = False
        self.wide = False  # an orjson.Fragment stands for a float somewhere in the result
        self.counters: dict[tuple[int, str], int] | None = None


# ---------------------------------------------------------------------------- scalars


def _clean(s: str, st: _State) -> str:
    """Return ``s`` (an exact ``str``) with every surrogate replaced by U+FFFD."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        st.lossy = True
        return _SURROGATES.sub("\ufffd", s)
    return s


def _int_text(v: int) -> str | None:
    """Decimal text of an exact ``int``, or ``None`` past :data:`MAX_INT_DIGITS` digits."""
    if v.bit_length() > _INT_MAX_BITS:
        return None
    try:
        text = int.__repr__(v)
    except ValueError:  # the process's int-to-str limit is lower than ours
        n = -v if v < 0 else v
        parts: list[str] = []
        while n >= _CHUNK:
            n, low = divmod(n, _CHUNK)
            parts.append(f"{low:0{_CHUNK_DIGITS}d}")
        parts.append(f"{n:d}")
        parts.reverse()
        text = ("-" if v < 0 else "") + "".join(parts)
    digits = len(text) - (text[0] == "-")
    return text if digits <= MAX_INT_DIGITS else None


def _big_int(v: int) -> _Json:
    """Normalise an exact ``int`` known to lie outside ``[-2**63, 2**63)``."""
    text = _int_text(v)
    return {"$unrepresentable": "int"} if text is None else text


def _float_text(v: float) -> str:
    """The string a non-finite float is stored as."""
    if v != v:
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def _wide_float(v: float, st: _State) -> _Json:
    """Normalise an exact ``float`` that is not inside ``(-1e16, 1e16)``.

    Non-finite values become strings. Finite ones are written as Python's ``repr``
    (``1e+16``): orjson before 3.11.7 spells them without the ``+`` (``1e16``), and the
    bytes must not depend on which orjson is installed.
    """
    if not _isfinite(v):
        return _float_text(v)
    st.wide = True
    return orjson.Fragment(float.__repr__(v))


def _qualname(t: type, st: _State) -> str:
    """``t.__qualname__`` read through ``type``'s own descriptor (immune to metaclasses)."""
    try:
        name = _type_qualname.__get__(t, type)
        return _clean(str.__str__(name), st)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return "object"


def _repr_text(v: Any, st: _State) -> str | None:
    """``repr(v)`` as a clean plain ``str``, or ``None`` when it raises."""
    try:
        return _clean(str.__str__(repr(v)), st)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return None


def _repr_marker(v: Any, st: _State) -> dict[str, Any]:
    """``{"$repr": repr(v)}``, or ``{"$unrepresentable": type name}`` if ``repr`` raises."""
    text = _repr_text(v, st)
    if text is None:
        return {"$unrepresentable": _qualname(type(v), st)}
    return {"$repr": text}


def _b64(data: bytes | bytearray) -> dict[str, Any]:
    return {"$bytes": binascii.b2a_base64(data, newline=False).decode("ascii")}


def _utc_naive(v: _dt.datetime) -> _dt.datetime | None:
    """An exact naive ``datetime`` holding ``v``'s UTC time, or ``None`` if ``v`` is naive."""
    offset = _dt.datetime.utcoffset(v)
    base = _dt.datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond)
    return None if offset is None else base - offset


def _stamp(v: _dt.datetime) -> str:
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}"
        f"T{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}"
    )


def _datetime(v: _dt.datetime, st: _State) -> _Json:
    utc = _utc_naive(v)
    if utc is None:
        return {"$naive": _stamp(v)}
    return _stamp(utc) + "Z"


def _date(v: _dt.date, st: _State) -> _Json:
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}"


def _time(v: _dt.time, st: _State) -> _Json:
    return _clean(str.__str__(_dt.time.isoformat(v)), st)


def _memoryview(v: memoryview, st: _State) -> _Json:
    return _b64(v.tobytes())


def _bytes(v: bytes | bytearray, st: _State) -> _Json:
    return _b64(v)


def _uuid(v: uuid.UUID, st: _State) -> _Json:
    return uuid.UUID.__str__(v)


def _decimal(v: decimal.Decimal, st: _State) -> _Json:
    return decimal.Decimal.__str__(v)


def _path(v: pathlib.PurePath, st: _State) -> _Json:
    return _clean(str.__str__(pathlib.PurePath.__str__(v)), st)


# Leaf types converted by a single call; checked by exact type first, then by subclass
# in this order (``datetime`` before ``date``).
_LEAVES: Final[tuple[tuple[type, Callable[[Any, _State], _Json]], ...]] = (
    (bytes, _bytes),
    (bytearray, _bytes),
    (memoryview, _memoryview),
    (_dt.datetime, _datetime),
    (_dt.date, _date),
    (_dt.time, _time),
    (uuid.UUID, _uuid),
    (decimal.Decimal, _decimal),
    (pathlib.PurePath, _path),
)
_LEAF_BY_TYPE: Final[dict[type, Callable[[Any, _State], _Json]]] = dict(_LEAVES)
_CONTAINER_KIND: Final[dict[type, int]] = {
    dict: _KIND_DICT,
    list: _KIND_LIST,
    tuple: _KIND_LIST,
    set: _KIND_SET,
    frozenset: _KIND_SET,
}


# ------------------------------------------------------------------------------- keys

# Exact-str keys known to need no work (ASCII, not starting with "$"), learnt as they are
# met: one hash lookup then replaces three checks per key on the hot path. Field names
# repeat from record to record; when junk keys fill the cache it is simply emptied.
_PLAIN_KEYS: dict[str, None] = {}
_PLAIN_TOP_KEYS: dict[str, None] = {}  # the same minus "ts" and "seq"
_PLAIN_CACHE_SIZE: Final = 4096
_PLAIN_KEY_CHARS: Final = 64
_NO_NAMES: Final[frozenset[str]] = frozenset()


def _learn_plain(k: str) -> None:
    """Remember the exact, ASCII, ``$``-free key ``k`` for the hot path."""
    if len(k) > _PLAIN_KEY_CHARS:
        return
    if len(_PLAIN_KEYS) >= _PLAIN_CACHE_SIZE:
        _PLAIN_KEYS.clear()
        _PLAIN_TOP_KEYS.clear()
    _PLAIN_KEYS[k] = None
    if k not in _TOP_RESERVED:
        _PLAIN_TOP_KEYS[k] = None


class Marker(str):
    """A key only the library creates (``Marker("$truncated")``): stored unescaped.

    User keys starting with ``$`` are escaped to ``$$...``; the front ends use this
    type for the markers DESIGN §4 reserves to the library (``$truncated``), so those
    are the only unescaped ``$`` keys a stored record can carry. ``$sys`` is refused:
    only the store itself writes system records.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Marker:
        if not text.startswith("$") or text in ("$sys", "$$sys"):
            raise ValueError(f"not a library marker: {text!r}")
        return super().__new__(cls, text)


def _key_text(k: Any, st: _State) -> str:
    """The escaped text of a key (before de-duplication)."""
    t = type(k)
    if t is Marker:
        return str.__str__(k)
    if t is str:
        if k.isascii():
            if k[:1] != "$":
                _learn_plain(k)
            text: str = k
        else:
            text = _clean(k, st)
    elif t is bool:
        text = "true" if k else "false"
    elif k is None:
        text = "null"
    elif t is int:
        text = _int_text(k) or "int"
    else:
        try:
            if issubclass(t, str):
                text = _clean(str.__str__(k), st)
            elif issubclass(t, int):
                text = _int_text(int.__int__(k)) or "int"
            elif issubclass(t, float):
                f = float.__float__(k)
                text = float.__repr__(f) if _isfinite(f) else _float_text(f)
            else:
                text = _repr_text(k, st) or _qualname(t, st)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            text = _repr_text(k, st) or _qualname(t, st)
    return "$" + text if text[:1] == "$" else text


def _dedupe(name: str, out: dict[str, Any], st: _State, reserved: frozenset[str]) -> str:
    """The first free ``name#N`` (N >= 2) in ``out`` (and not in ``reserved``)."""
    counters = st.counters
    if counters is None:
        counters = st.counters = {}
    # Names only ever get taken, so the search resumes where the last one for this
    # (dict, name) stopped: still the first free suffix, without quadratic rescans.
    slot = (id(out), name)
    n = counters.get(slot, 2)
    while True:
        candidate = f"{name}#{n}"
        n += 1
        if candidate not in out and candidate not in reserved:
            counters[slot] = n
            return candidate


# ------------------------------------------------------------------------ the walker


def _flat_dict(d: dict[Any, Any]) -> dict[str, Any] | None:
    """Fast path: ``d`` normalised when it needs no work but copying, else ``None``.

    Takes exact dicts whose keys are all known plain keys and whose values are all exact
    ASCII ``str``, in-range ``int``, ``float`` inside ``(-1e16, 1e16)``, ``bool`` or ``None``. Such a dict
    cannot be its own ancestor, and its keys cannot collide.
    """
    plain = _PLAIN_KEYS
    out: dict[str, Any] = {}
    try:
        for k, v in d.items():
            if type(k) is not str or k not in plain:
                return None
            t = type(v)
            if t is str:
                if not v.isascii():
                    return None
            elif t is int:
                if not _INT_MIN <= v < _INT_END:
                    return None
            elif t is float:
                if not -1e16 < v < 1e16:
                    return None
            elif not (t is bool or v is None):
                return None
            out[k] = v
    except RuntimeError:  # resized by another thread: the general path snapshots it
        return None
    return out


def _flat_list(seq: list[Any] | tuple[Any, ...]) -> list[Any] | None:
    """Fast path: like :func:`_flat_dict` for an exact ``list`` or ``tuple``."""
    out: list[Any] = []
    append = out.append
    for v in seq:
        t = type(v)
        if t is str:
            if not v.isascii():
                return None
        elif t is int:
            if not _INT_MIN <= v < _INT_END:
                return None
        elif t is float:
            if not -1e16 < v < 1e16:
                return None
        elif not (t is bool or v is None):
            return None
        append(v)
    return out


def _open(v: Any, t: type, kind: int, depth: int, path: set[int], st: _State) -> tuple[_Json, _Frame | None]:
    """Start a container: a marker (cycle, depth) or an empty output and its frame."""
    if id(v) in path:
        return {"$cycle": True}, None
    if depth > MAX_DEPTH:
        return {"$depth": _qualname(t, st)}, None
    snapshot: list[Any]
    if kind == _KIND_DICT:
        if t is dict:
            snapshot = list(v.items())
        else:
            # Unpack here so a Mapping whose items() yields junk fails now, not mid-walk.
            snapshot = [(k, x) for k, x in v.items()]
        out: dict[str, Any] | list[Any] = {}
    else:
        snapshot = list(v)
        out = []
    path.add(id(v))
    return out, (iter(snapshot), out, kind, depth, v)


def _prepare(v: Any, depth: int, path: set[int], st: _State) -> tuple[_Json, _Frame | None]:
    """Normalise ``v`` sitting at ``depth``; a container also returns the frame to walk.

    Never raises (other than ``KeyboardInterrupt`` / ``SystemExit``).
    """
    t = type(v)
    if depth <= MAX_DEPTH:
        if t is dict:
            flat: _Json = _flat_dict(v)
            if flat is not None:
                return flat, None
        elif t is list or t is tuple:
            flat = _flat_list(v)
            if flat is not None:
                return flat, None
    kind = _CONTAINER_KIND.get(t)
    if kind is not None:
        try:
            return _open(v, t, kind, depth, path, st)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            return _repr_marker(v, st), None
    return _prepare_other(v, depth, path, st)


def _prepare_other(v: Any, depth: int, path: set[int], st: _State) -> tuple[_Json, _Frame | None]:
    """:func:`_prepare` for everything but exact ``dict``/``list``/``tuple``/``set``."""
    original = v
    try:
        for _hop in range(_MAX_ENUM_HOPS):
            t = type(v)
            if t is str:
                return _clean(v, st), None
            if t is int:
                return (v if _INT_MIN <= v < _INT_END else _big_int(v)), None
            if t is float:
                return (v if -1e16 < v < 1e16 else _wide_float(v, st)), None
            if t is bool or v is None:
                return v, None
            kind = _CONTAINER_KIND.get(t)
            if kind is not None:
                return _open(v, t, kind, depth, path, st)
            leaf = _LEAF_BY_TYPE.get(t)
            if leaf is not None:
                return leaf(v, st), None
            # Subclasses and ABCs, looked up on type(v) so __class__ games do not matter.
            if issubclass(t, str):
                return _clean(str.__str__(v), st), None
            if issubclass(t, int):
                n = int.__int__(v)
                return (n if _INT_MIN <= n < _INT_END else _big_int(n)), None
            if issubclass(t, float):
                f = float.__float__(v)
                return (f if -1e16 < f < 1e16 else _wide_float(f, st)), None
            for base, convert in _LEAVES:
                if issubclass(t, base):
                    return convert(v, st), None
            if issubclass(t, enum.Enum):
                v = v.value
                continue
            if issubclass(t, Mapping):
                return _open(v, t, _KIND_DICT, depth, path, st)
            if issubclass(t, (list, tuple)):
                return _open(v, t, _KIND_LIST, depth, path, st)
            if issubclass(t, (set, frozenset)):
                return _open(v, t, _KIND_SET, depth, path, st)
            return _repr_marker(v, st), None
        return _repr_marker(v, st), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return _repr_marker(original, st), None


def _sort_key(item: _Json) -> bytes:
    return orjson.dumps(item, option=_SORT_KEYS)


def _walk(stack: list[_Frame], path: set[int], st: _State) -> None:
    """Fill every frame on ``stack`` (depth first) until it is empty."""
    plain = _PLAIN_KEYS
    int_min = _INT_MIN
    int_end = _INT_END
    while stack:
        frame = stack[-1]
        it, out, kind, depth, src = frame
        child_depth = depth + 1
        child: _Frame | None = None
        if kind == _KIND_DICT:
            for k, v in it:
                name = k if type(k) is str and k in plain else _key_text(k, st)
                if name in out:
                    name = _dedupe(name, out, st, _NO_NAMES)
                t = type(v)
                if t is str:
                    out[name] = v if v.isascii() else _clean(v, st)
                elif t is int:
                    out[name] = v if int_min <= v < int_end else _big_int(v)
                elif t is float:
                    out[name] = v if -1e16 < v < 1e16 else _wide_float(v, st)
                elif t is bool or v is None:
                    out[name] = v
                else:
                    out[name], child = _prepare(v, child_depth, path, st)
                    if child is not None:
                        break
        else:
            append = out.append
            for v in it:
                t = type(v)
                if t is str:
                    append(v if v.isascii() else _clean(v, st))
                elif t is int:
                    append(v if int_min <= v < int_end else _big_int(v))
                elif t is float:
                    append(v if -1e16 < v < 1e16 else _wide_float(v, st))
                elif t is bool or v is None:
                    append(v)
                else:
                    value, child = _prepare(v, child_depth, path, st)
                    append(value)
                    if child is not None:
                        break
        if child is not None:
            stack.append(child)
            continue
        stack.pop()
        path.discard(id(src))
        if kind == _KIND_SET:
            out.sort(key=_sort_key)


def _value(v: Any, depth: int, path: set[int], st: _State) -> _Json:
    """Normalise one value completely (walking it if it is a container)."""
    result, frame = _prepare(v, depth, path, st)
    if frame is not None:
        _walk([frame], path, st)
    return result


# ---------------------------------------------------------------------------- public


def normalise(value: Any) -> tuple[Any, bool]:
    """Normalise any value by the rules in this module's docstring, on its own.

    ``value`` sits at depth 0 (a dict or list passed here is the top level). Keys are
    escaped and de-duplicated as everywhere else; no ``ts``/``seq`` handling is done.

    Args:
        value: anything at all.

    Returns:
        ``(normalised, lossy)``: a tree of ``dict``/``list``/``str``/``int``/``float``/
        ``bool``/``None`` that ``orjson`` serialises exactly, and whether any surrogate was
        replaced by U+FFFD on the way.
    """
    st = _State()
    result = _value(value, 0, set(), st)
    if st.wide:
        result = _plain_floats(result)
    return result, st.lossy


def _plain_floats(tree: Any) -> Any:
    """Replace, in place, each ``orjson.Fragment`` standing for a float by that float."""
    fragment = orjson.Fragment
    if type(tree) is fragment:
        return orjson.loads(orjson.dumps(tree))
    stack = [tree]
    while stack:
        node = stack.pop()
        slots = node.items() if type(node) is dict else enumerate(node)
        for slot, child in list(slots):
            if type(child) is fragment:
                node[slot] = orjson.loads(orjson.dumps(child))
            elif type(child) is dict or type(child) is list:
                stack.append(child)
    return tree


def _valid_ts(raw: Any) -> int | None:
    """``raw`` as an integer-microsecond timestamp in ``[0, 2**63)``, or ``None``."""
    t = type(raw)
    if t is int:
        return raw if 0 <= raw < _INT_END else None
    try:
        if t is bool:
            return None
        if issubclass(t, int):
            n = int.__int__(raw)
            return n if 0 <= n < _INT_END else None
        if issubclass(t, _dt.datetime):
            utc = _utc_naive(raw)
            if utc is None:
                return None
            us: int = (utc - _EPOCH) // _ONE_US
            return us if 0 <= us < _INT_END else None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return None
    return None


def encode_event(event: Mapping[str, Any], *, seq: int, now_us: int) -> tuple[bytes, int]:
    """Encode a user event as the payload bytes the store frames and hashes.

    The record is the normalised event (see the module docstring) plus ``ts`` and ``seq``,
    serialised with ``orjson`` and sorted keys. This never raises for any content of
    ``event``; a mapping that cannot even be read becomes a ``$repr`` (or
    ``$unrepresentable``) marker next to ``ts`` and ``seq``.

    Args:
        event: the event mapping; not modified.
        seq: the record's global index; always stored as ``seq``.
        now_us: the time of the logging call (UTC integer microseconds), used when the
            event has no valid ``ts`` of its own.

    Returns:
        ``(payload, ts)``: the exact payload bytes and the ``ts`` they carry.

    Raises:
        TypeError: ``event`` is not a :class:`collections.abc.Mapping`.
    """
    t = type(event)
    pairs: Any
    if t is dict:
        pairs = event.items()
    else:
        try:
            is_mapping = issubclass(t, Mapping)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            is_mapping = False
        if not is_mapping:
            raise TypeError(f"an event must be a mapping, not {t.__name__}")
        try:
            pairs = [(k, v) for k, v in event.items()]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            pairs = None
    st = _State()
    try:
        out, ts_raw, seq_raw = _encode_items(event, pairs, t is dict, st)
    except RuntimeError as exc:
        if isinstance(exc, RecursionError):  # the caller's stack, not the event's content
            raise
        # The dict was resized under the lazy walk (by another thread, or by a value's
        # own repr): redo it from a snapshot, taken in C without running Python code.
        st = _State()
        out, ts_raw, seq_raw = _encode_items(event, list(pairs), t is dict, st)

    if type(ts_raw) is int and 0 <= ts_raw < _INT_END:
        ts: int = ts_raw
    elif ts_raw is _MISSING:
        ts = now_us
    else:
        valid = _valid_ts(ts_raw)
        if valid is None:
            ts = now_us
            out["$displaced"] = {"ts": _value(ts_raw, 1, {id(event)}, st)}
        else:
            ts = valid
    if seq_raw is not _MISSING:
        out.setdefault("$displaced", {})["seq"] = _value(seq_raw, 1, {id(event)}, st)
    if st.lossy:
        out["$lossy"] = True
    out["ts"] = ts
    out["seq"] = seq
    return orjson.dumps(out, option=_SORT_KEYS), ts


def _encode_items(
    event: object, pairs: Any, unique: bool, st: _State
) -> tuple[dict[str, Any], object, object]:
    """Normalise the top level; returns the record so far and the raw ``ts``/``seq``.

    ``unique`` says the pairs come from an exact ``dict``, so two plain keys can never
    collide with each other, only with a key whose text was computed.
    """
    out: dict[str, Any] = {}
    ts_raw: object = _MISSING
    seq_raw: object = _MISSING
    if pairs is None:
        out.update(_repr_marker(event, st))
        return out, ts_raw, seq_raw
    path = {id(event)}
    plain = _PLAIN_TOP_KEYS
    int_min = _INT_MIN
    int_end = _INT_END
    check = not unique
    for k, v in pairs:
        tk = type(k)
        if tk is str and k in plain:
            name = k
            if check and name in out:
                name = _dedupe(name, out, st, _TOP_RESERVED)
        elif tk is str and k == "ts" and ts_raw is _MISSING:
            ts_raw = v
            continue
        elif tk is str and k == "seq" and seq_raw is _MISSING:
            seq_raw = v
            continue
        else:
            name = _key_text(k, st)
            if name in _TOP_RESERVED and tk is not str and issubclass(tk, str):
                if name == "ts":
                    if ts_raw is _MISSING:
                        ts_raw = v
                        continue
                elif seq_raw is _MISSING:
                    seq_raw = v
                    continue
            check = True
            if name in out or name in _TOP_RESERVED:
                name = _dedupe(name, out, st, _TOP_RESERVED)
        t = type(v)
        if t is str:
            out[name] = v if v.isascii() else _clean(v, st)
        elif t is int:
            out[name] = v if int_min <= v < int_end else _big_int(v)
        elif t is float:
            out[name] = v if -1e16 < v < 1e16 else _wide_float(v, st)
        elif t is bool or v is None:
            out[name] = v
        else:
            if t is dict:  # the common nested case, without the general machinery
                flat = _flat_dict(v)
                if flat is not None:
                    out[name] = flat
                    continue
            result, frame = _prepare(v, 1, path, st)
            if frame is not None:
                _walk([frame], path, st)
            out[name] = result
    return out, ts_raw, seq_raw


def encode_system(kind: str, fields: Mapping[str, Any], *, seq: int, ts: int) -> bytes:
    """Encode a system record ``{"$sys": kind, **fields, "seq": seq, "ts": ts}``.

    Only the store calls this, and it is the only way to produce an unescaped ``$sys``
    key. ``fields`` are library-controlled: their top-level keys are written as given
    (not escaped); their values are normalised like any event value.

    Args:
        kind: the system record's kind, e.g. ``"retention"`` or ``"gap"``.
        fields: the record's other fields (string keys other than ``$sys``, ``seq``,
            ``ts``).
        seq: the record's global index.
        ts: the record's time, UTC integer microseconds.

    Returns:
        The exact payload bytes.

    Raises:
        TypeError: ``kind`` or a field key is not a ``str``.
        ValueError: a field key is ``$sys``, ``seq`` or ``ts``.
    """
    if type(kind) is not str:
        raise TypeError(f"a system record kind must be a str, not {type(kind).__name__}")
    st = _State()
    out: dict[str, Any] = {"$sys": _clean(kind, st)}
    path = {id(fields)}
    for k, v in fields.items():
        if type(k) is not str:
            raise TypeError(f"system record field names must be str, not {type(k).__name__}")
        if k in ("$sys", "seq", "ts"):
            raise ValueError(f"system record field {k!r} is reserved")
        out[_clean(k, st)] = _value(v, 1, path, st)
    if st.lossy:
        out["$lossy"] = True
    out["seq"] = seq
    out["ts"] = ts
    return orjson.dumps(out, option=_SORT_KEYS)

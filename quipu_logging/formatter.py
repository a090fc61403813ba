"""``AuditJsonFormatter``: a ``LogRecord`` as the audit record the store keeps.

One formatter serves two purposes. :meth:`AuditJsonFormatter.to_mapping` returns the
dict :class:`~quipu_logging.AuditHandler` hands to the pipeline (DESIGN §7), and
:meth:`~AuditJsonFormatter.format` returns the same record as one JSON line, so the
formatter can sit on a fallback handler and rejected records look like stored ones.

The record shape
================

================  ==========================================================================
``level``         ``record.levelname``
``levelno``       ``record.levelno``
``logger``        ``record.name``
``message``       ``record.getMessage()`` (for a ``dict`` message without arguments, see below)
``process``       ``record.process``
``thread``        ``record.threadName``
``source``        ``{"file": record.filename, "func": record.funcName, "line": record.lineno}``
``ts``            ``record.created`` in UTC integer microseconds (the time of the call)
``exc``           one formatted traceback, only when the record carries an exception
``stack``         one formatted stack, only when the record carries ``stack_info``
extras            every other record attribute not in ``reserved_attrs`` and not starting
                  with ``_`` (what ``extra=`` and filters add), at the top level
================  ==========================================================================

The store adds ``seq``. These *core* keys cannot be renamed or shadowed: an extra (or a
``dict`` message field) whose name is a core key is kept as ``"<name>#2"`` (the store's
convention for colliding keys), and configuring ``rename_fields``, ``static_fields``,
``timestamp`` or ``defaults`` onto a core key is a :class:`~quipu_logging.ConfigError`.

A ``dict`` logged as the message (``logger.info({"action": "login"})``, python-json-logger
style) contributes its items as fields; its ``"event"`` (structlog's name) or else its
``"message"`` string becomes ``message``. A call whose arguments do not fit its format
string (``logger.info("%d", "x")``) is kept too: ``message`` is the unformatted string,
with the arguments under ``args`` and the formatting error under ``message_error``.

A structlog event (a record made by structlog's ``ProcessorFormatter.wrap_for_formatter``
bridge, or by :class:`~quipu_logging.structlog.AuditProcessor`) is stored the same way
whichever road it took: its ``level`` name and a ``logger`` equal to the record's are the
core keys already (not ``level#2``); ``exc_info`` is rendered once, into ``exc``, and a
traceback structlog's ``format_exc_info`` rendered into ``exception`` (or a stack in
``stack``) moves to the core key; ``source`` is the application's call site rather than
structlog's plumbing when the record is formatted during the logging call; and an event
key beats a record attribute of the same name (added by a filter, say).

Freezing
========

``to_mapping`` runs in the logging call, so what it returns is what is stored. Containers
(``dict`` and other mappings, ``list``, ``tuple``, ``set``) are copied at every depth
(tuples become lists, as they are stored), so a caller mutating them afterwards changes
nothing. Other objects are passed through and rendered by the writer thread later (with
``repr`` unless the store knows the type): a mutable custom object may be rendered as it is
then. Give ``json_default`` to convert such objects during the call instead.

python-json-logger options
==========================

Every keyword of python-json-logger's ``JsonFormatter`` is accepted: ``rename_fields``
(non-core keys only), ``rename_fields_keep_missing``, ``static_fields``, ``reserved_attrs``,
``timestamp``, ``defaults``, ``exc_info_as_array``, ``stack_info_as_array``, ``fmt`` (fields
named there are added, except the ones the core already carries), ``datefmt``; and, for
:meth:`format` only, ``prefix``, ``json_serializer``, ``json_encoder``, ``json_indent``,
``json_ensure_ascii``. ``json_default`` applies to :meth:`format` and, in
:meth:`to_mapping`, to objects the store would otherwise render with ``repr``. An unknown
keyword is a :class:`~quipu_logging.ConfigError` naming the closest valid one. From
``dictConfig`` use the ``"()"`` form: the ``"class"`` form drops a formatter's extra keys.
"""

from __future__ import annotations

import datetime as dt
import decimal
import difflib
import enum
import inspect
import json
import logging
import os
import pathlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, Final

from pythonjsonlogger.core import BaseJsonFormatter
from pythonjsonlogger.json import JsonFormatter

from ._frontend import (
    ExcInfo,
    bridge_call_site,
    format_stack,
    is_bridged,
    is_structlog_record,
    resolve_exc_info,
    structlog_level,
)
from .errors import ConfigError
from .store._encode import Marker, normalise

__all__ = ["CORE_KEYS", "TRUNCATED", "AuditJsonFormatter"]

CORE_KEYS: Final[frozenset[str]] = frozenset(
    {"exc", "level", "levelno", "logger", "message", "process", "seq", "source", "stack", "thread", "ts"}
)
"""Keys every stored record has (``exc`` and ``stack`` when present); they cannot be renamed."""

TRUNCATED: Final = Marker("$truncated")
"""The marker listing cut fields: ``{"$truncated": {field: original_length}}``."""

# LogRecord attributes the core keys are made of: never emitted again as extras, and never
# renamed, whatever ``reserved_attrs`` says.
_CORE_SOURCES: Final[frozenset[str]] = frozenset(
    {
        "args",
        "created",
        "exc_info",
        "exc_text",
        "filename",
        "funcName",
        "levelname",
        "levelno",
        "lineno",
        "message",
        "msg",
        "name",
        "process",
        "stack_info",
        "threadName",
    }
)

# Deeper containers are passed on uncopied: the store replaces anything below depth 64
# with a ``$depth`` marker anyway.
_COPY_DEPTH: Final = 66

# Values that need no copy: immutable, and rendered by the store without running user code.
_LEAF_TYPES: Final[frozenset[type]] = frozenset({str, int, float, bool, type(None), bytes, frozenset})


# Exact types whose values never change and whose str() runs no user code.
_PLAIN_TYPES: Final[frozenset[type]] = frozenset({str, int, float, bool, type(None)})
# What to_mapping() calls on a record without exception: overriding one of them in a
# subclass makes its records be built during the logging call (see _deferrable).
_DEFERRABLE_METHODS: Final = (
    "to_mapping",
    "add_fields",
    "_add_fields",
    "process_log_record",
    "formatTime",
    "formatStack",
    "formatException",
    "_format_exception",
)


# What LogRecord.__init__ sets, in the order it sets them.
_STD_ATTRS: Final = tuple(logging.makeLogRecord({}).__dict__)
_N_STD: Final = len(_STD_ATTRS)


# Types the store renders itself (everything else is ``repr``'d): ``json_default`` leaves them.
_STORE_TYPES: Final[tuple[type, ...]] = (
    str,
    int,
    float,
    bool,
    type(None),
    bytes,
    bytearray,
    memoryview,
    dt.datetime,
    dt.date,
    dt.time,
    uuid.UUID,
    decimal.Decimal,
    pathlib.PurePath,
    enum.Enum,
)


def _accepted_keywords() -> frozenset[str]:
    """The keyword names the installed python-json-logger's ``JsonFormatter`` understands."""
    names: set[str] = set()
    for cls in (JsonFormatter, BaseJsonFormatter):
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - C-level signatures
            continue
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return frozenset(names)


_FORMATTER_KEYWORDS: Final = _accepted_keywords()


def unknown_option_error(name: str, valid: Iterable[str], what: str = "AuditJsonFormatter") -> ConfigError:
    """A :class:`ConfigError` for a misspelt keyword, suggesting the closest valid one."""
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{what}: unknown option {name!r}{hint} (valid options: {', '.join(sorted(valid))})")


def check_formatter_options(
    options: Mapping[str, Any], extra_valid: Iterable[str] = (), what: str = "AuditJsonFormatter"
) -> None:
    """Raises :class:`ConfigError` for a keyword python-json-logger would not accept.

    ``format`` raises ``TypeError`` instead: ``dictConfig``'s ``"()"`` form first passes
    ``format`` and retries with ``fmt`` only on a ``TypeError`` that names it.
    """
    for name in options:
        if name in _FORMATTER_KEYWORDS:
            continue
        if name == "format":
            raise TypeError(f"{what}() got an unexpected keyword argument 'format' (use 'fmt')")
        raise unknown_option_error(name, _FORMATTER_KEYWORDS | set(extra_valid), what)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


def _shell(value: Any) -> tuple[Any, int] | None:
    """An empty plain container to copy ``value`` into, with its kind, or ``None`` for a leaf.

    Kinds: 0 mapping, 1 sequence, 2 set (copied whole: set items are hashable).
    """
    t = type(value)
    if t is dict:
        return {}, 0
    if t is list or t is tuple:
        return [], 1
    if t is set:
        return set(value), 2
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return None
    if isinstance(value, Mapping):
        return {}, 0
    if isinstance(value, (list, tuple)):
        return [], 1
    if isinstance(value, set):
        return set(value), 2
    return None


def _leaf(
    value: Any,
    convert: Callable[[Any], Any] | None,
    limit: int | None,
    cut: dict[str, int] | None,
    path: str,
) -> Any:
    """A leaf as it is stored: long text cut (noted in ``cut``), mutable bytes copied."""
    t = type(value)
    if t is bytearray or t is memoryview:
        try:
            value = bytes(value)
        except Exception:
            return value
        t = bytes
    if t is str or t is bytes:
        if limit is not None and len(value) > limit:
            if cut is not None:
                cut[path] = len(value)
            return value[:limit]
        return value
    if t in _LEAF_TYPES:
        return value
    return _convert(value, convert)


def freeze(
    value: Any,
    convert: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    cut: dict[str, int] | None = None,
    path: str = "",
) -> Any:
    """A copy of ``value`` that later mutations of the original cannot change.

    Containers are copied at every depth (iteratively; cycles and shared containers are
    kept as such: the store marks cycles); ``bytearray`` and ``memoryview`` become
    ``bytes``. Other leaves are returned as they are, or passed through ``convert`` when
    given and the store would ``repr`` them. Never raises: if the copy fails (a container
    changing under another thread, a mapping whose ``items()`` raises), the original is
    returned and the writer renders it later.

    Args:
        value: what to copy.
        convert: python-json-logger's ``json_default``, or ``None``.
        limit: strings (and bytes) longer than this are cut to it; ``None`` keeps them.
        cut: receives ``{path: original_length}`` for each cut value.
        path: the name of ``value`` in ``cut`` (nested values add ``.key`` / ``.index``).
    """
    t = type(value)
    if t is str:
        if limit is not None and len(value) > limit:
            return _leaf(value, convert, limit, cut, path)
        return value
    if t in _LEAF_TYPES and t is not bytes:
        return value
    try:
        shell = _shell(value)
        if shell is None:
            return _leaf(value, convert, limit, cut, path)
        root, kind = shell
        if kind == 2:
            return root
        memo: dict[int, Any] = {id(value): root}
        stack: list[tuple[Any, Any, int, int, str]] = [(value, root, kind, 1, path)]
        while stack:
            src, dst, kind, depth, where = stack.pop()
            items: Iterable[tuple[Any, Any]]
            items = list(src.items()) if kind == 0 else list(enumerate(src))
            for key, item in items:
                ti = type(item)
                if ti is str:
                    copied = item
                    if limit is not None and len(item) > limit:
                        copied = _leaf(item, None, limit, cut, f"{where}.{key}")
                elif ti in _LEAF_TYPES and ti is not bytes:
                    copied = item
                else:
                    known = memo.get(id(item))
                    if known is not None:
                        copied = known
                    elif depth >= _COPY_DEPTH:
                        copied = item
                    else:
                        sub = _shell(item)
                        if sub is None:
                            copied = _leaf(item, convert, limit, cut, f"{where}.{key}")
                        else:
                            copied, sub_kind = sub
                            if sub_kind != 2:
                                memo[id(item)] = copied
                                stack.append((item, copied, sub_kind, depth + 1, f"{where}.{key}"))
                if kind == 0:
                    dst[key] = copied
                else:
                    dst.append(copied)
        return root
    except Exception:
        return value


def _convert(value: Any, convert: Callable[[Any], Any] | None) -> Any:
    if convert is None or isinstance(value, _STORE_TYPES):
        return value
    try:
        converted = convert(value)
    except Exception:
        return value
    # One conversion, no second pass: a json_default returning another odd object is
    # left for the store to render.
    return freeze(converted) if converted is not value else value


class _StructlogEvent:
    """What a structlog event dict carries beyond its fields, taken apart once.

    ``fields`` is a shallow copy of the event dict without what the record's core keys
    already say: structlog's bookkeeping (``_record``, ``_from_structlog``), a
    ``level`` naming the record's level (``"info"``, ``"exception"``...), a ``logger`` equal to
    the record's, ``exc_info`` (rendered once, into ``exc``) and ``stack_info``.
    ``site`` is the application's call site of a bridged record, whose own call site is
    structlog's plumbing.
    """

    __slots__ = ("exc_info", "fields", "site", "stack")

    def __init__(self, record: logging.LogRecord) -> None:
        msg: Any = record.msg
        fields: dict[str, Any] = dict(msg)
        fields.pop("_record", None)
        fields.pop("_from_structlog", None)
        level = fields.get("level")
        if isinstance(level, str) and structlog_level(level, {})[1] == record.levelname:
            del fields["level"]
        if fields.get("logger") == record.name:
            del fields["logger"]
        self.exc_info: ExcInfo | None = None
        if "exc_info" in fields:
            raw = fields.pop("exc_info")
            if not (record.exc_info and record.exc_info[0] is not None):
                self.exc_info = resolve_exc_info(raw)
        frame = bridge_call_site(record) if is_bridged(record) else None
        self.site: dict[str, Any] | None = None
        if frame is not None:
            self.site = {
                "file": os.path.basename(frame.f_code.co_filename),
                "func": frame.f_code.co_name,
                "line": frame.f_lineno,
            }
        self.stack: str | None = None
        if fields.get("stack_info") is True and not record.stack_info and frame is not None:
            del fields["stack_info"]
            self.stack = format_stack(frame)
        elif not fields.get("stack_info", True):
            del fields["stack_info"]
        self.fields = fields


def _free_name(name: str, taken: Mapping[str, Any]) -> str:
    """The first ``name#N`` (N >= 2) not in ``taken``."""
    n = 2
    while f"{name}#{n}" in taken:
        n += 1
    return f"{name}#{n}"


def _put_field(
    out: dict[Any, Any], name: Any, value: Any, limit: int | None, cut: dict[Any, int] | None
) -> None:
    """Stores one extra field: plain scalars as they are, a long string cut (noted in ``cut``),
    anything else frozen into JSON-ready values."""
    t = type(value)
    if t is str:
        if limit is not None and len(value) > limit:
            assert cut is not None
            cut[name] = len(value)
            value = value[:limit]
        out[name] = value
    elif t is int or t is float or t is bool or value is None:
        out[name] = value
    else:
        out[name] = freeze(value, None, limit, cut, str(name))


class AuditJsonFormatter(JsonFormatter):
    """A python-json-logger ``JsonFormatter`` whose output is the stored audit record.

    Args:
        fmt: python-json-logger's field list (a ``%``/``{``/``$`` format string or a
            sequence of names); fields the core already carries are not repeated.
        datefmt: the ``time.strftime`` format of ``asctime`` when ``fmt`` names it.
        style: the style of ``fmt``.
        validate: check ``fmt`` against ``style``.
        **options: python-json-logger keywords (see the module docstring).

    Raises:
        ConfigError: an unknown keyword, or an option that would rename or shadow a core key.
    """

    def __init__(
        self,
        fmt: str | Sequence[str] | None = None,
        datefmt: str | None = None,
        style: str = "%",
        validate: bool = True,
        **options: Any,
    ) -> None:
        check_formatter_options(options)
        super().__init__(fmt, datefmt, style, validate, **options)
        self._check_core_untouched()
        default = options.get("json_default")
        self._convert: Callable[[Any], Any] | None = default if callable(default) else None
        self._extra_required = [f for f in self._required_fields if f not in _CORE_SOURCES]
        # What never becomes an extra: reserved attributes, the core's own sources and the
        # fields ``fmt`` names (added on their own, like python-json-logger does).
        self._skip = frozenset(self.reserved_attrs) | _CORE_SOURCES | frozenset(self._required_fields)
        # The attributes LogRecord.__init__ sets that are fields all the same (only when
        # reserved_attrs leaves some out): _plain_mapping adds them before the extras.
        self._std_fields = tuple(k for k in _STD_ATTRS if k not in self._skip)
        self._hooked = type(self).process_log_record is not BaseJsonFormatter.process_log_record
        # A subclass overriding add_fields gets it called; otherwise fields go straight in.
        self._own_fields = type(self).add_fields is AuditJsonFormatter.add_fields
        self._configured = bool(self.defaults or self._extra_required or self.static_fields)
        # Whether to_mapping() gives the same record on another thread, later, for a record
        # whose values are all plain (str, int, float, bool, None): AuditHandler then lets
        # its writer thread build it. Not when a subclass overrides what to_mapping runs,
        # or when configured fields hold other values (they would be frozen later).
        cls = type(self)
        self._deferrable = all(
            getattr(cls, name) is getattr(AuditJsonFormatter, name) for name in _DEFERRABLE_METHODS
        ) and all(type(v) in _PLAIN_TYPES for v in (*self.static_fields.values(), *self.defaults.values()))
        self._plain = (
            self._own_fields
            and not self._configured
            and not self.rename_fields
            and self._convert is None
            and not self.timestamp
            and not self.rename_fields_keep_missing
        )

    def _check_core_untouched(self) -> None:
        for src, dst in self.rename_fields.items():
            if src in CORE_KEYS or src in _CORE_SOURCES:
                raise ConfigError(
                    f"rename_fields: {src!r} feeds the core key of every audit record and cannot be "
                    f"renamed (core keys: {', '.join(sorted(CORE_KEYS))})"
                )
            if dst in CORE_KEYS:
                raise ConfigError(
                    f"rename_fields: renaming {src!r} to the core key {dst!r} would shadow it; "
                    "pick another name"
                )
        rename = self.rename_fields.get
        for option, keys in (("static_fields", self.static_fields), ("defaults", self.defaults)):
            for key in keys:
                if rename(key, key) in CORE_KEYS:
                    raise ConfigError(
                        f"{option}: {rename(key, key)!r} is a core key of every audit record; pick "
                        "another name"
                    )
        if self.timestamp:
            key = self.timestamp if isinstance(self.timestamp, str) else "timestamp"
            if rename(key, key) in CORE_KEYS:
                raise ConfigError(
                    f"timestamp: {rename(key, key)!r} is a core key ('ts' already holds the time of "
                    "the call in microseconds); use timestamp=True or another name"
                )

    # ------------------------------------------------------------------ the mapping

    def to_mapping(self, record: logging.LogRecord, *, max_field_chars: int | None = None) -> dict[str, Any]:
        """Returns the audit record for ``record``, frozen (see the module docstring).

        ``record`` is not modified.

        Args:
            record: the log record.
            max_field_chars: string (and bytes) values longer than this, at any depth, are
                cut to it and listed as ``"$truncated": {field: original_length}`` (nested
                fields as ``"outer.inner"``, list items as ``"outer.3"``). ``None`` keeps
                everything whole.

        Returns:
            A new ``dict``: the core keys, then the fields.
        """
        limit = max_field_chars
        cut: dict[str, int] | None = {} if limit is not None else None
        msg = record.msg
        message_dict: dict[str, Any] | None = None
        event: _StructlogEvent | None = None
        if isinstance(msg, dict) and not record.args:
            if is_structlog_record(record):
                event = _StructlogEvent(record)
                msg = event.fields
            frozen = freeze(msg, self._convert, limit, cut)
            message_dict = frozen if frozen is not msg else dict(msg)
            message = message_dict.pop("event", None)
            if not isinstance(message, str):
                if message is not None:
                    message_dict["event"] = message
                message = message_dict.pop("message", None)
                if not isinstance(message, str):
                    if message is not None:
                        message_dict["message"] = message
                    message = ""
            if cut:
                # Paths were recorded relative to the message dict: its items are fields.
                cut = {key[1:] if key[:1] == "." else key: n for key, n in cut.items()}
        else:
            try:
                message = record.getMessage()
            except Exception as exc:
                # A broken logging call ("%d" with a string, say) is still an audit event:
                # keep what it said, and why it could not be formatted.
                message = _safe_str(msg)
                message_dict = {"args": freeze(record.args), "message_error": _safe_repr(exc)}
        if limit is not None and len(message) > limit:
            assert cut is not None
            cut["message"] = len(message)
            message = message[:limit]
        site = event.site if event is not None else None
        out: dict[str, Any] = {
            "level": record.levelname,
            "levelno": record.levelno,
            "logger": record.name,
            "message": message,
            "process": record.process,
            "thread": record.threadName,
            "source": (
                {"file": record.filename, "func": record.funcName, "line": record.lineno}
                if site is None
                else site
            ),
            "ts": round(record.created * 1_000_000),
        }
        exc_info = record.exc_info
        if exc_info and exc_info[0] is not None:
            out["exc"] = freeze(self._format_exception(exc_info), None, limit, cut, "exc")
        elif event is not None and event.exc_info is not None:
            out["exc"] = freeze(self._format_exception(event.exc_info), None, limit, cut, "exc")
        elif record.exc_text:
            out["exc"] = freeze(record.exc_text, None, limit, cut, "exc")
        if record.stack_info:
            out["stack"] = freeze(self.formatStack(record.stack_info), None, limit, cut, "stack")
        elif event is not None and event.stack is not None:
            out["stack"] = freeze(self.formatStack(event.stack), None, limit, cut, "stack")
        if event is not None and message_dict is not None:
            # Tracebacks and stacks structlog's own processors rendered (format_exc_info,
            # StackInfoRenderer) are the record's exc / stack: stored once, where a stdlib
            # record keeps them.
            for name, core in (("exception", "exc"), ("stack", "stack")):
                if core not in out and isinstance(message_dict.get(name), str):
                    out[core] = message_dict.pop(name)
                    if cut and name in cut:
                        cut[core] = cut.pop(name)
        if self._plain and message_dict is None:
            # The common case, inlined: no options, only the record's extras.
            attrs = record.__dict__
            skip = self._skip
            for name in [k for k in attrs if k not in skip]:
                value = attrs[name]
                if type(name) is str:
                    if name[:1] == "_":
                        continue
                    if name in CORE_KEYS:
                        name = _free_name(name, out)
                _put_field(out, name, value, limit, cut)
        elif self._own_fields:
            self._add_fields(out, record, message_dict, limit, cut, event_wins=event is not None)
        else:
            fields: dict[str, Any] = {}
            self.add_fields(fields, record, message_dict if message_dict is not None else {})
            for key, value in fields.items():
                if key in CORE_KEYS:
                    key = _free_name(key, out)
                out[key] = value if limit is None else freeze(value, None, limit, cut, str(key))
        if cut:
            out[TRUNCATED] = cut
        if self._hooked:
            out = self.process_log_record(out)
        return out

    def _plain_mapping(self, attrs: dict[str, Any], limit: int | None) -> dict[str, Any] | None:
        """:meth:`to_mapping` of the record whose attributes are ``attrs``, for the common case.

        What :class:`~quipu_logging.AuditHandler`'s writer thread calls for a record its
        fast path queued (a ``str`` message, no exception, no ``stack_info``, plain
        arguments and extras), when this formatter has no options (``_plain``): the same
        ``dict``, without rebuilding a ``LogRecord`` or testing for the cases that cannot
        occur. The fast path has checked that ``attrs`` holds what ``LogRecord.__init__``
        sets, in its order, followed by the extras, so only those are looked at; that is
        confirmed here once more (a filter that deletes a standard attribute and moves the
        last one can fool the caller's check). ``None`` when it does not hold, or when the
        message cannot be formatted (``to_mapping`` then does it, or says why).
        """
        if tuple(islice(attrs, _N_STD)) != _STD_ATTRS:
            # A filter moved or deleted standard attributes in a way the caller's position
            # check cannot see: the extras are not simply the keys after them, so take
            # to_mapping's way, which tells them apart by name (no field lost).
            return None
        msg = attrs["msg"]
        args = attrs["args"]
        if args:
            try:
                message = msg % args
            except Exception:
                return None
        else:
            message = msg
        cut: dict[str, int] | None = {} if limit is not None else None
        if limit is not None and len(message) > limit:
            assert cut is not None
            cut["message"] = len(message)
            message = message[:limit]
        out: dict[str, Any] = {
            "level": attrs["levelname"],
            "levelno": attrs["levelno"],
            "logger": attrs["name"],
            "message": message,
            "process": attrs["process"],
            "thread": attrs["threadName"],
            "source": {"file": attrs["filename"], "func": attrs["funcName"], "line": attrs["lineno"]},
            "ts": round(attrs["created"] * 1_000_000),
        }
        skip = self._skip
        fields = list(islice(attrs.items(), _N_STD, None))
        if self._std_fields:
            fields[:0] = [(k, attrs[k]) for k in self._std_fields]
        for name, value in fields:
            if type(name) is str:
                if name in skip or name[:1] == "_":
                    continue
                if name in CORE_KEYS:
                    name = _free_name(name, out)
            elif name in skip:
                continue
            _put_field(out, name, value, limit, cut)
        if cut:
            out[TRUNCATED] = cut
        return out

    def _format_exception(self, exc_info: Any) -> str | list[str]:
        try:
            return self.formatException(exc_info)
        except Exception:
            # An exception whose __str__ raises, say: keep what can be said about it.
            return f"{_safe_repr(exc_info[0])}: <the exception could not be formatted>"

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """Adds the non-core fields of ``record`` to ``log_data`` (python-json-logger's hook).

        In order: ``defaults``, fields named by ``fmt``, ``static_fields``, the items of a
        ``dict`` message, the record's extras, ``timestamp``; each renamed through
        ``rename_fields`` and frozen. Override it to add fields of your own; a field named
        like a core key is kept as ``"<name>#2"``.
        """
        self._add_fields(log_data, record, message_dict, None, None)

    def _add_fields(
        self,
        out: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any] | None,
        limit: int | None,
        cut: dict[str, int] | None,
        *,
        event_wins: bool = False,
    ) -> None:
        rename = self.rename_fields
        convert = self._convert
        attrs = record.__dict__
        if self._configured:
            early: dict[str, Any] = {}
            for key, value in self.defaults.items():
                early[rename.get(key, key)] = value
            for name in self._extra_required:
                early[rename.get(name, name)] = (
                    self.formatTime(record, self.datefmt) if name == "asctime" else attrs.get(name)
                )
            for key, value in self.static_fields.items():
                early[rename.get(key, key)] = value
            for key, value in early.items():
                out[key] = freeze(value, convert, limit, cut, key)
        if message_dict:
            for key, value in message_dict.items():
                key = rename.get(key, key)
                if key in CORE_KEYS:
                    key = _free_name(key, out)
                out[key] = value
        skip = self._skip
        for name in [k for k in attrs if k not in skip]:
            if isinstance(name, str) and name[:1] == "_":
                continue
            if event_wins and message_dict and name in message_dict:
                # A structlog event's own key beats the same name added to the record
                # (by AuditContextFilter, say), as the event says it explicitly.
                continue
            value = attrs[name]
            name = rename.get(name, name)
            if name in CORE_KEYS:
                name = _free_name(name, out)
            out[name] = freeze(value, convert, limit, cut, str(name))
        if self.timestamp:
            key = self.timestamp if isinstance(self.timestamp, str) else "timestamp"
            out[rename.get(key, key)] = dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc)
        if self.rename_fields_keep_missing:
            for target in rename.values():
                out.setdefault(target, None)

    # ------------------------------------------------------------------ the JSON line

    def format(self, record: logging.LogRecord) -> str:
        """Returns :meth:`to_mapping` of ``record`` as one JSON line (``record`` unchanged)."""
        return self.serialize_log_record(self.to_mapping(record))

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        """Serialises with the configured serializer; content it cannot encode (a cycle,
        keys of mixed types) is normalised the way the store does it instead."""
        try:
            text = super().jsonify_log_record(log_data)
        except Exception:
            text = None
        if isinstance(text, str):
            return text
        try:
            safe, _ = normalise(log_data)
            return json.dumps(safe, ensure_ascii=self.json_ensure_ascii)
        except Exception:
            return json.dumps({"message": _safe_repr(log_data.get("message")), "$unrepresentable": True})

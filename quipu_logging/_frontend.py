"""What the logging front ends share about structlog events: levels, exceptions, call sites.

Two roads bring a structlog event to the store, and both must store the same fields:

* :class:`~quipu_logging.structlog.AuditProcessor` builds a ``LogRecord`` whose ``msg``
  is a copy of the event dict and whose ``_from_structlog`` attribute is true, and hands
  it to an :class:`~quipu_logging.AuditHandler`;
* structlog's stdlib bridge (``ProcessorFormatter.wrap_for_formatter`` as the last
  processor) makes the stdlib logger build a ``LogRecord`` whose ``msg`` is the event dict
  and which carries the ``_logger`` and ``_name`` attributes.

:meth:`~quipu_logging.AuditJsonFormatter.to_mapping` recognises both with
:func:`is_structlog_record` and maps them the same way. This module holds the pieces both
sides need; it imports nothing from structlog, which stays optional.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import FrameType, TracebackType
from typing import Any, Final

__all__ = [
    "ExcInfo",
    "app_frame",
    "bridge_call_site",
    "format_stack",
    "is_bridged",
    "is_structlog_record",
    "resolve_exc_info",
    "structlog_level",
]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# structlog method names (and ``add_log_level`` values) → (levelno, stdlib level name).
# "exception" logs at ERROR and "warn"/"fatal" are aliases, as in structlog and logging.
_LEVELS: Final[dict[str, tuple[int, str]]] = {
    "notset": (logging.NOTSET, "NOTSET"),
    "debug": (logging.DEBUG, "DEBUG"),
    "info": (logging.INFO, "INFO"),
    "msg": (logging.INFO, "INFO"),
    "warning": (logging.WARNING, "WARNING"),
    "warn": (logging.WARNING, "WARNING"),
    "error": (logging.ERROR, "ERROR"),
    "err": (logging.ERROR, "ERROR"),
    "exception": (logging.ERROR, "ERROR"),
    "critical": (logging.CRITICAL, "CRITICAL"),
    "fatal": (logging.CRITICAL, "CRITICAL"),
}

# Modules whose frames are never "the caller": the call site is the first frame outside them.
_PLUMBING: Final = frozenset({"structlog", "quipu_logging", "logging"})
_MAX_DEPTH: Final = 200


def structlog_level(method_name: str, event_dict: dict[str, Any]) -> tuple[int, str]:
    """The stdlib level of a structlog event: its ``level`` key if it names one, else the method.

    Args:
        method_name: the name of the bound logger's method that was called (``"info"``).
        event_dict: the event dict (``add_log_level`` puts the level name there).

    Returns:
        ``(levelno, levelname)``; a level name the table does not know is looked up with
        ``logging.getLevelName`` (custom levels), and ``INFO`` is the last resort.
    """
    for name in (event_dict.get("level"), method_name):
        if not isinstance(name, str):
            continue
        known = _LEVELS.get(name.lower())
        if known is not None:
            return known
        number = logging.getLevelName(name.upper())
        if isinstance(number, int):
            return number, name.upper()
    return logging.INFO, "INFO"


def is_bridged(record: logging.LogRecord) -> bool:
    """Whether ``record`` was made by structlog's ``ProcessorFormatter.wrap_for_formatter``."""
    attrs = record.__dict__
    return "_logger" in attrs and "_name" in attrs


def is_structlog_record(record: logging.LogRecord) -> bool:
    """Whether ``record`` carries a structlog event dict as its ``msg``."""
    if not isinstance(record.msg, dict) or record.args:
        return False
    return bool(record.__dict__.get("_from_structlog")) or is_bridged(record)


def resolve_exc_info(value: Any) -> ExcInfo | None:
    """structlog's ``exc_info`` value as an ``exc_info`` tuple, or ``None`` for no exception.

    ``True`` means the exception being handled now (so this must run in the logging call),
    an exception instance means itself, a 3-tuple is taken as it is.
    """
    if value is None or value is False:
        return None
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        exc = value[1]
        return type(exc), exc, value[2]
    if value is True or value:
        current = sys.exc_info()
        if current[1] is not None:
            return type(current[1]), current[1], current[2]
    return None


def _plumbing(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__")
    return type(name) is str and name.partition(".")[0] in _PLUMBING


def app_frame(frame: FrameType | None) -> FrameType | None:
    """The first frame, from ``frame`` outwards, outside structlog, quipu_logging and logging."""
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if not _plumbing(frame):
            return frame
        frame = frame.f_back
    return None


def bridge_call_site(record: logging.LogRecord) -> FrameType | None:
    """The application frame that logged a bridged structlog ``record``, or ``None``.

    The stdlib logger takes structlog's own frame as the record's call site (structlog
    calls it). While the logging call is still running, that frame is on this thread's
    stack: find it, then step out of structlog. A record formatted later (or elsewhere),
    or one whose call site is already outside structlog, gives ``None``.
    """
    try:
        frame: FrameType | None = sys._getframe(1)
    except ValueError:  # pragma: no cover - shallow stack
        return None
    path, line, func = record.pathname, record.lineno, record.funcName
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_filename == path and frame.f_lineno == line and code.co_name == func:
            if not _plumbing(frame):
                return None
            return app_frame(frame)
        frame = frame.f_back
    return None


def format_stack(frame: FrameType) -> str:
    """``frame``'s stack the way ``logging`` renders ``stack_info``."""
    text = "".join(traceback.format_stack(frame))
    return "Stack (most recent call last):\n" + text.rstrip("\n")

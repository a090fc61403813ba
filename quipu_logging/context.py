"""``AuditContextFilter``: who and which request, copied from ``contextvars`` into records.

Web middleware knows the actor and the request id; the code that logs ``"document
updated"`` usually does not. Set them once per request::

    with audit_context(actor=user.id, request_id=request.headers["x-request-id"]):
        handle(request)

and put an :class:`AuditContextFilter` on the :class:`~quipu_logging.AuditHandler` (or on a
logger). Every record handled inside the block then carries ``actor`` and ``request_id``
as fields, whichever thread or asyncio task logs it (``contextvars`` follow tasks).

One ``ContextVar`` per field name, shared process-wide: :meth:`AuditContextFilter.var`
returns it for code that prefers ``var.set()`` / ``var.reset()`` of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Final

from .errors import ConfigError
from .formatter import CORE_KEYS

__all__ = ["AuditContextFilter", "audit_context"]

_vars: dict[str, contextvars.ContextVar[Any]] = {}
_vars_lock = threading.Lock()
_UNSET: Final = object()
# Attributes every LogRecord has: a context field must not overwrite one of them.
_RECORD_ATTRS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_RETURNS_RECORDS: Final = sys.version_info >= (3, 12)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"audit context field names must be identifiers, got {name!r}")
    if name in CORE_KEYS or name in _RECORD_ATTRS:
        raise ConfigError(
            f"audit context field {name!r} would clash with a LogRecord attribute or a core key of "
            "the audit record; pick another name"
        )
    return name


def _var(name: str) -> contextvars.ContextVar[Any]:
    var = _vars.get(name)
    if var is None:
        with _vars_lock:
            var = _vars.get(name)
            if var is None:
                var = _vars[name] = contextvars.ContextVar(f"quipu_logging.{name}")
    return var


@contextlib.contextmanager
def audit_context(**fields: Any) -> Iterator[None]:
    """Sets audit context fields for the duration of a ``with`` block (nestable).

    Args:
        **fields: field name → value, e.g. ``actor="alice", request_id="r-1"``.

    Raises:
        ConfigError: a name that is not an identifier, or clashes with a record attribute.
    """
    tokens = [(_var(_check_name(name)), value) for name, value in fields.items()]
    reset = [(var, var.set(value)) for var, value in tokens]
    try:
        yield
    finally:
        for var, token in reversed(reset):
            var.reset(token)


class AuditContextFilter(logging.Filter):
    """A ``logging.Filter`` that copies audit context fields into each record it sees.

    A field already on the record (given with ``extra=``) is kept; an unset field is left
    out. On Python 3.12+ the filter returns a copy of the record with the fields added,
    so other handlers see the record unchanged; before 3.12 (filters cannot replace
    records there) it sets them on the record itself. It never drops a record.

    Args:
        fields: the names to copy (each an identifier that is neither a ``LogRecord``
            attribute nor a core key of the audit record).
        name: as for ``logging.Filter`` (a logger-name prefix); ``""`` passes everything.

    Raises:
        ConfigError: a bad field name.
    """

    def __init__(self, fields: Iterable[str] = ("actor", "request_id"), name: str = "") -> None:
        super().__init__(name)
        if isinstance(fields, str):
            fields = (fields,)
        self.fields = tuple(_check_name(f) for f in fields)
        self._vars = tuple((f, _var(f)) for f in self.fields)

    @staticmethod
    def var(name: str) -> contextvars.ContextVar[Any]:
        """The process-wide ``ContextVar`` behind the audit context field ``name``."""
        return _var(_check_name(name))

    def filter(self, record: logging.LogRecord) -> Any:
        """Adds the context fields; returns the record to use (3.12+) or ``True``."""
        if not super().filter(record):
            return True  # outside this filter's logger prefix: pass it on untouched
        values = []
        attrs = record.__dict__
        for name, var in self._vars:
            value = var.get(_UNSET)
            if value is not _UNSET and name not in attrs:
                values.append((name, value))
        if not values:
            return record if _RETURNS_RECORDS else True
        if _RETURNS_RECORDS:
            copy = type(record).__new__(type(record))
            copy.__dict__.update(attrs)
            copy.__dict__.update(values)
            return copy
        attrs.update(values)
        return True

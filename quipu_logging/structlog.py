"""``AuditProcessor``: a structlog processor that keeps each event in the audit store.

Put it in the processor chain after the processors that add context and before the
renderer::

    import structlog
    from quipu_logging.structlog import AuditProcessor

    structlog.configure(processors=[
        structlog.contextvars.merge_contextvars,     # request context reaches the record
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        AuditProcessor("/var/lib/myapp/audit"),      # a copy goes to the audit store
        structlog.processors.JSONRenderer(),         # the chain goes on as before
    ])

Each event is stored under the same keys as a stdlib record (DESIGN §7): ``event`` becomes
``message``; ``level`` is the stdlib level name (``"info"`` → ``"INFO"``, ``"exception"``
→ ``"ERROR"``) with ``levelno``; ``logger`` is the ``logger`` key or the wrapped logger's
name; ``ts`` is the time of the call in UTC microseconds, and a ``timestamp`` key is kept as
an ordinary field; ``exc_info`` is rendered once, into ``exc`` (a traceback that
``format_exc_info`` already rendered into ``exception`` goes there too);
``source`` is the application's call site, outside structlog. Every other key is a field.

The processor builds a ``LogRecord`` carrying a copy of the event dict and hands it to an
:class:`~quipu_logging.AuditHandler`, so the handler's rules hold unchanged: the call never
waits on the disk, a rejected event goes to the fallback exactly once and is counted
(:meth:`AuditProcessor.metrics`), it never raises into the application, and events logged
from inside the audit path go straight to the fallback. Events that reach an
``AuditHandler`` through structlog's stdlib bridge (``ProcessorFormatter.wrap_for_formatter``)
are stored with the same fields.

structlog is an optional extra: ``pip install 'quipu-logging[structlog]'``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Final

try:
    import structlog
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "quipu_logging.structlog needs structlog, an optional extra: pip install 'quipu-logging[structlog]'"
    ) from exc

from ._frontend import app_frame, format_stack, resolve_exc_info, structlog_level
from .errors import ConfigError
from .handler import AuditHandler
from .pipeline import AuditHandle

__all__ = ["AuditProcessor"]

_DEFAULT_LOGGER: Final = "structlog"


class AuditProcessor:
    """A structlog processor sending a copy of each event to an audit store.

    Args:
        handle_or_root: where events go: a store directory (the processor builds an
            :class:`~quipu_logging.AuditHandler` for it, sharing the pipeline of any live
            handler on the same root), an :class:`~quipu_logging.AuditHandle` (of a
            pipeline you started and will close), or an ``AuditHandler`` (its role,
            fallback, level and filters then apply: an ``AuditContextFilter`` on it adds
            its context to structlog events too; an event key of the same name wins).
        role: the role events are emitted as; default ``"app"``. Not with a handler
            (set it on the handler).
        drop: raise ``structlog.DropEvent`` after storing, ending the chain (for a chain
            whose only output is the audit store).
        fallback: where rejected events go, as for ``AuditHandler(fallback=...)`` (a
            handler, a handler name, a stream, or ``None`` for one JSON line per event on
            stderr). Not with a handler.
        **handler_options: other ``AuditHandler`` keywords (``queue_size``, ``sync``,
            ``flush_timeout``, ``max_field_chars``, formatter options) for the handler
            built for a root or a handle.

    Raises:
        ConfigError: a bad target or option (including options that conflict with a live
            handler on the same root).
    """

    def __init__(
        self,
        handle_or_root: AuditHandle | AuditHandler | str | os.PathLike[str],
        *,
        role: str | None = None,
        drop: bool = False,
        fallback: Any = None,
        **handler_options: Any,
    ) -> None:
        if not isinstance(drop, bool):
            raise ConfigError(f"AuditProcessor: drop must be True or False, got {drop!r}")
        self.drop = drop
        self._owned = False
        if isinstance(handle_or_root, AuditHandler):
            if role is not None or fallback is not None or handler_options:
                raise ConfigError(
                    "AuditProcessor: role, fallback and handler options belong to the AuditHandler "
                    "you passed; set them there"
                )
            self.handler = handle_or_root
        elif isinstance(handle_or_root, AuditHandle):
            self.handler = AuditHandler(
                pipeline=handle_or_root.pipeline,
                role="app" if role is None else role,
                fallback=fallback,
                **handler_options,
            )
            self._owned = True
        elif isinstance(handle_or_root, (str, os.PathLike)):
            self.handler = AuditHandler(
                handle_or_root, role="app" if role is None else role, fallback=fallback, **handler_options
            )
            self._owned = True
        else:
            raise ConfigError(
                "AuditProcessor: expected a store directory, an AuditHandle or an AuditHandler, "
                f"got {handle_or_root!r}"
            )

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Stores a copy of ``event_dict``; returns it unchanged (or raises ``DropEvent``).

        Never raises anything else: errors are reported through the handler's
        ``handleError`` and the event goes to the fallback.
        """
        handler = self.handler
        try:
            record = self._record(logger, method_name, event_dict)
        except Exception:
            record = self._unpreparable(method_name)
        if record.levelno >= handler.level:
            try:
                handler.handle(record)
            except Exception:
                # Only a filter of the user's own can raise here (emit never does): report
                # it and divert the event, counted, as emit does with its own errors.
                handler.handleError(record)
                handler._divert(record, "error")
        if self.drop:
            raise structlog.DropEvent
        return event_dict

    def _record(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> logging.LogRecord:
        fields = dict(event_dict)
        levelno, levelname = structlog_level(method_name, fields)
        name = fields.get("logger")
        if not isinstance(name, str):
            name = getattr(logger, "name", None)
            if not isinstance(name, str) or not name:
                name = _DEFAULT_LOGGER
        exc_info = resolve_exc_info(fields.pop("exc_info", None))
        try:
            caller = app_frame(sys._getframe(1))
        except ValueError:  # pragma: no cover - shallow stack
            caller = None
        stack = None
        if fields.get("stack_info") is True and caller is not None:
            del fields["stack_info"]
            stack = format_stack(caller)
        elif not fields.get("stack_info", True):
            del fields["stack_info"]
        if caller is not None:
            code = caller.f_code
            path, line, func = code.co_filename, caller.f_lineno, code.co_name
        else:
            path, line, func = "(unknown file)", 0, "(unknown function)"
        record = logging.LogRecord(name, levelno, path, line, fields, None, exc_info, func, stack)
        record.levelname = levelname
        record.__dict__["_from_structlog"] = True
        return record

    def _unpreparable(self, method_name: str) -> logging.LogRecord:
        """A stand-in for an event dict that could not be read (its ``keys()`` raised, say).

        Reports the error through the handler (without the event's content) and returns a
        record saying what happened, so the trail still shows that an event was logged.
        """
        record = logging.LogRecord(
            _DEFAULT_LOGGER,
            logging.ERROR,
            __file__,
            0,
            "a structlog event could not be read for the audit store",
            None,
            None,
        )
        record.__dict__.update(structlog_method=str(method_name), _from_structlog=False)
        self.handler.handleError(record)
        return record

    # ------------------------------------------------------------------ lifetime

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every event handed over so far is durable; see ``AuditHandler.flush``."""
        return self.handler.flush(timeout)

    def close(self) -> None:
        """Closes the handler the processor built (a handler you passed stays yours)."""
        if self._owned:
            self.handler.close()

    def metrics(self) -> dict[str, Any]:
        """The handler's and its pipeline's counters (see ``AuditHandler.metrics``)."""
        return self.handler.metrics()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.handler.root!r} drop={self.drop}>"

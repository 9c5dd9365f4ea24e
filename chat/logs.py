"""Structured logs: what each record is about, and the ``text`` and ``json`` formats.

While the server handles a call or runs a turn, a :class:`LogContext` (the gRPC method, the
session, the request, the turn and the caller's identity, where they exist) is bound to the
running task; :class:`ContextFilter` copies it onto every record logged meanwhile, by any
logger. :class:`TextFormatter` appends it to the usual line; :class:`JsonFormatter` writes one
JSON object per line, with the fields of access lines (``record.access``) at the top level.

>>> import logging, sys
>>> handler = logging.StreamHandler(sys.stdout)
>>> handler.addFilter(ContextFilter())
>>> handler.setFormatter(JsonFormatter(timestamps=False))
>>> log = logging.getLogger("x")
>>> log.addHandler(handler); log.propagate = False
>>> with bound(method="Chat", session_id="s-1"):
...     log.warning("slow: %d s", 2)
{"level": "WARNING", "logger": "x", "message": "slow: 2 s", "method": "Chat", "session_id": "s-1"}

:func:`configure` sets up the root logger the way ``chat-server --log-format`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "LOG_FORMATS",
    "ContextFilter",
    "JsonFormatter",
    "LogContext",
    "TextFormatter",
    "bind",
    "bound",
    "configure",
    "current",
]

#: What ``--log-format`` accepts.
LOG_FORMATS = ("text", "json")

#: The record attribute that carries an access line's fields (``extra={"access": {...}}``).
ACCESS = "access"


@dataclass(frozen=True, slots=True)
class LogContext:
    """What the records logged now are about; empty fields are left out."""

    method: str = ""
    session_id: str = ""
    request_id: str = ""
    turn_id: str = ""
    identity: str = ""

    def fields(self) -> dict[str, str]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name))}


_EMPTY = LogContext()
_CONTEXT: ContextVar[LogContext] = ContextVar("chat_log_context", default=_EMPTY)
_FIELDS = tuple(f.name for f in dataclasses.fields(LogContext))
_FIELD_SET = frozenset(_FIELDS)


def current() -> LogContext:
    """The context bound to the running task (empty outside calls and turns)."""
    return _CONTEXT.get()


def _with(base: LogContext, fields: dict[str, str]) -> LogContext:
    # Once or twice per call and turn: plain construction costs a tenth of replace().
    return LogContext(
        fields.get("method", base.method),
        fields.get("session_id", base.session_id),
        fields.get("request_id", base.request_id),
        fields.get("turn_id", base.turn_id),
        fields.get("identity", base.identity),
    )


def _check(fields: dict[str, str]) -> None:
    if not fields.keys() <= _FIELD_SET:
        unknown = ", ".join(sorted(set(fields) - _FIELD_SET))
        raise TypeError(f"unknown log context fields: {unknown}")


class bound:
    """Bind ``fields`` (over what is bound already) for the duration of the block.

    A class rather than a generator: it is entered for every call and turn.
    """

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: str) -> None:
        _check(fields)
        self._fields = fields
        self._token: Token[LogContext] | None = None

    def __enter__(self) -> LogContext:
        context = _with(_CONTEXT.get(), self._fields)
        self._token = _CONTEXT.set(context)
        return context

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _CONTEXT.reset(self._token)
            self._token = None


def bind(**fields: str) -> LogContext:
    """Bind ``fields`` (over what is bound already) for the rest of the running task."""
    _check(fields)
    context = _with(_CONTEXT.get(), fields)
    _CONTEXT.set(context)
    return context


class ContextFilter(logging.Filter):
    """Copies the bound :class:`LogContext` onto each record (as attributes of its names).

    Put it on a handler, so that records of every logger get it. A record that already has
    a field (set by ``extra=``) keeps its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CONTEXT.get()
        for name in _FIELDS:
            if not getattr(record, name, ""):
                setattr(record, name, getattr(context, name))
        return True


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    return {name: value for name in _FIELDS if (value := getattr(record, name, ""))}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE [method=... session_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context_of(record)
        if not context:
            return line
        tail = " ".join(f"{key}={value}" for key, value in context.items())
        head, newline, rest = line.partition("\n")
        # After the message's first line, so that a traceback stays readable below it.
        return f"{head} [{tail}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, the context
    fields, the access line's fields, and ``exception`` (the traceback) when there is one.

    ``timestamps=False`` leaves ``time`` out (for doctests and tests that compare lines).
    """

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {}
        if self._timestamps:
            moment = datetime.fromtimestamp(record.created, UTC)
            entry["time"] = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
        entry["level"] = record.levelname
        entry["logger"] = record.name
        entry["message"] = record.getMessage()
        entry.update(_context_of(record))
        access = getattr(record, ACCESS, None)
        if isinstance(access, Mapping):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt`` (``text`` or ``json``), with context.

    Replaces the root logger's handlers, as ``logging.basicConfig(force=True)`` does.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)

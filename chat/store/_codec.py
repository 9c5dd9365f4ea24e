"""How sessions and messages become stored values: one mapping for every store.

A stored session is a flat record of the :class:`~chat.types.Session` fields a store keeps
(:data:`SESSION_FIELDS`: every field but the id, the message count a store counts itself,
and the live state the core fills in), each as a string or an integer: SQLite columns and
Redis hash fields have these names. A field added to ``Session`` is stored by every store
without editing them; a record written before the field existed reads as its default.

A stored message is a JSON array (Redis) or a row (SQLite) of :data:`MESSAGE_FIELDS`.
"""

from __future__ import annotations

import enum
import json
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from datetime import datetime
from typing import Any

from chat.types import Message, Session, SessionPatch, Usage, format_timestamp, parse_timestamp

__all__ = [
    "LIVE_SESSION_FIELDS",
    "MESSAGE_FIELDS",
    "SESSION_FIELDS",
    "STORED_DEFAULTS",
    "decode_message",
    "encode_message",
    "message_from_values",
    "message_values",
    "patch_values",
    "session_from_values",
    "session_values",
]

#: Session fields no store keeps: the key, the count a store derives, the live state.
LIVE_SESSION_FIELDS = frozenset({"session_id", "message_count", "turn_running", "watchers"})

_SESSION_TYPES: dict[str, Any] = typing.get_type_hints(Session)
#: The stored fields of a session, in declaration order.
SESSION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(Session) if f.name not in LIVE_SESSION_FIELDS
)
_SESSION_DEFAULTS = {f.name: f.default for f in fields(Session) if f.default is not MISSING}

#: The stored fields of a message, in order; ``usage`` is two nullable token counts.
MESSAGE_FIELDS: tuple[str, ...] = (
    "role",
    "content",
    "created_at",
    "status",
    "request_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "turn_id",
)
_MESSAGE_TYPES: dict[str, Any] = typing.get_type_hints(Message)

Value = str | int | None


def _encode(value: object) -> str | int:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, bool | enum.IntEnum):
        return int(value)
    if isinstance(value, str | int):
        return value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _decode(kind: Any, value: object) -> Any:
    if kind is datetime:
        return parse_timestamp(str(value))
    if kind is str:
        return str(value)
    if kind is bool:
        return bool(int(str(value)))
    if isinstance(kind, type) and issubclass(kind, int):  # int and the IntEnums
        return kind(int(str(value)))
    raise TypeError(f"cannot read a stored {kind!r}")


#: The stored value of each session field that has a default: what a record written before
#: the field existed means.
STORED_DEFAULTS: dict[str, str | int] = {
    name: _encode(value) for name, value in _SESSION_DEFAULTS.items() if name in SESSION_FIELDS
}


def session_values(session: Session) -> dict[str, str | int]:
    """The stored record of ``session``."""
    return {name: _encode(getattr(session, name)) for name in SESSION_FIELDS}


def session_from_values(
    session_id: str, values: Mapping[str, object], message_count: int
) -> Session:
    """A session from its stored record (a missing field reads as its default)."""
    known: dict[str, Any] = {}
    for name in SESSION_FIELDS:
        if name in values and values[name] is not None:
            known[name] = _decode(_SESSION_TYPES[name], values[name])
        elif name not in _SESSION_DEFAULTS:
            raise ValueError(f"stored session {session_id!r} has no {name}")
    return Session(session_id=session_id, message_count=message_count, **known)


def patch_values(patch: SessionPatch) -> dict[str, str | int]:
    """The stored values of the fields ``patch`` sets."""
    return {name: _encode(getattr(patch, name)) for name in patch.changed()}


def message_values(message: Message) -> tuple[Value, ...]:
    """The stored values of ``message``, in :data:`MESSAGE_FIELDS` order."""
    usage = message.usage
    values: list[Value] = []
    for name in MESSAGE_FIELDS:
        if name == "prompt_tokens":
            values.append(None if usage is None else usage.prompt_tokens)
        elif name == "completion_tokens":
            values.append(None if usage is None else usage.completion_tokens)
        else:
            values.append(_encode(getattr(message, name)))
    return tuple(values)


def message_from_values(values: typing.Sequence[object]) -> Message:
    """A message from its stored values; trailing fields a record lacks read as defaults."""
    record = dict(zip(MESSAGE_FIELDS, values, strict=False))
    prompt, completion = record.pop("prompt_tokens", None), record.pop("completion_tokens", None)
    usage = None if prompt is None else Usage(int(str(prompt)), int(str(completion or 0)))
    known = {
        name: _decode(_MESSAGE_TYPES[name], value)
        for name, value in record.items()
        if value is not None
    }
    return Message(usage=usage, **known)


#: Where the usage pair sits in the JSON array of a message (Redis): one nested
#: ``[prompt, completion]`` or ``null`` in place of the two columns, as written since v1.
_USAGE_AT = MESSAGE_FIELDS.index("prompt_tokens")


def encode_message(message: Message) -> str:
    """``message`` as compact JSON: one array, its usage nested as ``[prompt, completion]``."""
    values: list[object] = list(message_values(message))
    prompt, completion = values[_USAGE_AT], values[_USAGE_AT + 1]
    values[_USAGE_AT : _USAGE_AT + 2] = [None if prompt is None else [prompt, completion]]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def decode_message(raw: str) -> Message:
    """Invert :func:`encode_message` (also for arrays written before a field was added)."""
    values = list(json.loads(raw))
    usage = values[_USAGE_AT] if len(values) > _USAGE_AT else None
    values[_USAGE_AT : _USAGE_AT + 1] = [None, None] if usage is None else list(usage)
    return message_from_values(values)

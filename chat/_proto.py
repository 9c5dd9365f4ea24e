"""The server's wire messages: protobuf (upb) classes, and conversion to and from the core.

The server reads and writes ``chat.proto``'s messages through the classes protobuf builds
from the descriptors embedded in :mod:`chatpb` (``message_factory`` over the generated file's
pool): the same schema as the betterproto2 dataclasses users import, parsed and serialized
by protobuf's C core (upb), which also refuses malformed input with one exception type,
invalid UTF-8 included, and int32 values out of range. The betterproto2 classes stay the
public API; nothing here is hand-encoded.

Conversion is by field name, in one place: a request's fields are those of
:class:`~chat.events.Request`, an event's those of :class:`~chat.events.Event`, a session's
those of :class:`~chat.types.Session`, and so on. ``tests/test_wire.py`` fails when a message
has a field its domain type lacks, so a field added to ``chat.proto`` cannot be dropped on
the way.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import typing
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from google.protobuf import message_factory

import chatpb
from chat.errors import InvalidArgument
from chat.events import Event, EventKind, ReplyCounter, Request
from chat.stats import ServerStatsInfo
from chat.types import Message, Session, SessionPatch, Usage, format_timestamp

__all__ = [
    "CHAT_SERVICE",
    "CHUNK_OWN_FIELDS",
    "CHUNK_SHARED_FIELDS",
    "EVENT_RENAMES",
    "MESSAGE_RENAMES",
    "NOT_ON_CHUNKS",
    "REQUEST_RENAMES",
    "ChunkEncoder",
    "EncodedMessage",
    "decode_event",
    "domain_enum",
    "encode_event",
    "message_class",
    "message_to_wire",
    "patch_from_wire",
    "request_from_wire",
    "session_settings_from_wire",
    "session_to_wire",
    "stats_to_wire",
]

#: The service as ``chat.proto`` declares it.
CHAT_SERVICE = chatpb.CHAT_PROTO_DESCRIPTOR.services_by_name["ChatService"]

_FILE_MESSAGES = chatpb.CHAT_PROTO_DESCRIPTOR.message_types_by_name


def message_class(name: str) -> Any:
    """The protobuf class of message ``name`` of ``chat.proto``."""
    return message_factory.GetMessageClass(_FILE_MESSAGES[name])


_ChatResponse = message_class("ChatResponse")
_SessionInfo = message_class("SessionInfo")
_ChatMessage = message_class("ChatMessage")
_ServerStatsResponse = message_class("ServerStatsResponse")


class EncodedMessage(bytes):
    """A serialized message, sendable wherever grpclib expects a message object.

    grpclib's protobuf codec checks the type a handler declares and calls
    ``SerializeToString()``: a handler that declares this type sends these bytes as they are.
    """

    __slots__ = ()

    def SerializeToString(self) -> bytes:
        return self

    @classmethod
    def FromString(cls, data: bytes) -> EncodedMessage:
        return cls(data)


# -- naming: wire field -> domain attribute, where the two differ ------------------------------

#: ChatRequest -> Request.
REQUEST_RENAMES: Mapping[str, str] = {"type": "kind"}
#: ChatResponse -> Event (``timestamp`` is the moment of writing, not part of the event).
EVENT_RENAMES: Mapping[str, str] = {"type": "kind"}
#: ChatMessage -> Message.
MESSAGE_RENAMES: Mapping[str, str] = {"timestamp": "created_at"}


def _field_names(name: str, *, skip: Iterable[str] = ()) -> tuple[str, ...]:
    skipped = set(skip)
    return tuple(f.name for f in _FILE_MESSAGES[name].fields if f.name not in skipped)


def _message_fields(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in _FILE_MESSAGES[name].fields if f.message_type is not None)


@functools.cache  # type hints are resolved once per field, not on every request
def domain_enum(owner: type, attribute: str) -> type[enum.IntEnum] | None:
    """The IntEnum type of ``owner.attribute`` (``X`` or ``X | None``), if it is one."""
    hint = typing.get_type_hints(owner)[attribute]
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, enum.IntEnum):
            return candidate
    return None


def _checked_enum(kind: type[enum.IntEnum], value: int, field: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown value {value} for {kind.__name__}") from None


# -- requests -------------------------------------------------------------------------------

_REQUEST_WIRE = _field_names("ChatRequest")
_request_values = operator.attrgetter(*_REQUEST_WIRE)
_REQUEST_ATTRIBUTES = tuple(REQUEST_RENAMES.get(name, name) for name in _REQUEST_WIRE)


def request_from_wire(message: Any) -> Request:
    """The :class:`Request` a ``ChatRequest`` carries (its kind may be a number we lack)."""
    return Request(**dict(zip(_REQUEST_ATTRIBUTES, _request_values(message), strict=True)))


# -- events (the hot path: one per chunk) -----------------------------------------------------

_EVENT_MESSAGES = _message_fields("ChatResponse")
#: Scalar fields of ChatResponse set from the event (type and timestamp are set first).
_EVENT_SCALARS = _field_names("ChatResponse", skip=("type", "timestamp", *_EVENT_MESSAGES))
_event_values = operator.attrgetter(*(EVENT_RENAMES.get(n, n) for n in _EVENT_SCALARS))


_USAGE_FIELDS = _field_names("TokenUsage")


def _fill_usage(target: Any, usage: Usage) -> None:
    target.SetInParent()  # present even when every count is 0
    for name in _USAGE_FIELDS:
        if value := getattr(usage, name):
            setattr(target, name, value)


def encode_event(event: Event, timestamp: str) -> bytes:
    """The serialized ``ChatResponse`` for ``event``, written at ``timestamp``.

    Fields at their default are left unset (proto3 leaves them off the wire). An int32 field
    whose value does not fit raises ``ValueError``: protobuf refuses it rather than truncate.
    """
    response = _ChatResponse(type=event.kind, timestamp=timestamp)
    for name, value in zip(_EVENT_SCALARS, _event_values(event), strict=True):
        if value:
            setattr(response, name, value)
    if event.usage is not None:
        _fill_usage(response.usage, event.usage)
    if event.session is not None:
        _fill_session(response.session, event.session)
    return bytes(response.SerializeToString())


#: The ChatResponse fields a reply's chunk carries: those its reply shares, written once per
#: reply by :class:`ChunkEncoder`, and its own. Every other field of ChatResponse is
#: :data:`NOT_ON_CHUNKS`; a test checks that the three cover ChatResponse, so a new field
#: must be placed (and, if chunks carry it, written by the encoder) before the tests pass.
CHUNK_SHARED_FIELDS = ("type", "session_id", "request_id", "turn_id")
CHUNK_OWN_FIELDS = ("timestamp", "chunk_text", "chunk_number", "seq")
NOT_ON_CHUNKS = (
    "status_message",
    "context_messages",
    "total_chunks",
    "processing_time",
    "message_count",
    "error_message",
    "finish_reason",
    "usage",
    "model",
    "error_code",
    "omitted_messages",
    "retry_after",
    "session",
    "update_kind",
    "status_kind",
    "error_field",
)


_EVENT_ATTRIBUTES = tuple(EVENT_RENAMES.get(n, n) for n in _EVENT_SCALARS)
_EVENT_ENUMS = {
    name: kind for name in _EVENT_ATTRIBUTES if (kind := domain_enum(Event, name)) is not None
}


def decode_event(data: bytes) -> Event:
    """The :class:`Event` a serialized ``ChatResponse`` (from :func:`encode_event`) carries.

    For events kept outside the process (the Redis replay log): the same fields by the same
    names, so an event read back equals the one written (its ``timestamp`` aside, which is
    the moment of writing). Enum values this server lacks raise ``ValueError``; a
    ``session`` (only SESSION_UPDATE has one, and those are not kept) is not read back.
    """
    response = _ChatResponse.FromString(data)
    values: dict[str, Any] = {}
    for wire_name, name in zip(_EVENT_SCALARS, _EVENT_ATTRIBUTES, strict=True):
        value = getattr(response, wire_name)
        if value:
            kind = _EVENT_ENUMS.get(name)
            values[name] = value if kind is None else kind(value)
    if response.HasField("usage"):
        usage = response.usage
        values["usage"] = Usage(usage.prompt_tokens, usage.completion_tokens)
    return Event(EventKind(response.type), **values)


class ChunkEncoder:
    """:func:`encode_event` for the events of one stream, cheaper for a reply's chunks.

    The chunks of a reply share their type, session, request and turn: those are serialized
    once per reply, and each chunk's own fields (timestamp, text, number, seq) after them.
    Protobuf reads concatenated messages as one message with the fields of both, so a client
    reads exactly what :func:`encode_event` writes (a test compares them for every event of
    real turns). Any other event, and a chunk not tied to a reply (a replayed one), goes
    through :func:`encode_event`.
    """

    __slots__ = ("_prefix", "_reply", "_request_id", "_session_id")

    def __init__(self) -> None:
        self._reply: ReplyCounter | None = None
        self._session_id = self._request_id = ""
        self._prefix = b""

    def encode(self, event: Event, timestamp: str) -> bytes:
        reply = event.reply
        if event.kind is not EventKind.CHUNK or reply is None:
            return encode_event(event, timestamp)
        if (
            reply is not self._reply
            or event.session_id is not self._session_id
            or event.request_id is not self._request_id
        ):
            self._reply, self._session_id, self._request_id = (
                reply,
                event.session_id,
                event.request_id,
            )
            shared = _ChatResponse(type=EventKind.CHUNK)
            if event.session_id:
                shared.session_id = event.session_id
            if event.request_id:
                shared.request_id = event.request_id
            if reply.turn_id:
                shared.turn_id = reply.turn_id
            self._prefix = bytes(shared.SerializeToString())
        own = _ChatResponse()
        own.timestamp = timestamp
        own.chunk_text = event.chunk_text
        own.chunk_number = event.chunk_number
        own.seq = event.seq
        body: bytes = own.SerializeToString()
        return self._prefix + body


# -- sessions, messages, stats ------------------------------------------------------------------

_SESSION_SCALARS = _field_names("SessionInfo", skip=_message_fields("SessionInfo"))


def _fill_session(target: Any, session: Session) -> None:
    target.SetInParent()
    for name in _SESSION_SCALARS:
        value = getattr(session, name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        if value:
            setattr(target, name, value)


_CHAT_MESSAGE_SCALARS = _field_names("ChatMessage", skip=_message_fields("ChatMessage"))


def message_to_wire(message: Message) -> Any:
    """The ``ChatMessage`` for a stored message."""
    wire = _ChatMessage()
    for name in _CHAT_MESSAGE_SCALARS:
        value = getattr(message, MESSAGE_RENAMES.get(name, name))
        if isinstance(value, datetime):
            value = format_timestamp(value)
        if value:
            setattr(wire, name, value)
    if message.usage is not None:
        _fill_usage(wire.usage, message.usage)
    return wire


def session_to_wire(session: Session, messages: Iterable[Message] = ()) -> Any:
    """The ``SessionInfo`` for ``session``, with ``messages`` as its history."""
    wire = _SessionInfo()
    _fill_session(wire, session)
    wire.messages.extend(message_to_wire(m) for m in messages)
    return wire


def stats_to_wire(stats: ServerStatsInfo) -> Any:
    """The ``ServerStatsResponse`` for a snapshot (the same fields, by name)."""
    wire = _ServerStatsResponse()
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        if value:
            setattr(wire, field.name, value)
    return wire


# -- unary requests -------------------------------------------------------------------------------


def session_settings_from_wire(message: Any) -> dict[str, Any]:
    """A ``CreateSessionRequest`` as the session fields it sets (enum values checked)."""
    settings: dict[str, Any] = {}
    for name in _field_names("CreateSessionRequest"):
        value = getattr(message, name)
        kind = domain_enum(Session, name)
        settings[name] = value if kind is None else _checked_enum(kind, value, name)
    return settings


_PATCH_FIELDS = tuple(f.name for f in dataclasses.fields(SessionPatch))


def patch_from_wire(message: Any) -> SessionPatch:
    """The :class:`SessionPatch` an ``UpdateSessionRequest`` describes: the fields it sets."""
    changes: dict[str, Any] = {}
    for name in _PATCH_FIELDS:
        if message.HasField(name):
            value = getattr(message, name)
            kind = domain_enum(SessionPatch, name)
            changes[name] = value if kind is None else _checked_enum(kind, value, name)
    return SessionPatch(**changes)

"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

import chatpb
from chat.backends import PromptMessage
from chat.client import ReconnectPolicy
from chat.events import Event
from chat.stats import ServerStatsInfo
from chat.types import (
    ConcurrencyPolicy,
    ContextPolicy,
    DisconnectPolicy,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    Usage,
    format_timestamp,
)

#: Text as people type it, plus what breaks naive code: combining marks, emoji with
#: zero-width joiners, astral-plane characters, CJK, RTL, control-free whitespace.
_ALPHABET = st.characters(
    codec="utf-8",
    exclude_categories=["Cs"],  # lone surrogates cannot be encoded, so never sent
)
_SPECIAL = st.sampled_from(["👩‍👩‍👧", "🇫🇷", "é", "é", "日本語", "שלום", " ", "\n", "\t", ""])

text = st.one_of(st.text(_ALPHABET, max_size=60), _SPECIAL)

#: A reply as a model might stream it: any number of deltas, some empty.
deltas = st.lists(text, max_size=40)

#: A non-empty message a user could send.
user_message = st.text(_ALPHABET, min_size=1, max_size=80).filter(lambda s: s.strip() != "")

#: The text of a message in a prompt (a system prompt, history, the new message).
prompt_text = st.text(_ALPHABET, min_size=1, max_size=200)

#: A history of user and assistant messages, oldest first, as sent to a model.
histories = st.lists(
    st.builds(PromptMessage, st.sampled_from([Role.USER, Role.ASSISTANT]), prompt_text),
    max_size=30,
)

# -- stored sessions and messages -------------------------------------------------------------

#: Aware UTC datetimes with microseconds, in a range where RFC 3339 has a 4-digit year.
timestamps = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
)

#: Few distinct moments, so that orderings by time have ties (broken by session id), with
#: the occasional arbitrary one.
close_moments = st.integers(0, 12).map(
    lambda s: datetime(2026, 5, 1, tzinfo=UTC) + timedelta(seconds=s)
)
moments = close_moments | timestamps

#: Few distinct ids (so that rules hit existing sessions), with the separators stores use.
session_ids = st.text(alphabet="ab:|-", min_size=1, max_size=3)

usages = st.none() | st.builds(Usage, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))

messages = st.builds(
    Message,
    role=st.sampled_from(Role),
    content=text,
    created_at=moments,
    status=st.sampled_from(MessageStatus),
    request_id=st.text(max_size=8, alphabet="xyz0123456789"),
    model=st.sampled_from(["", "echo", "gpt-4o-mini"]),
    usage=usages,
)

patches = st.builds(
    SessionPatch,
    title=st.none() | text,
    system_prompt=st.none() | text,
    model=st.none() | st.sampled_from(["echo", "other"]),
    context_policy=st.none() | st.sampled_from(ContextPolicy),
    concurrency_policy=st.none() | st.sampled_from(ConcurrencyPolicy),
    on_disconnect=st.none() | st.sampled_from(DisconnectPolicy),
    max_reply_tokens=st.none() | st.sampled_from([0, 1, 4096]),
)

#: Any valid reconnection policy of ChatClient.
reconnect_policies = st.builds(
    ReconnectPolicy,
    max_attempts=st.integers(1, 50),
    initial_backoff=st.floats(0, 2),
    max_backoff=st.floats(2, 30),
    multiplier=st.floats(1, 4),
    jitter=st.floats(0, 1),
)

# -- derived from the wire messages -----------------------------------------------------------
# Each strategy below draws every field of a wire message, found in its descriptor, for the
# domain type it converts to: a field added to chat.proto is drawn without editing this.

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TYPE = FieldDescriptor
_RANGES = {
    _TYPE.TYPE_INT32: (INT32_MIN, INT32_MAX),
    _TYPE.TYPE_INT64: (INT64_MIN, INT64_MAX),
}
_DESCRIPTORS = chatpb.CHAT_PROTO_DESCRIPTOR.message_types_by_name


def _integers(field: FieldDescriptor, *, overflow: bool) -> st.SearchStrategy[int]:
    low, high = _RANGES[field.type]
    edges = st.sampled_from([0, 1, 127, 128, 16_383, 16_384, high, -1, low])
    inside = edges | st.integers(low, high)
    if not overflow:
        return inside
    # Now and then a value that does not fit, which must be refused rather than truncated.
    return inside | st.sampled_from([high + 1, low - 1, 2**70])


def _for_field(
    owner: type, attribute: str, field: FieldDescriptor, *, overflow: bool
) -> st.SearchStrategy[Any]:
    hint = typing.get_type_hints(owner)[attribute]
    optional = type(None) in typing.get_args(hint)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = kinds[0]
    strategy: st.SearchStrategy[Any]
    if kind is datetime:
        strategy = timestamps
    elif isinstance(kind, type) and issubclass(kind, enum.IntEnum):
        strategy = st.sampled_from(kind)
    elif field.type == _TYPE.TYPE_MESSAGE:
        strategy = derived(kind, field.message_type.name, overflow=overflow)
    elif field.type == _TYPE.TYPE_STRING:
        strategy = text
    elif field.type == _TYPE.TYPE_BOOL:
        strategy = st.booleans()
    elif field.type == _TYPE.TYPE_DOUBLE:
        strategy = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
            [0.0, -0.0, 5e-324, 1.5, math.inf]
        )
    elif field.type in _RANGES:
        strategy = _integers(field, overflow=overflow)
    else:
        raise TypeError(f"no strategy for {field.full_name} (type {field.type})")
    return st.none() | strategy if optional else strategy


def derived(
    kind: type,
    message: str,
    *,
    renames: Mapping[str, str] | None = None,
    overflow: bool = False,
    skip: Iterable[str] = (),
) -> st.SearchStrategy[Any]:
    """Instances of dataclass ``kind`` with every field that wire ``message`` has drawn.

    ``renames`` maps wire names to attribute names where they differ; fields of ``message``
    in ``skip``, and wire fields ``kind`` computes (``TokenUsage.total_tokens``), are left
    to their defaults.
    """
    renames = renames or {}
    settable = {f.name for f in dataclasses.fields(kind) if f.init}
    arguments: dict[str, st.SearchStrategy[Any]] = {}
    for field in _DESCRIPTORS[message].fields:
        attribute = renames.get(field.name, field.name)
        if field.name in skip or attribute not in settable:
            continue
        if field.is_repeated:
            continue  # lists of messages are drawn where they are sent (the history)
        arguments[attribute] = _for_field(kind, attribute, field, overflow=overflow)
    built = st.builds(kind, **arguments)
    # Derived values (a usage's total) must fit too, unless overflow is asked for.
    return built if overflow else built.filter(lambda value: fits_the_wire(value, message))


#: Any event the core could make, now and then with an int32 value too large for the wire.
events = derived(Event, "ChatResponse", renames={"type": "kind"}, overflow=True, skip={"timestamp"})
#: Sessions and stored messages as a store returns them.
sessions = derived(Session, "SessionInfo")
stored_messages = st.lists(
    derived(Message, "ChatMessage", renames={"timestamp": "created_at"}), max_size=4
)
#: A ChatRequest as a client sends it (the public betterproto2 type).
requests = st.builds(
    chatpb.ChatRequest,
    **{
        f.name: (
            st.sampled_from(chatpb.ChatRequestType)
            if f.name == "type"
            else text
            if f.type == _TYPE.TYPE_STRING
            else _integers(f, overflow=False)
        )
        for f in _DESCRIPTORS["ChatRequest"].fields
    },
)
#: Statistics snapshots.
stats_snapshots = derived(ServerStatsInfo, "ServerStatsResponse")


def wire_value(
    source: object,
    field: FieldDescriptor,
    *,
    timestamp: str | None = None,
    renames: Mapping[str, str] | None = None,
) -> Any:
    """What field ``field`` of the wire message made from ``source`` must hold, as plain data.

    Nested messages become dicts of their fields; timestamps RFC 3339; enums their number.
    """
    if field.name == "timestamp" and timestamp is not None:
        return timestamp
    value = getattr(source, (renames or {}).get(field.name, field.name))
    if field.type == _TYPE.TYPE_MESSAGE:
        if value is None:
            return None
        if field.is_repeated:
            return [wire_value_of(item, field.message_type.name) for item in value]
        return wire_value_of(value, field.message_type.name)
    if isinstance(value, datetime):
        return format_timestamp(value)
    if value is None and field.type == _TYPE.TYPE_STRING:
        return ""
    if isinstance(value, enum.IntEnum | bool):
        return int(value) if isinstance(value, enum.IntEnum) else value
    return value


def wire_value_of(source: object, message: str) -> dict[str, Any]:
    """``source`` as the plain data of the wire message ``message`` made from it."""
    descriptor = _DESCRIPTORS[message]
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.is_repeated and not hasattr(source, field.name):
            values[field.name] = []  # the history is sent beside a session, not in it
        else:
            values[field.name] = wire_value(source, field)
    return values


def fits_the_wire(source: object, message: str = "ChatResponse") -> bool:
    """Whether every integer of the message made from ``source`` fits its field."""
    for field in _DESCRIPTORS[message].fields:
        if field.name == "type" or not hasattr(source, field.name):
            continue
        value = getattr(source, field.name)
        if field.type == _TYPE.TYPE_MESSAGE and value is not None and not field.is_repeated:
            if not fits_the_wire(value, field.message_type.name):
                return False
        elif field.type in _RANGES and not isinstance(value, enum.IntEnum):
            low, high = _RANGES[field.type]
            if not low <= value <= high:
                return False
    return True


# -- stored turns, as the core writes them ----------------------------------------------------

_NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _turn(kind: str, question: str, reply: str) -> list[Message]:
    """The messages one turn leaves in a history (see ``Conversation._write_turn``)."""
    asked = Message(Role.USER, question, _NOW)
    failed = Message(Role.USER, question, _NOW, MessageStatus.FAILED)
    if kind == "completed":
        return [asked, Message(Role.ASSISTANT, reply or "ok", _NOW)]
    if kind == "empty":  # the model said nothing
        return [asked, Message(Role.ASSISTANT, "", _NOW)]
    if kind == "cancelled":  # partial, or before the first word when reply is empty
        return [asked, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.CANCELLED)]
    if kind == "interrupted":
        return [asked, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.INTERRUPTED)]
    if kind == "failed":  # the model failed, after some words or none
        return (
            [failed, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.FAILED)]
            if reply
            else [failed]
        )
    raise AssertionError(kind)


TURN_KINDS = ("completed", "empty", "cancelled", "interrupted", "failed")

#: Histories of completed, empty, cancelled, interrupted and failed turns, as stored; cut at a
#: random point at the start, as a per-session message cap leaves them.
turn_histories = st.builds(
    lambda turns, cut: [m for turn in turns for m in _turn(*turn)][cut:],
    st.lists(st.tuples(st.sampled_from(TURN_KINDS), user_message, text), max_size=12),
    st.integers(0, 2),
)


# -- hostile requests on the wire (the fuzz suite) ------------------------------------------

_SERVICE = chatpb.CHAT_PROTO_DESCRIPTOR.services_by_name["ChatService"]
#: Every RPC of ChatService, by name.
RPC_NAMES = tuple(sorted(method.name for method in _SERVICE.methods))
#: Numbers that do not fit a 32-bit field (sent as raw varints, which protobuf truncates).
_WIDE_NUMBERS = (2**31, -(2**31) - 1, 2**32 + 1, 2**63 - 1, -(2**63), 2**64 - 1, -1)


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (negative numbers as their 64-bit two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _request_type(rpc: str) -> Any:
    return _SERVICE.methods_by_name[rpc].input_type


@st.composite
def valid_request(draw: st.DrawFn, rpc: str) -> bytes:
    """A well-formed request of ``rpc`` with arbitrary values (ids, text, numbers)."""
    out = bytearray()
    for field in _request_type(rpc).fields:
        if not draw(st.booleans()):
            continue
        if field.type == _TYPE.TYPE_STRING:
            value = draw(st.one_of(text, st.uuids().map(str))).encode()
            out += _key(field.number, 2) + varint(len(value)) + value
        elif field.type == _TYPE.TYPE_BOOL:
            out += _key(field.number, 0) + varint(draw(st.integers(0, 1)))
        elif field.type in (_TYPE.TYPE_INT32, _TYPE.TYPE_ENUM):
            out += _key(field.number, 0) + varint(draw(st.integers(-5, 2**31 - 1)))
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes flipped, inserted, deleted or cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, len(out)))
        if operation == "flip" and out:
            index = min(at, len(out) - 1)
            out[index] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del out[at:]
        else:
            out += draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@st.composite
def extreme_request(draw: st.DrawFn, rpc: str) -> bytes:
    """A request with one field at an extreme: a huge or invalid string, a number that
    does not fit, the wrong wire type, or an unknown field."""
    fields = list(_request_type(rpc).fields)
    number = draw(st.sampled_from([f.number for f in fields])) if fields else 1
    field = next((f for f in fields if f.number == number), None)
    kind = draw(st.sampled_from(["long", "huge", "utf8", "wide", "wire", "unknown", "empty"]))
    if kind == "long":
        value = b"x" * draw(st.sampled_from([129, 201, 513, 32_001]))
        return _key(number, 2) + varint(len(value)) + value
    if kind == "huge":
        # Over the fuzzed server's --max-receive-bytes (64 KiB).
        return _key(number, 2) + varint(70_000) + b"y" * 70_000
    if kind == "utf8":
        return _key(number, 2) + b"\x04\xff\xfe\xc0\x80"
    if kind == "wide" and field is not None and field.type != _TYPE.TYPE_STRING:
        return _key(number, 0) + varint(draw(st.sampled_from(_WIDE_NUMBERS)))
    if kind == "wire":
        return _key(number, draw(st.sampled_from([1, 3, 4, 5, 6, 7]))) + bytes(8)
    if kind == "unknown":
        return _key(draw(st.integers(100, 2**29 - 1)), 0) + varint(7)
    return b""


def request_bodies(rpc: str) -> st.SearchStrategy[bytes]:
    """Bodies of ``rpc`` requests: random bytes, mutated valid ones, extreme values."""
    return st.one_of(
        st.binary(max_size=256),
        valid_request(rpc).flatmap(mutated),
        extreme_request(rpc),
        st.tuples(valid_request(rpc), extreme_request(rpc)).map(b"".join),
    )


#: How the bodies are framed on the stream.
FRAMINGS = (
    "plain",
    "long",
    "short",
    "flag-only",
    "gzip",
    "gzip-corrupt",
    "unknown-encoding",
    "huge-prefix",
    "two",
    "cut-prefix",
    "none",
)


@dataclasses.dataclass(frozen=True)
class WireCase:
    """One hostile call: the RPC, its bodies, how they are framed."""

    rpc: str
    bodies: tuple[bytes, ...]
    framing: str


@st.composite
def wire_cases(draw: st.DrawFn) -> WireCase:
    rpc = draw(st.sampled_from(RPC_NAMES))
    count = draw(st.integers(1, 4)) if rpc == "Chat" else 1
    bodies = tuple(draw(request_bodies(rpc)) for _ in range(count))
    return WireCase(rpc, bodies, draw(st.sampled_from(FRAMINGS)))

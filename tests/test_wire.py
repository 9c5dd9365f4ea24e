"""The wire messages and the core's types carry the same fields, and events encode exactly.

Guards: every field of a message the server reads or writes has its counterpart in the
domain type it converts to (by name, with the renames :mod:`chat._proto` declares), so a
field added to ``chat.proto`` fails here until the core carries it. The property tests draw
events from strategies derived from the message descriptors (``tests/strategies.py``), so a
new field is covered without editing them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import pytest
from grpclib.encoding.proto import ProtoCodec
from hypothesis import assume, given

import chatpb
from chat._proto import (
    CHUNK_OWN_FIELDS,
    CHUNK_SHARED_FIELDS,
    EVENT_RENAMES,
    MESSAGE_RENAMES,
    NOT_ON_CHUNKS,
    REQUEST_RENAMES,
    ChunkEncoder,
    EncodedMessage,
    decode_event,
    encode_event,
    message_class,
    patch_from_wire,
    request_from_wire,
    session_settings_from_wire,
    session_to_wire,
    stats_to_wire,
)
from chat.core import ChatCore, Limits
from chat.errors import InvalidArgument
from chat.events import Event, EventKind, Request, RequestKind
from chat.stats import ServerStatsInfo
from chat.store.memory import MemoryStore
from chat.types import Message, Session, SessionPatch, Usage, format_timestamp
from tests.backends import ScriptedBackend
from tests.strategies import (
    INT32_MAX,
    derived,
    events,
    fits_the_wire,
    requests,
    sessions,
    stats_snapshots,
    stored_messages,
    wire_value,
)

DESCRIPTORS = chatpb.CHAT_PROTO_DESCRIPTOR.message_types_by_name


def wire_fields(message: str, *, renames: dict[str, str] | None = None) -> set[str]:
    renames = renames or {}
    return {renames.get(f.name, f.name) for f in DESCRIPTORS[message].fields}


def domain_fields(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def test_every_chat_response_field_is_an_event_field() -> None:
    wire = wire_fields("ChatResponse", renames=dict(EVENT_RENAMES)) - {"timestamp"}
    internal = {"reply"}  # the reply a chunk belongs to, never sent
    assert wire ^ (domain_fields(Event) - internal) == set(), (
        "ChatResponse and chat.events.Event must have the same fields (see chat._proto)"
    )


def test_every_chat_request_field_is_a_request_field() -> None:
    assert wire_fields("ChatRequest", renames=dict(REQUEST_RENAMES)) == domain_fields(Request)


def test_every_session_info_field_is_a_session_field() -> None:
    # The history is sent beside the session, not part of it.
    assert wire_fields("SessionInfo") - {"messages"} == domain_fields(Session)


def test_every_chat_message_field_is_a_message_field() -> None:
    assert wire_fields("ChatMessage", renames=dict(MESSAGE_RENAMES)) == domain_fields(Message)


def test_every_token_usage_field_is_a_usage_attribute() -> None:
    for name in wire_fields("TokenUsage"):
        assert isinstance(getattr(Usage(3, 4), name), int), name


def test_every_stats_field_is_in_the_one_statistics_list() -> None:
    assert wire_fields("ServerStatsResponse") == domain_fields(ServerStatsInfo)


def test_session_settings_are_session_fields_the_core_takes() -> None:
    create = wire_fields("CreateSessionRequest")
    # The caller's identity is not a setting: it comes from the credentials.
    parameters = set(inspect.signature(ChatCore.create_session).parameters) - {"self", "identity"}
    assert create <= domain_fields(Session)
    assert create == parameters
    assert wire_fields("UpdateSessionRequest") - {"session_id"} == domain_fields(SessionPatch)


# -- events: encoded exactly, out-of-range values refused ----------------------------------


@given(events, sessions.map(lambda s: format_timestamp(s.created_at)))
def test_an_event_encodes_to_exactly_its_fields(event: Event, timestamp: str) -> None:
    try:
        data = encode_event(event, timestamp)
    except ValueError:
        # protobuf refuses an int32 out of range rather than truncate it; the core never
        # sends one (its counts are checked where they come from outside).
        assert not fits_the_wire(event)
        return
    assert fits_the_wire(event)
    parsed = chatpb.ChatResponse.parse(data)  # betterproto2: an independent decoder
    for field in DESCRIPTORS["ChatResponse"].fields:
        expected = wire_value(event, field, timestamp=timestamp, renames=EVENT_RENAMES)
        actual = getattr(parsed, field.name)
        if isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(actual), field.name
        else:
            assert _plain(actual) == expected, field.name


@given(derived(Event, "ChatResponse", renames=EVENT_RENAMES, skip={"timestamp", "session"}))
def test_an_event_decodes_back_to_itself(event: Event) -> None:
    # The Redis replay log keeps events as ChatResponse bytes: what it gives back to a
    # watcher on another replica must be the event the sender got.
    assume(not math.isnan(event.processing_time) and not math.isnan(event.retry_after))
    assert decode_event(encode_event(event, "t")) == event


def _plain(value: Any) -> Any:
    """A betterproto2 value as wire_value writes expectations: messages as field dicts."""
    if value is None or isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return {f.name: _plain(getattr(value, f.name)) for f in value.DESCRIPTOR.fields}


def test_a_chunk_is_encoded_field_by_field() -> None:
    event = Event(EventKind.CHUNK, session_id="s", request_id="r", chunk_text="é🙂", chunk_number=3)
    assert encode_event(event, "t") == (
        b"\x08\x02"  # type = CHUNK
        b"\x12\x01s"  # session_id
        b"*\x06\xc3\xa9\xf0\x9f\x99\x82"  # chunk_text, 6 bytes of UTF-8
        b"0\x03"  # chunk_number
        b"Z\x01t"  # timestamp (11)
        b"b\x01r"  # request_id (12)
    )


@pytest.mark.parametrize("value", [INT32_MAX + 1, -(2**31) - 1, 2**40])
def test_numbers_outside_int32_are_refused_not_truncated(value: int) -> None:
    with pytest.raises(ValueError, match=str(value)):
        encode_event(Event(EventKind.CHUNK, chunk_number=value), "")


def test_grpclibs_codec_sends_an_encoded_message_as_it_is() -> None:
    encoded = EncodedMessage(encode_event(Event(EventKind.PONG, request_id="p"), "t"))
    assert ProtoCodec().encode(encoded, EncodedMessage) == bytes(encoded)
    assert chatpb.ChatResponse.parse(encoded) == chatpb.ChatResponse(
        type=chatpb.ChatResponseType.PONG, request_id="p", timestamp="t"
    )


# -- requests and unary messages -------------------------------------------------------------


@given(requests)
def test_a_chat_request_converts_to_the_request_it_carries(request: chatpb.ChatRequest) -> None:
    wire = message_class("ChatRequest").FromString(bytes(request))
    converted = request_from_wire(wire)
    for field in DESCRIPTORS["ChatRequest"].fields:
        name = REQUEST_RENAMES.get(field.name, field.name)
        assert getattr(converted, name) == getattr(request, field.name), field.name


@given(sessions, stored_messages)
def test_a_session_and_its_history_convert_field_by_field(
    session: Session, history: list[Message]
) -> None:
    parsed = chatpb.SessionInfo.parse(session_to_wire(session, history).SerializeToString())
    for field in DESCRIPTORS["SessionInfo"].fields:
        if field.name == "messages":
            continue
        assert _plain(getattr(parsed, field.name)) == wire_value(session, field), field.name
    assert len(parsed.messages) == len(history)
    for wire, message in zip(parsed.messages, history, strict=True):
        for field in DESCRIPTORS["ChatMessage"].fields:
            expected = wire_value(message, field, renames=MESSAGE_RENAMES)
            assert _plain(getattr(wire, field.name)) == expected, field.name


@given(stats_snapshots)
def test_stats_convert_field_by_field(stats: ServerStatsInfo) -> None:
    parsed = chatpb.ServerStatsResponse.parse(stats_to_wire(stats).SerializeToString())
    for field in DESCRIPTORS["ServerStatsResponse"].fields:
        expected = wire_value(stats, field)
        actual = getattr(parsed, field.name)
        if isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(actual), field.name
        else:
            assert actual == expected, field.name


def test_session_settings_and_patches_refuse_unknown_enum_values() -> None:
    create = message_class("CreateSessionRequest")(concurrency_policy=77)
    with pytest.raises(InvalidArgument) as error:
        session_settings_from_wire(create)
    assert error.value.field == "concurrency_policy"
    update = message_class("UpdateSessionRequest")(session_id="s", on_disconnect=9)
    with pytest.raises(InvalidArgument) as error:
        patch_from_wire(update)
    assert error.value.field == "on_disconnect"


def test_a_patch_sets_only_the_fields_the_request_sets() -> None:
    update = message_class("UpdateSessionRequest")(session_id="s", title="", max_reply_tokens=5)
    assert patch_from_wire(update) == SessionPatch(title="", max_reply_tokens=5)
    assert patch_from_wire(message_class("UpdateSessionRequest")(session_id="s")) == (
        SessionPatch()
    )


def test_every_chat_response_field_is_placed_for_the_chunk_encoder() -> None:
    # A new ChatResponse field fails here until it is placed: carried by chunks (and then
    # written by ChunkEncoder, which the test below checks on real turns) or not.
    placed = [*CHUNK_SHARED_FIELDS, *CHUNK_OWN_FIELDS, *NOT_ON_CHUNKS]
    assert len(placed) == len(set(placed)), "a field is placed twice"
    assert set(placed) ^ wire_fields("ChatResponse") == set(), (
        "place every ChatResponse field in chat._proto: CHUNK_SHARED_FIELDS, "
        "CHUNK_OWN_FIELDS or NOT_ON_CHUNKS"
    )


@pytest.mark.parametrize("coalesce", [False, True])
async def test_the_chunk_encoder_writes_what_encode_event_writes_for_every_event_of_real_turns(
    coalesce: bool,
) -> None:
    # Real turns (the pump makes the chunks): a field a chunk carries that the encoder does
    # not write makes this fail.
    core = ChatCore(
        MemoryStore(),
        ScriptedBackend(["é🙂 ", "two ", "", "x" * 20_000, "end"], usage=Usage(3, 4)),
        limits=Limits(coalesce_chunks=coalesce, max_chunk_chars=8192),
    )
    session = await core.create_session()
    encoder = ChunkEncoder()
    parse = message_class("ChatResponse").FromString
    at = "2026-12-01T00:00:00Z"
    seen = 0
    async with core.open_conversation() as conversation:
        for n in range(2):
            await conversation.handle(
                Request(RequestKind.MESSAGE, session.session_id, "hi", request_id=f"r{n}")
            )
        conversation.finish_input()
        while (batch := await conversation.outbox.get()) is not None:
            for event in batch:
                fast = parse(encoder.encode(event, at))
                plain = parse(encode_event(event, at))
                assert fast == plain, event
                seen += event.kind is EventKind.CHUNK
    # Two turns of 6 chunks (the long delta is 3), fewer when merged.
    assert seen >= 4

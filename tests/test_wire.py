"""The fast ChatResponse encoder writes exactly the bytes protobuf's own encoder writes."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import betterproto2
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpclib.encoding.proto import ProtoCodec
from hypothesis import given
from hypothesis import strategies as st

import chatpb
from chat._wire import EncodedResponse, encode_response
from chat.events import Event, EventKind
from chat.service import event_to_response
from chat.types import ContextPolicy, FinishReason, Session, Usage
from tests.strategies import text

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _protobuf_classes() -> dict[str, Any]:
    """Classes built by google.protobuf itself from chatpb's descriptor (a private pool)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(chatpb.CHAT_PROTO_DESCRIPTOR.serialized_pb)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        for name in ("ChatResponse", "SessionInfo", "TokenUsage", "ChatMessage")
    }


PB = _protobuf_classes()


def to_protobuf(message: betterproto2.Message) -> Any:
    """The same message as a google.protobuf object, copied field by field (no encoding)."""
    target = PB[type(message).__name__]()
    for field in target.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                getattr(target, field.name).extend(to_protobuf(v) for v in value)
            elif value is not None:
                getattr(target, field.name).CopyFrom(to_protobuf(value))
        else:
            setattr(target, field.name, int(value) if field.enum_type is not None else value)
    return target


int32 = st.one_of(
    st.sampled_from([0, 1, 127, 128, 16_383, 16_384, INT32_MAX, -1, INT32_MIN]),
    st.integers(INT32_MIN, INT32_MAX),
)
doubles = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1.5, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)
moments = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
)
sessions = st.builds(
    Session,
    session_id=text,
    created_at=moments,
    last_activity=moments,
    title=text,
    model=text,
    system_prompt=text,
    context_policy=st.sampled_from(ContextPolicy),
    message_count=int32,
)
events = st.builds(
    Event,
    kind=st.sampled_from(EventKind),
    session_id=text,
    request_id=text,
    status_message=text,
    context_messages=int32,
    chunk_text=text,
    chunk_number=int32,
    total_chunks=int32,
    processing_time=doubles,
    message_count=int32,
    error_message=text,
    error_code=int32,
    finish_reason=st.sampled_from(FinishReason),
    usage=st.none() | st.builds(Usage, int32.map(lambda n: n // 2), int32.map(lambda n: n // 2)),
    model=text,
    omitted_messages=int32,
    retry_after=doubles,
    session=st.none() | sessions,
)


@given(events, text)
def test_encode_response_matches_protobufs_encoder(event: Event, timestamp: str) -> None:
    expected = to_protobuf(event_to_response(event, timestamp)).SerializeToString(
        deterministic=True
    )
    assert encode_response(event, timestamp) == expected


@given(events.filter(lambda e: not (math.isnan(e.processing_time) or math.isnan(e.retry_after))))
def test_encoded_response_parses_back_to_the_same_message(event: Event) -> None:
    response = event_to_response(event, "2026-11-26T13:33:32.123456Z")
    assert chatpb.ChatResponse.parse(encode_response(event, response.timestamp)) == response


def test_a_chunk_is_encoded_field_by_field() -> None:
    event = Event(EventKind.CHUNK, session_id="s", request_id="r", chunk_text="é🙂", chunk_number=3)
    assert encode_response(event, "t") == (
        b"\x08\x02"  # type = CHUNK
        b"\x12\x01s"  # session_id
        b"*\x06\xc3\xa9\xf0\x9f\x99\x82"  # chunk_text, 6 bytes of UTF-8
        b"0\x03"  # chunk_number
        b"Z\x01t"  # timestamp (11)
        b"b\x01r"  # request_id (12)
    )


@pytest.mark.parametrize("value", [INT32_MAX + 1, INT32_MIN - 1, 2**40])
def test_numbers_outside_int32_are_refused_not_truncated(value: int) -> None:
    with pytest.raises(ValueError, match="int32"):
        encode_response(Event(EventKind.CHUNK, chunk_number=value), "")


def test_grpclibs_codec_sends_an_encoded_response_as_it_is() -> None:
    encoded = EncodedResponse(encode_response(Event(EventKind.PONG, request_id="p"), "t"))
    assert ProtoCodec().encode(encoded, EncodedResponse) == bytes(encoded)
    assert chatpb.ChatResponse.parse(encoded) == chatpb.ChatResponse(
        type=chatpb.ChatResponseType.PONG, request_id="p", timestamp="t"
    )

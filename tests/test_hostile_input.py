"""Malformed, oversized, compressed and odd requests on the wire (issue 12, items 1-4 and 6).

A real server on 127.0.0.1 port 0, in this process; requests are sent as raw HTTP/2 frames
(:mod:`tests.raw_grpc`), so they can be anything. Each gets a documented status (or, on the
Chat stream, an ERROR event), never UNKNOWN and never the text of a Python exception, and
is logged in one WARNING line without a traceback.
"""

from __future__ import annotations

import base64
import gzip
import logging
import zlib
from collections.abc import AsyncIterator

import pytest
from grpclib import GRPCError
from grpclib.client import Channel

import chatpb
from chat import ChatServer, Limits, ServerConfig, _receive
from chat._proto import CHAT_SERVICE, message_class
from tests.helpers import ChatStream
from tests.raw_grpc import RawConnection, frame

S = "/ChatService/"
T = chatpb.ChatResponseType
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 3, 8, 12
#: What the text of a Python exception looks like in a status message.
EXCEPTION_TEXT = ("Traceback", "codec can't", "argument must be", "Error", "Exception", "0x")


@pytest.fixture
async def server() -> AsyncIterator[ChatServer]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        grace_period=1.0,
        limits=Limits(max_receive_bytes=64 * 1024),
    )
    async with ChatServer(config) as running:
        yield running


@pytest.fixture
async def raw(server: ChatServer) -> AsyncIterator[RawConnection]:
    async with RawConnection("127.0.0.1", server.port) as connection:
        yield connection


@pytest.fixture
async def stub(server: ChatServer) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with Channel("127.0.0.1", server.port) as channel:
        yield chatpb.ChatServiceStub(channel)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _assert_clean(message: str) -> None:
    assert not any(text in message for text in EXCEPTION_TEXT), message
    assert len(message) < 300, message


def _has_string_field_2(method: str) -> bool:
    request = CHAT_SERVICE.methods_by_name[method].input_type
    field = request.fields_by_number.get(2)
    return field is not None and field.type == field.TYPE_STRING


def _malformed_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


BAD_BODIES = {
    "random bytes": b"\xff\xfe\xfd\x00\x01garbage",
    # Field 2 is a string in every request that has one there, ChatRequest included.
    "invalid UTF-8": b"\x12\x02\xff\xfe",
    # Wire type 6 does not exist.
    "bad wire type": b"\x0e\x01",
    "truncated field": b"\x0a\x10abc",
}

UNARY = [
    "CreateSession",
    "GetSessionInfo",
    "UpdateSession",
    "ListSessions",
    "DeleteSession",
    "GetServerStats",
]


@pytest.mark.parametrize(
    ("method", "body"),
    [
        (method, body)
        for method in UNARY
        for body in sorted(BAD_BODIES)
        # ServerStatsRequest has no field 2 for bad UTF-8 to be in.
        if body != "invalid UTF-8" or _has_string_field_2(method)
    ],
)
async def test_a_malformed_unary_request_is_invalid_argument_logged_in_one_line(
    raw: RawConnection, caplog: pytest.LogCaptureFixture, method: str, body: str
) -> None:
    caplog.set_level(logging.INFO)
    answer = await raw.call(S + method, frame(BAD_BODIES[body]))
    assert answer.status == INVALID_ARGUMENT, answer
    _assert_clean(answer.message)
    (warning,) = _malformed_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is None
    assert "\n" not in warning.getMessage()
    assert method in warning.getMessage()


async def test_a_malformed_chat_message_gets_an_error_event_and_the_stream_goes_on(
    raw: RawConnection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stream = await raw.open(S + "Chat")
    await stream.send(frame(BAD_BODIES["invalid UTF-8"]) + frame(BAD_BODIES["random bytes"]))
    for _ in range(2):
        error = chatpb.ChatResponse.parse(await stream.message())
        assert error.type == T.ERROR
        assert error.error_code == INVALID_ARGUMENT
        _assert_clean(error.error_message)
    ping = chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="p")
    await stream.send(frame(bytes(ping)), end=True)
    pong = chatpb.ChatResponse.parse(await stream.message())
    assert (pong.type, pong.request_id) == (T.PONG, "p")
    answer = await stream.finished()
    assert answer.status == 0
    # One line for the stream, however many of its messages were malformed.
    (warning,) = _malformed_warnings(caplog)
    assert warning.exc_info is None
    assert "Chat" in warning.getMessage()


@pytest.mark.parametrize("method", [*UNARY, "Chat"])
async def test_a_message_cut_short_by_the_end_of_the_request_is_invalid_argument(
    raw: RawConnection, method: str
) -> None:
    answer = await raw.call(S + method, frame(b"\x0a\x03abc", length=100))
    assert answer.status == INVALID_ARGUMENT, answer
    _assert_clean(answer.message)


@pytest.mark.parametrize("method", [*UNARY, "Chat"])
async def test_a_length_over_the_receive_limit_is_refused_before_the_body_arrives(
    raw: RawConnection, method: str
) -> None:
    # The prefix announces 4 GiB; the body never comes and the request is not ended: the
    # answer can only come from the prefix.
    stream = await raw.open(S + method)
    await stream.send(frame(b"", length=0xFFFFFFFF))
    answer = await stream.finished()
    assert answer.status == RESOURCE_EXHAUSTED, answer
    assert "65536" in answer.message
    _assert_clean(answer.message)


async def test_a_title_over_the_receive_limit_is_resource_exhausted(
    stub: chatpb.ChatServiceStub, raw: RawConnection
) -> None:
    body = bytes(chatpb.CreateSessionRequest(title="t" * 70_000))
    answer = await raw.call(S + "CreateSession", frame(body))
    assert answer.status == RESOURCE_EXHAUSTED, answer
    assert (await stub.list_sessions(chatpb.ListSessionsRequest())).total_size == 0


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_requests_are_served(
    raw: RawConnection, stub: chatpb.ChatServiceStub, encoding: str, compress: object
) -> None:
    assert callable(compress)
    body = bytes(chatpb.CreateSessionRequest(title="compressed"))
    answer = await raw.call(
        S + "CreateSession",
        frame(compress(body), compressed=True),
        headers=[("grpc-encoding", encoding)],
    )
    assert answer.status == 0, answer
    (created,) = answer.messages
    session_id = chatpb.CreateSessionResponse.parse(created).session_id
    info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=session_id))
    assert info.title == "compressed"


async def test_every_response_says_which_encodings_the_server_accepts(raw: RawConnection) -> None:
    answer = await raw.call(S + "GetServerStats", frame(b""))
    assert answer.status == 0
    accepted = {e.strip() for e in answer.headers["grpc-accept-encoding"].split(",")}
    assert accepted == {"identity", "gzip", "deflate"}


async def test_an_unsupported_encoding_is_unimplemented_naming_the_accepted_ones(
    raw: RawConnection,
) -> None:
    answer = await raw.call(
        S + "GetServerStats",
        frame(b"\x00\x01", compressed=True),
        headers=[("grpc-encoding", "snappy")],
    )
    assert answer.status == UNIMPLEMENTED, answer
    assert "gzip" in answer.headers["grpc-accept-encoding"]
    _assert_clean(answer.message)


async def test_a_compressed_flag_without_an_encoding_is_invalid_argument(
    raw: RawConnection,
) -> None:
    answer = await raw.call(S + "GetServerStats", frame(gzip.compress(b""), compressed=True))
    assert answer.status == INVALID_ARGUMENT, answer


async def test_a_message_that_inflates_past_the_receive_limit_is_resource_exhausted(
    raw: RawConnection,
) -> None:
    # 10 MB of zeros compress to about 10 kB.
    body = bytes(chatpb.CreateSessionRequest(title="t")) + b"\x1a" + _varint(10_000_000)
    bomb = gzip.compress(body + bytes(10_000_000))
    assert len(bomb) < 64 * 1024
    answer = await raw.call(
        S + "CreateSession", frame(bomb, compressed=True), headers=[("grpc-encoding", "gzip")]
    )
    assert answer.status == RESOURCE_EXHAUSTED, answer


async def test_a_corrupt_compressed_message_is_invalid_argument(raw: RawConnection) -> None:
    answer = await raw.call(
        S + "GetServerStats",
        frame(b"not gzip at all", compressed=True),
        headers=[("grpc-encoding", "gzip")],
    )
    assert answer.status == INVALID_ARGUMENT, answer
    _assert_clean(answer.message)


async def test_a_unary_request_of_two_messages_is_refused_and_does_nothing(
    raw: RawConnection, stub: chatpb.ChatServiceStub
) -> None:
    body = frame(bytes(chatpb.CreateSessionRequest(title="one")))
    answer = await raw.call(S + "CreateSession", body + body)
    assert answer.status == INVALID_ARGUMENT, answer
    assert (await stub.list_sessions(chatpb.ListSessionsRequest())).total_size == 0


@pytest.mark.parametrize(
    ("method", "body"),
    [
        # page_size = -2**63, which protobuf's int32 parsing would truncate to 0.
        ("ListSessions", b"\x08" + _varint(-(2**63))),
        ("ListSessions", b"\x08" + _varint(2**32 + 5)),
        ("CreateSession", b"\x38" + _varint(2**40)),
        ("CreateSession", b"\x20" + _varint(-(2**40))),
    ],
)
async def test_a_number_out_of_its_fields_range_is_invalid_argument_not_truncated(
    raw: RawConnection, method: str, body: bytes
) -> None:
    answer = await raw.call(S + method, frame(body))
    assert answer.status == INVALID_ARGUMENT, answer
    _assert_clean(answer.message)


async def test_a_chat_message_with_a_number_out_of_range_is_an_error_event(
    raw: RawConnection,
) -> None:
    # type = 2**32 + 1 would be truncated to PING.
    stream = await raw.open(S + "Chat")
    await stream.send(frame(b"\x08" + _varint(2**32 + 1) + b"\x2a\x01p"), end=True)
    event = chatpb.ChatResponse.parse(await stream.message())
    assert (event.type, event.error_code) == (T.ERROR, INVALID_ARGUMENT)
    assert (await stream.finished()).status == 0


async def test_a_hand_made_page_token_is_refused(stub: chatpb.ChatServiceStub) -> None:
    for n in range(3):
        await stub.create_session(chatpb.CreateSessionRequest(title=str(n)))
    page = await stub.list_sessions(chatpb.ListSessionsRequest(page_size=1))
    assert page.next_page_token
    second = await stub.list_sessions(
        chatpb.ListSessionsRequest(page_size=1, page_token=page.next_page_token)
    )
    assert len(second.sessions) == 1
    # What a token used to be: base64 of "created_at|session_id"; and a token with one
    # character changed.
    newest = page.sessions[0]
    forged = base64.urlsafe_b64encode(f"{newest.created_at}|{newest.session_id}".encode())
    token = page.next_page_token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (forged.decode().rstrip("="), tampered):
        request = chatpb.ListSessionsRequest(page_size=1, page_token=bad)
        with pytest.raises(GRPCError) as raised:
            await stub.list_sessions(request)
        assert raised.value.status.value == INVALID_ARGUMENT


async def test_health_and_reflection_refuse_malformed_requests_the_same_way(
    raw: RawConnection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for path in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        # Field 1 is a string in both requests.
        answer = await raw.call(path, frame(b"\x0a\x02\xff\xfe"))
        assert answer.status == INVALID_ARGUMENT, (path, answer)
    assert all(r.exc_info is None for r in caplog.records)
    assert len(_malformed_warnings(caplog)) == 2


async def test_a_well_formed_request_still_works_over_raw_frames(raw: RawConnection) -> None:
    request = message_class("CreateSessionRequest")(title="fine")
    answer = await raw.call(S + "CreateSession", frame(request.SerializeToString()))
    assert answer.status == 0
    (body,) = answer.messages
    assert chatpb.CreateSessionResponse.parse(body).session is not None


async def test_an_ordinary_client_is_not_affected(stub: chatpb.ChatServiceStub) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest(title="t"))
    async with ChatStream(stub) as stream:
        stream.message(session.session_id, "hello", "r1")
        events = await stream.until_complete("r1")
    assert events[-1].type == T.RESPONSE_COMPLETE


LONG_ID = "x" * 20_000


@pytest.mark.parametrize("method", ["GetSessionInfo", "UpdateSession", "DeleteSession"])
async def test_an_overlong_session_id_is_refused_without_being_sent_back(
    raw: RawConnection, method: str
) -> None:
    request_type = message_class(CHAT_SERVICE.methods_by_name[method].input_type.name)
    body = request_type(session_id=LONG_ID).SerializeToString()
    answer = await raw.call(S + method, frame(body))
    assert answer.status == INVALID_ARGUMENT, answer.status
    assert answer.message.startswith("session_id: "), answer.message[:100]
    _assert_clean(answer.message)
    assert len(answer.data) < 100


@pytest.mark.parametrize(
    "kind",
    [
        chatpb.ChatRequestType.CANCEL,
        chatpb.ChatRequestType.RETRY,
        chatpb.ChatRequestType.TYPING_START,
        chatpb.ChatRequestType.MESSAGE,
    ],
)
async def test_an_overlong_id_on_the_chat_stream_is_refused_without_being_echoed(
    raw: RawConnection, kind: chatpb.ChatRequestType
) -> None:
    stream = await raw.open(S + "Chat")
    request = chatpb.ChatRequest(type=kind, session_id=LONG_ID, request_id=LONG_ID, message="hi")
    await stream.send(frame(bytes(request)), end=True)
    payload = await stream.message()
    event = chatpb.ChatResponse.parse(payload)
    assert (event.type, event.error_code) == (T.ERROR, INVALID_ARGUMENT)
    assert event.error_field == "session_id"
    assert (event.session_id, event.request_id) == ("", "")
    _assert_clean(event.error_message)
    assert len(payload) < 200
    assert (await stream.finished()).status == 0


async def test_an_update_that_changes_nothing_neither_refreshes_nor_notifies(
    stub: chatpb.ChatServiceStub,
) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest(title="A"))
    sid = session.session_id
    async with ChatStream(stub) as watcher:
        # The watcher follows the session (typing makes a stream follow it).
        watcher.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.TYPING_START, session_id=sid))
        watcher.message(sid, "hi", "r1")
        await watcher.until_complete("r1")
        before = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=sid))
        same = await stub.update_session(chatpb.UpdateSessionRequest(session_id=sid, title="A"))
        assert same.last_activity == before.last_activity
        await stub.update_session(chatpb.UpdateSessionRequest(session_id=sid, title="B"))
        update = await watcher.recv()
        # The first update the watcher hears of is the real change.
        assert update.type == T.SESSION_UPDATE
        assert update.session is not None
        assert update.session.title == "B"


async def test_a_number_field_sent_with_another_wire_type_is_ignored_as_protobuf_does(
    raw: RawConnection,
) -> None:
    # Field 1 of ChatRequest is its type (a number); as bytes it is an unknown field to
    # protobuf, so the request is a MESSAGE with no session: refused for that reason.
    stream = await raw.open(S + "Chat")
    await stream.send(frame(b"\x0a\x04\x80\x80\x80\x80"), end=True)
    event = chatpb.ChatResponse.parse(await stream.message())
    assert (event.type, event.error_code, event.error_field) == (
        T.ERROR,
        INVALID_ARGUMENT,
        "session_id",
    )
    assert (await stream.finished()).status == 0


async def test_a_unary_request_left_open_after_its_message_is_refused_in_bounded_time(
    raw: RawConnection, stub: chatpb.ChatServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_receive, "END_OF_REQUEST_WAIT", 0.05)
    stream = await raw.open(S + "CreateSession")
    await stream.send(frame(bytes(chatpb.CreateSessionRequest(title="open"))))
    answer = await stream.finished()
    assert answer.status == INVALID_ARGUMENT, answer
    assert "not ended" in answer.message
    assert (await stub.list_sessions(chatpb.ListSessionsRequest())).total_size == 0

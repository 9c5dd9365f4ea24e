"""The server's fast output path keeps behaviour: batching, corked writes, timestamps, loops."""

from __future__ import annotations

import asyncio
import math
import sys
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from grpclib.client import Channel
from grpclib.events import SendMessage, listen
from hypothesis import given
from hypothesis import strategies as st

import chat.cli.server as cli
import chatpb
from chat import ChatServer, ServerConfig
from chat._clock import WireClock
from chat._proto import EncodedMessage
from chat.context import estimate_tokens
from chat.errors import ConfigurationError
from chat.server import event_loop_factory
from chat.types import format_timestamp, parse_timestamp, utcnow
from tests.helpers import ChatStream, reply_text

T = chatpb.ChatResponseType
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WORDS = " ".join(f"w{i}" for i in range(300))


@given(st.lists(st.integers(0, 253_402_300_799_999_999), min_size=1, max_size=5))
def test_the_wire_clock_writes_what_format_timestamp_writes(moments: list[int]) -> None:
    clock = WireClock()  # one clock over several moments: its cache must never go stale
    for micros in moments:
        expected = format_timestamp(EPOCH + timedelta(microseconds=micros))
        assert clock.format_micros(micros) == expected


def test_the_wire_clock_tells_the_current_time() -> None:
    before = utcnow().replace(microsecond=0)
    now = parse_timestamp(WireClock().now())
    assert before <= now <= utcnow()


async def _long_reply(server: ChatServer) -> list[chatpb.ChatResponse]:
    async with Channel("127.0.0.1", server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, WORDS, "r1")
            stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="p1"))
            return await stream.until_complete("r1")


def _check_reply(events: list[chatpb.ChatResponse]) -> None:
    chunks = [e for e in events if e.type == T.CHUNK]
    assert [e.chunk_number for e in chunks] == list(range(1, len(chunks) + 1))
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert events[-1].total_chunks == len(chunks)
    assert reply_text(events).endswith(WORDS)
    assert all(parse_timestamp(e.timestamp) for e in events)


async def test_a_long_reply_arrives_whole_and_in_order_through_batched_writes(
    server: ChatServer,
) -> None:
    _check_reply(await _long_reply(server))


async def test_a_send_message_listener_sees_every_message(server: ChatServer) -> None:
    # With a listener, messages are sent one by one so that it sees each of them.
    seen: list[bytes] = []

    async def on_send(event: SendMessage) -> None:
        if isinstance(event.message, EncodedMessage):
            seen.append(bytes(event.message))

    listen(server._server, SendMessage, on_send)  # type: ignore[arg-type]
    events = await _long_reply(server)
    _check_reply(events)
    sent = [chatpb.ChatResponse.parse(data) for data in seen]
    assert [e for e in sent if e.request_id == "r1"] == events


def test_event_loop_names() -> None:
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    uvloop = pytest.importorskip("uvloop")
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert event_loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigurationError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


def test_an_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown event loop"):
        ServerConfig(event_loop="trio")


def test_the_cli_runs_the_server_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loops: list[str] = []

    async def fake_serve(config: ServerConfig, **_: object) -> None:
        loops.append(type(asyncio.get_running_loop()).__module__)

    monkeypatch.setattr(cli, "serve", fake_serve)
    for choice in ("asyncio", "auto"):
        result = CliRunner().invoke(cli.main, ["--event-loop", choice])
        assert result.exit_code == 0, result.output
    assert loops[0].startswith("asyncio")
    assert loops[1] == ("uvloop" if "uvloop" in sys.modules else loops[0])


@given(st.text())
def test_the_token_estimate_counts_ascii_characters_as_before(text: str) -> None:
    ascii_chars = sum(1 for c in text if c < "\x80")
    assert estimate_tokens(text) == math.ceil(ascii_chars / 3) + (len(text) - ascii_chars)

"""Structured logs: the context of each record, the two formats, access lines, and a client
that goes away logged at DEBUG."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

import chatpb
from chat import ChatServer, ServerConfig
from chat.auth.tokens import MemoryTokenStore, TokenAuth
from chat.logs import ContextFilter, JsonFormatter, TextFormatter, bound, configure, current
from chat.types import Usage
from tests.backends import FailingBackend, GatedBackend, ScriptedBackend
from tests.helpers import TIMEOUT, ChatStream, channel_with_token, eventually, issue_token
from tests.in_memory import InMemoryConnections


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG and above, with the log context copied onto it."""
    context = ContextFilter()
    caplog.handler.addFilter(context)
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        caplog.handler.removeFilter(context)


def config() -> ServerConfig:
    # Clients that go away cancel their turns (--on-disconnect cancel): their records say so.
    return ServerConfig(
        host="127.0.0.1", port=0, store="memory://", grace_period=0.5, on_disconnect="cancel"
    )


def access(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "chat.access" and r.__dict__["access"]["event"] == event
    ]


def f(record: logging.LogRecord, name: str) -> Any:
    """A field a filter or ``extra=`` put on the record."""
    return record.__dict__[name]


def test_records_carry_the_bound_context_in_both_formats() -> None:
    record = logging.LogRecord("chat.x", logging.WARNING, __file__, 1, "slow: %d", (3,), None)
    with bound(method="Chat", session_id="s-1"):
        with bound(request_id="r-1"):
            assert current().fields() == {
                "method": "Chat",
                "session_id": "s-1",
                "request_id": "r-1",
            }
            ContextFilter().filter(record)
        assert current().request_id == ""
    assert current().fields() == {}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "slow: 3"
    assert line["level"] == "WARNING"
    assert (line["method"], line["session_id"], line["request_id"]) == ("Chat", "s-1", "r-1")
    assert line["time"].endswith("Z")
    assert "turn_id" not in line  # empty fields are left out
    text = TextFormatter().format(record)
    assert text.endswith("chat.x: slow: 3 [method=Chat session_id=s-1 request_id=r-1]")


def test_configure_writes_json_lines() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("info", "json", out)
        with bound(session_id="s-2"):
            logging.getLogger("chat.test").info("hello %s", "there")
        logging.getLogger("chat.test").debug("not at info")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (line,) = out.getvalue().splitlines()
    assert json.loads(line) | {"time": ""} == {
        "time": "",
        "level": "INFO",
        "logger": "chat.test",
        "message": "hello there",
        "session_id": "s-2",
    }
    with pytest.raises(ValueError, match="xml"):
        configure("info", "xml")


async def test_one_access_line_per_unary_call_and_per_turn(
    records: pytest.LogCaptureFixture,
) -> None:
    backend = ScriptedBackend(["Hel", "lo"], usage=Usage(prompt_tokens=4, completion_tokens=2))
    async with (
        ChatServer(config(), backend=backend) as server,
        InMemoryConnections(server).client() as client,
    ):
        session = await client.create_session()
        await client.get_session(session.session_id)
        reply = await client.ask(session.session_id, "hi")
    create, get = access(records, "rpc")[:2]
    assert (f(create, "method"), f(create, "access")["grpc_code"]) == ("CreateSession", "OK")
    assert f(create, "request_id")
    assert (f(get, "method"), f(get, "session_id")) == ("GetSessionInfo", session.session_id)
    assert create.levelno == get.levelno == logging.INFO
    (turn,) = access(records, "turn")
    assert turn.levelno == logging.INFO
    assert (f(turn, "session_id"), f(turn, "request_id")) == (session.session_id, reply.request_id)
    assert reply.turn_id
    assert f(turn, "turn_id") == reply.turn_id
    fields = f(turn, "access")
    assert fields["outcome"] == "success"
    assert fields["finish_reason"] == "stop"
    assert fields["chunks"] == 2
    assert (fields["input_tokens"], fields["output_tokens"]) == (4, 2)
    assert fields["model"] == "scripted-model"
    assert fields["duration_ms"] >= fields["time_to_first_token_ms"] >= 0
    # The stream's own line is at DEBUG: a stream lasts as long as its client.
    streams = [r for r in access(records, "rpc") if f(r, "method") == "Chat"]
    assert [r.levelno for r in streams] == [logging.DEBUG]


async def test_records_during_a_turn_say_which_session_and_request(
    records: pytest.LogCaptureFixture,
) -> None:
    backend = FailingBackend(RuntimeError("a bug in the backend"))
    async with (
        ChatServer(config(), backend=backend) as server,
        InMemoryConnections(server).client() as client,
    ):
        session = await client.create_session()
        stream = client.send(session.session_id, "hi")
        async for _ in stream:
            pass
    (failure,) = [r for r in records.records if r.name == "chat.core" and r.exc_info]
    assert f(failure, "session_id") == session.session_id
    assert f(failure, "request_id") == stream.request_id
    assert f(failure, "method") == "Chat"
    (turn,) = access(records, "turn")
    assert f(turn, "access")["outcome"] == "error"
    assert f(turn, "access")["error_type"] == "BackendError"


async def test_a_client_that_goes_away_is_logged_at_debug(
    records: pytest.LogCaptureFixture,
) -> None:
    backend = GatedBackend()
    async with ChatServer(config(), backend=backend) as server:
        connections = InMemoryConnections(server)
        async with connections.client(reconnect=None) as client:
            session = await client.create_session()
            reply = client.send(session.session_id, "hi")
            await reply.start()
            await asyncio.wait_for(backend.started.wait(), TIMEOUT)
            assert connections.drop() == 1

            async def stream_closed() -> bool:
                return server.core.stats.active_streams == 0

            await eventually(stream_closed, "the server to see the client gone")
            await asyncio.wait_for(backend.closed.wait(), TIMEOUT)
    gone = [r for r in records.records if r.name == "grpclib.server"]
    assert gone, "grpclib logged nothing about the client going away"
    assert {r.levelno for r in gone} == {logging.DEBUG}
    (turn,) = access(records, "turn")
    assert f(turn, "access")["outcome"] == "cancelled"


async def test_at_info_a_client_that_goes_away_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with ChatServer(config()) as server:
        connections = InMemoryConnections(server)
        async with connections.client(reconnect=None) as client:
            await client.create_session()
            connections.drop()

            async def stream_closed() -> bool:
                return server.core.stats.active_streams == 0

            await eventually(stream_closed, "the server to see the client gone")
    assert not [r for r in caplog.records if r.name == "grpclib.server"]


async def test_records_of_an_authenticated_call_name_the_caller(
    records: pytest.LogCaptureFixture,
) -> None:
    tokens = MemoryTokenStore()
    token = await issue_token(tokens, "alice")
    settings = dataclasses.replace(config(), auth="tokens")
    async with ChatServer(settings, authenticator=TokenAuth(tokens)) as server:
        with contextlib.closing(channel_with_token("127.0.0.1", server.port, token)) as channel:
            stub = chatpb.ChatServiceStub(channel, timeout=TIMEOUT)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, "hi", "r1")
                await stream.until_complete("r1")
    (created,) = [r for r in access(records, "rpc") if f(r, "method") == "CreateSession"]
    assert f(created, "identity") == "alice"
    (turn,) = access(records, "turn")
    assert (f(turn, "identity"), f(turn, "request_id")) == ("alice", "r1")

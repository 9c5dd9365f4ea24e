"""Real backends through the service: errors, RETRY, CANCEL, disconnects and the context budget.

A :class:`~chat.server.ChatServer` on 127.0.0.1 runs the OpenAI-compatible backend against
:class:`FakeLLM`, so every layer is real: gRPC stream, core, SDK, HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status

import chatpb
from chat.backends import ModelCheck
from chat.backends.echo import EchoBackend
from chat.backends.openai import OpenAIBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.config import ServerConfig
from chat.context import ContextSettings
from chat.errors import ConfigurationError
from chat.secret import Secret
from chat.server import ChatServer
from tests.fake_llm import FakeLLM, Reply
from tests.helpers import TIMEOUT, ChatStream, reply_text

T = chatpb.ChatResponseType


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with FakeLLM("openai") as server:
        yield server


@pytest.fixture
async def server(fake: FakeLLM) -> AsyncIterator[ChatServer]:
    backend = OpenAIBackend(
        RemoteSettings(
            base_url=fake.base_url,
            api_key=Secret("sk-service-test"),
            default_model="fake-model",
            retry=RetryPolicy(attempts=1),
        )
    )
    # A client going away stops the model (what --on-disconnect cancel does).
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", grace_period=1.0, on_disconnect="cancel"
    )
    async with ChatServer(config, backend=backend) as running:
        yield running


@pytest.fixture
async def stub(server: ChatServer) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with Channel("127.0.0.1", server.port) as channel:
        yield chatpb.ChatServiceStub(channel)


async def new_session(stub: chatpb.ChatServiceStub, **fields: object) -> str:
    created = await stub.create_session(chatpb.CreateSessionRequest(**fields))  # type: ignore[arg-type]
    return created.session_id


async def history(stub: chatpb.ChatServiceStub, session_id: str) -> list[chatpb.ChatMessage]:
    info = await stub.get_session_info(
        chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
    )
    return list(info.messages)


async def failure(stream: ChatStream, request_id: str) -> chatpb.ChatResponse:
    """The ERROR ending ``request_id``, which failed before its first chunk."""
    events = await stream.until_complete(request_id)
    # RESPONSE_START goes out before the model is asked; a failure then ends the reply.
    assert [e.type for e in events] == [T.RESPONSE_START, T.ERROR]
    assert events[-1].finish_reason == chatpb.FinishReason.ERROR
    return events[-1]


def retry(session_id: str, request_id: str) -> chatpb.ChatRequest:
    return chatpb.ChatRequest(
        type=chatpb.ChatRequestType.RETRY, session_id=session_id, request_id=request_id
    )


async def test_a_reply_streams_with_finish_reason_usage_and_model(
    stub: chatpb.ChatServiceStub,
) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "hello", "r1")
        events = await stream.until_complete("r1")
    assert [e.type for e in events] == [T.RESPONSE_START, *[T.CHUNK] * 4, T.RESPONSE_COMPLETE]
    assert reply_text(events) == "Hello, world!"
    complete = events[-1]
    assert complete.finish_reason == chatpb.FinishReason.STOP
    assert complete.usage is not None
    assert (complete.usage.prompt_tokens, complete.usage.completion_tokens) == (11, 4)
    assert complete.model == events[0].model == "fake-model"


async def test_a_failed_turn_keeps_the_message_and_retry_succeeds(
    stub: chatpb.ChatServiceStub, fake: FakeLLM
) -> None:
    fake.replies.append(Reply(status=500))
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "are you there?", "r1")
        error = await failure(stream, "r1")
        assert error.error_code == Status.UNAVAILABLE.value
        assert "HTTP 500" in error.error_message
        failed = await history(stub, session_id)
        assert [(m.role, m.content, m.status) for m in failed] == [
            (chatpb.Role.USER, "are you there?", chatpb.MessageStatus.FAILED)
        ]

        stream.send(retry(session_id, "r2"))
        events = await stream.until_complete("r2")
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert reply_text(events) == "Hello, world!"
    # The model was sent the message once, not the failed copy as well.
    assert [m["content"] for m in fake.generations[-1].body["messages"]] == ["are you there?"]
    after = await history(stub, session_id)
    assert [(m.role, m.status) for m in after[1:]] == [
        (chatpb.Role.USER, chatpb.MessageStatus.COMPLETE),
        (chatpb.Role.ASSISTANT, chatpb.MessageStatus.COMPLETE),
    ]


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        # The server's key, not the caller's: UNAUTHENTICATED would tell the client its
        # own credentials were refused.
        (Reply(status=401), Status.FAILED_PRECONDITION),
        (Reply(status=400), Status.INVALID_ARGUMENT),
        (Reply(status=408), Status.DEADLINE_EXCEEDED),
    ],
)
async def test_upstream_failures_become_error_events_with_their_code(
    stub: chatpb.ChatServiceStub, fake: FakeLLM, reply: Reply, code: Status
) -> None:
    fake.replies.append(reply)
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "hello", "r1")
        error = await failure(stream, "r1")
    assert error.error_code == code.value


async def test_rate_limiting_tells_the_client_when_to_retry(
    stub: chatpb.ChatServiceStub, fake: FakeLLM
) -> None:
    fake.replies.append(Reply(status=429, headers={"Retry-After": "42"}))
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "hello", "r1")
        error = await failure(stream, "r1")
    assert error.error_code == Status.RESOURCE_EXHAUSTED.value
    assert error.retry_after == 42.0


async def test_cancel_closes_the_upstream_stream_and_keeps_the_partial_reply(
    stub: chatpb.ChatServiceStub, fake: FakeLLM
) -> None:
    fake.replies.append(Reply(pieces=("one ", "two ", "three"), hold_after=2))
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "count", "r1")
        events = await stream.until("r1", [T.CHUNK])
        events += await stream.until("r1", [T.CHUNK])
        await asyncio.wait_for(fake.held.wait(), TIMEOUT)
        stream.send(
            chatpb.ChatRequest(
                type=chatpb.ChatRequestType.CANCEL, session_id=session_id, request_id="r1"
            )
        )
        events += await stream.until_complete("r1")
        await asyncio.wait_for(fake.disconnected.wait(), TIMEOUT)
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert events[-1].finish_reason == chatpb.FinishReason.CANCELLED
    stored = await history(stub, session_id)
    assert (stored[-1].content, stored[-1].status) == ("one two ", chatpb.MessageStatus.CANCELLED)


async def test_a_client_going_away_closes_the_upstream_stream(
    server: ChatServer, stub: chatpb.ChatServiceStub, fake: FakeLLM
) -> None:
    fake.replies.append(Reply(pieces=("one ", "two"), hold_after=1))
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.message(session_id, "count", "r1")
        await stream.until("r1", [T.CHUNK])
        await asyncio.wait_for(fake.held.wait(), TIMEOUT)
    # The stream is gone: the server stops the model, and the upstream sees it.
    await asyncio.wait_for(fake.disconnected.wait(), TIMEOUT)
    assert await server.core.wait_idle(TIMEOUT)
    stored = await history(stub, session_id)
    assert (stored[-1].content, stored[-1].status) == ("one ", chatpb.MessageStatus.CANCELLED)


async def test_a_session_model_is_checked_against_the_served_models(
    stub: chatpb.ChatServiceStub, fake: FakeLLM
) -> None:
    with pytest.raises(GRPCError) as raised:
        await new_session(stub, model="no-such-model")
    assert raised.value.status is Status.INVALID_ARGUMENT
    assert "fake-model" in (raised.value.message or "")
    session_id = await new_session(stub, model="llama3.2")
    with pytest.raises(GRPCError):
        await stub.update_session(
            chatpb.UpdateSessionRequest(session_id=session_id, model="no-such-model")
        )
    async with ChatStream(stub) as stream:
        stream.message(session_id, "hello", "r1")
        await stream.until_complete("r1")
    assert fake.generations[-1].body["model"] == "llama3.2"


async def test_a_session_is_created_when_the_model_listing_fails() -> None:
    async with FakeLLM("openai", models_status=503) as fake:
        backend = OpenAIBackend(RemoteSettings(base_url=fake.base_url, api_key=Secret("k")))
        config = ServerConfig(host="127.0.0.1", port=0, store="memory://")
        async with (
            ChatServer(config, backend=backend) as running,
            Channel("127.0.0.1", running.port) as channel,
        ):
            stub = chatpb.ChatServiceStub(channel)
            assert await new_session(stub, model="anything-goes")


# -- the context budget, with the echo backend (it says how many messages it saw) -------


@pytest.fixture
async def small_window() -> AsyncIterator[chatpb.ChatServiceStub]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        context=ContextSettings(context_window=120, reply_reserve=20, use_tokenizers=False),
    )
    async with (
        ChatServer(config, backend=EchoBackend()) as running,
        Channel("127.0.0.1", running.port) as channel,
    ):
        yield chatpb.ChatServiceStub(channel)


async def test_a_long_history_is_truncated_and_the_client_is_told(
    small_window: chatpb.ChatServiceStub,
) -> None:
    stub = small_window
    session_id = await new_session(stub, system_prompt="Be brief.")
    async with ChatStream(stub) as stream:
        omitted = 0
        for turn in range(12):
            request_id = f"r{turn}"
            stream.message(session_id, f"message number {turn} with some words", request_id)
            events = await stream.until_complete(request_id)
            assert events[-1].type == T.RESPONSE_COMPLETE
            start = next(e for e in events if e.type == T.RESPONSE_START)
            statuses = [e for e in events if e.type == T.STATUS]
            if statuses:
                (status,) = statuses
                assert events.index(status) < events.index(start)
                assert status.omitted_messages == start.omitted_messages > 0
                assert f"{status.omitted_messages} older message" in status.status_message
                omitted = start.omitted_messages
            else:
                assert start.omitted_messages == 0
            # The echo backend reports what it received: exactly what the budget kept.
            assert f"({start.context_messages} message" in reply_text(events)
            assert start.context_messages + start.omitted_messages == 2 * turn + 1
    assert omitted > 0


async def test_reject_policy_fails_the_turn_keeps_the_message_and_allows_retry(
    small_window: chatpb.ChatServiceStub,
) -> None:
    stub = small_window
    session_id = await new_session(stub, context_policy=chatpb.ContextPolicy.REJECT)
    async with ChatStream(stub) as stream:
        turn = 0
        while True:
            request_id = f"r{turn}"
            stream.message(session_id, f"message number {turn} with some words", request_id)
            events = await stream.until_complete(request_id)
            if events[-1].type == T.ERROR:
                break
            turn += 1
            assert turn < 20, "the history never outgrew the window"
        error = events[-1]
        assert len(events) == 1
        assert error.error_code == Status.INVALID_ARGUMENT.value
        assert "REJECT" in error.error_message
        stored = await history(stub, session_id)
        assert stored[-1].status == chatpb.MessageStatus.FAILED

        await stub.update_session(
            chatpb.UpdateSessionRequest(
                session_id=session_id, context_policy=chatpb.ContextPolicy.TRUNCATE
            )
        )
        stream.send(retry(session_id, "again"))
        events = await stream.until_complete("again")
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert any(e.type == T.STATUS and e.omitted_messages > 0 for e in events)
    assert f"message number {turn} with some words" in reply_text(events)


# -- which models: --model-check (issue 15, defects 3 and 6) ---------------------------------


def openai_config(fake: FakeLLM, **fields: object) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        backend="openai",
        base_url=fake.base_url,
        grace_period=1.0,
        **fields,  # type: ignore[arg-type]
    )


async def test_a_model_the_upstream_does_not_list_stops_a_strict_server_at_start_up(
    fake: FakeLLM,
) -> None:
    with pytest.raises(ConfigurationError, match=r"--model nope: 'nope' is not served"):
        async with ChatServer(openai_config(fake, model="nope", model_check="strict")):
            pass
    # A served one starts.
    async with ChatServer(openai_config(fake, model="fake-model", model_check="strict")):
        pass


async def test_a_server_that_may_load_models_on_demand_gets_a_warning_not_a_refusal(
    fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """The default for servers other than OpenAI's own: their list may be partial."""
    config = openai_config(fake, model="loaded-on-demand")
    assert config.effective_model_check is ModelCheck.WARN
    with caplog.at_level(logging.WARNING, logger="chat.backends"):
        async with (
            ChatServer(config) as server,
            Channel("127.0.0.1", server.port) as channel,
        ):
            assert any("'loaded-on-demand' is not served" in r.getMessage() for r in caplog.records)
            stub = chatpb.ChatServiceStub(channel)
            # Sessions may name another unlisted model; the upstream has the last word.
            session_id = await new_session(stub, model="another-one")
            async with ChatStream(stub) as stream:
                stream.message(session_id, "hello", "r1")
                events = await stream.until_complete("r1")
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert fake.generations[-1].body["model"] == "another-one"
    warned = [r for r in caplog.records if "'another-one' is not served" in r.getMessage()]
    assert len(warned) == 1


async def test_model_check_off_lists_nothing(fake: FakeLLM) -> None:
    config = openai_config(fake, model="anything", model_check="off")
    async with ChatServer(config) as server, Channel("127.0.0.1", server.port) as channel:
        await new_session(chatpb.ChatServiceStub(channel), model="whatever")
    assert [r for r in fake.requests if r.method == "GET"] == []


async def test_a_listing_that_fails_does_not_stop_the_server() -> None:
    async with FakeLLM("openai", models_status=503) as fake:
        config = openai_config(fake, model="nope", model_check="strict")
        async with ChatServer(config) as server, Channel("127.0.0.1", server.port) as channel:
            await new_session(chatpb.ChatServiceStub(channel), model="also-unchecked")


async def test_a_base_url_without_v1_stops_the_server_with_the_fix(fake: FakeLLM) -> None:
    """Issue 15, defect 7: not a warning followed by 404 on every turn."""
    root = fake.base_url.removesuffix("/v1")
    config = dataclasses.replace(openai_config(fake, model="fake-model"), base_url=root)
    with pytest.raises(ConfigurationError, match=r"add /v1 to --base-url"):
        async with ChatServer(config):
            pass


def test_the_model_check_default_follows_whether_the_list_is_complete() -> None:
    def check(**fields: object) -> ModelCheck:
        return ServerConfig(**fields).effective_model_check  # type: ignore[arg-type]

    assert check(backend="openai", api_key=Secret("k")) is ModelCheck.STRICT
    assert check(backend="openai", base_url="https://api.openai.com/v1") is ModelCheck.STRICT
    assert check(backend="gemini") is ModelCheck.STRICT
    assert check(backend="openai", base_url="http://localhost:11434/v1") is ModelCheck.WARN
    assert check(backend="openai", base_url="http://x/v1", model_check="off") is ModelCheck.OFF
    with pytest.raises(ConfigurationError, match="unknown model check"):
        ServerConfig(model_check="sometimes")

"""Metrics of a server in this process: each counts what the test made the server do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from prometheus_client import generate_latest

import chatpb
from chat import ChatClient, ChatServer, ServerConfig
from chat.auth.tokens import MemoryTokenStore, TokenAuth
from chat.backends import Delta, ModelBackend
from chat.backends.remote import RetryPolicy, retry_before_first_delta
from chat.client import ReplyStatus
from chat.context import ContextSettings
from chat.errors import BackendUnavailable, ChatError, StoreUnavailable
from chat.events import Request
from chat.metrics import MAX_MODELS, OTHER, Metrics
from chat.observe import NO_OBSERVER
from chat.quota import Quotas, Rate
from chat.retention import Retention
from chat.store import SessionStore
from chat.store.memory import MemoryStore
from chat.telemetry import Telemetry, grpc_code_name, provider_name
from chat.types import FinishReason, Message, Session, Usage
from tests.backends import GatedBackend, ScriptedBackend
from tests.fake_llm import FakeLLM, Reply
from tests.helpers import TIMEOUT, eventually
from tests.in_memory import InMemoryConnections


@contextlib.asynccontextmanager
async def metered(
    *,
    model: ModelBackend | None = None,
    store: SessionStore | None = None,
    **config: Any,
) -> AsyncIterator[tuple[ChatServer, ChatClient]]:
    """A server with metrics (its endpoint on a free port) and an in-memory client of it."""
    settings = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        grace_period=0.5,
        metrics_port=0,
        **config,
    )
    async with (
        ChatServer(settings, backend=model, store=store) as server,
        InMemoryConnections(server).client() as client,
    ):
        yield server, client


def sample(server: ChatServer, name: str, **labels: str) -> float:
    """The value of one sample (0 when the series does not exist yet)."""
    assert server.metrics is not None
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def gen_ai(model: str, provider: str = "scripted") -> dict[str, str]:
    return {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": provider,
        "gen_ai_request_model": model,
    }


async def test_turns_are_counted_by_outcome_with_the_genai_histograms() -> None:
    backend = ScriptedBackend(["Hel", "lo", "!"], usage=Usage(prompt_tokens=7, completion_tokens=3))
    async with metered(model=backend) as (server, client):
        session = await client.create_session()
        for text in ("one", "two"):
            reply = await client.ask(session.session_id, text)
            assert reply.text == "Hello!"
        await client.delete_session(session.session_id)
        with pytest.raises(ChatError, match="session"):
            await client.ask(session.session_id, "gone")

        model = "scripted-model"
        labels = gen_ai(model)
        assert sample(
            server, "chat_turns_total", outcome="success", finish_reason="stop",
            gen_ai_request_model=model,
        ) == 2  # fmt: skip
        # The failed turn never reached a model: no model label.
        assert sample(
            server, "chat_turns_total", outcome="error", finish_reason="error",
            gen_ai_request_model="",
        ) == 1  # fmt: skip
        assert sample(server, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 2
        assert sample(server, "gen_ai_server_time_per_output_token_seconds_count", **labels) == 2
        assert sample(
            server, "gen_ai_server_request_duration_seconds_count", **labels, error_type=""
        ) == 2  # fmt: skip
        assert sample(
            server, "gen_ai_server_request_duration_seconds_count",
            **gen_ai(""), error_type="SessionNotFound",
        ) == 1  # fmt: skip
        # As a client of the model provider: what the backend reported, per call.
        for kind, tokens in (("input", 7), ("output", 3)):
            assert sample(
                server, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type=kind
            ) == 2 * tokens  # fmt: skip
            assert sample(
                server, "gen_ai_client_token_usage_count", **labels, gen_ai_token_type=kind
            ) == 2  # fmt: skip
        assert sample(
            server, "gen_ai_client_operation_duration_seconds_count", **labels, error_type=""
        ) == 2  # fmt: skip
        # Each turn stored once; chunks counted as they left.
        assert sample(
            server, "chat_store_operation_duration_seconds_count", store="memory",
            operation="append",
        ) == 2  # fmt: skip
        assert sample(server, "chat_chunks_sent_total") == 6
        grpc = {"grpc_type": "unary", "grpc_service": "ChatService"}
        assert sample(
            server, "grpc_server_handled_total", **grpc, grpc_method="CreateSession",
            grpc_code="OK",
        ) == 1  # fmt: skip
        assert sample(server, "grpc_server_started_total", **grpc, grpc_method="DeleteSession") == 1
        assert (
            sample(server, "grpc_server_msg_sent_total", **grpc, grpc_method="CreateSession") == 1
        )
        chat = {"grpc_type": "bidi_stream", "grpc_service": "ChatService", "grpc_method": "Chat"}
        # The client's stream is still open: started, not handled; its messages counted so far
        # (the client's connection PING and three MESSAGEs).
        assert sample(server, "grpc_server_started_total", **chat) == 1
        assert sample(server, "grpc_server_handled_total", **chat, grpc_code="OK") == 0
        assert sample(server, "grpc_server_msg_received_total", **chat) == 4
        assert sample(server, "chat_streams_open") == 1


async def test_unary_statuses_and_stream_ends_are_handled_codes() -> None:
    async with metered() as (server, client):
        with pytest.raises(ChatError, match="no-such"):
            await client.get_session("no-such")
        await client.disconnect()
        chat = {"grpc_type": "bidi_stream", "grpc_service": "ChatService", "grpc_method": "Chat"}

        async def stream_ended() -> bool:
            return sample(server, "grpc_server_handled_total", **chat, grpc_code="Canceled") == 1

        # The client left its stream by resetting it: the client's doing, "Canceled".
        await eventually(stream_ended, "the stream's end to be counted")
        assert sample(
            server, "grpc_server_handled_total", grpc_type="unary", grpc_service="ChatService",
            grpc_method="GetSessionInfo", grpc_code="NotFound",
        ) == 1  # fmt: skip
        assert sample(server, "grpc_server_handling_seconds_count", **chat) == 1
        assert sample(server, "chat_streams_open") == 0


async def test_cancelled_turns_and_live_gauges() -> None:
    backend = GatedBackend()
    async with metered(model=backend) as (server, client):
        session = await client.create_session()
        first = client.send(session.session_id, "first")
        second = client.send(session.session_id, "second, queued behind it")
        await first.start()
        await second.start()
        await asyncio.wait_for(backend.started.wait(), TIMEOUT)
        backend.release("partial ")
        assert sample(server, "chat_replies_in_flight") == 1
        assert sample(server, "chat_replies_queued") == 1
        await client.cancel(session_id=session.session_id)
        for reply in (first, second):
            assert (await reply.collect()).finish_reason is FinishReason.CANCELLED
        for model in ("gated-model", ""):  # running, and queued (never reached a model)
            assert sample(
                server, "chat_turns_total", outcome="cancelled", finish_reason="cancelled",
                gen_ai_request_model=model,
            ) == 1  # fmt: skip
        assert sample(server, "chat_replies_in_flight") == 0
        assert sample(server, "chat_replies_queued") == 0
        # A cancelled reply is not a successful one: no time to first token for it.
        labels = gen_ai("gated-model", "gated")
        assert sample(server, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 0


async def test_context_omissions_are_counted_as_the_status_event_says() -> None:
    async with metered(context=ContextSettings(context_window=64, reply_reserve=0)) as (
        server,
        client,
    ):
        session = await client.create_session()
        omitted = 0
        for n in range(6):
            async for event in client.send(session.session_id, f"message {n} " + "words " * 8):
                if isinstance(event, ReplyStatus):
                    omitted += event.omitted_messages
        assert omitted > 0
        assert sample(server, "chat_context_omitted_messages_total") == omitted
        truncated = sample(server, "chat_context_truncated_turns_total")
        assert 0 < truncated <= 6


async def test_retention_deletions_are_counted() -> None:
    async with metered(retention=Retention(max_sessions=1)) as (server, client):
        for _ in range(3):
            await client.create_session()
        assert sample(server, "chat_retention_deleted_sessions_total", reason="evicted") == 2
        assert sample(server, "chat_retention_deleted_sessions_total", reason="expired") == 0


class FlakyStore(MemoryStore):
    """Cannot store the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_appends = 1

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        if self.fail_appends:
            self.fail_appends -= 1
            raise StoreUnavailable("the store is down")
        return await super().append(session_id, messages)


async def test_store_failures_are_counted_and_not_found_is_not_one() -> None:
    async with metered(store=FlakyStore()) as (server, client):
        session = await client.create_session()
        with pytest.raises(ChatError, match="down"):
            await client.ask(session.session_id, "lost")
        await client.ask(session.session_id, "kept")
        with pytest.raises(ChatError, match="nope"):
            await client.get_session("nope")
        assert sample(
            server, "chat_store_errors_total", store="memory", operation="append",
            error_type="StoreUnavailable",
        ) == 1  # fmt: skip
        assert sample(
            server, "chat_store_errors_total", store="memory", operation="get",
            error_type="SessionNotFound",
        ) == 0  # fmt: skip
        assert sample(
            server, "chat_store_operation_duration_seconds_count", store="memory",
            operation="append",
        ) == 2  # fmt: skip


async def test_backend_errors_and_retries_by_class_and_status() -> None:
    async with FakeLLM("openai") as fake:
        fake.replies.extend([Reply(status=503), Reply(), Reply(status=400)])
        async with metered(backend="openai", base_url=fake.base_url, retries=1) as (
            server,
            client,
        ):
            session = await client.create_session(model="fake-model")
            assert (await client.ask(session.session_id, "after one retry")).text == "Hello, world!"
            with pytest.raises(ChatError, match="HTTP 400"):
                await client.ask(session.session_id, "refused")
            provider = {"gen_ai_provider_name": "openai"}
            assert sample(
                server, "chat_backend_retries_total", **provider, error_type="BackendUnavailable"
            ) == 1  # fmt: skip
            assert sample(
                server, "chat_backend_errors_total", **provider, error_type="BackendBadRequest",
                grpc_code="InvalidArgument",
            ) == 1  # fmt: skip
            labels = gen_ai("fake-model", "openai")
            assert sample(
                server, "gen_ai_client_operation_duration_seconds_count", **labels,
                error_type="BackendBadRequest",
            ) == 1  # fmt: skip
            assert sample(
                server, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input"
            ) == 11  # fmt: skip


async def test_retries_are_reported_before_they_happen() -> None:
    attempts = 0
    seen: list[str] = []

    async def start() -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise BackendUnavailable("down")
        yield Delta("after the retry")

    async def no_sleep(_: float) -> None:
        return None

    deltas = retry_before_first_delta(
        start,
        RetryPolicy(attempts=2),
        what="test",
        sleep=no_sleep,
        on_retry=lambda error: seen.append(type(error).__name__),
    )
    assert [d.text async for d in deltas] == ["after the retry"]
    assert seen == ["BackendUnavailable"]


async def test_labels_carry_no_ids_and_model_names_are_bounded() -> None:
    async with metered() as (server, client):
        session = await client.create_session()
        await client.ask(session.session_id, "hello")
        assert server.metrics is not None
        text = generate_latest(server.metrics.registry).decode()
        assert "chat_turns_total" in text
        assert session.session_id not in text
    metrics = Metrics()
    names = [metrics.model(f"model-{n}") for n in range(MAX_MODELS + 5)]
    assert names[:MAX_MODELS] == [f"model-{n}" for n in range(MAX_MODELS)]
    assert set(names[MAX_MODELS:]) == {OTHER}
    assert metrics.model("model-0") == "model-0"


def test_names_follow_the_conventions() -> None:
    assert grpc_code_name(0) == "OK"
    assert grpc_code_name(1) == "Canceled"
    assert grpc_code_name(3) == "InvalidArgument"
    assert grpc_code_name(16) == "Unauthenticated"
    assert provider_name("openai") == "openai"
    assert provider_name("gemini") == "gcp.gemini"


async def test_the_default_observer_and_an_idle_telemetry_do_nothing() -> None:
    observation = NO_OBSERVER.turn(Request(session_id="s"), received=0.0)
    with observation.running():
        observation.started("m", 0)
        observation.finished(FinishReason.STOP, None, chunks=0)
    telemetry = Telemetry()
    assert not telemetry.active
    store = MemoryStore()
    assert telemetry.wrap_store(store) is store
    telemetry.watchers_changed(1)
    telemetry.rate_limited("messages")
    telemetry.replay_evicted(3)


def test_features_built_alongside_report_through_the_observer() -> None:
    metrics = Metrics()
    telemetry = Telemetry(metrics=metrics)
    telemetry.watchers_changed(2)
    telemetry.watchers_changed(-1)
    telemetry.rate_limited("messages")
    telemetry.replay_evicted(3)
    registry = metrics.registry
    assert registry.get_sample_value("chat_watchers") == 1
    assert registry.get_sample_value("chat_rate_limited_total", {"scope": "messages"}) == 1
    assert registry.get_sample_value("chat_replay_evicted_events_total") == 3


async def test_quota_refusals_are_counted_by_limit() -> None:
    quotas = Quotas(messages=Rate.parse("1/1h"), max_sessions=1)
    async with metered(quotas=quotas) as (server, client):
        session = await client.create_session()
        with pytest.raises(ChatError, match="max-sessions"):
            await client.create_session()
        await client.ask(session.session_id, "the one allowed")
        with pytest.raises(ChatError, match="rate-limit-messages"):
            await client.ask(session.session_id, "one too many")
        for scope in ("max-sessions-per-identity", "rate-limit-messages"):
            assert sample(server, "chat_rate_limited_total", scope=scope) == 1
        assert sample(
            server, "grpc_server_handled_total", grpc_type="unary", grpc_service="ChatService",
            grpc_method="CreateSession", grpc_code="ResourceExhausted",
        ) == 1  # fmt: skip


async def test_calls_refused_by_authentication_are_counted() -> None:
    settings = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", auth="tokens", metrics_port=0
    )
    async with ChatServer(settings, authenticator=TokenAuth(MemoryTokenStore())) as server:
        async with Channel("127.0.0.1", server.port) as channel:
            with pytest.raises(GRPCError, match="token"):
                await chatpb.ChatServiceStub(channel).create_session(chatpb.CreateSessionRequest())
        unary = {"grpc_type": "unary", "grpc_service": "ChatService"}

        async def refused() -> bool:
            return sample(
                server, "grpc_server_handled_total", **unary, grpc_method="CreateSession",
                grpc_code="Unauthenticated",
            ) == 1  # fmt: skip

        await eventually(refused, "the refused call to be counted")
        assert (
            sample(server, "grpc_server_started_total", **unary, grpc_method="CreateSession") == 1
        )

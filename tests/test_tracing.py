"""Traces, recorded with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from grpclib.client import Channel
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

import chatpb
from chat import ChatClient, ChatServer, ServerConfig
from chat.backends import ModelBackend
from chat.errors import BackendUnavailable, ChatError, ConfigurationError
from chat.tracing import tracer_provider_from_environment
from tests.backends import FailingBackend, ScriptedBackend
from tests.fake_llm import FakeLLM, Reply
from tests.in_memory import InMemoryConnections


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


@contextlib.asynccontextmanager
async def traced(
    exporter: InMemorySpanExporter, in_process: ModelBackend | None = None, **settings: Any
) -> AsyncIterator[tuple[ChatServer, ChatClient]]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", grace_period=0.5, **settings)
    try:
        async with (
            ChatServer(config, backend=in_process, tracer_provider=provider) as server,
            InMemoryConnections(server).client() as client,
        ):
            yield server, client
    finally:
        provider.shutdown()


def by_name(
    spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind = SpanKind.SERVER
) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and s.kind is kind]


async def test_a_turn_is_a_genai_span_with_the_model_call_as_its_child(
    exporter: InMemorySpanExporter,
) -> None:
    async with (
        FakeLLM("openai") as fake,
        traced(exporter, backend="openai", base_url=fake.base_url, model="fake-model") as (
            _,
            client,
        ),
    ):
        session = await client.create_session(model="fake-model")
        await client.ask(session.session_id, "hello")
        await client.disconnect()
        fake_port = fake.port
    spans = exporter.get_finished_spans()
    (turn,) = by_name(spans, "chat fake-model", SpanKind.INTERNAL)
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    (stream,) = by_name(spans, "ChatService/Chat")
    (create,) = by_name(spans, "ChatService/CreateSession")
    attributes = dict(turn.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.conversation.id"] == session.session_id
    assert attributes["gen_ai.request.model"] == "fake-model"
    assert attributes["gen_ai.provider.name"] == "openai"
    # What the fake model server reported.
    assert attributes["gen_ai.usage.input_tokens"] == 11
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    # The stream's span is the turn's parent, and the turn the model call's.
    assert turn.parent is not None
    assert turn.parent.span_id == stream.context.span_id
    assert call.parent is not None
    assert call.parent.span_id == turn.context.span_id
    assert call.name == "chat fake-model"
    call_attributes = dict(call.attributes or {})
    assert call_attributes["gen_ai.request.model"] == "fake-model"
    assert (call_attributes["server.address"], call_attributes["server.port"]) == (
        "127.0.0.1",
        fake_port,
    )
    assert stream.kind is SpanKind.SERVER
    assert dict(stream.attributes or {})["rpc.grpc.status_code"] == 1  # the client left
    assert dict(create.attributes or {})["rpc.method"] == "CreateSession"
    assert dict(create.attributes or {})["rpc.grpc.status_code"] == 0
    # Without a caller's context, each call starts a trace of its own.
    assert create.parent is None
    assert stream.parent is None


async def test_the_callers_trace_is_continued_by_calls_and_turns(
    exporter: InMemorySpanExporter,
) -> None:
    # The application's own tracing (another provider: the client uses the global API).
    app = TracerProvider()
    app_spans = InMemorySpanExporter()
    app.add_span_processor(SimpleSpanProcessor(app_spans))
    tracer = app.get_tracer("app")
    async with traced(exporter, ScriptedBackend(["ok"])) as (_, client):
        with tracer.start_as_current_span("handle a user request") as parent:
            session = await client.create_session()
            await client.ask(session.session_id, "hello")
    app.shutdown()
    context = parent.get_span_context()
    spans = exporter.get_finished_spans()
    (create,) = by_name(spans, "ChatService/CreateSession")
    (turn,) = by_name(spans, "chat scripted-model", SpanKind.INTERNAL)
    for span in (create, turn):
        assert span.context.trace_id == context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == context.span_id


async def test_a_traceparent_sent_as_metadata_is_continued(
    exporter: InMemorySpanExporter,
) -> None:
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{format_trace_id(trace_id)}-{format_span_id(span_id)}-01"
    async with (
        traced(exporter, ScriptedBackend(["ok"])) as (server, _),
        Channel("127.0.0.1", server.port) as channel,
    ):
        stub = chatpb.ChatServiceStub(channel, metadata={"traceparent": traceparent})
        await stub.create_session(chatpb.CreateSessionRequest())
    (create,) = by_name(exporter.get_finished_spans(), "ChatService/CreateSession")
    assert create.context.trace_id == trace_id
    assert create.parent is not None
    assert create.parent.span_id == span_id


async def test_a_failed_model_call_marks_both_spans_failed(exporter: InMemorySpanExporter) -> None:
    async with (
        FakeLLM("openai") as fake,
        traced(
            exporter, backend="openai", base_url=fake.base_url, retries=0, model="fake-model"
        ) as (_, client),
    ):
        fake.replies.append(Reply(status=503))
        session = await client.create_session(model="fake-model")
        with pytest.raises(ChatError, match="503"):
            await client.ask(session.session_id, "hello")
    spans = exporter.get_finished_spans()
    (turn,) = by_name(spans, "chat fake-model", SpanKind.INTERNAL)
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    for span in (turn, call):
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "BackendUnavailable"


async def test_a_backend_in_the_process_makes_no_call_span(
    exporter: InMemorySpanExporter,
) -> None:
    backend = FailingBackend(BackendUnavailable("the model is down"))
    async with traced(exporter, backend) as (_, client):
        session = await client.create_session()
        with pytest.raises(ChatError, match="down"):
            await client.ask(session.session_id, "hello")
    spans = exporter.get_finished_spans()
    (turn,) = by_name(spans, "chat failing-model", SpanKind.INTERNAL)
    assert turn.status.status_code is StatusCode.ERROR
    assert not [s for s in spans if s.kind is SpanKind.CLIENT]


def test_the_provider_follows_the_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chat-eu-1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = tracer_provider_from_environment()
    try:
        assert provider.resource.attributes["service.name"] == "chat-eu-1"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigurationError, match="zipkin"):
        tracer_provider_from_environment()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigurationError, match="http/protobuf"):
        tracer_provider_from_environment()

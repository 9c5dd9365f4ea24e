"""The OpenAI-compatible backend against a local server speaking OpenAI's streaming format."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from chat.backends.openai import OpenAIBackend, reply_limit_field
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.errors import (
    BackendBadRequest,
    BackendError,
    BackendRateLimited,
    BackendUnavailable,
    ConfigurationError,
)
from chat.secret import Secret
from chat.types import FinishReason, Usage
from tests.backends import REQUEST, collect
from tests.fake_llm import FakeLLM, Reply, openai_error

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with FakeLLM("openai") as server:
        yield server


def backend_for(fake: FakeLLM, *, key: str | None = KEY, attempts: int = 1) -> OpenAIBackend:
    return OpenAIBackend(
        RemoteSettings(
            base_url=fake.base_url,
            api_key=Secret(key) if key is not None else None,
            retry=RetryPolicy(attempts=attempts, initial_backoff=0.001, max_backoff=0.002),
        )
    )


@pytest.fixture
async def backend(fake: FakeLLM) -> AsyncIterator[OpenAIBackend]:
    subject = backend_for(fake)
    yield subject
    await subject.aclose()


async def test_the_request_carries_the_conversation_and_asks_for_usage(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    await collect(backend.generate(REQUEST))
    (request,) = fake.generations
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "fake-model"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How are you?"},
    ]


async def test_the_reply_limit_is_sent_as_max_tokens_to_compatible_servers(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    await collect(backend.generate(dataclasses.replace(REQUEST, max_output_tokens=50)))
    await collect(backend.generate(REQUEST))
    limited, unlimited = (r.body for r in fake.generations)
    assert limited["max_tokens"] == 50
    assert "max_completion_tokens" not in limited
    assert "max_tokens" not in unlimited
    assert "max_completion_tokens" not in unlimited


@pytest.mark.parametrize(
    ("base_url", "field"),
    [
        ("https://api.openai.com/v1", "max_completion_tokens"),
        ("https://my-deployment.openai.azure.com/openai/v1", "max_completion_tokens"),
        ("http://localhost:11434/v1", "max_tokens"),
        ("http://127.0.0.1:8000/v1", "max_tokens"),
    ],
)
def test_openai_itself_gets_max_completion_tokens(base_url: str, field: str) -> None:
    # OpenAI's reasoning models refuse max_tokens; other servers may ignore the newer field.
    assert reply_limit_field(base_url) == field


async def test_each_event_is_forwarded_as_one_delta(fake: FakeLLM, backend: OpenAIBackend) -> None:
    fake.replies.append(Reply(pieces=("a", "b", "c"), usage=(7, 3)))
    deltas = await collect(backend.generate(REQUEST))
    assert [d.text for d in deltas] == ["a", "b", "c", ""]
    assert deltas[-1].usage == Usage(prompt_tokens=7, completion_tokens=3)


async def test_finish_reason_length_is_passed_through(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    fake.replies.append(Reply(finish="length"))
    deltas = await collect(backend.generate(REQUEST))
    assert deltas[-1].finish_reason is FinishReason.LENGTH


async def test_other_finish_reasons_are_reported_as_stop(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    fake.replies.append(Reply(finish="content_filter"))
    deltas = await collect(backend.generate(REQUEST))
    assert deltas[-1].finish_reason is FinishReason.STOP


async def test_a_server_that_reports_no_usage_gives_none(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    fake.replies.append(Reply(usage=None))
    deltas = await collect(backend.generate(REQUEST))
    assert deltas[-1].usage is None
    assert deltas[-1].finish_reason is FinishReason.STOP


async def test_local_servers_need_no_key(fake: FakeLLM) -> None:
    backend = backend_for(fake, key=None)
    try:
        deltas = await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert "".join(d.text for d in deltas) == "Hello, world!"
    assert fake.generations[0].headers["authorization"] == "Bearer no-key-configured"


def test_openai_itself_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        OpenAIBackend(RemoteSettings())


async def test_rate_limit_carries_the_upstream_retry_after(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    fake.replies.append(Reply(status=429, headers={"Retry-After": "30"}))
    with pytest.raises(BackendRateLimited) as raised:
        await collect(backend.generate(REQUEST))
    assert raised.value.retry_after == 30.0
    assert "retry in 30s" in str(raised.value)


async def test_transient_failures_before_the_first_token_are_retried(fake: FakeLLM) -> None:
    fake.replies.extend(
        [Reply(status=503), Reply(status=429, headers={"Retry-After": "0"}), Reply()]
    )
    backend = backend_for(fake, attempts=3)
    try:
        deltas = await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert "".join(d.text for d in deltas) == "Hello, world!"
    assert len(fake.generations) == 3


async def test_retries_are_bounded(fake: FakeLLM) -> None:
    fake.replies.extend([Reply(status=502)] * 5)
    backend = backend_for(fake, attempts=3)
    try:
        with pytest.raises(BackendUnavailable, match="HTTP 502"):
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert len(fake.generations) == 3


async def test_a_long_retry_after_is_not_waited_for(fake: FakeLLM) -> None:
    fake.replies.extend([Reply(status=429, headers={"Retry-After": "3600"}), Reply()])
    backend = backend_for(fake, attempts=3)
    try:
        with pytest.raises(BackendRateLimited) as raised:
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert raised.value.retry_after == 3600.0
    assert len(fake.generations) == 1


async def test_bad_requests_are_not_retried_and_quote_the_upstream(fake: FakeLLM) -> None:
    message = "This model's maximum context length is 8192 tokens."
    fake.replies.append(Reply(status=400, error_body=openai_error(message)))
    backend = backend_for(fake, attempts=3)
    try:
        with pytest.raises(BackendBadRequest, match="maximum context length is 8192") as raised:
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert len(fake.generations) == 1
    assert "'fake-model'" in str(raised.value)


@pytest.mark.parametrize(
    ("status", "body", "quoted"),
    [
        # transformers serve, pinned to one model (FastAPI's HTTPException).
        (400, {"detail": "Server is pinned to 'a'; requested 'b'."}, "Server is pinned to 'a'"),
        (404, {"detail": "Not Found"}, "Not Found"),
        # FastAPI's request validation.
        (
            422,
            {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]},
            "messages: Field required",
        ),
        (503, {"error": "the batching worker died"}, "the batching worker died"),
        (500, "Internal Server Error", "Internal Server Error"),
    ],
)
async def test_upstream_error_text_in_other_shapes_is_quoted(
    fake: FakeLLM, backend: OpenAIBackend, status: int, body: object, quoted: str
) -> None:
    """Issue 15, defect 2: not just OpenAI's {"error": {"message": ...}}."""
    fake.replies.append(Reply(status=status, error_body=body))
    with pytest.raises(BackendError) as raised:
        await collect(backend.generate(REQUEST))
    assert quoted in str(raised.value)
    assert f"HTTP {status}" in str(raised.value)


async def test_an_html_error_page_is_not_quoted(fake: FakeLLM, backend: OpenAIBackend) -> None:
    fake.replies.append(Reply(status=502, error_body="<html><body>Bad Gateway</body></html>"))
    with pytest.raises(BackendUnavailable) as raised:
        await collect(backend.generate(REQUEST))
    assert str(raised.value).endswith("failed (HTTP 502); try again later")


async def test_a_plain_error_event_inside_the_stream_is_quoted(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    # transformers serve streams {"error": "..."} when generation fails mid-reply.
    fake.replies.append(Reply(pieces=("partial",), stream_error_body={"error": "out of memory"}))
    with pytest.raises(BackendError, match="out of memory"):
        await collect(backend.generate(REQUEST))


async def test_an_error_event_inside_the_stream_is_a_backend_error(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    fake.replies.append(Reply(pieces=("partial",), stream_error="overloaded mid-reply"))
    received: list[str] = []
    with pytest.raises(BackendError, match="overloaded mid-reply"):
        await collect(backend.generate(REQUEST), into=received)
    assert received == ["partial"]


async def test_models_are_listed_once_with_ollama_aliases(
    fake: FakeLLM, backend: OpenAIBackend
) -> None:
    first = await backend.list_models()
    second = await backend.list_models()
    assert first == second
    assert first is not None
    assert {"fake-model", "llama3.2", "llama3.2:latest"} <= set(first)
    assert sum(1 for r in fake.requests if r.method == "GET") == 1


async def test_a_failing_model_listing_means_cannot_tell() -> None:
    async with FakeLLM("openai", models_status=500) as fake:
        backend = backend_for(fake)
        try:
            assert await backend.list_models() is None
            # The failure is remembered for a while: no request per session created.
            assert await backend.list_models() is None
        finally:
            await backend.aclose()
        assert sum(1 for r in fake.requests if r.method == "GET") == 1

"""The Gemini backend against a local server speaking Gemini's streamed (SSE) responses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chat.backends import GenerationRequest, PromptMessage
from chat.backends.gemini import GeminiBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.errors import (
    BackendAuthError,
    BackendBadRequest,
    BackendRateLimited,
    ConfigurationError,
)
from chat.secret import Secret
from chat.types import FinishReason, Role, Usage
from tests.backends import REQUEST, collect
from tests.fake_llm import FakeLLM, Reply, gemini_error

KEY = "AIza-test-0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with FakeLLM("gemini", models=("gemini-2.0-flash", "gemini-2.5-pro")) as server:
        yield server


def backend_for(fake: FakeLLM, *, attempts: int = 1) -> GeminiBackend:
    return GeminiBackend(
        RemoteSettings(
            base_url=fake.base_url,
            api_key=Secret(KEY),
            retry=RetryPolicy(attempts=attempts, initial_backoff=0.001, max_backoff=0.002),
        )
    )


@pytest.fixture
async def backend(fake: FakeLLM) -> AsyncIterator[GeminiBackend]:
    subject = backend_for(fake)
    yield subject
    await subject.aclose()


async def test_the_system_prompt_is_the_system_instruction_and_roles_are_mapped(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    await collect(backend.generate(REQUEST))
    (request,) = fake.generations
    assert request.path.endswith("/models/fake-model:streamGenerateContent?alt=sse")
    assert request.headers["x-goog-api-key"] == KEY
    assert request.body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert request.body["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "Hello."}]},
        {"role": "user", "parts": [{"text": "How are you?"}]},
    ]


async def test_consecutive_messages_of_one_role_become_one_turn(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    request = GenerationRequest(
        "gemini-2.0-flash",
        [PromptMessage(Role.USER, "first"), PromptMessage(Role.USER, "second")],
    )
    await collect(backend.generate(request))
    assert "systemInstruction" not in fake.generations[0].body
    assert fake.generations[0].body["contents"] == [
        {"role": "user", "parts": [{"text": "first"}, {"text": "second"}]}
    ]


async def test_usage_and_max_tokens_are_passed_through(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    fake.replies.append(Reply(pieces=("x", "y"), finish="length", usage=(9, 2)))
    deltas = await collect(backend.generate(REQUEST))
    assert [d.text for d in deltas] == ["x", "y", ""]
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].usage == Usage(prompt_tokens=9, completion_tokens=2)


async def test_an_invalid_key_is_an_auth_error_though_gemini_says_400(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    body = gemini_error(
        400,
        "INVALID_ARGUMENT",
        f"API key not valid: {KEY}",
        [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
    )
    fake.replies.append(Reply(status=400, error_body=body))
    with pytest.raises(BackendAuthError) as raised:
        await collect(backend.generate(REQUEST))
    assert KEY not in str(raised.value)
    assert "GEMINI_API_KEY" in str(raised.value)


async def test_rate_limit_takes_the_retry_delay_from_retry_info(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    body = gemini_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded",
        [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}],
    )
    fake.replies.append(Reply(status=429, error_body=body))
    with pytest.raises(BackendRateLimited) as raised:
        await collect(backend.generate(REQUEST))
    assert raised.value.retry_after == 17.0


async def test_rate_limit_falls_back_to_the_retry_after_header(
    fake: FakeLLM, backend: GeminiBackend
) -> None:
    fake.replies.append(Reply(status=429, headers={"Retry-After": "12"}))
    with pytest.raises(BackendRateLimited) as raised:
        await collect(backend.generate(REQUEST))
    assert raised.value.retry_after == 12.0


async def test_transient_failures_before_the_first_token_are_retried(fake: FakeLLM) -> None:
    fake.replies.extend([Reply(status=500), Reply(status=503), Reply()])
    backend = backend_for(fake, attempts=3)
    try:
        deltas = await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert "".join(d.text for d in deltas) == "Hello, world!"
    assert len(fake.generations) == 3


async def test_a_blocked_prompt_is_a_bad_request(fake: FakeLLM, backend: GeminiBackend) -> None:
    fake.replies.append(Reply(blocked="SAFETY"))
    with pytest.raises(BackendBadRequest, match="blocked: SAFETY"):
        await collect(backend.generate(REQUEST))


async def test_models_are_listed_without_the_models_prefix(backend: GeminiBackend) -> None:
    models = await backend.list_models()
    assert models is not None
    assert {"gemini-2.0-flash", "gemini-2.5-pro"} <= set(models)


def test_gemini_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match="GEMINI_API_KEY"):
        GeminiBackend(RemoteSettings())


async def test_the_default_model_is_gemini_2_0_flash(backend: GeminiBackend) -> None:
    assert backend.default_model == "gemini-2.0-flash"

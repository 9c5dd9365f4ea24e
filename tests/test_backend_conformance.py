"""The ModelBackend conformance suite: every backend streams, stops and fails the same way.

echo runs in process; openai and gemini run their real SDKs against :class:`FakeLLM` on
127.0.0.1, so "stops" is observed where it matters: the upstream sees the connection close.
``transformers`` runs the openai backend against a real OpenAI-compatible server
(``transformers serve``, see tests/upstream.py); it is marked ``upstream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from chat.backends import GenerationRequest, ModelBackend
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend, echo_reply
from chat.backends.gemini import GeminiBackend
from chat.backends.openai import OpenAIBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.errors import (
    BackendAuthError,
    BackendBadRequest,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
)
from chat.secret import Secret
from chat.types import FinishReason
from tests.backends import REQUEST, collect
from tests.fake_llm import FakeLLM, Provider, Reply
from tests.helpers import TIMEOUT
from tests.upstream import CHAT_REPLY, Relay, Upstream


def remote_backend(
    provider: Provider, base_url: str, *, attempts: int = 1, read_timeout: float = 30.0
) -> ModelBackend:
    settings = RemoteSettings(
        base_url=base_url,
        api_key=Secret("test-key"),
        connect_timeout=5.0,
        read_timeout=read_timeout,
        retry=RetryPolicy(attempts=attempts, initial_backoff=0.001, max_backoff=0.002),
    )
    return OpenAIBackend(settings) if provider == "openai" else GeminiBackend(settings)


@dataclass
class Subject:
    """A backend under test, what it is asked and answers, and how to make it hold a reply."""

    backend: ModelBackend
    request: GenerationRequest
    expected: str
    #: A backend and a request whose reply goes on after its first delta until stopped.
    hold: Callable[[], tuple[ModelBackend, GenerationRequest]]
    #: Waits until the upstream saw the held generation stop (nothing to see for echo).
    upstream_closed: Callable[[], Awaitable[None]]


async def nothing_to_see() -> None:
    return None


@pytest.fixture(
    params=[
        "echo",
        "echo-coalesced",
        "openai",
        "gemini",
        pytest.param("transformers", marks=pytest.mark.upstream),
    ]
)
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    kind: str = request.param
    if kind.startswith("echo"):
        backends: list[ModelBackend] = []

        def slow() -> tuple[ModelBackend, GenerationRequest]:
            # An hour between words: only cancellation ends it.
            backends.append(EchoBackend(pace=3600))
            return backends[-1], REQUEST

        backend: ModelBackend = EchoBackend()
        if kind == "echo-coalesced":
            # Words 20 ms apart, window 5 ms: paced deltas still leave one by one.
            backend = CoalescingBackend(EchoBackend(pace=0.02), window=0.005)
        yield Subject(backend, REQUEST, echo_reply(REQUEST), slow, nothing_to_see)
        await backend.aclose()
        return
    if kind == "transformers":
        async for real in real_subject(request.getfixturevalue("upstream")):
            yield real
        return
    provider: Provider = "openai" if kind == "openai" else "gemini"
    async with FakeLLM(provider) as fake:
        remote = remote_backend(provider, fake.base_url)

        def held() -> tuple[ModelBackend, GenerationRequest]:
            fake.replies.append(Reply(hold_after=1))
            return remote, REQUEST

        async def disconnected() -> None:
            await asyncio.wait_for(fake.disconnected.wait(), TIMEOUT)

        yield Subject(remote, REQUEST, "Hello, world!", held, disconnected)
        await remote.aclose()


async def real_subject(upstream: Upstream) -> AsyncIterator[Subject]:
    """The openai backend against transformers serve: the chat model, and the loop model
    behind a relay (its own backend, so that its one connection is the held reply's)."""
    backend = remote_backend("openai", upstream.server.base_url)
    relay = Relay(upstream.server.port)
    looping = remote_backend("openai", relay.base_url)

    def held() -> tuple[ModelBackend, GenerationRequest]:
        # Without a limit the loop model writes until the server's default (1,024 tokens).
        return looping, dataclasses.replace(REQUEST, model=upstream.models.loop)

    async def disconnected() -> None:
        assert await asyncio.to_thread(relay.client_closed.wait, TIMEOUT)

    try:
        yield Subject(
            backend,
            dataclasses.replace(REQUEST, model=upstream.models.chat),
            CHAT_REPLY,
            held,
            disconnected,
        )
    finally:
        await backend.aclose()
        await looping.aclose()
        relay.close()


async def test_deltas_reassemble_to_the_full_reply(subject: Subject) -> None:
    deltas = await collect(subject.backend.generate(subject.request))
    assert "".join(d.text for d in deltas) == subject.expected
    assert sum(1 for d in deltas if d.text) >= 2, "a reply is streamed, not sent whole"


async def test_the_reply_ends_with_a_finish_reason_and_usage(subject: Subject) -> None:
    deltas = await collect(subject.backend.generate(subject.request))
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    usage = deltas[-1].usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0


async def test_a_reply_limit_ends_the_reply_with_length(subject: Subject) -> None:
    """Issue 15, defect 4: the limit reaches the model, and the reply says it was cut."""
    limited = dataclasses.replace(subject.request, max_output_tokens=2)
    deltas = await collect(subject.backend.generate(limited))
    text = "".join(d.text for d in deltas)
    assert text
    assert subject.expected.startswith(text)
    assert len(text) < len(subject.expected)
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    usage = deltas[-1].usage
    assert usage is not None
    assert 0 < usage.completion_tokens <= 2


async def test_aclose_stops_generation_within_a_bound(subject: Subject) -> None:
    backend, request = subject.hold()
    deltas = backend.generate(request)
    first = await asyncio.wait_for(anext(deltas), TIMEOUT)
    assert first.text
    await asyncio.wait_for(deltas.aclose(), TIMEOUT)
    await subject.upstream_closed()
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)


async def test_cancelling_the_consumer_stops_generation(subject: Subject) -> None:
    got_first = asyncio.Event()

    async def consume() -> None:
        backend, request = subject.hold()
        async with contextlib.aclosing(backend.generate(request)) as deltas:
            async for _ in deltas:
                got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), TIMEOUT)
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=TIMEOUT)
    assert task in done
    assert task.cancelled()
    await subject.upstream_closed()


async def test_list_models_is_none_or_names(subject: Subject) -> None:
    models = await subject.backend.list_models()
    assert models is None or (models and all(isinstance(m, str) and m for m in models))
    assert subject.backend.default_model


async def test_two_generations_run_concurrently(subject: Subject) -> None:
    first, second = await asyncio.gather(
        collect(subject.backend.generate(subject.request)),
        collect(subject.backend.generate(subject.request)),
    )
    assert "".join(d.text for d in first) == "".join(d.text for d in second) == subject.expected


# -- failures: only the HTTP backends can fail ------------------------------------------


@pytest.fixture(params=["openai", "gemini"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeLLM]:
    async with FakeLLM(request.param) as server:
        yield server


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BackendBadRequest),
        (401, BackendAuthError),
        (403, BackendAuthError),
        (404, BackendBadRequest),
        (408, BackendTimeout),
        (429, BackendRateLimited),
        (500, BackendUnavailable),
        (503, BackendUnavailable),
    ],
)
async def test_upstream_statuses_raise_typed_errors(
    fake: FakeLLM, status: int, error_type: type[BackendError]
) -> None:
    fake.replies.append(Reply(status=status))
    backend = remote_backend(fake.provider, fake.base_url)
    try:
        with pytest.raises(error_type) as raised:
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    assert type(raised.value) is error_type
    assert f"HTTP {status}" in str(raised.value)


async def test_a_read_timeout_raises_backend_timeout(fake: FakeLLM) -> None:
    fake.replies.append(Reply(stall=True))
    backend = remote_backend(fake.provider, fake.base_url, read_timeout=0.3)
    try:
        with pytest.raises(BackendTimeout, match="read timeout"):
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()
    await asyncio.wait_for(fake.disconnected.wait(), TIMEOUT)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
async def test_an_unreachable_server_raises_backend_unavailable(provider: Provider) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: the connection is refused.
    suffix = "/v1" if provider == "openai" else ""
    backend = remote_backend(provider, f"http://127.0.0.1:{port}{suffix}")
    try:
        with pytest.raises(BackendUnavailable, match=r"cannot reach .*127\.0\.0\.1"):
            await collect(backend.generate(REQUEST))
    finally:
        await backend.aclose()


async def test_a_connection_dropped_mid_reply_raises_after_the_deltas_sent(
    fake: FakeLLM,
) -> None:
    fake.replies.append(Reply(drop_after=2))
    backend = remote_backend(fake.provider, fake.base_url, attempts=3)
    received: list[str] = []
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await collect(backend.generate(REQUEST), into=received)
    finally:
        await backend.aclose()
    assert "".join(received) == "Hello, "
    # It was reached: the message must not send the person looking for a stopped server.
    assert "lost the connection" in str(raised.value)
    assert "is it running" not in str(raised.value)
    # Words were forwarded: the request is not repeated.
    assert len(fake.generations) == 1

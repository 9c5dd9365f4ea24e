"""Issue 15 against a real OpenAI-compatible server: transformers serve (tests/upstream.py).

Each test is one defect the issue found by running ``chat-server --backend openai`` against
``transformers serve``; the backend conformance suite runs against it too (the
``transformers`` subject of tests/test_backend_conformance.py). Run with ``tox -e upstream``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import ChatCore, ChatServer, Event, EventKind, MemoryStore, ServerConfig
from chat.backends import GenerationRequest, ModelCheck, PromptMessage
from chat.backends.openai import OpenAIBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.cli.client import main as client_main
from chat.context import Context, ContextBudget, ContextSettings
from chat.core import Conversation
from chat.errors import BackendBadRequest, ConfigurationError, InvalidArgument
from chat.events import Request, RequestKind
from chat.types import (
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    utcnow,
)
from tests.backends import collect
from tests.helpers import TIMEOUT, running_server_process
from tests.strategies import turn_histories, user_message
from tests.upstream import CHAT_REPLY, LOOP_TEXT, Upstream

pytestmark = pytest.mark.upstream


def backend_for(base_url: str, model: str = "") -> OpenAIBackend:
    # No retries: a 500 must show at once, not after backoff.
    return OpenAIBackend(
        RemoteSettings(base_url=base_url, default_model=model, retry=RetryPolicy(attempts=1))
    )


async def turn(
    conversation: Conversation, session_id: str, text: str, request_id: str
) -> list[Event]:
    """Send ``text`` and read the events of its reply, up to the last."""
    await conversation.handle(Request(RequestKind.MESSAGE, session_id, text, request_id))
    events: list[Event] = []
    while True:
        batch = await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)
        assert batch is not None, "the outbox closed"
        events.extend(e for e in batch if e.request_id == request_id)
        if events and events[-1].kind in (EventKind.RESPONSE_COMPLETE, EventKind.ERROR):
            return events


def text_of(events: Sequence[Event]) -> str:
    return "".join(e.chunk_text for e in events if e.kind is EventKind.CHUNK)


@pytest.fixture
async def chat_core(upstream: Upstream) -> AsyncIterator[ChatCore]:
    """A core whose backend is the openai backend against transformers serve."""
    backend = backend_for(upstream.server.base_url, upstream.models.chat)
    yield ChatCore(MemoryStore(), backend, model_check=ModelCheck.WARN)
    await backend.aclose()


# -- defect 1: an early cancel broke the session for good ------------------------------------


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=turn_histories,
    system_prompt=st.sampled_from(["", "Be brief."]),
    text=user_message,
)
def test_any_history_makes_a_prompt_a_strict_template_accepts(
    upstream: Upstream, history: list[Message], system_prompt: str, text: str
) -> None:
    """Completed, cancelled, failed and empty turns, then a new message: never an HTTP 500."""

    async def ask() -> list[str]:
        now = utcnow()
        context = ContextBudget(ContextSettings(context_window=4096)).build(
            Session("s", now, now, system_prompt=system_prompt), history, text, model="m"
        )
        backend = backend_for(upstream.server.base_url)
        try:
            request = GenerationRequest(upstream.models.chat, context.messages)
            return [d.text for d in await collect(backend.generate(request))]
        finally:
            await backend.aclose()

    assert "".join(asyncio.run(ask())) == CHAT_REPLY


async def test_a_reply_cancelled_before_its_first_word_leaves_the_session_usable(
    upstream: Upstream, chat_core: ChatCore
) -> None:
    session = await chat_core.create_session(system_prompt="Be brief.")
    # As the core stores a reply cancelled before its first token, and an empty one.
    now = utcnow()
    await chat_core.store.append(
        session.session_id,
        [
            Message(Role.USER, "never mind", now),
            Message(Role.ASSISTANT, "", now, MessageStatus.CANCELLED),
            Message(Role.USER, "say nothing", now),
            Message(Role.ASSISTANT, "", now),
        ],
    )
    async with chat_core.open_conversation() as conversation:
        # A real cancel too, as early as the stream allows (it may catch a word or none).
        looping = await chat_core.create_session(model=upstream.models.loop)
        await conversation.handle(
            Request(RequestKind.MESSAGE, looping.session_id, "go on", "early")
        )
        await conversation.handle(Request(RequestKind.CANCEL, request_id="early"))
        for _ in range(2):
            events = await turn(conversation, session.session_id, "hello", "next")
            assert events[-1].kind is EventKind.RESPONSE_COMPLETE, events[-1].error_message
            assert text_of(events) == CHAT_REPLY
        await chat_core.update_session(looping.session_id, SessionPatch(model=upstream.models.chat))
        events = await turn(conversation, looping.session_id, "and now?", "after")
    assert events[-1].kind is EventKind.RESPONSE_COMPLETE, events[-1].error_message
    assert text_of(events) == CHAT_REPLY


# -- defect 2: {"detail": ...} errors were dropped ---------------------------------------------


async def test_the_servers_own_words_reach_the_client(upstream: Upstream) -> None:
    backend = backend_for(upstream.pinned.base_url)
    try:
        request = GenerationRequest("someone-else", [PromptMessage(Role.USER, "hello")])
        with pytest.raises(BackendBadRequest) as refused:
            await collect(backend.generate(request))
    finally:
        await backend.aclose()
    assert f"Server is pinned to '{upstream.models.chat}'" in str(refused.value)
    assert "HTTP 400" in str(refused.value)


# -- defects 3 and 6: which models a server serves -----------------------------------------


async def test_a_model_the_server_loads_on_demand_is_accepted_and_served(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Loading the chat model makes the list non-empty, and it lists only what is loaded.
    probe = backend_for(upstream.server.base_url)
    try:
        hello = GenerationRequest(upstream.models.chat, [PromptMessage(Role.USER, "hi")])
        await collect(probe.generate(hello))
        listed = await probe.list_models()
    finally:
        await probe.aclose()
    assert listed is not None
    assert upstream.models.chat in listed
    assert upstream.models.lazy not in listed

    strict = ChatCore(MemoryStore(), backend_for(upstream.server.base_url))
    with pytest.raises(InvalidArgument, match="is not served"):
        await strict.create_session(model=upstream.models.lazy)
    await strict.backend.aclose()

    # What chat-server does by default for a server other than OpenAI's own.
    config = ServerConfig(backend="openai", base_url=upstream.server.base_url)
    assert config.effective_model_check is ModelCheck.WARN
    backend = backend_for(upstream.server.base_url)
    core = ChatCore(MemoryStore(), backend, model_check=config.effective_model_check)
    try:
        with caplog.at_level(logging.WARNING, logger="chat.backends"):
            session = await core.create_session(model=upstream.models.lazy)
        assert any("using it anyway" in r.getMessage() for r in caplog.records)
        async with core.open_conversation() as conversation:
            events = await turn(conversation, session.session_id, "hello", "r1")
    finally:
        await backend.aclose()
    assert events[-1].kind is EventKind.RESPONSE_COMPLETE, events[-1].error_message
    assert text_of(events) == CHAT_REPLY


async def test_an_unserved_model_stops_a_strict_server_at_start_up(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        backend="openai",
        base_url=upstream.pinned.base_url,
        model="not-this-one",
    )
    with pytest.raises(ConfigurationError, match=r"--model not-this-one: .* is not served"):
        async with ChatServer(dataclasses.replace(config, model_check="strict")):
            pass
    # By default (warn) it starts, and says so at once rather than at the first turn.
    with caplog.at_level(logging.WARNING, logger="chat.backends"):
        async with ChatServer(config):
            pass
    assert any("'not-this-one' is not served" in r.getMessage() for r in caplog.records)


async def test_a_base_url_without_v1_stops_the_server_with_the_fix(upstream: Upstream) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        backend="openai",
        base_url=upstream.server.base_url.removesuffix("/v1"),
        model=upstream.models.chat,
    )
    with pytest.raises(ConfigurationError, match="add /v1 to --base-url"):
        async with ChatServer(config):
            pass


# -- defect 4: the reply limit never reached the server ----------------------------------------


async def test_the_reply_reserve_and_a_session_limit_reach_the_server(
    upstream: Upstream,
) -> None:
    backend = backend_for(upstream.server.base_url, upstream.models.loop)
    core = ChatCore(
        MemoryStore(),
        backend,
        context=ContextBudget(ContextSettings(reply_reserve=5)),
        model_check=ModelCheck.OFF,
    )
    try:
        reserved = await core.create_session()
        limited = await core.create_session(max_reply_tokens=3)
        async with core.open_conversation() as conversation:
            by_reserve = await turn(conversation, reserved.session_id, "go on", "r1")
            by_session = await turn(conversation, limited.session_id, "go on", "r2")
    finally:
        await backend.aclose()
    for events, limit in ((by_reserve, 5), (by_session, 3)):
        complete = events[-1]
        assert complete.kind is EventKind.RESPONSE_COMPLETE, complete.error_message
        assert complete.finish_reason is FinishReason.LENGTH
        assert complete.usage is not None
        assert complete.usage.completion_tokens == limit
        assert (LOOP_TEXT * limit).startswith(text_of(events))


# -- defect 5: the estimate ran under the model's own count ------------------------------------


class Uncalibrated(ContextBudget):
    """The budget as it was: reported usage taught it nothing."""

    def observe(self, model: str, context: Context, prompt_tokens: int) -> None:
        return None


async def prompt_sizes(upstream: Upstream, budget: ContextBudget) -> list[int]:
    """The prompt size the server reports for each turn of a conversation that outgrows it."""
    backend = backend_for(upstream.server.base_url, upstream.models.chat)
    core = ChatCore(MemoryStore(), backend, context=budget, model_check=ModelCheck.OFF)
    sizes = []
    try:
        session = await core.create_session(system_prompt="Be brief.")
        async with core.open_conversation() as conversation:
            for n in range(16):
                # Words the tokenizer never saw: a small vocabulary spends a token on
                # every character or two of them.
                text = f"Question {n}: why do {n * 37} zebras quiz jovial vixens? Be brief."
                events = await turn(conversation, session.session_id, text, f"r{n}")
                complete = events[-1]
                assert complete.kind is EventKind.RESPONSE_COMPLETE, complete.error_message
                assert complete.usage is not None
                sizes.append(complete.usage.prompt_tokens)
    finally:
        await backend.aclose()
    return sizes


async def test_what_fits_by_the_estimate_fits_for_real(upstream: Upstream) -> None:
    settings_ = ContextSettings(context_window=400, reply_reserve=40)
    before = await prompt_sizes(upstream, Uncalibrated(settings_))
    assert max(before) > 360, f"the estimate alone keeps within the window here: {before}"
    after = await prompt_sizes(upstream, ContextBudget(settings_))
    # From the first report on, every prompt leaves the reply its 40 tokens.
    assert max(after[1:]) <= 360, after
    # And history is still sent: the calibration is not a blanket halving.
    assert max(after[1:]) > 250, after


# -- the whole chain: chat-server and chat-client ---------------------------------------------


def test_chat_server_and_chat_client_against_the_real_server(upstream: Upstream) -> None:
    with running_server_process(
        "--backend",
        "openai",
        "--base-url",
        upstream.server.base_url,
        "--model",
        upstream.models.chat,
        "--store",
        "memory://",
    ) as server:
        result = CliRunner().invoke(
            client_main, ["--target", server.address, "ask", "--json", "Hello there!"]
        )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["text"], answer["finish_reason"]) == (CHAT_REPLY, "stop")
    assert answer["usage"]["prompt_tokens"] > 0

"""The core without sockets: the normative behaviour of ``Chat`` (issue 2, points 1-9)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from chat import (
    ChatCore,
    DisconnectPolicy,
    EchoBackend,
    Event,
    EventKind,
    FinishReason,
    InvalidArgument,
    Limits,
    MemoryStore,
    Message,
    MessageStatus,
    Request,
    RequestKind,
    Role,
    Session,
    SessionNotFound,
    SessionPatch,
    StatusCode,
    Usage,
)
from chat._proto import encode_event
from chat.backends.echo import echo_reply
from chat.context import ContextBudget, ContextSettings
from chat.core import Conversation
from chat.errors import BackendRateLimited, BackendUnavailable
from tests.backends import FailingBackend, GatedBackend, ScriptedBackend
from tests.helpers import TIMEOUT, eventually

TERMINAL = (EventKind.RESPONSE_COMPLETE, EventKind.ERROR)


class Reader:
    """Reads a conversation's outbox as the service's writer would."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.buffer: list[Event] = []
        self.seen: list[Event] = []

    async def next(self) -> Event:
        while not self.buffer:
            batch = await asyncio.wait_for(self.conversation.outbox.get(), TIMEOUT)
            if batch is None:
                raise EOFError("outbox closed")
            self.buffer.extend(batch)
        event = self.buffer.pop(0)
        self.seen.append(event)
        return event

    async def until(self, request_id: str, kinds: tuple[EventKind, ...] = TERMINAL) -> list[Event]:
        """All events up to the first of ``kinds`` for ``request_id``."""
        events = []
        while True:
            event = await self.next()
            events.append(event)
            if event.request_id == request_id and event.kind in kinds:
                return events

    async def reply(self, request_id: str) -> list[Event]:
        return [e for e in await self.until(request_id) if e.request_id == request_id]


def message(session_id: str, text: str, request_id: str) -> Request:
    return Request(RequestKind.MESSAGE, session_id, text, request_id)


@pytest.fixture
async def gated() -> GatedBackend:
    return GatedBackend()


@pytest.fixture
async def gated_core(gated: GatedBackend) -> ChatCore:
    return ChatCore(MemoryStore(), gated)


async def open_conversation(core: ChatCore) -> AsyncIterator[tuple[Conversation, Reader]]:
    async with core.open_conversation() as conversation:
        yield conversation, Reader(conversation)


@pytest.fixture
async def chat(core: ChatCore) -> AsyncIterator[tuple[Conversation, Reader]]:
    async for pair in open_conversation(core):
        yield pair


@pytest.fixture
async def gated_chat(gated_core: ChatCore) -> AsyncIterator[tuple[Conversation, Reader]]:
    async for pair in open_conversation(gated_core):
        yield pair


# 1. start, chunks 1..n, complete; the chunks are the stored reply ------------------------


async def test_message_streams_start_chunks_complete_and_stores_the_reply(
    core: ChatCore, chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = chat
    session = await core.create_session(title="t")
    await conversation.handle(message(session.session_id, "hello brave new world", "r1"))
    events = await reader.reply("r1")

    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.RESPONSE_START
    assert events[0].context_messages == 1
    assert events[0].model == "echo"
    assert kinds[-1] is EventKind.RESPONSE_COMPLETE
    chunks = [e for e in events if e.kind is EventKind.CHUNK]
    assert kinds == [EventKind.RESPONSE_START] + [EventKind.CHUNK] * len(chunks) + [
        EventKind.RESPONSE_COMPLETE
    ]
    assert [c.chunk_number for c in chunks] == list(range(1, len(chunks) + 1))
    complete = events[-1]
    assert complete.total_chunks == len(chunks)
    assert complete.processing_time > 0
    assert complete.message_count == 2
    assert complete.finish_reason is FinishReason.STOP
    assert complete.usage is not None
    assert complete.usage.completion_tokens == len(chunks)

    history = await core.get_history(session.session_id)
    assert [(m.role, m.status) for m in history] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert history[0].content == "hello brave new world"
    assert history[1].content == "".join(c.chunk_text for c in chunks)
    assert history[1].content == "Echo #1 (1 message in context): hello brave new world"
    assert {m.request_id for m in history} == {"r1"}


# 2. chunks are forwarded as the backend produces them ------------------------------------


async def test_an_empty_reply_has_no_chunks() -> None:
    """The README's promise: CHUNK 1..n, or none at all (total_chunks 0)."""
    core = ChatCore(MemoryStore(), ScriptedBackend([]))
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "say nothing", "r1"))
        events = await Reader(conversation).reply("r1")
    assert [e.kind for e in events] == [EventKind.RESPONSE_START, EventKind.RESPONSE_COMPLETE]
    assert events[-1].total_chunks == 0


async def test_each_delta_is_forwarded_before_the_backend_produces_the_next(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    session = await gated_core.create_session()
    await conversation.handle(message(session.session_id, "hi", "r1"))
    assert (await reader.next()).kind is EventKind.RESPONSE_START
    for word in ("one ", "two ", "three"):
        gated.release(word)
        chunk = await reader.next()
        # The backend has produced exactly this delta so far: nothing was held back.
        assert chunk.kind is EventKind.CHUNK
        assert chunk.chunk_text == word
        assert gated.produced[-1] == word
    gated.finish()
    complete = await reader.next()
    assert complete.kind is EventKind.RESPONSE_COMPLETE
    assert complete.total_chunks == 3


# 3. PING is answered while a reply streams -----------------------------------------------


async def test_ping_is_answered_at_once_while_a_reply_is_streaming(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    session = await gated_core.create_session()
    await conversation.handle(message(session.session_id, "hi", "r1"))
    gated.release("partial ")
    assert (await reader.next()).kind is EventKind.RESPONSE_START
    assert (await reader.next()).kind is EventKind.CHUNK
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)

    await conversation.handle(Request(RequestKind.PING, request_id="p1"))
    pong = await reader.next()
    assert (pong.kind, pong.request_id) == (EventKind.PONG, "p1")
    assert not gated.closed.is_set()  # the reply is still in flight

    gated.finish()
    assert (await reader.next()).kind is EventKind.RESPONSE_COMPLETE


async def test_a_model_that_never_waits_does_not_hold_the_event_loop_for_its_whole_reply(
    core: ChatCore, chat: tuple[Conversation, Reader]
) -> None:
    # Echo answers at once. A 40-chunk reply stays below the outbox's high water, so its pump
    # never waits for the client: without a turn of the loop now and then, it would be queued
    # whole before any other task (another stream's PING, say) ran again.
    conversation, reader = chat
    session = await core.create_session()
    words = " ".join(f"w{i}" for i in range(40))
    await conversation.handle(message(session.session_id, words, "r1"))
    seen: list[int] = []
    while not any(e.kind is EventKind.RESPONSE_COMPLETE for e in conversation.outbox._items):
        seen.append(sum(e.kind is EventKind.CHUNK for e in conversation.outbox._items))
        await asyncio.sleep(0)
    chunks = sum(e.kind is EventKind.CHUNK for e in conversation.outbox._items)
    assert chunks >= 40
    # This task ran while the reply was being queued, not only before and after it.
    assert any(0 < queued < chunks for queued in seen), seen
    assert [e.kind for e in await reader.reply("r1")][-1] is EventKind.RESPONSE_COMPLETE


async def test_pong_overtakes_chunks_already_queued() -> None:
    core = ChatCore(MemoryStore(), ScriptedBackend(["w "] * 30), limits=Limits())
    async with core.open_conversation() as conversation:
        session = await core.create_session()
        await conversation.handle(message(session.session_id, "hi", "r1"))

        # Let the turn queue its chunks without reading them.
        async def queued() -> bool:
            return len(conversation.outbox) >= 20

        await eventually(queued, "chunks to queue up")
        await conversation.handle(Request(RequestKind.PING, request_id="p1"))
        batch = await conversation.outbox.get()
        assert batch is not None
        assert batch[0].kind is EventKind.PONG


# 4. bad requests get an ERROR, nothing is stored, the stream stays usable ----------------


@pytest.mark.parametrize(
    ("session_id", "text", "code", "words"),
    [
        ("", "hello", StatusCode.INVALID_ARGUMENT, "session_id"),
        ("no-such-session", "hello", StatusCode.NOT_FOUND, "not found"),
        ("SESSION", "", StatusCode.INVALID_ARGUMENT, "message: must not be empty"),
        ("SESSION", "   \n", StatusCode.INVALID_ARGUMENT, "message: must not be empty"),
        ("SESSION", "x" * 101, StatusCode.INVALID_ARGUMENT, "the limit is 100"),
    ],
)
async def test_bad_message_gets_an_error_event_and_the_stream_stays_open(
    session_id: str, text: str, code: StatusCode, words: str
) -> None:
    core = ChatCore(MemoryStore(), EchoBackend(), limits=Limits(max_message_chars=100))
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        reader = Reader(conversation)
        target = session.session_id if session_id == "SESSION" else session_id
        await conversation.handle(message(target, text, "bad"))
        (error,) = await reader.reply("bad")
        assert error.kind is EventKind.ERROR
        assert error.error_code == code
        assert words in error.error_message
        assert (await core.get_session(session.session_id)).message_count == 0

        await conversation.handle(message(session.session_id, "x" * 100, "good"))
        assert (await reader.reply("good"))[-1].kind is EventKind.RESPONSE_COMPLETE
    assert len(await core.get_history(session.session_id)) == 2
    assert core.stats.failed_requests == 1
    assert core.stats.successful_requests == 1


async def test_unknown_request_type_gets_an_error(chat: tuple[Conversation, Reader]) -> None:
    conversation, reader = chat
    await conversation.handle(Request(kind=42, request_id="x"))
    (error,) = await reader.reply("x")
    assert error.error_code == StatusCode.INVALID_ARGUMENT
    assert "unknown request type 42" in error.error_message


# 5. requests on one session are answered in order, queued, not interleaved ---------------


async def test_messages_on_one_session_are_queued_and_answered_in_order(
    core: ChatCore, chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = chat
    session = await core.create_session()
    for n in range(1, 4):
        await conversation.handle(message(session.session_id, f"message {n}", f"r{n}"))
    events = await reader.until("r3")
    owners = [e.request_id for e in events]
    # All of r1, then all of r2, then all of r3: no interleaving, nothing dropped.
    assert owners == sorted(owners)
    assert [e.kind for e in events if e.kind in TERMINAL] == [EventKind.RESPONSE_COMPLETE] * 3
    history = await core.get_history(session.session_id)
    assert [m.content for m in history if m.role is Role.USER] == [
        "message 1",
        "message 2",
        "message 3",
    ]
    assert history[-1].content.startswith("Echo #3 (5 messages in context)")


async def test_replies_on_different_sessions_run_concurrently(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    first = await gated_core.create_session()
    second = await gated_core.create_session()
    await conversation.handle(message(first.session_id, "a", "r1"))
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)
    # A second session is not blocked behind the first one's open reply.
    await conversation.handle(message("no-such-session", "b", "r2"))
    error = [e for e in await reader.until("r2") if e.request_id == "r2"]
    assert error[-1].error_code == StatusCode.NOT_FOUND
    gated.finish()
    await reader.until("r1")
    del second


# 6. CANCEL -------------------------------------------------------------------------------


async def test_cancel_stops_the_reply_and_keeps_the_partial_reply(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    session = await gated_core.create_session()
    await conversation.handle(message(session.session_id, "tell me a story", "r1"))
    gated.release("Once ")
    gated.release("upon ")
    await reader.next()  # start
    await reader.next()
    await reader.next()

    await conversation.handle(Request(RequestKind.CANCEL, session.session_id, request_id="r1"))
    await asyncio.wait_for(gated.closed.wait(), TIMEOUT)
    complete = await reader.next()
    assert complete.kind is EventKind.RESPONSE_COMPLETE
    assert complete.finish_reason is FinishReason.CANCELLED
    assert complete.total_chunks == 2
    history = await gated_core.get_history(session.session_id)
    assert [(m.role, m.status, m.content) for m in history] == [
        (Role.USER, MessageStatus.COMPLETE, "tell me a story"),
        (Role.ASSISTANT, MessageStatus.CANCELLED, "Once upon "),
    ]
    assert gated_core.stats.cancelled_requests == 1


async def test_a_reply_cancelled_before_its_first_word_leaves_the_next_prompt_alternating(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    """Issue 15, defect 1: an unanswered turn is left out of later prompts, question and all."""
    conversation, reader = gated_chat
    session = await gated_core.create_session(system_prompt="Be brief.")
    await conversation.handle(message(session.session_id, "never mind", "r1"))
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)
    await conversation.handle(Request(RequestKind.CANCEL, request_id="r1"))
    complete = (await reader.reply("r1"))[-1]
    assert (complete.finish_reason, complete.total_chunks) == (FinishReason.CANCELLED, 0)
    # The person's history keeps the turn.
    history = await gated_core.get_history(session.session_id)
    assert [(m.role, m.content, m.status) for m in history] == [
        (Role.USER, "never mind", MessageStatus.COMPLETE),
        (Role.ASSISTANT, "", MessageStatus.CANCELLED),
    ]

    await conversation.handle(message(session.session_id, "hello", "r2"))
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)
    gated.release("Hi.")
    gated.finish()
    start = (await reader.reply("r2"))[0]
    assert [(m.role, m.content) for m in gated.requests[-1].messages] == [
        (Role.SYSTEM, "Be brief."),
        (Role.USER, "hello"),
    ]
    assert start.context_messages == 1


async def test_cancel_of_a_queued_message_answers_it_and_stores_nothing(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    session = await gated_core.create_session()
    await conversation.handle(message(session.session_id, "first", "r1"))
    await conversation.handle(message(session.session_id, "second", "r2"))
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)
    await conversation.handle(Request(RequestKind.CANCEL, request_id="r2"))
    cancelled = [e for e in await reader.until("r2") if e.request_id == "r2"]
    assert [(e.kind, e.finish_reason) for e in cancelled] == [
        (EventKind.RESPONSE_COMPLETE, FinishReason.CANCELLED)
    ]
    gated.release("done")
    gated.finish()
    await reader.until("r1")
    history = await gated_core.get_history(session.session_id)
    assert [m.content for m in history] == ["first", "done"]


async def test_cancel_by_session_stops_the_current_and_the_queued_replies(
    gated: GatedBackend, gated_core: ChatCore, gated_chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = gated_chat
    session = await gated_core.create_session()
    await conversation.handle(message(session.session_id, "first", "r1"))
    await conversation.handle(message(session.session_id, "second", "r2"))
    await asyncio.wait_for(gated.started.wait(), TIMEOUT)
    await conversation.handle(Request(RequestKind.CANCEL, session.session_id))
    events = await reader.until("r1")
    terminal = {e.request_id: e.finish_reason for e in events if e.kind in TERMINAL}
    assert terminal == {"r1": FinishReason.CANCELLED, "r2": FinishReason.CANCELLED}


async def test_cancel_with_nothing_in_flight_gets_a_status(
    chat: tuple[Conversation, Reader],
) -> None:
    conversation, reader = chat
    await conversation.handle(Request(RequestKind.CANCEL, "s", request_id="gone"))
    (status,) = await reader.until("gone", (EventKind.STATUS,))
    assert "nothing to cancel" in status.status_message
    await conversation.handle(Request(RequestKind.CANCEL, request_id=""))
    error = await reader.next()
    assert error.kind is EventKind.ERROR
    assert error.error_code == StatusCode.INVALID_ARGUMENT


# 7. the client goes away mid-reply -------------------------------------------------------


async def test_closing_the_conversation_mid_reply_stops_generation_and_keeps_the_partial(
    gated: GatedBackend,
) -> None:
    # What --on-disconnect cancel does (continue: tests/test_live.py).
    gated_core = ChatCore(MemoryStore(), gated, on_disconnect=DisconnectPolicy.CANCEL)
    tasks_before = len(asyncio.all_tasks())
    session = await gated_core.create_session()
    async with gated_core.open_conversation() as conversation:
        reader = Reader(conversation)
        await conversation.handle(message(session.session_id, "hello", "r1"))
        gated.release("partial ")
        await reader.next()
        await reader.next()
        assert gated_core.stats.active_streams == 1
        assert gated_core.stats.active_replies == 1
    # Leaving the block is what the service does when the client disconnects.
    assert gated.closed.is_set()
    history = await gated_core.get_history(session.session_id)
    assert [(m.role, m.status, m.content) for m in history] == [
        (Role.USER, MessageStatus.COMPLETE, "hello"),
        (Role.ASSISTANT, MessageStatus.CANCELLED, "partial "),
    ]
    assert gated_core.stats.active_streams == 0
    assert gated_core.stats.active_replies == 0
    assert gated_core._subscribers == {}
    assert conversation.outbox.closed
    assert len(asyncio.all_tasks()) == tasks_before


async def test_shutdown_past_the_grace_period_marks_the_partial_reply_interrupted(
    gated: GatedBackend, gated_core: ChatCore
) -> None:
    session = await gated_core.create_session()
    async with gated_core.open_conversation() as conversation:
        reader = Reader(conversation)
        await conversation.handle(message(session.session_id, "hello", "r1"))
        gated.release("half ")
        await reader.next()
        await reader.next()
        gated_core.start_draining()
        assert not await gated_core.wait_idle(0.01)
        await conversation.handle(message(session.session_id, "another", "r2"))
        refused = [e for e in await reader.until("r2") if e.request_id == "r2"]
        assert refused[-1].error_code == StatusCode.UNAVAILABLE
    history = await gated_core.get_history(session.session_id)
    assert history[-1].status is MessageStatus.INTERRUPTED
    assert history[-1].content == "half "
    assert await gated_core.wait_idle(0.01)


async def test_half_closed_input_answers_queued_messages_then_closes(
    core: ChatCore, chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = chat
    session = await core.create_session()
    await conversation.handle(message(session.session_id, "one", "r1"))
    await conversation.handle(message(session.session_id, "two", "r2"))
    conversation.finish_input()
    await reader.until("r2")
    with pytest.raises(EOFError):
        await reader.next()


# 8. multi-turn: the backend sees the whole history --------------------------------------


async def test_each_turn_sends_the_system_prompt_and_the_history_to_the_backend() -> None:
    backend = ScriptedBackend(["ok"])
    core = ChatCore(MemoryStore(), backend)
    session = await core.create_session(system_prompt="Be brief.")
    async with core.open_conversation() as conversation:
        reader = Reader(conversation)
        for n in range(3):
            await conversation.handle(message(session.session_id, f"q{n}", f"r{n}"))
            await reader.until(f"r{n}")
    contexts = [[(m.role, m.content) for m in r.messages] for r in backend.requests]
    assert contexts[2] == [
        (Role.SYSTEM, "Be brief."),
        (Role.USER, "q0"),
        (Role.ASSISTANT, "ok"),
        (Role.USER, "q1"),
        (Role.ASSISTANT, "ok"),
        (Role.USER, "q2"),
    ]
    assert [len(c) for c in contexts] == [2, 4, 6]
    assert backend.requests[0].model == "scripted-model"


async def test_the_reply_reserve_reaches_the_backend_as_the_reply_limit() -> None:
    """Issue 15, defect 4: the limit is asked for, and a reply cut by it says LENGTH."""
    backend = ScriptedBackend(["ok"])
    core = ChatCore(
        MemoryStore(), backend, context=ContextBudget(ContextSettings(reply_reserve=50))
    )
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "hi", "r1"))
        await Reader(conversation).until("r1")
    assert backend.requests[0].max_output_tokens == 50

    echo = ChatCore(
        MemoryStore(), EchoBackend(), context=ContextBudget(ContextSettings(reply_reserve=3))
    )
    session = await echo.create_session()
    async with echo.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "a long question", "r2"))
        events = await Reader(conversation).reply("r2")
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert "".join(e.chunk_text for e in events if e.kind is EventKind.CHUNK) == "Echo #1 (1 "


async def test_reported_usage_calibrates_the_models_token_count() -> None:
    """Issue 15, defect 5: the model's own prompt size is learnt from."""
    backend = ScriptedBackend(["ok"], usage=Usage(prompt_tokens=500, completion_tokens=1))
    core = ChatCore(MemoryStore(), backend)
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "x" * 300, "r1"))
        await Reader(conversation).until("r1")
    calibration = core.context.calibration("scripted-model")
    assert calibration.samples == [(104, 500)]
    assert calibration.tokens(104) >= 500


async def test_echo_backend_shows_the_turn_and_context_it_received(core: ChatCore) -> None:
    session = await core.create_session(system_prompt="sys")
    async with core.open_conversation() as conversation:
        reader = Reader(conversation)
        await conversation.handle(message(session.session_id, "first", "a"))
        await reader.until("a")
        await conversation.handle(message(session.session_id, "second", "b"))
        events = await reader.reply("b")
    assert events[0].context_messages == 3
    text = "".join(e.chunk_text for e in events if e.kind is EventKind.CHUNK)
    assert text == "Echo #2 (3 messages in context): second"


# Failures and RETRY -----------------------------------------------------------------------


async def test_backend_failure_is_an_error_event_and_the_message_is_kept_for_retry() -> None:
    backend = FailingBackend(BackendUnavailable("the model server is unreachable"), ["par", "t"])
    core = ChatCore(MemoryStore(), backend)
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        reader = Reader(conversation)
        await conversation.handle(message(session.session_id, "important question", "r1"))
        events = await reader.reply("r1")
        error = events[-1]
        assert error.kind is EventKind.ERROR
        assert error.error_code == StatusCode.UNAVAILABLE
        assert error.finish_reason is FinishReason.ERROR
        assert error.total_chunks == 2
        history = await core.get_history(session.session_id)
        assert [(m.role, m.status, m.content) for m in history] == [
            (Role.USER, MessageStatus.FAILED, "important question"),
            (Role.ASSISTANT, MessageStatus.FAILED, "part"),
        ]

        await conversation.handle(Request(RequestKind.RETRY, session.session_id, request_id="r2"))
        retried = await reader.reply("r2")
        assert retried[-1].kind is EventKind.RESPONSE_COMPLETE
        # The failed attempt is not sent to the model again: one user message in context.
        assert retried[0].context_messages == 1
    history = await core.get_history(session.session_id)
    assert history[-1].content == "Echo #1 (1 message in context): important question"
    assert core.stats.failed_requests == 1
    assert core.stats.successful_requests == 1


async def test_retry_when_nothing_failed_is_refused(
    core: ChatCore, chat: tuple[Conversation, Reader]
) -> None:
    conversation, reader = chat
    session = await core.create_session()
    await conversation.handle(Request(RequestKind.RETRY, session.session_id, request_id="r"))
    (error,) = await reader.reply("r")
    assert error.error_code == StatusCode.FAILED_PRECONDITION
    assert "nothing to retry" in error.error_message


async def test_rate_limit_carries_retry_after() -> None:
    core = ChatCore(MemoryStore(), FailingBackend(BackendRateLimited("slow down", 7.5)))
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "hi", "r"))
        error = (await Reader(conversation).reply("r"))[-1]
    assert error.error_code == StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after == 7.5


async def test_an_unexpected_backend_exception_is_reported_as_internal() -> None:
    core = ChatCore(MemoryStore(), FailingBackend(RuntimeError("boom")))
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "hi", "r"))
        error = (await Reader(conversation).reply("r"))[-1]
    assert error.error_code == StatusCode.INTERNAL
    assert "boom" in error.error_message


# Sessions ---------------------------------------------------------------------------------


async def test_session_crud_validates_fields(core: ChatCore) -> None:
    session = await core.create_session(title="a", system_prompt="s", model="m")
    assert (session.title, session.system_prompt, session.model) == ("a", "s", "m")
    updated = await core.update_session(session.session_id, SessionPatch(title="b"))
    assert (updated.title, updated.system_prompt) == ("b", "s")
    assert updated.last_activity >= session.last_activity
    with pytest.raises(InvalidArgument, match="title: is 201 characters; the limit is 200"):
        await core.create_session(title="x" * 201)
    with pytest.raises(InvalidArgument, match="model: must not be empty"):
        await core.update_session(session.session_id, SessionPatch(model=""))
    with pytest.raises(InvalidArgument, match="session_id: is required"):
        await core.get_session("")
    assert await core.delete_session(session.session_id) == 0
    with pytest.raises(SessionNotFound):
        await core.get_session(session.session_id)
    with pytest.raises(InvalidArgument, match="page_size"):
        await core.list_sessions(page_size=-1)


async def test_model_is_validated_against_what_the_backend_serves(gated_core: ChatCore) -> None:
    assert (await gated_core.create_session(model="other-model")).model == "other-model"
    assert (await gated_core.create_session()).model == "gated-model"
    with pytest.raises(InvalidArgument, match="'gpt-9' is not served by the gated backend"):
        await gated_core.create_session(model="gpt-9")


# Session updates pushed to the other streams on a session --------------------------------


async def test_other_streams_on_a_session_get_session_updates(core: ChatCore) -> None:
    session = await core.create_session()
    async with core.open_conversation() as first, core.open_conversation() as second:
        one, two = Reader(first), Reader(second)
        await second.handle(Request(RequestKind.TYPING_START, session.session_id))
        await first.handle(Request(RequestKind.TYPING_START, session.session_id))
        typing = await two.next()
        assert (typing.kind, typing.status_message) == (EventKind.SESSION_UPDATE, "typing started")
        await first.handle(message(session.session_id, "hi", "r1"))
        await one.until("r1")
        update = await two.next()
        assert update.kind is EventKind.SESSION_UPDATE
        assert update.message_count == 2
        assert update.session is not None
        assert update.session.session_id == session.session_id
        await core.update_session(session.session_id, SessionPatch(title="renamed"))
        assert (await one.next()).status_message == "session updated: title"
        assert (await two.next()).session.title == "renamed"  # type: ignore[union-attr]
        await core.delete_session(session.session_id)
        assert (await two.next()).status_message == "session deleted"
    assert core._subscribers == {}


async def test_typing_on_an_unknown_session_is_an_error(
    chat: tuple[Conversation, Reader],
) -> None:
    conversation, reader = chat
    await conversation.handle(Request(RequestKind.TYPING_START, "nope", request_id="t"))
    (error,) = await reader.reply("t")
    assert error.error_code == StatusCode.NOT_FOUND


# The backend sees what echo_reply documents ------------------------------------------------


def test_echo_reply_counts_turns_and_context() -> None:
    from chat.backends import GenerationRequest, PromptMessage

    request = GenerationRequest(
        "echo",
        [
            PromptMessage(Role.SYSTEM, "s"),
            PromptMessage(Role.USER, "a"),
            PromptMessage(Role.ASSISTANT, "b"),
            PromptMessage(Role.USER, "c d"),
        ],
    )
    assert echo_reply(request) == "Echo #2 (3 messages in context): c d"


async def test_a_client_that_never_reads_cannot_make_the_server_queue_without_bound() -> None:
    core = ChatCore(MemoryStore(), EchoBackend(), limits=Limits(outbox_high_water=4))
    async with core.open_conversation() as conversation:
        pings = asyncio.create_task(_ping_forever(conversation))
        # The reader of requests is held back once 16 answers wait unread.
        await eventually(lambda: _is_blocked(conversation, 16), "the request reader to wait")
        assert len(conversation.outbox) == 16
        assert not pings.done()
        batch = await conversation.outbox.get()
        assert batch is not None
        assert len(batch) == 16
        await eventually(lambda: _is_blocked(conversation, 16), "the reader to go on and wait")
        pings.cancel()
        await asyncio.wait([pings])


async def _ping_forever(conversation: Conversation) -> None:
    for n in range(10_000):
        await conversation.handle(Request(RequestKind.PING, request_id=str(n)))


async def _is_blocked(conversation: Conversation, size: int) -> bool:
    return len(conversation.outbox) >= size


# Review fixes: what a stream closing, draining or a strange backend must not break ---------


class HeldAppendStore(MemoryStore):
    """A memory store whose appends wait until the test lets them go on."""

    def __init__(self) -> None:
        super().__init__()
        self.appending = asyncio.Event()
        self.go_on = asyncio.Event()

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        self.appending.set()
        await self.go_on.wait()
        return await super().append(session_id, messages)


async def test_a_client_leaving_while_its_turn_is_stored_does_not_lose_the_turn() -> None:
    store = HeldAppendStore()
    core = ChatCore(
        store, ScriptedBackend(["the whole ", "reply"]), on_disconnect=DisconnectPolicy.CANCEL
    )
    session = await core.create_session()
    tasks_before = len(asyncio.all_tasks())
    async with core.open_conversation() as conversation:
        await conversation.handle(message(session.session_id, "hello", "r1"))
        await asyncio.wait_for(store.appending.wait(), TIMEOUT)
        # The client goes away while the finished turn is being written.
        closing = asyncio.create_task(conversation.aclose())

        async def cancelling() -> bool:
            return conversation._closing

        await eventually(cancelling, "the conversation to cancel its turns")
        store.go_on.set()
        await asyncio.wait_for(closing, TIMEOUT)
    history = await core.get_history(session.session_id)
    assert [(m.role, m.status, m.content) for m in history] == [
        (Role.USER, MessageStatus.COMPLETE, "hello"),
        (Role.ASSISTANT, MessageStatus.COMPLETE, "the whole reply"),
    ]
    assert len(asyncio.all_tasks()) == tasks_before


async def test_session_updates_to_a_stream_that_never_reads_are_bounded() -> None:
    core = ChatCore(MemoryStore(), EchoBackend(), limits=Limits(outbox_high_water=4))
    session = await core.create_session()
    async with core.open_conversation() as typist, core.open_conversation() as idle:
        await idle.handle(Request(RequestKind.TYPING_START, session.session_id))
        for _ in range(1000):
            await typist.handle(Request(RequestKind.TYPING_START, session.session_id))
        # The typist's own outbox stays empty, so nothing holds it back: the pushes to
        # the stream that never reads must stop somewhere.
        assert len(idle.outbox) <= 16


async def test_a_stream_opened_while_the_server_drains_is_told_to_reconnect(
    core: ChatCore,
) -> None:
    core.start_draining()
    async with core.open_conversation() as conversation:
        event = await Reader(conversation).next()
        assert event.kind is EventKind.STATUS
        assert event.error_code == StatusCode.UNAVAILABLE
        conversation.finish_input()
    assert await core.wait_idle(TIMEOUT)


@pytest.mark.parametrize(
    "usage",
    [Usage(2**31, 1), Usage(1, 2**31), Usage(2**30, 2**30), Usage(-1, 5)],
    ids=["prompt", "completion", "total", "negative"],
)
async def test_token_counts_that_do_not_fit_the_wire_are_dropped_not_fatal(
    usage: Usage,
) -> None:
    core = ChatCore(MemoryStore(), ScriptedBackend(["ok"], usage=usage))
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        reader = Reader(conversation)
        await conversation.handle(message(session.session_id, "hi", "r1"))
        events = await reader.reply("r1")
    assert events[-1].kind is EventKind.RESPONSE_COMPLETE
    assert events[-1].usage is None
    # The writer encodes each event; one that cannot be encoded would end the stream.
    for event in events:
        encode_event(event, "")
    history = await core.get_history(session.session_id)
    assert history[-1].usage is None

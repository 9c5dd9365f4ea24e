"""Where seq is assigned (no sockets): the outbox numbers a turn's events as they leave and
logs them; a stream gone, its turns' events go to their logs alone."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from chat import ChatCore, Limits, MemoryStore
from chat.core import Conversation
from chat.events import Event, EventKind, ReplyCounter, Request, RequestKind
from chat.outbox import FINAL_SINK, LOG_SINK, Outbox
from chat.replay import MemoryReplayLog
from tests import strategies
from tests.backends import ScriptedBackend
from tests.helpers import TIMEOUT
from tests.replay_conformance import collect


def turn(log: MemoryReplayLog, turn_id: str = "t-1") -> ReplyCounter:
    reply = ReplyCounter(turn_id=turn_id)
    reply.log = log.begin("s-1", turn_id, "r-1")
    return reply


def event(kind: EventKind, reply: ReplyCounter | None, text: str = "") -> Event:
    return Event(kind, session_id="s-1", request_id="r-1", chunk_text=text, reply=reply)


async def test_events_are_numbered_as_they_leave_and_logged_as_sent() -> None:
    log = MemoryReplayLog()
    reply = turn(log)
    outbox = Outbox(coalesce=True)
    outbox.put_nowait(event(EventKind.STATUS, reply))
    outbox.put_nowait(event(EventKind.RESPONSE_START, reply))
    for text in ("a", "b", "c"):
        outbox.put_nowait(event(EventKind.CHUNK, reply, text))
    sent = await outbox.get()
    assert sent is not None
    # The chunks waiting together were merged first, then numbered: no gap in seq.
    assert [(e.kind, e.seq, e.chunk_text) for e in sent] == [
        (EventKind.STATUS, 1, ""),
        (EventKind.RESPONSE_START, 2, ""),
        (EventKind.CHUNK, 3, "abc"),
    ]
    assert {e.turn_id for e in sent} == {"t-1"}
    outbox.put_nowait(event(EventKind.RESPONSE_COMPLETE, reply))
    final = await outbox.get()
    assert final is not None
    assert (final[0].seq, final[0].total_chunks) == (4, 1)
    # The final event ended the log and let it go (nothing refers back to the turn).
    assert reply.log is None
    assert await log.running_turn("s-1") is None
    logged = await collect(log.follow("s-1", "t-1", 0))
    assert [(e.kind, e.seq, e.chunk_text, e.chunk_number) for e in logged] == [
        (EventKind.STATUS, 1, "", 0),
        (EventKind.RESPONSE_START, 2, "", 0),
        (EventKind.CHUNK, 3, "abc", 1),
        (EventKind.RESPONSE_COMPLETE, 4, "", 0),
    ]
    assert all(e.reply is None for e in logged)


async def test_replayed_events_are_neither_renumbered_nor_merged() -> None:
    outbox = Outbox(coalesce=True)
    for seq, text in ((5, "x"), (6, "y")):
        replayed = event(EventKind.CHUNK, None, text)
        replayed.seq, replayed.chunk_number, replayed.turn_id = seq, seq - 1, "other"
        outbox.put_nowait(replayed)
    sent = await outbox.get()
    assert sent is not None
    assert [(e.seq, e.chunk_number, e.chunk_text) for e in sent] == [(5, 4, "x"), (6, 5, "y")]


async def test_when_the_stream_goes_the_log_gets_what_was_queued() -> None:
    log = MemoryReplayLog()
    running_on, cancelled = turn(log, "t-1"), turn(log, "t-2")
    outbox = Outbox()
    for reply in (running_on, cancelled):
        outbox.put_nowait(event(EventKind.RESPONSE_START, reply))
        outbox.put_nowait(event(EventKind.CHUNK, reply, "queued"))
    for queued in outbox.take_pending():
        sink = LOG_SINK if queued.reply is running_on else FINAL_SINK
        sink.put_nowait(queued)
    outbox.close()
    assert await outbox.put(event(EventKind.CHUNK, running_on)) is False
    LOG_SINK.put_nowait(event(EventKind.RESPONSE_COMPLETE, running_on))
    FINAL_SINK.put_nowait(event(EventKind.RESPONSE_COMPLETE, cancelled))
    kept = await collect(log.follow("s-1", "t-1", 0))
    assert [(e.kind, e.seq) for e in kept] == [
        (EventKind.RESPONSE_START, 1),
        (EventKind.CHUNK, 2),
        (EventKind.RESPONSE_COMPLETE, 3),
    ]
    # A reply being cancelled keeps no chunk it never sent (nor counts it as sent).
    ended = await collect(log.follow("s-1", "t-2", 0))
    assert [(e.kind, e.seq) for e in ended] == [
        (EventKind.RESPONSE_START, 1),
        (EventKind.RESPONSE_COMPLETE, 2),
    ]
    assert (cancelled.sent_chars, running_on.sent_chars) == (0, len("queued"))


@settings(max_examples=30)
@given(deltas=strategies.deltas, coalesce=st.booleans(), data=st.data())
async def test_a_resume_after_any_seq_gets_exactly_the_events_after_it(
    deltas: list[str], coalesce: bool, data: st.DataObject
) -> None:
    core = ChatCore(MemoryStore(), ScriptedBackend(deltas), limits=Limits(coalesce_chunks=coalesce))
    session = await core.create_session()
    async with core.open_conversation() as sender:
        await sender.handle(Request(RequestKind.MESSAGE, session.session_id, "hi", "r1"))
        sent = await _until_final(sender)
    assert [e.seq for e in sent] == list(range(1, len(sent) + 1))
    after = data.draw(st.integers(0, len(sent)), label="after_seq")
    async with core.open_conversation() as resumer:
        await resumer.handle(
            Request(
                RequestKind.RESUME, session.session_id, turn_id=sent[0].turn_id, after_seq=after
            )
        )
        resumer.finish_input()
        replayed = await _drain(resumer)
    assert [_view(e) for e in replayed] == [_view(e) for e in sent[after:]]
    _, history = await core.read_session(session.session_id)
    text = "".join(e.chunk_text for e in sent[:after] + replayed if e.kind is EventKind.CHUNK)
    assert history[-1].content == text == "".join(deltas)


def _view(e: Event) -> tuple[object, ...]:
    return (e.turn_id, e.seq, e.kind, e.chunk_text, e.chunk_number, e.total_chunks, e.request_id)


async def _until_final(conversation: Conversation) -> list[Event]:
    events: list[Event] = []
    while not events or events[-1].kind not in (EventKind.RESPONSE_COMPLETE, EventKind.ERROR):
        batch = await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)
        assert batch is not None
        events.extend(batch)
    return events


async def _drain(conversation: Conversation) -> list[Event]:
    events: list[Event] = []
    while (batch := await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)) is not None:
        events.extend(batch)
    return events

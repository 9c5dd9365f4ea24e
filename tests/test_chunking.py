"""Property: any reply, split into any deltas, is chunked, numbered and reassembled exactly."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from chat import ChatCore, EventKind, Limits, MemoryStore, MessageStatus, Request, RequestKind
from chat.events import Event, ReplyCounter
from chat.outbox import Outbox
from tests import strategies
from tests.backends import ScriptedBackend


async def _run_turn(deltas: list[str], limits: Limits) -> tuple[list[Event], str]:
    core = ChatCore(MemoryStore(), ScriptedBackend(deltas), limits=limits)
    session = await core.create_session()
    events: list[Event] = []
    async with core.open_conversation() as conversation:
        await conversation.handle(Request(RequestKind.MESSAGE, session.session_id, "go", "r"))
        conversation.finish_input()
        while (batch := await asyncio.wait_for(conversation.outbox.get(), 10)) is not None:
            events.extend(batch)
            # Read slowly now and then, so that chunks pile up and coalescing has work.
            await asyncio.sleep(0)
    history = await core.get_history(session.session_id)
    assert history[-1].status is MessageStatus.COMPLETE
    return events, history[-1].content


@given(
    deltas=strategies.deltas,
    max_chunk_chars=st.integers(min_value=1, max_value=12),
    coalesce=st.booleans(),
    high_water=st.integers(min_value=1, max_value=8),
)
def test_deltas_are_chunked_numbered_and_reassembled_exactly(
    deltas: list[str], max_chunk_chars: int, coalesce: bool, high_water: int
) -> None:
    limits = Limits(
        max_chunk_chars=max_chunk_chars, coalesce_chunks=coalesce, outbox_high_water=high_water
    )
    events, stored = asyncio.run(_run_turn(deltas, limits))

    chunks = [e for e in events if e.kind is EventKind.CHUNK]
    complete = events[-1]
    assert complete.kind is EventKind.RESPONSE_COMPLETE
    assert [c.chunk_number for c in chunks] == list(range(1, len(chunks) + 1))
    assert complete.total_chunks == len(chunks)
    assert all(c.chunk_text for c in chunks), "no empty chunks"
    assert all(len(c.chunk_text) <= max_chunk_chars for c in chunks)
    assert "".join(c.chunk_text for c in chunks) == "".join(deltas) == stored


@given(pieces=st.lists(strategies.text, min_size=1, max_size=30), limit=st.integers(1, 20))
def test_coalescing_merges_only_consecutive_chunks_of_one_reply(
    pieces: list[str], limit: int
) -> None:
    async def scenario() -> list[Event]:
        outbox = Outbox(coalesce=True, max_chunk_chars=limit, high_water=1000)
        first, second = ReplyCounter(), ReplyCounter()
        for index, piece in enumerate(pieces):
            if not piece or len(piece) > limit:
                continue
            reply, request_id = (first, "a") if index % 3 else (second, "b")
            outbox.put_nowait(
                Event(EventKind.CHUNK, request_id=request_id, chunk_text=piece, reply=reply)
            )
        outbox.close()
        out: list[Event] = []
        while (batch := await outbox.get()) is not None:
            out.extend(batch)
        return out

    merged = asyncio.run(scenario())
    # Every chunk was queued before the writer read any, so the outbox merges as much as it
    # may: consecutive chunks of one reply, up to the limit. This is that rule, greedily.
    expected_chunks: list[tuple[str, str]] = []
    for index, piece in enumerate(pieces):
        if not piece or len(piece) > limit:
            continue
        request_id = "a" if index % 3 else "b"
        if (
            expected_chunks
            and expected_chunks[-1][0] == request_id
            and len(expected_chunks[-1][1]) + len(piece) <= limit
        ):
            expected_chunks[-1] = (request_id, expected_chunks[-1][1] + piece)
            continue
        expected_chunks.append((request_id, piece))
    assert [(e.request_id, e.chunk_text) for e in merged] == expected_chunks
    for request_id in ("a", "b"):
        mine = [e for e in merged if e.request_id == request_id]
        expected = "".join(
            p
            for i, p in enumerate(pieces)
            if p and len(p) <= limit and (i % 3 != 0) == (request_id == "a")
        )
        assert "".join(e.chunk_text for e in mine) == expected
        assert [e.chunk_number for e in mine] == list(range(1, len(mine) + 1))
    assert all(len(e.chunk_text) <= limit for e in merged)


def test_waiting_chunks_of_one_reply_leave_as_one() -> None:
    async def scenario() -> list[Event]:
        outbox = Outbox(coalesce=True, max_chunk_chars=5, high_water=1000)
        reply = ReplyCounter()
        for piece in ("ab", "cd", "e", "fg"):
            outbox.put_nowait(Event(EventKind.CHUNK, chunk_text=piece, reply=reply))
        return await outbox.get() or []

    assert [(e.chunk_text, e.chunk_number) for e in asyncio.run(scenario())] == [
        ("abcde", 1),
        ("fg", 2),
    ]

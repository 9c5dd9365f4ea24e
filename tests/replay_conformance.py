"""The contract of :class:`chat.replay.ReplayLog`, for any implementation.

A test module runs it by importing the tests and defining a ``replay_factory`` fixture: a
callable that takes :class:`~chat.replay.ReplaySettings` and returns an async context manager
giving a fresh, empty log (its own key prefix, say) and cleaning it up afterwards::

    from tests.replay_conformance import *  # noqa: F403

    @pytest.fixture
    def replay_factory() -> ReplayFactory:
        return my_factory

Nothing here waits on wall-clock time except for the window, which tests set short and
poll for with :func:`tests.helpers.eventually`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing

import pytest

from chat.errors import TurnNotFound, TurnOutOfRange
from chat.events import Event, EventKind
from chat.replay import EVENT_OVERHEAD, ReplayLog, ReplaySettings, TurnLog
from tests.helpers import TIMEOUT, eventually

__all__ = [
    "ReplayFactory",
    "test_a_claim_is_remembered_per_session",
    "test_a_follower_falling_behind_eviction_gets_out_of_range",
    "test_a_running_turn_loses_its_oldest_events_over_the_byte_bound",
    "test_aclose_ends_followers_and_watchers",
    "test_ended_turns_are_evicted_before_running_ones",
    "test_ended_turns_expire_after_the_window",
    "test_follow_an_ended_turn_after_a_seq",
    "test_follow_is_live_until_the_final_event",
    "test_follow_unknown_turn_is_not_found",
    "test_running_turn_is_the_oldest_not_ended",
    "test_watch_replays_the_running_turn_then_follows_the_next",
    "test_watchers_are_counted_while_open",
]

ReplayFactory = Callable[[ReplaySettings], AbstractAsyncContextManager[ReplayLog]]

_KINDS = (EventKind.RESPONSE_START, EventKind.CHUNK, EventKind.RESPONSE_COMPLETE)


def event(session_id: str, turn_id: str, seq: int, kind: EventKind, text: str = "") -> Event:
    return Event(
        kind,
        session_id=session_id,
        request_id=f"r-{turn_id}",
        turn_id=turn_id,
        seq=seq,
        chunk_text=text if kind is EventKind.CHUNK else "",
        chunk_number=seq - 1 if kind is EventKind.CHUNK else 0,
    )


class Writer:
    """Writes one turn's events the way the core does: seq 1..n, then end()."""

    def __init__(self, log: TurnLog, session_id: str, turn_id: str) -> None:
        self.log = log
        self.session_id = session_id
        self.turn_id = turn_id
        self.seq = 0

    def put(self, kind: EventKind, text: str = "") -> Event:
        self.seq += 1
        item = event(self.session_id, self.turn_id, self.seq, kind, text)
        self.log.append(item)
        if kind in (EventKind.RESPONSE_COMPLETE, EventKind.ERROR):
            self.log.end()
        return item

    def turn(self, chunks: list[str]) -> None:
        self.put(EventKind.RESPONSE_START)
        for text in chunks:
            self.put(EventKind.CHUNK, text)
        self.put(EventKind.RESPONSE_COMPLETE)


def begin(log: ReplayLog, session_id: str, turn_id: str) -> Writer:
    return Writer(log.begin(session_id, turn_id, f"r-{turn_id}"), session_id, turn_id)


def summary(events: list[Event]) -> list[tuple[str, int, int, str]]:
    return [(e.turn_id, e.seq, int(e.kind), e.chunk_text) for e in events]


async def collect(iterator: AsyncGenerator[Event, None], count: int | None = None) -> list[Event]:
    events: list[Event] = []
    async with asyncio.timeout(TIMEOUT):
        async with aclosing(iterator) as items:
            async for item in items:
                events.append(item)
                if count is not None and len(events) == count:
                    break
    return events


async def test_follow_an_ended_turn_after_a_seq(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        writer = begin(log, "s-1", "t-1")
        writer.turn(["a", "b", "c"])
        everything = await collect(log.follow("s-1", "t-1", 0))
        assert summary(everything) == [
            ("t-1", 1, int(EventKind.RESPONSE_START), ""),
            ("t-1", 2, int(EventKind.CHUNK), "a"),
            ("t-1", 3, int(EventKind.CHUNK), "b"),
            ("t-1", 4, int(EventKind.CHUNK), "c"),
            ("t-1", 5, int(EventKind.RESPONSE_COMPLETE), ""),
        ]
        assert [e.request_id for e in everything] == ["r-t-1"] * 5
        rest = await collect(log.follow("s-1", "t-1", 3))
        assert [e.seq for e in rest] == [4, 5]
        assert await collect(log.follow("s-1", "t-1", 5)) == []


async def test_follow_is_live_until_the_final_event(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        writer.put(EventKind.CHUNK, "one")
        follower = asyncio.create_task(collect(log.follow("s-1", "t-1", 1)))
        # The follower is live: the next event reaches it without the turn ending.
        partial = asyncio.create_task(collect(log.follow("s-1", "t-1", 1), count=2))
        writer.put(EventKind.CHUNK, "two")
        assert [e.chunk_text for e in await partial] == ["one", "two"]
        assert not follower.done()
        writer.put(EventKind.CHUNK, "three")
        writer.put(EventKind.RESPONSE_COMPLETE)
        events = await follower
        assert [e.seq for e in events] == [2, 3, 4, 5]
        assert [e.chunk_text for e in events[:3]] == ["one", "two", "three"]


async def test_follow_unknown_turn_is_not_found(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        with pytest.raises(TurnNotFound):
            await collect(log.follow("s-1", "nope", 0))
        begin(log, "s-1", "t-1").turn(["a"])
        # Another session's turn is not found either: turn ids are per session.
        with pytest.raises(TurnNotFound):
            await collect(log.follow("s-2", "t-1", 0))


async def test_ended_turns_expire_after_the_window(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings(window=0.2)) as log:
        begin(log, "s-1", "t-1").turn(["a", "b"])
        assert log.stats().turns >= 1
        assert len(await collect(log.follow("s-1", "t-1", 0))) == 4

        async def expired() -> bool:
            try:
                await collect(log.follow("s-1", "t-1", 0))
            except TurnOutOfRange:
                return True
            return False

        await eventually(expired, "the turn never left the window")
        stats = log.stats()
        assert stats.expired_turns >= 1
        assert stats.turns == 0
        assert stats.bytes == 0


async def test_a_running_turn_loses_its_oldest_events_over_the_byte_bound(
    replay_factory: ReplayFactory,
) -> None:
    budget = 50 * (EVENT_OVERHEAD + 10)
    async with replay_factory(ReplaySettings(max_bytes=budget)) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        for n in range(500):
            writer.put(EventKind.CHUNK, f"{n:010d}")
            assert log.stats().bytes <= budget
        writer.put(EventKind.RESPONSE_COMPLETE)
        with pytest.raises(TurnOutOfRange):
            await collect(log.follow("s-1", "t-1", 0))
        # Read after a read of the log: an implementation may write in the background.
        stats = log.stats()
        assert stats.bytes <= budget
        assert stats.evicted_events > 0
        # What is held is the end of the turn, in order, with nothing missing.
        tail = await collect(log.follow("s-1", "t-1", writer.seq - 10))
        assert [e.seq for e in tail] == list(range(writer.seq - 9, writer.seq + 1))
        assert tail[-1].kind is EventKind.RESPONSE_COMPLETE


async def test_ended_turns_are_evicted_before_running_ones(
    replay_factory: ReplayFactory,
) -> None:
    budget = 40 * (EVENT_OVERHEAD + 1)
    async with replay_factory(ReplaySettings(max_bytes=budget)) as log:
        old = begin(log, "s-1", "old")
        old.turn(["x"] * 10)
        running = begin(log, "s-2", "running")
        running.put(EventKind.RESPONSE_START)
        for _ in range(30):
            running.put(EventKind.CHUNK, "y")
        # 12 + 31 events do not fit: the ended turn went, the running one is whole.
        with pytest.raises(TurnOutOfRange):
            await collect(log.follow("s-1", "old", 0))
        running.put(EventKind.RESPONSE_COMPLETE)
        assert len(await collect(log.follow("s-2", "running", 0))) == 32
        assert log.stats().evicted_events >= 12


async def test_a_follower_falling_behind_eviction_gets_out_of_range(
    replay_factory: ReplayFactory,
) -> None:
    budget = 20 * (EVENT_OVERHEAD + 1)
    async with replay_factory(ReplaySettings(max_bytes=budget)) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        events = aclosing(log.follow("s-1", "t-1", 0))
        async with events as follower:
            first = await anext(follower)
            assert first.seq == 1
            for _ in range(200):
                writer.put(EventKind.CHUNK, "z")
            writer.put(EventKind.RESPONSE_COMPLETE)

            async def drain() -> None:
                async with asyncio.timeout(TIMEOUT):
                    async for _item in follower:
                        pass

            with pytest.raises(TurnOutOfRange):
                await drain()


async def test_watch_replays_the_running_turn_then_follows_the_next(
    replay_factory: ReplayFactory,
) -> None:
    async with replay_factory(ReplaySettings()) as log:
        begin(log, "s-1", "before").turn(["old"])
        first = begin(log, "s-1", "t-1")
        first.put(EventKind.RESPONSE_START)
        first.put(EventKind.CHUNK, "a")
        watcher = asyncio.create_task(collect(log.watch("s-1"), count=8))

        async def watching() -> bool:
            return await log.watchers("s-1") == 1

        await eventually(watching, "the watch did not begin")
        first.put(EventKind.CHUNK, "b")
        first.put(EventKind.RESPONSE_COMPLETE)
        # Another session's turn is not this watcher's.
        begin(log, "s-2", "elsewhere").turn(["no"])
        begin(log, "s-1", "t-2").turn(["c", "d"])
        events = await watcher
        assert summary(events) == [
            ("t-1", 1, int(EventKind.RESPONSE_START), ""),
            ("t-1", 2, int(EventKind.CHUNK), "a"),
            ("t-1", 3, int(EventKind.CHUNK), "b"),
            ("t-1", 4, int(EventKind.RESPONSE_COMPLETE), ""),
            ("t-2", 1, int(EventKind.RESPONSE_START), ""),
            ("t-2", 2, int(EventKind.CHUNK), "c"),
            ("t-2", 3, int(EventKind.CHUNK), "d"),
            ("t-2", 4, int(EventKind.RESPONSE_COMPLETE), ""),
        ]


async def test_watchers_are_counted_while_open(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        assert await log.watchers("s-1") == 0
        tasks = [asyncio.create_task(collect(log.watch("s-1"))) for _ in range(3)]

        def counted(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await log.watchers("s-1") == n

            return check

        await eventually(counted(3), "three watchers")
        assert await log.watchers("s-2") == 0
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await eventually(counted(0), "watchers gone")


async def test_a_claim_is_remembered_per_session(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        assert await log.claim("s-1", "m-1", "t-1") is None
        assert await log.claim("s-1", "m-1", "t-2") == "t-1"
        assert await log.claim("s-1", "m-1", "t-3") == "t-1"
        assert await log.claim("s-2", "m-1", "t-4") is None
        assert await log.claim("s-1", "m-2", "t-5") is None
        # Two claims at once: exactly one wins, and both name the winner.
        results = await asyncio.gather(
            log.claim("s-1", "m-3", "t-6"), log.claim("s-1", "m-3", "t-7")
        )
        assert results in ([None, "t-6"], ["t-7", None])  # type: ignore[comparison-overlap]


async def test_running_turn_is_the_oldest_not_ended(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        assert await log.running_turn("s-1") is None
        first = begin(log, "s-1", "t-1")
        second = begin(log, "s-1", "t-2")
        assert await log.running_turn("s-1") == "t-1"
        assert await log.running_turn("s-2") is None
        first.turn(["a"])
        assert await log.running_turn("s-1") == "t-2"
        second.put(EventKind.ERROR)
        assert await log.running_turn("s-1") is None


async def test_aclose_ends_followers_and_watchers(replay_factory: ReplayFactory) -> None:
    async with replay_factory(ReplaySettings()) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        follower = asyncio.create_task(collect(log.follow("s-1", "t-1", 0)))
        watcher = asyncio.create_task(collect(log.watch("s-1")))

        async def watching() -> bool:
            return await log.watchers("s-1") == 1

        await eventually(watching, "the watch did not begin")
        await log.aclose()
        async with asyncio.timeout(TIMEOUT):
            assert [e.seq for e in await follower] == [1]
            assert [e.seq for e in await watcher] == [1]

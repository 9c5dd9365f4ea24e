"""The replay log in Redis: the conformance suite, and what only a shared log can show
(servers that see each other's turns, a server that dies, writes batched)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from chat.errors import TurnOutOfRange, Unavailable
from chat.events import EventKind
from chat.replay import ReplayLog, ReplaySettings
from chat.store.redis_replay import _TAIL_KEEP, RedisReplayLog
from tests.helpers import TIMEOUT, eventually
from tests.replay_conformance import *  # noqa: F403
from tests.replay_conformance import ReplayFactory, begin, collect, summary
from tests.stores import REDIS_URL, delete_prefix, redis_store_url, unique_prefix


@asynccontextmanager
async def redis_log(settings: ReplaySettings) -> AsyncIterator[ReplayLog]:
    prefix = unique_prefix()
    log = RedisReplayLog(redis_store_url(prefix), settings)
    try:
        yield log
    finally:
        await log.aclose()
        await delete_prefix(prefix)


@pytest.fixture
def replay_factory() -> ReplayFactory:
    return redis_log


# -- what only a shared log shows -------------------------------------------------------------


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = unique_prefix()
    try:
        yield name
    finally:
        await delete_prefix(name)


@asynccontextmanager
async def server_log(
    url: str, settings: ReplaySettings | None = None, **options: Any
) -> AsyncIterator[RedisReplayLog]:
    log = RedisReplayLog(url, settings, **options)
    try:
        yield log
    finally:
        await log.aclose()


async def test_a_turn_one_server_writes_is_followed_and_watched_from_another(prefix: str) -> None:
    url = redis_store_url(prefix)
    async with server_log(url) as one, server_log(url) as two:
        writer = begin(one, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        writer.put(EventKind.CHUNK, "a")
        await eventually(lambda: _is(two.running_turn("s-1"), "t-1"), "the turn seen elsewhere")
        follower = asyncio.create_task(collect(two.follow("s-1", "t-1", 0)))
        watcher = asyncio.create_task(collect(two.watch("s-1"), count=5))
        await eventually(lambda: _is(one.watchers("s-1"), 1), "the watcher counted on both")
        written = [writer.put(EventKind.CHUNK, "b"), writer.put(EventKind.CHUNK, "c")]
        writer.put(EventKind.RESPONSE_COMPLETE)
        followed, watched = await follower, await watcher
        assert summary(followed) == summary(watched)
        assert summary(followed) == [
            ("t-1", 1, int(EventKind.RESPONSE_START), ""),
            ("t-1", 2, int(EventKind.CHUNK), "a"),
            ("t-1", 3, int(EventKind.CHUNK), "b"),
            ("t-1", 4, int(EventKind.CHUNK), "c"),
            ("t-1", 5, int(EventKind.RESPONSE_COMPLETE), ""),
        ]
        # Field for field the events the writer appended (but the log's own copy).
        assert followed[2:4] == written
        assert await two.running_turn("s-1") is None
        assert await one.watchers("s-1") == 0


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


#: A server that runs a turn and watches its session, until killed.
_DOOMED = """
import asyncio, sys
from chat.events import Event, EventKind
from chat.store.redis_replay import RedisReplayLog

async def main() -> None:
    log = RedisReplayLog(sys.argv[1])
    turn = log.begin("s-1", "t-1", "r-1")
    turn.append(Event(EventKind.RESPONSE_START, session_id="s-1", turn_id="t-1", seq=1))
    watch = log.watch("s-1")
    await anext(watch)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_servers_turn_and_watchers_go_after_a_lease(prefix: str) -> None:
    url = redis_store_url(prefix, lock_lease="0.5")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DOOMED, url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            assert await process.stdout.readline() == b"ready\n"
        async with server_log(url, ReplaySettings(window=3)) as survivor:
            assert await survivor.running_turn("s-1") == "t-1"
            assert await survivor.watchers("s-1") == 1
            follower = survivor.follow("s-1", "t-1", 0)
            assert (await anext(follower)).seq == 1
            process.kill()
            await process.wait()
            # The follower is told the turn's server is gone, not left waiting forever.
            with pytest.raises(Unavailable):
                async with asyncio.timeout(TIMEOUT):
                    await anext(follower)
            await follower.aclose()
            await eventually(lambda: _is(survivor.watchers("s-1"), 0), "its watcher gone")
            assert await survivor.running_turn("s-1") is None

            # Idle a window, the dead turn goes like an ended one.
            async def expired() -> bool:
                try:
                    await collect(survivor.follow("s-1", "t-1", 0))
                except TurnOutOfRange:
                    return True
                except Unavailable:
                    return False
                return False

            await eventually(expired, "the dead turn expired")
            assert survivor.stats().expired_turns == 1
            assert survivor.stats().bytes == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_running_turn_outlives_the_window_and_an_ended_one_does_not(prefix: str) -> None:
    clock = Clock()
    async with server_log(redis_store_url(prefix), ReplaySettings(window=10), clock=clock) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        clock.now = 1000
        assert len(await collect(log.follow("s-1", "t-1", 0), count=1)) == 1
        writer.put(EventKind.RESPONSE_COMPLETE)
        clock.now = 1009.9
        assert len(await collect(log.follow("s-1", "t-1", 0))) == 2
        clock.now = 1010.1
        with pytest.raises(TurnOutOfRange):
            await collect(log.follow("s-1", "t-1", 0))
        assert log.stats().expired_turns == 1
        assert log.stats().turns == 0


async def test_an_interrupt_reaches_the_other_servers_not_its_own(prefix: str) -> None:
    url = redis_store_url(prefix)
    async with server_log(url) as one, server_log(url) as two:
        got: list[str] = []
        two.on_interrupt(got.append)
        begin(two, "s-1", "t-1")  # a server listens once it runs turns

        async def heard() -> bool:
            await one.interrupt("s-1")
            return bool(got)

        await eventually(heard, "the interrupt heard")
        await two.interrupt("s-2")  # its own: not for itself
        await one.interrupt("s-3")
        await eventually(lambda: _is(asyncio.sleep(0, got[-1]), "s-3"), "the last interrupt")
        assert set(got) == {"s-1", "s-3"}


async def _blocked_readers(name: str) -> int:
    """Connections named ``name`` waiting in XREAD BLOCK now (other tests, and other
    programs, may share this Redis)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    return sum(
        1
        for c in clients
        if c.get("name") == name and c.get("cmd") == "xread" and "b" in c.get("flags", "")
    )


async def test_readers_on_one_server_share_one_read_of_the_stream(prefix: str) -> None:
    async with server_log(redis_store_url(prefix, client_name=prefix)) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        watchers = [asyncio.create_task(collect(log.watch("s-1"), count=4)) for _ in range(20)]
        followers = [asyncio.create_task(collect(log.follow("s-1", "t-1", 0))) for _ in range(5)]
        await eventually(lambda: _is(log.watchers("s-1"), 20), "20 watchers")
        await eventually(lambda: _is(_blocked_readers(prefix), 1), "one XREAD for all of them")
        writer.put(EventKind.CHUNK, "a")
        writer.put(EventKind.CHUNK, "b")
        writer.put(EventKind.RESPONSE_COMPLETE)
        for task in watchers:
            assert [e.seq for e in await task] == [1, 2, 3, 4]
        for task in followers:
            assert [e.seq for e in await task] == [1, 2, 3, 4]
        await eventually(
            lambda: _is(_blocked_readers(prefix), 0), "the read stopped with its readers"
        )


async def test_a_reader_behind_what_the_tail_keeps_reads_redis_again(prefix: str) -> None:
    count = 3 * _TAIL_KEEP
    async with server_log(redis_store_url(prefix)) as log:
        writer = begin(log, "s-1", "t-1")
        writer.put(EventKind.RESPONSE_START)
        async with contextlib.aclosing(log.follow("s-1", "t-1", 0)) as slow:
            fast = asyncio.create_task(collect(log.follow("s-1", "t-1", 0)))
            assert (await anext(slow)).seq == 1
            # The fast follower keeps the tail reading; the slow one reads nothing meanwhile.
            for n in range(count):
                writer.put(EventKind.CHUNK, str(n))
            writer.put(EventKind.RESPONSE_COMPLETE)
            everything = await fast
            rest = [e async for e in slow]
    assert [e.seq for e in everything] == list(range(1, count + 3))
    assert [e.seq for e in rest] == list(range(2, count + 3))
    assert [e.chunk_text for e in rest[:-1]] == [str(n) for n in range(count)]

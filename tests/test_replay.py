"""The replay log in memory: the conformance suite, and what only it can show (its clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from chat.errors import TurnOutOfRange
from chat.events import EventKind
from chat.replay import MemoryReplayLog, ReplayLog, ReplaySettings
from tests.replay_conformance import *  # noqa: F403
from tests.replay_conformance import ReplayFactory, begin, collect


@asynccontextmanager
async def memory_log(settings: ReplaySettings) -> AsyncIterator[ReplayLog]:
    log = MemoryReplayLog(settings)
    try:
        yield log
    finally:
        await log.aclose()


@pytest.fixture
def replay_factory() -> ReplayFactory:
    return memory_log


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_running_turn_never_expires_and_an_ended_one_at_the_window() -> None:
    clock = Clock()
    log = MemoryReplayLog(ReplaySettings(window=10), clock=clock)
    writer = begin(log, "s-1", "t-1")
    writer.put(EventKind.RESPONSE_START)
    clock.now = 1000
    assert len(await collect(log.follow("s-1", "t-1", 0), count=1)) == 1
    writer.put(EventKind.RESPONSE_COMPLETE)
    clock.now = 1009.9
    assert len(await collect(log.follow("s-1", "t-1", 0))) == 2
    clock.now = 1010
    with pytest.raises(TurnOutOfRange):
        await collect(log.follow("s-1", "t-1", 0))
    assert log.stats().expired_turns == 1


async def test_a_claim_outlives_the_window_while_its_turn_is_held() -> None:
    clock = Clock()
    log = MemoryReplayLog(ReplaySettings(window=10), clock=clock)
    assert await log.claim("s-1", "m-1", "t-1") is None
    writer = begin(log, "s-1", "t-1")
    clock.now = 100  # the turn runs long
    assert await log.claim("s-1", "m-1", "t-2") == "t-1"
    writer.turn([])
    clock.now = 109
    assert await log.claim("s-1", "m-1", "t-3") == "t-1"
    clock.now = 200
    assert await log.claim("s-1", "m-1", "t-4") is None


async def test_evictions_are_reported() -> None:
    reported: list[int] = []
    log = MemoryReplayLog(ReplaySettings(max_bytes=10_000), on_evicted=reported.append)
    writer = begin(log, "s-1", "t-1")
    writer.turn(["x" * 100] * 1000)
    assert sum(reported) == log.stats().evicted_events > 0
    assert log.stats().bytes <= 10_000

"""StoreHealth follows the store; stats answer during an outage with what the core knows."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chat import ChatCore, EchoBackend, MemoryStore
from chat.errors import StoreUnavailable
from chat.health import StoreHealth


class FlakyStore(MemoryStore):
    """A memory store that can be switched off: then every call fails UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hang = False

    async def ping(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise StoreUnavailable(detail="the flaky store at 10.1.2.3 is down")

    async def count(self, *, owner: str | None = None) -> int:
        if self.down:
            raise StoreUnavailable(detail="the flaky store at 10.1.2.3 is down")
        return await super().count(owner=owner)


async def test_changes_are_reported_once_each_and_logged_with_the_detail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chat.health")
    store = FlakyStore()
    changes: list[bool] = []
    health = StoreHealth(store, interval=1.0, on_change=changes.append)
    assert await health.check()
    store.down = True
    assert not await health.check()
    assert not await health.check()
    assert health.detail == "the flaky store at 10.1.2.3 is down"
    store.down = False
    assert await health.check()
    assert changes == [False, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "10.1.2.3" in warnings[0]


async def test_a_store_that_does_not_answer_is_unavailable_after_the_timeout() -> None:
    store = FlakyStore()
    store.hang = True
    health = StoreHealth(store, interval=1.0, timeout=0.01)
    assert not await health.check()
    assert "did not answer within 0.01s" in health.detail


async def test_the_loop_probes_until_cancelled() -> None:
    store = FlakyStore()
    store.down = True
    changed = asyncio.Event()
    health = StoreHealth(store, interval=0.01, on_change=lambda _: changed.set())
    task = asyncio.create_task(health.run())
    try:
        await asyncio.wait_for(changed.wait(), 10)
    finally:
        task.cancel()
        await asyncio.wait((task,))
    assert not health.available


async def test_stats_answer_during_an_outage_with_the_last_count() -> None:
    store = FlakyStore()
    core = ChatCore(store, EchoBackend(), health=StoreHealth(store))
    await core.create_session()
    assert (await core.stats_snapshot()).active_sessions == 1
    store.down = True
    # Before the probe noticed, and after.
    for _ in range(2):
        stats = await core.stats_snapshot()
        assert (stats.active_sessions, stats.store_unreachable) == (1, True)
        await core.health.check()
    store.down = False
    await core.health.check()
    assert not (await core.stats_snapshot()).store_unreachable

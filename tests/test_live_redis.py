"""``tests/test_live.py`` again with the replay log in Redis: RESUME, WATCH, resends and the
policies work the same when the log is shared (and written in the background)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import chat.core
import chat.server
import tests.test_live
from chat.replay import ReplaySettings
from chat.store.redis_replay import RedisReplayLog
from tests.stores import delete_prefix, redis_store_url, unique_prefix
from tests.test_live import *  # noqa: F403


@pytest.fixture(autouse=True)
async def replay_in_redis(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Every replay log the test makes (the core's default, or one it makes itself) is a
    Redis one, each on a prefix of its own (as a server's log of its own, which is what a
    test with two cores means)."""
    prefixes: list[str] = []
    logs: list[RedisReplayLog] = []

    def make(
        settings: ReplaySettings | None = None,
        *,
        on_evicted: Callable[[int], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> RedisReplayLog:
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        prefixes.append(unique_prefix())
        url = redis_store_url(prefixes[-1])
        log = RedisReplayLog(url, settings, on_evicted=on_evicted, **options)
        logs.append(log)
        return log

    for module in (chat.core, chat.server, tests.test_live):
        monkeypatch.setattr(module, "MemoryReplayLog", make)
    try:
        yield
    finally:
        for log in logs:
            await log.aclose()
        for prefix in prefixes:
            await delete_prefix(prefix)

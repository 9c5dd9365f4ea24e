"""The replay log in Redis: the conformance suite, and what only a shared log can show
(servers that see each other's turns, a server that dies, writes batched)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from chat.replay import ReplayLog, ReplaySettings
from chat.store.redis_replay import RedisReplayLog
from tests.replay_conformance import *  # noqa: F403
from tests.replay_conformance import ReplayFactory
from tests.stores import delete_prefix, redis_store_url, unique_prefix


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

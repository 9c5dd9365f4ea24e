"""Making stores for tests: each kind, with its own file or Redis key prefix, cleaned up."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis

from chat.store import SessionStore, open_store

#: The Redis the tests use (one runs on 127.0.0.1:6379 on this project's machines).
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

STORE_KINDS = ("memory", "sqlite", "redis")


def redis_store_url(prefix: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **options}.items())
    separator = "&" if "?" in REDIS_URL else "?"
    return f"{REDIS_URL}{separator}{query}"


def unique_prefix() -> str:
    return f"grpc-chat-test-{uuid.uuid4().hex[:12]}"


async def delete_prefix(prefix: str) -> int:
    """Delete every key of ``prefix``; return how many there were."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


def store_url(kind: str, directory: Path, prefix: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite://{directory / 'chat.db'}"
    return redis_store_url(prefix)


@asynccontextmanager
async def open_test_store(kind: str, directory: Path) -> AsyncIterator[SessionStore]:
    """An open store of ``kind``; its file or keys are removed afterwards.

    A Redis that cannot be reached fails the test (with the store's UNAVAILABLE message)
    rather than skipping it: the fleet is a feature, and CI has a Redis.
    """
    prefix = unique_prefix()
    store = open_store(store_url(kind, directory, prefix))
    try:
        await store.open()
        yield store
    finally:
        await store.aclose()
        if kind == "redis":
            await delete_prefix(prefix)

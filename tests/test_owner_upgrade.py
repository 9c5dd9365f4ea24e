"""Stores written before sessions had owners upgrade in place: nothing lost, nothing shown
to everyone. Such sessions belong to ``anonymous`` (the identity of ``--auth none``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import redis.asyncio as aioredis

from chat.store.redis import RedisStore
from chat.store.sqlite import SCHEMA_VERSION, SqliteStore, migrate
from chat.types import ANONYMOUS, format_timestamp, utcnow
from tests.stores import REDIS_URL, delete_prefix, redis_store_url, unique_prefix


async def test_a_sqlite_file_from_before_owners_upgrades_and_keeps_its_sessions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, target=1)
    now = format_timestamp(utcnow())
    db.execute(
        "INSERT INTO sessions (session_id, created_at, last_activity, title) VALUES (?, ?, ?, ?)",
        ("old-1", now, now, "from v1"),
    )
    db.close()

    store = SqliteStore(path)
    await store.open()
    try:
        session = await store.get("old-1")
        assert (session.title, session.owner) == ("from v1", ANONYMOUS)
        page = await store.list_sessions(10, owner=ANONYMOUS)
        assert [s.session_id for s in page.sessions] == ["old-1"]
        assert (await store.list_sessions(10, owner="alice")).sessions == []
        assert await store.count(owner="alice") == 0
    finally:
        await store.aclose()
    check = sqlite3.connect(path)
    try:
        (version,) = check.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
    finally:
        check.close()
    assert version == SCHEMA_VERSION == 5
    assert "secrets" in tables
    assert "tokens" in tables


async def test_a_redis_store_from_before_owners_indexes_its_sessions_as_anonymous() -> None:
    prefix = unique_prefix()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    now = format_timestamp(utcnow())
    try:
        # Layout 1: a session hash without an owner, in the two indexes of that time.
        await client.hset(
            f"{prefix}:session:old-1",
            mapping={"created_at": now, "last_activity": now, "title": "from layout 1"},
        )
        await client.zadd(f"{prefix}:by-created", {f"{now}|old-1": 0})
        await client.zadd(f"{prefix}:by-activity", {"old-1": 1})
        store = RedisStore(redis_store_url(prefix))
        await store.open()
        try:
            assert (await store.get("old-1")).owner == ANONYMOUS
            page = await store.list_sessions(10, owner=ANONYMOUS)
            assert [s.title for s in page.sessions] == ["from layout 1"]
            assert (await store.list_sessions(10, owner="alice")).sessions == []
            assert await store.count(owner=ANONYMOUS) == 1
            assert await client.get(f"{prefix}:schema") == "2"
            # Deleting takes it out of the owner's index too.
            await store.delete("old-1")
            assert await store.count(owner=ANONYMOUS) == 0
        finally:
            await store.aclose()
    finally:
        await client.aclose()
        await delete_prefix(prefix)

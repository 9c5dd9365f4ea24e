"""The stores scenario: what a turn's commit costs in each session store, beside its raw floor.

``python -m benchmarks.stores '<json parameters>'`` runs one side for every store kind and
prints one JSON line, ``{kind: {"turns_per_s", "commit_p50_ms", "commit_p99_ms"}}``:

- ``"side": "store"``: the store layer as the server uses it, ``await store.append(id,
  [user, assistant])`` (what :mod:`chat.core` writes at the end of a turn), on the event loop
  ``chat-server`` runs on. SQLite runs it on the store's worker thread, Redis as one Lua
  script.
- ``"side": "floor"``: the same writes with the driver directly and nothing else: for SQLite
  the two message rows and the session's counter in one ``BEGIN IMMEDIATE`` transaction
  through ``sqlite3`` on the calling thread (same file settings: WAL, the same
  ``synchronous``); for Redis the RPUSH, HSET and ZADD in one MULTI/EXEC through redis-py.

One writer commits ``turns`` turns in a row, spread over ``sessions`` sessions, after a
warm-up that is not counted; no server, no network but Redis's loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chat.store import open_store
from chat.store.sqlite import connect
from chat.types import Message, MessageStatus, Role, Session, Usage, format_timestamp, utcnow

#: Store kinds measured: name -> (store URL, given a directory and a Redis key prefix).
KINDS: dict[str, Callable[[Path, str, str], str]] = {
    "sqlite_full": lambda d, redis, prefix: f"sqlite://{d / 'full.db'}?synchronous=full",
    "sqlite_normal": lambda d, redis, prefix: f"sqlite://{d / 'normal.db'}?synchronous=normal",
    "redis": lambda d, redis, prefix: f"{redis}?prefix={prefix}",
}
USER_TEXT = "What is the capital of France, and how many people live there?"
REPLY_TEXT = " ".join(["Paris is the capital of France; about two million people live there."] * 3)
WARMUP = 20


def turn(request_id: str) -> list[Message]:
    now = utcnow()
    return [
        Message(Role.USER, USER_TEXT, now, MessageStatus.COMPLETE, request_id),
        Message(
            Role.ASSISTANT, REPLY_TEXT, now, MessageStatus.COMPLETE, request_id, "m", Usage(12, 40)
        ),
    ]


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    return {
        "turns_per_s": len(latencies) / elapsed,
        "commit_p50_ms": at(0.50),
        "commit_p99_ms": at(0.99),
    }


async def _measure(
    commit: Callable[[str, str], Awaitable[None]], ids: list[str], turns: int
) -> dict[str, float]:
    for n in range(WARMUP):
        await commit(ids[n % len(ids)], f"w{n}")
    latencies = []
    started = time.perf_counter()
    for n in range(turns):
        t0 = time.perf_counter()
        await commit(ids[n % len(ids)], f"r{n}")
        latencies.append(time.perf_counter() - t0)
    return _summary(latencies, time.perf_counter() - started)


async def one_kind(kind: str, p: dict[str, Any], directory: Path) -> dict[str, float]:
    prefix = f"grpc-chat-bench-{uuid.uuid4().hex[:12]}"
    url = KINDS[kind](directory, p["redis_url"], prefix)
    store = open_store(url)
    await store.open()
    try:
        ids = [uuid.uuid4().hex for _ in range(p["sessions"])]
        now = utcnow()
        for session_id in ids:
            await store.create(Session(session_id, now, now, title="bench"))
        if p["side"] == "store":

            async def commit(session_id: str, request_id: str) -> None:
                await store.append(session_id, turn(request_id))

            return await _measure(commit, ids, p["turns"])
        if kind == "redis":
            return await _redis_floor(p, prefix, ids)
        return await _sqlite_floor(store.location, kind, ids, p["turns"])
    finally:
        await store.aclose()
        if kind == "redis":
            await _delete_prefix(p["redis_url"], prefix)


async def _sqlite_floor(path: str, kind: str, ids: list[str], turns: int) -> dict[str, float]:
    db = connect(Path(path), synchronous=kind.removeprefix("sqlite_"))
    seq = dict.fromkeys(ids, 0)
    insert = (
        "INSERT INTO messages (session_id, seq, role, content, created_at, status, request_id, "
        "model, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    update = (
        "UPDATE sessions SET message_count = message_count + ?, last_activity = ? "
        "WHERE session_id = ?"
    )

    async def commit(session_id: str, request_id: str) -> None:
        user, reply = turn(request_id)
        n = seq[session_id]
        seq[session_id] = n + 2
        rows = [
            (session_id, n + k, int(m.role), m.content, format_timestamp(m.created_at),
             int(m.status), m.request_id, m.model,
             None if m.usage is None else m.usage.prompt_tokens,
             None if m.usage is None else m.usage.completion_tokens)
            for k, m in enumerate((user, reply))
        ]  # fmt: skip
        db.execute("BEGIN IMMEDIATE")
        db.executemany(insert, rows)
        db.execute(update, (2, format_timestamp(reply.created_at), session_id))
        db.execute("COMMIT")

    try:
        return await _measure(commit, ids, turns)
    finally:
        db.close()


def _encode(m: Message) -> str:
    usage = None if m.usage is None else [m.usage.prompt_tokens, m.usage.completion_tokens]
    return json.dumps(
        [int(m.role), m.content, format_timestamp(m.created_at), int(m.status), m.request_id,
         m.model, usage],
        ensure_ascii=False,
        separators=(",", ":"),
    )  # fmt: skip


async def _redis_floor(p: dict[str, Any], prefix: str, ids: list[str]) -> dict[str, float]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(p["redis_url"])

    async def commit(session_id: str, request_id: str) -> None:
        user, reply = turn(request_id)
        # The key layout of chat.store.redis (its module docstring).
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush(f"{prefix}:messages:{session_id}", _encode(user), _encode(reply))
            pipe.hset(f"{prefix}:session:{session_id}", "last_activity",
                      format_timestamp(reply.created_at))  # fmt: skip
            micros = int(reply.created_at.timestamp() * 1e6)
            pipe.zadd(f"{prefix}:by-activity", {session_id: micros})
            await pipe.execute()

    try:
        return await _measure(commit, ids, p["turns"])
    finally:
        await client.aclose()


async def _delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def run(p: dict[str, Any]) -> dict[str, dict[str, float]]:
    directory = Path(tempfile.mkdtemp(prefix="grpc-chat-bench-"))
    try:
        return {kind: await one_kind(kind, p, directory) for kind in p["kinds"]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    params = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(params))
    else:
        result = uvloop.run(run(params))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

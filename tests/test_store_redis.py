"""What only the Redis store does: prefixes, connection loss, the leased lock across servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor

import chatpb
from chat import ChatCore, EchoBackend
from chat.errors import ConfigurationError, MissingExtra, StatusCode, StoreUnavailable
from chat.service import ChatService
from chat.store import open_store
from chat.store.redis import RedisStore
from chat.types import ANONYMOUS, Message, Role, Session, SessionPatch, Usage
from tests.helpers import TIMEOUT
from tests.stores import REDIS_URL, delete_prefix, redis_store_url, unique_prefix

T0 = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = unique_prefix()
    try:
        yield name
    finally:
        await delete_prefix(name)


@contextlib.asynccontextmanager
async def redis_store(url: str) -> AsyncIterator[RedisStore]:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    try:
        await store.open()
        yield store
    finally:
        await store.aclose()


def turn(name: str) -> list[Message]:
    return [Message(Role.USER, name, T0), Message(Role.ASSISTANT, name, T0)]


class TcpProxy:
    """A loopback TCP proxy to Redis that can be cut and restored, like a flaky network."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        if self._pipes:
            await asyncio.wait(list(self._pipes))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.wait(pipes)
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()


def test_the_url_sets_prefix_and_lease_and_the_location_hides_secrets() -> None:
    store = RedisStore("redis://user:s3cret@db.internal:6380/2?prefix=staging&lock_lease=2.5")
    assert (store.prefix, store.lock_lease) == ("staging", 2.5)
    assert store.location == "redis://db.internal:6380/2 prefix staging"
    assert "s3cret" not in store.location
    defaults = RedisStore("redis://localhost")
    assert (defaults.prefix, defaults.lock_lease) == ("grpc-chat", 10.0)


@pytest.mark.parametrize(
    ("query", "message"),
    [("lock_lease=soon", "must be seconds"), ("lock_lease=0", "between"), ("prefix=", "word")],
)
def test_bad_redis_options_say_what_is_wrong(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisStore(f"redis://localhost:6379/0?{query}")


async def test_prefixes_keep_deployments_apart(prefix: str) -> None:
    other = unique_prefix()
    try:
        async with (
            redis_store(redis_store_url(prefix)) as first,
            redis_store(redis_store_url(other)) as second,
        ):
            await first.create(Session("s", T0, T0, title="first"))
            assert await second.count() == 0
            await second.create(Session("s", T0, T0, title="second"))
            assert (await first.get("s")).title == "first"
    finally:
        await delete_prefix(other)


async def test_records_written_before_new_fields_existed_read_as_their_defaults(
    prefix: str,
) -> None:
    # What the first release wrote: six hash fields, and messages as 7-element arrays.
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await client.hset(
            f"{prefix}:session:old",
            mapping={
                "created_at": "2025-01-01T00:00:00.000000Z",
                "last_activity": "2025-01-02T00:00:00.000000Z",
                "title": "kept",
                "model": "echo",
                "system_prompt": "",
                "context_policy": 0,
            },
        )
        await client.rpush(
            f"{prefix}:messages:old",
            '[2,"hello","2025-01-02T00:00:00.000000Z",1,"r1","",null]',
            '[3,"hi","2025-01-02T00:00:00.000000Z",1,"r1","echo",[3,4]]',
        )
        await client.zadd(f"{prefix}:by-created", {"2025-01-01T00:00:00.000000Z|old": 0})
        await client.zadd(f"{prefix}:by-activity", {"old": 1})
    finally:
        await client.aclose()
    async with redis_store(redis_store_url(prefix)) as store:
        old, history = await store.read("old")
        assert (old.title, old.owner, old.message_count) == ("kept", ANONYMOUS, 2)
        assert (old.concurrency_policy, old.max_reply_tokens) == (0, 0)
        assert [(m.content, m.usage, m.turn_id) for m in history] == [
            ("hello", None, ""),
            ("hi", Usage(3, 4), ""),
        ]
        # An update to a field's default value changes nothing, even where the record has
        # no such field yet.
        assert await store.update("old", SessionPatch(max_reply_tokens=0), T0) == old
        assert (await store.get("old")).last_activity == old.last_activity


async def test_an_unreachable_redis_is_unavailable_with_a_clear_message() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    store = RedisStore(f"redis://127.0.0.1:{port}/0?prefix=x")
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.open()
    finally:
        await store.aclose()
    assert raised.value.status is StatusCode.UNAVAILABLE
    # Where the store is goes to the server's log (the detail), not to clients.
    assert f"Redis at redis://127.0.0.1:{port}/0 prefix x" in raised.value.detail
    assert "is unreachable" in raised.value.detail
    assert "is unreachable" in raised.value.message
    assert str(port) not in raised.value.message


async def test_an_unreachable_store_is_unavailable_over_grpc() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0?prefix=x")
    core = ChatCore(store, EchoBackend())
    try:
        async with ChannelFor([ChatService(core)]) as channel:
            with pytest.raises(GRPCError) as raised:
                await chatpb.ChatServiceStub(channel).create_session(chatpb.CreateSessionRequest())
    finally:
        await store.aclose()
    assert raised.value.status is Status.UNAVAILABLE
    assert raised.value.message is not None
    assert "session store is unreachable" in raised.value.message
    assert str(port) not in raised.value.message


async def test_a_lost_connection_is_unavailable_then_recovers_without_duplicates(
    prefix: str,
) -> None:
    target = urlsplit(REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}?prefix={prefix}"
    try:
        async with redis_store(url) as store:
            await store.create(Session("s", T0, T0))
            await store.append("s", turn("before"))

            await proxy.stop()
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await store.get("s")
            with pytest.raises(StoreUnavailable):
                await store.append("s", turn("lost"))

            await proxy.start()
            # Pooled connections died with the proxy: the retries reconnect.
            assert (await store.get("s")).message_count == 2
            await store.append("s", turn("after"))
            assert [m.content for m in await store.messages("s")] == [
                "before",
                "before",
                "after",
                "after",
            ]
    finally:
        await proxy.stop()


async def test_a_retried_append_is_applied_once(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same operation id is what a retry of one append sends.
    operation = uuid.uuid4()
    monkeypatch.setattr("chat.store.redis.uuid.uuid4", lambda: operation)
    async with redis_store(redis_store_url(prefix)) as store:
        await store.create(Session("s", T0, T0))
        first = await store.append("s", turn("once"))
        again = await store.append("s", turn("once"))
        assert first == again
        assert len(await store.messages("s")) == 2


async def test_the_lock_orders_turns_across_servers(prefix: str) -> None:
    url = redis_store_url(prefix)
    async with redis_store(url) as first, redis_store(url) as second:
        await first.create(Session("s", T0, T0))

        async def one_turn(store: RedisStore) -> None:
            async with store.lock("s"):
                seen = len(await store.messages("s"))
                await asyncio.sleep(0)
                await store.append("s", [Message(Role.USER, str(seen), T0)])

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(one_turn((first, second)[n % 2]) for n in range(20)))
        assert [m.content for m in await first.messages("s")] == [str(n) for n in range(20)]


async def test_a_lock_left_by_a_dead_server_expires_with_its_lease(prefix: str) -> None:
    async with redis_store(redis_store_url(prefix)) as store:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            # What a server killed while holding the lock leaves behind: a token nobody renews.
            await client.set(f"{prefix}:lock:s", "dead-server", px=300)
            entered = False
            async with asyncio.timeout(TIMEOUT), store.lock("s"):
                entered = True
                assert await client.get(f"{prefix}:lock:s") not in (None, b"dead-server")
            assert entered
            assert await client.exists(f"{prefix}:lock:s") == 0
        finally:
            await client.aclose()


async def test_a_turn_cancelled_while_taking_the_lock_does_not_leave_it_taken(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with redis_store(redis_store_url(prefix)) as store:
        acquire = store._scripts["acquire"]
        taken = asyncio.Event()

        async def acquire_then_wait(**kwargs: Any) -> Any:
            # Redis took the lock, and the turn is cancelled before the reply is read (the
            # client of that turn went away, say).
            await acquire(**kwargs)
            taken.set()
            await asyncio.Event().wait()

        monkeypatch.setitem(store._scripts, "acquire", acquire_then_wait)

        async def turn() -> None:
            async with store.lock("s"):
                raise AssertionError("the lock was never acquired")

        task = asyncio.create_task(turn())
        await asyncio.wait_for(taken.wait(), TIMEOUT)
        task.cancel()
        await asyncio.wait((task,))
        assert task.cancelled()
        # Otherwise every turn on the session waits for the lease to run out.
        assert await store._client.exists(f"{prefix}:lock:s") == 0


async def test_a_held_lock_is_renewed_past_its_lease(prefix: str) -> None:
    url = redis_store_url(prefix, lock_lease="0.8")
    async with redis_store(url) as holder_store, redis_store(url) as waiter_store:
        inside = asyncio.Event()
        order: list[str] = []

        async def holder() -> None:
            async with holder_store.lock("s"):
                inside.set()
                # Three leases long: without renewal the waiter would get in meanwhile. (The
                # lease is renewed every third of it, so only a stall of the whole process
                # for most of a lease could lose it.)
                await asyncio.sleep(2.4)
                order.append("holder out")

        async def waiter() -> None:
            await inside.wait()
            async with waiter_store.lock("s"):
                order.append("waiter in")

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(holder(), waiter())
        assert order == ["holder out", "waiter in"]


def test_without_the_redis_extra_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if redis-py were not installed: importing it fails.
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "chat.store.redis")
    with pytest.raises(MissingExtra, match=r"pip install 'grpc-chat\[redis\]'") as raised:
        open_store("redis://localhost:6379/0")
    assert raised.value.extra == "redis"

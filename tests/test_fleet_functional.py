"""Several ``chat-server`` processes sharing one Redis serve the same sessions.

Also behind nginx as a gRPC load balancer (``grpc_pass``), as the README shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from grpclib.client import Channel

import chatpb
from tests.fleet import history, redis_prefix, replicas, stub_for
from tests.helpers import TIMEOUT, ChatStream, reply_text
from tests.nginx import running_nginx, wait_serving
from tests.stores import REDIS_URL, redis_store_url

pytestmark = pytest.mark.slow

#: A reply that takes many seconds at the pace used below: killed long before its end.
LONG_MESSAGE = " ".join(f"word{n}" for n in range(2000))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as name:
        yield name


async def turn(stream: ChatStream, session_id: str, text: str, request_id: str) -> str:
    stream.message(session_id, text, request_id)
    events = await stream.until_complete(request_id)
    assert events[-1].type == chatpb.ChatResponseType.RESPONSE_COMPLETE, events[-1]
    return reply_text(events)


def assert_turns_whole_and_in_order(messages: list[chatpb.ChatMessage]) -> None:
    """Each user message is followed by its own reply, which saw every earlier turn."""
    assert len(messages) % 2 == 0
    for n, (user, reply) in enumerate(zip(messages[::2], messages[1::2], strict=True), 1):
        assert (user.role, reply.role) == (chatpb.Role.USER, chatpb.Role.ASSISTANT)
        assert user.request_id == reply.request_id
        plural = "" if n == 1 else "s"
        context = f"Echo #{n} ({2 * n - 1} message{plural} in context): {user.content}"
        assert reply.content == context
    request_ids = [m.request_id for m in messages[::2]]
    assert len(set(request_ids)) == len(request_ids), "a duplicated turn"


async def test_replicas_share_sessions_and_keep_concurrent_turns_in_order(prefix: str) -> None:
    with replicas(redis_store_url(prefix), "--pace", "0.01") as (one, two):
        async with stub_for(one) as first, stub_for(two) as second:
            session_id = (await first.create_session(chatpb.CreateSessionRequest())).session_id
            async with ChatStream(first) as stream:
                await turn(stream, session_id, "hello", "a0")
                await turn(stream, session_id, "again", "a1")
            # The other replica continues with the whole history.
            async with ChatStream(second) as stream:
                reply = await turn(stream, session_id, "elsewhere", "b0")
            assert reply == "Echo #3 (5 messages in context): elsewhere"
            assert await history(first, session_id) == await history(second, session_id)

            # Two clients, one on each replica, send on the session at the same time.
            async def burst(stub: chatpb.ChatServiceStub, name: str) -> None:
                async with ChatStream(stub) as stream:
                    for n in range(3):
                        stream.message(session_id, f"{name} {n}", f"{name}{n}")
                    for n in range(3):
                        await stream.until_complete(f"{name}{n}")

            async with asyncio.timeout(TIMEOUT * 2):
                await asyncio.gather(burst(first, "x"), burst(second, "y"))
            messages = await history(second, session_id)
    assert len(messages) == 2 * 9
    assert_turns_whole_and_in_order(messages)
    assert {m.request_id for m in messages} == {"a0", "a1", "b0"} | {
        f"{name}{n}" for name in "xy" for n in range(3)
    }


async def test_a_replica_killed_mid_reply_leaves_the_session_to_the_others(prefix: str) -> None:
    store = redis_store_url(prefix, lock_lease="2")
    with replicas(store, "--pace", "0.005") as (one, two):
        async with stub_for(one) as first, stub_for(two) as second:
            session_id = (await first.create_session(chatpb.CreateSessionRequest())).session_id
            async with ChatStream(first) as stream:
                await turn(stream, session_id, "kept", "r1")
                stream.message(session_id, LONG_MESSAGE, "cut")
                await stream.until("cut", [chatpb.ChatResponseType.CHUNK])
                # Mid-reply, replica 1 holds the session's lock (and renews it)...
                client = aioredis.Redis.from_url(REDIS_URL)
                try:
                    assert await client.exists(f"{prefix}:lock:{session_id}") == 1
                finally:
                    await client.aclose()
                # ...and dies without releasing it.
                one.process.kill()
                one.process.wait(TIMEOUT)
            # Replica 2 waits out the dead replica's lease, then answers.
            async with ChatStream(second) as stream:
                reply = await turn(stream, session_id, "after", "r2")
            assert reply == "Echo #2 (3 messages in context): after"
            messages = await history(second, session_id)
    assert [(m.request_id, m.status) for m in messages] == [
        ("r1", chatpb.MessageStatus.COMPLETE),
        ("r1", chatpb.MessageStatus.COMPLETE),
        ("r2", chatpb.MessageStatus.COMPLETE),
        ("r2", chatpb.MessageStatus.COMPLETE),
    ]
    assert_turns_whole_and_in_order(messages)


# -- behind nginx ---------------------------------------------------------------------------


async def test_a_fleet_behind_nginx_chats_and_lists_sessions(prefix: str, tmp_path: Path) -> None:
    with replicas(redis_store_url(prefix)) as fleet:
        with running_nginx(tmp_path, [server.address for server in fleet]) as port:
            await wait_serving(port)
            async with Channel("127.0.0.1", port) as channel:
                stub = chatpb.ChatServiceStub(channel)
                created = [
                    (await stub.create_session(chatpb.CreateSessionRequest(title=f"t{n}")))
                    for n in range(2)
                ]
                session_id = created[0].session_id
                async with ChatStream(stub) as stream:
                    replies = [
                        await turn(stream, session_id, text, f"r{n}")
                        for n, text in enumerate(("one", "two", "three"))
                    ]
                listed = await stub.list_sessions(chatpb.ListSessionsRequest(page_size=1))
                rest = await stub.list_sessions(
                    chatpb.ListSessionsRequest(page_size=1, page_token=listed.next_page_token)
                )
                messages = await history(stub, session_id)
        # nginx spread the calls: each replica created one of the two sessions.
        for server in fleet:
            async with stub_for(server) as direct:
                stats = await direct.get_server_stats(chatpb.ServerStatsRequest())
            assert stats.total_sessions_created == 1
            assert stats.store == "redis"
    assert replies == [
        "Echo #1 (1 message in context): one",
        "Echo #2 (3 messages in context): two",
        "Echo #3 (5 messages in context): three",
    ]
    assert [s.title for s in (*listed.sessions, *rest.sessions)] == ["t1", "t0"]
    assert listed.total_size == 2
    assert rest.next_page_token == ""
    assert_turns_whole_and_in_order(messages)

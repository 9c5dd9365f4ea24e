"""A Redis outage (issue 12, item 5): health follows the store, nothing completed is lost.

The store is a redis-server of the test's own, killed with SIGKILL and restarted on the same
port. While it is down the server's health is NOT_SERVING (a Watch stream is told), session
RPCs fail UNAVAILABLE without the store's address, GetServerStats still answers; when it is
back, health is SERVING again without a restart, and the stored sessions have every turn
completed before the outage and no part of the one it cut.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

import chatpb
from chat import ChatServer, ServerConfig
from tests.backends import GatedBackend
from tests.helpers import TIMEOUT, ChatStream, reply_text
from tests.redis_server import OwnRedis

pytestmark = pytest.mark.slow

T = chatpb.ChatResponseType
SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """The statuses a ``Watch`` stream on ChatService reports, as they come."""

    def __init__(self, channel: Channel) -> None:
        self._stub = HealthStub(channel)
        self._statuses: asyncio.Queue[int] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _watch(self) -> None:
        async with self._stub.Watch.open() as stream:
            await stream.send_message(HealthCheckRequest(service="ChatService"), end=True)
            async for response in stream:
                await self._statuses.put(response.status)

    async def until(self, status: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while await self._statuses.get() != status:
                pass


async def _turn(stream: ChatStream, backend: GatedBackend, session_id: str, n: int) -> None:
    stream.message(session_id, f"question {n}", f"r{n}")
    backend.release(f"answer {n}")
    backend.finish()
    events = await stream.until_complete(f"r{n}")
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert reply_text(events) == f"answer {n}"


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    async with OwnRedis(tmp_path) as server:
        yield server


async def test_a_redis_outage_turns_health_and_nothing_completed_is_lost(redis: OwnRedis) -> None:
    backend = GatedBackend()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        # The lock of the turn cut by the outage cannot be released: its lease ends it.
        store=f"{redis.url}?prefix=outage&lock_lease=0.5",
        store_check_interval=0.05,
        grace_period=1.0,
    )
    async with (
        ChatServer(config, backend=backend) as server,
        Channel("127.0.0.1", server.port) as channel,
        HealthWatch(channel) as watch,
    ):
        stub = chatpb.ChatServiceStub(channel)
        health = HealthStub(channel)
        await watch.until(SERVING)
        session = await stub.create_session(chatpb.CreateSessionRequest(title="kept"))
        sid = session.session_id
        before = await stub.get_server_stats(chatpb.ServerStatsRequest())
        assert (before.active_sessions, before.store_unreachable) == (1, False)
        async with ChatStream(stub) as stream:
            for n in (1, 2):
                await _turn(stream, backend, sid, n)
            # A reply streams when Redis dies: it cannot be stored, so it ends in an
            # ERROR and leaves nothing behind.
            stream.message(sid, "question 3", "r3")
            backend.release("half an ans")
            await stream.until("r3", [T.CHUNK])
            await redis.kill()
            await watch.until(NOT_SERVING)
            check = await health.Check(HealthCheckRequest(service="ChatService"))
            assert check.status == NOT_SERVING
            backend.release("wer")
            backend.finish()
            cut = await stream.until_complete("r3")
            assert (cut[-1].type, cut[-1].error_code) == (T.ERROR, Status.UNAVAILABLE.value)
            assert str(redis.port) not in cut[-1].error_message

            with pytest.raises(GRPCError) as refused:
                await stub.create_session(chatpb.CreateSessionRequest())
            assert refused.value.status is Status.UNAVAILABLE
            assert str(redis.port) not in (refused.value.message or "")
            stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
            # What it knows: the last count it read.
            assert (stats.store_unreachable, stats.active_sessions) == (True, 1)

            await redis.start()
            await watch.until(SERVING)
            stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
            assert not stats.store_unreachable
            await _turn(stream, backend, sid, 4)

        info = await stub.get_session_info(
            chatpb.SessionInfoRequest(session_id=sid, include_messages=True)
        )
    assert info.title == "kept"
    assert [(m.role, m.content) for m in info.messages] == [
        (role, f"{kind} {n}")
        for n in (1, 2, 4)
        for role, kind in (
            (chatpb.Role.USER, "question"),
            (chatpb.Role.ASSISTANT, "answer"),
        )
    ]
    assert info.message_count == 6

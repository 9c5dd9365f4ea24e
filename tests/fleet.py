"""Replicas of ``chat-server`` on one Redis, for the fleet tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from grpclib.client import Channel

import chatpb
from tests.helpers import ServerProcess, running_server_process
from tests.stores import delete_prefix, unique_prefix


@contextlib.asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own, deleted afterwards."""
    name = unique_prefix()
    try:
        yield name
    finally:
        await delete_prefix(name)


@contextlib.contextmanager
def replicas(store: str, *args: str, count: int = 2) -> Iterator[list[ServerProcess]]:
    """``count`` chat-server processes on ``store``."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(running_server_process("--store", store, *args))
            for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def stub_for(server: ServerProcess) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with Channel(server.host, server.port) as channel:
        yield chatpb.ChatServiceStub(channel)


async def history(stub: chatpb.ChatServiceStub, session_id: str) -> list[chatpb.ChatMessage]:
    info = await stub.get_session_info(
        chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
    )
    return list(info.messages)

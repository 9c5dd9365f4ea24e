"""The load of the soak test, run in a process of its own (``python -m tests.soak_client``).

Usage: ``python -m tests.soak_client PORT STREAMS CANCELLED``. Opens ``STREAMS`` Chat
streams at once over 10 connections (each answers a PING), closes them, then cuts off
``CANCELLED`` long replies, 50 at a time: odd ones with CANCEL, even ones by going away.
Exits 0 when all went as expected. A process of its own, so that the test measures the
server's memory, descriptors and tasks, not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

from grpclib.client import Channel

import chatpb
from tests.helpers import ChatStream

T = chatpb.ChatResponseType
AT_ONCE = 50
CHANNELS = 10
#: 600 words: at the soak server's echo pace, about 1.2 s of reply; each is cut off.
LONG = " ".join(f"word{i}" for i in range(600))


@contextlib.asynccontextmanager
async def _stubs(port: int) -> AsyncIterator[list[chatpb.ChatServiceStub]]:
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(Channel("127.0.0.1", port)) for _ in range(CHANNELS)
        ]
        yield [chatpb.ChatServiceStub(channel) for channel in channels]


async def _pinged_streams(stubs: list[chatpb.ChatServiceStub], count: int) -> None:
    streams = [ChatStream(stubs[n % len(stubs)]) for n in range(count)]
    try:
        for n, stream in enumerate(streams):
            await stream.__aenter__()
            stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id=str(n)))
        for n, stream in enumerate(streams):
            await stream.until(str(n), [T.PONG])
    finally:
        for stream in streams:
            await stream.close()


async def _cut_reply(stub: chatpb.ChatServiceStub, session_id: str, n: int) -> None:
    async with ChatStream(stub) as stream:
        stream.message(session_id, LONG, f"r{n}")
        await stream.until(f"r{n}", [T.CHUNK])
        if n % 2:
            stream.send(
                chatpb.ChatRequest(
                    type=chatpb.ChatRequestType.CANCEL, session_id=session_id, request_id=f"r{n}"
                )
            )
            *_, complete = await stream.until_complete(f"r{n}")
            if complete.finish_reason != chatpb.FinishReason.CANCELLED:
                raise AssertionError(f"reply r{n} was not cancelled: {complete}")
        # Else the client goes away with the reply in flight.


async def main(port: int, streams: int, cancelled: int) -> None:
    async with _stubs(port) as stubs:
        await _pinged_streams(stubs, streams)
        sessions = [
            (await stubs[0].create_session(chatpb.CreateSessionRequest())).session_id
            for _ in range(AT_ONCE)
        ]
        for start in range(0, cancelled, AT_ONCE):
            await asyncio.gather(
                *(
                    _cut_reply(stubs[n % len(stubs)], sessions[n % AT_ONCE], n)
                    for n in range(start, min(cancelled, start + AT_ONCE))
                )
            )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))

"""Memory after cancelled replies (issue 12, item 7): nothing of a turn outlives it.

A cancelled reply used to stay in memory until the cyclic garbage collector ran: the lane's
task was referenced from the frame of its own CancelledError's traceback, and from there
every buffer of the turn (the backend's generator, the reply's parts, the history read for
the context) was reachable. chat-server makes full collections rare (see ``_tune_gc``), so
20 concurrent cancelled 5,000-word replies held 100-170 MB. These tests run with the cyclic
collector off: what a turn allocated must be freed by reference counting alone.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncGenerator, Iterator, Sequence

import pytest
from grpclib.client import Channel

import chatpb
from chat import ChatCore, ChatServer, DisconnectPolicy, MemoryStore, ServerConfig
from chat.backends import Delta, GenerationRequest
from chat.core import Conversation
from chat.events import EventKind, Request, RequestKind
from tests.backends import ScriptedBackend
from tests.helpers import TIMEOUT, ChatStream, eventually


class _Buffer:
    """Stands for what a backend holds while it generates (weakly referenceable)."""


class HoldingBackend:
    """Yields words until cancelled; each generation holds a :class:`_Buffer`."""

    name = "holding"
    default_model = "holding-model"

    def __init__(self) -> None:
        self.buffers: list[weakref.ref[_Buffer]] = []

    async def list_models(self) -> Sequence[str] | None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        buffer = _Buffer()
        self.buffers.append(weakref.ref(buffer))
        while True:
            yield Delta("word ")
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        return None

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.buffers)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _start_reply(conversation: Conversation, session_id: str, request_id: str) -> None:
    await conversation.handle(Request(RequestKind.MESSAGE, session_id, "hi", request_id=request_id))
    chunks = 0
    while chunks < 20:
        batch = await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)
        chunks += sum(e.kind is EventKind.CHUNK for e in batch or [])


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_reply_cut_off_by_its_stream_closing_leaves_nothing_alive() -> None:
    backend = HoldingBackend()
    core = ChatCore(MemoryStore(), backend, on_disconnect=DisconnectPolicy.CANCEL)
    sessions = [await core.create_session() for _ in range(5)]
    async with core.open_conversation() as conversation:
        for n, session in enumerate(sessions):
            await _start_reply(conversation, session.session_id, f"r{n}")
    assert backend.alive() == 0
    assert len(backend.buffers) == 5


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_reply_stopped_by_cancel_leaves_nothing_alive() -> None:
    backend = HoldingBackend()
    core = ChatCore(MemoryStore(), backend, on_disconnect=DisconnectPolicy.CANCEL)
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await _start_reply(conversation, session.session_id, "r1")
        await conversation.handle(Request(RequestKind.CANCEL, session.session_id, request_id="r1"))
        while True:
            batch = await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)
            if any(e.kind is EventKind.RESPONSE_COMPLETE for e in batch or []):
                break
        assert backend.alive() == 0


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_replies_whose_clients_go_away_leave_nothing_alive_over_the_wire() -> None:
    backend = HoldingBackend()
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", grace_period=1.0, on_disconnect="cancel"
    )
    async with ChatServer(config, backend=backend) as server:
        async with Channel("127.0.0.1", server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            for n in range(5):
                session = await stub.create_session(chatpb.CreateSessionRequest())
                async with ChatStream(stub) as stream:
                    stream.message(session.session_id, "hi", f"r{n}")
                    for _ in range(20):
                        await stream.recv()
                # The client is gone: the server notices, stops the reply, keeps it.
                await eventually(
                    lambda: _no_replies(server), "the server to stop the reply", TIMEOUT
                )
        assert backend.alive() == 0
        assert len(backend.buffers) == 5


async def _no_replies(server: ChatServer) -> bool:
    return server.core.stats.active_replies == 0


async def test_a_reply_of_many_chunks_is_stored_exactly_as_sent() -> None:
    deltas = [f"w{n} " for n in range(1000)]
    core = ChatCore(MemoryStore(), ScriptedBackend(deltas))
    session = await core.create_session()
    sent: list[str] = []
    async with core.open_conversation() as conversation:
        await conversation.handle(
            Request(RequestKind.MESSAGE, session.session_id, "hi", request_id="r1")
        )
        conversation.finish_input()
        while (batch := await asyncio.wait_for(conversation.outbox.get(), TIMEOUT)) is not None:
            sent.extend(e.chunk_text for e in batch if e.kind is EventKind.CHUNK)
    _, history = await core.read_session(session.session_id)
    assert history[-1].content == "".join(sent) == "".join(deltas)


#: Server-side objects of a call; none may be left for the cyclic collector.
_SERVER_SIDE = ("chat.", "grpclib.server.Stream")


async def test_calls_leave_no_reference_cycles_on_the_server() -> None:
    backend = HoldingBackend()
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", grace_period=1.0, on_disconnect="cancel"
    )
    async with ChatServer(config, backend=backend) as server:
        gc.collect()
        gc.disable()
        try:
            async with Channel("127.0.0.1", server.port) as channel:
                stub = chatpb.ChatServiceStub(channel)
                session = await stub.create_session(chatpb.CreateSessionRequest())
                for n in range(10):
                    async with ChatStream(stub) as stream:
                        stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING))
                        await stream.recv()
                        if n % 2:
                            # A reply in flight when the client goes away.
                            stream.message(session.session_id, "hi", f"r{n}")
                            await stream.recv()
                await stub.get_server_stats(chatpb.ServerStatsRequest())
                await eventually(lambda: _no_streams(server), "the streams to close", TIMEOUT)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted(
                {
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in gc.garbage
                    if f"{type(o).__module__}.{type(o).__qualname__}".startswith(_SERVER_SIDE)
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []


async def _no_streams(server: ChatServer) -> bool:
    stats = server.core.stats
    return stats.active_streams == 0 and stats.active_replies == 0

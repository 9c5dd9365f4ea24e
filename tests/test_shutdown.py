"""Shutdown leaves no client guessing (issue 12, item 8).

Past the grace period every reply still streaming ends with a final ERROR event (status
UNAVAILABLE, its chunk count) and its stream with a STATUS (SHUTDOWN, UNAVAILABLE) and a
clean end once the client ends its side, before the connection closes; the stored
INTERRUPTED reply is exactly the text the client received. New sessions are refused during
the drain.
"""

from __future__ import annotations

import asyncio

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status

import chatpb
from chat import ChatCore, ChatServer, EchoBackend, MemoryStore, ServerConfig
from chat.events import Event, Request, RequestKind
from chat.types import DisconnectPolicy, MessageStatus, Role
from tests.backends import GatedBackend
from tests.helpers import TIMEOUT, ChatStream, eventually, reply_text

T = chatpb.ChatResponseType
UNAVAILABLE = Status.UNAVAILABLE.value
LONG = " ".join(f"word{i}" for i in range(2000))


async def _until_the_end(stream: ChatStream) -> list[chatpb.ChatResponse]:
    """Every event, ending the stream when asked to (as ChatClient does)."""
    events: list[chatpb.ChatResponse] = []
    while True:
        try:
            event = await stream.recv()
        except EOFError:
            return events
        events.append(event)
        if event.type == T.STATUS and event.status_kind == chatpb.StatusKind.SHUTDOWN:
            stream.end_input()


async def test_replies_cut_by_the_grace_period_end_with_a_final_event_and_are_kept_as_sent() -> (
    None
):
    store = MemoryStore()
    config = ServerConfig(host="127.0.0.1", port=0, grace_period=0.2)
    server = ChatServer(config, store=store, backend=EchoBackend(pace=0.005))
    await server.start()
    try:
        async with Channel("127.0.0.1", server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            sessions = [
                (await stub.create_session(chatpb.CreateSessionRequest())).session_id
                for _ in range(10)
            ]
            streams = [ChatStream(stub) for _ in sessions]
            for stream, session_id in zip(streams, sessions, strict=True):
                await stream.__aenter__()
                stream.message(session_id, LONG, f"r-{session_id}")
            for stream, session_id in zip(streams, sessions, strict=True):
                await stream.until(f"r-{session_id}", [T.CHUNK])
            stopping = asyncio.create_task(server.stop())
            received = {}
            for stream, session_id in zip(streams, sessions, strict=True):
                events = await _until_the_end(stream)
                *reply, final, goaway = [*stream.received]
                assert (final.type, final.request_id) == (T.ERROR, f"r-{session_id}"), final
                assert final.error_code == UNAVAILABLE
                assert final.finish_reason == chatpb.FinishReason.ERROR
                chunks = [e for e in reply if e.type == T.CHUNK]
                assert final.total_chunks == len(chunks)
                assert (goaway.type, goaway.status_kind) == (T.STATUS, chatpb.StatusKind.SHUTDOWN)
                assert goaway.error_code == UNAVAILABLE
                assert events[-1] is goaway
                received[session_id] = reply_text(reply)
                await stream.close()
            await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        await server.stop()
    for session_id, text in received.items():
        _, history = await store.read(session_id)
        asked, kept = history
        assert asked.role is Role.USER
        assert (kept.role, kept.status) == (Role.ASSISTANT, MessageStatus.INTERRUPTED)
        assert kept.content == text
        assert 0 < len(text) < len(LONG)


async def test_new_sessions_are_refused_during_the_drain() -> None:
    backend = GatedBackend()
    server = ChatServer(ServerConfig(host="127.0.0.1", port=0), backend=backend)
    await server.start()
    try:
        async with Channel("127.0.0.1", server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, "hi", "r1")
                await stream.until("r1", [T.RESPONSE_START])
                stopping = asyncio.create_task(server.stop(grace_period=TIMEOUT))

                async def draining() -> bool:
                    return server.core.draining

                await eventually(draining, "the server to drain")
                try:
                    await stub.create_session(chatpb.CreateSessionRequest())
                except GRPCError as error:
                    refused = error
                else:
                    raise AssertionError("a session was created during the drain")
                assert refused.status is Status.UNAVAILABLE
                assert "shutting down" in (refused.message or "")
                # What was in flight goes on.
                backend.release("done")
                backend.finish()
                events = await stream.until_complete("r1")
                assert events[-1].type == T.RESPONSE_COMPLETE
                stream.end_input()
                await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        await server.stop()


async def test_what_the_writer_could_not_write_is_not_kept() -> None:
    backend = GatedBackend()
    # A reply cancelled as its stream breaks (with continue, it would run on and be whole).
    core = ChatCore(MemoryStore(), backend, on_disconnect=DisconnectPolicy.CANCEL)
    session = await core.create_session()
    async with core.open_conversation() as conversation:
        await conversation.handle(
            Request(RequestKind.MESSAGE, session.session_id, "hi", request_id="r1")
        )
        outbox = conversation.outbox
        taken: list[Event] = []
        for text in ("one ", "two ", "three"):
            backend.release(text)
            while not any(e.chunk_text == text for e in taken):
                batch = await asyncio.wait_for(outbox.get(), TIMEOUT)
                taken.extend(batch or [])
        # The stream breaks: the last two chunks were taken but never written.
        outbox.not_written([e for e in taken if e.chunk_text in ("two ", "three")])
    _, history = await core.read_session(session.session_id)
    assert [(m.status, m.content) for m in history] == [
        (MessageStatus.COMPLETE, "hi"),
        (MessageStatus.CANCELLED, "one "),
    ]

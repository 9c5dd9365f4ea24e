"""Live sessions (issue 11) over the wire (grpclib.testing.ChannelFor): turn ids and seq,
RESUME, the on-disconnect policies, WATCH, resends with client_message_id, concurrency
policies, and the replay log's bounds and statistics; each with the replay log in the process
and in Redis."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.testing import ChannelFor

import chat.core
import chat.server
import chatpb
from chat import ChatCore, ChatServer, EchoBackend, MemoryStore, ServerConfig
from chat.errors import StatusCode
from chat.events import Request
from chat.observe import NoObserver, TurnObservation
from chat.replay import EVENT_OVERHEAD, MemoryReplayLog, ReplaySettings
from chat.service import ChatService
from chat.store.redis_replay import RedisReplayLog
from chat.types import DisconnectPolicy, MessageStatus, Role
from tests.backends import GatedBackend, ScriptedBackend
from tests.helpers import TIMEOUT, ChatStream, eventually, reply_text
from tests.stores import delete_prefix, redis_store_url, unique_prefix

T = chatpb.ChatResponseType
R = chatpb.ChatRequestType
TERMINAL = (T.RESPONSE_COMPLETE, T.ERROR)


@pytest.fixture(autouse=True, params=["memory", "redis"])
async def replay_log(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """Every test runs with the replay log in the process and again with it in Redis
    (written in the background): every replay log the test makes (the core's default, or
    one it makes itself) is then a Redis one, each on a prefix of its own (as a server's
    log of its own, which is what a test with two cores means)."""
    if request.param == "memory":
        yield
        return
    prefixes: list[str] = []
    logs: list[RedisReplayLog] = []

    def make(
        settings: ReplaySettings | None = None,
        *,
        on_evicted: Callable[[int], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> RedisReplayLog:
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        prefixes.append(unique_prefix())
        url = redis_store_url(prefixes[-1])
        log = RedisReplayLog(url, settings, on_evicted=on_evicted, **options)
        logs.append(log)
        return log

    for module in (chat.core, chat.server, sys.modules[__name__]):
        monkeypatch.setattr(module, "MemoryReplayLog", make)
    try:
        yield
    finally:
        for log in logs:
            await log.aclose()
        for prefix in prefixes:
            await delete_prefix(prefix)


def view(events: Sequence[chatpb.ChatResponse]) -> list[tuple[str, int, int, str]]:
    """What must be the same for every stream that gets a turn's events."""
    return [(e.turn_id, e.seq, int(e.type), e.chunk_text) for e in events]


def turn_events(events: Sequence[chatpb.ChatResponse]) -> list[chatpb.ChatResponse]:
    return [e for e in events if e.turn_id]


@asynccontextmanager
async def stub_for(core: ChatCore) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with ChannelFor([ChatService(core)]) as channel:
        yield chatpb.ChatServiceStub(channel)


@pytest.fixture
def gated() -> GatedBackend:
    return GatedBackend()


@pytest.fixture
def gated_core(gated: GatedBackend) -> ChatCore:
    return ChatCore(MemoryStore(), gated)


@pytest.fixture
async def stub(gated_core: ChatCore) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with stub_for(gated_core) as stub:
        yield stub


async def new_session(stub: chatpb.ChatServiceStub, **settings: object) -> str:
    created = await stub.create_session(chatpb.CreateSessionRequest(**settings))  # type: ignore[arg-type]
    return created.session_id


async def history(stub: chatpb.ChatServiceStub, session_id: str) -> list[chatpb.ChatMessage]:
    info = await stub.get_session_info(
        chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
    )
    return info.messages


async def until_kind(
    stream: ChatStream, kind: chatpb.ChatResponseType, count: int = 1
) -> list[chatpb.ChatResponse]:
    """Events up to the ``count``-th of ``kind``."""
    events: list[chatpb.ChatResponse] = []
    seen = 0
    while seen < count:
        event = await stream.recv()
        events.append(event)
        seen += event.type == kind
    return events


def resume(
    session_id: str, turn_id: str, after_seq: int, request_id: str = ""
) -> chatpb.ChatRequest:
    return chatpb.ChatRequest(
        type=R.RESUME,
        session_id=session_id,
        turn_id=turn_id,
        after_seq=after_seq,
        request_id=request_id,
    )


# -- turn ids and seq -------------------------------------------------------------------------


async def test_every_event_of_a_turn_has_its_turn_id_and_a_contiguous_seq() -> None:
    core = ChatCore(MemoryStore(), ScriptedBackend(["one ", "two ", "three"]))
    async with stub_for(core) as stub:
        session_id = await new_session(stub)
        async with ChatStream(stub) as stream:
            stream.message(session_id, "hi", "r1")
            events = await stream.until_complete("r1")
            stream.message(session_id, "again", "r2")
            second = await stream.until_complete("r2")
        assert [e.type for e in events] == [T.RESPONSE_START, T.CHUNK, T.CHUNK, T.CHUNK,
                                            T.RESPONSE_COMPLETE]  # fmt: skip
        turn_id = events[0].turn_id
        assert len(turn_id) >= 8
        assert {e.turn_id for e in events} == {turn_id}
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert second[0].turn_id != turn_id
        assert [e.seq for e in second] == list(range(1, len(second) + 1))
        stored = await history(stub, session_id)
        assert [m.turn_id for m in stored] == [turn_id, turn_id] + [second[0].turn_id] * 2


async def test_an_error_ending_a_turn_is_numbered_too(stub: chatpb.ChatServiceStub) -> None:
    async with ChatStream(stub) as stream:
        # The session does not exist: the turn ends with its one event.
        stream.message("no-such-session", "hi", "r1")
        (error,) = await stream.until_complete("r1")
        assert error.type == T.ERROR
        assert error.error_code == StatusCode.NOT_FOUND
        assert error.turn_id
        assert error.seq == 1


# -- RESUME and on-disconnect ------------------------------------------------------------------


@pytest.mark.parametrize("cut_after", [1, 2, 4])
async def test_resume_after_a_disconnect_gets_the_rest_exactly_once(
    stub: chatpb.ChatServiceStub, gated: GatedBackend, cut_after: int
) -> None:
    session_id = await new_session(stub)
    texts = [f"w{n} " for n in range(8)]
    first = ChatStream(stub)
    await first.__aenter__()
    first.message(session_id, "hi", "r1")
    for text in texts[:4]:
        gated.release(text)
    got = [await first.recv() for _ in range(cut_after)]
    # The client goes away; the reply runs on (continue is the default).
    await first.close()
    for text in texts[4:]:
        gated.release(text)
    async with ChatStream(stub) as second:
        second.send(resume(session_id, got[0].turn_id, got[-1].seq, "again"))
        gated.finish()
        rest = await second.until_complete("again")
    events = got + rest
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == T.RESPONSE_COMPLETE
    assert events[-1].finish_reason == chatpb.FinishReason.STOP
    assert {e.request_id for e in rest} == {"again"}
    assert reply_text(events) == "".join(texts)
    stored = await history(stub, session_id)
    assert stored[-1].content == "".join(texts)
    assert stored[-1].status == chatpb.MessageStatus.COMPLETE


async def test_resume_of_a_running_turn_follows_it_live(
    stub: chatpb.ChatServiceStub, gated: GatedBackend
) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as sender, ChatStream(stub) as follower:
        sender.message(session_id, "hi", "r1")
        gated.release("a")
        start, chunk = await sender.recv(), await sender.recv()
        follower.send(resume(session_id, start.turn_id, 0))
        replayed = [await follower.recv(), await follower.recv()]
        assert view(replayed) == view([start, chunk])
        # Without a request_id of its own, a RESUME gets the turn's.
        assert {e.request_id for e in replayed} == {"r1"}
        gated.release("b")
        gated.finish()
        sent = await sender.until_complete("r1")
        followed = await follower.until_complete("r1")
        assert view(followed) == view(sent)


async def test_resume_of_an_unknown_turn_is_not_found_and_the_stream_goes_on(
    stub: chatpb.ChatServiceStub,
) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as stream:
        stream.send(resume(session_id, "feedfacefeedface", 0, "x"))
        (error,) = await stream.until_complete("x")
        assert error.error_code == StatusCode.NOT_FOUND
        stream.send(chatpb.ChatRequest(type=R.PING, request_id="p"))
        assert (await stream.recv()).type == T.PONG


async def test_resume_past_the_window_is_out_of_range_and_the_message_is_stored() -> None:
    clock = [0.0]
    replay = MemoryReplayLog(ReplaySettings(window=60), clock=lambda: clock[0])
    core = ChatCore(MemoryStore(), ScriptedBackend(["all ", "of it"]), replay=replay)
    async with stub_for(core) as stub:
        session_id = await new_session(stub)
        async with ChatStream(stub) as stream:
            stream.message(session_id, "hi", "r1")
            events = await stream.until_complete("r1")
            turn_id = events[0].turn_id
            stream.send(resume(session_id, turn_id, 1, "within"))
            assert [e.seq for e in await stream.until_complete("within")] == [2, 3, 4]
            clock[0] = 61
            stream.send(resume(session_id, turn_id, 1, "past"))
            (error,) = await stream.until_complete("past")
            assert error.error_code == StatusCode.OUT_OF_RANGE
        stored = await history(stub, session_id)
        assert (stored[-1].turn_id, stored[-1].content) == (turn_id, "all of it")


async def test_a_turn_the_log_never_had_but_the_history_has_is_out_of_range() -> None:
    store = MemoryStore()
    first = ChatCore(store, ScriptedBackend(["x"]))
    async with stub_for(first) as stub:
        session_id = await new_session(stub)
        async with ChatStream(stub) as stream:
            stream.message(session_id, "hi", "r1")
            turn_id = (await stream.until_complete("r1"))[0].turn_id
    # Another server process (a restart, or a replica with a log of its own).
    second = ChatCore(store, ScriptedBackend(["x"]))
    async with stub_for(second) as stub, ChatStream(stub) as stream:
        stream.send(resume(session_id, turn_id, 0, "r"))
        (error,) = await stream.until_complete("r")
        assert error.error_code == StatusCode.OUT_OF_RANGE


async def test_resume_of_another_identitys_session_is_not_found() -> None:
    core = ChatCore(MemoryStore(), EchoBackend())
    async with stub_for(core) as stub, ChatStream(stub) as stream:
        stream.send(resume("not-a-session", "t", 0, "r"))
        (error,) = await stream.until_complete("r")
        assert error.error_code == StatusCode.NOT_FOUND
        stream.send(resume("", "t", 0, "r2"))
        (error,) = await stream.until_complete("r2")
        assert error.error_code == StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("server", "session", "continues"),
    [
        (DisconnectPolicy.CONTINUE, chatpb.DisconnectPolicy.UNSPECIFIED, True),
        (DisconnectPolicy.CANCEL, chatpb.DisconnectPolicy.UNSPECIFIED, False),
        (DisconnectPolicy.CANCEL, chatpb.DisconnectPolicy.CONTINUE, True),
        (DisconnectPolicy.CONTINUE, chatpb.DisconnectPolicy.CANCEL, False),
    ],
)
async def test_on_disconnect_continue_runs_the_reply_to_its_end_and_cancel_stops_it(
    gated: GatedBackend,
    server: DisconnectPolicy,
    session: chatpb.DisconnectPolicy,
    continues: bool,
) -> None:
    core = ChatCore(MemoryStore(), gated, on_disconnect=server)
    async with stub_for(core) as stub:
        session_id = await new_session(stub, on_disconnect=session)
        stream = ChatStream(stub)
        await stream.__aenter__()
        stream.message(session_id, "hi", "r1")
        gated.release("before ")
        start = await stream.recv()
        await stream.recv()
        await stream.close()

        async def stream_closed() -> bool:
            return core.stats.active_streams == 0

        await eventually(stream_closed, "the server to see the client go")
        if continues:
            assert not gated.closed.is_set()
            assert core.stats.active_replies == 1
            gated.release("after")
            gated.finish()
        await asyncio.wait_for(gated.closed.wait(), TIMEOUT)

        async def stored() -> bool:
            return len(await history(stub, session_id)) == 2

        await eventually(stored, "the turn to be stored")
        reply = (await history(stub, session_id))[-1]
        if continues:
            assert (reply.status, reply.content) == (chatpb.MessageStatus.COMPLETE, "before after")
        else:
            assert (reply.status, reply.content) == (chatpb.MessageStatus.CANCELLED, "before ")
        # Either way the turn's log ends with its final event, for a client that resumes.
        async with ChatStream(stub) as again:
            again.send(resume(session_id, start.turn_id, 2, "r"))
            rest = await again.until_complete("r")
        assert rest[-1].type == T.RESPONSE_COMPLETE
        assert reply_text(rest) == ("after" if continues else "")
        assert core.stats.active_replies == 0


async def test_a_reply_left_running_can_be_cancelled_from_the_stream_that_resumed_it(
    stub: chatpb.ChatServiceStub, gated_core: ChatCore, gated: GatedBackend
) -> None:
    session_id = await new_session(stub)
    lost = ChatStream(stub)
    await lost.__aenter__()
    lost.message(session_id, "hi", "r1")
    gated.release("kept ")
    start = await lost.recv()
    await lost.recv()
    await lost.close()

    async def gone() -> bool:
        return gated_core.stats.active_streams == 0

    await eventually(gone, "the server to see the client go")
    async with ChatStream(stub) as again:
        again.send(resume(session_id, start.turn_id, 2, "back"))
        again.send(chatpb.ChatRequest(type=R.CANCEL, session_id=session_id, request_id="r1"))
        ended = await again.until_complete("back")
    assert ended[-1].type == T.RESPONSE_COMPLETE
    assert ended[-1].finish_reason == chatpb.FinishReason.CANCELLED
    await asyncio.wait_for(gated.closed.wait(), TIMEOUT)
    stored = await history(stub, session_id)
    assert (stored[-1].content, stored[-1].status) == ("kept ", chatpb.MessageStatus.CANCELLED)


async def test_a_shutdown_ends_a_reply_left_running_at_the_end_of_its_grace_period() -> None:
    backend = GatedBackend()
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", grace_period=0.2)
    server = ChatServer(config, backend=backend)
    await server.start()
    try:
        async with Channel("127.0.0.1", server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session_id = await new_session(stub)
            stream = ChatStream(stub)
            await stream.__aenter__()
            stream.message(session_id, "hi", "r1")
            backend.release("so far")
            await stream.recv()
            await stream.recv()
            await stream.close()

            async def gone() -> bool:
                return server.core.stats.active_streams == 0

            await eventually(gone, "the server to see the client go")
            assert server.core.stats.active_replies == 1
            store = server.core.store
    finally:
        await asyncio.wait_for(server.stop(), TIMEOUT)
    assert backend.closed.is_set()
    (reply,) = [m for m in await store.messages(session_id) if m.role is Role.ASSISTANT]
    assert (reply.content, reply.status) == ("so far", MessageStatus.INTERRUPTED)


async def test_a_continued_reply_leaves_no_reference_cycles() -> None:
    # Over TCP, as tests/test_memory.py does for cancelled replies.
    backend = GatedBackend()
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", grace_period=1.0)
    async with ChatServer(config, backend=backend) as server:
        core = server.core
        gc.collect()
        gc.disable()
        try:
            async with Channel("127.0.0.1", server.port) as channel:
                stub = chatpb.ChatServiceStub(channel)
                session_id = await new_session(stub)
                for n in range(3):
                    stream = ChatStream(stub)
                    await stream.__aenter__()
                    stream.message(session_id, "hi", f"r{n}")
                    backend.release("x")
                    await stream.recv()
                    await stream.close()

                    async def gone() -> bool:
                        return core.stats.active_streams == 0

                    await eventually(gone, "the server to see the client go")
                    assert core.stats.active_replies == 1
                    backend.finish()

                    async def idle() -> bool:
                        return core.stats.active_replies == 0

                    await eventually(idle, "the reply to end")
                # A stream that watches and resumes, and goes away while watching.
                async with ChatStream(stub) as other:
                    other.send(
                        chatpb.ChatRequest(type=R.WATCH, session_id=session_id, request_id="w")
                    )
                    await other.until("w", [T.STATUS])
                    other.send(send_once(session_id, "again", "m-1"))
                    other.send(send_once(session_id, "again2", "m-1"))
                    backend.release("y")
                    backend.finish()
                    await other.until_complete("again")
                    await other.until_complete("again2")

                async def closed() -> bool:
                    return core.stats.active_streams == 0 and core.stats.active_watchers == 0

                await eventually(closed, "the watching stream to close")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted(
                {
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in gc.garbage
                    if f"{type(o).__module__}.{type(o).__qualname__}".startswith(
                        ("chat.", "grpclib.server.Stream")
                    )
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []
    assert len(await core.store.messages(session_id)) == 8


# -- WATCH ------------------------------------------------------------------------------------


async def test_a_watcher_gets_the_senders_events_including_a_turn_already_running(
    stub: chatpb.ChatServiceStub, gated_core: ChatCore, gated: GatedBackend
) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as sender, ChatStream(stub) as watcher:
        sender.message(session_id, "hi", "r1")
        gated.release("early ")
        sent = [await sender.recv(), await sender.recv()]
        watcher.send(chatpb.ChatRequest(type=R.WATCH, session_id=session_id, request_id="w"))
        ack = await watcher.recv()
        assert (ack.type, ack.status_kind, ack.request_id) == (
            T.STATUS,
            chatpb.StatusKind.WATCHING,
            "w",
        )

        async def watched() -> bool:
            info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=session_id))
            return info.watchers == 1 and info.turn_running

        await eventually(watched, "SessionInfo to show the watcher and the running turn")
        gated.release("late")
        gated.finish()
        sent += await sender.until_complete("r1")
        seen = await watcher.until_complete("r1")
        assert [e.seq for e in sent] == [1, 2, 3, 4]
        assert view(seen) == view(sent)
        # The next turn, too, and typing.
        sender.send(chatpb.ChatRequest(type=R.TYPING_START, session_id=session_id))
        typing = await watcher.recv()
        assert typing.type == T.SESSION_UPDATE
        sender.message(session_id, "more", "r2")
        gated.release("next")
        gated.finish()
        sent = await sender.until_complete("r2")
        seen = [e for e in await watcher.until_complete("r2") if e.turn_id]
        assert view(seen) == view(turn_events(sent))
        stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
        assert stats.active_watchers == 1
        watcher.send(chatpb.ChatRequest(type=R.UNWATCH, session_id=session_id, request_id="u"))
        events = await watcher.until("u", [T.STATUS])
        assert events[-1].status_kind == chatpb.StatusKind.NOT_WATCHING

        async def unwatched() -> bool:
            info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=session_id))
            return info.watchers == 0 and not info.turn_running

        await eventually(unwatched, "the watcher to be gone")
        assert (await stub.get_server_stats(chatpb.ServerStatsRequest())).active_watchers == 0


async def test_a_stream_watching_its_own_session_gets_its_turns_once() -> None:
    core = ChatCore(MemoryStore(), ScriptedBackend(["a", "b"]))
    async with stub_for(core) as stub:
        session_id = await new_session(stub)
        async with ChatStream(stub) as stream:
            stream.send(chatpb.ChatRequest(type=R.WATCH, session_id=session_id, request_id="w"))
            await stream.until("w", [T.STATUS])
            stream.message(session_id, "hi", "r1")
            events = await stream.until_complete("r1")
            stream.send(chatpb.ChatRequest(type=R.PING, request_id="p"))
            rest = await stream.until("p", [T.PONG])
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert [e for e in rest if e.turn_id] == []


async def test_watch_of_a_session_that_is_not_the_callers_is_not_found(
    stub: chatpb.ChatServiceStub,
) -> None:
    async with ChatStream(stub) as stream:
        stream.send(chatpb.ChatRequest(type=R.WATCH, session_id="nope", request_id="w"))
        (error,) = await stream.until_complete("w")
        assert error.error_code == StatusCode.NOT_FOUND


class RecordingObserver(NoObserver):
    def __init__(self) -> None:
        self.watchers = 0
        self.evicted = 0

    def turn(self, request: Request, *, received: float, turn_id: str = "") -> TurnObservation:
        return super().turn(request, received=received)

    def watchers_changed(self, delta: int) -> None:
        self.watchers += delta

    def replay_evicted(self, events: int) -> None:
        self.evicted += events


async def test_the_observer_is_told_of_watchers_and_evictions() -> None:
    observer = RecordingObserver()
    core = ChatCore(
        MemoryStore(),
        ScriptedBackend(["x" * 100] * 200),
        observer=observer,
        replay=MemoryReplayLog(
            ReplaySettings(max_bytes=10_000), on_evicted=observer.replay_evicted
        ),
    )
    async with stub_for(core) as stub:
        session_id = await new_session(stub)
        async with ChatStream(stub) as stream:
            stream.send(chatpb.ChatRequest(type=R.WATCH, session_id=session_id, request_id="w"))
            await stream.until("w", [T.STATUS])
            assert await asyncio.wait_for(_value(lambda: observer.watchers, 1), TIMEOUT)
            stream.message(session_id, "hi", "r1")
            await stream.until_complete("r1")
        await eventually(lambda: _value(lambda: observer.watchers, 0), "the watch to end")
    assert observer.evicted == core.replay.stats().evicted_events > 0


async def _value(read: object, expected: int) -> bool:
    assert callable(read)
    return bool(read() == expected)


# -- resends (client_message_id) --------------------------------------------------------------


def send_once(session_id: str, request_id: str, client_message_id: str) -> chatpb.ChatRequest:
    return chatpb.ChatRequest(
        session_id=session_id,
        message="hello",
        request_id=request_id,
        client_message_id=client_message_id,
    )


async def test_the_same_client_message_id_sent_twice_at_once_is_one_turn(
    stub: chatpb.ChatServiceStub, gated: GatedBackend
) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as one, ChatStream(stub) as two:
        one.send(send_once(session_id, "a", "m-1"))
        two.send(send_once(session_id, "b", "m-1"))
        gated.release("only ")
        gated.release("once")
        gated.finish()
        first = await one.until_complete("a")
        second = await two.until_complete("b")
    assert view(first) == view(second)
    assert first[-1].type == T.RESPONSE_COMPLETE
    assert reply_text(second) == "only once"
    assert len(gated.requests) == 1
    stored = await history(stub, session_id)
    assert [(m.role, m.content) for m in stored] == [
        (chatpb.Role.USER, "hello"),
        (chatpb.Role.ASSISTANT, "only once"),
    ]


async def test_a_resend_after_a_reconnect_attaches_to_the_running_turn(
    stub: chatpb.ChatServiceStub, gated: GatedBackend
) -> None:
    session_id = await new_session(stub)
    lost = ChatStream(stub)
    await lost.__aenter__()
    lost.send(send_once(session_id, "a", "m-1"))
    gated.release("part ")
    first = await lost.recv()
    await lost.close()
    async with ChatStream(stub) as again:
        again.send(send_once(session_id, "b", "m-1"))
        gated.release("rest")
        gated.finish()
        events = await again.until_complete("b")
        # Later, once more on the same stream: the same turn, replayed whole.
        again.send(send_once(session_id, "c", "m-1"))
        replayed = await again.until_complete("c")
    assert events[0].turn_id == first.turn_id
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert reply_text(events) == "part rest"
    assert view(replayed) == view(events)
    assert len(gated.requests) == 1
    stored = await history(stub, session_id)
    assert [m.content for m in stored] == ["hello", "part rest"]


# -- concurrency policies ---------------------------------------------------------------------


async def test_reject_refuses_a_message_while_a_turn_runs_and_stores_nothing(
    stub: chatpb.ChatServiceStub, gated: GatedBackend
) -> None:
    session_id = await new_session(stub, concurrency_policy=chatpb.ConcurrencyPolicy.REJECT)
    async with ChatStream(stub) as one, ChatStream(stub) as two:
        one.message(session_id, "first", "a")
        gated.release("x")
        await one.recv()
        two.message(session_id, "second", "b")
        (refused,) = await two.until_complete("b")
        assert refused.type == T.ERROR
        assert refused.error_code == StatusCode.ABORTED
        # The same stream is refused too: the session has one turn at a time.
        one.message(session_id, "third", "c")
        refused_too = [e for e in await one.until("c", [T.ERROR]) if e.request_id == "c"]
        assert refused_too[-1].error_code == StatusCode.ABORTED
        gated.finish()
        await one.until_complete("a")
        # Once it ended, a message is taken.
        one.message(session_id, "fourth", "d")
        gated.release("y")
        gated.finish()
        assert (await one.until_complete("d"))[-1].type == T.RESPONSE_COMPLETE
    stored = await history(stub, session_id)
    assert [m.content for m in stored] == ["first", "x", "fourth", "y"]


async def test_interrupt_cancels_the_running_turn_keeps_its_part_and_answers_the_new_one(
    stub: chatpb.ChatServiceStub, gated: GatedBackend
) -> None:
    session_id = await new_session(stub, concurrency_policy=chatpb.ConcurrencyPolicy.INTERRUPT)
    async with ChatStream(stub) as one, ChatStream(stub) as two:
        one.message(session_id, "first", "a")
        gated.release("partial")
        await until_kind(one, T.CHUNK)
        two.message(session_id, "second", "b")
        ended = await one.until_complete("a")
        assert ended[-1].type == T.RESPONSE_COMPLETE
        assert ended[-1].finish_reason == chatpb.FinishReason.CANCELLED
        gated.release("new")
        gated.finish()
        answered = await two.until_complete("b")
        assert reply_text(answered) == "new"
    stored = await history(stub, session_id)
    assert [(m.content, m.status) for m in stored] == [
        ("first", chatpb.MessageStatus.COMPLETE),
        ("partial", chatpb.MessageStatus.CANCELLED),
        ("second", chatpb.MessageStatus.COMPLETE),
        ("new", chatpb.MessageStatus.COMPLETE),
    ]


async def test_queue_is_the_default(stub: chatpb.ChatServiceStub, gated: GatedBackend) -> None:
    session_id = await new_session(stub)
    async with ChatStream(stub) as one, ChatStream(stub) as two:
        one.message(session_id, "first", "a")
        gated.release("x")
        await one.recv()
        two.message(session_id, "second", "b")
        gated.finish()
        await one.until_complete("a")
        gated.release("y")
        gated.finish()
        assert reply_text(await two.until_complete("b")) == "y"


# -- bounds and statistics --------------------------------------------------------------------


async def test_a_100k_chunk_reply_keeps_the_log_within_its_bytes_and_counts_evictions() -> None:
    chunks = 100_000
    budget = 256 * 1024
    core = ChatCore(
        MemoryStore(),
        ScriptedBackend(["w "] * chunks),
        replay=MemoryReplayLog(ReplaySettings(max_bytes=budget)),
    )
    async with stub_for(core) as stub:
        session_id = await new_session(stub)
        seqs = 0
        async with ChatStream(stub) as stream:
            stream.message(session_id, "hi", "r1")
            while True:
                event = await stream.recv()
                seqs += 1
                assert event.seq == seqs
                assert core.replay.stats().bytes <= budget
                if event.type == T.RESPONSE_COMPLETE:
                    break
        assert seqs == chunks + 2
        stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
        assert 0 < stats.replay_bytes <= budget
        assert stats.replay_turns == 1
        assert stats.replay_evicted_events >= chunks + 2 - budget // EVENT_OVERHEAD
        async with ChatStream(stub) as again:
            again.send(resume(session_id, event.turn_id, 0, "r"))
            (error,) = await again.until_complete("r")
            assert error.error_code == StatusCode.OUT_OF_RANGE
            again.send(resume(session_id, event.turn_id, seqs - 3, "tail"))
            assert [e.seq for e in await again.until_complete("tail")] == [
                seqs - 2,
                seqs - 1,
                seqs,
            ]
        stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
        assert stats.resumed_turns == 2

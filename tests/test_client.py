"""ChatClient against ChatServers: conversations, cancel, reconnection, errors, configuration.

Most tests connect in memory (tests/in_memory.py) to the handlers of a server in this
process; the ones about sockets and processes (an unreachable port, a server restarted on its
port, a frozen or killed server process) use real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import signal
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat
import chat.client
from chat import (
    BackendBadRequest,
    BackendUnavailable,
    ChatClient,
    ChatServer,
    ClientConfig,
    ConfigurationError,
    ConnectionLost,
    ConnectionState,
    ConnectionStateChanged,
    DeadlineExceeded,
    Delta,
    DisconnectPolicy,
    EchoBackend,
    FailedPrecondition,
    FinishReason,
    GenerationRequest,
    InvalidArgument,
    MemoryStore,
    MessageStatus,
    Notices,
    ReconnectPolicy,
    ReplyChunk,
    ReplyCompleted,
    ReplyFailed,
    ReplyStarted,
    ReplyStream,
    Role,
    ServerConfig,
    ServerUnreachable,
    ServingStatus,
    SessionNotFound,
    SessionUpdated,
    StatusCode,
)
from chat.client import parse_target
from chat.types import SessionUpdateKind
from tests.helpers import TIMEOUT, running_server_process
from tests.in_memory import MEMORY_TARGET, InMemoryConnections
from tests.strategies import reconnect_policies

#: Seconds per word of the echo backend when a test needs a reply that is still streaming.
PACE = 0.05
LONG_TEXT = " ".join(f"word{i}" for i in range(200))
FAST_RECONNECT = ReconnectPolicy(max_attempts=100, initial_backoff=0.02, max_backoff=0.1)


class StallingStore(MemoryStore):
    """``count`` (behind GetServerStats) waits until released: a server that does not answer."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def count(self, *, owner: str | None = None) -> int:
        await self.release.wait()
        return await super().count(owner=owner)


class FailingOnceBackend(EchoBackend):
    """Fails its first reply the way an unreachable model would; echoes afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("the model is down")
        async for delta in super().generate(request):
            yield delta


def address(server: ChatServer) -> str:
    return f"127.0.0.1:{server.port}"


def memory_client(server: ChatServer, **options: Any) -> ChatClient:
    """A client of ``server`` whose connections are in memory (see tests/in_memory.py)."""
    return InMemoryConnections(server).client(**options)


@asynccontextmanager
async def serving(
    port: int = 0,
    *,
    pace: float = 0.0,
    store_url: str = "memory://",
    store: MemoryStore | None = None,
    backend: EchoBackend | None = None,
) -> AsyncIterator[ChatServer]:
    """A server on 127.0.0.1 (``port`` 0: any free port), in this process."""
    server_config = ServerConfig(
        host="127.0.0.1", port=port, pace=pace, store=store_url, grace_period=0.2
    )
    async with ChatServer(server_config, store=store, backend=backend) as running:
        yield running


async def next_notice(
    notices: Notices, wanted: Callable[[object], bool], timeout: float = TIMEOUT
) -> object:
    """The first notice for which ``wanted`` is true (others are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            notice = await notices.get()
            if wanted(notice):
                return notice


def state_is(state: ConnectionState, *, min_attempt: int = 0) -> Callable[[object], bool]:
    def check(notice: object) -> bool:
        return (
            isinstance(notice, ConnectionStateChanged)
            and notice.state is state
            and notice.attempt >= min_attempt
        )

    return check


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CLIENT_PACKAGE = Path(chat.client.__file__).parent


def client_tasks() -> list[asyncio.Task[object]]:
    """The running tasks that the client started (their coroutines are in chat/client/)."""
    tasks = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and Path(code.co_filename).is_relative_to(_CLIENT_PACKAGE):
            tasks.append(task)
    return tasks


# -- conversations ------------------------------------------------------------------------------


async def test_a_multi_turn_conversation_streams_typed_events(server: ChatServer) -> None:
    async with memory_client(server) as client:
        session = await client.create_session(title="multi", system_prompt="Be brief.")
        events = [event async for event in client.send(session.session_id, "hello world")]

        assert isinstance(events[0], ReplyStarted)
        assert events[0].context_messages == 1
        assert events[0].model == "echo"
        chunks = [e for e in events if isinstance(e, ReplyChunk)]
        assert [c.number for c in chunks] == list(range(1, len(chunks) + 1))
        assert "".join(c.text for c in chunks) == "Echo #1 (1 message in context): hello world"
        completed = events[-1]
        assert isinstance(completed, ReplyCompleted)
        assert completed.finish_reason is FinishReason.STOP
        assert completed.total_chunks == len(chunks)
        assert completed.message_count == 2
        assert completed.usage is not None

        second = await client.ask(session.session_id, "and again")
        assert second.text == "Echo #2 (3 messages in context): and again"
        assert second.message_count == 4
        assert second.session_id == session.session_id

        history = await client.history(session.session_id)
        assert [(m.role, m.content) for m in history] == [
            (Role.USER, "hello world"),
            (Role.ASSISTANT, "Echo #1 (1 message in context): hello world"),
            (Role.USER, "and again"),
            (Role.ASSISTANT, second.text),
        ]
        assert all(m.status is MessageStatus.COMPLETE for m in history)
        assert client.pending_requests == 0


async def test_one_stream_carries_concurrent_replies_and_answers_pings_meanwhile() -> None:
    async with serving(pace=PACE) as server, memory_client(server) as client:
        first = await client.create_session()
        second = await client.create_session()
        async with (
            client.send(first.session_id, LONG_TEXT) as one,
            client.send(second.session_id, LONG_TEXT) as two,
        ):
            assert isinstance(await anext(one), ReplyStarted)
            assert isinstance(await anext(two), ReplyStarted)
            rtt = await client.ping()
            assert rtt > 0
            # The PONG came back while both replies were still streaming.
            assert not one.done
            assert not two.done
            stats = await client.server_stats()
            assert stats.active_streams == 1
            assert stats.active_replies == 2
            await one.cancel()
            await two.cancel()
            for reply in (one, two):
                last = [event async for event in reply][-1]
                assert isinstance(last, ReplyCompleted)
                assert last.cancelled
        assert client.pending_requests == 0
        assert client.stats.replies_cancelled == 2


async def test_cancel_stops_the_reply_and_the_history_keeps_it_as_cancelled() -> None:
    async with serving(pace=PACE) as server, memory_client(server) as client:
        session = await client.create_session()
        received: list[str] = []
        async with client.send(session.session_id, LONG_TEXT) as reply:
            async for event in reply:
                if isinstance(event, ReplyChunk):
                    received.append(event.text)
                    if len(received) == 2:
                        await reply.cancel()
                last = event
        assert isinstance(last, ReplyCompleted)
        assert last.cancelled
        assert reply.result is not None
        assert reply.result.finish_reason is FinishReason.CANCELLED
        history = await client.history(session.session_id)
        assert history[-1].role is Role.ASSISTANT
        assert history[-1].status is MessageStatus.CANCELLED
        assert history[-1].content == "".join(received)
        assert client.stats.replies_cancelled == 1


async def test_cancel_by_session_stops_every_reply_of_that_session() -> None:
    async with serving(pace=PACE) as server, memory_client(server) as client:
        session = await client.create_session()
        one = client.send(session.session_id, LONG_TEXT)
        two = client.send(session.session_id, "queued behind the first")
        await one.start()
        await two.start()
        assert isinstance(await anext(one), ReplyStarted)
        await client.cancel(session_id=session.session_id)
        ends = [[e async for e in r][-1] for r in (one, two)]
        assert all(isinstance(e, ReplyCompleted) and e.cancelled for e in ends)


async def test_leaving_a_reply_early_cancels_it_and_leaks_nothing() -> None:
    async with serving(pace=PACE) as server:
        baseline = len(client_tasks())
        client = memory_client(server)
        async with client:
            # The reader runs while connected: the count below sees the client's tasks.
            assert len(client_tasks()) > baseline
            session = await client.create_session()
            async with client.notices():
                async with client.send(session.session_id, LONG_TEXT) as reply:
                    async for event in reply:
                        if isinstance(event, ReplyChunk):
                            break
                # The CANCEL went out on leaving. Turns of a session are answered in order,
                # so once the next reply is in, the cancelled one has ended and unregistered.
                await client.ask(session.session_id, "next")
                assert client.pending_requests == 0
                assert client.stats.replies_cancelled == 1
                # Iterating without `async with` and stopping early: the reply runs on, and
                # its request is unregistered when its last event arrives.
                async for _ in client.send(session.session_id, "short one"):
                    break
                await client.ask(session.session_id, "after it")
                assert client.pending_requests == 0
            assert not client._connector.subscribers
        assert len(client_tasks()) == baseline
        assert not client.connected


async def test_retry_runs_a_failed_message_again() -> None:
    async with (
        serving(backend=FailingOnceBackend()) as server,
        memory_client(server) as client,
    ):
        session = await client.create_session()
        events = [e async for e in client.send(session.session_id, "try me")]
        failed = events[-1]
        assert isinstance(failed, ReplyFailed)
        assert failed.code is StatusCode.UNAVAILABLE
        assert "the model is down" in failed.message
        assert client.stats.replies_failed == 1
        history = await client.history(session.session_id)
        assert [(m.role, m.status) for m in history] == [(Role.USER, MessageStatus.FAILED)]

        async with client.retry(session.session_id) as retried:
            reply = await retried.collect()
        assert reply.text.endswith("try me")
        assert reply.finish_reason is FinishReason.STOP

        with pytest.raises(FailedPrecondition, match="nothing to retry"):
            async with client.retry(session.session_id) as again:
                await again.collect()


async def test_another_stream_on_the_session_pushes_session_updates(server: ChatServer) -> None:
    async with memory_client(server) as watcher, memory_client(server) as writer:
        session = await watcher.create_session()
        await watcher.ask(session.session_id, "I was here first")
        async with watcher.notices() as notices:
            await writer.ask(session.session_id, "me too")
            update = await next_notice(notices, lambda n: isinstance(n, SessionUpdated))
        assert isinstance(update, SessionUpdated)
        assert update.session_id == session.session_id
        assert update.message_count == 4
        assert update.session is not None
        assert update.session.message_count == 4
        assert update.kind is SessionUpdateKind.TURN_COMPLETED


async def test_every_session_update_says_what_happened_as_data(server: ChatServer) -> None:
    async with memory_client(server) as watcher, memory_client(server) as other:
        session = await watcher.create_session()
        await watcher.ask(session.session_id, "watching")
        sid = session.session_id
        async with watcher.notices() as notices:

            async def kind_after(action: Callable[[], Any]) -> SessionUpdateKind:
                await action()
                notice = await next_notice(notices, lambda n: isinstance(n, SessionUpdated))
                assert isinstance(notice, SessionUpdated)
                return notice.kind

            kinds = [
                await kind_after(lambda: other.update_session(sid, title="renamed")),
                await kind_after(lambda: other.ask(sid, "hello")),
                await kind_after(lambda: other.delete_session(sid)),
            ]
        assert kinds == [
            SessionUpdateKind.SESSION_UPDATED,
            SessionUpdateKind.TURN_COMPLETED,
            SessionUpdateKind.SESSION_DELETED,
        ]


async def test_the_clients_own_changes_are_not_notices_to_it(server: ChatServer) -> None:
    async with memory_client(server) as me, memory_client(server) as other:
        session = await me.create_session()
        sid = session.session_id
        await me.ask(sid, "following the session")  # the server now tells this stream
        async with me.notices() as notices:
            mine = await me.update_session(sid, title="mine")
            assert mine.title == "mine"
            theirs = await other.update_session(sid, title="theirs")
            # The server sent both, in this order, on my stream: the first I am told of
            # is the other client's, so mine was held back.
            notice = await next_notice(notices, lambda n: isinstance(n, SessionUpdated))
            assert isinstance(notice, SessionUpdated)
            assert notice.session is not None
            assert notice.session.title == "theirs"
            assert notice.session.last_activity == theirs.last_activity

            await me.delete_session(sid)
            await other.create_session(title="unrelated")
            second = await me.create_session()
            await me.ask(second.session_id, "following this one")
            await other.delete_session(second.session_id)
            deleted = await next_notice(notices, lambda n: isinstance(n, SessionUpdated))
            assert isinstance(deleted, SessionUpdated)
            # Not my own delete of the first session: the other's of the second.
            assert (deleted.session_id, deleted.kind) == (
                second.session_id,
                SessionUpdateKind.SESSION_DELETED,
            )


async def test_health_needs_no_conversation_stream(server: ChatServer) -> None:
    connections = InMemoryConnections(server)
    client = connections.client()
    try:
        # Not connected: a channel of its own, closed afterwards.
        assert await client.health() is ServingStatus.SERVING
        assert not client.connected
        assert connections.open == 0
    finally:
        await client.aclose()


async def test_a_bad_field_is_named_by_data_not_by_the_wording(server: ChatServer) -> None:
    # The message text is for people; the field comes from google.rpc.BadRequest (unary)
    # and error_field (Chat), so it survives any rewording.
    async with memory_client(server) as client:
        session = await client.create_session()
        with pytest.raises(InvalidArgument) as error:
            await client.create_session(max_reply_tokens=-1)
        assert error.value.field == "max_reply_tokens"
        assert error.value.problem.startswith("must be between 0")
        events = [e async for e in client.send(session.session_id, "")]
        assert isinstance(events[-1], ReplyFailed)
        assert events[-1].field == "message"
        assert events[-1].error().field == "message"  # type: ignore[attr-defined]


async def test_the_server_statistics_reach_the_client_field_by_field(server: ChatServer) -> None:
    async with memory_client(server) as client:
        session = await client.create_session()
        await client.ask(session.session_id, "count me")
        seen = await client.server_stats()
        snapshot = await server.core.stats_snapshot()
    for field in dataclasses.fields(snapshot):
        if field.name in ("uptime_seconds", "active_streams"):
            continue  # moves on its own; the client's stream is closed by now
        assert getattr(seen, field.name) == getattr(snapshot, field.name), field.name


# -- sessions, stats, health -------------------------------------------------------------------


async def test_session_crud_and_paging(server: ChatServer) -> None:
    async with memory_client(server) as client:
        created = [await client.create_session(title=f"s{i}") for i in range(5)]
        first = await client.list_sessions(page_size=2)
        assert first.total == 5
        assert [s.title for s in first.sessions] == ["s4", "s3"]
        rest = await client.list_sessions(page_size=2, page_token=first.next_page_token)
        assert [s.title for s in rest.sessions] == ["s2", "s1"]
        async with asyncio.timeout(TIMEOUT):
            everything = [s.title async for s in client.iter_sessions(page_size=2)]
        assert everything == ["s4", "s3", "s2", "s1", "s0"]

        target = created[0]
        updated = await client.update_session(
            target.session_id, title="renamed", system_prompt="Be kind.", model="echo"
        )
        assert (updated.title, updated.system_prompt, updated.model) == (
            "renamed",
            "Be kind.",
            "echo",
        )
        # chat-server's echo backend serves its one model, as a remote one serves its list.
        with pytest.raises(InvalidArgument, match="'gpt-4o' is not served by the echo backend"):
            await client.update_session(target.session_id, model="gpt-4o")
        unchanged = await client.update_session(target.session_id)
        assert unchanged.title == "renamed"

        found = await client.find_session(target.session_id[:12])
        assert found.session_id == target.session_id
        await client.ask(target.session_id, "hi")
        assert await client.delete_session(target.session_id) == 2
        with pytest.raises(SessionNotFound) as missing:
            await client.get_session(target.session_id)
        assert missing.value.session_id == target.session_id
        assert client.stats.sessions_created == 5


async def test_find_session_rejects_an_ambiguous_prefix(server: ChatServer) -> None:
    async with memory_client(server) as client:
        for _ in range(40):
            await client.create_session()
        # 40 random UUIDs: two share their first hex digit (pigeonhole over 16).
        sessions = (await client.list_sessions(page_size=40)).sessions
        digits = [s.session_id[0] for s in sessions]
        shared = next(d for d in digits if digits.count(d) > 1)
        with pytest.raises(InvalidArgument, match="matches"):
            await client.find_session(shared)
        with pytest.raises(SessionNotFound):
            await client.find_session("zzzz")


async def test_stats_and_health(server: ChatServer) -> None:
    async with memory_client(server) as client:
        session = await client.create_session()
        await client.ask(session.session_id, "count me")
        stats = await client.server_stats()
        assert (stats.backend, stats.store, stats.version) == ("echo", "memory", chat.__version__)
        assert stats.successful_requests == 1
        assert stats.active_sessions == 1
        assert await client.health() is ServingStatus.SERVING
        assert await client.health("ChatService") is ServingStatus.SERVING
        assert await client.health("NoSuchService") is ServingStatus.SERVICE_UNKNOWN
        mine = client.stats
        assert mine.messages_sent == 1
        assert mine.replies_succeeded == 1
        assert mine.chunks_received > 0
        assert mine.average_response_time > 0
        assert mine.connection_attempts == 1
        assert mine.reconnections == 0


# -- typed errors -------------------------------------------------------------------------------


async def test_server_statuses_become_typed_errors(server: ChatServer) -> None:
    async with memory_client(server) as client:
        session = await client.create_session()
        with pytest.raises(SessionNotFound):
            await client.get_session("no-such-session")
        with pytest.raises(InvalidArgument) as too_long:
            await client.update_session(session.session_id, title="x" * 1000)
        assert too_long.value.field == "title"
        with pytest.raises(InvalidArgument) as page:
            await client.list_sessions(page_size=5000)
        assert page.value.field == "page_size"
        with pytest.raises(InvalidArgument) as empty:
            await client.ask(session.session_id, "   ")
        assert empty.value.field == "message"
        events = [e async for e in client.send("no-such-session", "hello")]
        assert len(events) == 1
        assert isinstance(events[0], ReplyFailed)
        assert events[0].code is StatusCode.NOT_FOUND
        assert isinstance(events[0].error(), SessionNotFound)
        # The stream survived every error.
        assert client.connected
        assert await client.ping() > 0


class RefusingBackend(EchoBackend):
    """Refuses every request the way a model server answering HTTP 400 does."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        raise BackendBadRequest("the model server refused the request (HTTP 400): too long")
        yield Delta()  # pragma: no cover - makes this an async generator


async def test_a_refused_request_reads_as_the_server_said_it() -> None:
    """Issue 15, defect 7: not "request: the model server refused ..."."""
    async with serving(backend=RefusingBackend()) as server, ChatClient(address(server)) as client:
        session = await client.create_session()
        with pytest.raises(InvalidArgument) as refused:
            await client.ask(session.session_id, "hello")
    assert str(refused.value) == "the model server refused the request (HTTP 400): too long"


async def test_a_session_reply_limit_is_set_changed_and_honoured(server: ChatServer) -> None:
    """Issue 15, defect 4: a per-session maximum reply length."""
    async with ChatClient(address(server)) as client:
        session = await client.create_session(max_reply_tokens=2)
        assert session.max_reply_tokens == 2
        reply = await client.ask(session.session_id, "count my words please")
        assert (reply.text, reply.finish_reason) == ("Echo #1 ", FinishReason.LENGTH)
        # 0: back to the server's default (the reply reserve, 1024 tokens).
        changed = await client.update_session(session.session_id, max_reply_tokens=0)
        assert changed.max_reply_tokens == 0
        reply = await client.ask(session.session_id, "and now?")
        assert reply.finish_reason is FinishReason.STOP
        assert (await client.get_session(session.session_id)).max_reply_tokens == 0
        with pytest.raises(InvalidArgument) as too_large:
            await client.create_session(max_reply_tokens=2**31)
        assert too_large.value.field == "max_reply_tokens"


async def test_an_unreachable_server_is_a_typed_error() -> None:
    port = free_port()
    with pytest.raises(ServerUnreachable, match="connection refused") as error:
        async with ChatClient(f"127.0.0.1:{port}"):
            pass
    assert error.value.status is StatusCode.UNAVAILABLE


async def test_a_unary_call_past_its_deadline_raises_deadline_exceeded() -> None:
    store = StallingStore()
    async with (
        serving(store=store) as server,
        memory_client(server, timeout=0.2) as client,
    ):
        try:
            # The request's name goes to the log; the message says what the person needs.
            with pytest.raises(DeadlineExceeded, match=r"no answer from .* within 0\.2s"):
                await client.server_stats()
        finally:
            store.release.set()
        assert client.connected


async def test_a_client_that_is_not_connected_says_so() -> None:
    client = ChatClient("127.0.0.1:1")
    with pytest.raises(RuntimeError, match="not connected"):
        await client.ping()


# -- connection loss and reconnection -----------------------------------------------------------


async def test_each_connection_gets_a_new_channel_from_the_factory(server: ChatServer) -> None:
    connections = InMemoryConnections(server)
    async with connections.client() as client:
        session = await client.create_session()
        assert (connections.opened, connections.open) == (1, 1)
        await client.disconnect()
        assert not client.connected
        assert connections.open == 0
        await client.connect()
        assert (connections.opened, connections.open) == (2, 1)
        reply = await client.ask(session.session_id, "still there?")
        assert reply.text.endswith("still there?")
        assert client.stats.reconnections == 1
    assert connections.open == 0


async def test_a_cut_connection_fails_the_reply_without_a_policy() -> None:
    async with serving(pace=PACE) as server:
        connections = InMemoryConnections(server)
        async with connections.client() as client:
            session = await client.create_session()
            # Paced: the reply is still streaming when the connection is cut.
            reply = client.send(session.session_id, LONG_TEXT)
            async with client.notices() as notices, reply:
                assert isinstance(await anext(reply), ReplyStarted)
                assert connections.drop() == 1
                await next_notice(notices, state_is(ConnectionState.LOST))
                assert not client.connected
                with pytest.raises(ConnectionLost):
                    async for _ in reply:
                        pass
            assert client.pending_requests == 0
            assert client.stats.replies_failed == 1
            await client.connect()
            again = await client.ask(session.session_id, "and now?")
            assert again.text.endswith("and now?")
            assert connections.opened == 2


async def test_a_cut_connection_reconnects_and_the_reply_goes_on() -> None:
    async with serving(pace=PACE) as server:
        connections = InMemoryConnections(server)
        async with connections.client(reconnect=FAST_RECONNECT) as client:
            session = await client.create_session(on_disconnect=DisconnectPolicy.CONTINUE)
            reply = client.send(session.session_id, " ".join(LONG_TEXT.split()[:30]))
            async with client.notices() as notices, reply:
                events: list[object] = [await anext(reply), await anext(reply)]
                assert isinstance(events[0], ReplyStarted)
                assert connections.drop() == 1
                await next_notice(notices, state_is(ConnectionState.LOST))
                events += [event async for event in reply]
            assert isinstance(events[-1], ReplyCompleted)
            assert events[-1].finish_reason is FinishReason.STOP
            chunks = [e for e in events if isinstance(e, ReplyChunk)]
            assert [c.number for c in chunks] == list(range(1, len(chunks) + 1))
            history = await client.history(session.session_id)
            assert reply.result is not None
            assert reply.result.resumes == 1
            assert history[-1].content == reply.text == "".join(c.text for c in chunks)
            assert client.pending_requests == 0
            assert client.stats.replies_failed == 0
            assert client.stats.replies_resumed == 1
            assert connections.opened == 2
            assert client.stats.reconnections == 1


async def test_reconnects_after_the_server_restarts_and_keeps_the_session(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    async with serving(store_url=store) as first:
        port = first.port
        client = ChatClient(f"127.0.0.1:{port}", reconnect=FAST_RECONNECT)
        await client.connect()
        session = await client.create_session(title="durable")
        await client.ask(session.session_id, "before")
        async with client.notices() as notices:
            await first.stop()
            lost = await next_notice(notices, state_is(ConnectionState.LOST))
            assert isinstance(lost, ConnectionStateChanged)
            # The server said why it went away.
            assert "shutting down" in lost.reason
            assert not client.connected
            async with serving(port, store_url=store):
                reply = await client.ask(session.session_id, "after")
                await next_notice(notices, state_is(ConnectionState.RECONNECTED))
                assert reply.text == "Echo #2 (3 messages in context): after"
                assert client.stats.reconnections == 1
                await client.aclose()


async def test_reconnection_backs_off_until_the_server_is_back(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    async with serving(store_url=store) as first:
        port = first.port
        async with ChatClient(f"127.0.0.1:{port}", reconnect=FAST_RECONNECT) as client:
            session = await client.create_session()
            async with client.notices() as notices:
                await first.stop()
                await next_notice(notices, state_is(ConnectionState.LOST))
                asking = asyncio.create_task(client.ask(session.session_id, "are you back?"))
                try:
                    # Attempt 2 is announced only after attempt 1 failed: the server is down.
                    retrying = await next_notice(
                        notices, state_is(ConnectionState.RECONNECTING, min_attempt=2)
                    )
                    assert isinstance(retrying, ConnectionStateChanged)
                    assert retrying.delay > 0
                    async with serving(port, store_url=store):
                        reply = await asyncio.wait_for(asyncio.shield(asking), TIMEOUT)
                finally:
                    asking.cancel()
                assert reply.text.endswith("are you back?")
                assert client.stats.connection_attempts >= 3
                assert client.stats.reconnections == 1


async def test_reconnection_gives_up_after_the_policy_attempts() -> None:
    policy = ReconnectPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    async with serving() as server:
        client = ChatClient(address(server), reconnect=policy)
        await client.connect()
        async with client.notices() as notices:
            await server.stop()
            await next_notice(notices, state_is(ConnectionState.LOST))
        with pytest.raises(ServerUnreachable, match="gave up after 2 attempts"):
            await client.ping()
        await client.aclose()


async def test_without_a_policy_a_lost_connection_raises_until_connect(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    async with serving(store_url=store) as first:
        port = first.port
        async with ChatClient(f"127.0.0.1:{port}") as client:
            session = await client.create_session()
            async with client.notices() as notices:
                await first.stop()
                await next_notice(notices, state_is(ConnectionState.LOST))
            with pytest.raises(ConnectionLost, match="connect"):
                await client.ask(session.session_id, "hello?")
            async with serving(port, store_url=store):
                await client.connect()
                reply = await client.ask(session.session_id, "hello again")
            assert reply.text.startswith("Echo #1")


async def test_a_silent_stream_is_detected_by_keepalive_pings() -> None:
    async with serving(pace=PACE) as server:
        client = memory_client(server, keepalive=0.1, timeout=0.5)
        async with client:
            session = await client.create_session()
            # Slower than the keepalive between chunks: the PINGs are answered, all is well.
            slow = await client.ask(session.session_id, "a b c")
            assert slow.finish_reason is FinishReason.STOP
            assert client.connected


@pytest.mark.slow
async def test_a_server_that_goes_silent_mid_reply_is_detected_by_keepalive() -> None:
    # A frozen server process keeps its socket open and says nothing, as a network partition
    # would: only the keepalive PINGs can tell.
    with running_server_process("--pace", "0.05") as process:
        client = ChatClient(process.address, keepalive=0.1, timeout=0.5)
        async with client:
            session = await client.create_session()

            async def read_while_the_server_freezes() -> None:
                # Bounded: without the keepalive this would wait forever.
                async with asyncio.timeout(TIMEOUT):
                    async for event in client.send(session.session_id, LONG_TEXT):
                        if isinstance(event, ReplyChunk):
                            process.process.send_signal(signal.SIGSTOP)

            try:
                with pytest.raises(ConnectionLost, match="stopped answering"):
                    await read_while_the_server_freezes()
            finally:
                process.process.send_signal(signal.SIGCONT)
            assert not client.connected


@pytest.mark.slow
async def test_a_reply_cut_by_a_dying_server_raises_connection_lost() -> None:
    policy = ReconnectPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    with running_server_process("--pace", "0.2") as process:
        async with ChatClient(process.address, reconnect=policy) as client:
            session = await client.create_session()

            async def read_while_the_server_dies(reply: ReplyStream) -> None:
                async for event in reply:
                    if isinstance(event, ReplyChunk):
                        process.process.send_signal(signal.SIGKILL)

            async with client.send(session.session_id, LONG_TEXT) as reply:
                with pytest.raises(ConnectionLost):
                    await read_while_the_server_dies(reply)
            assert client.stats.replies_failed == 1
            assert client.pending_requests == 0
            assert not client.connected
            # The policy's attempts to resume it; leaving the reply's block did not
            # reconnect again just to cancel a reply that is gone.
            assert client.stats.connection_attempts == 1 + policy.max_attempts


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("localhost:50051", ("localhost", 50051)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("example.org", ("example.org", 50051)),
        ("[::1]:6000", ("::1", 6000)),
        ("[::1]", ("::1", 50051)),
        ("::1", ("::1", 50051)),
        (" host:7 ", ("host", 7)),
    ],
)
def test_parse_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        ":50051",
        "host:",
        "[::1]:",
        "host:0",
        "host:99999",
        "host:http",
        "a:b:c",
        "[::1",
        # Not host names: a resolver would fail later, as "unreachable" (exit 3, not 2).
        "bad target",
        "bad target:50051",
        "host/path:1",
        "-host:1",
        "host..org:1",
        "[not-v6]:1",
    ],
)
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_target(target)


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        ("localhost", "localhost:50051"),
        (" example.org:7 ", "example.org:7"),
        ("::1", "[::1]:50051"),
        ("[::1]:6000", "[::1]:6000"),
    ],
)
def test_the_config_names_the_port_it_dials(target: str, normal: str) -> None:
    # Messages ("cannot reach a chat server at ...") name config.target: with the port.
    assert ClientConfig(target=target).target == normal


@given(policy=reconnect_policies, seed=st.integers(0, 2**32))
def test_backoff_grows_to_its_cap_within_the_jitter(policy: ReconnectPolicy, seed: int) -> None:
    rng = random.Random(seed)
    assert policy.delay(1, rng) == 0.0
    base = policy.initial_backoff
    for attempt in range(2, policy.max_attempts + 1):
        delay = policy.delay(attempt, rng)
        low, high = base * (1 - policy.jitter), base * (1 + policy.jitter)
        assert low - 1e-9 <= delay <= high + 1e-9
        base = min(policy.max_backoff, base * policy.multiplier)


def test_policies_and_configs_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(jitter=2)
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(initial_backoff=3, max_backoff=1)
    with pytest.raises(ConfigurationError):
        ChatClient("localhost:1", timeout=0)


def test_the_constructor_takes_every_config_field_with_its_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(ClientConfig) if f.init}
    parameters = dict(inspect.signature(ChatClient).parameters)
    assert parameters.pop("channel_factory").default is None
    assert parameters.keys() == fields.keys()
    for name, parameter in parameters.items():
        assert parameter.default == fields[name].default, name


async def test_from_config_keeps_the_config_and_takes_a_channel_factory(
    server: ChatServer,
) -> None:
    config = ClientConfig(
        target=MEMORY_TARGET,
        timeout=3.0,
        connect_timeout=2.0,
        reconnect=FAST_RECONNECT,
        keepalive=None,
    )
    connections = InMemoryConnections(server)
    async with ChatClient.from_config(config, channel_factory=connections) as client:
        assert client.config == config
        assert await client.ping() > 0
    assert connections.opened == 1


def test_the_client_api_is_exported() -> None:
    import chat.client
    import chat.errors

    missing = (set(chat.client.__all__) | set(chat.errors.__all__)) - set(chat.__all__)
    assert missing <= {"DEFAULT_TARGET", "format_target", "parse_target"}

"""Live sessions from the client's side: replies that survive a cut connection, watching.

A :class:`~tests.proxy.CuttingProxy` sits between a :class:`~chat.ChatClient` and a real
server on 127.0.0.1 and cuts the connection where Hypothesis says (byte offsets of what the
server sends); whatever the cuts, the reply the client reassembles is the stored assistant
message exactly, each chunk once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chat import (
    Aborted,
    ChatClient,
    ChatServer,
    ConcurrencyPolicy,
    ConnectionLost,
    DisconnectPolicy,
    EchoBackend,
    FinishReason,
    MessageStatus,
    ReconnectPolicy,
    ReplyChunk,
    ReplyCompleted,
    ReplyEvent,
    ReplyStarted,
    Role,
    ServerConfig,
    SessionUpdated,
    WatchEvent,
)
from tests.helpers import TIMEOUT, eventually
from tests.proxy import CuttingProxy

#: Reconnect at once and often: every cut costs a reconnection, some cuts land in one.
RECONNECT = ReconnectPolicy(max_attempts=50, initial_backoff=0.005, max_backoff=0.02)
WORDS = " ".join(f"w{i}" for i in range(40))


@asynccontextmanager
async def serving(
    port: int = 0, *, pace: float = 0.0, store: str = "memory://"
) -> AsyncIterator[ChatServer]:
    config = ServerConfig(host="127.0.0.1", port=port, pace=pace, store=store, grace_period=0.2)
    async with ChatServer(config, backend=EchoBackend(pace=pace)) as server:
        yield server


def chunks_of(events: Sequence[ReplyEvent]) -> list[ReplyChunk]:
    return [e for e in events if isinstance(e, ReplyChunk)]


async def read_all(reply: AsyncIterator[ReplyEvent]) -> list[ReplyEvent]:
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in reply]


async def turn_messages(client: ChatClient, session_id: str, turn_id: str) -> list[object]:
    history = await client.history(session_id)
    return [(m.role, m.content, m.status) for m in history if m.turn_id == turn_id]


# -- a reply survives cut connections -----------------------------------------------------------


#: How the stored assistant message of a reply that ended so reads.
_STORED_AS = {
    FinishReason.STOP: MessageStatus.COMPLETE,
    FinishReason.CANCELLED: MessageStatus.CANCELLED,
}


async def _one_cut_reply(server: ChatServer, offsets: list[int], policy: DisconnectPolicy) -> None:
    proxy = CuttingProxy(server.port)
    async with proxy, ChatClient(proxy.target, reconnect=RECONNECT, keepalive=1.0) as client:
        session = await client.create_session(on_disconnect=policy)
        proxy.arm(offsets)
        reply = client.send(session.session_id, WORDS)
        events = await read_all(reply)
        proxy.arm([])
        completed = events[-1]
        assert isinstance(completed, ReplyCompleted), events
        event(f"{policy.name}: {completed.finish_reason.name}, resumed {reply.resumes}")
        if policy is DisconnectPolicy.CONTINUE:
            assert completed.finish_reason is FinishReason.STOP
        else:
            # Cancelled if a cut came while the turn ran, complete if none did.
            assert completed.finish_reason in _STORED_AS
        chunks = chunks_of(events)
        # Each event once, in order: seq 1..n over the turn, chunk numbers 1..k.
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [c.number for c in chunks] == list(range(1, len(chunks) + 1))
        assert completed.total_chunks == len(chunks)
        turn_id = completed.turn_id
        assert turn_id
        assert {e.turn_id for e in events} == {turn_id}
        text = "".join(c.text for c in chunks)
        # One turn stored, whatever was sent again: the reply is its assistant message.
        # (Read directly: a unary call on a connection cut an instant ago is not retried.)
        async with ChatClient(f"127.0.0.1:{server.port}") as direct:
            history = await direct.history(session.session_id)
        assert [(m.role, m.status) for m in history] == [
            (Role.USER, MessageStatus.COMPLETE),
            (Role.ASSISTANT, _STORED_AS[completed.finish_reason]),
        ]
        assert history[0].content == WORDS
        assert history[1].content == text
        assert history[1].turn_id == turn_id
        assert client.pending_requests == 0


def test_a_reply_cut_anywhere_is_reassembled_exactly_each_chunk_once() -> None:
    cut_points = st.lists(st.integers(min_value=0, max_value=6000), max_size=3)
    with asyncio.Runner() as runner:
        # Paced a little: some cuts land while the turn runs, others after it ended.
        config = ServerConfig(host="127.0.0.1", port=0, store="memory://", pace=0.001)
        server = ChatServer(config)
        runner.run(server.start())
        try:

            @settings(
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            )
            @given(offsets=cut_points, policy=st.sampled_from(list(DisconnectPolicy)[1:]))
            def cut(offsets: list[int], policy: DisconnectPolicy) -> None:
                runner.run(_one_cut_reply(server, offsets, policy))

            cut()
        finally:
            runner.run(server.stop())


async def _one_cut_watch(server: ChatServer, offsets: list[int]) -> None:
    proxy = CuttingProxy(server.port)
    direct = f"127.0.0.1:{server.port}"
    async with (
        proxy,
        ChatClient(proxy.target, reconnect=RECONNECT, keepalive=1.0) as watcher,
        ChatClient(direct) as sender,
    ):
        session = await sender.create_session()
        seen: list[WatchEvent] = []
        async with watcher.watch(session.session_id) as watch:
            proxy.arm(offsets)
            async with sender.send(session.session_id, WORDS) as reply:
                async with asyncio.timeout(TIMEOUT):
                    async for item in watch:
                        if not isinstance(item.event, SessionUpdated):
                            seen.append(item)
                        if isinstance(item.event, ReplyCompleted):
                            break
                sent = await read_all(reply)
            proxy.arm([])
        # The watch's events of the turn: the sender's, each once, in order.
        assert [(w.seq, type(w.event)) for w in seen] == [(e.seq, type(e)) for e in sent]
        assert {w.turn_id for w in seen} == {reply.turn_id}
        history = await sender.history(session.session_id)
        text = "".join(w.event.text for w in seen if isinstance(w.event, ReplyChunk))
        assert text == history[1].content


def test_a_watch_cut_anywhere_sees_each_event_of_the_turn_once() -> None:
    cut_points = st.lists(st.integers(min_value=0, max_value=6000), max_size=3)
    with asyncio.Runner() as runner:
        # Slow enough that the turn outlasts a reconnection: a turn that began and ended
        # while a watch was away is not replayed to it (only running ones and those it
        # was in the middle of are).
        config = ServerConfig(host="127.0.0.1", port=0, store="memory://", pace=0.005)
        server = ChatServer(config)
        runner.run(server.start())
        try:

            @settings(
                max_examples=max(10, settings().max_examples // 2),
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            )
            @given(offsets=cut_points)
            def cut(offsets: list[int]) -> None:
                runner.run(_one_cut_watch(server, offsets))

            cut()
        finally:
            runner.run(server.stop())


async def test_a_cut_before_the_turn_began_sends_the_message_again_with_its_id() -> None:
    async with serving(pace=0.01) as server:
        proxy = CuttingProxy(server.port)
        async with proxy, ChatClient(proxy.target, reconnect=RECONNECT) as client:
            session = await client.create_session(on_disconnect=DisconnectPolicy.CONTINUE)
            # Nothing more from the server reaches the client: the MESSAGE goes out, its
            # turn starts, and the client learns nothing of it before the cut.
            proxy.freeze()
            reply = client.send(session.session_id, "said once")
            await reply.start()
            async with ChatClient(f"127.0.0.1:{server.port}") as observer:

                async def turn_runs() -> bool:
                    return (await observer.get_session(session.session_id)).turn_running

                await eventually(turn_runs, "the turn to start")
            proxy.cut_all()
            events = await read_all(reply)
            assert reply.resumes == 1
            assert reply.result is not None
            # The resend had the same client_message_id: the server attached it to the
            # running turn; there is one user message and one reply.
            history = await client.history(session.session_id)
            assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
            assert (
                history[1].content
                == reply.result.text
                == "".join(c.text for c in chunks_of(events))
            )
            assert isinstance(events[0], ReplyStarted)
            assert [e.seq for e in events] == list(range(events[0].seq, events[-1].seq + 1))


async def test_the_same_client_message_id_twice_is_one_turn() -> None:
    async with serving() as server, ChatClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session()
        first = await client.ask(session.session_id, "only once", client_message_id="m-1")
        second = await client.ask(session.session_id, "only once", client_message_id="m-1")
        assert second.turn_id == first.turn_id
        assert second.text == first.text
        assert len(await client.history(session.session_id)) == 2


async def test_every_message_gets_its_own_client_message_id() -> None:
    async with serving() as server, ChatClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session()
        one = client.send(session.session_id, "same words")
        two = client.send(session.session_id, "same words")
        assert one.client_message_id
        assert two.client_message_id
        assert one.client_message_id != two.client_message_id
        assert client.retry(session.session_id).client_message_id == ""
        await read_all(one)
        await read_all(two)
        assert len(await client.history(session.session_id)) == 4


async def test_a_turn_the_server_forgot_is_completed_from_the_stored_message(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    async with serving(pace=0.01, store=store) as first:
        port = first.port
        proxy = CuttingProxy(port)
        async with proxy, ChatClient(proxy.target, reconnect=RECONNECT) as client:
            session = await client.create_session(on_disconnect=DisconnectPolicy.CONTINUE)
            reply = client.send(session.session_id, WORDS)
            async with reply:
                assert isinstance(await anext(reply), ReplyStarted)
                read = [await anext(reply) for _ in range(3)]
                proxy.freeze()
                async with ChatClient(f"127.0.0.1:{port}") as observer:

                    async def stored() -> bool:
                        history = await observer.history(session.session_id)
                        return len(history) == 2 and history[1].content.endswith("w39")

                    await eventually(stored, "the turn to end and be stored")
                # A new server process on the same store: its replay log never had the turn.
                await first.stop()
                async with serving(port, store=store):
                    proxy.cut_all()
                    rest = await read_all(reply)
                    history = await client.history(session.session_id)
            assert reply.result is not None
            assert reply.result.finish_reason is FinishReason.STOP
            assert reply.text == history[1].content
            texts = [e.text for e in [*read, *rest] if isinstance(e, ReplyChunk)]
            assert "".join(texts) == history[1].content
            numbers = [e.number for e in [*read, *rest] if isinstance(e, ReplyChunk)]
            assert numbers == list(range(1, len(numbers) + 1))


async def test_a_reply_that_cannot_be_resumed_raises_connection_lost() -> None:
    policy = ReconnectPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    async with serving(pace=0.02) as server:
        proxy = CuttingProxy(server.port)
        async with proxy, ChatClient(proxy.target, reconnect=policy) as client:
            session = await client.create_session()
            async with client.send(session.session_id, WORDS) as reply:
                assert isinstance(await anext(reply), ReplyStarted)
                # Every connection from now on is cut at once.
                proxy.arm([0] * 10)
                with pytest.raises(ConnectionLost):
                    await read_all(reply)
            assert client.stats.replies_failed == 1
            assert proxy.cuts >= 2


# -- watching -------------------------------------------------------------------------------


def watchers_are(client: ChatClient, session_id: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await client.get_session(session_id)).watchers == count

    return check


async def _watched(client: ChatClient, session_id: str, ready: asyncio.Event) -> list[WatchEvent]:
    """The watch's events up to the end of the first turn."""
    events: list[WatchEvent] = []
    async with client.watch(session_id) as watch:
        ready.set()
        async for item in watch:
            events.append(item)
            if isinstance(item.event, ReplyCompleted):
                return events
    return events


async def test_a_watcher_sees_another_clients_reply_as_its_sender_does() -> None:
    async with serving(pace=0.005) as server:
        target = f"127.0.0.1:{server.port}"
        async with ChatClient(target) as watcher, ChatClient(target) as sender:
            session = await sender.create_session()
            ready = asyncio.Event()
            watching = asyncio.create_task(_watched(watcher, session.session_id, ready))
            await asyncio.wait_for(ready.wait(), TIMEOUT)
            assert (await sender.get_session(session.session_id)).watchers == 1
            sent = await read_all(sender.send(session.session_id, "watch this"))
            seen = await asyncio.wait_for(watching, TIMEOUT)
            turn_events = [w for w in seen if not isinstance(w.event, SessionUpdated)]
            assert not any(w.is_mine for w in turn_events)
            # The same events, with the same turn id and seq (the request ids differ).
            assert [(w.turn_id, w.seq, type(w.event)) for w in turn_events] == [
                (e.turn_id, e.seq, type(e)) for e in sent
            ]
            assert "".join(
                w.event.text for w in turn_events if isinstance(w.event, ReplyChunk)
            ) == "".join(c.text for c in chunks_of(sent))
            # The watch ended with its block (UNWATCH).
            await eventually(watchers_are(sender, session.session_id, 0), "the UNWATCH")


async def test_a_watch_marks_this_clients_own_turns_and_replays_a_running_one() -> None:
    async with serving(pace=0.01) as server, ChatClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session()
        async with client.send(session.session_id, WORDS) as reply:
            read = [await anext(reply) for _ in range(6)]
            # The watch begins while the turn runs: it gets the turn from its start (the
            # server does not send a stream's own turn to its watch: the client RESUMEs it
            # into the watch).
            ready = asyncio.Event()
            seen = await asyncio.wait_for(_watched(client, session.session_id, ready), TIMEOUT)
            rest = await read_all(reply)
        turn_events = [w for w in seen if not isinstance(w.event, SessionUpdated)]
        assert all(w.is_mine for w in turn_events)
        events = [*read, *rest]
        assert [(w.seq, type(w.event)) for w in turn_events] == [(e.seq, type(e)) for e in events]
        assert turn_events[0].seq == 1
        # What the watch got is not counted twice, and nothing stays registered.
        assert client.stats.chunks_received == len(chunks_of(events))
        assert client.pending_requests == 0


async def test_a_watch_goes_on_after_its_connection_is_cut_without_repeating_an_event() -> None:
    async with serving(pace=0.01) as server:
        proxy = CuttingProxy(server.port)
        direct = f"127.0.0.1:{server.port}"
        async with (
            proxy,
            ChatClient(proxy.target, reconnect=RECONNECT) as watcher,
            ChatClient(direct) as sender,
        ):
            session = await sender.create_session()
            seen: list[WatchEvent] = []
            async with (
                watcher.watch(session.session_id) as watch,
                sender.send(session.session_id, WORDS) as reply,
            ):
                async with asyncio.timeout(TIMEOUT):
                    async for item in watch:
                        seen.append(item)
                        if isinstance(item.event, ReplyChunk) and item.event.number == 3:
                            # Mid-turn: the watch watches again on a new connection, and
                            # the running turn is replayed to it from its start.
                            assert proxy.cut_all() == 1
                        if isinstance(item.event, ReplyCompleted):
                            break
                sent = await read_all(reply)
        turn = [w for w in seen if not isinstance(w.event, SessionUpdated)]
        assert [w.seq for w in turn] == list(range(1, len(turn) + 1))
        assert "".join(w.event.text for w in turn if isinstance(w.event, ReplyChunk)) == "".join(
            c.text for c in chunks_of(sent)
        )
        assert proxy.accepted == 2


# -- session policies, as the client sees them -------------------------------------------------


async def test_a_session_that_rejects_a_second_message_raises_aborted() -> None:
    async with serving(pace=0.01) as server, ChatClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session(concurrency_policy=ConcurrencyPolicy.REJECT)
        async with client.send(session.session_id, WORDS) as running:
            assert isinstance(await anext(running), ReplyStarted)
            with pytest.raises(Aborted):
                await client.ask(session.session_id, "meanwhile")
            await read_all(running)
        # Nothing of the refused message is stored.
        history = await client.history(session.session_id)
        assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
        assert history[0].content == WORDS


async def test_a_session_that_interrupts_cancels_the_running_reply() -> None:
    async with serving(pace=0.01) as server, ChatClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session(concurrency_policy=ConcurrencyPolicy.INTERRUPT)
        async with client.send(session.session_id, WORDS) as running:
            assert isinstance(await anext(running), ReplyStarted)
            second = await client.ask(session.session_id, "instead")
            first = await read_all(running)
        assert isinstance(first[-1], ReplyCompleted)
        assert first[-1].finish_reason is FinishReason.CANCELLED
        assert second.finish_reason is FinishReason.STOP
        history = await client.history(session.session_id)
        assert [m.status for m in history if m.role is Role.ASSISTANT] == [
            MessageStatus.CANCELLED,
            MessageStatus.COMPLETE,
        ]


async def test_with_on_disconnect_cancel_a_resumed_reply_ends_cancelled_as_stored() -> None:
    async with serving(pace=0.01) as server:
        proxy = CuttingProxy(server.port)
        async with proxy, ChatClient(proxy.target, reconnect=RECONNECT) as client:
            session = await client.create_session(on_disconnect=DisconnectPolicy.CANCEL)
            async with client.send(session.session_id, WORDS) as reply:
                events = [await anext(reply) for _ in range(4)]
                assert proxy.cut_all() == 1
                events += await read_all(reply)
            history = await client.history(session.session_id)
        assert reply.resumes == 1
        completed = events[-1]
        assert isinstance(completed, ReplyCompleted)
        assert completed.finish_reason is FinishReason.CANCELLED
        assert history[1].status is MessageStatus.CANCELLED
        assert reply.text == history[1].content
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_one_message_sent_twice_at_once_is_one_turn_whose_events_both_get() -> None:
    async with serving(pace=0.005) as server:
        target = f"127.0.0.1:{server.port}"
        async with ChatClient(target) as one, ChatClient(target) as two:
            session = await one.create_session()
            first, second = await asyncio.gather(
                one.ask(session.session_id, "at once", client_message_id="twice"),
                two.ask(session.session_id, "at once", client_message_id="twice"),
            )
            assert first.turn_id == second.turn_id
            assert first.text == second.text
            history = await one.history(session.session_id)
            assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
            assert history[1].content == first.text


async def test_a_watch_cut_mid_turn_gets_the_rest_even_when_the_turn_ended_meanwhile() -> None:
    async with serving(pace=0.01) as server:
        proxy = CuttingProxy(server.port)
        async with (
            proxy,
            ChatClient(proxy.target, reconnect=RECONNECT) as watcher,
            ChatClient(f"127.0.0.1:{server.port}") as sender,
        ):
            session = await sender.create_session()
            seen: list[WatchEvent] = []
            async with watcher.watch(session.session_id) as watch:
                sent = sender.send(session.session_id, WORDS)
                await sent.start()
                async with asyncio.timeout(TIMEOUT):
                    async for item in watch:
                        seen.append(item)
                        if isinstance(item.event, ReplyChunk) and item.event.number == 3:
                            break
                    # The watcher hears nothing more while the turn runs to its end.
                    proxy.freeze()
                    events = await read_all(sent)
                    assert proxy.cut_all() == 1
                    # The WATCH on the new connection has no running turn to replay: the
                    # rest comes from the RESUME of the turn it was in the middle of.
                    async for item in watch:
                        seen.append(item)
                        if isinstance(item.event, ReplyCompleted):
                            break
        turn = [w for w in seen if not isinstance(w.event, SessionUpdated)]
        assert [w.seq for w in turn] == [e.seq for e in events]
        assert "".join(w.event.text for w in turn if isinstance(w.event, ReplyChunk)) == "".join(
            c.text for c in chunks_of(events)
        )


async def test_a_resumed_reply_can_still_be_cancelled() -> None:
    async with serving(pace=0.02) as server:
        proxy = CuttingProxy(server.port)
        async with proxy, ChatClient(proxy.target, reconnect=RECONNECT) as client:
            session = await client.create_session(on_disconnect=DisconnectPolicy.CONTINUE)
            async with client.send(session.session_id, WORDS) as reply:
                events = [await anext(reply) for _ in range(3)]
                assert proxy.cut_all() == 1
                # The next event comes on the new connection, from the RESUME.
                events.append(await anext(reply))
                assert reply.resumes == 1
                await reply.cancel()
                events += await read_all(reply)
            history = await client.history(session.session_id)
        completed = events[-1]
        assert isinstance(completed, ReplyCompleted)
        assert completed.finish_reason is FinishReason.CANCELLED
        assert (history[1].content, history[1].status) == (reply.text, MessageStatus.CANCELLED)

"""Live sessions across a fleet: replicas on one Redis share the replay log.

A turn one replica runs is watched, resumed and attached to (a resend of its
``client_message_id``) through any other, with the same events (``turn_id``, ``seq``, type,
text) its sender got; a watcher whose replica is killed resumes through another and misses
nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status

import chatpb
from tests.fleet import history, redis_prefix, replicas, stub_for
from tests.helpers import TIMEOUT, ChatStream, eventually
from tests.nginx import running_nginx, wait_serving
from tests.stores import redis_store_url

pytestmark = pytest.mark.slow

Type = chatpb.ChatResponseType
FINAL = (Type.RESPONSE_COMPLETE, Type.ERROR)
#: Echoed a word per chunk: at the pace below, it runs for seconds.
WORDS = " ".join(f"word{n}" for n in range(600))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with redis_prefix() as name:
        yield name


def positions(events: Sequence[chatpb.ChatResponse]) -> list[tuple[str, int, int, str]]:
    """What a watcher or resumer must get exactly as the sender did (the request id aside)."""
    return [(e.turn_id, e.seq, int(e.type), e.chunk_text) for e in events if e.turn_id]


def of_turn(events: Sequence[chatpb.ChatResponse], turn_id: str) -> list[chatpb.ChatResponse]:
    return [e for e in events if e.turn_id == turn_id]


async def create_session(stub: chatpb.ChatServiceStub) -> str:
    return (await stub.create_session(chatpb.CreateSessionRequest())).session_id


async def watch(stream: ChatStream, session_id: str) -> None:
    stream.send(
        chatpb.ChatRequest(type=chatpb.ChatRequestType.WATCH, session_id=session_id, request_id="w")
    )
    ack = (await stream.until("w", [Type.STATUS]))[-1]
    assert ack.status_kind == chatpb.StatusKind.WATCHING


def resume(
    stream: ChatStream, session_id: str, turn_id: str, after_seq: int, request_id: str
) -> None:
    stream.send(
        chatpb.ChatRequest(
            type=chatpb.ChatRequestType.RESUME,
            session_id=session_id,
            turn_id=turn_id,
            after_seq=after_seq,
            request_id=request_id,
        )
    )


async def test_a_watcher_on_one_replica_sees_a_turn_running_on_another_live(prefix: str) -> None:
    with replicas(redis_store_url(prefix), "--pace", "0.005") as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_two)
            async with ChatStream(on_one) as watcher, ChatStream(on_two) as sender:
                await watch(watcher, session_id)
                sender.message(session_id, WORDS, "m1")
                seen = await watcher.until("m1", [Type.CHUNK])
                # Live: replica one has the first chunk while replica two still runs the turn.
                info = await on_one.get_session_info(
                    chatpb.SessionInfoRequest(session_id=session_id)
                )
                assert info.turn_running
                assert info.watchers == 1
                sent = await sender.until_complete("m1", timeout=3 * TIMEOUT)
                seen += await watcher.until("m1", FINAL, timeout=3 * TIMEOUT)
    assert sent[-1].type == Type.RESPONSE_COMPLETE
    turn_id = sent[0].turn_id
    assert turn_id
    assert [e.seq for e in sent] == list(range(1, len(sent) + 1))
    assert positions(of_turn(seen, turn_id)) == positions(sent)
    assert {e.request_id for e in of_turn(seen, turn_id)} == {"m1"}


async def test_a_watcher_whose_replica_is_killed_resumes_through_the_other(
    prefix: str, tmp_path: Path
) -> None:
    store = redis_store_url(prefix, lock_lease="2")
    with (
        replicas(store, "--pace", "0.005") as fleet,
        running_nginx(tmp_path, [server.address for server in fleet]) as port,
    ):
        await wait_serving(port)
        async with Channel("127.0.0.1", port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session_id = await create_session(stub)
            watcher = ChatStream(stub)
            async with watcher:
                await watch(watcher, session_id)
                # nginx chose the watcher's replica; the turn runs on the other one.
                watching = []
                for server in fleet:
                    async with stub_for(server) as direct:
                        stats = await direct.get_server_stats(chatpb.ServerStatsRequest())
                    watching.append(stats.active_watchers)
                assert sorted(watching) == [0, 1]
                doomed, producer = fleet if watching[0] else fleet[::-1]
                async with stub_for(producer) as direct, ChatStream(direct) as sender:
                    sender.message(session_id, WORDS, "m1")
                    seen: list[chatpb.ChatResponse] = []
                    while sum(e.type == Type.CHUNK for e in seen) < 5:
                        seen.append(await watcher.recv())
                    doomed.process.kill()
                    doomed.process.wait(TIMEOUT)
                    turn_id = seen[-1].turn_id
                    last = seen[-1].seq
                    # The client comes back through nginx, which reaches the survivor.
                    async with ChatStream(stub) as resumed:
                        resume(resumed, session_id, turn_id, last, "again")
                        rest = await resumed.until_complete("again", timeout=3 * TIMEOUT)
                    sent = await sender.until_complete("m1", timeout=3 * TIMEOUT)
    assert sent[-1].type == Type.RESPONSE_COMPLETE
    assert positions(of_turn(seen, turn_id)) + positions(rest) == positions(sent)
    assert {e.request_id for e in rest} == {"again"}


async def test_one_client_message_id_sent_to_both_replicas_is_one_turn(prefix: str) -> None:
    with replicas(redis_store_url(prefix), "--pace", "0.002") as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_one)

            def message(request_id: str) -> chatpb.ChatRequest:
                return chatpb.ChatRequest(
                    type=chatpb.ChatRequestType.MESSAGE,
                    session_id=session_id,
                    message="only once",
                    request_id=request_id,
                    client_message_id="cm-1",
                )

            async with ChatStream(on_one) as first, ChatStream(on_two) as second:
                first.send(message("x"))
                second.send(message("y"))
                got_x, got_y = await asyncio.gather(
                    first.until_complete("x"), second.until_complete("y")
                )
            # A resend after a reconnect, on either replica: the same turn again.
            async with ChatStream(on_two) as again:
                again.send(message("z"))
                got_z = await again.until_complete("z")
            messages = await history(on_two, session_id)
    assert got_x[-1].type == got_y[-1].type == got_z[-1].type == Type.RESPONSE_COMPLETE
    assert len({e.turn_id for e in (*got_x, *got_y, *got_z)}) == 1
    assert positions(got_x) == positions(got_y) == positions(got_z)
    assert [(m.role, m.content) for m in messages] == [
        (chatpb.Role.USER, "only once"),
        (chatpb.Role.ASSISTANT, "Echo #1 (1 message in context): only once"),
    ]


async def test_a_resume_on_one_replica_of_a_turn_another_produced(prefix: str) -> None:
    with replicas(redis_store_url(prefix)) as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_two)
            async with ChatStream(on_two) as sender:
                sender.message(session_id, "resume me from elsewhere", "m1")
                sent = await sender.until_complete("m1")
            turn_id = sent[0].turn_id
            async with ChatStream(on_one) as resumer:
                resume(resumer, session_id, turn_id, 2, "r1")
                rest = await resumer.until_complete("r1")
                resume(resumer, session_id, "no-such-turn", 0, "r2")
                unknown = await resumer.until_complete("r2")
    assert sent[-1].type == Type.RESPONSE_COMPLETE
    assert len(sent) > 3
    assert positions(rest) == positions(sent[2:])
    assert {e.request_id for e in rest} == {"r1"}
    assert [(e.type, e.error_code) for e in unknown] == [(Type.ERROR, Status.NOT_FOUND.value)]


async def test_interrupt_on_one_replica_cancels_the_turn_running_on_another(prefix: str) -> None:
    with replicas(redis_store_url(prefix), "--pace", "0.005") as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            created = await on_one.create_session(
                chatpb.CreateSessionRequest(concurrency_policy=chatpb.ConcurrencyPolicy.INTERRUPT)
            )
            session_id = created.session_id
            async with ChatStream(on_two) as first, ChatStream(on_one) as second:
                first.message(session_id, WORDS, "long")
                await first.until("long", [Type.CHUNK])
                second.message(session_id, "now", "short")
                await first.until_complete("long")
                answered = await second.until_complete("short")
                ended = [e for e in first.received if e.request_id == "long"]
            messages = await history(on_one, session_id)
    assert ended[-1].type == Type.RESPONSE_COMPLETE
    assert ended[-1].finish_reason == chatpb.FinishReason.CANCELLED
    assert answered[-1].type == Type.RESPONSE_COMPLETE
    assert [(m.request_id, m.status) for m in messages] == [
        ("long", chatpb.MessageStatus.COMPLETE),
        ("long", chatpb.MessageStatus.CANCELLED),
        ("short", chatpb.MessageStatus.COMPLETE),
        ("short", chatpb.MessageStatus.COMPLETE),
    ]
    # The interrupted reply keeps what its client was sent, a part of the whole.
    partial = messages[1].content
    assert partial == "".join(e.chunk_text for e in ended if e.type == Type.CHUNK)
    assert 0 < len(partial) < len(f"Echo #1 (1 message in context): {WORDS}")


async def test_a_watcher_gets_typing_and_session_updates_made_on_another_replica(
    prefix: str,
) -> None:
    Kind = chatpb.SessionUpdateKind
    with replicas(redis_store_url(prefix)) as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_one)
            async with ChatStream(on_one) as watcher, ChatStream(on_two) as other:
                await watch(watcher, session_id)
                other.send(
                    chatpb.ChatRequest(
                        type=chatpb.ChatRequestType.TYPING_START, session_id=session_id
                    )
                )
                other.message(session_id, "hello", "m1")
                await other.until_complete("m1")
                await on_two.update_session(
                    chatpb.UpdateSessionRequest(session_id=session_id, title="renamed")
                )
                updates: list[chatpb.ChatResponse] = []
                while len(updates) < 3:
                    event = await watcher.recv()
                    if event.type == Type.SESSION_UPDATE:
                        updates.append(event)
    assert [u.update_kind for u in updates] == [
        Kind.TYPING_STARTED,
        Kind.TURN_COMPLETED,
        Kind.SESSION_UPDATED,
    ]
    assert updates[1].message_count == 2
    renamed = updates[2].session
    assert renamed is not None
    assert renamed.title == "renamed"
    assert {u.session_id for u in updates} == {session_id}


async def test_a_reply_left_running_on_one_replica_is_cancelled_from_another(
    prefix: str,
) -> None:
    with replicas(redis_store_url(prefix), "--pace", "0.005") as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_two)
            lost = ChatStream(on_two)
            async with lost:
                lost.message(session_id, WORDS, "r1")
                seen = await lost.until("r1", [Type.CHUNK])
            # The client went away; the reply runs on (--on-disconnect continue). It comes
            # back through the other replica, resumes, and stops the reply there.
            async with ChatStream(on_one) as again:
                resume(again, session_id, seen[-1].turn_id, seen[-1].seq, "back")
                await again.until("back", [Type.CHUNK])
                again.send(
                    chatpb.ChatRequest(
                        type=chatpb.ChatRequestType.CANCEL, session_id=session_id, request_id="r1"
                    )
                )
                ended = await again.until_complete("back", timeout=3 * TIMEOUT)
            messages = await history(on_one, session_id)
    assert ended[-1].type == Type.RESPONSE_COMPLETE
    assert ended[-1].finish_reason == chatpb.FinishReason.CANCELLED
    assert not [e for e in again.received if e.status_kind == chatpb.StatusKind.NOTHING_TO_CANCEL]
    assert [(m.request_id, m.status) for m in messages] == [
        ("r1", chatpb.MessageStatus.COMPLETE),
        ("r1", chatpb.MessageStatus.CANCELLED),
    ]
    assert 0 < len(messages[1].content) < len(f"Echo #1 (1 message in context): {WORDS}")


async def test_a_resume_of_a_turn_whose_replica_was_killed_ends_unavailable(prefix: str) -> None:
    store = redis_store_url(prefix, lock_lease="1")
    with replicas(store, "--pace", "0.005") as (one, two):
        async with stub_for(one) as on_one, stub_for(two) as on_two:
            session_id = await create_session(on_one)
            async with ChatStream(on_two) as sender:
                sender.message(session_id, WORDS, "r1")
                seen = await sender.until("r1", [Type.CHUNK])

                async def written() -> bool:
                    info = await on_one.get_session_info(
                        chatpb.SessionInfoRequest(session_id=session_id)
                    )
                    return info.turn_running

                # Killed before its first write, the turn would be unknown (NOT_FOUND).
                await eventually(written, "the turn in the shared log")
                two.process.kill()
                two.process.wait(TIMEOUT)
            async with ChatStream(on_one) as again:
                resume(again, session_id, seen[-1].turn_id, seen[-1].seq, "back")
                # What the dead replica wrote and its client did not get, then the end.
                rest = await again.until_complete("back", timeout=3 * TIMEOUT)
            info = await on_one.get_session_info(chatpb.SessionInfoRequest(session_id=session_id))
    assert rest[-1].type == Type.ERROR
    assert rest[-1].error_code == Status.UNAVAILABLE.value
    assert [e.seq for e in rest[:-1]] == list(range(seen[-1].seq + 1, seen[-1].seq + len(rest)))
    assert not info.turn_running

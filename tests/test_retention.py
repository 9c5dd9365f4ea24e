"""Retention: idle sessions expire, caps evict and trim, and every drop is counted and logged."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner
from grpclib.testing import ChannelFor

import chatpb
from chat import ChatCore, ChatServer, EchoBackend, MemoryStore, Request, Retention, ServerConfig
from chat.cli.server import main
from chat.errors import ConfigurationError, SessionNotFound
from chat.events import Event, EventKind
from chat.service import ChatService
from chat.types import MessageStatus, Session, SessionPatch, utcnow
from tests.helpers import TIMEOUT


def make_core(**retention: float) -> ChatCore:
    return ChatCore(MemoryStore(), EchoBackend(), retention=Retention(**retention))  # type: ignore[arg-type]


async def converse(core: ChatCore, session_id: str, *texts: str) -> list[Event]:
    """Send ``texts`` as turns on one stream and return every event until it closes."""
    events: list[Event] = []
    async with core.open_conversation() as conversation:
        for n, text in enumerate(texts):
            await conversation.handle(
                Request(session_id=session_id, message=text, request_id=f"r{n}")
            )
        conversation.finish_input()
        async with asyncio.timeout(TIMEOUT):
            while (batch := await conversation.outbox.get()) is not None:
                events.extend(batch)
    return events


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"session_ttl": 0}, "session_ttl must be > 0"),
        ({"session_ttl": -5}, "session_ttl must be > 0"),
        ({"max_sessions": 0}, "max_sessions must be >= 1"),
        ({"max_messages_per_session": -1}, "max_messages_per_session must be >= 1"),
    ],
)
def test_limits_are_validated(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Retention(**fields)  # type: ignore[arg-type]


def test_retention_is_off_by_default_and_sweeps_at_a_bounded_pace() -> None:
    assert not Retention().active
    assert Retention(session_ttl=30).sweep_interval == 3.0
    assert Retention(session_ttl=1).sweep_interval == 1.0
    assert Retention(session_ttl=86_400).sweep_interval == 60.0


async def test_nothing_is_dropped_without_limits() -> None:
    core = make_core()
    sessions = [await core.create_session() for _ in range(5)]
    await converse(core, sessions[0].session_id, *(f"m{n}" for n in range(10)))
    await core.retention.sweep(utcnow() + timedelta(days=3650))
    assert await core.store.count() == 5
    assert len(await core.get_history(sessions[0].session_id)) == 20
    snapshot = await core.stats_snapshot()
    assert (snapshot.expired_sessions, snapshot.evicted_sessions, snapshot.trimmed_messages) == (
        0,
        0,
        0,
    )


async def test_the_oldest_messages_are_trimmed_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = make_core(max_messages_per_session=5)
    session = await core.create_session()
    with caplog.at_level(logging.INFO, logger="chat.retention"):
        events = await converse(core, session.session_id, "one", "two", "three", "four")
    completes = [e for e in events if e.kind is EventKind.RESPONSE_COMPLETE]
    # The count the client is told is the count kept.
    assert [e.message_count for e in completes] == [2, 4, 5, 5]
    history = await core.get_history(session.session_id)
    assert [m.content for m in history] == [
        "Echo #2 (3 messages in context): two",
        "three",
        "Echo #3 (5 messages in context): three",
        "four",
        # The trimmed history started with an answer whose question was gone: it is not sent
        # (a prompt must start with a user message), so 4 history messages and the new one.
        "Echo #3 (5 messages in context): four",
    ]
    assert core.stats.trimmed_messages == 3
    assert (await core.get_session(session.session_id)).message_count == 5
    trimmed = [r for r in caplog.records if "trimmed" in r.getMessage()]
    assert [r.getMessage().split()[2] for r in trimmed] == ["1", "2"]
    assert session.session_id in trimmed[0].getMessage()


async def test_creating_past_the_cap_evicts_the_least_recently_active(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = make_core(max_sessions=3)
    first, second, third = [await core.create_session() for _ in range(3)]
    # A turn makes the oldest session the most recently active one.
    await converse(core, first.session_id, "still here")
    with caplog.at_level(logging.INFO, logger="chat.retention"):
        fourth = await core.create_session()
        fifth = await core.create_session()
    assert core.stats.evicted_sessions == 2
    page, _, total = await core.list_sessions()
    assert total == 3
    assert {s.session_id for s in page} == {first.session_id, fourth.session_id, fifth.session_id}
    for gone in (second, third):
        with pytest.raises(SessionNotFound):
            await core.get_session(gone.session_id)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert second.session_id in logged
    assert third.session_id in logged


async def test_idle_sessions_expire_on_a_sweep_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = make_core(session_ttl=60)
    idle = await core.create_session()
    active = await core.create_session()
    await core.store.update(
        idle.session_id, SessionPatch(title="idle"), utcnow() - timedelta(hours=1)
    )
    with caplog.at_level(logging.INFO, logger="chat.retention"):
        await core.retention.sweep()
    assert core.stats.expired_sessions == 1
    assert [s.session_id for s in (await core.list_sessions())[0]] == [active.session_id]
    assert "expired 1 session(s) idle for more than 60s" in caplog.text
    assert idle.session_id in caplog.text
    await core.retention.sweep(utcnow() + timedelta(seconds=61))
    assert core.stats.expired_sessions == 2
    assert await core.store.count() == 0


async def test_a_turn_marks_its_session_active_before_the_reply() -> None:
    core = make_core(session_ttl=60)
    session = await core.create_session()
    await core.store.update(
        session.session_id, SessionPatch(title="idle"), utcnow() - timedelta(hours=1)
    )
    started = utcnow()
    await converse(core, session.session_id, "hello")
    assert (await core.get_session(session.session_id)).last_activity >= started
    # The sweep a second later finds it active.
    await core.retention.sweep(utcnow() + timedelta(seconds=1))
    assert core.stats.expired_sessions == 0
    history = await core.get_history(session.session_id)
    assert [m.status for m in history] == [MessageStatus.COMPLETE] * 2


async def test_drops_show_in_server_stats() -> None:
    core = make_core(max_sessions=1, max_messages_per_session=2)
    await core.create_session()
    kept = await core.create_session()  # evicts the first
    await converse(core, kept.session_id, "a", "b")
    async with ChannelFor([ChatService(core)]) as channel:
        stats = await chatpb.ChatServiceStub(channel).get_server_stats(chatpb.ServerStatsRequest())
    assert (stats.evicted_sessions, stats.trimmed_messages, stats.expired_sessions) == (1, 2, 0)
    assert stats.active_sessions == 1


def test_the_cli_takes_the_retention_options() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--session-ttl", "--max-sessions", "--max-messages-per-session", "--store"):
        assert option in result.output
    assert "a SQLite file in the user data directory" in " ".join(result.output.split())


class SweptStore(MemoryStore):
    """A memory store that says when it was swept."""

    def __init__(self) -> None:
        super().__init__()
        self.swept = asyncio.Event()

    async def expire(self, idle_before: datetime) -> list[str]:
        try:
            return await super().expire(idle_before)
        finally:
            self.swept.set()


async def test_a_server_sweeps_from_its_start_and_stops_sweeping_when_it_stops() -> None:
    store = SweptStore()
    idle_since = utcnow() - timedelta(hours=2)
    await store.create(Session("idle", idle_since, idle_since))
    await store.create(Session("fresh", utcnow(), utcnow()))
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", retention=Retention(session_ttl=3600)
    )
    before = asyncio.all_tasks()
    async with ChatServer(config, store=store) as server:
        # The first sweep runs as the server starts.
        await asyncio.wait_for(store.swept.wait(), TIMEOUT)
        assert server.core.stats.expired_sessions == 1
        assert [s.session_id for s in (await store.list_sessions(10)).sessions] == ["fresh"]
    assert asyncio.all_tasks() == before

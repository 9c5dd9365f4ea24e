"""Per-identity quotas: messages per period, token budgets, open streams, stored sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from grpclib import GRPCError
from grpclib.const import Status

import chatpb
from chat import ChatClient, ChatServer, RateLimited, Secret, ServerConfig
from chat.auth.tokens import MemoryTokenStore, TokenAuth
from chat.errors import ConfigurationError
from chat.quota import LocalCounters, QuotaKeeper, Quotas, Rate, parse_period
from chat.types import Role
from tests.helpers import TIMEOUT, ChatStream, channel_with_token, eventually, issue_token
from tests.stores import delete_prefix, redis_store_url, unique_prefix

T = chatpb.ChatResponseType
HOUR = 3600.0


def test_rates_and_periods_parse_or_say_why_not() -> None:
    assert Rate.parse("20/60s") == Rate(20, 60.0)
    assert Rate.parse("100000/1d") == Rate(100000, 86400.0)
    assert parse_period("5m") == 300.0
    for bad in ("20", "x/60s", "20/0s", "20/1w", "-1/5s"):
        with pytest.raises(ConfigurationError):
            Rate.parse(bad)


@asynccontextmanager
async def quota_servers(
    quotas: Quotas, *, replicas: int = 1, store: str = "memory://"
) -> AsyncIterator[tuple[list[ChatServer], dict[str, str]]]:
    """``replicas`` servers on ``store`` with ``quotas``; tokens for alice and bob."""
    tokens = MemoryTokenStore()
    issued = {name: await issue_token(tokens, name) for name in ("alice", "bob")}
    config = ServerConfig(host="127.0.0.1", port=0, store=store, auth="tokens", quotas=quotas)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(ChatServer(config, authenticator=TokenAuth(tokens)))
            for _ in range(replicas)
        ]
        yield servers, issued


def client(server: ChatServer, token: str) -> ChatClient:
    return ChatClient(f"127.0.0.1:{server.port}", token=Secret(token))


async def user_messages(server: ChatServer, session_id: str) -> list[str]:
    _, history = await server.core.store.read(session_id)
    return [m.content for m in history if m.role is Role.USER]


async def test_messages_over_the_rate_get_an_error_event_and_the_stream_stays_open() -> None:
    async with quota_servers(Quotas(messages=Rate(2, HOUR))) as ([server], tokens):
        channel = channel_with_token("127.0.0.1", server.port, tokens["alice"])
        stub = chatpb.ChatServiceStub(channel, timeout=TIMEOUT)
        async with channel:
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                for n in (1, 2, 3):
                    stream.message(session.session_id, f"message {n}", f"r{n}")
                    events = await stream.until_complete(f"r{n}")
                refused = events[-1]
                assert [e.type for e in events] == [T.ERROR]
                assert refused.error_code == Status.RESOURCE_EXHAUSTED.value
                assert "rate-limit-messages" in refused.error_message
                assert 0 < refused.retry_after <= HOUR
                stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="p"))
                pong = await stream.until("p", [T.PONG])
                assert pong[-1].type == T.PONG
        assert await user_messages(server, session.session_id) == ["message 1", "message 2"]
        # Another identity has its own count.
        async with client(server, tokens["bob"]) as bob:
            theirs = await bob.create_session()
            assert (await bob.ask(theirs.session_id, "hello")).text


async def test_a_token_budget_used_up_mid_conversation_refuses_the_next_turn() -> None:
    async with quota_servers(Quotas(tokens=Rate(12, HOUR))) as ([server], tokens):
        async with client(server, tokens["alice"]) as alice:
            session = await alice.create_session()
            first = await alice.ask(session.session_id, "one two three four five six seven")
            assert first.usage is not None
            assert first.usage.total_tokens >= 12
            usage = {q.name: q for q in (await alice.who_am_i()).quotas}
            assert usage["token-budget"].used == first.usage.total_tokens
            with pytest.raises(RateLimited, match="token-budget") as refused:
                await alice.ask(session.session_id, "again")
            assert refused.value.retry_after is not None
            assert 0 < refused.value.retry_after <= HOUR
        assert await user_messages(server, session.session_id) == [
            "one two three four five six seven"
        ]


async def test_streams_over_the_limit_are_refused_before_any_event() -> None:
    async with quota_servers(Quotas(max_streams=1)) as ([server], tokens):
        channel = channel_with_token("127.0.0.1", server.port, tokens["alice"])
        stub = chatpb.ChatServiceStub(channel, timeout=TIMEOUT)
        async with channel:
            async with ChatStream(stub) as first:
                first.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="a"))
                await first.until("a", [T.PONG])
                async with ChatStream(stub) as second:
                    second.send(
                        chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="b")
                    )
                    with pytest.raises(GRPCError) as refused:
                        await second.recv()
                    assert refused.value.status is Status.RESOURCE_EXHAUSTED
                    assert "max-streams-per-identity" in (refused.value.message or "")
                    assert second.received == []

            # Closing the first frees its slot.
            async def slot_free() -> bool:
                return not await server.core.quotas.counters.streams("streams:alice")

            await eventually(slot_free, "the closed stream's slot is freed")
            async with ChatStream(stub) as third:
                third.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="c"))
                assert (await third.until("c", [T.PONG]))[-1].type == T.PONG


async def test_sessions_over_the_limit_are_refused_until_one_is_deleted() -> None:
    async with quota_servers(Quotas(max_sessions=2)) as ([server], tokens):
        async with client(server, tokens["alice"]) as alice:
            first = await alice.create_session()
            await alice.create_session()
            with pytest.raises(RateLimited, match="max-sessions-per-identity"):
                await alice.create_session()
            usage = {q.name: q for q in (await alice.who_am_i()).quotas}
            assert (
                usage["max-sessions-per-identity"].used,
                usage["max-sessions-per-identity"].limit,
            ) == (2, 2)
            await alice.delete_session(first.session_id)
            await alice.create_session()
        assert await server.core.store.count(owner="alice") == 2


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(prefix)


async def test_replicas_on_redis_never_pass_the_session_limit_together(
    redis_prefix: str,
) -> None:
    store = redis_store_url(redis_prefix)
    async with quota_servers(Quotas(max_sessions=3), replicas=2, store=store) as (servers, tokens):
        async with (
            client(servers[0], tokens["alice"]) as first,
            client(servers[1], tokens["alice"]) as second,
        ):
            results = await asyncio.gather(
                *(c.create_session() for c in (first, second) * 4), return_exceptions=True
            )
        assert sum(not isinstance(r, BaseException) for r in results) == 3
        assert all(isinstance(r, RateLimited) for r in results if isinstance(r, BaseException))
        assert await servers[0].core.store.count(owner="alice") == 3


async def test_replicas_on_redis_share_the_counters(redis_prefix: str) -> None:
    quotas = Quotas(messages=Rate(3, HOUR), max_streams=1)
    store = redis_store_url(redis_prefix)
    async with quota_servers(quotas, replicas=2, store=store) as (servers, tokens):
        outcomes: list[bool] = []
        async with client(servers[0], tokens["alice"]) as first:
            session = await first.create_session()
        # One stream at a time per identity, across the replicas: send on each in turn.
        for server in (*servers, *servers):
            async with client(server, tokens["alice"]) as alice:
                try:
                    await alice.ask(session.session_id, "hi")
                    outcomes.append(True)
                except RateLimited:
                    outcomes.append(False)
        assert outcomes == [True, True, True, False]
        # The stream limit is shared too: a stream open on one replica fills the quota of
        # the other.
        async with client(servers[0], tokens["alice"]):
            other = client(servers[1], tokens["alice"])
            with pytest.raises(RateLimited, match="max-streams-per-identity"):
                await other.connect()
            await other.aclose()


async def test_the_keeper_reports_only_the_limits_that_are_set() -> None:
    keeper = QuotaKeeper(Quotas(messages=Rate(5, 60.0)), LocalCounters())
    await keeper.admit_message("alice")
    (usage,) = await keeper.usage("alice", owned_sessions=None)
    assert (usage.name, usage.limit, usage.used, usage.period_seconds) == (
        "rate-limit-messages",
        5,
        1,
        60.0,
    )
    assert 0 < usage.resets_in_seconds <= 60.0
    assert await QuotaKeeper().usage("alice", owned_sessions=3) == []

"""Identities: bearer tokens, JWTs, client certificates, and what a caller without them gets."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

import chatpb
from chat import ChatClient, ChatServer, Secret, ServerConfig
from chat.auth import Identity
from chat.auth.jwts import JwtAuth, JwtSettings
from chat.auth.mtls import certificate_identity
from chat.auth.tokens import (
    FileTokenStore,
    MemoryTokenStore,
    SqliteTokenStore,
    TokenAuth,
    TokenRecord,
    TokenStore,
    hash_token,
    open_token_store,
)
from chat.client import ClientConfig
from chat.errors import (
    ConfigurationError,
    PermissionDenied,
    SessionNotFound,
    StoreUnavailable,
    Unauthenticated,
)
from tests.helpers import TIMEOUT, ChatStream, channel_with_token, issue_token
from tests.stores import delete_prefix, redis_store_url, unique_prefix

T = chatpb.ChatResponseType
SECRET = "s" * 40


@pytest.fixture
def tokens() -> MemoryTokenStore:
    return MemoryTokenStore()


@pytest.fixture
async def token_server(tokens: MemoryTokenStore) -> AsyncIterator[ChatServer]:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", auth="tokens")
    async with ChatServer(config, authenticator=TokenAuth(tokens)) as server:
        yield server


def stub_for(server: ChatServer, token: str | None) -> tuple[Channel, chatpb.ChatServiceStub]:
    channel = channel_with_token("127.0.0.1", server.port, token)
    return channel, chatpb.ChatServiceStub(channel, timeout=TIMEOUT)


# -- tokens --------------------------------------------------------------------------------


async def test_calls_without_a_valid_token_are_unauthenticated_and_say_what_to_send(
    token_server: ChatServer, tokens: MemoryTokenStore
) -> None:
    await issue_token(tokens, "alice")
    for token in (None, "gct_not-a-token"):
        channel, stub = stub_for(token_server, token)
        async with channel:
            with pytest.raises(GRPCError) as refused:
                await stub.create_session(chatpb.CreateSessionRequest())
            assert refused.value.status is Status.UNAUTHENTICATED
            assert "token" in (refused.value.message or "")
            # On Chat, the status comes before any event.
            async with ChatStream(stub) as stream:
                stream.message("whatever", "hi", "r1")
                with pytest.raises(GRPCError) as chat_refused:
                    await stream.recv()
                assert chat_refused.value.status is Status.UNAUTHENTICATED
                assert stream.received == []
    assert token_server.core.stats.total_requests == 0
    assert await token_server.core.store.count() == 0


async def test_health_is_open_to_callers_without_credentials(token_server: ChatServer) -> None:
    async with Channel("127.0.0.1", token_server.port) as channel:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert reply.status == reply.SERVING


async def test_a_token_names_its_identity(
    token_server: ChatServer, tokens: MemoryTokenStore
) -> None:
    token = await issue_token(tokens, "alice")
    async with ChatClient(f"127.0.0.1:{token_server.port}", token=Secret(token)) as client:
        me = await client.who_am_i()
        session = await client.create_session(title="mine")
    assert (me.identity, me.admin, me.auth) == ("alice", False, "tokens")
    stored = await token_server.core.store.get(session.session_id)
    assert stored.owner == "alice"
    # The owner is shown to administrators only.
    assert session.owner == ""


async def test_a_revoked_token_is_refused_on_the_next_rpc_and_the_next_request_of_an_open_stream(
    token_server: ChatServer, tokens: MemoryTokenStore
) -> None:
    token = await issue_token(tokens, "alice")
    channel, stub = stub_for(token_server, token)
    async with channel:
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "before", "r1")
            events = await stream.until_complete("r1")
            assert events[-1].type == T.RESPONSE_COMPLETE

            assert await tokens.revoke("alice")

            with pytest.raises(GRPCError) as unary:
                await stub.get_session_info(
                    chatpb.SessionInfoRequest(session_id=session.session_id)
                )
            assert unary.value.status is Status.UNAUTHENTICATED

            stream.message(session.session_id, "after", "r2")
            refused = await stream.until_complete("r2")
            assert [e.type for e in refused] == [T.ERROR]
            assert refused[0].error_code == Status.UNAUTHENTICATED.value
            with pytest.raises(GRPCError) as ended:
                await stream.recv()
            assert ended.value.status is Status.UNAUTHENTICATED
    _, history = await token_server.core.store.read(session.session_id)
    assert [m.content for m in history if m.role.name == "USER"] == ["before"]


async def test_the_client_does_not_retry_a_refusal(token_server: ChatServer) -> None:
    client = ChatClient(f"127.0.0.1:{token_server.port}", token=Secret("gct_wrong"))
    with pytest.raises(Unauthenticated, match="not valid"):
        await client.connect()
    await client.aclose()
    assert client.stats.connection_attempts == 1


async def test_tokens_never_show_in_reprs_errors_or_logs(
    token_server: ChatServer, tokens: MemoryTokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await issue_token(tokens, "alice")
    config = ClientConfig(target=f"127.0.0.1:{token_server.port}", token=Secret(token))
    assert token not in repr(config)
    (record,) = await tokens.list()
    assert token not in repr(record)
    assert record.token_hash not in repr(record)
    async with ChatClient.from_config(config) as client:
        await client.create_session()
        await tokens.revoke("alice")
        with pytest.raises(Unauthenticated) as refused:
            await client.list_sessions()
    assert token not in str(refused.value)
    assert caplog.records, "the server and client logged something"
    assert not any(token in r.getMessage() for r in caplog.records)


@pytest.fixture(params=["memory", "file", "sqlite", "redis"])
async def token_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    kind = request.param
    prefix = unique_prefix()
    store: TokenStore
    if kind == "memory":
        store = MemoryTokenStore()
    elif kind == "file":
        store = open_token_store("memory://", str(tmp_path / "tokens.json"))
    elif kind == "sqlite":
        store = open_token_store(f"sqlite://{tmp_path / 'chat.db'}")
    else:
        store = open_token_store(redis_store_url(prefix))
    try:
        yield store
    finally:
        await store.aclose()
        if kind == "redis":
            await delete_prefix(prefix)


async def test_every_token_store_keeps_hashes_lists_names_and_revokes(
    token_store: TokenStore,
) -> None:
    alice = await issue_token(token_store, "alice")
    root = await issue_token(token_store, "root", admin=True)
    with pytest.raises(ValueError, match="exists"):
        await issue_token(token_store, "alice")
    found = await token_store.find(hash_token(alice))
    assert found is not None
    assert (found.name, found.admin) == ("alice", False)
    assert [(r.name, r.admin) for r in await token_store.list()] == [
        ("alice", False),
        ("root", True),
    ]
    assert await token_store.find(hash_token("gct_unknown")) is None
    assert await token_store.revoke("alice")
    assert not await token_store.revoke("alice")
    assert await token_store.find(hash_token(alice)) is None
    still = await token_store.find(hash_token(root))
    assert still is not None
    assert still.admin


async def test_stores_keep_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    token = await issue_token(store, "alice")
    text = path.read_text()
    assert token not in text
    assert hash_token(token) in text
    assert path.stat().st_mode & 0o077 == 0
    sqlite = SqliteTokenStore(tmp_path / "chat.db")
    try:
        token = await issue_token(sqlite, "bob")
    finally:
        await sqlite.aclose()
    assert token.encode() not in (tmp_path / "chat.db").read_bytes()


def test_the_memory_store_cannot_hold_tokens() -> None:
    with pytest.raises(ConfigurationError, match="--tokens-file"):
        open_token_store("memory://")


# -- reflection ----------------------------------------------------------------------------


async def _list_services(port: int, token: str | None) -> list[str]:
    channel = channel_with_token("127.0.0.1", port, token)
    async with channel, ServerReflectionStub(channel).ServerReflectionInfo.open() as call:
        await call.send_message(ServerReflectionRequest(list_services=""), end=True)
        reply = await call.recv_message()
        assert reply is not None
        return [s.name for s in reply.list_services_response.service]


@pytest.mark.parametrize("mode", ["public", "authenticated", "off"])
async def test_reflection_is_public_authenticated_or_off(
    mode: str, tokens: MemoryTokenStore
) -> None:
    token = await issue_token(tokens, "alice")
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory://", auth="tokens", reflection=mode
    )
    async with ChatServer(config, authenticator=TokenAuth(tokens)) as server:
        if mode == "off":
            with pytest.raises(GRPCError) as off:
                await _list_services(server.port, token)
            # grpclib's server answers an unknown method with UNIMPLEMENTED in a reply that
            # its own client reads as UNKNOWN ("missing content-type"): either way, no answer.
            assert off.value.status in (Status.UNIMPLEMENTED, Status.UNKNOWN)
            return
        assert "ChatService" in await _list_services(server.port, token)
        if mode == "public":
            assert "ChatService" in await _list_services(server.port, None)
        else:
            with pytest.raises(GRPCError) as refused:
                await _list_services(server.port, None)
            assert refused.value.status is Status.UNAUTHENTICATED


# -- JWT -----------------------------------------------------------------------------------


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "carol",
        "exp": now + 300,
        "nbf": now - 10,
        "aud": "grpc-chat",
        "iss": "https://issuer.example",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


async def _jwt_identity(auth: JwtAuth, token: str) -> Identity:
    credentials = await auth.authenticate({"authorization": f"Bearer {token}"}, None)
    return credentials.identity


async def test_jwt_hs256_checks_signature_exp_nbf_aud_and_iss() -> None:
    auth = JwtAuth(
        JwtSettings(secret=Secret(SECRET), audience="grpc-chat", issuer="https://issuer.example")
    )

    def sign(**overrides: object) -> str:
        return jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")

    assert await _jwt_identity(auth, sign()) == Identity("carol")
    assert await _jwt_identity(auth, sign(admin=True)) == Identity("carol", admin=True)
    assert await _jwt_identity(auth, sign(admin="yes")) == Identity("carol")
    now = int(time.time())
    refusals = {
        "expired": sign(exp=now - 120),
        "not valid yet": sign(nbf=now + 120),
        "not for this server": sign(aud="other"),
        "issuer": sign(iss="https://evil.example"),
        "lacks the 'exp'": sign(exp=None),
        "lacks the 'aud'": sign(aud=None),
        "not valid": jwt.encode(_claims(), "t" * 40, algorithm="HS256"),
    }
    for words, token in refusals.items():
        with pytest.raises(Unauthenticated, match=words):
            await _jwt_identity(auth, token)
    # No algorithm confusion: an unsigned token is refused.
    unsigned = jwt.encode(_claims(), cast(Any, None), algorithm="none")
    with pytest.raises(Unauthenticated):
        await _jwt_identity(auth, unsigned)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_jwt_with_public_keys_from_a_jwks_file(algorithm: str) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    algo = jwt.get_algorithm_by_name(algorithm)
    public = json.loads(algo.to_jwk(private.public_key()))
    public.update(kid="key-1", alg=algorithm, use="sig")
    auth = JwtAuth(JwtSettings(jwks=json.dumps({"keys": [public]})))
    token = jwt.encode(
        _claims(aud=None, iss=None), private, algorithm=algorithm, headers={"kid": "key-1"}
    )
    assert await _jwt_identity(auth, token) == Identity("carol")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(Unauthenticated):
        await _jwt_identity(auth, forged)


async def test_a_jwt_that_expires_while_a_stream_is_open_fails_its_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = JwtAuth(JwtSettings(secret=Secret(SECRET)))
    token = jwt.encode(_claims(aud=None, iss=None), SECRET, algorithm="HS256")
    credentials = await auth.authenticate({"authorization": f"Bearer {token}"}, None)
    await credentials.recheck()
    later = time.time() + 3600
    monkeypatch.setattr("chat.auth.jwts.time.time", lambda: later)
    with pytest.raises(Unauthenticated, match="expired"):
        await credentials.recheck()


def test_jwt_settings_need_one_key_source() -> None:
    with pytest.raises(ConfigurationError):
        JwtSettings()
    with pytest.raises(ConfigurationError, match="32"):
        JwtSettings.from_files(secret_file="/dev/null")


# -- mTLS names ----------------------------------------------------------------------------


def test_the_certificate_identity_is_the_first_dns_or_email_san_else_the_cn() -> None:
    assert certificate_identity({"subjectAltName": (("email", "dave@example.org"),)}) == (
        "dave@example.org"
    )
    both = {
        "subject": ((("commonName", "cn-name"),),),
        "subjectAltName": (("IP Address", "10.0.0.1"), ("DNS", "svc.example")),
    }
    assert certificate_identity(both) == "svc.example"
    assert certificate_identity({"subject": ((("commonName", "cn-name"),),)}) == "cn-name"
    assert certificate_identity({}) is None


class _FlakyTokens(MemoryTokenStore):
    """A token store that can be made unreachable."""

    down = False

    async def find(self, token_hash: str) -> TokenRecord | None:
        if self.down:
            raise StoreUnavailable("the token store is unreachable")
        return await super().find(token_hash)


async def test_a_token_store_outage_refuses_requests_without_ending_the_stream() -> None:
    tokens = _FlakyTokens()
    token = await issue_token(tokens, "alice")
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", auth="tokens")
    async with ChatServer(config, authenticator=TokenAuth(tokens)) as server:
        channel, stub = stub_for(server, token)
        async with channel, ChatStream(stub) as stream:
            session = await stub.create_session(chatpb.CreateSessionRequest())
            tokens.down = True
            stream.message(session.session_id, "during", "r1")
            (refused,) = await stream.until_complete("r1")
            assert refused.type == T.ERROR
            assert refused.error_code == Status.UNAVAILABLE.value
            tokens.down = False
            stream.message(session.session_id, "after", "r2")
            answered = await stream.until_complete("r2")
            assert answered[-1].type == T.RESPONSE_COMPLETE
            tokens.down = True
            with pytest.raises(GRPCError) as unary:
                await stub.get_server_stats(chatpb.ServerStatsRequest())
            assert unary.value.status is Status.UNAVAILABLE


async def test_a_second_user_can_neither_see_nor_touch_the_first_users_session(
    token_server: ChatServer, tokens: MemoryTokenStore
) -> None:
    # The story of issue 10, over the wire: bob tries everything on alice's session.
    target = f"127.0.0.1:{token_server.port}"
    alice_token = await issue_token(tokens, "alice")
    bob_token = await issue_token(tokens, "bob")
    async with (
        ChatClient(target, token=Secret(alice_token)) as alice,
        ChatClient(target, token=Secret(bob_token)) as bob,
    ):
        mine = await alice.create_session(title="private", system_prompt="secret prompt")
        await alice.ask(mine.session_id, "my diary")
        sid = mine.session_id

        assert (await bob.list_sessions()).sessions == []
        assert (await bob.list_sessions()).total == 0
        with pytest.raises(PermissionDenied):
            await bob.list_sessions(all_identities=True)
        for attempt in (
            bob.get_session(sid),
            bob.history(sid),
            bob.update_session(sid, system_prompt="pwned"),
            bob.delete_session(sid),
            bob.ask(sid, "hello?"),
        ):
            with pytest.raises(SessionNotFound):
                await attempt
        stats = await bob.server_stats()
        assert (stats.active_sessions, stats.total_requests) == (0, 0)

        session, history = await alice.get_session(sid), await alice.history(sid)
    assert session.system_prompt == "secret prompt"
    assert history[0].content == "my diary"
    assert len(history) == 2

"""TLS and mTLS: grpc-chat's client, grpcio's (C core) and grpcurl against a TLS server.

Certificates are made at test time (``tests/pki.py``, trustme). Every failure must come at
once with words that say which side is wrong: the clients have long connect timeouts here,
so a hang would show as the timeout's message instead of the expected one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from chat import ChatClient, ChatServer, Secret, ServerConfig, ServerUnreachable
from chat.auth.tokens import MemoryTokenStore, TokenAuth
from chat.errors import ConfigurationError, Unauthenticated
from chat.tls import client_context
from tests.helpers import TIMEOUT, eventually, grpcurl, issue_token, running_server_process
from tests.pki import Pki, make_pki

ROOT = Path(__file__).resolve().parent.parent
INTEROP = Path(__file__).parent / "interop" / "grpcio_tls_client.py"
#: Long enough that a client waiting for an answer shows as this, not as a refusal.
PATIENT = 30.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[ChatServer]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        tls_cert=pki.server_pem,
        tls_key=pki.server_pem,
    )
    async with ChatServer(config) as server:
        yield server


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[ChatServer]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        tls_cert=pki.server_pem,
        tls_key=pki.server_pem,
        tls_client_ca=pki.ca_file,
        auth="mtls",
        admin_identities=("root@example.org",),
    )
    async with ChatServer(config) as server:
        yield server


def target(server: ChatServer) -> str:
    return f"localhost:{server.port}"


async def test_the_client_talks_tls_and_health_and_reflection_share_the_port(
    tls_server: ChatServer, pki: Pki
) -> None:
    async with ChatClient(target(tls_server), tls=True, ca_file=pki.ca_file) as client:
        session = await client.create_session()
        reply = await client.ask(session.session_id, "over tls")
        assert reply.text.endswith("over tls")
        assert (await client.health()).name == "SERVING"
    context = client_context(pki.ca_file)
    async with Channel("localhost", tls_server.port, ssl=context) as channel:
        health = await HealthStub(channel).Check(HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health.SERVING


async def test_a_plaintext_client_against_tls_fails_at_once_saying_so(
    tls_server: ChatServer,
) -> None:
    client = ChatClient(target(tls_server), connect_timeout=PATIENT)
    with pytest.raises(ServerUnreachable, match="connect with --tls"):
        await client.connect()
    await client.aclose()


async def test_a_tls_client_against_plaintext_fails_at_once_saying_so(
    server: ChatServer, pki: Pki
) -> None:
    client = ChatClient(
        f"localhost:{server.port}", tls=True, ca_file=pki.ca_file, connect_timeout=PATIENT
    )
    with pytest.raises(ServerUnreachable, match="does not speak TLS"):
        await client.connect()
    await client.aclose()


async def test_an_untrusted_server_certificate_fails_at_once_saying_so(
    tls_server: ChatServer, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other)
    client = ChatClient(target(tls_server), tls=True, ca_file=str(other), connect_timeout=PATIENT)
    with pytest.raises(ServerUnreachable, match="not trusted"):
        await client.connect()
    await client.aclose()


def test_bad_certificate_files_are_configuration_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="--ca-file"):
        ChatClient("localhost:1", tls=True, ca_file=str(garbage))
    with pytest.raises(ConfigurationError, match="add --tls"):
        ChatClient("localhost:1", ca_file=str(garbage))


async def test_mtls_identity_is_the_certificate_san(mtls_server: ChatServer, pki: Pki) -> None:
    cert, key = pki.client("dave@example.org")
    root_cert, root_key = pki.client("root@example.org")
    async with ChatClient(
        target(mtls_server), tls=True, ca_file=pki.ca_file, cert_file=cert, key_file=key
    ) as dave:
        me = await dave.who_am_i()
        session = await dave.create_session()
    assert (me.identity, me.admin, me.auth) == ("dave@example.org", False, "mtls")
    async with ChatClient(
        target(mtls_server),
        tls=True,
        ca_file=pki.ca_file,
        cert_file=root_cert,
        key_file=root_key,
    ) as root:
        assert (await root.who_am_i()).admin
        listed = await root.list_sessions(all_identities=True)
    assert [(s.session_id, s.owner) for s in listed.sessions] == [
        (session.session_id, "dave@example.org")
    ]


async def test_mtls_refuses_clients_without_a_certificate_of_its_ca(
    mtls_server: ChatServer, pki: Pki
) -> None:
    nobody = ChatClient(target(mtls_server), tls=True, ca_file=pki.ca_file, connect_timeout=PATIENT)
    with pytest.raises(ServerUnreachable, match="client certificate"):
        await nobody.connect()
    await nobody.aclose()
    cert, key = pki.client("mallory@example.org", ca=trustme.CA())
    stranger = ChatClient(
        target(mtls_server),
        tls=True,
        ca_file=pki.ca_file,
        cert_file=cert,
        key_file=key,
        connect_timeout=PATIENT,
    )
    with pytest.raises(ServerUnreachable, match="TLS"):
        await stranger.connect()
    await stranger.aclose()


# -- grpcio (C core) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpcio_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grpcio-tls")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "chat.proto"),
        ],
        check=True,
    )
    return out


def run_grpcio(
    address: str, stubs: Path, pki: Pki, *args: str, token: str = ""
) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, str(INTEROP), address, str(stubs), pki.ca_file, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CHAT_TOKEN": token},
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout)
    return result


async def test_grpcio_over_tls_with_a_token(pki: Pki, grpcio_stubs: Path) -> None:
    tokens = MemoryTokenStore()
    token = await issue_token(tokens, "erin")
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        tls_cert=pki.server_pem,
        tls_key=pki.server_pem,
        auth="tokens",
    )
    async with ChatServer(config, authenticator=TokenAuth(tokens)) as server:
        address = f"127.0.0.1:{server.port}"
        ok = await _in_thread(run_grpcio, address, grpcio_stubs, pki, token=token)
        refused = await _in_thread(run_grpcio, address, grpcio_stubs, pki)
    assert ok["health"] == "SERVING"
    assert ok["whoami"] == {"identity": "erin", "admin": False, "auth": "tokens"}
    assert_one_turn(ok["turn"])
    assert refused == {"health": "SERVING", "error": "UNAUTHENTICATED"}


async def test_grpcio_over_mtls(mtls_server: ChatServer, pki: Pki, grpcio_stubs: Path) -> None:
    cert, key = pki.client("frank.example")
    address = f"127.0.0.1:{mtls_server.port}"
    ok = await _in_thread(run_grpcio, address, grpcio_stubs, pki, cert, key)
    assert ok["whoami"] == {"identity": "frank.example", "admin": False, "auth": "mtls"}
    assert_one_turn(ok["turn"])
    # Without a certificate the handshake is refused: no call gets through, health neither.
    refused = await _in_thread(run_grpcio, address, grpcio_stubs, pki)
    assert refused["health"] == "UNAVAILABLE"
    assert refused["error"] == "UNAVAILABLE"


def assert_one_turn(kinds: object) -> None:
    assert isinstance(kinds, list)
    assert kinds[0] == "RESPONSE_START"
    assert kinds[-1] == "RESPONSE_COMPLETE"
    assert set(kinds[1:-1]) == {"CHUNK"}


async def _in_thread(function: object, *args: object, **kwargs: object) -> dict[str, object]:
    import asyncio
    from typing import Any, cast

    # The server runs on this event loop: the blocking subprocess call waits elsewhere.
    return await asyncio.to_thread(cast(Any, function), *args, **kwargs)


# -- grpcurl -----------------------------------------------------------------------------


def test_grpcurl_over_tls_and_mtls(pki: Pki) -> None:
    cert, key = pki.client("grace.example")
    args = ("--tls-cert", pki.server_pem, "--tls-key", pki.server_pem)
    with running_server_process(*args, "--tls-client-ca", pki.ca_file, "--auth", "mtls") as srv:
        base = [grpcurl(), "-cacert", pki.ca_file, "-servername", "localhost"]
        listed = subprocess.run(
            [*base, "-cert", cert, "-key", key, srv.address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert "ChatService" in listed.stdout
        me = subprocess.run(
            [*base, "-cert", cert, "-key", key, srv.address, "ChatService/WhoAmI"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert me.returncode == 0, me.stderr
        assert json.loads(me.stdout)["identity"] == "grace.example"
        without = subprocess.run(
            [*base, srv.address, "ChatService/WhoAmI"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert without.returncode != 0


# -- SIGHUP --------------------------------------------------------------------------------


async def test_sighup_reloads_the_certificate_for_new_connections_and_keeps_open_streams(
    pki: Pki, tmp_path: Path
) -> None:
    args = ("--tls-cert", pki.server_pem, "--tls-key", pki.server_pem, "--store", "memory://")
    new_ca = trustme.CA()
    new_ca_file = tmp_path / "new-ca.pem"
    new_ca.cert_pem.write_to_path(new_ca_file)
    with running_server_process(*args) as srv:
        address = f"localhost:{srv.port}"
        async with ChatClient(address, tls=True, ca_file=pki.ca_file) as old:
            session = await old.create_session()
            pki.renew_server(new_ca)
            srv.process.send_signal(signal.SIGHUP)

            async def new_certificate_served() -> bool:
                try:
                    async with ChatClient(address, tls=True, ca_file=str(new_ca_file)) as new:
                        await new.ping()
                except ServerUnreachable:
                    return False
                return True

            await eventually(new_certificate_served, "the renewed certificate is served")
            # The connection made before the reload goes on, stream and all.
            reply = await old.ask(session.session_id, "still here")
            assert reply.text.endswith("still here")
        # New connections no longer get the old certificate.
        stale = ChatClient(address, tls=True, ca_file=pki.ca_file, connect_timeout=PATIENT)
        with pytest.raises(ServerUnreachable, match="not trusted"):
            await stale.connect()
        await stale.aclose()
    assert any("reloaded the TLS certificate" in line for line in srv.output)


async def test_a_token_client_over_tls_against_a_tokens_server(pki: Pki) -> None:
    tokens = MemoryTokenStore()
    token = await issue_token(tokens, "heidi")
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        tls_cert=pki.server_pem,
        tls_key=pki.server_pem,
        auth="tokens",
    )
    async with ChatServer(config, authenticator=TokenAuth(tokens)) as server:
        address = f"localhost:{server.port}"
        async with ChatClient(address, tls=True, ca_file=pki.ca_file, token=Secret(token)) as c:
            assert (await c.who_am_i()).identity == "heidi"
        anonymous = ChatClient(address, tls=True, ca_file=pki.ca_file)
        with pytest.raises(Unauthenticated):
            await anonymous.connect()
        await anonymous.aclose()

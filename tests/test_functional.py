"""Functional tests against a real server on 127.0.0.1 (in this process or as chat-server)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1 import reflection_grpc, reflection_pb2

import chatpb
from chat import (
    ChatClient,
    ChatServer,
    ConfigurationError,
    EchoBackend,
    MemoryStore,
    MessageStatus,
    Role,
    ServerConfig,
    open_store,
)
from scripts.generate import PROTO, ROOT
from tests.backends import GatedBackend
from tests.helpers import (
    TIMEOUT,
    ChatStream,
    eventually,
    grpcurl,
    reply_text,
    running_server_process,
)

T = chatpb.ChatResponseType
INTEROP_CLIENT = Path(__file__).parent / "interop" / "grpcio_client.py"


@pytest.fixture(scope="session")
def grpcio_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chat_pb2 and chat_pb2_grpc, generated from chat.proto by grpcio-tools, now."""
    out = tmp_path_factory.mktemp("grpcio")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ],
        check=True,
    )
    return out


def test_a_grpcio_client_generated_from_chat_proto_interoperates(grpcio_stubs: Path) -> None:
    with running_server_process("--pace", "0.01") as server:
        completed = subprocess.run(
            [sys.executable, str(INTEROP_CLIENT), server.address, str(grpcio_stubs)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)

    assert result["health"] == {"": "SERVING", "ChatService": "SERVING"}
    # grpcio clients may compress their requests (gzip): the server reads them.
    gzip = result["gzip"]
    assert gzip["title"] == "gzip " * 30
    assert gzip["last"] == "RESPONSE_COMPLETE"
    assert gzip["reply"].endswith("compressed " * 20)
    reflection = result["reflection"]
    assert "ChatService" in reflection["services"]
    assert "grpc.health.v1.Health" in reflection["services"]
    assert (reflection["file"], reflection["package"]) == ("chat.proto", "")
    assert set(reflection["methods"]) >= {"CreateSession", "Chat", "UpdateSession"}
    assert reflection["chat_request_comment"] == "One client event on the `Chat` stream."

    first, second = result["turns"]
    for turn, request_id in ((first, "t1"), (second, "t2")):
        mine = [e for e in turn if e["request_id"] == request_id]
        chunks = [e for e in mine if e["type"] == "CHUNK"]
        assert mine[0]["type"] == "RESPONSE_START"
        assert mine[-1]["type"] == "RESPONSE_COMPLETE"
        assert mine[-1]["finish_reason"] == "FINISH_REASON_STOP"
        assert [c["chunk_number"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert mine[-1]["total_chunks"] == len(chunks)
    # The PING sent right behind the 30-word message came back before that reply ended.
    kinds = [(e["type"], e["request_id"]) for e in first]
    assert kinds.index(("PONG", "ping-t1")) < kinds.index(("RESPONSE_COMPLETE", "t1"))
    assert second[-1]["message_count"] == 4
    assert result["bad"] == {"type": "ERROR", "code": 5}
    assert result["stream_rest"] == 0
    assert result["session_id"] in result["listed"]
    history = result["history"]
    assert [(m["role"], m["status"]) for m in history] == [
        ("ROLE_USER", "MESSAGE_STATUS_COMPLETE"),
        ("ROLE_ASSISTANT", "MESSAGE_STATUS_COMPLETE"),
    ] * 2
    assert history[3]["content"] == "Echo #2 (3 messages in context): second message"
    assert result["deleted_messages"] == 4
    assert result["after_delete"] == "NOT_FOUND"


async def test_health_reports_serving_then_not_serving_while_draining() -> None:
    backend = GatedBackend()
    server = ChatServer(ServerConfig(host="127.0.0.1", port=0), backend=backend)
    await server.start()
    try:
        async with Channel("127.0.0.1", server.port) as channel:
            health = HealthStub(channel)
            request = HealthCheckRequest(service="ChatService")
            assert (await health.Check(request)).status == HealthCheckResponse.SERVING
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, "hi", "r1")
                await stream.until("r1", [T.RESPONSE_START])
                stopping = asyncio.create_task(server.stop(grace_period=TIMEOUT))
                await eventually(
                    lambda: _status_is(health, HealthCheckResponse.NOT_SERVING),
                    "health to turn NOT_SERVING",
                )
                # A new message during the drain is refused; the reply in flight goes on.
                stream.message(session.session_id, "more", "r2")
                (refused,) = await stream.until_complete("r2")
                assert refused.error_code == 14
                backend.release("finished")
                backend.finish()
                events = await stream.until_complete("r1")
                assert events[-1].finish_reason == chatpb.FinishReason.STOP
                assert reply_text(events) == "finished"
                # Then the client is asked to end the stream and reconnect; it does.
                goaway = await stream.recv()
                assert goaway.type == T.STATUS
                assert goaway.error_code == Status.UNAVAILABLE.value
                assert "shutting down" in goaway.status_message
                stream.end_input()
                with pytest.raises(EOFError):
                    await stream.recv()
                await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        await server.stop()


async def _status_is(health: HealthStub, status: int) -> bool:
    response = await health.Check(HealthCheckRequest(service="ChatService"))
    return bool(response.status == status)


class _KeepingStore(MemoryStore):
    """A memory store that survives the server's stop, to inspect what it kept."""


async def test_shutdown_past_the_grace_period_keeps_the_partial_reply_as_interrupted() -> None:
    backend = GatedBackend()
    store = _KeepingStore()
    server = ChatServer(ServerConfig(host="127.0.0.1", port=0), backend=backend, store=store)
    await server.start()
    async with Channel("127.0.0.1", server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "hi", "r1")
            backend.release("half a rep")
            await stream.until("r1", [T.CHUNK])
            await server.stop(grace_period=0.05)
            await asyncio.wait_for(backend.closed.wait(), TIMEOUT)
    history = await store.messages(session.session_id)
    assert [(m.role, m.status, m.content) for m in history] == [
        (Role.USER, MessageStatus.COMPLETE, "hi"),
        (Role.ASSISTANT, MessageStatus.INTERRUPTED, "half a rep"),
    ]


async def test_a_client_that_goes_away_mid_reply_leaves_nothing_behind() -> None:
    backend = GatedBackend()
    store = _KeepingStore()
    async with ChatServer(
        ServerConfig(host="127.0.0.1", port=0, on_disconnect="cancel"),
        backend=backend,
        store=store,
    ) as server:
        baseline = len(asyncio.all_tasks())
        channel = Channel("127.0.0.1", server.port)
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        stream = ChatStream(stub)
        await stream.__aenter__()
        stream.message(session.session_id, "hello", "r1")
        backend.release("some ")
        backend.release("words")
        await stream.until("r1", [T.CHUNK])
        await stream.recv()
        assert server.core.stats.active_replies == 1
        # The client vanishes: its stream is cancelled and its connection closed.
        await stream.close()
        channel.close()

        await asyncio.wait_for(backend.closed.wait(), TIMEOUT)

        async def released() -> bool:
            stats = server.core.stats
            return stats.active_streams == 0 and stats.active_replies == 0

        await eventually(released, "the server to release the stream")

        async def no_tasks_left() -> bool:
            return len(asyncio.all_tasks()) <= baseline

        await eventually(no_tasks_left, "server tasks to end")
        assert server.core._subscribers == {}
    history = await store.messages(session.session_id)
    assert [(m.status, m.content) for m in history] == [
        (MessageStatus.COMPLETE, "hello"),
        (MessageStatus.CANCELLED, "some words"),
    ]


async def test_each_delta_reaches_the_client_before_the_backend_makes_the_next() -> None:
    backend = GatedBackend()
    config = ServerConfig(host="127.0.0.1", port=0)
    async with (
        ChatServer(config, backend=backend) as server,
        Channel("127.0.0.1", server.port) as channel,
    ):
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "hi", "r1")
            await stream.until("r1", [T.RESPONSE_START])
            for number, word in enumerate(["no ", "buffering ", "here"], start=1):
                backend.release(word)
                chunk = await stream.recv()
                assert (chunk.chunk_number, chunk.chunk_text) == (number, word)
                assert backend.produced == ["no ", "buffering ", "here"][:number]
            backend.finish()
            assert (await stream.recv()).total_chunks == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_chat_server_process_finishes_a_reply_in_flight_on_a_signal(
    signum: signal.Signals,
) -> None:
    with running_server_process("--pace", "0.02", "--grace-period", "20") as server:
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, " ".join(["word"] * 40), "r1")
                await stream.until("r1", [T.CHUNK])
                server.process.send_signal(signum)
                events = await stream.until_complete("r1")
                assert (await stream.recv()).error_code == Status.UNAVAILABLE.value
                stream.end_input()
        assert events[-1].type == T.RESPONSE_COMPLETE
        assert events[-1].finish_reason == chatpb.FinishReason.STOP
        assert reply_text(events).endswith("word word")
        assert server.process.wait(TIMEOUT) == 0
    assert any("shutting down" in line for line in server.output)


async def test_a_second_signal_stops_the_server_at_once_keeping_the_partial_reply(
    tmp_path: Path,
) -> None:
    # A reply of about 20 s and a grace period of 60 s: only the second signal can make the
    # server exit within the test's bound.
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with running_server_process(
        "--pace", "0.05", "--grace-period", "60", "--store", store
    ) as server:
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, " ".join(["word"] * 400), "r1")
                await stream.until("r1", [T.CHUNK])
                server.process.send_signal(signal.SIGINT)
                await eventually(
                    lambda: _said(server.output, "shutting down"), "the first signal's log line"
                )
                assert server.process.poll() is None  # still draining
                server.process.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(server.process.wait, TIMEOUT) == 0
    assert any("stopping at once" in line for line in server.output)
    opened = open_store(store)
    await opened.open()
    try:
        history = await opened.messages(session.session_id)
    finally:
        await opened.aclose()
    assert [m.status for m in history] == [MessageStatus.COMPLETE, MessageStatus.INTERRUPTED]
    # Cut short (the echo backend repeats all 400 words when it is left to finish), and
    # kept: the reply had started.
    assert history[1].content.startswith("Echo")
    assert history[1].content.count("word") < 400


async def _said(output: list[str], text: str) -> bool:
    return any(text in line for line in output)


async def test_environment_variables_configure_the_server() -> None:
    env = {"CHAT_MODEL": "house-model", "CHAT_MAX_MESSAGE_CHARS": "8"}
    with running_server_process(env=env) as server:
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            assert session.session is not None
            assert session.session.model == "house-model"
            async with ChatStream(stub) as stream:
                stream.message(session.session_id, "123456789", "long")
                (error,) = await stream.until_complete("long")
        assert error.error_message == "message: is 9 characters; the limit is 8"
    assert any("model house-model" in line for line in server.output)


@pytest.fixture
async def two_streams(server: ChatServer) -> AsyncIterator[tuple[ChatStream, ChatStream, str]]:
    async with Channel("127.0.0.1", server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as first, ChatStream(stub) as second:
            yield first, second, session.session_id


async def test_a_turn_on_one_stream_is_pushed_to_another_stream_on_the_session(
    two_streams: tuple[ChatStream, ChatStream, str],
) -> None:
    first, second, session_id = two_streams
    second.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.TYPING_STOP, session_id=session_id))
    first.message(session_id, "hello", "r1")
    await first.until_complete("r1")
    update = await second.recv()
    assert update.type == T.SESSION_UPDATE
    assert update.message_count == 2
    assert update.status_message == "reply completed"


class _ClosingEcho(EchoBackend):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_a_server_that_cannot_start_closes_what_it_opened(server: ChatServer) -> None:
    backend = _ClosingEcho()
    with pytest.raises(ConfigurationError, match="unknown store"):
        await ChatServer(ServerConfig(store="bogus://x"), backend=backend).start()
    assert backend.closed

    backend = _ClosingEcho()
    taken = ServerConfig(host="127.0.0.1", port=server.port, store="memory://")
    with pytest.raises(OSError, match="address already in use"):
        await ChatServer(taken, backend=backend).start()
    assert backend.closed


async def test_stopping_in_process_ends_the_clients_connections() -> None:
    backend = GatedBackend()
    server = ChatServer(ServerConfig(host="127.0.0.1", port=0, store="memory://"), backend=backend)
    await server.start()
    async with Channel("127.0.0.1", server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "hi", "r1")
            backend.release("partial")
            await stream.until("r1", [T.CHUNK])
            await server.stop(grace_period=0)
            # The reply in flight is cut off: the client hears of it, instead of waiting,
            # first from the final events of the reply and the stream...
            final = await stream.recv()
            assert (final.type, final.error_code) == (T.ERROR, Status.UNAVAILABLE.value)
            goaway = await stream.recv()
            assert goaway.status_kind == chatpb.StatusKind.SHUTDOWN
            # ...then, as it did not end its side when asked, from the connection closing.
            with pytest.raises((StreamTerminatedError, GRPCError, ConnectionError)):
                await stream.recv()
        # And the old connection takes no new calls.
        with pytest.raises((StreamTerminatedError, GRPCError, ConnectionError, OSError)):
            await stub.get_server_stats(chatpb.ServerStatsRequest(), timeout=TIMEOUT)


def test_grpcurl_lists_describes_and_calls_the_service() -> None:
    # The README's grpcurl commands, run by grpcurl itself against a chat-server process.
    with running_server_process("--store", "memory://") as server:

        def run(*args: str) -> str:
            done = subprocess.run(
                [grpcurl(), "-plaintext", *args],
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 3,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "ChatService" in run(server.address, "list").split()
        described = run(server.address, "describe", "ChatService")
        assert "rpc Chat ( stream .ChatRequest ) returns ( stream .ChatResponse );" in described
        assert "The conversation stream." in described  # comments come through reflection
        created = json.loads(
            run("-d", '{"title": "first"}', server.address, "ChatService/CreateSession")
        )
        assert created["session"]["title"] == "first"
        info = json.loads(
            run(
                "-d",
                json.dumps({"sessionId": created["sessionId"]}),
                server.address,
                "ChatService/GetSessionInfo",
            )
        )
        assert info["sessionId"] == created["sessionId"]


async def test_reflection_v1_as_grpcurl_uses_it_lists_and_describes(server: ChatServer) -> None:
    # grpcurl speaks reflection v1 (the grpcio test above uses v1alpha); both must answer
    # with chat.proto and its comments, which is what `grpcurl describe` prints.
    async with Channel("127.0.0.1", server.port) as channel:
        stub = reflection_grpc.ServerReflectionStub(channel)

        async def ask(
            request: reflection_pb2.ServerReflectionRequest,
        ) -> reflection_pb2.ServerReflectionResponse:
            async with stub.ServerReflectionInfo.open() as call:
                await call.send_message(request, end=True)
                response = await call.recv_message()
                assert response is not None
                return response

        listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert names >= {
            "ChatService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        }
        found = await ask(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="ChatRequest")
        )
        (raw,) = found.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert file.name == "chat.proto"
    comments = [loc.leading_comments for loc in file.source_code_info.location]
    assert any("One client event on the `Chat` stream." in c for c in comments)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_localhost_listens_on_both_loopback_addresses() -> None:
    # /etc/hosts often maps localhost to 127.0.0.1 alone; a client dialling [::1] (or whose
    # resolver prefers IPv6) must not be refused by a server told to listen on localhost.
    config = ServerConfig(host="localhost", port=0, store="memory://")
    async with ChatServer(config) as server:
        for target in (f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
            async with ChatClient(target) as client:
                assert await client.ping() > 0

"""A real ``chat-server`` on a SQLite file, killed with SIGKILL, keeps every completed turn.

The core stores a turn (user message and reply) in one append when the turn ends, and the
client hears RESPONSE_COMPLETE only after that append committed. So after a crash every
completed turn must be there, whole, once; a turn cut off mid-reply must be absent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from grpclib.client import Channel

import chatpb
from chat.store.sqlite import SqliteStore
from chat.types import MessageStatus, Role
from tests.helpers import TIMEOUT, ChatStream, ServerProcess, reply_text, running_server_process

pytestmark = pytest.mark.slow

#: A reply that takes many seconds at the pace used below: killed long before its end.
LONG_MESSAGE = " ".join(f"word{n}" for n in range(2000))


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


async def history(server: ServerProcess, session_id: str) -> list[chatpb.ChatMessage]:
    async with Channel(server.host, server.port) as channel:
        info = await chatpb.ChatServiceStub(channel).get_session_info(
            chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
        )
    return list(info.messages)


async def test_sigkill_mid_reply_keeps_completed_turns_and_drops_the_cut_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.db"
    url = f"sqlite://{path}"
    with running_server_process("--store", url, "--pace", "0.005") as first:
        async with Channel(first.host, first.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session_id = (await stub.create_session(chatpb.CreateSessionRequest())).session_id
            async with ChatStream(stub) as stream:
                for n in (1, 2):
                    stream.message(session_id, f"turn {n}", f"r{n}")
                    events = await stream.until_complete(f"r{n}")
                    assert events[-1].type == chatpb.ChatResponseType.RESPONSE_COMPLETE
                stream.message(session_id, LONG_MESSAGE, "cut")
                await stream.until("cut", [chatpb.ChatResponseType.CHUNK])
                first.process.kill()
                first.process.wait(TIMEOUT)

    assert integrity(path) == "ok"
    with running_server_process("--store", url) as second:
        kept = await history(second, session_id)
        assert [(m.role, m.content, m.request_id) for m in kept] == [
            (chatpb.Role.USER, "turn 1", "r1"),
            (chatpb.Role.ASSISTANT, "Echo #1 (1 message in context): turn 1", "r1"),
            (chatpb.Role.USER, "turn 2", "r2"),
            (chatpb.Role.ASSISTANT, "Echo #2 (3 messages in context): turn 2", "r2"),
        ]
        assert {m.status for m in kept} == {chatpb.MessageStatus.COMPLETE}
        # The session goes on where it was.
        async with (
            Channel(second.host, second.port) as channel,
            ChatStream(chatpb.ChatServiceStub(channel)) as stream,
        ):
            stream.message(session_id, "after the crash", "r3")
            events = await stream.until_complete("r3")
        assert reply_text(events) == "Echo #3 (5 messages in context): after the crash"
    assert integrity(path) == "ok"


async def test_sigkill_during_a_stream_of_turns_leaves_only_whole_acknowledged_turns(
    tmp_path: Path,
) -> None:
    """Turns land back to back on several sessions; the kill falls wherever it falls."""
    path = tmp_path / "chat.db"
    acknowledged: set[str] = set()
    enough = asyncio.Event()

    async def chat(stub: chatpb.ChatServiceStub, session_id: str) -> None:
        async with ChatStream(stub) as stream:
            for n in range(1000):
                request_id = f"{session_id}/{n}"
                stream.message(session_id, f"message {n}", request_id)
                events = await stream.until_complete(request_id)
                if events[-1].type == chatpb.ChatResponseType.RESPONSE_COMPLETE:
                    acknowledged.add(request_id)
                if len(acknowledged) >= 60:
                    enough.set()

    with running_server_process("--store", f"sqlite://{path}") as server:
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            sessions = [
                (await stub.create_session(chatpb.CreateSessionRequest())).session_id
                for _ in range(4)
            ]
            tasks = [asyncio.create_task(chat(stub, s)) for s in sessions]
            try:
                await asyncio.wait_for(enough.wait(), TIMEOUT * 3)
                server.process.kill()
                server.process.wait(TIMEOUT)
                # Every stream now ends with an error (the server is gone).
                await asyncio.wait(tasks, timeout=TIMEOUT)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
    # Each stream ended with the server gone (or was cancelled): nothing to report.
    for task in tasks:
        if not task.cancelled():
            assert task.exception() is not None
    assert integrity(path) == "ok"

    store = SqliteStore(path)
    await store.open()
    try:
        stored: list[str] = []
        for session_id in sessions:
            messages = await store.messages(session_id)
            assert len(messages) % 2 == 0, "a half-written turn"
            for user, reply in zip(messages[::2], messages[1::2], strict=True):
                assert (user.role, reply.role) == (Role.USER, Role.ASSISTANT)
                assert user.request_id == reply.request_id
                assert reply.status is MessageStatus.COMPLETE
                assert reply.content.endswith(user.content)
                stored.append(user.request_id)
            assert (await store.get(session_id)).message_count == len(messages)
    finally:
        await store.aclose()
    assert [r for r, count in Counter(stored).items() if count > 1] == [], "a duplicated turn"
    assert acknowledged <= set(stored), "an acknowledged turn was lost"
    # At most one turn per session was stored but not yet acknowledged when the kill came.
    assert len(set(stored) - acknowledged) <= len(sessions)


async def test_the_default_server_keeps_sessions_across_restarts_with_no_flags() -> None:
    # XDG_DATA_HOME points into this test's temporary directory (tests/conftest.py).
    expected = Path(os.environ["XDG_DATA_HOME"]) / "grpc-chat" / "chat.db"
    assert not expected.exists()
    with running_server_process() as first:
        async with (
            Channel(first.host, first.port) as channel,
            ChatStream(chatpb.ChatServiceStub(channel)) as stream,
        ):
            stub = chatpb.ChatServiceStub(channel)
            session_id = (await stub.create_session(chatpb.CreateSessionRequest())).session_id
            stream.message(session_id, "remember me", "r1")
            await stream.until_complete("r1")
        assert first.terminate(signal.SIGTERM) == 0
    assert any(f"sessions in: {expected}" in line for line in first.output)
    assert expected.exists()
    with running_server_process() as second:
        kept = await history(second, session_id)
    assert [m.content for m in kept] == [
        "remember me",
        "Echo #1 (1 message in context): remember me",
    ]

"""A real chat-server process, started as a user would, answers a chat turn."""

from __future__ import annotations

import signal

from grpclib.client import Channel

import chatpb
from tests.helpers import ChatStream, reply_text, running_server_process


async def test_chat_server_process_streams_a_reply_and_stops_on_sigterm() -> None:
    with running_server_process() as server:
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            created = await stub.create_session(chatpb.CreateSessionRequest(title="smoke"))
            async with ChatStream(stub) as stream:
                stream.message(created.session_id, "hello world", "r1")
                events = await stream.until_complete("r1")
        assert events[-1].type == chatpb.ChatResponseType.RESPONSE_COMPLETE
        assert reply_text(events) == "Echo #1 (1 message in context): hello world"
        assert server.terminate(signal.SIGTERM) == 0
    assert any("listening on 127.0.0.1:" in line for line in server.output)

"""The servicer over an in-memory channel (grpclib.testing.ChannelFor): translation and statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor

import chatpb
from chat import ChatCore, EchoBackend, Limits, MemoryStore
from chat.service import ChatService
from tests.helpers import ChatStream, eventually, reply_text

T = chatpb.ChatResponseType


@pytest.fixture
async def stub(core: ChatCore) -> AsyncIterator[chatpb.ChatServiceStub]:
    async with ChannelFor([ChatService(core)]) as channel:
        yield chatpb.ChatServiceStub(channel)


async def test_create_get_update_delete_a_session(stub: chatpb.ChatServiceStub) -> None:
    created = await stub.create_session(
        chatpb.CreateSessionRequest(
            title="Plans",
            system_prompt="Be terse.",
            context_policy=chatpb.ContextPolicy.REJECT,
        )
    )
    assert created.session is not None
    assert created.session_id == created.session.session_id
    assert created.session.model == "echo"
    assert created.session.created_at.endswith("Z")

    info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=created.session_id))
    assert (info.title, info.system_prompt, info.message_count) == ("Plans", "Be terse.", 0)
    assert info.context_policy == chatpb.ContextPolicy.REJECT
    assert info.messages == []

    updated = await stub.update_session(
        chatpb.UpdateSessionRequest(session_id=created.session_id, title="Renamed")
    )
    assert (updated.title, updated.system_prompt) == ("Renamed", "Be terse.")
    cleared = await stub.update_session(
        chatpb.UpdateSessionRequest(session_id=created.session_id, system_prompt="")
    )
    assert (cleared.title, cleared.system_prompt) == ("Renamed", "")

    deleted = await stub.delete_session(chatpb.DeleteSessionRequest(session_id=created.session_id))
    assert deleted.session_id == created.session_id
    with pytest.raises(GRPCError) as error:
        await stub.get_session_info(chatpb.SessionInfoRequest(session_id=created.session_id))
    assert error.value.status is Status.NOT_FOUND
    assert created.session_id in (error.value.message or "")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("get", "session_id"),
        ("update", "session_id"),
        ("delete", "session_id"),
        ("title", "title"),
        ("page_size", "page_size"),
        ("page_token", "page_token"),
        ("policy", "context_policy"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(
    stub: chatpb.ChatServiceStub, call: str, field: str
) -> None:
    requests: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: stub.get_session_info(chatpb.SessionInfoRequest()),
        "update": lambda: stub.update_session(chatpb.UpdateSessionRequest(title="x")),
        "delete": lambda: stub.delete_session(chatpb.DeleteSessionRequest()),
        "title": lambda: stub.create_session(chatpb.CreateSessionRequest(title="t" * 500)),
        "page_size": lambda: stub.list_sessions(chatpb.ListSessionsRequest(page_size=-5)),
        "page_token": lambda: stub.list_sessions(chatpb.ListSessionsRequest(page_token="%%%")),
        "policy": lambda: stub.create_session(
            chatpb.CreateSessionRequest(context_policy=chatpb.ContextPolicy(9))
        ),
    }
    with pytest.raises(GRPCError) as error:
        await requests[call]()
    assert error.value.status is Status.INVALID_ARGUMENT
    assert (error.value.message or "").startswith(f"{field}:")


async def test_unknown_sessions_are_not_found(stub: chatpb.ChatServiceStub) -> None:
    for call in (
        stub.get_session_info(chatpb.SessionInfoRequest(session_id="nope")),
        stub.update_session(chatpb.UpdateSessionRequest(session_id="nope", title="x")),
        stub.delete_session(chatpb.DeleteSessionRequest(session_id="nope")),
    ):
        with pytest.raises(GRPCError) as error:
            await call
        assert error.value.status is Status.NOT_FOUND


async def test_list_sessions_pages_newest_first_without_repeats(
    stub: chatpb.ChatServiceStub,
) -> None:
    ids = [
        (await stub.create_session(chatpb.CreateSessionRequest(title=str(n)))).session_id
        for n in range(7)
    ]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.list_sessions(chatpb.ListSessionsRequest(page_size=3, page_token=token))
        assert page.total_size == 7 + (pages > 0)
        seen.extend(s.session_id for s in page.sessions)
        pages += 1
        if not page.next_page_token:
            break
        token = page.next_page_token
        # A session created between pages does not appear on later pages.
        if pages == 1:
            await stub.create_session(chatpb.CreateSessionRequest(title="late"))
    assert pages == 3
    assert seen == list(reversed(ids))
    default = await stub.list_sessions(chatpb.ListSessionsRequest())
    assert len(default.sessions) == 8


async def test_history_is_returned_when_asked(stub: chatpb.ChatServiceStub) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest())
    async with ChatStream(stub) as stream:
        stream.message(session.session_id, "hi there", "r1")
        events = await stream.until_complete("r1")
    info = await stub.get_session_info(
        chatpb.SessionInfoRequest(session_id=session.session_id, include_messages=True)
    )
    assert info.message_count == 2
    assert [(m.role, m.status, m.content) for m in info.messages] == [
        (chatpb.Role.USER, chatpb.MessageStatus.COMPLETE, "hi there"),
        (chatpb.Role.ASSISTANT, chatpb.MessageStatus.COMPLETE, reply_text(events)),
    ]
    assert info.messages[1].model == "echo"
    assert info.messages[1].usage is not None
    assert all(m.request_id == "r1" and m.timestamp.endswith("Z") for m in info.messages)


async def test_chat_events_carry_the_new_fields(stub: chatpb.ChatServiceStub) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest())
    async with ChatStream(stub) as stream:
        stream.message(session.session_id, "one two", "r1")
        events = await stream.until_complete("r1")
        stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id="p"))
        pong = await stream.recv()
        stream.message("missing", "x", "bad")
        (error,) = await stream.until_complete("bad")
    start, *chunks, complete = events
    assert start.type == T.RESPONSE_START
    assert start.model == "echo"
    assert start.context_messages == 1
    assert all(e.session_id == session.session_id and e.timestamp.endswith("Z") for e in events)
    assert [c.chunk_number for c in chunks] == list(range(1, len(chunks) + 1))
    assert complete.type == T.RESPONSE_COMPLETE
    assert complete.finish_reason == chatpb.FinishReason.STOP
    assert complete.total_chunks == len(chunks)
    assert complete.message_count == 2
    assert complete.usage is not None
    assert complete.usage.total_tokens > 0
    assert (pong.type, pong.request_id) == (T.PONG, "p")
    assert error.type == T.ERROR
    assert error.error_code == Status.NOT_FOUND.value
    assert "not found" in error.error_message


async def test_server_stats_count_what_happened(core: ChatCore) -> None:
    async with ChannelFor([ChatService(core)]) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "a b c", "ok")
            events = await stream.until_complete("ok")
            stream.message(session.session_id, "", "bad")
            await stream.until_complete("bad")
            during = await stub.get_server_stats(chatpb.ServerStatsRequest())

        async def stream_closed() -> bool:
            stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
            return stats.active_streams == 0

        await eventually(stream_closed, "the server to see the stream closed")
        stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
    assert during.active_streams == 1
    assert stats.total_requests == 2
    assert stats.successful_requests == 1
    assert stats.failed_requests == 1
    assert stats.total_sessions_created == 1
    assert stats.active_sessions == 1
    assert stats.total_chunks_sent == len(events) - 2
    assert stats.avg_response_time > 0
    assert stats.uptime_seconds > 0
    assert (stats.model, stats.backend, stats.store) == ("echo", "echo", "memory")
    assert stats.started_at.endswith("Z")


async def test_message_limit_is_configurable() -> None:
    core = ChatCore(MemoryStore(), EchoBackend(), limits=Limits(max_message_chars=5))
    async with ChannelFor([ChatService(core)]) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session = await stub.create_session(chatpb.CreateSessionRequest())
        async with ChatStream(stub) as stream:
            stream.message(session.session_id, "123456", "long")
            (error,) = await stream.until_complete("long")
    assert error.error_code == Status.INVALID_ARGUMENT.value
    assert error.error_message == "message: is 6 characters; the limit is 5"

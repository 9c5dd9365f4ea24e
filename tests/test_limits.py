"""Every string field of every request has a limit, checked before any work (issue 12, item 1).

The fields are read from chat.proto's descriptors: a string field added to a request without
a limit fails :func:`test_every_string_field_of_every_request_has_a_limit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor

import chatpb
from chat import ChatCore, EchoBackend, Limits, MemoryStore
from chat._proto import CHAT_SERVICE, message_class
from chat.service import ChatService
from tests.helpers import ChatStream

T = chatpb.ChatResponseType

#: Request field -> the Limits attribute that bounds it.
LIMIT_OF = {
    "session_id": "max_id_chars",
    "request_id": "max_id_chars",
    "turn_id": "max_id_chars",
    "client_message_id": "max_id_chars",
    "timestamp": "max_id_chars",
    "traceparent": "max_id_chars",
    "message": "max_message_chars",
    "title": "max_title_chars",
    "model": "max_model_chars",
    "system_prompt": "max_system_prompt_chars",
    "page_token": "max_page_token_chars",
}


def _string_fields() -> list[tuple[str, str]]:
    return [
        (method.name, field.name)
        for method in CHAT_SERVICE.methods
        for field in method.input_type.fields
        if field.type == field.TYPE_STRING
    ]


def test_every_string_field_of_every_request_has_a_limit() -> None:
    unlimited = sorted({field for _, field in _string_fields()} - set(LIMIT_OF))
    assert not unlimited, f"request fields with no limit: {unlimited}"
    names = {f.name for f in dataclasses.fields(Limits)}
    assert set(LIMIT_OF.values()) <= names


@pytest.fixture
def limits() -> Limits:
    # Small limits, so that the values over them are small too.
    return Limits(
        max_message_chars=50,
        max_system_prompt_chars=50,
        max_title_chars=20,
        max_model_chars=20,
        max_id_chars=40,
        max_page_token_chars=60,
    )


@pytest.fixture
async def stub(limits: Limits) -> AsyncIterator[chatpb.ChatServiceStub]:
    core = ChatCore(MemoryStore(), EchoBackend(), limits=limits)
    async with ChannelFor([ChatService(core)]) as channel:
        yield chatpb.ChatServiceStub(channel)


UNARY = [(method, field) for method, field in _string_fields() if method != "Chat"]
CHAT = [field for method, field in _string_fields() if method == "Chat"]


@pytest.mark.parametrize(("method", "field"), UNARY)
async def test_a_unary_string_over_its_limit_is_invalid_argument_quoting_none_of_it(
    stub: chatpb.ChatServiceStub, limits: Limits, method: str, field: str
) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest())
    value = "é" * (getattr(limits, LIMIT_OF[field]) + 1)
    request: dict[str, Any] = {field: value}
    if field != "session_id" and "session_id" in _fields_of(method):
        request["session_id"] = session.session_id
    wire = message_class(CHAT_SERVICE.methods_by_name[method].input_type.name)(**request)
    call = getattr(stub, _snake(method))
    request_class = getattr(chatpb, CHAT_SERVICE.methods_by_name[method].input_type.name)
    with pytest.raises(GRPCError) as raised:
        await call(request_class.parse(wire.SerializeToString()))
    assert raised.value.status is Status.INVALID_ARGUMENT
    message = raised.value.message or ""
    assert message.startswith(f"{field}: ")
    assert "é" not in message
    # Nothing was done: the session is as it was, and no other session was made.
    info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=session.session_id))
    assert info.title == ""
    assert (await stub.list_sessions(chatpb.ListSessionsRequest())).total_size == 1


@pytest.mark.parametrize("field", CHAT)
async def test_a_chat_string_over_its_limit_gets_an_error_event_naming_the_field(
    stub: chatpb.ChatServiceStub, limits: Limits, field: str
) -> None:
    session = await stub.create_session(chatpb.CreateSessionRequest())
    value = "é" * (getattr(limits, LIMIT_OF[field]) + 1)
    request = {"session_id": session.session_id, "message": "hi", "request_id": "r1", field: value}
    async with ChatStream(stub) as stream:
        stream.send(chatpb.ChatRequest(type=chatpb.ChatRequestType.MESSAGE, **request))
        event = await stream.recv()
        assert (event.type, event.error_code) == (T.ERROR, Status.INVALID_ARGUMENT.value)
        assert event.error_field == field
        assert "é" not in event.error_message
        # The ids within their limits are echoed, for the client to match the answer.
        assert event.session_id == ("" if field == "session_id" else session.session_id)
        assert event.request_id == ("" if field == "request_id" else "r1")
    info = await stub.get_session_info(chatpb.SessionInfoRequest(session_id=session.session_id))
    assert info.message_count == 0


async def test_values_at_their_limits_are_accepted(
    stub: chatpb.ChatServiceStub, limits: Limits
) -> None:
    created = await stub.create_session(
        chatpb.CreateSessionRequest(
            title="t" * limits.max_title_chars,
            system_prompt="s" * limits.max_system_prompt_chars,
            model="m" * limits.max_model_chars,
        )
    )
    assert created.session is not None
    async with ChatStream(stub) as stream:
        stream.send(
            chatpb.ChatRequest(
                type=chatpb.ChatRequestType.MESSAGE,
                session_id=created.session_id,
                message="w" * limits.max_message_chars,
                request_id="r" * limits.max_id_chars,
                timestamp="z" * limits.max_id_chars,
            )
        )
        events = await stream.until_complete("r" * limits.max_id_chars)
    assert events[-1].type == T.RESPONSE_COMPLETE


def _fields_of(method: str) -> set[str]:
    return {f.name for f in CHAT_SERVICE.methods_by_name[method].input_type.fields}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")

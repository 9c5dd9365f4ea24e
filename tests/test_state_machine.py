"""The server against a simple model: create / update / chat / cancel / delete / list."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

import chatpb
from chat import ChatCore, EchoBackend, MemoryStore, Role
from chat.backends import GenerationRequest, PromptMessage
from chat.backends.echo import echo_reply
from chat.service import ChatService
from tests import strategies
from tests.helpers import ChatStream, reply_text

T = chatpb.ChatResponseType
ROLE = {chatpb.Role.USER: Role.USER, chatpb.Role.ASSISTANT: Role.ASSISTANT}


@dataclass
class ModelSession:
    title: str
    messages: list[tuple[Role, str, str]] = field(default_factory=list)  # role, text, status

    def expected_reply(self, text: str) -> str:
        context = [PromptMessage(role, content) for role, content, _ in self.messages if content]
        context.append(PromptMessage(Role.USER, text))
        return echo_reply(GenerationRequest("echo", context))


class ChatServerMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")
    deleted = Bundle("deleted")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model: dict[str, ModelSession] = {}
        self.created: list[str] = []
        self.turns = 0
        # A small pace, so that a CANCEL sent right behind a message can land mid-reply.
        self.core = ChatCore(MemoryStore(), EchoBackend(pace=0.002))
        self.channel = ChannelFor([ChatService(self.core)])
        self.stub = chatpb.ChatServiceStub(self.run(self.channel.__aenter__()))

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        self.run(self.channel.__aexit__(None, None, None))
        self.loop.close()

    @rule(target=sessions, title=strategies.text)
    def create(self, title: str) -> str:
        return self._create(title)

    def _create(self, title: str) -> str:
        response = self.run(self.stub.create_session(chatpb.CreateSessionRequest(title=title)))
        self.model[response.session_id] = ModelSession(title)
        self.created.append(response.session_id)
        return str(response.session_id)

    @rule(session_id=sessions, title=strategies.text)
    def update(self, session_id: str, title: str) -> None:
        request = chatpb.UpdateSessionRequest(session_id=session_id, title=title)
        info = self.run(self.stub.update_session(request))
        self.model[session_id].title = title
        assert info.title == title
        assert info.message_count == len(self.model[session_id].messages)

    async def _turn(self, session_id: str, text: str, cancel: str) -> list[chatpb.ChatResponse]:
        self.turns += 1
        request_id = f"r{self.turns}"
        stop = chatpb.ChatRequest(type=chatpb.ChatRequestType.CANCEL, request_id=request_id)
        async with ChatStream(self.stub) as stream:
            stream.message(session_id, text, request_id)
            if cancel == "at once":
                stream.send(stop)
            events = []
            if cancel == "after a chunk":
                events = await stream.until(request_id, [T.CHUNK])
                stream.send(stop)
            events += await stream.until_complete(request_id)
            return [e for e in events if e.request_id == request_id]

    @initialize(target=sessions)
    def first_session(self) -> str:
        return self._create("first")

    @rule(
        session_id=sessions,
        text=strategies.user_message,
        cancel=st.sampled_from(["no", "at once", "after a chunk"]),
    )
    def chat(self, session_id: str, text: str, cancel: str) -> None:
        session = self.model[session_id]
        expected = session.expected_reply(text)
        events = self.run(self._turn(session_id, text, cancel))
        complete = events[-1]
        assert complete.type == T.RESPONSE_COMPLETE
        sent = reply_text(events)
        if complete.finish_reason == chatpb.FinishReason.CANCELLED:
            # The cancel may land before the model starts (nothing stored) or mid-reply
            # (the partial reply is stored, exactly as sent).
            assert expected.startswith(sent)
            if any(e.type == T.RESPONSE_START for e in events):
                event("cancelled mid-reply")
                session.messages.append((Role.USER, text, "COMPLETE"))
                session.messages.append((Role.ASSISTANT, sent, "CANCELLED"))
                assert complete.message_count == len(session.messages)
            else:
                event("cancelled before the model started")
                assert complete.message_count == 0
        else:
            event("completed" + (" despite a cancel" if cancel != "no" else ""))
            assert complete.finish_reason == chatpb.FinishReason.STOP
            assert sent == expected
            session.messages.append((Role.USER, text, "COMPLETE"))
            session.messages.append((Role.ASSISTANT, sent, "COMPLETE"))
            assert complete.message_count == len(session.messages)

    @rule(target=deleted, session_id=consumes(sessions))
    def delete(self, session_id: str) -> str:
        response = self.run(
            self.stub.delete_session(chatpb.DeleteSessionRequest(session_id=session_id))
        )
        assert response.deleted_messages == len(self.model.pop(session_id).messages)
        return session_id

    @rule(session_id=deleted)
    def deleted_is_not_found(self, session_id: str) -> None:
        with pytest.raises(GRPCError) as error:
            self.run(self.stub.get_session_info(chatpb.SessionInfoRequest(session_id=session_id)))
        assert error.value.status is Status.NOT_FOUND

    @rule(page_size=st.integers(min_value=1, max_value=4))
    def list_all(self, page_size: int) -> None:
        seen: list[str] = []
        token = ""
        for _ in range(100):
            page = self.run(
                self.stub.list_sessions(
                    chatpb.ListSessionsRequest(page_size=page_size, page_token=token)
                )
            )
            assert page.total_size == len(self.model)
            seen.extend(s.session_id for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
        alive = [s for s in reversed(self.created) if s in self.model]
        assert seen == alive

    @invariant()
    def histories_match(self) -> None:
        for session_id, session in self.model.items():
            info = self.run(
                self.stub.get_session_info(
                    chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
                )
            )
            assert info.title == session.title
            assert info.message_count == len(session.messages)
            assert [
                (
                    ROLE[m.role],
                    m.content,
                    chatpb.MessageStatus(m.status).name.removeprefix("MESSAGE_STATUS_"),
                )
                for m in info.messages
            ] == session.messages


ChatServerMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None
)
test_chat_server_against_a_model = ChatServerMachine.TestCase

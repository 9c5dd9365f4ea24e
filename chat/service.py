"""The grpclib servicer: translates between ``chatpb`` messages and :mod:`chat.core`.

Nothing here decides behaviour. Unary RPCs call one core method each and map
:class:`~chat.errors.ChatError` to a gRPC status; the ``Chat`` stream runs a reader task
that feeds a :class:`~chat.core.Conversation` while this task writes its outbox, so PINGs
are answered while a reply streams (full duplex).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpclib.const
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

import chatpb
from chat._version import __version__
from chat.core import ChatCore, Conversation, Request
from chat.errors import ChatError, InvalidArgument
from chat.events import Event
from chat.types import (
    ContextPolicy,
    Message,
    Session,
    SessionPatch,
    Usage,
    format_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from grpclib.server import Stream

__all__ = ["ChatService", "event_to_response", "request_from_message"]

log = logging.getLogger(__name__)

_CHAT_ROUTE = "/ChatService/Chat"


@contextmanager
def _grpc_status() -> Iterator[None]:
    """Raise every :class:`ChatError` as the gRPC status it names."""
    try:
        yield
    except ChatError as error:
        raise GRPCError(Status(int(error.status)), error.message) from error


def _context_policy(value: int, field: str) -> ContextPolicy:
    try:
        return ContextPolicy(int(value))
    except ValueError:
        raise InvalidArgument(field, f"unknown context policy {int(value)}") from None


def usage_to_message(usage: Usage | None) -> chatpb.TokenUsage | None:
    if usage is None:
        return None
    return chatpb.TokenUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def session_to_message(
    session: Session, messages: list[Message] | None = None
) -> chatpb.SessionInfo:
    return chatpb.SessionInfo(
        session_id=session.session_id,
        title=session.title,
        model=session.model,
        message_count=session.message_count,
        created_at=format_timestamp(session.created_at),
        last_activity=format_timestamp(session.last_activity),
        system_prompt=session.system_prompt,
        context_policy=chatpb.ContextPolicy(session.context_policy),
        messages=[message_to_message(m) for m in messages or ()],
    )


def message_to_message(message: Message) -> chatpb.ChatMessage:
    return chatpb.ChatMessage(
        role=chatpb.Role(message.role),
        content=message.content,
        timestamp=format_timestamp(message.created_at),
        status=chatpb.MessageStatus(message.status),
        request_id=message.request_id,
        model=message.model,
        usage=usage_to_message(message.usage),
    )


def request_from_message(message: chatpb.ChatRequest) -> Request:
    return Request(
        kind=int(message.type),
        session_id=message.session_id,
        message=message.message,
        request_id=message.request_id,
        timestamp=message.timestamp,
    )


def event_to_response(event: Event, timestamp: str) -> chatpb.ChatResponse:
    """The ``ChatResponse`` for ``event``; fields at their defaults are left unset."""
    response = chatpb.ChatResponse(
        type=chatpb.ChatResponseType(event.kind),
        session_id=event.session_id,
        request_id=event.request_id,
        timestamp=timestamp,
    )
    if event.chunk_text:
        response.chunk_text = event.chunk_text
    if event.chunk_number:
        response.chunk_number = event.chunk_number
    if event.status_message:
        response.status_message = event.status_message
    if event.context_messages:
        response.context_messages = event.context_messages
    if event.total_chunks:
        response.total_chunks = event.total_chunks
    if event.processing_time:
        response.processing_time = event.processing_time
    if event.message_count:
        response.message_count = event.message_count
    if event.error_message:
        response.error_message = event.error_message
    if event.error_code:
        response.error_code = event.error_code
    if event.finish_reason:
        response.finish_reason = chatpb.FinishReason(event.finish_reason)
    if event.usage is not None:
        response.usage = usage_to_message(event.usage)
    if event.model:
        response.model = event.model
    if event.omitted_messages:
        response.omitted_messages = event.omitted_messages
    if event.retry_after:
        response.retry_after = event.retry_after
    if event.session is not None:
        response.session = session_to_message(event.session)
    return response


class ChatService(chatpb.ChatServiceBase):
    """``ChatService`` over a :class:`~chat.core.ChatCore`."""

    def __init__(self, core: ChatCore) -> None:
        self._core = core

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        # The generated base class runs `chat` as an async generator that it never closes;
        # serving the stream here instead keeps the reader, the writer and their cleanup in
        # one coroutine.
        mapping = super().__mapping__()
        mapping[_CHAT_ROUTE] = grpclib.const.Handler(
            self._chat_stream,
            grpclib.const.Cardinality.STREAM_STREAM,
            chatpb.ChatRequest,
            chatpb.ChatResponse,
        )
        return mapping

    # -- unary RPCs ---------------------------------------------------------------------

    async def create_session(
        self, message: chatpb.CreateSessionRequest
    ) -> chatpb.CreateSessionResponse:
        with _grpc_status():
            session = await self._core.create_session(
                model=message.model,
                system_prompt=message.system_prompt,
                title=message.title,
                context_policy=_context_policy(message.context_policy, "context_policy"),
            )
        return chatpb.CreateSessionResponse(
            session_id=session.session_id, session=session_to_message(session)
        )

    async def get_session_info(self, message: chatpb.SessionInfoRequest) -> chatpb.SessionInfo:
        with _grpc_status():
            session = await self._core.get_session(message.session_id)
            history = (
                await self._core.get_history(message.session_id)
                if message.include_messages
                else None
            )
        return session_to_message(session, history)

    async def update_session(self, message: chatpb.UpdateSessionRequest) -> chatpb.SessionInfo:
        with _grpc_status():
            policy = (
                None
                if message.context_policy is None
                else _context_policy(message.context_policy, "context_policy")
            )
            patch = SessionPatch(
                title=message.title,
                system_prompt=message.system_prompt,
                model=message.model,
                context_policy=policy,
            )
            session = await self._core.update_session(message.session_id, patch)
        return session_to_message(session)

    async def list_sessions(
        self, message: chatpb.ListSessionsRequest
    ) -> chatpb.ListSessionsResponse:
        with _grpc_status():
            sessions, token, total = await self._core.list_sessions(
                message.page_size, message.page_token
            )
        return chatpb.ListSessionsResponse(
            sessions=[session_to_message(s) for s in sessions],
            next_page_token=token,
            total_size=total,
        )

    async def delete_session(
        self, message: chatpb.DeleteSessionRequest
    ) -> chatpb.DeleteSessionResponse:
        with _grpc_status():
            deleted = await self._core.delete_session(message.session_id)
        return chatpb.DeleteSessionResponse(session_id=message.session_id, deleted_messages=deleted)

    async def get_server_stats(
        self, message: chatpb.ServerStatsRequest
    ) -> chatpb.ServerStatsResponse:
        core = self._core
        with _grpc_status():
            snapshot, sessions = await core.stats_snapshot()
        return chatpb.ServerStatsResponse(
            uptime_seconds=snapshot.uptime_seconds,
            total_requests=snapshot.total_requests,
            successful_requests=snapshot.successful_requests,
            failed_requests=snapshot.failed_requests,
            active_sessions=sessions,
            total_sessions_created=snapshot.total_sessions_created,
            avg_response_time=snapshot.avg_response_time,
            model=core.backend.default_model,
            active_streams=snapshot.active_streams,
            total_chunks_sent=snapshot.total_chunks_sent,
            cancelled_requests=snapshot.cancelled_requests,
            backend=core.backend.name,
            store=core.store.kind,
            version=__version__,
            started_at=format_timestamp(snapshot.started_at),
            expired_sessions=snapshot.expired_sessions,
            evicted_sessions=snapshot.evicted_sessions,
            trimmed_messages=snapshot.trimmed_messages,
            active_replies=snapshot.active_replies,
        )

    # -- the Chat stream ------------------------------------------------------------------

    async def _chat_stream(self, stream: Stream[chatpb.ChatRequest, chatpb.ChatResponse]) -> None:
        async with self._core.open_conversation() as conversation:
            reader = asyncio.create_task(self._read(stream, conversation))
            try:
                await self._write(stream, conversation)
            finally:
                reader.cancel()
                await asyncio.wait((reader,))
            failure = None if reader.cancelled() else reader.exception()
        if failure is not None:
            raise GRPCError(Status.INTERNAL, f"could not read the request stream: {failure}")

    async def _read(
        self,
        stream: Stream[chatpb.ChatRequest, chatpb.ChatResponse],
        conversation: Conversation,
    ) -> None:
        # grpclib swallows what goes wrong here unless we say so: anything but a clean end
        # of input closes the outbox, so the writer stops and the handler reports it.
        try:
            while (message := await stream.recv_message()) is not None:
                await conversation.handle(request_from_message(message))
        except StreamTerminatedError:
            conversation.outbox.close()
            return
        except Exception:
            conversation.outbox.close()
            raise
        conversation.finish_input()

    async def _write(
        self,
        stream: Stream[chatpb.ChatRequest, chatpb.ChatResponse],
        conversation: Conversation,
    ) -> None:
        outbox = conversation.outbox
        while (batch := await outbox.get()) is not None:
            for event in batch:
                await stream.send_message(event_to_response(event, format_timestamp(utcnow())))

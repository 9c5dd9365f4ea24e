"""Wire ↔ domain: the one place where ``chatpb`` messages become the client's types.

Numbers this client does not know (an enum value added to the schema later) map to a
documented default instead of failing, so an older client keeps working with a newer server.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TypeVar

from grpclib.health.v1.health_pb2 import HealthCheckResponse

import chatpb
from chat.client._results import (
    ReplyChunk,
    ReplyCompleted,
    ReplyEvent,
    ReplyFailed,
    ReplyStarted,
    ReplyStatus,
    ServerNotice,
    ServerStatsInfo,
    ServingStatus,
    SessionUpdated,
)
from chat.errors import (
    BackendAuthError,
    BackendRateLimited,
    BackendTimeout,
    ChatError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    SessionNotFound,
    StatusCode,
    Unavailable,
)
from chat.types import (
    ContextPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    Usage,
    parse_timestamp,
    utcnow,
)

_E = TypeVar("_E", bound=enum.Enum)

#: The events that end a request on the Chat stream.
TERMINAL = frozenset(
    {
        chatpb.ChatResponseType.RESPONSE_COMPLETE,
        chatpb.ChatResponseType.ERROR,
        chatpb.ChatResponseType.PONG,
    }
)


def to_enum(kind: type[_E], value: int, default: _E) -> _E:
    """``kind(value)``, or ``default`` for a number this client does not know."""
    try:
        return kind(int(value))
    except ValueError:
        return default


def to_usage(message: chatpb.TokenUsage | None) -> Usage | None:
    if message is None:
        return None
    return Usage(message.prompt_tokens, message.completion_tokens)


def to_timestamp(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        return None


def to_session(info: chatpb.SessionInfo) -> Session:
    created = to_timestamp(info.created_at) or utcnow()
    return Session(
        session_id=info.session_id,
        created_at=created,
        last_activity=to_timestamp(info.last_activity) or created,
        title=info.title,
        model=info.model,
        system_prompt=info.system_prompt,
        context_policy=to_enum(ContextPolicy, info.context_policy, ContextPolicy.UNSPECIFIED),
        message_count=info.message_count,
        max_reply_tokens=info.max_reply_tokens,
    )


def to_message(message: chatpb.ChatMessage) -> Message:
    return Message(
        role=to_enum(Role, message.role, Role.USER),
        content=message.content,
        created_at=to_timestamp(message.timestamp) or utcnow(),
        status=to_enum(MessageStatus, message.status, MessageStatus.COMPLETE),
        request_id=message.request_id,
        model=message.model,
        usage=to_usage(message.usage),
    )


def error_from_status(
    code: int,
    message: str,
    *,
    session_id: str = "",
    retry_after: float | None = None,
    unary: bool = False,
) -> ChatError:
    """The exception of :mod:`chat.errors` for a status the server sent."""
    status = to_enum(StatusCode, code, StatusCode.UNKNOWN)
    if status is StatusCode.NOT_FOUND:
        return SessionNotFound(session_id or "?")
    if status is StatusCode.INVALID_ARGUMENT:
        name, sep, problem = message.partition(": ")
        if sep and name and " " not in name:
            return InvalidArgument(name, problem)
        # Not about one field (a model backend refusing the request, say): the server's
        # words alone, not "request: ..." in front of them.
        return InvalidArgument("", message)
    if status is StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message)
    if status is StatusCode.UNAVAILABLE:
        return Unavailable(message)
    if status is StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message) if unary else BackendTimeout(message)
    if status is StatusCode.UNAUTHENTICATED:
        return BackendAuthError(message)
    if status is StatusCode.RESOURCE_EXHAUSTED:
        return BackendRateLimited(message, retry_after)
    if status is StatusCode.INTERNAL:
        return ChatError(message or "internal server error")
    return ChatError(f"{message or 'the server failed'} (status {status.name})")


def status_name(code: int) -> str:
    """The name of a gRPC status code, ``UNKNOWN`` for a number this client does not know."""
    return to_enum(StatusCode, code, StatusCode.UNKNOWN).name


def to_reply_event(response: chatpb.ChatResponse) -> ReplyEvent:
    kind = response.type
    if kind == chatpb.ChatResponseType.CHUNK:
        return ReplyChunk(
            response.request_id, response.session_id, response.chunk_text, response.chunk_number
        )
    if kind == chatpb.ChatResponseType.RESPONSE_START:
        return ReplyStarted(
            response.request_id,
            response.session_id,
            response.model,
            response.context_messages,
            response.omitted_messages,
        )
    if kind == chatpb.ChatResponseType.RESPONSE_COMPLETE:
        return ReplyCompleted(
            request_id=response.request_id,
            session_id=response.session_id,
            finish_reason=to_enum(FinishReason, response.finish_reason, FinishReason.STOP),
            total_chunks=response.total_chunks,
            processing_time=response.processing_time,
            message_count=response.message_count,
            model=response.model,
            usage=to_usage(response.usage),
        )
    if kind == chatpb.ChatResponseType.ERROR:
        return ReplyFailed(
            request_id=response.request_id,
            session_id=response.session_id,
            code=to_enum(StatusCode, response.error_code, StatusCode.UNKNOWN),
            message=response.error_message,
            started=response.finish_reason == chatpb.FinishReason.ERROR,
            total_chunks=response.total_chunks,
            retry_after=response.retry_after or None,
        )
    return ReplyStatus(
        response.request_id,
        response.session_id,
        response.status_message,
        response.omitted_messages,
    )


def to_notice(response: chatpb.ChatResponse) -> SessionUpdated | ServerNotice | None:
    """The notice for an event that answers no request in flight; ``None``: drop it."""
    kind = response.type
    if kind == chatpb.ChatResponseType.SESSION_UPDATE:
        return SessionUpdated(
            session_id=response.session_id,
            message=response.status_message,
            message_count=response.message_count,
            session=None if response.session is None else to_session(response.session),
        )
    if kind in (chatpb.ChatResponseType.STATUS, chatpb.ChatResponseType.ERROR):
        return ServerNotice(
            response.session_id,
            response.request_id,
            response.status_message or response.error_message,
        )
    # A late event of a request the client stopped waiting for.
    return None


def is_goaway(response: chatpb.ChatResponse) -> bool:
    """A server that is shutting down asks each stream to end with this STATUS."""
    return (
        response.type == chatpb.ChatResponseType.STATUS
        and not response.request_id
        and response.error_code == StatusCode.UNAVAILABLE
    )


def to_server_stats(r: chatpb.ServerStatsResponse) -> ServerStatsInfo:
    return ServerStatsInfo(
        version=r.version,
        backend=r.backend,
        model=r.model,
        store=r.store,
        started_at=to_timestamp(r.started_at),
        uptime_seconds=r.uptime_seconds,
        total_requests=r.total_requests,
        successful_requests=r.successful_requests,
        failed_requests=r.failed_requests,
        cancelled_requests=r.cancelled_requests,
        active_sessions=r.active_sessions,
        total_sessions_created=r.total_sessions_created,
        avg_response_time=r.avg_response_time,
        active_streams=r.active_streams,
        active_replies=r.active_replies,
        total_chunks_sent=r.total_chunks_sent,
        expired_sessions=r.expired_sessions,
        evicted_sessions=r.evicted_sessions,
        trimmed_messages=r.trimmed_messages,
    )


def to_serving_status(response: HealthCheckResponse) -> ServingStatus:
    return to_enum(ServingStatus, response.status, ServingStatus.UNKNOWN)

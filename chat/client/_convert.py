"""Wire ↔ domain: the one place where ``chatpb`` messages become the client's types.

Numbers this client does not know (an enum value added to the schema later) map to a
documented default instead of failing, so an older client keeps working with a newer server.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from google.rpc import error_details_pb2
from grpclib import GRPCError
from grpclib.const import Status as GrpcStatus
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
    ServingStatus,
    SessionUpdated,
    WhoAmI,
)
from chat.errors import (
    Aborted,
    BackendRateLimited,
    BackendTimeout,
    ChatError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SessionNotFound,
    StatusCode,
    Unauthenticated,
    Unavailable,
)
from chat.quota import QuotaUsage
from chat.stats import ServerStatsInfo
from chat.types import (
    FinishReason,
    Message,
    Role,
    Session,
    SessionUpdateKind,
    StatusKind,
    Usage,
    parse_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_E = TypeVar("_E", bound=enum.Enum)
_D = TypeVar("_D", bound="DataclassInstance")

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


def _from_wire(
    kind: type[_D],
    message: Any,
    *,
    renames: Mapping[str, str] | None = None,
    fallbacks: Mapping[str, Any] | None = None,
) -> _D:
    """An instance of dataclass ``kind`` from the wire message's fields of the same names.

    Timestamps are parsed (a missing one is now), enums mapped with :func:`to_enum` (a
    number this client does not know becomes the field's default, or its ``fallbacks``
    entry), token usage converted. Sessions, messages and statistics have exactly the
    fields of their messages (``tests/test_wire.py``), so a new field needs no code here.
    """
    renames = renames or {}
    fallbacks = fallbacks or {}
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(kind):
        value = getattr(message, renames.get(field.name, field.name))
        hint = hints[field.name]
        if hint is datetime or hint == datetime | None:
            value = to_timestamp(value)
            if value is None and hint is datetime:
                value = utcnow()
        elif isinstance(hint, type) and issubclass(hint, enum.IntEnum):
            default = field.default if field.default is not dataclasses.MISSING else None
            value = to_enum(hint, value, fallbacks.get(field.name, default))
        elif hint == Usage | None:
            value = to_usage(value)
        values[field.name] = value
    return kind(**values)


def to_session(info: chatpb.SessionInfo) -> Session:
    return _from_wire(Session, info)


def to_message(message: chatpb.ChatMessage) -> Message:
    return _from_wire(
        Message, message, renames={"created_at": "timestamp"}, fallbacks={"role": Role.USER}
    )


def to_who_am_i(response: chatpb.WhoAmIResponse) -> WhoAmI:
    return WhoAmI(
        identity=response.identity,
        admin=response.admin,
        auth=response.auth,
        quotas=tuple(
            QuotaUsage(
                name=q.name,
                limit=q.limit,
                used=q.used,
                period_seconds=q.period_seconds,
                resets_in_seconds=q.resets_in_seconds,
            )
            for q in response.quotas
        ),
    )


def error_from_status(
    code: int,
    message: str,
    *,
    session_id: str = "",
    retry_after: float | None = None,
    field: str = "",
    unary: bool = False,
) -> ChatError:
    """The exception of :mod:`chat.errors` for a status the server sent.

    ``field`` is the request field an ``INVALID_ARGUMENT`` names (``error_field`` on the
    Chat stream, ``google.rpc.BadRequest`` in a unary call's status details).
    """
    status = to_enum(StatusCode, code, StatusCode.UNKNOWN)
    if status is StatusCode.NOT_FOUND:
        return SessionNotFound(session_id or "?")
    if status is StatusCode.INVALID_ARGUMENT:
        return InvalidArgument.from_message(field or "request", message)
    if status is StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message)
    if status is StatusCode.ABORTED:
        return Aborted(message)
    if status is StatusCode.UNAVAILABLE:
        return Unavailable(message)
    if status is StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message) if unary else BackendTimeout(message)
    if status is StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message)
    if status is StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    if status is StatusCode.RESOURCE_EXHAUSTED:
        return BackendRateLimited(message, retry_after)
    if status is StatusCode.INTERNAL:
        return ChatError(message or "internal server error")
    words = status.name.lower().replace("_", " ")
    return ChatError(f"{message or 'the server failed'} ({words})")


def error_from_grpc(error: GRPCError, *, session_id: str = "") -> ChatError:
    """The exception for a unary call's failure, with its standard error details.

    ``google.rpc.BadRequest`` names the wrong field and gives the problem; ``RetryInfo``
    says how long to wait (grpclib decodes them when googleapis-common-protos is installed).
    """
    field, retry_after = "", None
    for detail in error.details or ():
        if isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
            violation = detail.field_violations[0]
            if error.status is GrpcStatus.INVALID_ARGUMENT:
                return InvalidArgument(violation.field, violation.description)
            field = violation.field
        elif isinstance(detail, error_details_pb2.RetryInfo):
            retry_after = detail.retry_delay.ToNanoseconds() / 1e9
    return error_from_status(
        error.status.value,
        error.message or "",
        session_id=session_id,
        retry_after=retry_after,
        field=field,
        unary=True,
    )


def status_name(code: int) -> str:
    """The name of a gRPC status code, ``UNKNOWN`` for a number this client does not know."""
    return to_enum(StatusCode, code, StatusCode.UNKNOWN).name


def to_reply_event(response: chatpb.ChatResponse) -> ReplyEvent:
    kind = response.type
    if kind == chatpb.ChatResponseType.CHUNK:
        return ReplyChunk(
            response.request_id,
            response.session_id,
            response.chunk_text,
            response.chunk_number,
            response.turn_id,
            response.seq,
        )
    if kind == chatpb.ChatResponseType.RESPONSE_START:
        return ReplyStarted(
            response.request_id,
            response.session_id,
            response.model,
            response.context_messages,
            response.omitted_messages,
            response.turn_id,
            response.seq,
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
            turn_id=response.turn_id,
            seq=response.seq,
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
            field=response.error_field,
            turn_id=response.turn_id,
            seq=response.seq,
        )
    return ReplyStatus(
        response.request_id,
        response.session_id,
        response.status_message,
        response.omitted_messages,
        response.turn_id,
        response.seq,
    )


def to_session_updated(response: chatpb.ChatResponse) -> SessionUpdated:
    return SessionUpdated(
        session_id=response.session_id,
        message=response.status_message,
        message_count=response.message_count,
        session=None if response.session is None else to_session(response.session),
        kind=to_enum(SessionUpdateKind, response.update_kind, SessionUpdateKind.UNSPECIFIED),
    )


#: STATUS kinds that are nobody's notice: a heartbeat (sent to keep proxies from closing a
#: silent stream), and the answers to WATCH and UNWATCH (the watch has its own).
_NOT_NOTICES = frozenset(
    {
        chatpb.StatusKind.HEARTBEAT,
        chatpb.StatusKind.WATCHING,
        chatpb.StatusKind.NOT_WATCHING,
    }
)


def to_notice(response: chatpb.ChatResponse) -> SessionUpdated | ServerNotice | None:
    """The notice for an event that answers no request in flight; ``None``: drop it."""
    kind = response.type
    if kind == chatpb.ChatResponseType.SESSION_UPDATE:
        return to_session_updated(response)
    if response.turn_id:
        # An event of a turn this client is not waiting for (one it stopped reading, or a
        # watched one): the watch has it, it is nobody's notice.
        return None
    if kind == chatpb.ChatResponseType.STATUS and response.status_kind in _NOT_NOTICES:
        return None
    if kind in (chatpb.ChatResponseType.STATUS, chatpb.ChatResponseType.ERROR):
        error = kind == chatpb.ChatResponseType.ERROR
        return ServerNotice(
            response.session_id,
            response.request_id,
            response.status_message or response.error_message,
            kind=to_enum(StatusKind, response.status_kind, StatusKind.UNSPECIFIED),
            code=to_enum(StatusCode, response.error_code, StatusCode.UNKNOWN)
            if error
            else StatusCode.OK,
        )
    # A late event of a request the client stopped waiting for.
    return None


def is_goaway(response: chatpb.ChatResponse) -> bool:
    """A server that is shutting down asks each stream to end with this STATUS."""
    if response.type != chatpb.ChatResponseType.STATUS:
        return False
    if response.status_kind == chatpb.StatusKind.SHUTDOWN:
        return True
    # Servers from before STATUS kinds said it with the status code alone.
    return (
        response.status_kind == chatpb.StatusKind.UNSPECIFIED
        and not response.request_id
        and response.error_code == StatusCode.UNAVAILABLE
    )


def to_server_stats(response: chatpb.ServerStatsResponse) -> ServerStatsInfo:
    return _from_wire(ServerStatsInfo, response)


def to_serving_status(response: HealthCheckResponse) -> ServingStatus:
    return to_enum(ServingStatus, response.status, ServingStatus.UNKNOWN)

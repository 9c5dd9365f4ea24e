"""What :class:`~chat.client.ChatClient` returns: reply events, replies, notices, statistics."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from chat.errors import ChatError, StatusCode
from chat.quota import QuotaUsage
from chat.types import FinishReason, Session, SessionUpdateKind, StatusKind, Usage


@dataclass(frozen=True, slots=True)
class WhoAmI:
    """Who the server takes this client for (:meth:`~chat.client.ChatClient.who_am_i`)."""

    #: The identity sessions are owned by (``anonymous`` on a server with ``--auth none``).
    identity: str
    admin: bool
    #: How the server authenticates: ``none``, ``tokens``, ``mtls`` or ``jwt``.
    auth: str
    #: The limits that apply and the use of each now.
    quotas: tuple[QuotaUsage, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyStarted:
    """The model started answering (``RESPONSE_START``)."""

    request_id: str
    session_id: str
    model: str
    #: Conversation messages sent to the model, the new one included.
    context_messages: int
    #: Older messages the context budget left out.
    omitted_messages: int
    #: The server's id of the turn and this event's position in it (``""`` and 0 from a
    #: server without live sessions).
    turn_id: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """A piece of the reply (``CHUNK``); the texts of a reply concatenate to the stored reply."""

    request_id: str
    session_id: str
    text: str
    #: 1-based, consecutive.
    number: int
    #: The server's id of the turn and this event's position in it (``""`` and 0 from a
    #: server without live sessions).
    turn_id: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True)
class ReplyStatus:
    """Information about this reply (``STATUS``), e.g. messages left out of the context."""

    request_id: str
    session_id: str
    message: str
    omitted_messages: int
    #: The server's id of the turn and this event's position in it (``""`` and 0 from a
    #: server without live sessions).
    turn_id: str = ""
    seq: int = 0


@dataclass(frozen=True, slots=True)
class ReplyCompleted:
    """The reply ended (``RESPONSE_COMPLETE``): finished, cut at the length limit, or cancelled."""

    request_id: str
    session_id: str
    finish_reason: FinishReason
    total_chunks: int
    #: Seconds the server spent, from receiving the request to the end of the reply.
    processing_time: float
    #: Messages in the session's history after the turn (0 when nothing was stored).
    message_count: int
    model: str
    usage: Usage | None
    #: The server's id of the turn and this event's position in it (``""`` and 0 from a
    #: server without live sessions).
    turn_id: str = ""
    seq: int = 0

    @property
    def cancelled(self) -> bool:
        return self.finish_reason is FinishReason.CANCELLED


@dataclass(frozen=True, slots=True)
class ReplyFailed:
    """The request failed (``ERROR``); if ``started``, after part of the reply was sent."""

    request_id: str
    session_id: str
    code: StatusCode
    message: str
    started: bool
    total_chunks: int
    #: Seconds to wait before retrying, when the server said (rate limits).
    retry_after: float | None
    #: For ``INVALID_ARGUMENT``: the request field that is wrong, when the server named one.
    field: str = ""
    #: The server's id of the turn and this event's position in it (``""`` and 0 from a
    #: server without live sessions).
    turn_id: str = ""
    seq: int = 0

    def error(self) -> ChatError:
        """The typed exception for this failure."""
        # Imported here: _convert builds these result types, so it imports this module.
        from chat.client._convert import error_from_status

        return error_from_status(
            self.code,
            self.message,
            session_id=self.session_id,
            retry_after=self.retry_after,
            field=self.field,
        )


#: The events of one reply, in order: optional ``ReplyStatus``, ``ReplyStarted``,
#: ``ReplyChunk`` 1..n (none for an empty reply), then exactly one ``ReplyCompleted`` or
#: ``ReplyFailed``.
ReplyEvent = ReplyStarted | ReplyChunk | ReplyStatus | ReplyCompleted | ReplyFailed


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole reply, as :meth:`ChatClient.ask` and :meth:`ReplyStream.collect` return it."""

    request_id: str
    session_id: str
    text: str
    finish_reason: FinishReason
    model: str
    usage: Usage | None
    message_count: int
    total_chunks: int
    #: Seconds the server spent on the turn.
    processing_time: float
    #: Seconds from sending the request to the end of the reply, measured by the client.
    response_time: float
    #: Conversation messages sent to the model, the new one included (``RESPONSE_START``).
    context_messages: int = 0
    #: Older messages the context budget left out.
    omitted_messages: int = 0
    #: Seconds from sending the request to the first chunk; ``None`` for a reply without one.
    first_chunk_time: float | None = None
    #: The server's id of the turn (``""`` from a server without live sessions).
    turn_id: str = ""
    #: How often the reply was resumed after a lost connection (RESUME, or the message sent
    #: again with its ``client_message_id``).
    resumes: int = 0


class ConnectionState(enum.Enum):
    """What happened to the client's connection."""

    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    RECONNECTED = "reconnected"
    LOST = "lost"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    """The connection changed state; for ``RECONNECTING``, which attempt and after what wait."""

    state: ConnectionState
    target: str
    reason: str = ""
    attempt: int = 0
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """Another stream changed a session this connection used (``SESSION_UPDATE``).

    Act on :attr:`kind`; :attr:`message` is for people.
    """

    session_id: str
    message: str
    message_count: int
    session: Session | None
    kind: SessionUpdateKind = SessionUpdateKind.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class ServerNotice:
    """A ``STATUS`` or ``ERROR`` event that answers no request in flight.

    Act on :attr:`kind` (a STATUS) or :attr:`code` (an ERROR); :attr:`message` is for people.
    """

    session_id: str
    request_id: str
    message: str
    kind: StatusKind = StatusKind.UNSPECIFIED
    #: The gRPC status of an ERROR (``OK`` for a STATUS).
    code: StatusCode = StatusCode.OK


#: What :meth:`ChatClient.notices` yields.
Notice = SessionUpdated | ServerNotice | ConnectionStateChanged


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a watched session (:meth:`~chat.client.ChatClient.watch`).

    :attr:`event` is a reply event of one of the session's turns, started by this client
    (:attr:`is_mine`) or by any other one, or a :class:`SessionUpdated`: someone typing, a
    turn stored, the session changed or deleted. The events of a turn come in order, each
    once, with the same ``turn_id`` and ``seq`` as its sender got them.
    """

    session_id: str
    event: ReplyEvent | SessionUpdated
    #: The turn was started by this client (on any of its connections).
    is_mine: bool = False

    @property
    def turn_id(self) -> str:
        """The turn's id; ``""`` for a session update."""
        return "" if isinstance(self.event, SessionUpdated) else self.event.turn_id

    @property
    def seq(self) -> int:
        """The event's position in its turn; 0 for a session update."""
        return 0 if isinstance(self.event, SessionUpdated) else self.event.seq


@dataclass(frozen=True, slots=True)
class ClientStats:
    """What this client measured since it was made (:attr:`ChatClient.stats`)."""

    #: MESSAGE and RETRY requests sent.
    messages_sent: int = 0
    #: Replies that completed (finish reason stop or length).
    replies_succeeded: int = 0
    #: Replies that ended with an ERROR or were cut short by a lost connection.
    replies_failed: int = 0
    replies_cancelled: int = 0
    #: Times a reply went on after a lost connection, on the next one (RESUME or resend).
    replies_resumed: int = 0
    chunks_received: int = 0
    #: Mean seconds from sending a message to the end of its reply (succeeded replies).
    average_response_time: float = 0.0
    #: Mean seconds from sending a message to its first chunk.
    average_first_chunk_time: float = 0.0
    #: Mean chunks of the replies that completed.
    average_chunks_per_reply: float = 0.0
    #: Attempts to open a connection, successful or not.
    connection_attempts: int = 0
    #: Connections opened after the first one (automatic or :meth:`ChatClient.connect`).
    reconnections: int = 0
    sessions_created: int = 0
    #: Seconds since the client was made.
    duration: float = 0.0


@dataclass(slots=True)
class Counters:
    """The running totals behind :class:`ClientStats`, updated as the client works."""

    messages_sent: int = 0
    replies_succeeded: int = 0
    replies_failed: int = 0
    replies_cancelled: int = 0
    replies_resumed: int = 0
    chunks_received: int = 0
    #: Chunks of the replies counted in ``replies_succeeded``.
    succeeded_chunks: int = 0
    response_time_total: float = 0.0
    first_chunks: int = 0
    first_chunk_time_total: float = 0.0
    connection_attempts: int = 0
    reconnections: int = 0
    sessions_created: int = 0
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> ClientStats:
        succeeded = self.replies_succeeded
        return ClientStats(
            messages_sent=self.messages_sent,
            replies_succeeded=succeeded,
            replies_failed=self.replies_failed,
            replies_cancelled=self.replies_cancelled,
            replies_resumed=self.replies_resumed,
            chunks_received=self.chunks_received,
            average_response_time=self.response_time_total / succeeded if succeeded else 0.0,
            average_first_chunk_time=(
                self.first_chunk_time_total / self.first_chunks if self.first_chunks else 0.0
            ),
            average_chunks_per_reply=self.succeeded_chunks / succeeded if succeeded else 0.0,
            connection_attempts=self.connection_attempts,
            reconnections=self.reconnections,
            sessions_created=self.sessions_created,
            duration=time.monotonic() - self.started,
        )


@dataclass(frozen=True, slots=True)
class SessionList:
    """One page of :meth:`ChatClient.list_sessions`: sessions newest first."""

    sessions: list[Session]
    #: Pass to ``list_sessions(page_token=...)`` for the next page; empty on the last page.
    next_page_token: str
    #: The caller's sessions on the server (everyone's with ``all_identities``).
    total: int


class ServingStatus(enum.IntEnum):
    """Answers of the standard health service (``grpc.health.v1``)."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    #: The server does not know the service asked about.
    SERVICE_UNKNOWN = 3

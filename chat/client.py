"""A typed asyncio client for grpc-chat: :class:`ChatClient`.

One client is one connection: a gRPC channel for the unary RPCs plus one long-lived
bidirectional ``Chat`` stream that every request shares. Each request gets a fresh
``request_id`` (a UUID); a reader task hands each server event to the request it answers, and
unsolicited events (``SESSION_UPDATE``, stray ``STATUS``) to :meth:`ChatClient.notices`
subscribers.

>>> async def main() -> None:                                    # doctest: +SKIP
...     async with ChatClient("localhost:50051") as client:
...         session = await client.create_session(title="demo")
...         async for event in client.send(session.session_id, "Hello!"):
...             if isinstance(event, ReplyChunk):
...                 print(event.text, end="", flush=True)
...         print()
...         reply = await client.ask(session.session_id, "And again")
...         print(reply.text, f"({reply.finish_reason.name})")

Errors are those of :mod:`chat.errors`: a status the server sends becomes its class
(``NOT_FOUND`` → :class:`~chat.errors.SessionNotFound`, ...); a server that cannot be
reached raises :class:`~chat.errors.ServerUnreachable`, a connection that breaks
:class:`~chat.errors.ConnectionLost`, a unary call past its deadline
:class:`~chat.errors.DeadlineExceeded`. With a :class:`ReconnectPolicy` the client
reconnects by itself, with exponential backoff and jitter, the next time it is used after a
loss; sessions live on the server, so every session id stays valid across reconnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Self, TypeVar

import h2.exceptions
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.const import Cardinality
from grpclib.const import Status as GrpcStatus
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

import chatpb
from chat.errors import (
    BackendAuthError,
    BackendRateLimited,
    BackendTimeout,
    ChatError,
    ConfigurationError,
    ConnectionLost,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServerUnreachable,
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
    format_timestamp,
    parse_timestamp,
    utcnow,
)

__all__ = [
    "DEFAULT_TARGET",
    "ChatClient",
    "ClientConfig",
    "ClientStats",
    "ConnectionState",
    "ConnectionStateChanged",
    "Notice",
    "Notices",
    "ReconnectPolicy",
    "Reply",
    "ReplyChunk",
    "ReplyCompleted",
    "ReplyEvent",
    "ReplyFailed",
    "ReplyStarted",
    "ReplyStatus",
    "ReplyStream",
    "ServerNotice",
    "ServerStatsInfo",
    "ServingStatus",
    "SessionList",
    "SessionUpdated",
    "parse_target",
]

log = logging.getLogger(__name__)

#: Where ``chat-server`` listens by default.
DEFAULT_TARGET = "localhost:50051"
_DEFAULT_PORT = 50051
_CHAT_ROUTE = "/ChatService/Chat"
_SERVICE_NAME = "ChatService"

_T = TypeVar("_T")

# What grpclib raises when the transport under a call goes away.
_TRANSPORT_ERRORS = (
    StreamTerminatedError,
    ProtocolError,
    h2.exceptions.ProtocolError,
    OSError,
    EOFError,
)


# -- configuration ------------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port``; the port defaults to 50051).

    >>> parse_target("localhost:6000")
    ('localhost', 6000)
    >>> parse_target("[::1]:6000")
    ('::1', 6000)
    >>> parse_target("example.org")
    ('example.org', 50051)
    """
    text = target.strip()
    if not text:
        raise ConfigurationError("target is empty; expected HOST:PORT, e.g. localhost:50051")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"target {target!r} is not [IPV6]:PORT")
        if rest == ":":
            raise ConfigurationError(f"target {target!r} has an empty port; expected HOST:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ConfigurationError(f"target {target!r} has an empty port; expected HOST:PORT")
    else:
        # No colon, or a bare IPv6 address: no port given.
        host, port_text = text, ""
        if ":" in text:
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                raise ConfigurationError(
                    f"target {target!r} is not HOST:PORT (write IPv6 addresses as [ADDRESS]:PORT)"
                ) from None
    if not host:
        raise ConfigurationError(f"target {target!r} has no host; expected HOST:PORT")
    if not port_text:
        return host, _DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigurationError(f"target {target!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How the client reconnects after losing its connection.

    Before attempt ``n`` (1-based) of a reconnection the client waits
    ``min(max_backoff, initial_backoff * multiplier ** (n - 2))`` seconds (nothing before the
    first attempt), scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    clients of a restarted server do not all come back at once. After ``max_attempts``
    failed attempts it raises :class:`~chat.errors.ServerUnreachable`.

    >>> ReconnectPolicy(jitter=0).delay(3, random.Random(0))
    0.4
    """

    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ConfigurationError("backoff must satisfy 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ConfigurationError(f"multiplier must be >= 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, not {self.jitter}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based)."""
        if attempt <= 1:
            return 0.0
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 2))
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a :class:`ChatClient` needs; validated when it is made.

    >>> ClientConfig(target="localhost:6000").port
    6000
    """

    target: str = DEFAULT_TARGET
    #: Deadline of each unary call and of :meth:`ChatClient.ping`, in seconds.
    timeout: float = 10.0
    #: Time allowed to open the connection and get the first PONG, in seconds.
    connect_timeout: float = 5.0
    #: Reconnect automatically after a loss; ``None``: raise ConnectionLost instead.
    reconnect: ReconnectPolicy | None = None
    #: Seconds a reply may stay silent before the client PINGs the server to check that the
    #: stream is alive (a model thinking is fine: the PONG comes at once); no PONG within
    #: ``timeout`` means the connection is lost. ``None`` never checks.
    keepalive: float | None = 15.0
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        host, port = parse_target(self.target)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        if not self.timeout > 0:
            raise ConfigurationError(f"timeout must be > 0, not {self.timeout}")
        if not self.connect_timeout > 0:
            raise ConfigurationError(f"connect_timeout must be > 0, not {self.connect_timeout}")
        if self.keepalive is not None and not self.keepalive > 0:
            raise ConfigurationError(f"keepalive must be > 0 or None, not {self.keepalive}")


# -- what the client returns ----------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """A piece of the reply (``CHUNK``); the texts of a reply concatenate to the stored reply."""

    request_id: str
    session_id: str
    text: str
    #: 1-based, consecutive.
    number: int


@dataclass(frozen=True, slots=True)
class ReplyStatus:
    """Information about this reply (``STATUS``), e.g. messages left out of the context."""

    request_id: str
    session_id: str
    message: str
    omitted_messages: int


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

    def error(self) -> ChatError:
        """The typed exception for this failure."""
        return _error_from_status(
            self.code, self.message, session_id=self.session_id, retry_after=self.retry_after
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
    """Another stream changed a session this connection used (``SESSION_UPDATE``)."""

    session_id: str
    message: str
    message_count: int
    session: Session | None


@dataclass(frozen=True, slots=True)
class ServerNotice:
    """A ``STATUS`` or ``ERROR`` event that answers no request in flight."""

    session_id: str
    request_id: str
    message: str


#: What :meth:`ChatClient.notices` yields.
Notice = SessionUpdated | ServerNotice | ConnectionStateChanged


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
    chunks_received: int = 0
    #: Mean seconds from sending a message to the end of its reply (succeeded replies).
    average_response_time: float = 0.0
    #: Mean seconds from sending a message to its first chunk.
    average_first_chunk_time: float = 0.0
    #: Attempts to open a connection, successful or not.
    connection_attempts: int = 0
    #: Connections opened after the first one (automatic or :meth:`ChatClient.connect`).
    reconnections: int = 0
    sessions_created: int = 0


@dataclass(slots=True)
class _Counters:
    messages_sent: int = 0
    replies_succeeded: int = 0
    replies_failed: int = 0
    replies_cancelled: int = 0
    chunks_received: int = 0
    response_time_total: float = 0.0
    first_chunks: int = 0
    first_chunk_time_total: float = 0.0
    connection_attempts: int = 0
    reconnections: int = 0
    sessions_created: int = 0

    def snapshot(self) -> ClientStats:
        return ClientStats(
            messages_sent=self.messages_sent,
            replies_succeeded=self.replies_succeeded,
            replies_failed=self.replies_failed,
            replies_cancelled=self.replies_cancelled,
            chunks_received=self.chunks_received,
            average_response_time=(
                self.response_time_total / self.replies_succeeded if self.replies_succeeded else 0.0
            ),
            average_first_chunk_time=(
                self.first_chunk_time_total / self.first_chunks if self.first_chunks else 0.0
            ),
            connection_attempts=self.connection_attempts,
            reconnections=self.reconnections,
            sessions_created=self.sessions_created,
        )


@dataclass(frozen=True, slots=True)
class SessionList:
    """One page of :meth:`ChatClient.list_sessions`: sessions newest first."""

    sessions: list[Session]
    #: Pass to ``list_sessions(page_token=...)`` for the next page; empty on the last page.
    next_page_token: str
    #: Sessions on the server.
    total: int


@dataclass(frozen=True, slots=True)
class ServerStatsInfo:
    """The server's counters (``GetServerStats``)."""

    version: str
    backend: str
    model: str
    store: str
    started_at: datetime | None
    uptime_seconds: float
    total_requests: int
    successful_requests: int
    failed_requests: int
    cancelled_requests: int
    active_sessions: int
    total_sessions_created: int
    avg_response_time: float
    active_streams: int
    active_replies: int
    total_chunks_sent: int
    expired_sessions: int
    evicted_sessions: int
    trimmed_messages: int


class ServingStatus(enum.IntEnum):
    """Answers of the standard health service (``grpc.health.v1``)."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    #: The server does not know the service asked about.
    SERVICE_UNKNOWN = 3


# -- translating the wire ------------------------------------------------------------------


_E = TypeVar("_E", bound=enum.Enum)


def _enum(kind: type[_E], value: int, default: _E) -> _E:
    """``kind(value)``, or ``default`` for a number this client does not know."""
    try:
        return kind(int(value))
    except ValueError:
        return default


def _usage(message: chatpb.TokenUsage | None) -> Usage | None:
    if message is None:
        return None
    return Usage(message.prompt_tokens, message.completion_tokens)


def _timestamp(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        return None


def _session(info: chatpb.SessionInfo) -> Session:
    created = _timestamp(info.created_at) or utcnow()
    return Session(
        session_id=info.session_id,
        created_at=created,
        last_activity=_timestamp(info.last_activity) or created,
        title=info.title,
        model=info.model,
        system_prompt=info.system_prompt,
        context_policy=_enum(ContextPolicy, info.context_policy, ContextPolicy.UNSPECIFIED),
        message_count=info.message_count,
    )


def _message(message: chatpb.ChatMessage) -> Message:
    return Message(
        role=_enum(Role, message.role, Role.USER),
        content=message.content,
        created_at=_timestamp(message.timestamp) or utcnow(),
        status=_enum(MessageStatus, message.status, MessageStatus.COMPLETE),
        request_id=message.request_id,
        model=message.model,
        usage=_usage(message.usage),
    )


def _error_from_status(
    code: int,
    message: str,
    *,
    session_id: str = "",
    retry_after: float | None = None,
    unary: bool = False,
) -> ChatError:
    """The exception of :mod:`chat.errors` for a status the server sent."""
    status = _enum(StatusCode, code, StatusCode.UNKNOWN)
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


def _reply_event(response: chatpb.ChatResponse) -> ReplyEvent:
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
            finish_reason=_enum(FinishReason, response.finish_reason, FinishReason.STOP),
            total_chunks=response.total_chunks,
            processing_time=response.processing_time,
            message_count=response.message_count,
            model=response.model,
            usage=_usage(response.usage),
        )
    if kind == chatpb.ChatResponseType.ERROR:
        return ReplyFailed(
            request_id=response.request_id,
            session_id=response.session_id,
            code=_enum(StatusCode, response.error_code, StatusCode.UNKNOWN),
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


def _is_goaway(response: chatpb.ChatResponse) -> bool:
    """A server that is shutting down asks each stream to end with this STATUS."""
    return (
        response.type == chatpb.ChatResponseType.STATUS
        and not response.request_id
        and response.error_code == StatusCode.UNAVAILABLE
    )


_TERMINAL = frozenset(
    {
        chatpb.ChatResponseType.RESPONSE_COMPLETE,
        chatpb.ChatResponseType.ERROR,
        chatpb.ChatResponseType.PONG,
    }
)


# -- the connection ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Pending:
    """A request waiting for its answer on the Chat stream."""

    request_id: str
    is_turn: bool
    sent_at: float = field(default_factory=time.monotonic)
    first_chunk: bool = False
    queue: asyncio.Queue[chatpb.ChatResponse | ChatError] = field(default_factory=asyncio.Queue)


@dataclass(slots=True, eq=False)
class _Connection:
    """One channel and its Chat stream; replaced as a whole on reconnection."""

    channel: Channel
    stub: chatpb.ChatServiceStub
    stream: ClientStream[chatpb.ChatRequest, chatpb.ChatResponse]
    #: The stream's ``async with`` was entered and not yet left.
    stream_open: bool = True
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: dict[str, _Pending] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    lost: ChatError | None = None
    closing: bool = False


class ReplyStream:
    """The events of one reply; made by :meth:`ChatClient.send` and :meth:`ChatClient.retry`.

    The request is sent when iteration starts (or on ``async with``). Iterating yields
    :data:`ReplyEvent`\\ s and stops after the terminal one; a lost connection raises
    :class:`~chat.errors.ConnectionLost`. Leaving an ``async with`` block before the reply
    ended cancels it.

    >>> async def demo(client: ChatClient, session_id: str) -> None:  # doctest: +SKIP
    ...     async with client.send(session_id, "Write a long story") as reply:
    ...         async for event in reply:
    ...             if isinstance(event, ReplyChunk) and event.number == 10:
    ...                 await reply.cancel()
    ...     print(reply.text, reply.result)

    :attr:`text` is what the chunks read so far say; :attr:`result` is the whole
    :class:`Reply` once a ``ReplyCompleted`` was read.
    """

    def __init__(
        self, client: ChatClient, kind: chatpb.ChatRequestType, session_id: str, text: str
    ) -> None:
        self._client = client
        self._kind = kind
        self._text = text
        self.session_id = session_id
        self.request_id = str(uuid.uuid4())
        self._pending: _Pending | None = None
        self._conn: _Connection | None = None
        self._done = False
        self._parts: list[str] = []
        self._result: Reply | None = None

    @property
    def done(self) -> bool:
        """Whether the terminal event was delivered (or the connection was lost)."""
        return self._done

    @property
    def text(self) -> str:
        """The reply's text as far as it was read."""
        return "".join(self._parts)

    @property
    def result(self) -> Reply | None:
        """The whole reply, once its ``ReplyCompleted`` was read; ``None`` before or on failure."""
        return self._result

    async def start(self) -> None:
        """Send the request (done by the first iteration if not called)."""
        if self._pending is None:
            self._conn, self._pending = await self._client._submit(
                chatpb.ChatRequest(
                    type=self._kind,
                    session_id=self.session_id,
                    message=self._text,
                    request_id=self.request_id,
                )
            )

    async def cancel(self) -> None:
        """Ask the server to stop this reply; it then ends with ``ReplyCompleted(CANCELLED)``.

        Nothing to do once the reply ended, or if its connection is gone (the reply went
        with it): the CANCEL only means something on the stream that carries the reply.
        """
        if self._conn is not None and not self._done:
            await self._client._write(
                self._conn,
                chatpb.ChatRequest(
                    type=chatpb.ChatRequestType.CANCEL,
                    session_id=self.session_id,
                    request_id=self.request_id,
                ),
            )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ReplyEvent:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        assert self._pending is not None
        assert self._conn is not None
        while True:
            try:
                async with asyncio.timeout(self._client.config.keepalive):
                    item = await self._pending.queue.get()
                break
            except TimeoutError:
                # Silent for a while: a loss is queued here if the stream is dead.
                await self._client._check_alive(self._conn)
        if isinstance(item, ChatError):
            self._done = True
            raise item
        if item.type in _TERMINAL:
            self._done = True
        event = _reply_event(item)
        if isinstance(event, ReplyChunk):
            self._parts.append(event.text)
        elif isinstance(event, ReplyCompleted):
            self._result = Reply(
                request_id=self.request_id,
                session_id=event.session_id or self.session_id,
                text=self.text,
                finish_reason=event.finish_reason,
                model=event.model,
                usage=event.usage,
                message_count=event.message_count,
                total_chunks=event.total_chunks,
                processing_time=event.processing_time,
                response_time=time.monotonic() - self._pending.sent_at,
            )
        return event

    async def collect(self) -> Reply:
        """Read the reply to its end; raise its typed error if it failed."""
        async for event in self:
            if isinstance(event, ReplyFailed):
                raise event.error()
        if self._result is None:
            raise ConnectionLost(self._client.config.target, "the reply ended without completing")
        return self._result

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            # Abandoned mid-reply (break, error, cancellation): stop the model. The request
            # stays registered until its terminal event arrives, so nothing leaks.
            with contextlib.suppress(ChatError, RuntimeError):
                await self.cancel()


class Notices:
    """A subscription to unsolicited events; use ``async with client.notices() as notices``."""

    def __init__(self, client: ChatClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Notice] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        self._client._subscribers.add(self._queue)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._subscribers.discard(self._queue)

    async def get(self) -> Notice:
        """The next notice (waits)."""
        return await self._queue.get()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notice:
        return await self._queue.get()


class ChatClient:
    """An asyncio client for a grpc-chat server.

    >>> async def main() -> None:                                # doctest: +SKIP
    ...     policy = ReconnectPolicy(max_attempts=10)
    ...     async with ChatClient("localhost:50051", reconnect=policy) as client:
    ...         print(f"round trip {await client.ping() * 1000:.1f} ms")
    ...         session = await client.create_session(system_prompt="Be brief.")
    ...         reply = await client.ask(session.session_id, "What is gRPC?")
    ...         print(reply.text)

    ``async with`` connects (:meth:`connect`) and closes (:meth:`aclose`). All methods must be
    called from the event loop that connected.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        reconnect: ReconnectPolicy | None = None,
        keepalive: float | None = 15.0,
    ) -> None:
        self.config = ClientConfig(
            target=target,
            timeout=timeout,
            connect_timeout=connect_timeout,
            reconnect=reconnect,
            keepalive=keepalive,
        )
        self._init()

    @classmethod
    def from_config(cls, config: ClientConfig) -> ChatClient:
        """A client for ``config`` (what the CLI builds)."""
        client = cls.__new__(cls)
        client.config = config
        client._init()
        return client

    def _init(self) -> None:
        self._conn: _Connection | None = None
        # Why the last connection ended, while the client should come back by itself.
        self._lost: ChatError | None = None
        self._ever_connected = False
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._subscribers: set[asyncio.Queue[Notice]] = set()
        self._counters = _Counters()
        self._rng = random.Random()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        """Whether the Chat stream is open right now."""
        return self._conn is not None and self._conn.lost is None

    @property
    def stats(self) -> ClientStats:
        """What this client measured so far."""
        return self._counters.snapshot()

    @property
    def pending_requests(self) -> int:
        """Requests on the Chat stream still waiting for their last event."""
        return 0 if self._conn is None else len(self._conn.pending)

    async def connect(self) -> None:
        """Open the connection (again) and check it with a PING.

        A no-op when connected. Retries with backoff when the client has a
        :class:`ReconnectPolicy` and connected before; raises
        :class:`~chat.errors.ServerUnreachable` when the server cannot be reached.
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        async with self._connect_lock:
            if self.connected:
                return
            if self._ever_connected and self.config.reconnect is not None:
                await self._reconnect(self.config.reconnect)
            else:
                await self._open()

    async def disconnect(self) -> None:
        """Close the connection; replies in flight are cancelled. :meth:`connect` reopens it."""
        conn, self._conn, self._lost = self._conn, None, None
        if conn is not None:
            await self._close_connection(conn, "the client disconnected")
            self._publish(ConnectionStateChanged(ConnectionState.CLOSED, self.config.target))

    async def aclose(self) -> None:
        """Close the connection for good."""
        self._closed = True
        await self.disconnect()

    async def _open(self) -> _Connection:
        """One attempt to open the channel and the Chat stream, checked with a PING."""
        config = self.config
        self._counters.connection_attempts += 1
        channel = Channel(config.host, config.port)
        # The stream is entered and left by hand (not `async with`): it outlives this call,
        # and leaving it after a failure must see that failure (see _leave_stream).
        stream = await channel.request(
            _CHAT_ROUTE, Cardinality.STREAM_STREAM, chatpb.ChatRequest, chatpb.ChatResponse
        ).__aenter__()
        conn = _Connection(
            channel=channel,
            stub=chatpb.ChatServiceStub(channel, timeout=config.timeout),
            stream=stream,
        )
        try:
            async with asyncio.timeout(config.connect_timeout):
                await stream.send_request()
                conn.reader = asyncio.create_task(self._read(conn))
                await self._ping_on(conn)
        except BaseException as error:
            await self._close_connection(conn, "connection attempt failed")
            if isinstance(error, TimeoutError | DeadlineExceeded):
                raise ServerUnreachable(
                    config.target, f"no answer within {config.connect_timeout:g}s"
                ) from error
            if isinstance(error, ConnectionLost):
                raise ServerUnreachable(config.target, error.reason) from error
            if isinstance(error, _TRANSPORT_ERRORS):
                raise ServerUnreachable(config.target, _describe(error)) from error
            raise
        reconnected = self._ever_connected
        if reconnected:
            self._counters.reconnections += 1
        self._ever_connected = True
        previous, self._conn, self._lost = self._conn, conn, None
        if previous is not None:
            # The lost connection was kept until now so that `connected` stays False.
            await self._close_connection(previous, "replaced by a new connection")
        log.info("connected to %s", config.target)
        state = ConnectionState.RECONNECTED if reconnected else ConnectionState.CONNECTED
        self._publish(ConnectionStateChanged(state, config.target))
        return conn

    async def _reconnect(self, policy: ReconnectPolicy) -> _Connection:
        target = self.config.target
        for attempt in range(1, policy.max_attempts + 1):
            delay = policy.delay(attempt, self._rng)
            reason = "" if self._lost is None else self._lost.message
            self._publish(
                ConnectionStateChanged(
                    ConnectionState.RECONNECTING, target, reason, attempt=attempt, delay=delay
                )
            )
            if delay:
                await asyncio.sleep(delay)
            try:
                return await self._open()
            except ServerUnreachable as error:
                log.info("reconnection attempt %d to %s failed: %s", attempt, target, error)
                self._lost = error
                if attempt == policy.max_attempts:
                    raise ServerUnreachable(
                        target, f"{error.reason} (gave up after {attempt} attempts)"
                    ) from error
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _ready(self) -> _Connection:
        """The open connection; reconnect first if it was lost and the policy allows."""
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        if self._closed:
            raise RuntimeError("the client is closed")
        lost = self._lost
        if lost is None:
            raise RuntimeError("the client is not connected: use `async with` or connect()")
        policy = self.config.reconnect
        if policy is None:
            reason = lost.reason if isinstance(lost, ServerUnreachable) else lost.message
            raise ConnectionLost(self.config.target, f"{reason}; call connect() to reconnect")
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.lost is None:
                return conn
            return await self._reconnect(policy)

    async def _close_connection(self, conn: _Connection, reason: str) -> None:
        conn.closing = True
        if conn.lost is None:
            # RST_STREAM: the server cancels this stream's turns and keeps partial replies.
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                await conn.stream.cancel()
        if conn.reader is not None:
            conn.reader.cancel()
            await asyncio.wait((conn.reader,))
        self._fail_pending(conn, ConnectionLost(self.config.target, reason))
        await _leave_stream(conn, None)
        conn.channel.close()

    # -- the Chat stream ---------------------------------------------------------------------

    async def _read(self, conn: _Connection) -> None:
        target = self.config.target
        error: ChatError
        try:
            while (response := await conn.stream.recv_message()) is not None:
                if _is_goaway(response):
                    await self._goaway(conn, response.status_message)
                else:
                    self._dispatch(conn, response)
            error = ConnectionLost(target, "the server ended the conversation stream")
        except GRPCError as failure:
            error = ConnectionLost(target, _describe_status(failure))
        except _TRANSPORT_ERRORS as failure:
            # The server may have sent a status (e.g. UNAVAILABLE on shutdown) before it reset
            # the stream; leaving the stream with the failure reads it.
            status = await _leave_stream(conn, failure)
            reason = _describe(failure) if status is None else _describe_status(status)
            error = ConnectionLost(target, reason)
        except Exception as failure:
            log.exception("the reader of the Chat stream failed")
            error = ConnectionLost(target, f"client error: {failure!r}")
        if conn.closing:
            return
        # Reported to callers and notice subscribers; no louder than info here.
        log.info("%s", error.message)
        self._connection_lost(conn, error)

    async def _goaway(self, conn: _Connection, message: str) -> None:
        """The server is shutting down: stop using this stream, and end our side of it.

        The server answered everything it had (it says goodbye once its queued turns are
        done) and ends the stream with OK once we end ours; reading goes on until then.
        """
        reason = message or "the server is shutting down"
        self._connection_lost(conn, ConnectionLost(self.config.target, reason))
        async with conn.send_lock:
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                await conn.stream.end()

    def _connection_lost(self, conn: _Connection, error: ChatError) -> None:
        if conn.lost is not None:
            return
        conn.lost = error
        self._fail_pending(conn, error)
        if self._conn is conn:
            self._lost = error
            self._publish(
                ConnectionStateChanged(ConnectionState.LOST, self.config.target, error.message)
            )

    def _fail_pending(self, conn: _Connection, error: ChatError) -> None:
        for pending in conn.pending.values():
            if pending.is_turn:
                self._counters.replies_failed += 1
            pending.queue.put_nowait(error)
        conn.pending.clear()

    def _dispatch(self, conn: _Connection, response: chatpb.ChatResponse) -> None:
        kind = response.type
        pending = conn.pending.get(response.request_id) if response.request_id else None
        if pending is None:
            self._notice(response)
            return
        counters = self._counters
        if kind == chatpb.ChatResponseType.CHUNK:
            counters.chunks_received += 1
            if not pending.first_chunk:
                pending.first_chunk = True
                counters.first_chunks += 1
                counters.first_chunk_time_total += time.monotonic() - pending.sent_at
        elif kind in _TERMINAL:
            del conn.pending[response.request_id]
            if kind == chatpb.ChatResponseType.ERROR:
                counters.replies_failed += 1
            elif kind == chatpb.ChatResponseType.RESPONSE_COMPLETE:
                if response.finish_reason == chatpb.FinishReason.CANCELLED:
                    counters.replies_cancelled += 1
                else:
                    counters.replies_succeeded += 1
                    counters.response_time_total += time.monotonic() - pending.sent_at
        pending.queue.put_nowait(response)

    def _notice(self, response: chatpb.ChatResponse) -> None:
        kind = response.type
        notice: Notice
        if kind == chatpb.ChatResponseType.SESSION_UPDATE:
            notice = SessionUpdated(
                session_id=response.session_id,
                message=response.status_message,
                message_count=response.message_count,
                session=None if response.session is None else _session(response.session),
            )
        elif kind in (chatpb.ChatResponseType.STATUS, chatpb.ChatResponseType.ERROR):
            notice = ServerNotice(
                response.session_id,
                response.request_id,
                response.status_message or response.error_message,
            )
        else:
            # A late event of a request the client stopped waiting for.
            log.debug("dropping %s for %r", kind, response.request_id)
            return
        self._publish(notice)

    def _publish(self, notice: Notice) -> None:
        for queue in self._subscribers:
            queue.put_nowait(notice)

    def notices(self) -> Notices:
        """Subscribe to unsolicited events: session updates, server notices, connection states.

        >>> async def watch(client: ChatClient) -> None:           # doctest: +SKIP
        ...     async with client.notices() as notices:
        ...         async for notice in notices:
        ...             print(notice)
        """
        return Notices(self)

    async def _submit(self, request: chatpb.ChatRequest) -> tuple[_Connection, _Pending]:
        """Send a request that expects answers; return where it went and its queue."""
        pending = _Pending(
            request.request_id,
            is_turn=request.type in (chatpb.ChatRequestType.MESSAGE, chatpb.ChatRequestType.RETRY),
        )
        for _ in range(3):
            conn = await self._ready()
            conn.pending[request.request_id] = pending
            try:
                sent = await self._write(conn, request)
            except BaseException:
                conn.pending.pop(request.request_id, None)
                raise
            if sent:
                if pending.is_turn:
                    self._counters.messages_sent += 1
                return conn, pending
            # The connection went away while this request waited to be written (the server
            # said goodbye): nothing was sent, so it can go out on the next connection.
            conn.pending.pop(request.request_id, None)
        raise ConnectionLost(self.config.target, "the server kept closing the connection")

    async def _write(self, conn: _Connection, request: chatpb.ChatRequest) -> bool:
        """Write ``request`` on ``conn``'s stream; ``False`` if the connection is gone."""
        request.timestamp = format_timestamp(utcnow())
        try:
            # grpclib writes a message in several frames; two writers must not interleave.
            async with conn.send_lock:
                if conn.lost is not None:
                    return False
                await conn.stream.send_message(request)
        except _TRANSPORT_ERRORS as error:
            lost = ConnectionLost(self.config.target, _describe(error))
            self._connection_lost(conn, lost)
            raise lost from error
        return True

    # -- conversation ------------------------------------------------------------------------

    def send(self, session_id: str, text: str) -> ReplyStream:
        """Send ``text`` to session ``session_id``; iterate the result for the reply's events.

        >>> async def demo(client: ChatClient, session_id: str) -> None:  # doctest: +SKIP
        ...     async for event in client.send(session_id, "Hello"):
        ...         print(event)
        """
        return ReplyStream(self, chatpb.ChatRequestType.MESSAGE, session_id, text)

    def retry(self, session_id: str) -> ReplyStream:
        """Run the session's last user message again, after its turn failed.

        The reply fails with :class:`~chat.errors.FailedPrecondition` when the last message
        did not fail.
        """
        return ReplyStream(self, chatpb.ChatRequestType.RETRY, session_id, "")

    async def ask(self, session_id: str, text: str) -> Reply:
        """Send ``text`` and return the whole reply; raise its typed error if it failed."""
        async with self.send(session_id, text) as reply:
            return await reply.collect()

    async def cancel(self, request_id: str = "", *, session_id: str = "") -> None:
        """Stop the reply to ``request_id``, or every reply of ``session_id`` on this connection.

        The replies then end with :class:`ReplyCompleted` whose ``finish_reason`` is
        ``CANCELLED``; the server keeps what was said so far. Without a connection there is
        nothing to cancel (replies end with the connection that carried them), and nothing
        is done.
        """
        if not request_id and not session_id:
            raise InvalidArgument("request_id", "cancel needs a request_id or a session_id")
        conn = self._conn
        if conn is None:
            if not self._ever_connected:
                raise RuntimeError("the client is not connected: use `async with` or connect()")
            return
        await self._write(
            conn,
            chatpb.ChatRequest(
                type=chatpb.ChatRequestType.CANCEL, session_id=session_id, request_id=request_id
            ),
        )

    async def _check_alive(self, conn: _Connection) -> None:
        """PING ``conn``; without a PONG in time, declare it lost (failing its requests).

        A connection can die without a word: a stopped server that leaves the socket open,
        a network partition, a handler cancelled on the other side.
        """
        if conn.lost is not None:
            return
        try:
            await self._ping_on(conn)
        except DeadlineExceeded:
            reason = f"the server stopped answering (no PONG within {self.config.timeout:g}s)"
            self._connection_lost(conn, ConnectionLost(self.config.target, reason))
        except ChatError:
            pass  # lost meanwhile: its requests already have the error

    async def ping(self) -> float:
        """Round-trip time of a PING on the Chat stream, in seconds."""
        return await self._ping_on(await self._ready())

    async def _ping_on(self, conn: _Connection) -> float:
        request_id = str(uuid.uuid4())
        pending = _Pending(request_id, is_turn=False)
        conn.pending[request_id] = pending
        started = time.perf_counter()
        try:
            request = chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id=request_id)
            if not await self._write(conn, request):
                raise ConnectionLost(self.config.target, "the connection closed before the PING")
            async with asyncio.timeout(self.config.timeout):
                item = await pending.queue.get()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no PONG from {self.config.target} within {self.config.timeout:g}s"
            ) from None
        finally:
            conn.pending.pop(request_id, None)
        if isinstance(item, ChatError):
            raise item
        return time.perf_counter() - started

    # -- unary RPCs ----------------------------------------------------------------------------

    async def _unary(
        self,
        what: str,
        call: Callable[[_Connection], Awaitable[_T]],
        *,
        session_id: str = "",
    ) -> _T:
        conn = await self._ready()
        try:
            return await call(conn)
        except GRPCError as error:
            raise _error_from_status(
                error.status.value, error.message or "", session_id=session_id, unary=True
            ) from error
        except TimeoutError:
            raise DeadlineExceeded(
                f"{what}: no answer from {self.config.target} within {self.config.timeout:g}s"
            ) from None
        except _TRANSPORT_ERRORS as error:
            raise ConnectionLost(self.config.target, _describe(error)) from error

    async def create_session(
        self,
        *,
        title: str = "",
        system_prompt: str = "",
        model: str = "",
        context_policy: ContextPolicy = ContextPolicy.UNSPECIFIED,
    ) -> Session:
        """Create a session; empty ``model`` means the server's default."""
        request = chatpb.CreateSessionRequest(
            title=title,
            system_prompt=system_prompt,
            model=model,
            context_policy=chatpb.ContextPolicy(context_policy),
        )
        response = await self._unary(
            "CreateSession", lambda conn: conn.stub.create_session(request)
        )
        self._counters.sessions_created += 1
        if response.session is not None:
            return _session(response.session)
        return await self.get_session(response.session_id)

    async def get_session(self, session_id: str) -> Session:
        """The session (without its messages); :class:`~chat.errors.SessionNotFound` if none."""
        info = await self._unary(
            "GetSessionInfo",
            lambda conn: conn.stub.get_session_info(
                chatpb.SessionInfoRequest(session_id=session_id)
            ),
            session_id=session_id,
        )
        return _session(info)

    async def history(self, session_id: str) -> list[Message]:
        """The session's messages, oldest first."""
        info = await self._unary(
            "GetSessionInfo",
            lambda conn: conn.stub.get_session_info(
                chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
            ),
            session_id=session_id,
        )
        return [_message(m) for m in info.messages]

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        model: str | None = None,
        context_policy: ContextPolicy | None = None,
    ) -> Session:
        """Change the fields given (``None`` leaves a field as it is); return the session."""
        request = chatpb.UpdateSessionRequest(
            session_id=session_id,
            title=title,
            system_prompt=system_prompt,
            model=model,
            context_policy=None if context_policy is None else chatpb.ContextPolicy(context_policy),
        )
        info = await self._unary(
            "UpdateSession",
            lambda conn: conn.stub.update_session(request),
            session_id=session_id,
        )
        return _session(info)

    async def delete_session(self, session_id: str) -> int:
        """Delete the session and its history; return how many messages were deleted."""
        response = await self._unary(
            "DeleteSession",
            lambda conn: conn.stub.delete_session(
                chatpb.DeleteSessionRequest(session_id=session_id)
            ),
            session_id=session_id,
        )
        return response.deleted_messages

    async def list_sessions(self, *, page_size: int = 0, page_token: str = "") -> SessionList:
        """One page of sessions, newest first (``page_size`` 0: the server's default)."""
        if not 0 <= page_size <= 2**31 - 1:
            raise InvalidArgument("page_size", f"must be >= 0, not {page_size}")
        response = await self._unary(
            "ListSessions",
            lambda conn: conn.stub.list_sessions(
                chatpb.ListSessionsRequest(page_size=page_size, page_token=page_token)
            ),
        )
        return SessionList(
            [_session(s) for s in response.sessions],
            response.next_page_token,
            response.total_size,
        )

    async def iter_sessions(self, *, page_size: int = 100) -> AsyncGenerator[Session, None]:
        """Every session, newest first, page by page (close it with ``aclosing``)."""
        token = ""
        while True:
            page = await self.list_sessions(page_size=page_size, page_token=token)
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def find_session(self, id_or_prefix: str) -> Session:
        """The session whose id is ``id_or_prefix`` or, failing that, starts with it.

        Raises :class:`~chat.errors.SessionNotFound` when none matches and
        :class:`~chat.errors.InvalidArgument` when the prefix matches several sessions.
        """
        wanted = id_or_prefix.strip().lower()
        if not wanted:
            raise InvalidArgument("session_id", "is required")
        with contextlib.suppress(SessionNotFound):
            return await self.get_session(wanted)
        matches: list[Session] = []
        async with contextlib.aclosing(self.iter_sessions(page_size=500)) as sessions:
            async for session in sessions:
                if session.session_id.startswith(wanted):
                    matches.append(session)
        if not matches:
            raise SessionNotFound(id_or_prefix)
        if len(matches) > 1:
            ids = ", ".join(s.session_id[:13] for s in matches[:5])
            raise InvalidArgument(
                "session_id",
                f"{id_or_prefix!r} matches {len(matches)} sessions ({ids}); give more characters",
            )
        return matches[0]

    async def server_stats(self) -> ServerStatsInfo:
        """The server's counters."""
        r = await self._unary("GetServerStats", lambda conn: conn.stub.get_server_stats())
        return ServerStatsInfo(
            version=r.version,
            backend=r.backend,
            model=r.model,
            store=r.store,
            started_at=_timestamp(r.started_at),
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

    async def health(self, service: str = "") -> ServingStatus:
        """The standard health check: ``""`` for the whole server, or a service name.

        ``ChatService`` turns ``NOT_SERVING`` while the server drains on shutdown.
        """

        async def check(conn: _Connection) -> ServingStatus:
            try:
                response = await HealthStub(conn.channel).Check(
                    HealthCheckRequest(service=service), timeout=self.config.timeout
                )
            except GRPCError as error:
                if error.status is GrpcStatus.NOT_FOUND:
                    return ServingStatus.SERVICE_UNKNOWN
                raise
            if response is None:
                return ServingStatus.UNKNOWN
            return _enum(ServingStatus, response.status, ServingStatus.UNKNOWN)

        return await self._unary("Health.Check", check)


async def _leave_stream(conn: _Connection, failure: BaseException | None) -> GRPCError | None:
    """Leave the stream's ``async with`` once; return the status the server ended it with.

    Leaving it as if with ``failure`` (a stream error, whatever happened) makes grpclib
    report the status the server sent, if any, and never wait for trailers that may not come.
    """
    if not conn.stream_open:
        return None
    conn.stream_open = False
    error = failure if failure is not None else StreamTerminatedError("closed by the client")
    try:
        await conn.stream.__aexit__(type(error), error, error.__traceback__)
    except GRPCError as status:
        return status
    except _TRANSPORT_ERRORS:
        pass
    return None


def _describe_status(error: GRPCError) -> str:
    status = _enum(StatusCode, error.status.value, StatusCode.UNKNOWN)
    return f"the server ended the stream with {status.name}: {error.message or 'no details'}"


def _describe(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__

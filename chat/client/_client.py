"""The facade: :class:`ChatClient`, and the :class:`ReplyStream` and :class:`Notices` it returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Self, TypeVar

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status as GrpcStatus
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

import chatpb
from chat._defaults import default_of
from chat.client import _convert
from chat.client._config import ClientConfig, ReconnectPolicy
from chat.client._connection import (
    TRANSPORT_ERRORS,
    ChannelFactory,
    Connection,
    Connector,
    Pending,
    WatchSink,
    describe,
)
from chat.client._results import (
    ClientStats,
    Notice,
    Reply,
    ReplyChunk,
    ReplyCompleted,
    ReplyEvent,
    ReplyFailed,
    ReplyStarted,
    ServingStatus,
    SessionList,
    WatchEvent,
    WhoAmI,
)
from chat.errors import (
    ChatError,
    ConnectionLost,
    DeadlineExceeded,
    InvalidArgument,
    ServerUnreachable,
    SessionNotFound,
    StatusCode,
)
from chat.secret import Secret
from chat.stats import ServerStatsInfo
from chat.tls import client_context
from chat.types import (
    ConcurrencyPolicy,
    ContextPolicy,
    DisconnectPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionUpdateKind,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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

    With a :class:`ReconnectPolicy` a reply survives the loss of its connection: the client
    reconnects and asks for the rest of the turn (``RESUME`` after the last ``seq`` it
    has) or, when no event of the turn had come yet, sends the message again with the same
    :attr:`client_message_id` (the server attaches it to the turn it started, if it had).
    Every event is yielded once, in order. When the server no longer has the turn (past its
    replay window), the stored assistant message completes the reply if it is there; if it
    is not, :class:`~chat.errors.ConnectionLost` is raised. A ``RETRY`` is not sent twice:
    one cut before its first event raises ``ConnectionLost``.
    """

    def __init__(
        self,
        connector: Connector,
        kind: chatpb.ChatRequestType,
        session_id: str,
        text: str,
        *,
        client_message_id: str | None = None,
        history: Callable[[str], Awaitable[list[Message]]] | None = None,
    ) -> None:
        self._connector = connector
        self._kind = kind
        self._text = text
        self._history = history
        self.session_id = session_id
        self.request_id = str(uuid.uuid4())
        #: Sent with a MESSAGE (a new UUID unless given), and again with it if it is resent.
        self.client_message_id = (
            (client_message_id or str(uuid.uuid4()))
            if kind == chatpb.ChatRequestType.MESSAGE
            else ""
        )
        #: The server's id of the turn, once one of its events came (``""`` before).
        self.turn_id = ""
        #: How often the reply went on on a new connection.
        self.resumes = 0
        self._last_seq = 0
        self._chunks = 0
        # Resumptions since the last event that moved the reply on: bounded by the policy.
        self._attempts = 0
        self._resuming = False
        self._backlog: list[ReplyEvent] = []
        self._pending: Pending | None = None
        self._conn: Connection | None = None
        self._done = False
        self._parts: list[str] = []
        self._result: Reply | None = None
        self._started: ReplyStarted | None = None

    @property
    def done(self) -> bool:
        """Whether the terminal event was delivered (or the connection was lost)."""
        return self._done and not self._backlog

    @property
    def text(self) -> str:
        """The reply's text as far as it was read."""
        return "".join(self._parts)

    @property
    def result(self) -> Reply | None:
        """The whole reply, once its ``ReplyCompleted`` was read; ``None`` before or on failure."""
        return self._result

    def _request(self) -> chatpb.ChatRequest:
        if self.turn_id:
            return chatpb.ChatRequest(
                type=chatpb.ChatRequestType.RESUME,
                session_id=self.session_id,
                turn_id=self.turn_id,
                after_seq=self._last_seq,
                request_id=self.request_id,
            )
        return chatpb.ChatRequest(
            type=self._kind,
            session_id=self.session_id,
            message=self._text,
            request_id=self.request_id,
            client_message_id=self.client_message_id,
        )

    async def start(self) -> None:
        """Send the request (done by the first iteration if not called)."""
        if self._pending is None:
            self._conn, self._pending = await self._connector.submit(self._request())

    async def cancel(self) -> None:
        """Ask the server to stop this reply; it then ends with ``ReplyCompleted(CANCELLED)``.

        Nothing to do once the reply ended, or if its connection is gone (the reply went
        with it): the CANCEL only means something on the stream that carries the reply.
        """
        if self._conn is not None and not self._done:
            await self._connector.write(
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
        if self._backlog:
            return self._take(self._backlog.pop(0))
        if self._done:
            raise StopAsyncIteration
        await self.start()
        try:
            while True:
                item = await self._next_item()
                if isinstance(item, ChatError):
                    if await self._carry_on(item):
                        continue
                    self._give_up()
                    raise item
                if item.seq:
                    if item.turn_id == self.turn_id and item.seq <= self._last_seq:
                        continue  # replayed, and already yielded
                    self.turn_id, self._last_seq = item.turn_id, item.seq
                    self._attempts = 0
                elif self._resuming and item.type == chatpb.ChatResponseType.ERROR:
                    # The RESUME was refused (the turn is past the replay window, or the
                    # server does not know it): what was stored is all there is.
                    self._done = True
                    self._backlog = await self._rest_from_history(item)
                    return self._take(self._backlog.pop(0))
                if item.type in _convert.TERMINAL:
                    self._done = True
                return self._take(_convert.to_reply_event(item))
        except ChatError:
            self._give_up()
            raise

    async def _next_item(self) -> chatpb.ChatResponse | ChatError:
        assert self._pending is not None
        assert self._conn is not None
        while True:
            try:
                async with asyncio.timeout(self._connector.config.keepalive):
                    return await self._pending.queue.get()
            except TimeoutError:
                # Silent for a while: a loss is queued here if the stream is dead.
                await self._connector.check_alive(self._conn)

    async def _carry_on(self, error: ChatError) -> bool:
        """After a lost connection: carry the reply on on a new one, if it can be."""
        connector = self._connector
        policy = connector.config.reconnect
        if (
            policy is None
            or not isinstance(error, ConnectionLost)
            or not connector.resumable(self._conn)
            or connector.legacy_server
            # A RETRY sent twice might run twice: only a turn with an id is resumed.
            or not (self.turn_id or self.client_message_id)
            or self._attempts >= policy.max_attempts
        ):
            return False
        self._attempts += 1
        how = f"RESUME after seq {self._last_seq}" if self.turn_id else "the message again"
        log.info("reply %s: connection lost (%s); sending %s", self.request_id, error, how)
        self._resuming = bool(self.turn_id)
        try:
            self._conn, self._pending = await connector.submit(
                self._request(), continues=self._pending
            )
        except ServerUnreachable as failure:
            if isinstance(failure, ConnectionLost):
                raise
            # Still a reply cut by a lost connection, as callers catch it.
            raise ConnectionLost(
                connector.config.target,
                f"{error.reason}; the reply could not be resumed: {failure.reason}",
            ) from failure
        self.resumes += 1
        connector.counters.replies_resumed += 1
        return True

    def _give_up(self) -> None:
        self._done = True
        if self.turn_id:
            self._connector.turn_ended(self.turn_id)
        pending = self._pending
        if pending is not None and pending.resumable and not pending.failure_counted:
            # A loss was not counted as a failure while the reply could still go on.
            pending.failure_counted = True
            self._connector.counters.replies_failed += 1

    async def _rest_from_history(self, refusal: chatpb.ChatResponse) -> list[ReplyEvent]:
        """The rest of the reply from the stored assistant message of its turn."""
        code = _convert.status_name(refusal.error_code)
        stored: Message | None = None
        position = 0
        if self._history is not None:
            messages = await self._history(self.session_id)
            found = [
                (index, m)
                for index, m in enumerate(messages, 1)
                if m.role is Role.ASSISTANT and m.turn_id == self.turn_id
            ]
            if found:
                position, stored = found[0]
        target = self._connector.config.target
        if stored is None or not stored.content.startswith(self.text):
            raise ConnectionLost(
                target,
                f"the connection was lost mid-reply and the server no longer has the turn "
                f"({code}); its reply is not stored",
            )
        log.info("reply %s: RESUME refused (%s); completed as stored", self.request_id, code)
        events: list[ReplyEvent] = []
        rest = stored.content[len(self.text) :]
        total = self._chunks
        if rest:
            total += 1
            events.append(ReplyChunk(self.request_id, self.session_id, rest, total, self.turn_id))
        if stored.status is MessageStatus.FAILED:
            events.append(
                ReplyFailed(
                    request_id=self.request_id,
                    session_id=self.session_id,
                    code=StatusCode.UNKNOWN,
                    message="the reply failed after it started; the partial reply is kept",
                    started=True,
                    total_chunks=total,
                    retry_after=None,
                    turn_id=self.turn_id,
                )
            )
        else:
            complete = stored.status is MessageStatus.COMPLETE
            events.append(
                ReplyCompleted(
                    request_id=self.request_id,
                    session_id=self.session_id,
                    finish_reason=FinishReason.STOP if complete else FinishReason.CANCELLED,
                    total_chunks=total,
                    processing_time=0.0,
                    message_count=position,
                    model=stored.model,
                    usage=stored.usage,
                    turn_id=self.turn_id,
                )
            )
        return events

    def _take(self, event: ReplyEvent) -> ReplyEvent:
        assert self._pending is not None
        if isinstance(event, ReplyChunk):
            self._parts.append(event.text)
            self._chunks += 1
        elif isinstance(event, ReplyStarted):
            self._started = event
        elif isinstance(event, ReplyCompleted):
            started = self._started
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
                context_messages=0 if started is None else started.context_messages,
                omitted_messages=0 if started is None else started.omitted_messages,
                first_chunk_time=self._pending.first_chunk_after,
                turn_id=self.turn_id,
                resumes=self.resumes,
            )
        return event

    async def collect(self) -> Reply:
        """Read the reply to its end; raise its typed error if it failed."""
        async for event in self:
            if isinstance(event, ReplyFailed):
                raise event.error()
        if self._result is None:
            raise ConnectionLost(
                self._connector.config.target, "the reply ended without completing"
            )
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

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._queue: asyncio.Queue[Notice] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        self._connector.subscribers.add(self._queue)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._connector.subscribers.discard(self._queue)

    async def get(self) -> Notice:
        """The next notice (waits)."""
        return await self._queue.get()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notice:
        return await self._queue.get()


class Watch:
    """The live events of one session; use ``async with client.watch(session_id) as watch``.

    Entering sends ``WATCH`` (and fails with the server's error, e.g.
    :class:`~chat.errors.SessionNotFound`); leaving sends ``UNWATCH``. Iterating yields a
    :class:`WatchEvent` for every event of every turn of the session, from any client (a
    turn running when the watch began is replayed from its start), and for its session
    updates. With a :class:`ReconnectPolicy` the watch goes on after a lost connection: it
    watches again on the new one and resumes the turns it was in the middle of (one that
    ended meanwhile too, while the server keeps it), and the events it had already yielded
    are not yielded twice. Without one, a lost connection raises
    :class:`~chat.errors.ConnectionLost`.

    >>> async def follow(client: ChatClient, session_id: str) -> None:  # doctest: +SKIP
    ...     async with client.watch(session_id) as watch:
    ...         async for item in watch:
    ...             if isinstance(item.event, ReplyChunk) and not item.is_mine:
    ...                 print(item.event.text, end="", flush=True)
    """

    def __init__(self, connector: Connector, session_id: str) -> None:
        self._connector = connector
        self.session_id = session_id
        self._sink: WatchSink | None = None
        # The last seq yielded of each recent turn: replays and copies are dropped.
        self._seen: dict[str, int] = {}
        # The turns begun and not ended, as far as this watch saw them.
        self._open: set[str] = set()
        # The turns this watch gets through a RESUME of its own (the request id), and
        # the other way round: only that RESUME's events of the turn count.
        self._followed: dict[str, str] = {}
        self._resumes: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        await self._watch()
        await self._follow_turns()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        self._connector.remove_watch(sink)
        for request_id in self._resumes:
            sink.conn.pending.pop(request_id, None)
        if sink.conn.lost is None and not sink.conn.closing:
            request = chatpb.ChatRequest(
                type=chatpb.ChatRequestType.UNWATCH,
                session_id=self.session_id,
                request_id=str(uuid.uuid4()),
            )
            with contextlib.suppress(ChatError):
                await self._connector.write(sink.conn, request)

    async def _watch(self) -> None:
        connector = self._connector
        if self._sink is not None:
            connector.remove_watch(self._sink)
            self._sink = None
        conn = await connector.ready()
        # Registered before the WATCH goes out: the replay of a running turn may come first.
        sink = WatchSink(self.session_id, conn)
        connector.add_watch(sink)
        request_id = str(uuid.uuid4())
        pending = Pending(request_id, is_turn=False)
        conn.pending[request_id] = pending
        try:
            request = chatpb.ChatRequest(
                type=chatpb.ChatRequestType.WATCH,
                session_id=self.session_id,
                request_id=request_id,
            )
            if not await connector.write(conn, request):
                raise ConnectionLost(connector.config.target, "the connection closed")
            async with asyncio.timeout(connector.config.timeout):
                # The answer: a STATUS (watching), or the ERROR of a refused WATCH.
                answer = await pending.queue.get()
        except TimeoutError:
            connector.remove_watch(sink)
            raise DeadlineExceeded(
                f"no answer to WATCH from {connector.config.target} "
                f"within {connector.config.timeout:g}s"
            ) from None
        except BaseException:
            connector.remove_watch(sink)
            raise
        finally:
            conn.pending.pop(request_id, None)
        if isinstance(answer, ChatError):
            connector.remove_watch(sink)
            raise answer
        if answer.type == chatpb.ChatResponseType.ERROR:
            connector.remove_watch(sink)
            raise _convert.error_from_status(
                answer.error_code,
                answer.error_message,
                session_id=self.session_id,
                field=answer.error_field,
            )
        self._sink = sink

    async def _follow_turns(self) -> None:
        """RESUME into the watch what the WATCH does not bring: the turns it was in the
        middle of when a connection was lost (one may have ended meanwhile), and this
        client's own running turns (a server does not send a stream's own turns to its
        watch). Each from the last event the watch yielded of it."""
        sink = self._sink
        assert sink is not None
        connector = self._connector
        self._followed.clear()
        self._resumes.clear()
        for turn_id in {*self._open, *connector.running_turns(self.session_id)}:
            request_id = str(uuid.uuid4())
            self._followed[turn_id] = request_id
            self._resumes[request_id] = turn_id
            sink.conn.pending[request_id] = Pending(
                request_id, is_turn=False, queue=sink.queue, counted=False
            )
            request = chatpb.ChatRequest(
                type=chatpb.ChatRequestType.RESUME,
                session_id=self.session_id,
                turn_id=turn_id,
                after_seq=self._seen.get(turn_id, 0),
                request_id=request_id,
            )
            if not await connector.write(sink.conn, request):
                raise ConnectionLost(connector.config.target, "the connection closed")

    async def _watch_again(self) -> None:
        """WATCH on a new connection; one lost again at once is tried again, within the
        reconnection policy's attempts (each reconnection backs off by itself)."""
        policy = self._connector.config.reconnect
        attempts = 1 if policy is None else policy.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._watch()
                await self._follow_turns()
                return
            except ConnectionLost:
                if attempt == attempts:
                    raise

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._sink is None:
            raise RuntimeError("use `async with client.watch(session_id) as watch`")
        connector = self._connector
        while True:
            sink = self._sink
            try:
                async with asyncio.timeout(connector.config.keepalive):
                    item = await sink.queue.get()
            except TimeoutError:
                # A quiet session, or a dead connection: a loss is queued here if it is dead.
                await connector.check_alive(sink.conn)
                continue
            if isinstance(item, ChatError):
                if isinstance(item, ConnectionLost) and connector.resumable(sink.conn):
                    log.info("watch of %s: %s; watching again", self.session_id, item)
                    await self._watch_again()
                    continue
                raise item
            if item.type == chatpb.ChatResponseType.SESSION_UPDATE:
                return WatchEvent(self.session_id, _convert.to_session_updated(item))
            turn_id = item.turn_id
            if not turn_id:
                # A RESUME refused: the server no longer has the turn (its end is in the
                # history, if it was stored); its other copies count again.
                refused = self._resumes.pop(item.request_id, "")
                self._open.discard(refused)
                self._followed.pop(refused, None)
                continue
            followed = self._followed.get(turn_id)
            if followed is not None and item.request_id != followed:
                continue  # the RESUME brings this turn, in order, from where the watch is
            if item.seq:
                if item.seq <= self._seen.get(turn_id, 0):
                    continue  # already yielded (the sender's copy, or a replay)
                self._seen[turn_id] = item.seq
                self._seen = _recent(self._seen)
                if item.type in _convert.TERMINAL:
                    self._open.discard(turn_id)
                    self._followed.pop(turn_id, None)
                else:
                    self._open.add(turn_id)
            return WatchEvent(
                self.session_id,
                _convert.to_reply_event(item),
                is_mine=turn_id in connector.own_turns,
            )


#: Turns a watch remembers the last seq of.
_WATCH_MEMORY = 256


def _recent(seen: dict[str, int]) -> dict[str, int]:
    if len(seen) <= _WATCH_MEMORY:
        return seen
    return dict(list(seen.items())[-_WATCH_MEMORY // 2 :])


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

    The keyword arguments are those of :class:`ClientConfig`. ``channel_factory`` makes the
    grpclib :class:`~grpclib.client.Channel` of each connection the client opens (the first
    one, and each one after a loss or :meth:`disconnect`): it is called with no arguments and
    must return a new channel every time; the client closes it. By default it is
    ``Channel(host, port)`` of ``target``, over TLS with ``tls=True`` (the server verified
    against ``ca_file``, or the system's CAs; ``cert_file`` and ``key_file`` for a server
    that requires client certificates). Pass one to run the client in memory in tests.
    ``token`` (a :class:`~chat.secret.Secret`) goes with every call as
    ``authorization: Bearer TOKEN``, whatever makes the channel::

        ChatClient("chat.example.org:50051", tls=True, token=Secret(os.environ["CHAT_TOKEN"]))
    """

    def __init__(
        self,
        target: str = default_of(ClientConfig, "target"),
        *,
        timeout: float = default_of(ClientConfig, "timeout"),
        connect_timeout: float = default_of(ClientConfig, "connect_timeout"),
        reconnect: ReconnectPolicy | None = None,
        keepalive: float | None = default_of(ClientConfig, "keepalive"),
        channel_factory: ChannelFactory | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: Secret | None = None,
    ) -> None:
        self.config = config = ClientConfig(
            target=target,
            timeout=timeout,
            connect_timeout=connect_timeout,
            reconnect=reconnect,
            keepalive=keepalive,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token=token,
        )
        if channel_factory is None:
            # Made once: a bad CA or key file is a ConfigurationError here, not at connect.
            context = client_context(ca_file, cert_file, key_file) if tls else None

            def channel_factory() -> Channel:
                return Channel(config.host, config.port, ssl=context)

        self._connector = Connector(config, channel_factory)

    @classmethod
    def from_config(
        cls, config: ClientConfig, *, channel_factory: ChannelFactory | None = None
    ) -> ChatClient:
        """A client for ``config`` (what the CLI builds)."""
        return cls(
            config.target,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            reconnect=config.reconnect,
            keepalive=config.keepalive,
            channel_factory=channel_factory,
            tls=config.tls,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            token=config.token,
        )

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
        return self._connector.connected

    @property
    def stats(self) -> ClientStats:
        """What this client measured so far."""
        return self._connector.counters.snapshot()

    @property
    def pending_requests(self) -> int:
        """Requests on the Chat stream still waiting for their last event."""
        return self._connector.pending_requests

    async def connect(self) -> None:
        """Open the connection (again) and check it with a PING.

        A no-op when connected. Retries with backoff when the client has a
        :class:`ReconnectPolicy` and connected before; raises
        :class:`~chat.errors.ServerUnreachable` when the server cannot be reached.
        """
        await self._connector.connect()

    async def disconnect(self) -> None:
        """Close the connection; replies in flight are cancelled. :meth:`connect` reopens it."""
        await self._connector.disconnect()

    async def aclose(self) -> None:
        """Close the connection for good."""
        await self._connector.aclose()

    def notices(self) -> Notices:
        """Subscribe to unsolicited events: session updates, server notices, connection states.

        >>> async def watch(client: ChatClient) -> None:           # doctest: +SKIP
        ...     async with client.notices() as notices:
        ...         async for notice in notices:
        ...             print(notice)
        """
        return Notices(self._connector)

    # -- conversation ------------------------------------------------------------------------

    def send(
        self, session_id: str, text: str, *, client_message_id: str | None = None
    ) -> ReplyStream:
        """Send ``text`` to session ``session_id``; iterate the result for the reply's events.

        ``client_message_id`` identifies the message to the server (a new UUID by default):
        a message sent twice with the same id, by a resend after a reconnect or by two
        calls, starts one turn; the second send gets the events of that turn.

        >>> async def demo(client: ChatClient, session_id: str) -> None:  # doctest: +SKIP
        ...     async for event in client.send(session_id, "Hello"):
        ...         print(event)
        """
        return ReplyStream(
            self._connector,
            chatpb.ChatRequestType.MESSAGE,
            session_id,
            text,
            client_message_id=client_message_id,
            history=self.history,
        )

    def retry(self, session_id: str) -> ReplyStream:
        """Run the session's last user message again, after its turn failed.

        The reply fails with :class:`~chat.errors.FailedPrecondition` when the last message
        did not fail.
        """
        return ReplyStream(
            self._connector, chatpb.ChatRequestType.RETRY, session_id, "", history=self.history
        )

    async def ask(
        self, session_id: str, text: str, *, client_message_id: str | None = None
    ) -> Reply:
        """Send ``text`` and return the whole reply; raise its typed error if it failed."""
        async with self.send(session_id, text, client_message_id=client_message_id) as reply:
            return await reply.collect()

    def watch(self, session_id: str) -> Watch:
        """Follow the live activity of ``session_id``: every turn, whoever sent it.

        >>> async def demo(client: ChatClient, session_id: str) -> None:  # doctest: +SKIP
        ...     async with client.watch(session_id) as watch:
        ...         async for item in watch:
        ...             print(item.turn_id, item.seq, item.is_mine, item.event)
        """
        return Watch(self._connector, session_id)

    async def cancel(self, request_id: str = "", *, session_id: str = "") -> None:
        """Stop the reply to ``request_id``, or every reply of ``session_id`` on this connection.

        The replies then end with :class:`ReplyCompleted` whose ``finish_reason`` is
        ``CANCELLED``; the server keeps what was said so far. Without a connection there is
        nothing to cancel (replies end with the connection that carried them), and nothing
        is done.
        """
        if not request_id and not session_id:
            raise InvalidArgument("request_id", "cancel needs a request_id or a session_id")
        conn = self._connector.current
        if conn is None:
            if not self._connector.ever_connected:
                raise RuntimeError("the client is not connected: use `async with` or connect()")
            return
        await self._connector.write(
            conn,
            chatpb.ChatRequest(
                type=chatpb.ChatRequestType.CANCEL, session_id=session_id, request_id=request_id
            ),
        )

    async def ping(self) -> float:
        """Round-trip time of a PING on the Chat stream, in seconds."""
        return await self._connector.ping_on(await self._connector.ready())

    # -- unary RPCs ----------------------------------------------------------------------------

    async def _unary(
        self,
        what: str,
        call: Callable[[Connection], Awaitable[_T]],
        *,
        session_id: str = "",
    ) -> _T:
        conn = await self._connector.ready()
        try:
            return await call(conn)
        except GRPCError as error:
            raise _convert.error_from_grpc(error, session_id=session_id) from error
        except TimeoutError:
            raise self._no_answer(what) from None
        except TRANSPORT_ERRORS as error:
            raise ConnectionLost(self.config.target, describe(error)) from error

    def _no_answer(self, what: str) -> DeadlineExceeded:
        error = DeadlineExceeded(
            f"no answer from {self.config.target} within {self.config.timeout:g}s"
        )
        # The request's name is for logs, not for the person reading the message.
        log.info("%s: %s", what, error)
        return error

    async def create_session(
        self,
        *,
        title: str = "",
        system_prompt: str = "",
        model: str = "",
        context_policy: ContextPolicy = ContextPolicy.UNSPECIFIED,
        concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.UNSPECIFIED,
        on_disconnect: DisconnectPolicy = DisconnectPolicy.UNSPECIFIED,
        max_reply_tokens: int = 0,
    ) -> Session:
        """Create a session; empty ``model`` (and every default) means the server's default.

        ``max_reply_tokens`` caps each reply asked of the model (0: the server's default, its
        ``--reply-reserve``; a reply cut by it ends with finish reason ``LENGTH``);
        ``concurrency_policy`` says what a message sent while a reply runs does (queue,
        reject, interrupt); ``on_disconnect`` whether a reply goes on when its client leaves.
        """
        _check_reply_tokens(max_reply_tokens)
        request = chatpb.CreateSessionRequest(
            title=title,
            system_prompt=system_prompt,
            model=model,
            context_policy=chatpb.ContextPolicy(context_policy),
            concurrency_policy=chatpb.ConcurrencyPolicy(concurrency_policy),
            on_disconnect=chatpb.DisconnectPolicy(on_disconnect),
            max_reply_tokens=max_reply_tokens,
        )
        response = await self._unary(
            "CreateSession", lambda conn: conn.stub.create_session(request)
        )
        self._connector.counters.sessions_created += 1
        if response.session is not None:
            return _convert.to_session(response.session)
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
        return _convert.to_session(info)

    async def history(self, session_id: str) -> list[Message]:
        """The session's messages, oldest first."""
        info = await self._unary(
            "GetSessionInfo",
            lambda conn: conn.stub.get_session_info(
                chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
            ),
            session_id=session_id,
        )
        return [_convert.to_message(m) for m in info.messages]

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        model: str | None = None,
        context_policy: ContextPolicy | None = None,
        concurrency_policy: ConcurrencyPolicy | None = None,
        on_disconnect: DisconnectPolicy | None = None,
        max_reply_tokens: int | None = None,
    ) -> Session:
        """Change the fields given (``None`` leaves a field as it is); return the session.

        ``max_reply_tokens=0`` goes back to the server's default reply limit.
        """
        if max_reply_tokens is not None:
            _check_reply_tokens(max_reply_tokens)
        request = chatpb.UpdateSessionRequest(
            session_id=session_id,
            title=title,
            system_prompt=system_prompt,
            model=model,
            context_policy=None if context_policy is None else chatpb.ContextPolicy(context_policy),
            concurrency_policy=(
                None if concurrency_policy is None else chatpb.ConcurrencyPolicy(concurrency_policy)
            ),
            on_disconnect=None if on_disconnect is None else chatpb.DisconnectPolicy(on_disconnect),
            max_reply_tokens=max_reply_tokens,
        )
        connector = self._connector
        echo: tuple[SessionUpdateKind, datetime | None] | None = None
        # The server tells this client's stream too; that echo is not news to it.
        connector.begin_own_change(session_id)
        try:
            info = await self._unary(
                "UpdateSession",
                lambda conn: conn.stub.update_session(request),
                session_id=session_id,
            )
            session = _convert.to_session(info)
            echo = (SessionUpdateKind.SESSION_UPDATED, session.last_activity)
        finally:
            connector.end_own_change(session_id, echo)
        return session

    async def delete_session(self, session_id: str) -> int:
        """Delete the session and its history; return how many messages were deleted."""
        connector = self._connector
        echo: tuple[SessionUpdateKind, datetime | None] | None = None
        connector.begin_own_change(session_id)
        try:
            response = await self._unary(
                "DeleteSession",
                lambda conn: conn.stub.delete_session(
                    chatpb.DeleteSessionRequest(session_id=session_id)
                ),
                session_id=session_id,
            )
            echo = (SessionUpdateKind.SESSION_DELETED, None)
        finally:
            connector.end_own_change(session_id, echo)
        return response.deleted_messages

    async def list_sessions(
        self, *, page_size: int = 0, page_token: str = "", all_identities: bool = False
    ) -> SessionList:
        """One page of this client's sessions, newest first (``page_size`` 0: the server's
        default); ``all_identities``: everyone's (administrators only, else
        :class:`~chat.errors.PermissionDenied`)."""
        if not 0 <= page_size <= 2**31 - 1:
            raise InvalidArgument("page_size", f"must be >= 0, not {page_size}")
        request = chatpb.ListSessionsRequest(
            page_size=page_size, page_token=page_token, all_identities=all_identities
        )
        response = await self._unary("ListSessions", lambda conn: conn.stub.list_sessions(request))
        return SessionList(
            [_convert.to_session(s) for s in response.sessions],
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
        response = await self._unary("GetServerStats", lambda conn: conn.stub.get_server_stats())
        return _convert.to_server_stats(response)

    async def who_am_i(self) -> WhoAmI:
        """Who the server takes this client for, with its limits and their use now."""
        response = await self._unary("WhoAmI", lambda conn: conn.stub.who_am_i())
        return _convert.to_who_am_i(response)

    async def health(self, service: str = "") -> ServingStatus:
        """The standard health check: ``""`` for the whole server, or a service name.

        ``ChatService`` and the whole server turn ``NOT_SERVING`` while the server drains on
        shutdown. The check needs no Chat stream (a draining server tells new streams to go
        away): without an open connection, for instance before :meth:`connect`, it is made
        on a channel of its own.
        """

        async def check(channel: Channel) -> ServingStatus:
            try:
                response = await HealthStub(channel).Check(
                    HealthCheckRequest(service=service), timeout=self.config.timeout
                )
            except GRPCError as error:
                if error.status is GrpcStatus.NOT_FOUND:
                    return ServingStatus.SERVICE_UNKNOWN
                raise
            if response is None:
                return ServingStatus.UNKNOWN
            return _convert.to_serving_status(response)

        conn = self._connector.current
        if conn is not None and conn.lost is None:
            return await self._unary("Health.Check", lambda conn: check(conn.channel))
        channel = self._connector.new_channel()
        try:
            return await check(channel)
        except GRPCError as error:
            raise _convert.error_from_grpc(error) from error
        except TimeoutError:
            raise self._no_answer("Health.Check") from None
        except TRANSPORT_ERRORS as error:
            raise ServerUnreachable(
                self.config.target,
                describe(error),
                refused=isinstance(error, ConnectionRefusedError),
            ) from error
        finally:
            channel.close()


def _check_reply_tokens(value: int) -> None:
    # An int32 on the wire: a larger number would be sent silently wrapped.
    if not 0 <= value <= 2**31 - 1:
        raise InvalidArgument(
            "max_reply_tokens", f"must be between 0 (the server's default) and {2**31 - 1}"
        )

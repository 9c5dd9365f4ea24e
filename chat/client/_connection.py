"""The client's connection: one channel and its shared Chat stream, the reader, reconnection.

A :class:`Connector` owns the current :class:`Connection` and replaces it as a whole when it
is lost. Its reader task hands each server event to the request it answers (a
:class:`Pending` queue, by ``request_id``) and turns the others into notices; when the
stream breaks, every request in flight gets the :class:`~chat.errors.ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import h2.exceptions
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.const import Cardinality
from grpclib.const import Status as GrpcStatus
from grpclib.events import SendRequest, listen
from grpclib.exceptions import ProtocolError, StreamTerminatedError

import chatpb
from chat.client import _convert
from chat.client._config import ClientConfig, ReconnectPolicy
from chat.client._results import (
    ConnectionState,
    ConnectionStateChanged,
    Counters,
    Notice,
    SessionUpdated,
)
from chat.client._tracing import current_traceparent, send_trace_context
from chat.errors import (
    ChatError,
    ConnectionLost,
    ConnectTimeout,
    DeadlineExceeded,
    ServerUnreachable,
)
from chat.secret import keep_headers_out_of_logs
from chat.types import SessionUpdateKind, format_timestamp, utcnow

log = logging.getLogger(__name__)

_CHAT_ROUTE = "/ChatService/Chat"

#: What grpclib raises when the transport under a call goes away.
TRANSPORT_ERRORS = (
    StreamTerminatedError,
    ProtocolError,
    h2.exceptions.ProtocolError,
    OSError,
    EOFError,
)

#: Makes the channel of each new connection.
ChannelFactory = Callable[[], Channel]


@dataclass(slots=True, eq=False)
class Pending:
    """A request waiting for its answer on the Chat stream."""

    request_id: str
    is_turn: bool
    sent_at: float = field(default_factory=time.monotonic)
    #: Seconds from ``sent_at`` to the first chunk, once it came.
    first_chunk_after: float | None = None
    chunks: int = 0
    queue: asyncio.Queue[chatpb.ChatResponse | ChatError] = field(default_factory=asyncio.Queue)
    #: Its reply may go on on the next connection (the :class:`ReplyStream` resumes it), so
    #: a loss is not yet a failed reply.
    resumable: bool = False
    #: The loss that ended it was counted as a failed reply.
    failure_counted: bool = False
    #: Its events count in the client's statistics (not those a watch resumes).
    counted: bool = True


@dataclass(slots=True, eq=False)
class WatchSink:
    """Where the events of a watched session go (:class:`~chat.client.Watch`)."""

    session_id: str
    #: The connection whose stream was asked to WATCH; its loss is put in the queue.
    conn: Connection
    queue: asyncio.Queue[chatpb.ChatResponse | ChatError] = field(default_factory=asyncio.Queue)


@dataclass(slots=True, eq=False)
class _OwnChanges:
    """This client's own changes of one session, so that their echoes are not notices.

    The server tells every stream that follows a session about an ``UpdateSession`` or a
    ``DeleteSession``, the caller's own stream too, and the echo may come before or after
    the call's answer. While a change is in flight the session's updates are held; once it
    is answered, the update that matches its result is dropped and the others delivered.
    """

    in_flight: int = 0
    held: list[SessionUpdated] = field(default_factory=list)
    #: The echoes still to come: the kind, and the session's ``last_activity`` for updates.
    expected: list[tuple[SessionUpdateKind, datetime | None]] = field(default_factory=list)


#: Echoes remembered per session: an echo that never comes (the client's stream does not
#: follow the session) must not pile up.
_MAX_EXPECTED = 8

#: Turns of this client remembered, so that a watch can tell them from the others'.
_MAX_OWN_TURNS = 1024


@dataclass(slots=True, eq=False)
class Connection:
    """One channel and its Chat stream; replaced as a whole on reconnection."""

    channel: Channel
    stub: chatpb.ChatServiceStub
    stream: ClientStream[chatpb.ChatRequest, chatpb.ChatResponse]
    #: The stream's ``async with`` was entered and not yet left.
    stream_open: bool = True
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: dict[str, Pending] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    lost: ChatError | None = None
    closing: bool = False
    #: Closed by :meth:`Connector.disconnect`: its replies end with it, nothing resumes.
    closed_by_client: bool = False


class Connector:
    """Opens, watches and reopens the connection of one client; routes the stream's events."""

    def __init__(self, config: ClientConfig, channel_factory: ChannelFactory) -> None:
        self.config = config
        self._channel_factory = channel_factory
        #: The connection in use, or the lost one until it is replaced.
        self.current: Connection | None = None
        # Why the last connection ended, while the client should come back by itself.
        self._lost: ChatError | None = None
        self.ever_connected = False
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self.subscribers: set[asyncio.Queue[Notice]] = set()
        self.counters = Counters()
        self._rng = random.Random()
        self._own: dict[str, _OwnChanges] = {}
        #: The turn ids of this client's replies, oldest first (a dict as an ordered set).
        self.own_turns: dict[str, None] = {}
        #: The watches of each watched session.
        self.watches: dict[str, set[WatchSink]] = {}
        # This client's turns that are running, and their sessions: a server does not send
        # a stream's own turns to its watch, so a watch that begins mid-turn asks for them.
        self._running: dict[str, str] = {}
        #: The server started a reply without a turn id: it predates live sessions, so it
        #: can neither resume a turn nor recognise a message sent again.
        self.legacy_server = False

    def resumable(self, conn: Connection | None) -> bool:
        """Whether a reply cut by the loss of ``conn`` goes on on the next connection.

        Only with a :class:`ReconnectPolicy`, and not after :meth:`disconnect` or
        :meth:`aclose`: a client that closed its connection ended its replies with it.
        """
        return (
            self.config.reconnect is not None
            and not self._closed
            and conn is not None
            and not conn.closed_by_client
        )

    def remember_turn(self, turn_id: str) -> None:
        own = self.own_turns
        if turn_id in own:
            return
        own[turn_id] = None
        if len(own) > _MAX_OWN_TURNS:
            del own[next(iter(own))]

    def turn_ended(self, turn_id: str) -> None:
        """A turn of this client ended without its final event (the reply gave up)."""
        self._running.pop(turn_id, None)

    def running_turns(self, session_id: str) -> list[str]:
        """This client's turns of ``session_id`` that are running (as far as it knows)."""
        return [turn for turn, session in self._running.items() if session == session_id]

    def add_watch(self, sink: WatchSink) -> None:
        self.watches.setdefault(sink.session_id, set()).add(sink)

    def remove_watch(self, sink: WatchSink) -> None:
        sinks = self.watches.get(sink.session_id)
        if sinks is not None:
            sinks.discard(sink)
            if not sinks:
                del self.watches[sink.session_id]

    @property
    def connected(self) -> bool:
        return self.current is not None and self.current.lost is None

    @property
    def pending_requests(self) -> int:
        return 0 if self.current is None else len(self.current.pending)

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        async with self._connect_lock:
            if self.connected:
                return
            if self.ever_connected and self.config.reconnect is not None:
                await self._reconnect(self.config.reconnect)
            else:
                await self._open()

    async def disconnect(self) -> None:
        conn, self.current, self._lost = self.current, None, None
        if conn is not None:
            conn.closed_by_client = True
            await self._close_connection(conn, "the client disconnected")
            self.publish(ConnectionStateChanged(ConnectionState.CLOSED, self.config.target))

    async def aclose(self) -> None:
        self._closed = True
        await self.disconnect()
        self._running.clear()

    async def _open(self) -> Connection:
        """One attempt to open the channel and the Chat stream, checked with a PING."""
        config = self.config
        self.counters.connection_attempts += 1
        channel = self._channel_factory()
        send_trace_context(channel)
        if config.token is not None:
            keep_headers_out_of_logs()
            listen(channel, SendRequest, self._send_token)
        # The stream is entered and left by hand (not `async with`): it outlives this call,
        # and leaving it after a failure must see that failure (see _leave_stream).
        stream = await channel.request(
            _CHAT_ROUTE, Cardinality.STREAM_STREAM, chatpb.ChatRequest, chatpb.ChatResponse
        ).__aenter__()
        conn = Connection(
            channel=channel,
            stub=chatpb.ChatServiceStub(channel, timeout=config.timeout),
            stream=stream,
        )
        try:
            async with asyncio.timeout(config.connect_timeout):
                await stream.send_request()
                conn.reader = asyncio.create_task(self._read(conn))
                await self.ping_on(conn)
        except BaseException as error:
            await self._close_connection(conn, "connection attempt failed")
            if conn.lost is not None and not isinstance(conn.lost, ConnectionLost):
                # Refused (bad credentials, over a quota): trying again will not help.
                raise conn.lost from error
            if isinstance(error, TimeoutError | DeadlineExceeded):
                # Whichever ran out first: the connect timeout, or the PING's deadline.
                waited = min(config.connect_timeout, config.timeout)
                raise ConnectTimeout(config.target, f"no answer within {waited:g}s") from error
            if isinstance(error, ConnectionLost):
                raise ServerUnreachable(config.target, error.reason) from error
            if isinstance(error, TRANSPORT_ERRORS):
                raise ServerUnreachable(
                    config.target,
                    describe(error, tls=config.tls, client_cert=config.cert_file is not None),
                    refused=isinstance(error, ConnectionRefusedError),
                ) from error
            raise
        reconnected = self.ever_connected
        if reconnected:
            self.counters.reconnections += 1
        self.ever_connected = True
        previous, self.current, self._lost = self.current, conn, None
        if previous is not None:
            # The lost connection was kept until now so that `connected` stays False.
            await self._close_connection(previous, "replaced by a new connection")
        log.info("connected to %s", config.target)
        state = ConnectionState.RECONNECTED if reconnected else ConnectionState.CONNECTED
        self.publish(ConnectionStateChanged(state, config.target))
        return conn

    async def _reconnect(self, policy: ReconnectPolicy) -> Connection:
        target = self.config.target
        for attempt in range(1, policy.max_attempts + 1):
            delay = policy.delay(attempt, self._rng)
            reason = "" if self._lost is None else self._lost.message
            self.publish(
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
                    reason = f"{error.reason} (gave up after {attempt} attempts)"
                    if isinstance(error, ConnectTimeout):
                        raise ConnectTimeout(target, reason) from error
                    raise ServerUnreachable(target, reason, refused=error.refused) from error
        raise AssertionError("unreachable")  # the loop returns or raises

    async def ready(self) -> Connection:
        """The open connection; reconnect first if it was lost and the policy allows."""
        conn = self.current
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
            conn = self.current
            if conn is not None and conn.lost is None:
                return conn
            return await self._reconnect(policy)

    async def _close_connection(self, conn: Connection, reason: str) -> None:
        conn.closing = True
        if conn.lost is None:
            # RST_STREAM: the server cancels this stream's turns and keeps partial replies.
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await conn.stream.cancel()
        if conn.reader is not None:
            conn.reader.cancel()
            await asyncio.wait((conn.reader,))
        self._fail_pending(conn, ConnectionLost(self.config.target, reason))
        await _leave_stream(conn, None)
        conn.channel.close()

    # -- the Chat stream ---------------------------------------------------------------------

    async def _read(self, conn: Connection) -> None:
        target = self.config.target
        error: ChatError
        try:
            while (response := await conn.stream.recv_message()) is not None:
                if _convert.is_goaway(response):
                    await self._goaway(conn, response.status_message)
                else:
                    self._dispatch(conn, response)
            error = ConnectionLost(target, "the server closed the conversation")
        except GRPCError as failure:
            error = _refusal(failure) or ConnectionLost(target, _describe_status(failure))
        except TRANSPORT_ERRORS as failure:
            # The server may have sent a status (e.g. UNAVAILABLE on shutdown) before it reset
            # the stream; leaving the stream with the failure reads it.
            status = await _leave_stream(conn, failure)
            if status is not None and (refused := _refusal(status)) is not None:
                error = refused
            else:
                config = self.config
                reason = (
                    describe(failure, tls=config.tls, client_cert=config.cert_file is not None)
                    if status is None
                    else _describe_status(status)
                )
                error = ConnectionLost(target, reason)
        except Exception as failure:
            log.exception("the reader of the Chat stream failed")
            error = ConnectionLost(target, f"client error: {failure!r}")
        if conn.closing:
            return
        # Reported to callers and notice subscribers; no louder than info here.
        log.info("%s", error.message)
        self._connection_lost(conn, error)

    async def _send_token(self, event: SendRequest) -> None:
        token = self.config.token
        if token is not None:
            event.metadata["authorization"] = f"Bearer {token.reveal()}"

    async def _goaway(self, conn: Connection, message: str) -> None:
        """The server is shutting down: stop using this stream, and end our side of it.

        The server answered everything it had (it says goodbye once its queued turns are
        done) and ends the stream with OK once we end ours; reading goes on until then.
        """
        # Its own words: the server's status_message may be written for other clients.
        log.info("the server is shutting down: %s", message)
        self._connection_lost(
            conn, ConnectionLost(self.config.target, "the server is shutting down")
        )
        async with conn.send_lock:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await conn.stream.end()

    def _connection_lost(self, conn: Connection, error: ChatError) -> None:
        if conn.lost is not None:
            return
        conn.lost = error
        self._fail_pending(conn, error)
        if self.current is conn:
            self._lost = error
            self.publish(
                ConnectionStateChanged(ConnectionState.LOST, self.config.target, error.message)
            )

    def _fail_pending(self, conn: Connection, error: ChatError) -> None:
        resumable = self.resumable(conn)
        for pending in conn.pending.values():
            if pending.is_turn and not (pending.resumable and resumable):
                pending.failure_counted = True
                self.counters.replies_failed += 1
            pending.queue.put_nowait(error)
        conn.pending.clear()
        for sinks in self.watches.values():
            for sink in sinks:
                if sink.conn is conn:
                    sink.queue.put_nowait(error)

    def _dispatch(self, conn: Connection, response: chatpb.ChatResponse) -> None:
        kind = response.type
        pending = conn.pending.get(response.request_id) if response.request_id else None
        if kind == chatpb.ChatResponseType.RESPONSE_START and not response.turn_id:
            self.legacy_server = True
        if response.turn_id:
            if pending is not None and pending.is_turn:
                # Before the watches see it: a watch tells this client's turns by their ids.
                self.remember_turn(response.turn_id)
                if kind in _convert.TERMINAL:
                    self._running.pop(response.turn_id, None)
                elif response.turn_id not in self._running:
                    self._running[response.turn_id] = response.session_id
            if self.watches:
                self._to_watches(conn, response)
        elif kind == chatpb.ChatResponseType.SESSION_UPDATE and self.watches:
            self._to_watches(conn, response)
        if pending is None:
            notice = _convert.to_notice(response)
            if notice is None:
                log.debug("dropping %s for %r", kind, response.request_id)
            elif isinstance(notice, SessionUpdated):
                self._deliver_update(notice)
            else:
                self.publish(notice)
            return
        counters = self.counters
        if not pending.counted:
            if kind in _convert.TERMINAL:
                del conn.pending[response.request_id]
        elif kind == chatpb.ChatResponseType.CHUNK:
            counters.chunks_received += 1
            pending.chunks += 1
            if pending.first_chunk_after is None:
                pending.first_chunk_after = after = time.monotonic() - pending.sent_at
                counters.first_chunks += 1
                counters.first_chunk_time_total += after
        elif kind in _convert.TERMINAL:
            del conn.pending[response.request_id]
            if kind == chatpb.ChatResponseType.ERROR:
                counters.replies_failed += 1
            elif kind == chatpb.ChatResponseType.RESPONSE_COMPLETE:
                if response.finish_reason == chatpb.FinishReason.CANCELLED:
                    counters.replies_cancelled += 1
                else:
                    counters.replies_succeeded += 1
                    counters.succeeded_chunks += pending.chunks
                    counters.response_time_total += time.monotonic() - pending.sent_at
        pending.queue.put_nowait(response)

    def _to_watches(self, conn: Connection, response: chatpb.ChatResponse) -> None:
        for sink in self.watches.get(response.session_id, ()):
            if sink.conn is conn:
                sink.queue.put_nowait(response)

    def publish(self, notice: Notice) -> None:
        for queue in self.subscribers:
            queue.put_nowait(notice)

    def new_channel(self) -> Channel:
        """A channel of its own, for a call that needs no Chat stream (the caller closes it)."""
        return self._channel_factory()

    # -- this client's own changes -----------------------------------------------------------

    def begin_own_change(self, session_id: str) -> None:
        """This client is about to update or delete ``session_id``: hold its updates."""
        own = self._own.setdefault(session_id, _OwnChanges())
        own.in_flight += 1

    def end_own_change(
        self, session_id: str, echo: tuple[SessionUpdateKind, datetime | None] | None
    ) -> None:
        """The change is answered; ``echo`` is the update it makes (``None``: it failed)."""
        own = self._own[session_id]
        own.in_flight -= 1
        if echo is not None:
            own.expected = [*own.expected, echo][-_MAX_EXPECTED:]
        if own.in_flight:
            return
        held, own.held = own.held, []
        for notice in held:
            self._deliver_update(notice)
        if not own.expected and session_id in self._own:
            del self._own[session_id]

    def _deliver_update(self, notice: SessionUpdated) -> None:
        own = self._own.get(notice.session_id)
        if own is not None:
            if own.in_flight:
                own.held.append(notice)
                return
            stamp = None if notice.session is None else notice.session.last_activity
            for index, (kind, last_activity) in enumerate(own.expected):
                if kind is notice.kind and (
                    kind is SessionUpdateKind.SESSION_DELETED or last_activity == stamp
                ):
                    del own.expected[index]
                    if not own.expected:
                        del self._own[notice.session_id]
                    return
        self.publish(notice)

    # -- requests on the stream --------------------------------------------------------------

    async def submit(
        self, request: chatpb.ChatRequest, *, continues: Pending | None = None
    ) -> tuple[Connection, Pending]:
        """Send a request that expects answers; return where it went and its queue.

        ``continues``: the request of a reply cut by a lost connection, which this one (a
        RESUME, or the MESSAGE sent again) carries on; its timings go on.
        """
        kind = request.type
        pending = Pending(
            request.request_id,
            is_turn=kind
            in (
                chatpb.ChatRequestType.MESSAGE,
                chatpb.ChatRequestType.RETRY,
                chatpb.ChatRequestType.RESUME,
            ),
            resumable=kind == chatpb.ChatRequestType.RESUME
            or (kind == chatpb.ChatRequestType.MESSAGE and bool(request.client_message_id)),
        )
        if continues is not None:
            pending.sent_at = continues.sent_at
            pending.first_chunk_after = continues.first_chunk_after
            pending.chunks = continues.chunks
        if pending.is_turn and not request.traceparent:
            request.traceparent = current_traceparent()
        for _ in range(3):
            conn = await self.ready()
            conn.pending[request.request_id] = pending
            try:
                sent = await self.write(conn, request)
            except BaseException:
                conn.pending.pop(request.request_id, None)
                raise
            if sent:
                if pending.is_turn and continues is None:
                    self.counters.messages_sent += 1
                return conn, pending
            # The connection went away while this request waited to be written (the server
            # said goodbye): nothing was sent, so it can go out on the next connection.
            conn.pending.pop(request.request_id, None)
        raise ConnectionLost(self.config.target, "the server kept closing the connection")

    async def write(self, conn: Connection, request: chatpb.ChatRequest) -> bool:
        """Write ``request`` on ``conn``'s stream; ``False`` if the connection is gone."""
        request.timestamp = format_timestamp(utcnow())
        try:
            # grpclib writes a message in several frames; two writers must not interleave.
            async with conn.send_lock:
                if conn.lost is not None:
                    return False
                await conn.stream.send_message(request)
        except TRANSPORT_ERRORS as error:
            lost = ConnectionLost(self.config.target, describe(error))
            self._connection_lost(conn, lost)
            raise lost from error
        return True

    async def check_alive(self, conn: Connection) -> None:
        """PING ``conn``; without a PONG in time, declare it lost (failing its requests).

        A connection can die without a word: a stopped server that leaves the socket open,
        a network partition, a handler cancelled on the other side.
        """
        if conn.lost is not None:
            return
        try:
            await self.ping_on(conn)
        except DeadlineExceeded:
            waited = self.config.timeout
            reason = f"the server stopped answering (no answer to a ping within {waited:g}s)"
            self._connection_lost(conn, ConnectionLost(self.config.target, reason))
        except ChatError:
            pass  # lost meanwhile: its requests already have the error

    async def ping_on(self, conn: Connection) -> float:
        """Round-trip time of a PING on ``conn``, in seconds."""
        request_id = str(uuid.uuid4())
        pending = Pending(request_id, is_turn=False)
        conn.pending[request_id] = pending
        started = time.perf_counter()
        try:
            request = chatpb.ChatRequest(type=chatpb.ChatRequestType.PING, request_id=request_id)
            if not await self.write(conn, request):
                raise ConnectionLost(self.config.target, "the connection closed before the ping")
            async with asyncio.timeout(self.config.timeout):
                item = await pending.queue.get()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from {self.config.target} within {self.config.timeout:g}s"
            ) from None
        finally:
            conn.pending.pop(request_id, None)
        if isinstance(item, ChatError):
            raise item
        return time.perf_counter() - started


async def _leave_stream(conn: Connection, failure: BaseException | None) -> GRPCError | None:
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
    except TRANSPORT_ERRORS:
        pass
    return None


#: Statuses that end a stream because of who the client is, not because of the connection.
_REFUSALS = frozenset(
    {GrpcStatus.UNAUTHENTICATED, GrpcStatus.PERMISSION_DENIED, GrpcStatus.RESOURCE_EXHAUSTED}
)


def _refusal(error: GRPCError) -> ChatError | None:
    """The error of a stream the server refused to serve this client, else ``None``."""
    if error.status not in _REFUSALS:
        return None
    return _convert.error_from_grpc(error)


def _describe_status(error: GRPCError) -> str:
    # The status is for logs; the person reads what the server said.
    log.info("the Chat stream ended with %s", _convert.status_name(error.status.value))
    return f"the server closed the conversation: {error.message or 'no reason given'}"


def describe(error: BaseException, *, tls: bool | None = None, client_cert: bool = False) -> str:
    """A transport failure in words, for :class:`~chat.errors.ConnectionLost` and friends.

    ``tls`` says whether the client used TLS (``None``: unknown) and ``client_cert`` whether
    it offered a certificate, to tell a client that the server closed at once what it
    likely wants instead.
    """
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate is not trusted ({error.verify_message}): give the "
            "CA that signed it with --ca-file (ChatClient(ca_file=...))"
        )
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return "the TLS handshake failed: the server does not speak TLS (connect without --tls)"
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return (
                "the server refused the TLS connection: it requires a client certificate "
                "signed by its client CA (--cert FILE --key FILE)"
            )
        return f"the TLS handshake failed ({reason})"
    closed = isinstance(error, StreamTerminatedError | ConnectionResetError | EOFError)
    if closed and tls is False:
        return (
            "the server closed the connection without answering: if it serves TLS, connect "
            "with --tls (ChatClient(tls=True))"
        )
    if closed and tls and not client_cert:
        # With TLS 1.3 a server's refusal of a missing certificate arrives after the
        # handshake, as a closed connection.
        return (
            "the server closed the TLS connection without answering: it may require a "
            "client certificate signed by its client CA (--cert FILE --key FILE)"
        )
    if closed and tls:
        return (
            "the server closed the TLS connection without answering: it may not accept "
            "this client certificate (is it signed by the server's client CA?)"
        )
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__

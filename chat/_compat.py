"""Everything grpc-chat takes from grpclib's private API, in one room.

grpclib is pinned to :data:`GRPCLIB_SUPPORTED` (``pyproject.toml`` says the same, and
``tests/test_compat.py`` checks both, and every attribute listed in :data:`RELIED_ON`, with a
message that names what changed). Nothing outside this module touches a grpclib name that
starts with an underscore.

What is used, and why:

- :func:`send_batch`: several serialized messages in one HTTP/2 write (the public
  ``Stream.send_message`` costs one DATA frame and one socket write per message);
- :class:`HookedServer`: wraps each connection's asyncio protocol (grpclib builds it in the
  private ``Server._protocol_factory``), so that writes can be corked and connections closed;
  keeps each request's HTTP/2 headers on its stream (grpclib reads them, then drops them),
  adds headers of ours to each response (``grpc-accept-encoding``, which grpclib's
  metadata API refuses: it is a reserved ``grpc-`` name), and unlinks a finished stream from
  its ``Wrapper`` (else a call ended by its client stays in a reference cycle);
- the receiving end of a server stream (:func:`read_prefix`, :func:`read_body`,
  :func:`delivered`, :func:`replace_receiver`): ``Stream.recv_message`` reads a whole
  message before anything can look at its length, and answers compression, truncation and
  decoding errors with UNKNOWN; :mod:`chat._receive` reads the prefix first instead;
- :func:`listening_port`: the port the kernel chose for port 0 (the asyncio server is
  private);
- :func:`message_counts`: the messages a server stream received and sent (metrics);
- :func:`server_configuration`: HTTP/2 keepalive (grpclib's ``Configuration`` marks its
  keepalive fields private);
- :func:`open_streams` and :func:`send_goaway`: retiring a connection past its maximum age;
- :func:`demote_client_gone_logs`: grpclib logs every client that goes away at INFO;
- reflection: the v1alpha service (a private module), the hook that builds file-descriptor
  responses, and how grpclib names a service;
- in-memory connections (tests, embedding): :class:`ConnectorChannel` makes a channel's
  connections without a socket, :func:`accept_protocol` a server's side of one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, cast

import grpclib
import grpclib.protocol
import grpclib.server
import grpclib.utils
from grpclib._typing import IServable
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.events import _DispatchServerEvents
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import Connection, H2Protocol
from grpclib.reflection import _deprecated as reflection_v1alpha
from grpclib.reflection import service as reflection_v1
from grpclib.utils import _service_name

if TYPE_CHECKING:
    from grpclib.server import Stream

__all__ = [
    "GRPCLIB_SUPPORTED",
    "RELIED_ON",
    "ConnectorChannel",
    "HookedServer",
    "IServable",
    "IncompleteMessage",
    "ReflectionV1",
    "ReflectionV1Alpha",
    "accept_protocol",
    "delivered",
    "demote_client_gone_logs",
    "listening_port",
    "message_counts",
    "open_streams",
    "read_body",
    "read_prefix",
    "replace_receiver",
    "request_headers",
    "restore_receiver",
    "send_batch",
    "send_goaway",
    "server_configuration",
    "service_name",
]

#: The grpclib releases this module is written for: ``(major, minor)``, any patch release.
GRPCLIB_SUPPORTED = (0, 4)

#: Each private attribute relied on, by the object that has it (checked by a test).
RELIED_ON: dict[str, tuple[object, tuple[str, ...]]] = {
    "grpclib.server.Stream": (
        grpclib.server.Stream,
        (
            "_send_initial_metadata_done",
            "_send_message_done",
            "_messages_sent",
            "_messages_received",
            "_stream",
            "_dispatch",
        ),
    ),
    "grpclib.server.Server": (grpclib.server.Server, ("_protocol_factory", "_server")),
    # Not private, but set by grpclib only on client streams: the server's are given the
    # request's headers here. The handler's accept() is where grpclib hands them over.
    "grpclib.protocol.Stream": (
        grpclib.protocol.Stream,
        ("headers", "recv_data", "send_headers", "connection", "wrapper"),
    ),
    "grpclib.protocol.Buffer": (grpclib.protocol.Buffer, ("read",)),
    "grpclib.protocol.H2Protocol": (H2Protocol, ("handler",)),
    "grpclib.utils.Wrapper": (grpclib.utils.Wrapper, ("_error",)),
    "grpclib.server.Handler": (grpclib.server.Handler, ("accept",)),
    "grpclib.events._DispatchServerEvents": (_DispatchServerEvents, ("recv_message",)),
    "grpclib.client.Channel": (Channel, ("_protocol_factory", "_create_connection")),
    "grpclib.config.Configuration": (
        Configuration,
        (
            "_keepalive_time",
            "_keepalive_timeout",
            "_keepalive_permit_without_calls",
            "_http2_max_pings_without_data",
            "_http2_min_sent_ping_interval_without_data",
        ),
    ),
    "grpclib.protocol.Connection": (Connection, ("_connection",)),
    "grpclib.reflection.service.ServerReflection": (
        reflection_v1.ServerReflection,
        ("_file_descriptor_response",),
    ),
}


def grpclib_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed grpclib."""
    major, minor, *_ = grpclib.__version__.split(".")
    return int(major), int(minor)


def _dispatch_is_plain(stream: Stream[Any, Any]) -> bool:
    # grpclib replaces Stream._dispatch.send_message when a SendMessage listener is added:
    # then every message must go through it, one by one.
    return "send_message" in vars(stream._dispatch)


async def send_batch(stream: Stream[Any, Any], payloads: Sequence[bytes]) -> bool:
    """Send serialized messages on a server stream in one HTTP/2 write; ``False`` if not done.

    The gRPC framing (a flag byte and a 4-byte length before each message) does not care how
    messages are split into DATA frames, so a batch goes out as one write and the client reads
    the same messages. Does nothing and returns ``False`` when a ``SendMessage`` listener must
    see each message: the caller then sends them one by one.
    """
    if not _dispatch_is_plain(stream):
        return False
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    data = b"".join([b"\x00" + len(p).to_bytes(4, "big") + p for p in payloads])
    h2_stream = stream._stream
    await h2_stream.send_data(data)
    # What Stream.send_message records after each message.
    count = len(payloads)
    stream._send_message_done = True
    stream._messages_sent += count
    h2_stream.connection.messages_sent += count
    h2_stream.connection.last_message_sent = time.monotonic()
    return True


def message_counts(stream: Stream[Any, Any]) -> tuple[int, int]:
    """Messages received and sent on a server stream so far (what grpclib counts).

    Read instead of counted by ``RecvMessage``/``SendMessage`` listeners: a ``SendMessage``
    listener would make :func:`send_batch` send one message at a time.
    """
    return stream._messages_received, stream._messages_sent


def server_configuration(
    *, keepalive_time: float | None, keepalive_timeout: float
) -> Configuration:
    """grpclib's server configuration with HTTP/2 keepalive PINGs every ``keepalive_time``
    seconds on connections with open streams (``None``: no PINGs); a PING unanswered within
    ``keepalive_timeout`` seconds closes the connection.

    grpclib would stop after two PINGs without data sent in between, and send at most one
    every 5 minutes: a reply the model thinks about for minutes sends no data, and that is
    when PINGs matter, so both limits are lifted.
    """
    if keepalive_time is None:
        return Configuration(_keepalive_time=None)
    return Configuration(
        _keepalive_time=keepalive_time,
        _keepalive_timeout=keepalive_timeout,
        _keepalive_permit_without_calls=False,
        _http2_max_pings_without_data=0,
        _http2_min_sent_ping_interval_without_data=keepalive_time,
    )


def open_streams(protocol: asyncio.Protocol) -> int:
    """Streams open on a server connection (grpclib's protocol for it)."""
    processor = getattr(protocol, "processor", None)
    streams = getattr(processor, "streams", None)
    return len(streams) if streams is not None else 0


def send_goaway(protocol: asyncio.Protocol) -> None:
    """Send HTTP/2 GOAWAY (no error) on a server connection: no new streams on it.

    The connection is closed right after by the caller: hyper-h2 sends nothing more on a
    connection once it said GOAWAY, and grpclib's clients end their open streams on it.
    """
    connection = getattr(protocol, "connection", None)
    if not isinstance(connection, Connection) or connection.is_closing():
        return
    connection._connection.close_connection()
    connection.flush()


class _ClientGoneFilter(logging.Filter):
    """grpclib's "Request was cancelled: ..." (a client that went away) at DEBUG, not INFO.

    The record is recognised by its argument, the :class:`StreamTerminatedError`, not by
    its wording.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.levelno == logging.INFO and any(
            isinstance(arg, StreamTerminatedError) for arg in args
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def demote_client_gone_logs() -> None:
    """Log the clients that go away (grpclib: at INFO, one line each) at DEBUG."""
    logger = logging.getLogger(grpclib.server.__name__)
    if not any(isinstance(f, _ClientGoneFilter) for f in logger.filters):
        logger.addFilter(_ClientGoneFilter())


class HookedServer(grpclib.server.Server):
    """A grpclib server whose connections' protocols pass through ``wrap_protocol``.

    ``wrap_protocol(inner)`` returns the asyncio protocol to use in place of grpclib's own
    ``inner`` (which it must drive). Each request's headers are kept on its stream
    (:func:`request_headers`), and ``response_headers`` are added to the first HEADERS
    frame of every response (the initial metadata, or a trailers-only answer).
    """

    def __init__(
        self,
        handlers: Collection[IServable],
        *,
        wrap_protocol: Callable[[asyncio.Protocol], asyncio.Protocol],
        response_headers: Sequence[tuple[str, str]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(handlers, **kwargs)
        self._wrap_protocol = wrap_protocol
        self._response_headers = tuple(response_headers)

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        _keep_request_headers(protocol.handler, self._response_headers)
        return self._wrap_protocol(cast(asyncio.Protocol, protocol))

    async def start_on(
        self, hosts: Sequence[str], port: int, *, ssl: SSLContext | None = None
    ) -> None:
        """Listen on every address of ``hosts``, all on ``port`` (over TLS with ``ssl``).

        ``Server.start`` passes ``host`` on to ``loop.create_server``, which takes a list of
        hosts too (grpclib's annotation says ``str``).
        """
        host = cast(Any, list(hosts)) if len(hosts) > 1 else hosts[0]
        await self.start(host, port, ssl=ssl)


def _keep_request_headers(handler: Any, response_headers: tuple[tuple[str, str], ...]) -> None:
    accept = handler.accept

    def accept_keeping_headers(
        stream: grpclib.protocol.Stream, headers: Any, release_stream: Any
    ) -> None:
        stream.headers = headers
        if response_headers:
            _add_response_headers(stream, response_headers)

        def release() -> None:
            try:
                release_stream()
            finally:
                # A call its client ended early leaves the error in the stream's Wrapper,
                # whose traceback holds grpclib's handler frame, which holds the Wrapper and
                # the stream: a cycle that keeps the whole call (and its Conversation) until
                # the cyclic collector runs. The call is over here: drop the error and the
                # link, and our send_headers (a closure over the stream's own method).
                wrapper = stream.wrapper
                if wrapper is not None:
                    wrapper._error = None
                stream.wrapper = None
                vars(stream).pop("send_headers", None)

        accept(stream, headers, release)

    handler.accept = accept_keeping_headers


def _add_response_headers(
    stream: grpclib.protocol.Stream, extra: tuple[tuple[str, str], ...]
) -> None:
    send_headers = stream.send_headers

    async def send_headers_with_ours(headers: Any, end_stream: bool = False) -> None:
        # Only the response's own headers (they carry :status), not the trailers after it.
        if headers and headers[0][0] == ":status":
            headers = [*headers, *extra]
        await send_headers(headers, end_stream=end_stream)

    stream.send_headers = send_headers_with_ours  # type: ignore[method-assign]


def request_headers(stream: Stream[Any, Any]) -> Sequence[tuple[str, str]]:
    """The HTTP/2 headers of the request (empty on a server that is not a HookedServer)."""
    return cast(Sequence[tuple[str, str]], stream._stream.headers or ())


class IncompleteMessage(Exception):
    """The request ended (half-closed) in the middle of a message."""


async def read_prefix(stream: Stream[Any, Any]) -> tuple[bool, int] | None:
    """The next message's prefix: ``(compressed, length)``; ``None`` at the end of the request.

    Nothing of the message itself is read, so a length can be refused before its bytes are
    buffered.
    """
    meta = await _read(stream, 5)
    if not meta:
        return None
    compressed, length = struct.unpack(">?I", meta)
    return bool(compressed), int(length)


async def read_body(stream: Stream[Any, Any], length: int) -> bytes:
    """The ``length`` bytes of the message whose prefix was just read."""
    return await _read(stream, length)


async def _read(stream: Stream[Any, Any], size: int) -> bytes:
    try:
        return await stream._stream.recv_data(size)
    except AssertionError:
        # grpclib's Buffer.read asserts that the request did not end before ``size`` bytes.
        raise IncompleteMessage from None


async def delivered(stream: Stream[Any, Any], message: Any) -> Any:
    """Do what ``Stream.recv_message`` does with a message it received; the message to use
    (a ``RecvMessage`` listener may replace it)."""
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    connection = stream._stream.connection
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    return message


def replace_receiver(
    stream: Stream[Any, Any], receive: Callable[[], Awaitable[Any | None]]
) -> None:
    """Make ``stream.recv_message()`` (and ``async for`` over the stream) call ``receive``,
    also in handlers that are not ours (health, reflection)."""
    stream.recv_message = receive  # type: ignore[method-assign,assignment]


def restore_receiver(stream: Stream[Any, Any]) -> None:
    """Undo :func:`replace_receiver` (the receiver refers to the stream: a cycle otherwise)."""
    vars(stream).pop("recv_message", None)


def listening_port(server: grpclib.server.Server) -> int:
    """The TCP port ``server`` listens on (what the kernel chose for port 0)."""
    listener = cast(asyncio.Server | None, server._server)
    sockets = listener.sockets if listener is not None else ()
    if not sockets:
        raise RuntimeError("the server has no listening socket")
    return int(sockets[0].getsockname()[1])


def accept_protocol(server: grpclib.server.Server) -> asyncio.Protocol:
    """The protocol ``server`` makes for a connection it accepts (``ConnectionRefusedError``
    when it is not listening), to be driven by a transport of the caller's."""
    listener = cast(asyncio.Server | None, server._server)
    if listener is None or not listener.is_serving():
        raise ConnectionRefusedError("the server is not listening")
    return cast(asyncio.Protocol, server._protocol_factory())


class ConnectorChannel(Channel):
    """A grpclib channel whose connections are made by ``connect`` instead of a socket.

    ``connect(protocol)`` must give ``protocol`` (grpclib's, for the new connection) a
    transport, calling its ``connection_made``.
    """

    def __init__(self, connect: Callable[[H2Protocol], None], **kwargs: Any) -> None:
        super().__init__("in-memory", 1, **kwargs)
        self._connect = connect

    async def _create_connection(self) -> H2Protocol:
        # Channel.__connect__ calls this for each new connection; the default opens a socket.
        protocol = self._protocol_factory()
        self._connect(protocol)
        return protocol


def service_name(service: IServable) -> str:
    """The full name of the gRPC service ``service`` serves, as grpclib derives it."""
    return _service_name(service)


class _Documented:
    """Replaces the bytes of documented files in file-descriptor responses."""

    _documented: dict[str, bytes]

    def _file_descriptor_response(self, file_descriptor: Any) -> Any:
        response = super()._file_descriptor_response(file_descriptor)  # type: ignore[misc]
        documented = self._documented.get(file_descriptor.name)
        if documented is not None:
            protos = response.file_descriptor_response.file_descriptor_proto
            del protos[:]
            protos.append(documented)
        return response


class ReflectionV1(_Documented, reflection_v1.ServerReflection):
    """Reflection v1 over ``pool``, answering with ``documented`` files where it has them."""

    def __init__(self, names: Collection[str], pool: Any, documented: dict[str, bytes]) -> None:
        super().__init__(_service_names=names, _pool=pool)
        self._documented = documented


class ReflectionV1Alpha(_Documented, reflection_v1alpha.ServerReflection):
    """The same for reflection v1alpha (older clients, grpcio's reflection client)."""

    def __init__(self, names: Collection[str], pool: Any, documented: dict[str, bytes]) -> None:
        super().__init__(_service_names=names, _pool=pool)
        self._documented = documented

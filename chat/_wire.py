"""A fast protobuf encoder for ``ChatResponse``, the one message the server sends by the million.

Building a betterproto2 ``ChatResponse`` and serializing it costs tens of microseconds per
event (``bytes(message)`` walks every field through dataclass machinery); this module writes
the same bytes straight from an :class:`~chat.events.Event` in a few. The output is exactly
what protobuf's own encoder writes for the message :func:`chat.service.event_to_response`
builds (fields in number order, defaults left out), which a property test checks against
``google.protobuf``. The service hands them to grpclib as :class:`EncodedResponse`; the
betterproto2 classes stay the public types.

Wire format reminders: a field is ``tag = number << 3 | wire_type`` as a varint, then the
value: varint (type 0) for int32 and enums, 8 little-endian bytes (type 1) for doubles, a
varint length and the bytes (type 2) for strings and nested messages. Negative int32 values
are sign-extended to 64 bits (10 bytes), as protobuf does.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import grpclib.server

if TYPE_CHECKING:
    from grpclib.server import Stream
from datetime import UTC, datetime

from chat.events import Event
from chat.types import Session, Usage, format_timestamp

__all__ = ["CorkingServer", "EncodedResponse", "WireClock", "encode_response", "send_encoded"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_pack_double = struct.Struct("<d").pack
#: One-byte varints, the common case for lengths and small numbers.
_SMALL = [bytes((i,)) for i in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL[value]
    value &= 0xFFFF_FFFF_FFFF_FFFF  # negative numbers: 64-bit two's complement, like protobuf
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int32(tag: bytes, value: int) -> bytes:
    if not _INT32_MIN <= value <= _INT32_MAX:
        # betterproto2 would silently truncate; protobuf refuses. So do we.
        raise ValueError(f"{value} does not fit in an int32 field")
    return tag + _varint(value)


def _string(tag: bytes, value: str) -> bytes:
    data = value.encode()
    return tag + _varint(len(data)) + data


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


# ChatResponse tags, by field number.
_TYPE, _SESSION_ID, _STATUS_MESSAGE, _CONTEXT_MESSAGES = (
    _tag(1, 0),
    _tag(2, 2),
    _tag(3, 2),
    _tag(4, 0),
)
_CHUNK_TEXT, _CHUNK_NUMBER, _TOTAL_CHUNKS, _PROCESSING_TIME = (
    _tag(5, 2),
    _tag(6, 0),
    _tag(7, 0),
    _tag(8, 1),
)
_MESSAGE_COUNT, _ERROR_MESSAGE, _TIMESTAMP, _REQUEST_ID = (
    _tag(9, 0),
    _tag(10, 2),
    _tag(11, 2),
    _tag(12, 2),
)
_FINISH_REASON, _USAGE, _MODEL, _ERROR_CODE = _tag(13, 0), _tag(14, 2), _tag(15, 2), _tag(16, 0)
_OMITTED_MESSAGES, _RETRY_AFTER, _SESSION = _tag(17, 0), _tag(18, 1), _tag(19, 2)
# TokenUsage and SessionInfo tags.
_U_PROMPT, _U_COMPLETION, _U_TOTAL = _tag(1, 0), _tag(2, 0), _tag(3, 0)
_S_ID, _S_TITLE, _S_MODEL, _S_COUNT = _tag(1, 2), _tag(2, 2), _tag(3, 2), _tag(4, 0)
_S_CREATED, _S_ACTIVITY, _S_PROMPT, _S_POLICY = _tag(5, 2), _tag(6, 2), _tag(7, 2), _tag(8, 0)


def _usage(usage: Usage) -> bytes:
    parts = []
    if usage.prompt_tokens:
        parts.append(_int32(_U_PROMPT, usage.prompt_tokens))
    if usage.completion_tokens:
        parts.append(_int32(_U_COMPLETION, usage.completion_tokens))
    if usage.total_tokens:
        parts.append(_int32(_U_TOTAL, usage.total_tokens))
    return b"".join(parts)


def _session(session: Session) -> bytes:
    """``SessionInfo`` as :func:`chat.service.session_to_message` builds it (no history)."""
    parts = []
    if session.session_id:
        parts.append(_string(_S_ID, session.session_id))
    if session.title:
        parts.append(_string(_S_TITLE, session.title))
    if session.model:
        parts.append(_string(_S_MODEL, session.model))
    if session.message_count:
        parts.append(_int32(_S_COUNT, session.message_count))
    parts.append(_string(_S_CREATED, format_timestamp(session.created_at)))
    parts.append(_string(_S_ACTIVITY, format_timestamp(session.last_activity)))
    if session.system_prompt:
        parts.append(_string(_S_PROMPT, session.system_prompt))
    if session.context_policy:
        parts.append(_int32(_S_POLICY, int(session.context_policy)))
    return b"".join(parts)


def _nested(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


def encode_response(event: Event, timestamp: str) -> bytes:
    """The serialized ``ChatResponse`` for ``event``, identical to protobuf's encoding of
    ``event_to_response(event, timestamp)``.

    >>> from chat.events import EventKind
    >>> encode_response(Event(EventKind.CHUNK, chunk_text="hi", chunk_number=1), "")
    b'\\x08\\x02*\\x02hi0\\x01'
    """
    # The fields in number order, each only when event_to_response sets it to a value
    # other than its default (proto3 leaves defaults off the wire).
    parts = []
    if event.kind:
        parts.append(_TYPE + _SMALL[event.kind])
    if event.session_id:
        parts.append(_string(_SESSION_ID, event.session_id))
    if event.status_message:
        parts.append(_string(_STATUS_MESSAGE, event.status_message))
    if event.context_messages:
        parts.append(_int32(_CONTEXT_MESSAGES, event.context_messages))
    if event.chunk_text:
        parts.append(_string(_CHUNK_TEXT, event.chunk_text))
    if event.chunk_number:
        parts.append(_int32(_CHUNK_NUMBER, event.chunk_number))
    if event.total_chunks:
        parts.append(_int32(_TOTAL_CHUNKS, event.total_chunks))
    if event.processing_time:
        parts.append(_PROCESSING_TIME + _pack_double(event.processing_time))
    if event.message_count:
        parts.append(_int32(_MESSAGE_COUNT, event.message_count))
    if event.error_message:
        parts.append(_string(_ERROR_MESSAGE, event.error_message))
    if timestamp:
        parts.append(_string(_TIMESTAMP, timestamp))
    if event.request_id:
        parts.append(_string(_REQUEST_ID, event.request_id))
    if event.finish_reason:
        parts.append(_int32(_FINISH_REASON, int(event.finish_reason)))
    if event.usage is not None:
        parts.append(_nested(_USAGE, _usage(event.usage)))
    if event.model:
        parts.append(_string(_MODEL, event.model))
    if event.error_code:
        parts.append(_int32(_ERROR_CODE, event.error_code))
    if event.omitted_messages:
        parts.append(_int32(_OMITTED_MESSAGES, event.omitted_messages))
    if event.retry_after:
        parts.append(_RETRY_AFTER + _pack_double(event.retry_after))
    if event.session is not None:
        parts.append(_nested(_SESSION, _session(event.session)))
    return b"".join(parts)


class EncodedResponse(bytes):
    """A serialized ``ChatResponse``, sendable wherever grpclib expects a message object.

    grpclib's protobuf codec checks the message type declared by the handler and calls
    ``SerializeToString()``; the Chat handler declares this type, so the bytes go out as
    they are, with every codec and in ``grpclib.testing.ChannelFor`` alike.
    """

    __slots__ = ()

    def SerializeToString(self) -> bytes:
        return self

    @classmethod
    def FromString(cls, data: bytes) -> EncodedResponse:
        return cls(data)


#: grpclib 0.4 server-stream internals that :func:`send_encoded` relies on (checked once).
_BATCHING = all(
    hasattr(grpclib.server.Stream, name)
    for name in ("_send_initial_metadata_done", "_send_message_done", "_messages_sent")
)


async def send_encoded(stream: Stream[Any, EncodedResponse], payloads: Sequence[bytes]) -> None:
    """Send serialized messages on a server stream, several in one HTTP/2 write.

    ``stream.send_message`` costs one h2 DATA frame and one socket write per message, which
    is most of the cost of a chunk once it is encoded. The gRPC framing (a flag byte and a
    4-byte length before each message) does not care how messages are split into DATA
    frames, so a batch goes out as one write: the client reads the same messages.

    This uses grpclib's stream internals (pinned to 0.4); where they are missing, or where
    a ``SendMessage`` event listener must see each message, it sends one by one.
    """
    dispatch_free = "send_message" in vars(stream._dispatch)  # no listener was added
    if len(payloads) == 1 or not (_BATCHING and dispatch_free):
        for payload in payloads:
            await stream.send_message(EncodedResponse(payload))
        return
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


#: Writes held at most before a corked transport sends them anyway.
_CORK_WRITES = 8


class _CorkedTransport:
    """An asyncio transport whose writes within one event-loop pass leave in one send.

    grpclib writes every HTTP/2 frame to the transport at once, and asyncio sends each write
    straight to the socket: one system call per frame, which on loopback also runs the
    receiver's side of TCP. Many streams share a connection, and in one pass of the loop
    several of them write; holding the writes until the end of the pass (``call_soon``)
    sends them together, without delaying any write past the pass it was made in.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._flush)
        pending.append(data)
        if len(pending) >= _CORK_WRITES:
            # Bound the wait: under load a loop pass is long, and a write held to its end
            # shows in every latency (measured: PING p99 under a 100-stream load 38 ms
            # without corking, 62 ms corking whole passes).
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CorkingProtocol(asyncio.Protocol):
    """grpclib's protocol, given a :class:`_CorkedTransport` instead of the real one."""

    def __init__(self, inner: asyncio.Protocol, connections: set[_CorkedTransport]) -> None:
        self._inner = inner
        self._connections = connections
        self._corked: _CorkedTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        corked = self._corked = _CorkedTransport(cast(asyncio.Transport, transport))
        self._connections.add(corked)
        self._inner.connection_made(cast(asyncio.Transport, corked))

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._corked is not None:
            self._connections.discard(self._corked)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class CorkingServer(grpclib.server.Server):
    """A grpclib server whose connections send the writes of one loop pass together.

    It also knows its open connections, so that :meth:`close_connections` can end them:
    grpclib's ``close()`` stops listening and cancels the handlers but leaves connections
    open, so the clients of a server stopped in its process would wait forever (and could
    still start calls on it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[_CorkedTransport] = set()

    def _protocol_factory(self) -> Any:
        # grpclib 0.4 builds each connection's protocol here (pinned below 0.5).
        return _CorkingProtocol(super()._protocol_factory(), self._connections)

    def close_connections(self) -> int:
        """Close every connection still open (after ``close()``); return how many."""
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        return len(connections)


class WireClock:
    """Event timestamps, exactly as ``format_timestamp(utcnow())`` writes them, but cheaper.

    Formatting a datetime costs more than encoding a chunk; the date and time up to the
    second change once a second, so they are formatted once and the microseconds appended.

    >>> WireClock().format_micros(1_795_181_612_000_005)
    '2026-11-20T13:33:32.000005Z'
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        return self.format_micros(time.time_ns() // 1000)

    def format_micros(self, micros: int) -> str:
        """The timestamp of ``micros`` microseconds since the Unix epoch."""
        second, micro = divmod(micros, 1_000_000)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        return f"{self._prefix}{micro:06d}Z"

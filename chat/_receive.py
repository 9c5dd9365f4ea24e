"""Receiving request messages: the length first, then decompression, decoding and ranges.

grpclib's ``Stream.recv_message`` reads a whole message into memory before anything can look
at its length, refuses compressed messages, and lets decoding errors escape as UNKNOWN with
a traceback in the log. Every service of a :class:`~chat.ChatServer` (chat, health,
reflection) is served through :func:`guarded`, whose receiver, for each message:

1. reads the 5-byte prefix and refuses a length over ``max_receive_bytes`` with
   RESOURCE_EXHAUSTED before one byte of the body is buffered;
2. inflates a compressed message (``grpc-encoding`` gzip or deflate, as grpcio clients send
   them), never past ``max_receive_bytes``; another encoding is UNIMPLEMENTED (every
   response says what is accepted in ``grpc-accept-encoding``);
3. decodes it with protobuf (upb) and checks that every 32-bit number was sent as one:
   protobuf parsers silently truncate a 64-bit varint in an int32 field (``page_size`` of
   -2^63 would read as 0);
4. for a unary call, checks that the request ends after its one message.

A refusal is a documented status with a message of ours (never an exception's text), logged
once per call in one WARNING line. A message that is well framed but does not decode raises
:class:`MalformedMessage`: the Chat stream answers it with an ERROR event and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import grpclib.const
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from grpclib import GRPCError
from grpclib.const import Status

from chat._compat import (
    IncompleteMessage,
    IServable,
    delivered,
    read_body,
    read_prefix,
    replace_receiver,
    request_headers,
    restore_receiver,
)
from chat._status import grpc_error
from chat.errors import InvalidArgument, excerpt

if TYPE_CHECKING:
    from grpclib.server import Stream

__all__ = ["ACCEPT_ENCODING", "ENCODINGS", "MalformedMessage", "guarded"]

log = logging.getLogger(__name__)

#: Message encodings the server decodes, and the zlib window bits of each.
ENCODINGS: dict[str, int] = {"identity": 0, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: The ``grpc-accept-encoding`` header every response carries.
ACCEPT_ENCODING = ("grpc-accept-encoding", ",".join(ENCODINGS))

#: Seconds a unary request may stay open after its message before it is refused: clients
#: end it with the message (or right after), so only a broken or hostile one waits here.
END_OF_REQUEST_WAIT = 5.0


class MalformedMessage(GRPCError):
    """A request message, correctly framed, that is not a valid message of its type.

    ``error`` says what is wrong (an :class:`~chat.errors.InvalidArgument`); the call's
    framing is intact, so a stream may go on with its next message.
    """

    def __init__(self, error: InvalidArgument) -> None:
        refused = grpc_error(error)
        super().__init__(refused.status, refused.message, refused.details)
        self.error = error


def guarded(services: Collection[IServable], *, max_receive_bytes: int) -> list[IServable]:
    """``services`` with every request message received by the checks of this module."""
    return [_Guarded(service, max_receive_bytes) for service in services]


class _Guarded:
    def __init__(self, service: IServable, max_receive_bytes: int) -> None:
        self._service = service
        self._max_bytes = max_receive_bytes

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            route: handler._replace(func=self._receiving(route, handler))
            for route, handler in self._service.__mapping__().items()
        }

    def _receiving(
        self, route: str, handler: grpclib.const.Handler
    ) -> Callable[[Stream[Any, Any]], Any]:
        func = handler.func
        unary = not handler.cardinality.client_streaming
        message_type = handler.request_type
        max_bytes = self._max_bytes

        async def serve(stream: Stream[Any, Any], **context: Any) -> None:
            # ``context``: what RecvRequest listeners pass on (the caller's credentials).
            receiver = _Receiver(stream, route, message_type, unary=unary, max_bytes=max_bytes)
            replace_receiver(stream, receiver)
            try:
                await func(stream, **context)
            finally:
                # Stream and receiver refer to each other: without this, every call would
                # be garbage for the cyclic collector (rare in chat-server) to find.
                restore_receiver(stream)

        return serve


class _Receiver:
    """``recv_message`` of one call."""

    def __init__(
        self,
        stream: Stream[Any, Any],
        route: str,
        message_type: Any,
        *,
        unary: bool,
        max_bytes: int,
    ) -> None:
        self._stream = stream
        self._route = route
        self._type = message_type
        self._unary = unary
        self._max_bytes = max_bytes
        self._done = False
        self._logged = False
        self._encoding: str | None = None

    async def __call__(self) -> Any | None:
        if self._done:
            return None
        message = await self._next()
        if message is None:
            self._done = True
            return None
        if self._unary:
            self._done = True
            await self._expect_end()
        return await delivered(self._stream, message)

    async def _expect_end(self) -> None:
        try:
            async with asyncio.timeout(END_OF_REQUEST_WAIT):
                more = await read_prefix(self._stream)
        except TimeoutError:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                f"the request was not ended within {END_OF_REQUEST_WAIT:g}s of its message",
            ) from None
        except IncompleteMessage:
            more = (False, 0)
        if more is not None:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                "a unary call carries exactly one request message; this one has more",
            )

    async def _next(self) -> Any | None:
        stream = self._stream
        try:
            prefix = await read_prefix(stream)
        except IncompleteMessage:
            raise self._refuse(
                Status.INVALID_ARGUMENT, "the request ended inside a message prefix"
            ) from None
        if prefix is None:
            return None
        compressed, length = prefix
        limit = self._max_bytes
        if length > limit:
            raise self._too_large(length)
        if compressed:
            encoding = self._request_encoding()
            if encoding == "identity":
                raise self._refuse(
                    Status.INVALID_ARGUMENT,
                    "the message is flagged as compressed but the call names no grpc-encoding",
                )
            if encoding not in ENCODINGS:
                raise self._refuse(
                    Status.UNIMPLEMENTED,
                    f"grpc-encoding {excerpt(encoding, 32)} is not supported; "
                    f"this server accepts {ACCEPT_ENCODING[1]}",
                )
        try:
            body = await read_body(stream, length)
        except IncompleteMessage:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                f"the request ended inside a message (its prefix announced {length} bytes)",
            ) from None
        if compressed:
            body = self._inflate(body, ENCODINGS[self._request_encoding()])
        try:
            message = self._type.FromString(body)
        except DecodeError as error:
            raise self._malformed(
                InvalidArgument("", f"the request is not a valid {self._type_name} message"),
                detail=str(error),
            ) from None
        field = out_of_range(self._type.DESCRIPTOR, body)
        if field is not None:
            raise self._malformed(
                InvalidArgument(field, "the number sent does not fit the field's 32-bit type")
            )
        return message

    @property
    def _type_name(self) -> str:
        return str(self._type.DESCRIPTOR.name)

    def _request_encoding(self) -> str:
        if self._encoding is None:
            headers = request_headers(self._stream)
            found = [value for name, value in headers if name == "grpc-encoding"]
            self._encoding = found[0].strip().lower() if found else "identity"
        return self._encoding

    def _inflate(self, data: bytes, wbits: int) -> bytes:
        limit = self._max_bytes
        inflater = zlib.decompressobj(wbits)
        try:
            inflated = inflater.decompress(data, limit + 1)
        except zlib.error as error:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                f"the compressed message is corrupt ({self._request_encoding()})",
                detail=str(error),
            ) from None
        if len(inflated) > limit or inflater.unconsumed_tail:
            raise self._too_large(None)
        if not inflater.eof or inflater.unused_data:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                f"the compressed message is corrupt ({self._request_encoding()}): "
                "it is cut short or followed by other bytes",
            )
        return inflated

    def _too_large(self, length: int | None) -> GRPCError:
        size = "inflates to more bytes" if length is None else f"is {length} bytes"
        return self._refuse(
            Status.RESOURCE_EXHAUSTED,
            f"the request message {size} than this server accepts: at most "
            f"{self._max_bytes} (--max-receive-bytes)",
        )

    def _refuse(self, status: Status, message: str, *, detail: str = "") -> GRPCError:
        self._log(message, detail)
        return GRPCError(status, message)

    def _malformed(self, error: InvalidArgument, *, detail: str = "") -> MalformedMessage:
        self._log(error.message, detail)
        return MalformedMessage(error)

    def _log(self, message: str, detail: str) -> None:
        # One line per call: a client that sends many bad messages on one stream, or many
        # bad requests, cannot make the log grow faster than its calls.
        if self._logged:
            log.debug("another malformed message on %s: %s", self._route, message)
            return
        self._logged = True
        address = self._stream.peer.addr()
        peer = f"{address[0]}:{address[1]}" if address else "an unknown peer"
        log.warning(
            "refused a malformed request to %s from %s: %s%s",
            self._route,
            peer,
            message,
            f" [{detail}]" if detail else "",
        )


# -- 32-bit numbers sent as 64-bit varints ---------------------------------------------------

#: A varint of five bytes or more has four continuation bytes in a row; without such a run
#: no varint in the message can hold a number beyond 2^28, and nothing needs checking.
_LONG_VARINT = re.compile(rb"[\x80-\xff]{4}")

_SIGNED_32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM}
_UNSIGNED_32 = {FieldDescriptor.TYPE_UINT32}


def out_of_range(descriptor: Descriptor, data: bytes) -> str | None:
    """The name of the first 32-bit field of ``data`` whose varint does not fit it, if any.

    ``data`` must be a message that protobuf parsed as ``descriptor``.
    """
    if not _LONG_VARINT.search(data):
        return None
    plan = _plan(descriptor)
    if not plan.numbers and not plan.messages:
        return None
    return _walk(plan, data, 0, len(data))


class _Plan:
    __slots__ = ("messages", "numbers", "packed")

    def __init__(self) -> None:
        #: field number -> (name, signed) for the 32-bit varint fields.
        self.numbers: dict[int, tuple[str, bool]] = {}
        #: The repeated ones among them (which may come packed, wire type 2).
        self.packed: set[int] = set()
        #: field number -> (name, plan) for the message fields.
        self.messages: dict[int, tuple[str, _Plan]] = {}


#: Plans by message type, filled as types are first received (derived from descriptors only).
_PLANS: dict[Descriptor, _Plan] = {}


def _plan(descriptor: Descriptor) -> _Plan:
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    # Stored before its fields are planned, so that a recursive type finds itself.
    plan = _PLANS[descriptor] = _Plan()
    for field in descriptor.fields:
        if field.type in _SIGNED_32 or field.type in _UNSIGNED_32:
            plan.numbers[field.number] = (field.name, field.type in _SIGNED_32)
            if field.is_repeated:
                plan.packed.add(field.number)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            plan.messages[field.number] = (field.name, _plan(field.message_type))
    return plan


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("not a varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fits(value: int, signed: bool) -> bool:
    if signed:
        if value >= 1 << 63:
            value -= 1 << 64
        return -(2**31) <= value < 2**31
    return value < 2**32


def _walk(plan: _Plan, data: bytes, pos: int, end: int) -> str | None:
    # protobuf parsed the message, so its framing is sound; what protobuf kept as unknown
    # fields (a known number with another wire type) is not checked, as it is not used.
    try:
        return _walk_fields(plan, data, pos, end)
    except ValueError:
        return None


def _walk_fields(plan: _Plan, data: bytes, pos: int, end: int) -> str | None:
    numbers, messages = plan.numbers, plan.messages
    while pos < end:
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            if number in numbers and not _fits(value, numbers[number][1]):
                return numbers[number][0]
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if number in messages:
                name, inner = messages[number]
                found = _walk(inner, data, pos, min(end, pos + length))
                if found is not None:
                    return f"{name}.{found}"
            elif number in plan.packed:
                name, signed = numbers[number]
                cursor, stop = pos, min(end, pos + length)
                while cursor < stop:
                    value, cursor = _varint(data, cursor, stop)
                    if not _fits(value, signed):
                        return name
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        # Group markers (3, 4) carry nothing.
    return None

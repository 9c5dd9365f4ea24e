"""The grpclib servicer: translates between wire messages and :mod:`chat.core`.

Nothing here decides behaviour. Unary RPCs call one core method each and map
:class:`~chat.errors.ChatError` to a gRPC status; the ``Chat`` stream runs a reader task
that feeds a :class:`~chat.core.Conversation` while this task writes its outbox, so PINGs
are answered while a reply streams (full duplex).

Messages are protobuf's (upb) classes built from ``chat.proto``'s embedded descriptors
(:mod:`chat._proto`); the routes are those the service descriptor declares.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpclib.const
from google.rpc import error_details_pb2
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from chat._clock import WireClock
from chat._compat import send_batch
from chat._proto import (
    CHAT_SERVICE,
    EncodedMessage,
    encode_event,
    message_class,
    patch_from_wire,
    request_from_wire,
    session_settings_from_wire,
    session_to_wire,
    stats_to_wire,
)
from chat.core import ChatCore, Conversation
from chat.errors import BackendRateLimited, ChatError, InvalidArgument

if TYPE_CHECKING:
    from grpclib.server import Stream

__all__ = ["ChatService", "status_details"]

log = logging.getLogger(__name__)

#: Most Chat events written in one go before the writer lets other streams run: large
#: enough to make one socket write worth it, small enough to keep every stream's turn short.
_WRITE_SLICE = 16

_CreateSessionResponse = message_class("CreateSessionResponse")
_ListSessionsResponse = message_class("ListSessionsResponse")
_DeleteSessionResponse = message_class("DeleteSessionResponse")


def status_details(error: ChatError) -> list[Any] | None:
    """The standard error details (``google.rpc``) that go with ``error``'s status.

    ``BadRequest`` names the field of an :class:`~chat.errors.InvalidArgument` and
    ``RetryInfo`` says how long to wait after a rate limit, so clients act on data rather
    than on the wording of the message.
    """
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.problem
        )
        return [error_details_pb2.BadRequest(field_violations=[violation])]
    if isinstance(error, BackendRateLimited) and error.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(round(error.retry_after * 1e9))
        return [info]
    return None


@contextmanager
def _grpc_status() -> Iterator[None]:
    """Raise every :class:`ChatError` as the gRPC status it names."""
    try:
        yield
    except ChatError as error:
        raise GRPCError(Status(int(error.status)), error.message, status_details(error)) from error


def _handler_name(method: str) -> str:
    """The Python name of an RPC's handler: ``GetSessionInfo`` -> ``get_session_info``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def _unary(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Stream[Any, Any]], Any]:
    """A unary RPC's stream handler around ``handler(request) -> response``."""

    async def serve(stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "the request has no message")
        with _grpc_status():
            response = await handler(request)
        await stream.send_message(response)

    return serve


class ChatService:
    """``ChatService`` over a :class:`~chat.core.ChatCore`."""

    def __init__(self, core: ChatCore) -> None:
        self._core = core
        self._clock = WireClock()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        """One route per method of the service descriptor, to the method of the same name."""
        mapping = {}
        for method in CHAT_SERVICE.methods:
            route = f"/{CHAT_SERVICE.full_name}/{method.name}"
            request = message_class(method.input_type.name)
            if method.client_streaming or method.server_streaming:
                # The Chat stream: served by one coroutine that keeps the reader, the
                # writer and their cleanup together; responses go out pre-serialized.
                mapping[route] = grpclib.const.Handler(
                    self._chat_stream,
                    grpclib.const.Cardinality.STREAM_STREAM,
                    request,
                    EncodedMessage,
                )
            else:
                mapping[route] = grpclib.const.Handler(
                    _unary(getattr(self, _handler_name(method.name))),
                    grpclib.const.Cardinality.UNARY_UNARY,
                    request,
                    message_class(method.output_type.name),
                )
        return mapping

    # -- unary RPCs ---------------------------------------------------------------------

    async def create_session(self, message: Any) -> Any:
        session = await self._core.create_session(**session_settings_from_wire(message))
        return _CreateSessionResponse(
            session_id=session.session_id, session=session_to_wire(session)
        )

    async def get_session_info(self, message: Any) -> Any:
        if message.include_messages:
            session, history = await self._core.read_session(message.session_id)
            return session_to_wire(session, history)
        return session_to_wire(await self._core.get_session(message.session_id))

    async def update_session(self, message: Any) -> Any:
        patch = patch_from_wire(message)
        return session_to_wire(await self._core.update_session(message.session_id, patch))

    async def list_sessions(self, message: Any) -> Any:
        sessions, token, total = await self._core.list_sessions(
            message.page_size, message.page_token
        )
        return _ListSessionsResponse(
            sessions=[session_to_wire(s) for s in sessions],
            next_page_token=token,
            total_size=total,
        )

    async def delete_session(self, message: Any) -> Any:
        deleted = await self._core.delete_session(message.session_id)
        return _DeleteSessionResponse(session_id=message.session_id, deleted_messages=deleted)

    async def get_server_stats(self, message: Any) -> Any:
        return stats_to_wire(await self._core.stats_snapshot())

    # -- the Chat stream ------------------------------------------------------------------

    async def _chat_stream(self, stream: Stream[Any, EncodedMessage]) -> None:
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

    async def _read(self, stream: Stream[Any, EncodedMessage], conversation: Conversation) -> None:
        # grpclib swallows what goes wrong here unless we say so: anything but a clean end
        # of input closes the outbox, so the writer stops and the handler reports it.
        try:
            while (message := await stream.recv_message()) is not None:
                await conversation.handle(request_from_wire(message))
        except StreamTerminatedError:
            conversation.outbox.close()
            return
        except Exception:
            conversation.outbox.close()
            raise
        conversation.finish_input()

    async def _write(self, stream: Stream[Any, EncodedMessage], conversation: Conversation) -> None:
        outbox = conversation.outbox
        clock = self._clock
        while (batch := await outbox.get()) is not None:
            for start in range(0, len(batch), _WRITE_SLICE):
                if start:
                    # grpclib writes to the socket without ever suspending, so a long
                    # batch would hold the event loop while every other stream (and new
                    # connections) waits: let them run between slices.
                    await asyncio.sleep(0)
                # One timestamp per slice: its events leave together.
                timestamp = clock.now()
                payloads = [encode_event(e, timestamp) for e in batch[start : start + _WRITE_SLICE]]
                # A slice in one HTTP/2 write; one by one where a listener must see each.
                if not await send_batch(stream, payloads):
                    for payload in payloads:
                        await stream.send_message(EncodedMessage(payload))
            if len(outbox):
                # More is waiting already (get() would return at once): others first.
                await asyncio.sleep(0)

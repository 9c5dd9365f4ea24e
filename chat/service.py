"""The grpclib servicer: translates between wire messages and :mod:`chat.core`.

Nothing here decides behaviour. Unary RPCs call one core method each and map
:class:`~chat.errors.ChatError` to a gRPC status; the ``Chat`` stream runs a reader task
that feeds a :class:`~chat.core.Conversation` while this task writes its outbox, so PINGs
are answered while a reply streams (full duplex).

Who calls is settled before a handler runs: :meth:`ChatService.authenticate` is a grpclib
``RecvRequest`` listener (the server adds it unless ``--auth none``) that refuses a call
without valid credentials with ``UNAUTHENTICATED`` and hands the caller's
:class:`~chat.auth.Credentials` to the handler. The health service is always open;
reflection is open when it is public.

Messages are protobuf's (upb) classes built from ``chat.proto``'s embedded descriptors
(:mod:`chat._proto`); the routes are those the service descriptor declares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import grpclib.const
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import StreamTerminatedError

from chat import logs
from chat._clock import WireClock
from chat._compat import send_batch
from chat._proto import (
    CHAT_SERVICE,
    ChunkEncoder,
    EncodedMessage,
    message_class,
    patch_from_wire,
    request_from_wire,
    session_settings_from_wire,
    session_to_wire,
    stats_to_wire,
)
from chat._receive import MalformedMessage
from chat._status import grpc_error, status_details
from chat.auth import LOCAL, Authenticator, Credentials, NoAuth
from chat.core import ChatCore, Conversation
from chat.errors import ChatError, Unauthenticated

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
_WhoAmIResponse = message_class("WhoAmIResponse")
_QuotaUsage = message_class("QuotaUsage")

#: The caller of a server without authentication.
_LOCAL = Credentials(LOCAL)


@contextmanager
def _grpc_status() -> Iterator[None]:
    """Raise every :class:`ChatError` as the gRPC status it names."""
    try:
        yield
    except ChatError as error:
        raise grpc_error(error) from error


def _handler_name(method: str) -> str:
    """The Python name of an RPC's handler: ``GetSessionInfo`` -> ``get_session_info``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def _unary(
    handler: Callable[[Any, Credentials], Awaitable[Any]],
) -> Callable[..., Any]:
    """A unary RPC's stream handler around ``handler(request, credentials) -> response``."""

    async def serve(stream: Stream[Any, Any], credentials: Credentials = _LOCAL) -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "the request has no message")
        with _grpc_status():
            response = await handler(request, credentials)
        await stream.send_message(response)

    return serve


class ChatService:
    """``ChatService`` over a :class:`~chat.core.ChatCore`."""

    def __init__(
        self,
        core: ChatCore,
        *,
        auth: Authenticator | None = None,
        open_services: tuple[str, ...] = ("grpc.health.v1.Health",),
    ) -> None:
        self._core = core
        self._auth = auth or NoAuth()
        self._clock = WireClock()
        # Paths answered without credentials: "/grpc.health.v1.Health/Check" and the like.
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)
        self._own_prefix = f"/{CHAT_SERVICE.full_name}/"

    async def authenticate(self, event: RecvRequest) -> None:
        """A grpclib ``RecvRequest`` listener: refuse calls without valid credentials, and
        pass the caller's to this service's handlers.

        Runs before the handler, so a refused ``Chat`` stream gets its status before any
        event. The message says what to supply and never repeats a credential.
        """
        path = event.method_name
        if path.startswith(self._open_prefixes):
            return
        try:
            credentials = await self._auth.authenticate(
                cast(Mapping[str, str], event.metadata), event.peer.cert()
            )
        except ChatError as error:
            raise GRPCError(Status(int(error.status)), error.message) from None
        # Every record about this call, and about the turns of its stream, names the caller.
        logs.bind(identity=credentials.identity.name)
        if path.startswith(self._own_prefix):
            handler = cast(Callable[..., Any], event.method_func)
            event.method_func = cast(Any, functools.partial(handler, credentials=credentials))

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

    async def create_session(self, message: Any, credentials: Credentials) -> Any:
        session = await self._core.create_session(
            **session_settings_from_wire(message), identity=credentials.identity
        )
        return _CreateSessionResponse(
            session_id=session.session_id, session=session_to_wire(session)
        )

    async def get_session_info(self, message: Any, credentials: Credentials) -> Any:
        identity = credentials.identity
        if message.include_messages:
            session, history = await self._core.read_session(message.session_id, identity)
            return session_to_wire(session, history)
        return session_to_wire(await self._core.get_session(message.session_id, identity))

    async def update_session(self, message: Any, credentials: Credentials) -> Any:
        patch = patch_from_wire(message)
        session = await self._core.update_session(message.session_id, patch, credentials.identity)
        return session_to_wire(session)

    async def list_sessions(self, message: Any, credentials: Credentials) -> Any:
        sessions, token, total = await self._core.list_sessions(
            message.page_size,
            message.page_token,
            credentials.identity,
            all_identities=message.all_identities,
        )
        return _ListSessionsResponse(
            sessions=[session_to_wire(s) for s in sessions],
            next_page_token=token,
            total_size=total,
        )

    async def delete_session(self, message: Any, credentials: Credentials) -> Any:
        deleted = await self._core.delete_session(message.session_id, credentials.identity)
        return _DeleteSessionResponse(session_id=message.session_id, deleted_messages=deleted)

    async def get_server_stats(self, message: Any, credentials: Credentials) -> Any:
        return stats_to_wire(await self._core.stats_snapshot(credentials.identity))

    async def who_am_i(self, message: Any, credentials: Credentials) -> Any:
        identity = credentials.identity
        usage = await self._core.who_am_i(identity)
        return _WhoAmIResponse(
            identity=identity.name,
            admin=identity.admin,
            auth=self._auth.mode,
            quotas=[_QuotaUsage(**dataclasses.asdict(u)) for u in usage],
        )

    # -- the Chat stream ------------------------------------------------------------------

    async def _chat_stream(
        self, stream: Stream[Any, EncodedMessage], credentials: Credentials = _LOCAL
    ) -> None:
        # A stream over the identity's limit is refused with RESOURCE_EXHAUSTED before any
        # event (nothing in the body raises a ChatError: it becomes an ERROR event there).
        with _grpc_status():
            async with self._core.quotas.stream(credentials.identity.name):
                await self._converse(stream, credentials)

    async def _converse(
        self, stream: Stream[Any, EncodedMessage], credentials: Credentials
    ) -> None:
        async with self._core.open_conversation(credentials) as conversation:
            reader = asyncio.create_task(self._read(stream, conversation))
            try:
                await self._write(stream, conversation)
            finally:
                reader.cancel()
                await asyncio.wait((reader,))
            failure = None if reader.cancelled() else reader.exception()
        if isinstance(failure, GRPCError):
            # The request stream itself was refused (too large, cut short, an encoding we
            # do not accept): its status, as for a unary call.
            raise failure
        if isinstance(failure, Unauthenticated):
            # The credential was revoked (or expired) while the stream was open.
            raise GRPCError(Status.UNAUTHENTICATED, failure.message)
        if failure is not None:
            log.error("could not read a Chat request stream", exc_info=failure)
            raise GRPCError(Status.INTERNAL, "could not read the request stream")

    async def _read(self, stream: Stream[Any, EncodedMessage], conversation: Conversation) -> None:
        # grpclib swallows what goes wrong here unless we say so: anything but a clean end
        # of input closes the outbox, so the writer stops and the handler reports it.
        recheck = conversation.credentials.recheck
        try:
            while True:
                try:
                    message = await stream.recv_message()
                except MalformedMessage as malformed:
                    # Framed correctly, so the stream can go on: the client is told, and
                    # its other requests (and replies in flight) are not lost.
                    await conversation.refuse(malformed.error)
                    continue
                if message is None:
                    break
                request = request_from_wire(message)
                try:
                    await recheck()
                except Unauthenticated as error:
                    # Answered (so a client waiting on it hears why), then the stream ends
                    # with UNAUTHENTICATED: nothing more is done for this caller.
                    conversation._error(request, error)
                    raise
                except ChatError as error:
                    # The credentials could not be checked (the token store is down): this
                    # request is refused, the stream goes on.
                    conversation._error(request, error)
                    continue
                await conversation.handle(request)
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
        encode = ChunkEncoder().encode
        while (batch := await outbox.get()) is not None:
            written = 0
            try:
                for start in range(0, len(batch), _WRITE_SLICE):
                    if start:
                        # grpclib writes to the socket without ever suspending, so a long
                        # batch would hold the event loop while every other stream (and new
                        # connections) waits: let them run between slices.
                        await asyncio.sleep(0)
                    # One timestamp per slice: its events leave together.
                    timestamp = clock.now()
                    payloads = [encode(e, timestamp) for e in batch[start : start + _WRITE_SLICE]]
                    # A slice in one HTTP/2 write; one by one where a listener must see each.
                    if not await send_batch(stream, payloads):
                        for payload in payloads:
                            await stream.send_message(EncodedMessage(payload))
                    written = start + len(payloads)
            except BaseException:
                # The stream is ending (cancelled, or the client is gone): what was taken
                # and not written does not count as sent.
                outbox.not_written(batch[written:])
                raise
            if len(outbox):
                # More is waiting already (get() would return at once): others first.
                await asyncio.sleep(0)

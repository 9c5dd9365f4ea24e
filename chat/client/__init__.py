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
A reply streaming when the connection is lost then goes on: the :class:`ReplyStream`
resumes its turn on the new connection (``RESUME`` from the last ``seq`` it has, or the
message sent again under its ``client_message_id``) and yields every event once.
:meth:`ChatClient.watch` follows a session's turns, whoever sends them (:class:`Watch`,
:class:`WatchEvent`).

The package's modules each do one job: ``_config`` (what a client is configured with),
``_results`` (what it returns), ``_convert`` (chatpb messages to those types),
``_connection`` (the channel, the shared stream's reader, reconnection) and ``_client`` (the
:class:`ChatClient` facade). They are private; import from ``chat.client`` or ``chat``.
"""

from chat.client._client import ChatClient, Notices, ReplyStream, Watch
from chat.client._config import (
    DEFAULT_TARGET,
    ClientConfig,
    ReconnectPolicy,
    format_target,
    parse_target,
)
from chat.client._results import (
    ClientStats,
    ConnectionState,
    ConnectionStateChanged,
    Notice,
    Reply,
    ReplyChunk,
    ReplyCompleted,
    ReplyEvent,
    ReplyFailed,
    ReplyStarted,
    ReplyStatus,
    ServerNotice,
    ServingStatus,
    SessionList,
    SessionUpdated,
    WatchEvent,
    WhoAmI,
)
from chat.stats import ServerStatsInfo

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
    "Watch",
    "WatchEvent",
    "WhoAmI",
    "format_target",
    "parse_target",
]

# Present the public names as this package's, as before the split (reprs, pickles, docs),
# so the private module layout can change freely.
for _value in (
    ChatClient,
    ClientConfig,
    ClientStats,
    ConnectionState,
    ConnectionStateChanged,
    Notices,
    ReconnectPolicy,
    Reply,
    ReplyChunk,
    ReplyCompleted,
    ReplyFailed,
    ReplyStarted,
    ReplyStatus,
    ReplyStream,
    ServerNotice,
    ServingStatus,
    SessionList,
    SessionUpdated,
    Watch,
    WatchEvent,
    WhoAmI,
    format_target,
    parse_target,
):
    _value.__module__ = __name__
del _value

"""In-memory connections from a :class:`~chat.ChatClient` to a :class:`~chat.ChatServer`.

``grpclib.testing.ChannelFor`` joins one channel to a grpclib server of its own, once. A
client opens a new channel for each connection (the first, and each after a loss), so
:class:`InMemoryConnections` is a channel factory: every call gives a channel whose
connection is a fresh in-memory pipe into the handlers the started ``ChatServer`` runs
(its chat service, health and reflection, and its per-connection write corking). The
client's ``disconnect()``/``connect()`` and reconnection then work as over TCP, the
server's ``stop()`` ends these connections too, and :meth:`InMemoryConnections.drop` cuts
them as a failed network would.

grpclib's private API for this is in :mod:`chat._compat` (``ConnectorChannel``,
``accept_protocol``); this module reads ``ChatServer._server``, which has no public accessor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpclib.client import Channel
from grpclib.protocol import H2Protocol

from chat import ChatClient, ChatServer
from chat._compat import ConnectorChannel, accept_protocol

#: The target of in-memory clients. It names no reachable host (``.invalid`` is reserved),
#: so a client that ignored its channel factory would fail instead of passing over TCP.
MEMORY_TARGET = "in-memory.invalid:1"


class _PipeEnd(asyncio.Transport):
    """One end of an in-memory connection, used by ``protocol``.

    Bytes written arrive at the other end's protocol in a later pass of the event loop,
    as from a socket. Closing either end, like closing a socket, lets the writes made so
    far arrive and then tells both protocols that the connection is lost.
    """

    def __init__(
        self, protocol: asyncio.Protocol, on_close: Callable[[_PipeEnd], None] | None = None
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._protocol = protocol
        self._on_close = on_close
        self.peer: _PipeEnd | None = None
        self._closing = False
        self._lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._closing and self.peer is not None:
            self._loop.call_soon(self.peer._receive, bytes(data))

    def _receive(self, data: bytes) -> None:
        if not self._lost:
            self._protocol.data_received(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._on_close is not None:
            self._on_close(self)
        self._loop.call_soon(self._connection_lost)
        if self.peer is not None:
            self.peer.close()

    def abort(self) -> None:
        self.close()

    def _connection_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(None)


class InMemoryConnections:
    """A ``channel_factory`` for :class:`~chat.ChatClient`: in-memory connections to ``server``.

    >>> connections = InMemoryConnections(server)                       # doctest: +SKIP
    >>> client = ChatClient(MEMORY_TARGET, channel_factory=connections)  # doctest: +SKIP
    """

    def __init__(self, server: ChatServer) -> None:
        self._server = server
        self._open: set[_PipeEnd] = set()
        #: Connections made so far.
        self.opened = 0

    def __call__(self) -> Channel:
        return ConnectorChannel(self._join)

    @property
    def open(self) -> int:
        """Connections not closed yet."""
        return len(self._open)

    def client(self, **options: Any) -> ChatClient:
        """A client (not connected yet) whose connections are in memory."""
        return ChatClient(MEMORY_TARGET, channel_factory=self, **options)

    def drop(self) -> int:
        """Cut every open connection, as a failed network would; return how many."""
        ends = list(self._open)
        for end in ends:
            end.close()
        return len(ends)

    def _join(self, client_protocol: H2Protocol) -> None:
        grpc_server = self._server._server
        if grpc_server is None:
            raise ConnectionRefusedError("the server is not started")
        # What the server makes for each accepted connection (with the ChatServer's corking
        # around it); refused, as a socket would be, once it stopped listening.
        server_protocol = accept_protocol(grpc_server)
        client_end = _PipeEnd(client_protocol, on_close=self._open.discard)
        server_end = _PipeEnd(server_protocol)
        client_end.peer, server_end.peer = server_end, client_end
        self._open.add(client_end)
        self.opened += 1
        client_protocol.connection_made(client_end)
        server_protocol.connection_made(server_end)

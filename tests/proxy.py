"""A TCP proxy for tests that cuts connections where it is told to, as a failed network would.

:class:`CuttingProxy` listens on 127.0.0.1 (any free port) and forwards every connection to
an upstream server, both ways. Armed with byte offsets (:meth:`CuttingProxy.arm`), it cuts
the connections that follow, one offset each: once it has passed on that many bytes from
the server to the client, it closes both sockets at once (an abort: nothing queued goes
out). The client sees its connection die mid-stream, wherever the offset fell: inside an
HTTP/2 frame, between two events, during the handshake of a reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from tests.helpers import TIMEOUT


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and the server's."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    #: Bytes from the server still to pass on before the cut; ``None``: never cut.
    budget: int | None = None
    #: What the server sends is dropped (:meth:`CuttingProxy.freeze`).
    frozen: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def cut(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class CuttingProxy:
    """``async with CuttingProxy(port) as proxy``: connect clients to ``proxy.port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._offsets: deque[int] = deque()
        #: Connections cut so far, and connections accepted so far.
        self.cuts = 0
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.cut()
        tasks = [task for link in self._links for task in link.tasks]
        if tasks:
            await asyncio.wait(tasks)
        await self._server.wait_closed()

    def arm(self, offsets: Iterable[int]) -> None:
        """Cut the open connections and the next ones after these many bytes, in turn.

        The connections open now take the first offsets (counted from now), the ones
        accepted later the rest; connections beyond the list are never cut.
        """
        self._offsets = deque(offsets)
        for link in self._links:
            link.budget = self._offsets.popleft() if self._offsets else None
            if link.budget == 0:
                self._cut(link)

    def freeze(self) -> None:
        """From now on, drop what the server sends on the open connections (a dead network)."""
        for link in self._links:
            link.frozen = True

    def cut_all(self) -> int:
        """Cut the open connections now; return how many."""
        links = list(self._links)
        for link in links:
            self._cut(link)
        return len(links)

    @property
    def armed(self) -> int:
        """Cuts still to come (offsets not yet given to a connection, or not yet reached)."""
        waiting = sum(1 for link in self._links if link.budget is not None)
        return len(self._offsets) + waiting

    def _cut(self, link: _Link) -> None:
        link.budget = None
        self.cuts += 1
        link.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        link.budget = self._offsets.popleft() if self._offsets else None
        self._links.add(link)
        try:
            if link.budget == 0:
                self._cut(link)
                return
            link.tasks = [
                asyncio.create_task(self._pipe(reader, up_writer, None)),
                asyncio.create_task(self._pipe(up_reader, writer, link)),
            ]
            await asyncio.wait(link.tasks)
        finally:
            link.cut()
            self._links.discard(link)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link | None
    ) -> None:
        """Copy ``reader`` to ``writer``; for the server's side, count and cut."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if link is not None and link.frozen:
                    continue
                if link is not None and link.budget is not None and len(data) >= link.budget:
                    writer.write(data[: link.budget])
                    # Passed on for sure before the abort, which drops what is still queued.
                    await writer.drain()
                    self._cut(link)
                    return
                if link is not None and link.budget is not None:
                    link.budget -= len(data)
                writer.write(data)
                await writer.drain()
        # One side closed: so does the other (a proxy that half-closes hides nothing).
        writer.transport.abort()


class ProxyThread:
    """A :class:`CuttingProxy` on an event loop of its own, in a thread: for clients that
    run in other processes (``chat-client`` commands, the REPL in a pseudo-terminal).

    >>> with ProxyThread(server.port) as proxy:                    # doctest: +SKIP
    ...     run_client("--target", proxy.target)
    ...     proxy.cut_all()
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._proxy = CuttingProxy(upstream_port)

    @property
    def target(self) -> str:
        return self._proxy.target

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._proxy.__aenter__(), self._loop).result(TIMEOUT)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        closing = self._proxy.__aexit__(None, None, None)
        asyncio.run_coroutine_threadsafe(closing, self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()

    def cut_all(self) -> int:
        """Cut the open connections now (see :meth:`CuttingProxy.cut_all`)."""

        async def cut() -> int:
            return self._proxy.cut_all()

        return asyncio.run_coroutine_threadsafe(cut(), self._loop).result(TIMEOUT)

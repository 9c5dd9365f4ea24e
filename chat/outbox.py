"""The outbox: the queue between the turns of one ``Chat`` stream and the task that writes it.

Turns (producers) put :class:`~chat.events.Event`\\ s; the writer (consumer) takes every event
waiting at once. Chunks are numbered when they leave, so that chunks that are already waiting
can be merged into one when the socket is the bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from chat.events import Event, EventKind
from chat.stats import ServerStats

__all__ = ["Outbox"]


class Outbox:
    """A FIFO of events with flow control, urgent events and chunk numbering.

    - :meth:`put` waits while ``high_water`` events are queued, so a fast model cannot run
      ahead of a slow client without bound; :meth:`put_nowait` never waits (small control
      events). PONG goes through :meth:`put_urgent`, ahead of queued chunks.
    - :meth:`get` waits for at least one event and returns every event queued, with
      ``chunk_number`` and ``total_chunks`` set (and counts the text of the chunks as sent;
      a writer that cannot write what it took says so with :meth:`not_written`). With
      ``coalesce``, consecutive chunks of one reply in that batch become one chunk of at
      most ``max_chunk_chars`` characters.
    - :meth:`close` wakes the consumer; :meth:`get` then returns what is left, and ``None``
      once empty.
    """

    def __init__(
        self,
        *,
        high_water: int = 64,
        coalesce: bool = False,
        max_chunk_chars: int = 8192,
        stats: ServerStats | None = None,
    ) -> None:
        if high_water < 1:
            raise ValueError("high_water must be >= 1")
        self._items: deque[Event] = deque()
        self._urgent: deque[Event] = deque()
        self._high_water = high_water
        self._coalesce = coalesce
        self._max_chunk_chars = max_chunk_chars
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._stats = stats
        #: When :meth:`get` last handed events to the writer (``time.monotonic()``): how
        #: long the stream has been silent (see :meth:`ChatCore.send_heartbeats`).
        self.last_sent = time.monotonic()

    def __len__(self) -> int:
        return len(self._items) + len(self._urgent)

    @property
    def closed(self) -> bool:
        return self._closed

    def put_nowait(self, event: Event) -> None:
        if self._closed:
            return
        self._items.append(event)
        self._readable.set()

    def put_urgent(self, event: Event) -> None:
        if self._closed:
            return
        self._urgent.append(event)
        self._readable.set()

    async def put(self, event: Event) -> None:
        while len(self._items) >= self._high_water and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        self.put_nowait(event)

    async def wait_below(self, limit: int) -> None:
        """Wait while ``limit`` or more events are queued (urgent ones included)."""
        while len(self) >= limit and not self._closed:
            self._writable.clear()
            await self._writable.wait()

    def close(self) -> None:
        self._closed = True
        self._readable.set()
        self._writable.set()

    async def get(self) -> list[Event] | None:
        while not self._items and not self._urgent:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        self.last_sent = time.monotonic()
        batch = list(self._urgent)
        self._urgent.clear()
        items = list(self._items)
        self._items.clear()
        self._writable.set()
        if self._coalesce and len(items) > 1:
            items = self._merge(items)
        chunks = 0
        for event in items:
            reply = event.reply
            if reply is None:
                continue
            if event.kind is EventKind.CHUNK:
                reply.chunks += 1
                event.chunk_number = reply.chunks
                # ReplyCounter.note_sent, inline: this runs for every chunk.
                reply.sent_chars += len(event.chunk_text)
                if reply.waiter is not None:
                    reply.wake()
                chunks += 1
            else:
                event.total_chunks = reply.chunks
        if self._stats is not None:
            self._stats.total_chunks_sent += chunks
        batch.extend(items)
        return batch

    def not_written(self, events: list[Event]) -> None:
        """The writer could not write ``events`` (taken with :meth:`get`): the stream ended.

        Their chunks' text is taken off their replies' sent count, so that what a reply
        cut short keeps is only what reached the stream.
        """
        for event in events:
            if event.reply is not None and event.kind is EventKind.CHUNK:
                event.reply.sent_chars -= len(event.chunk_text)

    def _merge(self, items: list[Event]) -> list[Event]:
        merged: list[Event] = []
        limit = self._max_chunk_chars
        for event in items:
            if event.kind is EventKind.CHUNK and merged:
                last = merged[-1]
                if (
                    last.kind is EventKind.CHUNK
                    and last.reply is event.reply
                    and len(last.chunk_text) + len(event.chunk_text) <= limit
                ):
                    last.chunk_text += event.chunk_text
                    continue
            merged.append(event)
        return merged

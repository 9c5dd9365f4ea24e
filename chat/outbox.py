"""The outbox: the queue between the turns of one ``Chat`` stream and the task that writes it.

Turns (producers) put :class:`~chat.events.Event`\\ s; the writer (consumer) takes every event
waiting at once. Chunks are numbered when they leave, so that chunks that are already waiting
can be merged into one when the socket is the bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from chat.events import Event, EventKind, ReplyCounter
from chat.stats import ServerStats

__all__ = ["FINAL_SINK", "LOG_SINK", "LogSink", "Outbox", "stamp"]

_FINAL = (EventKind.RESPONSE_COMPLETE, EventKind.ERROR)


def stamp(event: Event, reply: ReplyCounter) -> None:
    """Number a turn's event as it leaves, and log it: ``seq``, ``turn_id``, and for a
    chunk ``chunk_number`` (its text counted as sent), else ``total_chunks``. The turn's
    log is ended by its final event and let go (nothing refers back to the turn then).

    :meth:`Outbox.get` does the same inline for chunks: it runs for every chunk sent.
    """
    if event.kind is EventKind.CHUNK:
        reply.chunks += 1
        event.chunk_number = reply.chunks
        reply.sent_chars += len(event.chunk_text)
        if reply.waiter is not None:
            reply.wake()
    else:
        event.total_chunks = reply.chunks
    reply.seq += 1
    event.seq = reply.seq
    event.turn_id = reply.turn_id
    log = reply.log
    if log is not None:
        log.append(event)
        if event.kind in _FINAL:
            log.end()
            reply.log = None


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

    async def put(self, event: Event) -> bool:
        """Queue ``event`` once fewer than ``high_water`` are; ``False`` if the outbox was
        closed instead (the event is dropped)."""
        while len(self._items) >= self._high_water and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return False
        self.put_nowait(event)
        return True

    def take_pending(self) -> list[Event]:
        """Take the queued events (not the urgent ones) out, unnumbered: the stream is
        going away and its turns' events go on elsewhere (:class:`LogSink`)."""
        items = list(self._items)
        self._items.clear()
        self._writable.set()
        return items

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
                # stamp(), inline: this runs for every chunk.
                reply.chunks += 1
                event.chunk_number = reply.chunks
                reply.sent_chars += len(event.chunk_text)
                if reply.waiter is not None:
                    reply.wake()
                reply.seq += 1
                event.seq = reply.seq
                event.turn_id = reply.turn_id
                log = reply.log
                if log is not None:
                    log.append(event)
                chunks += 1
            else:
                stamp(event, reply)
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
                    and event.reply is not None
                    and last.reply is event.reply
                    and len(last.chunk_text) + len(event.chunk_text) <= limit
                ):
                    last.chunk_text += event.chunk_text
                    continue
            merged.append(event)
        return merged


class LogSink:
    """Where the events of a turn whose stream went away go: its log alone.

    It stands in for the stream's :class:`Outbox` (``put``, ``put_nowait``,
    ``wait_below``), numbering each event at once (:func:`stamp`), with no queue and no
    flow control: nobody reads it but the replay log. Without ``chunks`` it drops chunks
    (a reply being cancelled: they were never sent, and are not stored).
    """

    __slots__ = ("_chunks",)

    closed = False

    def __init__(self, *, chunks: bool = True) -> None:
        self._chunks = chunks

    def __len__(self) -> int:
        return 0

    def put_nowait(self, event: Event) -> None:
        reply = event.reply
        if reply is not None and (self._chunks or event.kind is not EventKind.CHUNK):
            stamp(event, reply)

    async def put(self, event: Event) -> bool:
        self.put_nowait(event)
        return True

    async def wait_below(self, limit: int) -> None:
        return None


#: Every event to the log (a reply that runs on without its stream).
LOG_SINK = LogSink()
#: Only the events that are not chunks (a reply being cancelled as its stream went away).
FINAL_SINK = LogSink(chunks=False)

"""The replay log: the events of running and recent turns, for RESUME, WATCH and resends.

Every event of a turn (STATUS, RESPONSE_START, CHUNK..., RESPONSE_COMPLETE or ERROR) is
appended to the turn's :class:`TurnLog` as it leaves the sender's outbox, numbered (``seq``)
and with its ``turn_id``: the log holds exactly what the sender got. A client that lost its
connection follows the turn from the last ``seq`` it has (:meth:`ReplayLog.follow`); a
watcher gets every turn of a session (:meth:`ReplayLog.watch`); a MESSAGE resent with the
same ``client_message_id`` finds the turn it started (:meth:`ReplayLog.claim`).

One :class:`ReplayLog` per :class:`~chat.core.ChatCore`. :class:`MemoryReplayLog` keeps it in
the server process; with the Redis store a Redis implementation keeps it where every replica
reads it. Both run the conformance suite in ``tests/replay_conformance.py``.

Bounds (:class:`ReplaySettings`): a turn's events are kept while it runs and for ``window``
seconds after it ends; all turns together hold at most ``max_bytes`` (each event counted as
its text plus :data:`EVENT_OVERHEAD`). Over the bytes, ended turns go first, oldest first,
then the oldest events of running turns; a RESUME before what is left gets
:class:`~chat.errors.TurnOutOfRange`. Dropped events are counted (:class:`ReplayStats`).

>>> import asyncio
>>> from chat.events import Event, EventKind
>>> async def demo() -> list[int]:
...     log = MemoryReplayLog()
...     turn = log.begin("s-1", "t-1", "r-1")
...     for seq, kind in enumerate((EventKind.RESPONSE_START, EventKind.RESPONSE_COMPLETE), 1):
...         turn.append(Event(kind, session_id="s-1", turn_id="t-1", seq=seq))
...     turn.end()
...     return [event.seq async for event in log.follow("s-1", "t-1", after_seq=0)]
>>> asyncio.run(demo())
[1, 2]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import operator
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from chat.errors import TurnNotFound, TurnOutOfRange
from chat.events import Event, EventKind
from chat.types import Session, SessionUpdateKind

__all__ = [
    "EVENT_OVERHEAD",
    "MemoryReplayLog",
    "ReplayLog",
    "ReplaySettings",
    "ReplayStats",
    "TurnLog",
    "Wakeups",
    "copy_event",
    "event_size",
]

#: Bytes counted for an event besides its text: about what a logged chunk costs beyond
#: its text, in memory (a string object and its place in the turn's list) or encoded.
EVENT_OVERHEAD = 64
#: Turns whose events expired or were dropped, remembered so that a RESUME of one gets
#: OUT_OF_RANGE (it existed) rather than NOT_FOUND.
_FORGOTTEN = 65_536
#: Eviction brings the log down to this share of ``max_bytes``, so that it runs once per
#: many appends rather than on each.
_LOW_WATER = 0.9


_COPIED = tuple(f.name for f in dataclasses.fields(Event) if f.name != "reply")
_copied_values = operator.attrgetter(*_COPIED)


def copy_event(event: Event) -> Event:
    """A copy of ``event`` not tied to its turn (``reply`` is ``None``)."""
    return Event(*_copied_values(event))


def event_size(event: Event) -> int:
    """The size :class:`ReplaySettings.max_bytes` counts for ``event``."""
    return (
        len(event.chunk_text) + len(event.status_message) + len(event.error_message)
    ) + EVENT_OVERHEAD


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """The bounds of a replay log (``--replay-window``, ``--replay-max-bytes``)."""

    #: Seconds a turn's events are kept after it ends (and client_message_ids remembered).
    window: float = 600.0
    #: Most bytes all turns' events may take, counted by :func:`event_size`.
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, not {self.window}")
        if self.max_bytes < EVENT_OVERHEAD:
            raise ValueError(f"max_bytes must be >= {EVENT_OVERHEAD}, not {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """What a replay log holds now, and what it has dropped (this process's view)."""

    #: Turns whose events are held (running, or ended within the window).
    turns: int = 0
    #: Their size, as :func:`event_size` counts it.
    bytes: int = 0
    #: Events dropped to stay within ``max_bytes``.
    evicted_events: int = 0
    #: Ended turns dropped at the end of the window.
    expired_turns: int = 0


class TurnLog(Protocol):
    """The log of one turn, written by the turn (from :meth:`Outbox.get` and the like)."""

    def append(self, event: Event) -> None:
        """Add the turn's next event (``seq`` and ``turn_id`` set). Called for every event
        the sender gets, so it must be cheap: no I/O, no await."""
        ...

    def end(self) -> None:
        """The turn's final event was appended: keep it for the window, then drop it."""
        ...


class ReplayLog(Protocol):
    """The events of running and recent turns, per session."""

    def begin(self, session_id: str, turn_id: str, request_id: str) -> TurnLog:
        """Start the log of a new turn (from then on it is :meth:`running_turn`)."""
        ...

    def follow(self, session_id: str, turn_id: str, after_seq: int) -> AsyncGenerator[Event, None]:
        """The turn's events after ``after_seq``, then live ones until its final event.

        Raises :class:`~chat.errors.TurnNotFound` (no such turn of that session) or
        :class:`~chat.errors.TurnOutOfRange` (its events after ``after_seq`` are gone) on
        the first step, before any event; ``TurnOutOfRange`` later if a follower falls so far
        behind that events it has not read yet are dropped. The events are new objects, not
        tied to the turn (``reply`` is ``None``): the caller may change them.
        """
        ...

    def watch(self, session_id: str) -> AsyncGenerator[Event, None]:
        """Every event of every turn of the session from now on, turn after turn; a turn
        running when the watch begins is replayed from its start (from its oldest event
        still held). A watcher too slow to keep up skips what was dropped. Counted in
        :meth:`watchers` while open; ends only when closed (or the log is)."""
        ...

    async def watchers(self, session_id: str) -> int:
        """The open :meth:`watch` iterators of the session."""
        ...

    async def claim(self, session_id: str, client_message_id: str, turn_id: str) -> str | None:
        """Tie ``client_message_id`` to ``turn_id`` for the session, unless it is tied
        already: ``None`` if claimed now, else the turn it belongs to. Remembered at least
        for the window (and while that turn runs)."""
        ...

    async def running_turn(self, session_id: str) -> str | None:
        """The oldest turn of the session begun and not ended, if any."""
        ...

    async def interrupt(self, session_id: str) -> None:
        """Ask the other servers sharing this log to cancel their turns of the session
        (``CONCURRENCY_POLICY_INTERRUPT``; the core cancels this server's own). A log in
        the process has no other servers: nothing to do."""
        ...

    def on_interrupt(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(session_id)`` when another server interrupts a session."""
        ...

    async def cancel(self, identity: str, session_id: str, request_id: str) -> None:
        """Pass a CANCEL this server found nothing for on to the other servers sharing this
        log (a reply the identity left running there on a stream that went away)."""
        ...

    def on_cancel(self, callback: Callable[[str, str, str], None]) -> None:
        """Call ``callback(identity, session_id, request_id)`` for another server's CANCEL."""
        ...

    def publish_update(self, session: Session, kind: SessionUpdateKind, message: str) -> None:
        """Tell the other servers sharing this log of a session update (typing, a change, a
        turn done), for their streams following the session. Cheap: no I/O, no await."""
        ...

    def on_update(self, callback: Callable[[Session, SessionUpdateKind, str], None]) -> None:
        """Call ``callback(session, kind, message)`` for another server's session update."""
        ...

    def stats(self) -> ReplayStats: ...

    async def aclose(self) -> None:
        """Stop: open followers and watchers end."""
        ...


# -- in memory ------------------------------------------------------------------------------


class Wakeups:
    """Futures of tasks waiting for something to happen (new events of a log): :meth:`wait`
    until the next :meth:`wake`. Both replay logs use it."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done() or waiter.cancelled():
                # Cancelled: not left behind for the next wake().
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)


_CHUNK = EventKind.CHUNK


class _MemoryTurn:
    """One turn's events in a :class:`MemoryReplayLog`: its :class:`TurnLog`.

    A chunk is kept as its text alone (the string the event already had: nothing is
    allocated for it but its place in ``items``); its event is made again when it is
    replayed, from the turn's ids and its position. Other events are kept as they are.
    """

    __slots__ = (
        "_log",
        "chunks_dropped",
        "ended_at",
        "first_seq",
        "gone",
        "index",
        "items",
        "request_id",
        "session",
        "turn_id",
        "wakeups",
    )

    def __init__(
        self, log: MemoryReplayLog, session: _MemorySession, turn_id: str, request_id: str
    ) -> None:
        self._log = log
        self.session = session
        self.turn_id = turn_id
        self.request_id = request_id
        #: The events: a chunk's text, or any other event.
        self.items: list[str | Event] = []
        #: The ``seq`` of ``items[0]`` (those before it were dropped).
        self.first_seq = 1
        #: Chunks among the dropped events (so that chunks are numbered when replayed).
        self.chunks_dropped = 0
        #: Its place among the session's turns, once its first event is appended (-1 before).
        self.index = -1
        self.ended_at: float | None = None
        #: Dropped from the log (expired, or evicted whole).
        self.gone = False
        self.wakeups = Wakeups()

    def append(self, event: Event) -> None:
        # Runs for every event a client is sent: the least work that keeps the bounds.
        log = self._log
        if event.kind is _CHUNK:
            text = event.chunk_text
            self.items.append(text)
            size = len(text) + EVENT_OVERHEAD
        else:
            self.items.append(event)
            size = event_size(event)
        if self.index < 0:
            log._start_turn(self)
        log._bytes += size
        if log._bytes > log._max_bytes:
            log._evict()
        if self.wakeups.waiters:
            self.wakeups.wake()

    def end(self) -> None:
        if self.ended_at is None and not self.gone:
            self._log._end_turn(self)
        self.wakeups.wake()

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.items) - 1

    def chunks_before(self, seq: int) -> int:
        """How many chunks the turn has up to ``seq`` (of those held, and dropped)."""
        held = self.items[: max(0, seq - self.first_seq + 1)]
        return self.chunks_dropped + sum(1 for item in held if type(item) is str)

    def event(self, seq: int, chunks: int) -> Event:
        """The event ``seq`` (held), as a new object; ``chunks`` is the number of the
        chunks before it."""
        item = self.items[seq - self.first_seq]
        if type(item) is str:
            return Event(
                _CHUNK,
                session_id=self.session.session_id,
                request_id=self.request_id,
                chunk_text=item,
                chunk_number=chunks + 1,
                turn_id=self.turn_id,
                seq=seq,
            )
        assert isinstance(item, Event)
        return copy_event(item)

    def drop_front(self, count: int) -> int:
        """Drop the oldest ``count`` events; return their size."""
        dropped = self.items[:count]
        del self.items[:count]
        self.first_seq += len(dropped)
        size = 0
        for item in dropped:
            if type(item) is str:
                self.chunks_dropped += 1
                size += len(item) + EVENT_OVERHEAD
            else:
                assert isinstance(item, Event)
                size += event_size(item)
        return size


@dataclass(slots=True, eq=False)
class _MemorySession:
    session_id: str
    #: Turns that have appended an event, in the order they did (the order watchers see).
    turns: deque[_MemoryTurn] = field(default_factory=deque)
    #: Turns begun and not ended, oldest first.
    running: dict[str, _MemoryTurn] = field(default_factory=dict)
    next_index: int = 0
    watchers: int = 0
    wakeups: Wakeups = field(default_factory=Wakeups)

    def idle(self) -> bool:
        return not self.turns and not self.running and not self.watchers


class MemoryReplayLog:
    """A :class:`ReplayLog` in the server process (the default; one per core).

    ``on_evicted`` is told how many events each eviction dropped (the core passes
    :meth:`Observer.replay_evicted <chat.observe.Observer.replay_evicted>`); ``clock`` is
    the monotonic clock the window is measured with. Ended turns are dropped when the log
    is next used after their window (a turn beginning, a RESUME, a WATCH, ``stats()``).
    """

    def __init__(
        self,
        settings: ReplaySettings | None = None,
        *,
        on_evicted: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings = settings or ReplaySettings()
        self._window = settings.window
        self._max_bytes = settings.max_bytes
        self._on_evicted = on_evicted
        self._clock = clock
        self._sessions: dict[str, _MemorySession] = {}
        self._turns: dict[str, _MemoryTurn] = {}
        #: Ended turns, in the order they ended.
        self._ended: OrderedDict[str, _MemoryTurn] = OrderedDict()
        self._forgotten: OrderedDict[str, str] = OrderedDict()
        self._claims: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._bytes = 0
        self._evicted_events = 0
        self._expired_turns = 0
        self._closed = False

    # -- the protocol ---------------------------------------------------------------------

    def begin(self, session_id: str, turn_id: str, request_id: str) -> TurnLog:
        self._expire()
        if turn_id in self._turns:
            raise ValueError(f"turn {turn_id!r} has begun already")
        session = self._session(session_id)
        turn = _MemoryTurn(self, session, turn_id, request_id)
        self._turns[turn_id] = turn
        session.running[turn_id] = turn
        return turn

    async def follow(
        self, session_id: str, turn_id: str, after_seq: int
    ) -> AsyncGenerator[Event, None]:
        self._expire()
        turn = self._turns.get(turn_id)
        if turn is None or turn.session.session_id != session_id:
            if self._forgotten.get(turn_id) == session_id:
                raise TurnOutOfRange(turn_id)
            raise TurnNotFound(turn_id)
        seq = max(after_seq, 0)
        if seq < turn.first_seq - 1:
            raise TurnOutOfRange(turn_id)
        chunks = turn.chunks_before(seq)
        while True:
            if seq < turn.first_seq - 1:
                # Dropped while this follower was behind.
                raise TurnOutOfRange(turn_id)
            if seq < turn.last_seq:
                seq += 1
                event = turn.event(seq, chunks)
                if event.kind is _CHUNK:
                    chunks += 1
                yield event
                continue
            if turn.ended_at is not None or turn.gone or self._closed:
                return
            await turn.wakeups.wait()

    async def watch(self, session_id: str) -> AsyncGenerator[Event, None]:
        self._expire()
        session = self._session(session_id)
        session.watchers += 1
        try:
            next_index = session.next_index
            for turn in session.turns:
                if turn.ended_at is None:
                    next_index = turn.index
                    break
            while not self._closed:
                upcoming = next((t for t in session.turns if t.index >= next_index), None)
                if upcoming is None:
                    await session.wakeups.wait()
                    continue
                turn = upcoming
                next_index = turn.index + 1
                seq = turn.first_seq - 1
                chunks = turn.chunks_dropped
                while not self._closed:
                    if seq < turn.first_seq - 1:
                        # Too slow to keep up: what was dropped is skipped.
                        seq = turn.first_seq - 1
                        chunks = turn.chunks_dropped
                    if seq < turn.last_seq:
                        seq += 1
                        event = turn.event(seq, chunks)
                        if event.kind is _CHUNK:
                            chunks += 1
                        yield event
                        continue
                    if turn.ended_at is not None or turn.gone:
                        break
                    await turn.wakeups.wait()
        finally:
            session.watchers -= 1
            self._maybe_forget(session)

    async def watchers(self, session_id: str) -> int:
        session = self._sessions.get(session_id)
        return 0 if session is None else session.watchers

    async def claim(self, session_id: str, client_message_id: str, turn_id: str) -> str | None:
        self._expire()
        key = (session_id, client_message_id)
        claimed = self._claims.get(key)
        if claimed is not None:
            return claimed[0]
        self._claims[key] = (turn_id, self._clock())
        return None

    async def interrupt(self, session_id: str) -> None:
        return None  # no other servers share it

    def on_interrupt(self, callback: Callable[[str], None]) -> None:
        return None

    async def cancel(self, identity: str, session_id: str, request_id: str) -> None:
        return None

    def on_cancel(self, callback: Callable[[str, str, str], None]) -> None:
        return None

    def publish_update(self, session: Session, kind: SessionUpdateKind, message: str) -> None:
        return None

    def on_update(self, callback: Callable[[Session, SessionUpdateKind, str], None]) -> None:
        return None

    async def running_turn(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        if session is None or not session.running:
            return None
        return next(iter(session.running))

    def stats(self) -> ReplayStats:
        self._expire()
        return ReplayStats(
            turns=len(self._turns),
            bytes=self._bytes,
            evicted_events=self._evicted_events,
            expired_turns=self._expired_turns,
        )

    async def aclose(self) -> None:
        self._closed = True
        for session in self._sessions.values():
            session.wakeups.wake()
        for turn in self._turns.values():
            turn.wakeups.wake()

    # -- bookkeeping ----------------------------------------------------------------------

    def _session(self, session_id: str) -> _MemorySession:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _MemorySession(session_id)
        return session

    def _maybe_forget(self, session: _MemorySession) -> None:
        if session.idle() and self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def _start_turn(self, turn: _MemoryTurn) -> None:
        session = turn.session
        turn.index = session.next_index
        session.next_index += 1
        session.turns.append(turn)
        session.wakeups.wake()

    def _end_turn(self, turn: _MemoryTurn) -> None:
        turn.ended_at = self._clock()
        turn.session.running.pop(turn.turn_id, None)
        self._ended[turn.turn_id] = turn

    def _drop(self, turn: _MemoryTurn) -> int:
        """Take ``turn`` out of the log; return how many events it held."""
        count = len(turn.items)
        self._bytes -= turn.drop_front(count)
        turn.gone = True
        self._turns.pop(turn.turn_id, None)
        self._ended.pop(turn.turn_id, None)
        session = turn.session
        session.running.pop(turn.turn_id, None)
        turns = session.turns
        if turns and turns[0] is turn:
            turns.popleft()
        elif turn in turns:
            turns.remove(turn)
        self._forgotten[turn.turn_id] = session.session_id
        if len(self._forgotten) > _FORGOTTEN:
            self._forgotten.popitem(last=False)
        turn.wakeups.wake()
        self._maybe_forget(session)
        return count

    def _expire(self) -> None:
        """Drop the turns that ended more than the window ago, and the claims as old whose
        turn is gone."""
        if not self._ended and not self._claims:
            return
        now = self._clock()
        horizon = now - self._window
        while self._ended:
            turn = next(iter(self._ended.values()))
            assert turn.ended_at is not None
            if turn.ended_at > horizon:
                break
            self._drop(turn)
            self._expired_turns += 1
        while self._claims:
            key, (turn_id, claimed_at) = next(iter(self._claims.items()))
            if claimed_at > horizon:
                break
            if turn_id in self._turns:
                # Its turn is still held (running, say): remembered as long as it is.
                self._claims[key] = (turn_id, now)
                self._claims.move_to_end(key)
                continue
            del self._claims[key]

    def _evict(self) -> None:
        """Bring the log down to its low water: whole ended turns first, oldest first, then
        the oldest events of running turns, oldest turn first."""
        target = int(self._max_bytes * _LOW_WATER)
        evicted = 0
        while self._bytes > target and self._ended:
            turn = next(iter(self._ended.values()))
            evicted += self._drop(turn)
        if self._bytes > target:
            for turn in list(self._turns.values()):
                if self._bytes <= target:
                    break
                excess = self._bytes - target
                count = 0
                freed = 0
                for item in turn.items:
                    if freed >= excess:
                        break
                    if type(item) is str:
                        freed += len(item) + EVENT_OVERHEAD
                    else:
                        assert isinstance(item, Event)
                        freed += event_size(item)
                    count += 1
                self._bytes -= turn.drop_front(count)
                evicted += count
                turn.wakeups.wake()
        if evicted:
            self._evicted_events += evicted
            if self._on_evicted is not None:
                self._on_evicted(evicted)

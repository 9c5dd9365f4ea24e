"""The replay log in Redis: any server of a fleet resumes or watches a turn another one runs.

Used with a ``redis://`` store, with the store's URL and prefix. Layout, for a prefix ``p``:

==============================  ==========  ===================================================
key                             type        holds
==============================  ==========  ===================================================
``p:replay:SID``                stream      the session's turn events, oldest first: fields
                                            ``t`` (turn id), ``s`` (seq), ``e`` (the event as
                                            ``ChatResponse`` bytes); an entry with ``x``
                                            instead of ``e`` marks the end of turn ``t``
``p:replay-turn:SID:TID``       hash        the turn: ``first`` (its first entry), ``last_seq``,
                                            ``trimmed`` (the last seq dropped), ``bytes``,
                                            ``ended``; ``gone`` once it was dropped whole (kept
                                            one window, so a RESUME is told OUT_OF_RANGE)
``p:replay-alive:SID:TID``      string      present while the turn's server runs it (a lease)
``p:replay-running:SID``        sorted set  the session's turns begun and not ended, in the
                                            order they began (``p:replay-order`` counts)
``p:replay-turns``              sorted set  ``SID|TID`` by last activity (ms): expiry, eviction
``p:replay-bytes``              string      the bytes every turn in the log holds
``p:replay-claim:SID:CMID``     string      the turn a ``client_message_id`` started
``p:replay-watchers:SID``       sorted set  the session's watchers, scored by lease expiry
``p:replay-fleet``              channel     what servers tell each other: INTERRUPTs,
                                            CANCELs passed on, session updates
==============================  ==========  ===================================================

Writes are batched: :meth:`RedisTurnLog.append` only puts the event on a list (it is called
for every event a turn sends), and one flusher task per server sends everything waiting in
one pipeline, one script per session, at most every :data:`FLUSH_INTERVAL` (a reader of this
server waiting for its own writes makes it write at once): the batch grows with the load, and
after a quiet spell the first event goes at once. A script adds an event only when its
``seq`` is past the turn's ``last_seq``, so a flush retried after a lost reply stores nothing
twice.

Readers (:meth:`RedisReplayLog.follow`, :meth:`RedisReplayLog.watch`) read the stream with
``XRANGE`` from a turn's first entry, then join the session's tail on this server: one task
that reads new entries with ``XREAD BLOCK`` from the last one it has, decodes each once, and
keeps the latest :data:`_TAIL_KEEP` for all of this server's readers (one behind that reads
Redis again). The stream's order is the order of the appends, and a cursor on entry ids
neither skips nor repeats an entry. A reader checks each turn's ``seq`` to be contiguous; a
gap (events dropped to keep the log within its bytes) ends a follow with
:class:`~chat.errors.TurnOutOfRange`.

Bounds, kept by the same scripts: turns idle (ended, or their server dead) for longer than the
window are dropped whole (``expired_turns``); above ``max_bytes`` (each event counted by
:func:`chat.replay.event_size`, summed over the fleet) ended turns are dropped oldest
first, then the oldest events of a running turn (``evicted_events``). Time is this server's clock
(``clock``), passed to the scripts; leases (a turn's server alive, watchers) are Redis TTLs
and scores, renewed every third of the store's ``lock_lease``, so a server killed with
SIGKILL leaves no running turn and no watchers behind after one lease.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from chat._proto import decode_event, encode_event
from chat.backoff import backoff
from chat.errors import StoreUnavailable, TurnNotFound, TurnOutOfRange, Unavailable
from chat.events import Event
from chat.replay import ReplaySettings, ReplayStats, Wakeups, event_size
from chat.store._codec import session_from_values, session_values
from chat.store.redis import RedisStore
from chat.types import Session, SessionUpdateKind

__all__ = ["FLUSH_INTERVAL", "RedisReplayLog", "RedisTurnLog"]

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Seconds between two writes of a server's flusher, at least: what a watcher on another
#: server or a resume may lag behind the sender, for batches that cost this server a
#: fraction of the CPU per event.
FLUSH_INTERVAL = 0.01
#: Connections to Redis at most: each follower and watcher holds one while it waits in
#: XREAD BLOCK (``max_connections`` in the store URL overrides it).
_CONNECTIONS = 4096
#: Sessions whose last write's place is remembered before those written are forgotten.
_SESSIONS_REMEMBERED = 1024
#: Entries a session's tail keeps for this server's readers (then the older half goes).
_TAIL_KEEP = 4096
#: Entries read per XRANGE / XREAD call.
_PAGE = 512
#: Milliseconds an XREAD waits before a reader checks that its turn's server still runs it
#: (well below the store client's socket timeout).
_BLOCK_MS = 1000

# -- scripts ------------------------------------------------------------------------------
# Every script that can drop anything gets the time (ms, this server's clock) and the bounds,
# keeps them, and returns {total bytes, turns, evicted events, expired turns}: the stats
# follow each call.

_BOUNDS = """
local prefix, now = ARGV[1], tonumber(ARGV[2])
local window, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local turns_key, bytes_key = KEYS[1], KEYS[2]
local evicted, expired = 0, 0

local function split(member)
  local cut = string.find(member, '|[^|]*$')
  return string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
end

-- the stream, the turn's record, its lease, the session's running turns
local function names(sid, turn)
  return prefix .. ':replay:' .. sid, prefix .. ':replay-turn:' .. sid .. ':' .. turn,
    prefix .. ':replay-alive:' .. sid .. ':' .. turn, prefix .. ':replay-running:' .. sid
end

local function field_of(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- Delete the turn's entries from ``start`` on; with ``budget``, only until ``total`` less
-- what went is within it. Returns the events deleted, their bytes, and the last seq and
-- entry id deleted.
local function delete_entries(stream, turn, start, budget, total)
  local events, bytes, last_seq, last_id = 0, 0, nil, nil
  local cursor = start
  while true do
    local entries = redis.call('XRANGE', stream, cursor, '+', 'COUNT', 256)
    if #entries == 0 then break end
    for _, entry in ipairs(entries) do
      if field_of(entry, 't') == turn then
        if budget and total - bytes <= budget then return events, bytes, last_seq, last_id end
        redis.call('XDEL', stream, entry[1])
        last_id = entry[1]
        if field_of(entry, 'x') then return events, bytes, last_seq, last_id end
        events = events + 1
        bytes = bytes + tonumber(field_of(entry, 'n'))
        last_seq = tonumber(field_of(entry, 's'))
      end
      cursor = '(' .. entry[1]
    end
  end
  return events, bytes, last_seq, last_id
end

-- Take the turn out of the log; its record stays a window as a tombstone (OUT_OF_RANGE).
local function drop_turn(member)
  local sid, turn = split(member)
  local stream, meta, alive_key, running_key = names(sid, turn)
  local first = redis.call('HGET', meta, 'first')
  local events = 0
  if first then events = delete_entries(stream, turn, first, nil, 0) end
  local recorded = tonumber(redis.call('HGET', meta, 'bytes') or '0')
  local last_seq = redis.call('HGET', meta, 'last_seq') or '0'
  redis.call('DEL', meta, alive_key)
  redis.call('HSET', meta, 'gone', '1', 'trimmed', last_seq)
  redis.call('PEXPIRE', meta, math.max(window, 1000))
  redis.call('ZREM', turns_key, member)
  redis.call('ZREM', running_key, turn)
  if redis.call('XLEN', stream) == 0 then redis.call('DEL', stream) end
  redis.call('DECRBY', bytes_key, recorded)
  return events
end

local function alive(sid, turn)
  local _, meta, alive_key = names(sid, turn)
  return redis.call('HGET', meta, 'ended') ~= '1' and redis.call('EXISTS', alive_key) == 1
end

local function keep_bounds()
  -- the window: turns idle that long (ended, or their server gone) go whole; a running
  -- turn never does (its server renews its lease)
  local horizon = '(' .. (now - window)
  local idle = redis.call('ZRANGE', turns_key, '-inf', horizon, 'BYSCORE', 'LIMIT', 0, 256)
  for _, member in ipairs(idle) do
    local sid, turn = split(member)
    if alive(sid, turn) then
      redis.call('ZADD', turns_key, now, member)
    else
      drop_turn(member)
      expired = expired + 1
    end
  end
  -- the bytes: ended turns oldest first, then the oldest events of running ones
  local total = tonumber(redis.call('GET', bytes_key) or '0')
  if total <= max_bytes then return end
  local running = {}
  for _, member in ipairs(redis.call('ZRANGE', turns_key, 0, 255)) do
    if total <= max_bytes then return end
    local sid, turn = split(member)
    if alive(sid, turn) then
      running[#running + 1] = member
    else
      local _, meta = names(sid, turn)
      total = total - tonumber(redis.call('HGET', meta, 'bytes') or '0')
      evicted = evicted + drop_turn(member)
    end
  end
  for _, member in ipairs(running) do
    if total <= max_bytes then return end
    local sid, turn = split(member)
    local stream, meta = names(sid, turn)
    local first = redis.call('HGET', meta, 'first')
    if first then
      local events, bytes, last_seq, last_id = delete_entries(stream, turn, first, max_bytes, total)
      if events > 0 then
        redis.call('HSET', meta, 'trimmed', last_seq, 'first', last_id)
        redis.call('HINCRBY', meta, 'bytes', -bytes)
        redis.call('DECRBY', bytes_key, bytes)
        total = total - bytes
        evicted = evicted + events
      end
    end
  end
end

local function result()
  local total = tonumber(redis.call('GET', bytes_key) or '0')
  return {total, redis.call('ZCARD', turns_key), evicted, expired}
end
"""

# KEYS: turns, bytes, stream, running, order
# ARGV: prefix, now_ms, window_ms, max_bytes, session, lease_ms, then (op, turn, seq, size,
# payload) for each write: op b (begin), a (append the event ``payload``), e (end); for b
# and e, ``seq`` is when they happened (ms).
_FLUSH = (
    _BOUNDS
    + """
local stream, running_key, sid, lease = KEYS[3], KEYS[4], ARGV[5], tonumber(ARGV[6])
-- Each turn's record is read once and written once per call (a batch has many events).
local states = {}
local function state_of(turn)
  local st = states[turn]
  if st == nil then
    local _, meta, alive_key = names(sid, turn)
    local found = redis.call('HMGET', meta, 'gone', 'ended', 'last_seq', 'first')
    st = {
      meta = meta, alive_key = alive_key, member = sid .. '|' .. turn,
      writable = found[1] ~= '1' and found[2] ~= '1' and found[3] ~= false,
      last = tonumber(found[3] or '-1'), first = found[4], new_first = nil, bytes = 0, at = nil,
    }
    states[turn] = st
  end
  return st
end
local function commit()
  local added = 0
  for _, st in pairs(states) do
    if st.at then
      redis.call('HSET', st.meta, 'last_seq', st.last)
      if st.bytes ~= 0 then redis.call('HINCRBY', st.meta, 'bytes', st.bytes) end
      if st.new_first then redis.call('HSETNX', st.meta, 'first', st.new_first) end
      redis.call('ZADD', turns_key, 'XX', st.at, st.member)
      added = added + st.bytes
    end
  end
  states = {}
  redis.call('INCRBY', bytes_key, added)
end
for i = 7, #ARGV, 5 do
  local op, turn, seq = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if op == 'b' then
    local _, meta, alive_key = names(sid, turn)
    -- (a claim may have made the record already)
    if redis.call('HSETNX', meta, 'begun', '1') == 1 then
      redis.call('HSETNX', meta, 'last_seq', 0)
      redis.call('HSETNX', meta, 'trimmed', 0)
      redis.call('HSETNX', meta, 'bytes', 0)
      redis.call('ZADD', turns_key, seq, sid .. '|' .. turn)
      redis.call('SET', alive_key, '1', 'PX', lease)
      redis.call('ZADD', running_key, redis.call('INCR', KEYS[5]), turn)
      redis.call('PEXPIRE', meta, 2 * window + 60000)
    end
    states[turn] = nil
  elseif op == 'a' then
    local st = state_of(turn)
    if st.writable and seq > st.last then
      local size = tonumber(ARGV[i + 3])
      local id = redis.call('XADD', stream, '*', 't', turn, 's', seq, 'n', size, 'e', ARGV[i + 4])
      if not st.first and not st.new_first then st.new_first = id end
      st.last, st.bytes, st.at = seq, st.bytes + size, now
    end
  elseif op == 'e' and state_of(turn).writable then
    -- within the bounds while it runs: over them its own oldest events go, not all of it
    commit()
    keep_bounds()
    local st = state_of(turn)
    if st.writable then
      local id = redis.call('XADD', stream, '*', 't', turn, 's', st.last, 'x', '1')
      if not st.first then redis.call('HSET', st.meta, 'first', id) end
      redis.call('HSET', st.meta, 'ended', '1')
      -- a safety net, as for the stream: the scripts drop it after the window
      redis.call('PEXPIRE', st.meta, 2 * window + 60000)
      redis.call('ZADD', turns_key, 'XX', seq, st.member)
      redis.call('DEL', st.alive_key)
      redis.call('ZREM', running_key, turn)
    end
    states[turn] = nil
  end
end
commit()
-- a safety net: what nobody touches for two windows goes, whatever the scripts missed
for _, key in ipairs({stream, running_key}) do
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, 2 * window + 60000) end
end
keep_bounds()
return result()
"""
)

# KEYS: turns, bytes; ARGV: prefix, now_ms, window_ms, max_bytes, lease_ms, then session,
# turn pairs of the turns this server runs: their leases renewed, their activity now.
_RENEW = (
    _BOUNDS
    + """
local lease = tonumber(ARGV[5])
for i = 6, #ARGV, 2 do
  local sid, turn = ARGV[i], ARGV[i + 1]
  local stream, meta, alive_key = names(sid, turn)
  if redis.call('EXISTS', meta) == 1 and redis.call('HGET', meta, 'gone') ~= '1' then
    redis.call('SET', alive_key, '1', 'PX', lease)
    redis.call('ZADD', turns_key, 'XX', now, sid .. '|' .. turn)
    redis.call('PEXPIRE', meta, 2 * window + 60000)
    if redis.call('EXISTS', stream) == 1 then redis.call('PEXPIRE', stream, 2 * window + 60000) end
  end
end
keep_bounds()
return result()
"""
)

# KEYS: turns, bytes, meta, stream; ARGV: prefix, now_ms, window_ms, max_bytes. The bounds
# kept, then the turn's record and the stream's last entry id (or 0-0).
_FOLLOW_START = (
    _BOUNDS
    + """
keep_bounds()
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
return {result(), redis.call('HGETALL', KEYS[3]), last and last[1] or '0-0'}
"""
)

# KEYS: running, stream; ARGV: prefix, session. The session's oldest running turn (the
# running ones that lost their server are forgotten), where a watch starts (that turn's first
# entry, inclusive, or after the stream's last entry) and whether inclusive.
_RUNNING = """
local turn = nil
for _, candidate in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local base = ARGV[1] .. ':replay-'
  if redis.call('EXISTS', base .. 'alive:' .. ARGV[2] .. ':' .. candidate) == 1 then
    turn = candidate
    break
  end
  redis.call('ZREM', KEYS[1], candidate)
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
local tail = last and last[1] or '0-0'
if turn then
  local first = redis.call('HGET', ARGV[1] .. ':replay-turn:' .. ARGV[2] .. ':' .. turn, 'first')
  if first then return {turn, first, 1} end
end
return {turn or false, tail, 0}
"""

# KEYS: claim, the turn's record, turns, its lease; ARGV: turn, seconds, member, now_ms,
# lease_ms. The claimed turn's record exists from now on, so that a resend on another
# server follows it (and waits for its events) rather than finding no such turn.
_CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return redis.call('GET', KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'last_seq', 0, 'trimmed', 0, 'bytes', 0)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 2000 + 60000)
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
end
return false
"""

# KEYS: watchers; ARGV: now_ms
_COUNT_WATCHERS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""


class _Closed(Exception):
    """The log was closed while a reader waited."""


def _being_cancelled() -> bool:
    # A function of its own: a frame that raises CancelledError must not hold its task (the
    # task keeps the error, whose traceback keeps the frame: a cycle).
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``MS-SEQ``) as something that sorts as Redis sorts ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Entry:
    """One entry of a session's stream, as this server read it; its event decoded once."""

    __slots__ = ("_event", "fields", "id", "key")

    def __init__(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        self.id = entry_id.decode()
        self.key = _id_key(self.id)
        self.fields = fields
        self._event: Event | None = None

    def event(self) -> Event:
        if self._event is None:
            self._event = decode_event(self.fields[b"e"])
        return self._event


class _Tail(Wakeups):
    """The live end of one session's stream, read by one task for every reader of this
    server: a new entry is read from Redis and decoded once, however many follow or watch.

    ``entries`` holds what the task read after ``complete_after`` (an id key), oldest first;
    beyond ``_TAIL_KEEP`` the older half goes (a reader that far behind reads Redis again).
    """

    __slots__ = (
        "complete_after",
        "cursor",
        "entries",
        "error",
        "readers",
        "stopped",
        "stream",
        "task",
        "trims",
    )

    def __init__(self, stream: str, start: str) -> None:
        self.stream = stream
        self.cursor = start
        self.complete_after = _id_key(start)
        self.entries: list[_Entry] = []
        self.trims = 0
        self.readers = 0
        #: Its last reader left: the task ends after the read in flight (not cancelled: a
        #: task cancelled inside redis-py leaves a reference cycle behind).
        self.stopped = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        super().__init__()

    def after(self, key: tuple[int, int]) -> int | None:
        """Where the entries after ``key`` start, or ``None`` if some may be missing."""
        if key < self.complete_after:
            return None
        return bisect.bisect_right(self.entries, key, key=_entry_key)

    def add(self, entries: Sequence[_Entry]) -> None:
        self.entries.extend(entries)
        self.cursor = self.entries[-1].id
        if len(self.entries) > _TAIL_KEEP:
            cut = len(self.entries) // 2
            self.complete_after = self.entries[cut - 1].key
            del self.entries[:cut]
            self.trims += 1


def _entry_key(entry: _Entry) -> tuple[int, int]:
    return entry.key


#: A write waiting for the flusher: session id, op (b begin, a append, e end), turn id, the
#: event (appends), and when a begin or an end happened (ms): a tuple, as it is made for
#: every event.
_Op = tuple[str, str, str, Event | None, int]


class RedisTurnLog:
    """One turn's events on their way to Redis: :meth:`append` is a list append."""

    __slots__ = ("_log", "request_id", "session_id", "turn_id")

    def __init__(self, log: RedisReplayLog, session_id: str, turn_id: str, request_id: str) -> None:
        self._log = log
        self.session_id = session_id
        self.turn_id = turn_id
        self.request_id = request_id

    def append(self, event: Event) -> None:
        log = self._log
        log._pending.append((self.session_id, "a", self.turn_id, event, 0))
        log._queued += 1
        log._last_queued[self.session_id] = log._queued
        if not log._wake.is_set():
            log._wake.set()

    def end(self) -> None:
        self._log._end(self)


class RedisReplayLog:
    """The :class:`~chat.replay.ReplayLog` of every server sharing a Redis store URL (and
    prefix): a turn one server runs is followed, watched and claimed from any other.

    ``on_evicted`` is told how many events this server's writes evicted; ``clock`` is the
    wall clock the window is measured with (the servers' clocks are taken to agree to well
    within the window).

    >>> replay = RedisReplayLog("redis://localhost:6379/0?prefix=staging")  # doctest: +SKIP
    >>> turn = replay.begin("s-1", "t-1", "r-1")                           # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        settings: ReplaySettings | None = None,
        *,
        on_evicted: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        # The store's URL, client settings and error handling, in a client of its own that
        # keeps bytes as bytes (the events are protobuf).
        self._redis = RedisStore(url, decode_responses=False, max_connections=_CONNECTIONS)
        self._client = self._redis._client
        self.settings = settings = settings or ReplaySettings()
        self._on_evicted = on_evicted
        self._clock = clock
        self._flush_interval = flush_interval
        self._lease_ms = round(self._redis.lock_lease * 1000)
        script = self._client.register_script
        self._flush_script = script(_FLUSH)
        self._renew_script = script(_RENEW)
        self._follow_start = script(_FOLLOW_START)
        self._running_script = script(_RUNNING)
        self._claim_script = script(_CLAIM)
        self._count_watchers = script(_COUNT_WATCHERS)
        self._turns_key = self._key("replay-turns")
        self._bytes_key = self._key("replay-bytes")
        self._order_key = self._key("replay-order")
        # Writes waiting for the flusher, and how many were queued / written so far (a
        # reader of this server first waits for the writes queued before it).
        self._pending: list[_Op] = []
        self._pending_claims: list[str] = []
        self._queued = 0
        self._written = 0
        self._begun_unwritten = 0
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        #: The count of writes queued up to each session's last one.
        self._last_queued: dict[str, int] = {}
        self._written_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        #: Turns this server runs (their leases are renewed), and their claims.
        self._running: dict[tuple[str, str], RedisTurnLog] = {}
        self._claims: dict[tuple[str, str], str] = {}
        self._idle_claims: set[tuple[str, str]] = set()
        #: Watchers of this server, by session: their members in the session's lease set.
        self._watching: dict[str, set[str]] = {}
        self._replica = secrets.token_hex(6)
        #: What other servers tell (INTERRUPTs, session updates), on one channel; and what
        #: this one will tell them with its next write.
        self._interrupted: Callable[[str], None] | None = None
        self._updated: Callable[[Session, SessionUpdateKind, str], None] | None = None
        self._cancelled: Callable[[str, str, str], None] | None = None
        self._channel = self._key("replay-fleet")
        self._listener: asyncio.Task[None] | None = None
        self._pending_messages: list[bytes] = []
        #: The tails of the streams this server's readers are at the end of.
        self._tails: dict[str, _Tail] = {}
        # The stats: the fleet's bytes and turns as of the last script, this server's
        # evictions and expiries.
        self._bytes = 0
        self._turns = 0
        self._evicted_events = 0
        self._expired_turns = 0
        self._closed = False

    def _key(self, *parts: str) -> str:
        return self._redis._key(*parts)

    @property
    def location(self) -> str:
        return self._redis.location

    # -- writing ------------------------------------------------------------------------------

    def begin(self, session_id: str, turn_id: str, request_id: str) -> RedisTurnLog:
        # From this server's first turn on: another server may interrupt its turns.
        self._start_listener()
        turn = RedisTurnLog(self, session_id, turn_id, request_id)
        self._running[(session_id, turn_id)] = turn
        self._begun_unwritten += 1
        self._enqueue((session_id, "b", turn_id, None, self._now_ms()))
        self._start_flusher()
        self._start_renewer()
        return turn

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    def _end(self, turn: RedisTurnLog) -> None:
        if self._running.pop((turn.session_id, turn.turn_id), None) is None:
            return  # ended already
        self._enqueue((turn.session_id, "e", turn.turn_id, None, self._now_ms()))
        claim = self._claims.pop((turn.session_id, turn.turn_id), None)
        if claim is not None:
            # Remembered a whole window after the turn, however long it ran.
            self._pending_claims.append(claim)

    def _enqueue(self, op: _Op) -> None:
        self._pending.append(op)
        self._queued += 1
        self._last_queued[op[0]] = self._queued
        if not self._wake.is_set():
            self._wake.set()

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        last = -math.inf
        while True:
            await self._wake.wait()
            # At most one write per interval: under load a batch holds that long's events
            # (a pipeline costs this process far more than an event in it); after a quiet
            # spell the first event goes at once.
            pause = last + self._flush_interval - loop.time()
            if pause > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._hurry.wait()  # a reader of this server waits for it
            last = loop.time()
            self._hurry.clear()
            self._wake.clear()
            batch, self._pending = self._pending, []
            claims, self._pending_claims = self._pending_claims, []
            messages, self._pending_messages = self._pending_messages, []
            try:
                await self._flush(batch, claims, messages)
            except StoreUnavailable as error:
                # The turns go on (their messages are stored by the session store, which
                # reports the outage itself); resuming or watching them is what is lost.
                log.warning("replay log: %d writes lost: %s", len(batch), error.detail)
            except Exception:
                log.exception("replay log: %d writes lost", len(batch))
            self._written += len(batch)
            self._begun_unwritten -= sum(1 for op in batch if op[1] == "b")
            self._wake_readers()

    async def _flush(
        self, batch: Sequence[_Op], claims: Sequence[str], messages: Sequence[bytes]
    ) -> None:
        by_session: dict[str, list[Any]] = {}
        for session_id, op, turn_id, event, at in batch:
            args = by_session.setdefault(session_id, [])
            if event is None:
                args += (op, turn_id, at, 0, b"")
            else:
                args += (op, turn_id, event.seq, event_size(event), encode_event(event, ""))
        bounds = self._bounds()
        window = self._window_seconds

        async def send() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for session_id, args in by_session.items():
                    await self._flush_script(
                        keys=[
                            self._turns_key,
                            self._bytes_key,
                            self._key("replay", session_id),
                            self._key("replay-running", session_id),
                            self._order_key,
                        ],
                        args=[*bounds, session_id, self._lease_ms, *args],
                        client=pipe,
                    )
                for claim in claims:
                    pipe.expire(claim, window)
                # After the events written with them (a turn's, then its TURN_COMPLETED).
                for message in messages:
                    pipe.publish(self._channel, message)
                return list(await pipe.execute())

        # Safe to retry: a script adds only events past the turn's last seq.
        results = await self._redis._call("replay write", send, retry=True)
        for result in results[: len(by_session)]:
            self._note(result)

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    def _bounds(self) -> list[Any]:
        return [
            self._redis.prefix,
            self._now_ms(),
            round(self.settings.window * 1000),
            self.settings.max_bytes,
        ]

    @property
    def _window_seconds(self) -> int:
        return max(1, math.ceil(self.settings.window))

    def _note(self, result: Sequence[Any]) -> None:
        total, turns, evicted, expired = (int(value) for value in result)
        self._bytes, self._turns = total, turns
        if evicted:
            self._evicted_events += evicted
            if self._on_evicted is not None:
                self._on_evicted(evicted)
        self._expired_turns += expired

    def _wake_readers(self) -> None:
        if len(self._last_queued) > _SESSIONS_REMEMBERED:
            written = self._written
            self._last_queued = {k: v for k, v in self._last_queued.items() if v > written}
        waiting = []
        for target, future in self._written_waiters:
            if self._written >= target:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._written_waiters = waiting

    async def _sync(self, session_id: str | None = None) -> None:
        """Wait until the writes this server queued so far (of ``session_id``, if given) are
        in Redis (or failed); the flusher writes at once rather than after its interval."""
        target = self._queued if session_id is None else self._last_queued.get(session_id, 0)
        if self._written >= target or self._flusher is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._written_waiters.append((target, future))
        self._hurry.set()
        await future

    # -- leases -----------------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._running or self._watching:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self._renew()
            except StoreUnavailable as error:
                log.warning("replay log: could not renew leases: %s", error.detail)

    async def _renew(self) -> None:
        running = [part for session_turn in self._running for part in session_turn]
        # A claim whose turn has not begun here by the renewal after it was made (an error
        # came first) is forgotten: it expires a window after it was made.
        idle = {key for key in self._claims if key not in self._running}
        for key in idle & self._idle_claims:
            del self._claims[key]
        self._idle_claims = idle - self._idle_claims
        claims = [claim for key, claim in self._claims.items() if key in self._running]
        expiry = round(self._clock() * 1000) + self._lease_ms
        window = self._window_seconds

        async def send() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                await self._renew_script(
                    keys=[self._turns_key, self._bytes_key],
                    args=[*self._bounds(), self._lease_ms, *running],
                    client=pipe,
                )
                for claim in claims:
                    pipe.expire(claim, window)
                for session_id, members in self._watching.items():
                    key = self._key("replay-watchers", session_id)
                    pipe.zadd(key, dict.fromkeys(members, expiry))
                    pipe.pexpire(key, self._lease_ms)
                return list(await pipe.execute())

        results = await self._redis._call("replay renew", send, retry=True)
        self._note(results[0])

    # -- reading ----------------------------------------------------------------------------

    async def _read(self, operation: Callable[[], Awaitable[T]]) -> T:
        async def unless_closed() -> T:
            if self._closed:
                raise _Closed
            return await operation()

        result = await self._redis._call("replay read", unless_closed, retry=True)
        if _being_cancelled():
            # Cancelled while Redis answered: seen to come back with the answer instead of
            # the CancelledError (a blocking XREAD, redis-py 8), which would leave a
            # cancelled reader reading.
            raise asyncio.CancelledError
        return result

    async def _entries(
        self,
        stream: str,
        start: str,
        *,
        inclusive: bool,
        idle: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[_Entry, None]:
        """The stream's entries from ``start`` on, then live ones; ``idle`` is awaited when
        nothing came for a while (it raises to end the reading). Ends when the log closes.

        The past is read with XRANGE; at the end, the reader joins the stream's tail (one
        XREAD BLOCK for all of this server's readers of it), and reads Redis again whenever
        it falls behind what the tail keeps.
        """
        client = self._client
        last = start
        key = _id_key(start)
        cursor = start if inclusive else f"({start}"
        tail: _Tail | None = None
        try:
            while True:
                if tail is None or (position := tail.after(key)) is None:
                    page: Any = await self._read(
                        lambda: client.xrange(stream, cursor, "+", count=_PAGE)  # noqa: B023
                    )
                    for entry_id, fields in page:
                        entry = _Entry(entry_id, fields)
                        last, key = entry.id, entry.key
                        yield entry
                    cursor = f"({last}"
                    if len(page) == _PAGE:
                        continue
                    if tail is None:
                        tail = self._join_tail(stream, last)
                    elif key < tail.complete_after:
                        # What Redis had after ``last`` was read: what the tail dropped
                        # before it was deleted from the stream too.
                        key = tail.complete_after
                    continue
                trims = tail.trims
                entries = tail.entries
                while position < len(entries) and tail.trims == trims:
                    entry = entries[position]
                    position += 1
                    last, key = entry.id, entry.key
                    yield entry
                cursor = f"({last}"
                if tail.trims != trims or position < len(entries):
                    continue
                if tail.error is not None:
                    raise tail.error
                if self._closed:
                    return
                waited = tail.cursor
                await tail.wait()
                if tail.cursor == waited and idle is not None:
                    await idle()  # woken with nothing new: a while went by
        except _Closed:
            return
        except StoreUnavailable:
            if self._closed:
                return
            raise
        finally:
            if tail is not None:
                self._leave_tail(tail)

    def _join_tail(self, stream: str, last: str) -> _Tail:
        tail = self._tails.get(stream)
        if tail is None or tail.stopped or tail.task is None or tail.task.done():
            tail = self._tails[stream] = _Tail(stream, last)
            tail.task = asyncio.get_running_loop().create_task(self._read_tail(tail))
        tail.readers += 1
        return tail

    def _leave_tail(self, tail: _Tail) -> None:
        tail.readers -= 1
        if not tail.readers:
            tail.stopped = True
            if self._tails.get(tail.stream) is tail:
                del self._tails[tail.stream]

    async def _read_tail(self, tail: _Tail) -> None:
        client = self._client

        async def read() -> Any:
            if tail.stopped:
                raise _Closed
            return await client.xread({tail.stream: tail.cursor}, count=_PAGE, block=_BLOCK_MS)

        try:
            while not tail.stopped:
                found: Any = await self._read(read)
                for _name, items in found or ():
                    tail.add([_Entry(entry_id, fields) for entry_id, fields in items])
                # Also when nothing came: the readers check on their turns meanwhile.
                tail.wake()
        except _Closed:
            pass
        except StoreUnavailable as error:
            # A copy without this frame's traceback (which keeps the tail: a cycle).
            tail.error = StoreUnavailable(error.message, detail=error.detail)
        finally:
            if self._tails.get(tail.stream) is tail:
                del self._tails[tail.stream]
            tail.wake()
            # The task ends here; the tail must not keep it (its traceback keeps this frame,
            # which keeps the tail: a cycle the collector would have to find).
            tail.task = None

    async def _turn_record(self, session_id: str, turn_id: str) -> tuple[dict[str, str], str]:
        keys = [
            self._turns_key,
            self._bytes_key,
            self._key("replay-turn", session_id, turn_id),
            self._key("replay", session_id),
        ]
        bounds = self._bounds()
        result, flat, tail = await self._read(lambda: self._follow_start(keys=keys, args=bounds))
        self._note(result)
        record = {
            name.decode(): value.decode() for name, value in zip(flat[::2], flat[1::2], strict=True)
        }
        return record, tail.decode()

    async def follow(
        self, session_id: str, turn_id: str, after_seq: int
    ) -> AsyncGenerator[Event, None]:
        """The turn's events after ``after_seq``, then live until its end.

        :class:`~chat.errors.TurnNotFound` for a turn the log never had,
        :class:`~chat.errors.TurnOutOfRange` when events it asks for were dropped (before
        any event, or at the gap), :class:`~chat.errors.Unavailable` when the server running
        the turn stopped (its lease ran out) before the turn's end.
        """
        await self._sync(session_id)
        record, tail = await self._turn_record(session_id, turn_id)
        if not record:
            raise TurnNotFound(turn_id)
        if record.get("gone") or int(record.get("trimmed", "0")) > after_seq:
            raise TurnOutOfRange(turn_id)
        alive_key = self._key("replay-alive", session_id, turn_id)

        async def idle() -> None:
            # Nothing for a while: the turn may be quiet (a slow model), or its server dead.
            current, _ = await self._turn_record(session_id, turn_id)
            if not current or current.get("gone"):
                raise TurnOutOfRange(turn_id)
            if current.get("ended"):
                return  # its end is in the stream: the next read has it
            if not await self._read(lambda: self._client.exists(alive_key)):
                raise Unavailable(f"the server running turn {turn_id} stopped before its end")

        first = record.get("first")
        entries = self._entries(
            self._key("replay", session_id),
            first or tail,
            inclusive=first is not None,
            idle=idle,
        )
        wanted = turn_id.encode()
        expected = max(after_seq, 0) + 1
        async with contextlib.aclosing(entries):
            async for entry in entries:
                fields = entry.fields
                if fields.get(b"t") != wanted:
                    continue
                seq = int(fields[b"s"])
                if b"x" in fields:  # the end: its seq is the turn's last
                    if seq >= expected:
                        raise TurnOutOfRange(turn_id)
                    return
                if seq < expected:
                    continue
                if seq > expected:
                    raise TurnOutOfRange(turn_id)
                expected += 1
                yield entry.event()

    async def watch(self, session_id: str) -> AsyncGenerator[Event, None]:
        """Every event of every turn of the session from now on (a running turn from its
        oldest event held), from any server; counted as a watcher while open."""
        await self._sync(session_id)
        self._start_listener()  # a watcher gets the other servers' session updates too
        _turn, start, inclusive = await self._running_now(session_id)
        member = f"{self._replica}:{secrets.token_hex(6)}"
        await self._add_watcher(session_id, member)
        try:
            entries = self._entries(self._key("replay", session_id), start, inclusive=inclusive)
            async with contextlib.aclosing(entries):
                async for entry in entries:
                    if b"e" in entry.fields:
                        yield entry.event()
        finally:
            await asyncio.shield(self._remove_watcher(session_id, member))

    async def _running_now(self, session_id: str) -> tuple[str | None, str, bool]:
        keys = [self._key("replay-running", session_id), self._key("replay", session_id)]
        args = [self._redis.prefix, session_id]
        turn, start, inclusive = await self._read(
            lambda: self._running_script(keys=keys, args=args)
        )
        return (turn.decode() if turn else None), start.decode(), bool(inclusive)

    async def _add_watcher(self, session_id: str, member: str) -> None:
        key = self._key("replay-watchers", session_id)
        expiry = round(self._clock() * 1000) + self._lease_ms

        async def add() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {member: expiry})
                pipe.pexpire(key, self._lease_ms)
                await pipe.execute()

        await self._redis._call("replay watch", add, retry=True)
        self._watching.setdefault(session_id, set()).add(member)
        self._start_renewer()

    async def _remove_watcher(self, session_id: str, member: str) -> None:
        members = self._watching.get(session_id)
        if members is not None:
            members.discard(member)
            if not members:
                del self._watching[session_id]
        if self._closed:
            return  # aclose took them all out
        key = self._key("replay-watchers", session_id)
        try:
            await self._redis._call(
                "replay unwatch", lambda: self._client.zrem(key, member), retry=True
            )
        except StoreUnavailable as error:
            log.warning("replay log: a watcher stays counted for a lease: %s", error.detail)

    async def watchers(self, session_id: str) -> int:
        """Streams watching the session, on every server (a dead server's, for a lease)."""
        key = self._key("replay-watchers", session_id)
        now = round(self._clock() * 1000)
        found = await self._redis._call(
            "replay watchers", lambda: self._count_watchers(keys=[key], args=[now]), retry=True
        )
        return int(found)

    # -- claims and the running turn ----------------------------------------------------------

    async def claim(self, session_id: str, client_message_id: str, turn_id: str) -> str | None:
        """``None`` if ``client_message_id`` is now the session's for ``turn_id``, else the
        turn that has it already (on any server)."""
        key = self._key("replay-claim", session_id, client_message_id)
        keys = [
            key,
            self._key("replay-turn", session_id, turn_id),
            self._turns_key,
            self._key("replay-alive", session_id, turn_id),
        ]
        args: list[str | int] = [
            turn_id,
            self._window_seconds,
            f"{session_id}|{turn_id}",
            self._now_ms(),
            self._lease_ms,
        ]
        found = await self._redis._call(
            "replay claim",
            lambda: self._claim_script(keys=keys, args=args),
            # A retry after a lost reply finds its own claim: that is the claim made.
            retry=True,
        )
        if found is None or found.decode() == turn_id:
            self._claims[(session_id, turn_id)] = key
            return None
        return str(found.decode())

    async def running_turn(self, session_id: str) -> str | None:
        await self._sync(session_id)
        turn, _start, _inclusive = await self._running_now(session_id)
        return turn

    # -- what servers tell each other: INTERRUPTs, session updates -------------------------
    # One channel (p:replay-fleet), messages ``KIND|REPLICA|BODY``; a server ignores its own.

    def on_interrupt(self, callback: Callable[[str], None]) -> None:
        """``callback(session_id)`` when another server interrupts the session's turns."""
        self._interrupted = callback

    def on_update(self, callback: Callable[[Session, SessionUpdateKind, str], None]) -> None:
        """``callback(session, kind, message)`` for a session update on another server."""
        self._updated = callback

    async def interrupt(self, session_id: str) -> None:
        """Tell every other server to cancel its turns of the session (PUBLISH: those that
        listen now; a server runs a turn only while it listens)."""
        message = self._message(b"i", session_id.encode())
        channel = self._channel
        await self._redis._call(
            "replay interrupt",
            lambda: self._client.publish(channel, message),
            # Twice is harmless: the second finds nothing more to cancel (of that turn).
            retry=True,
        )

    def on_cancel(self, callback: Callable[[str, str, str], None]) -> None:
        """``callback(identity, session_id, request_id)`` for a CANCEL another server could
        not serve itself (a reply left running here by a stream that went away)."""
        self._cancelled = callback

    async def cancel(self, identity: str, session_id: str, request_id: str) -> None:
        """Pass a CANCEL on to the other servers (what it names is not on this one)."""
        message = self._message(b"c", json.dumps([identity, session_id, request_id]).encode())
        channel = self._channel
        await self._redis._call(
            "replay cancel",
            lambda: self._client.publish(channel, message),
            retry=True,  # twice is harmless, as for an interrupt
        )

    def publish_update(self, session: Session, kind: SessionUpdateKind, message: str) -> None:
        """Send a session update (typing, a change, a turn done) to the other servers' streams
        following the session, with this server's next write."""
        body = json.dumps(
            [session.session_id, session.message_count, session_values(session), int(kind), message]
        )
        self._pending_messages.append(self._message(b"u", body.encode()))
        self._start_listener()
        self._start_flusher()
        if not self._wake.is_set():
            self._wake.set()

    def _message(self, kind: bytes, body: bytes) -> bytes:
        return b"|".join((kind, self._replica.encode(), body))

    def _start_listener(self) -> None:
        if (
            self._listener is None
            and (self._interrupted or self._updated or self._cancelled) is not None
        ):
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        attempt = 0
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                attempt = 0
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_BLOCK_MS / 1000
                    )
                    if message is not None and message["type"] == "message":
                        self._heard(message["data"])
            except (RedisError, OSError) as error:
                attempt += 1
                log.warning("replay log: not hearing the other servers (%s); retrying", error)
                await asyncio.sleep(backoff(attempt, initial=0.1, maximum=5.0))
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _heard(self, data: bytes) -> None:
        kind, replica, body = data.split(b"|", 2)
        if replica == self._replica.encode():
            return
        try:
            if kind == b"i" and self._interrupted is not None:
                self._interrupted(body.decode())
            elif kind == b"c" and self._cancelled is not None:
                identity, session_id, request_id = json.loads(body)
                self._cancelled(identity, session_id, request_id)
            elif kind == b"u" and self._updated is not None:
                session_id, count, values, update, text = json.loads(body)
                session = session_from_values(session_id, values, count)
                self._updated(session, SessionUpdateKind(update), text)
        except Exception:
            # A newer server's message this one cannot read must not stop the listening.
            log.exception("replay log: a message from another server could not be handled")

    # -- the rest -----------------------------------------------------------------------------

    def stats(self) -> ReplayStats:
        """The fleet's turns and bytes as of this server's last call to Redis (and the turns
        it began since), the events and turns this server's calls dropped."""
        return ReplayStats(
            turns=self._turns + self._begun_unwritten,
            bytes=self._bytes,
            evicted_events=self._evicted_events,
            expired_turns=self._expired_turns,
        )

    async def aclose(self) -> None:
        """Write what is waiting (for a lease at most), end the readers, disconnect."""
        if self._closed:
            return
        try:
            async with asyncio.timeout(self._lease_ms / 1000):
                await self._sync()
        except TimeoutError:
            log.warning("replay log: closed with %d writes lost", len(self._pending))
        self._closed = True
        watching, self._watching = self._watching, {}
        if watching:

            async def unwatch() -> None:
                async with self._client.pipeline(transaction=False) as pipe:
                    for session_id, members in watching.items():
                        pipe.zrem(self._key("replay-watchers", session_id), *members)
                    await pipe.execute()

            try:
                await self._redis._call("replay unwatch", unwatch, retry=True)
            except StoreUnavailable as error:
                log.warning("replay log: watchers stay counted for a lease: %s", error.detail)
        tasks = [t for t in (self._flusher, self._renewer, self._listener) if t is not None]
        tasks += [tail.task for tail in self._tails.values() if tail.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose()

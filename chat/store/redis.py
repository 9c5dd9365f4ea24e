"""A :class:`~chat.store.SessionStore` in Redis: one store shared by a fleet of servers.

URL: ``redis://[user:password@]host:port/db?prefix=NAME&lock_lease=SECONDS`` (``rediss://``
for TLS). Every key starts with ``NAME:`` (default ``grpc-chat``), so several deployments can
share one Redis. Layout, for a prefix ``p``:

=========================  ===========  ====================================================
key                        type         holds
=========================  ===========  ====================================================
``p:session:ID``           hash         the session's fields
``p:messages:ID``          list         its messages, oldest first (one JSON array each)
``p:by-created``           sorted set   ``CREATED_AT|ID`` at score 0: listing, newest first
``p:by-activity``          sorted set   ``ID`` scored by last activity (µs): eviction, expiry
``p:by-owner:NAME``        sorted set   like ``by-created``, for the sessions of one identity
``p:schema``               string       the layout version (2: ``by-owner`` exists)
``p:lock:ID``              string       the turn lock's owner token, with a lease
``p:append:OP``            string       marks an append as done, so a retry never repeats it
``p:secret:NAME``          string       a secret shared by the servers (signs page tokens)
=========================  ===========  ====================================================

Sessions written before owners existed have no ``owner`` field and belong to ``anonymous``;
:meth:`RedisStore.open` indexes them under ``p:by-owner:anonymous`` once (layout 1 to 2).

Every write is one Lua script, so it is atomic: an append pushes its messages and moves the
session's activity together or not at all. Scripts name the keys they touch from the prefix,
which is fine on a standalone Redis or a primary with replicas but not on Redis Cluster.

A lost connection becomes :class:`~chat.errors.StoreUnavailable` (gRPC ``UNAVAILABLE``).
Operations are retried (three attempts) when a retry cannot change the outcome: reads, the
lock, updates, retention, and appends (each carries a unique operation id the script
remembers for ten minutes). ``create`` and ``delete`` are not retried.

:meth:`RedisStore.lock` is a lease: ``SET NX PX`` with a random token, renewed while held,
released with compare-and-delete. A server that dies holding it blocks the session for at
most ``lock_lease`` seconds (default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chat.backoff import backoff
from chat.errors import ConfigurationError, MissingExtra, SessionNotFound, StoreUnavailable
from chat.store import OwnerLimitReached, SessionPage
from chat.store._codec import (
    STORED_DEFAULTS,
    decode_message,
    encode_message,
    patch_values,
    session_from_values,
    session_values,
)
from chat.store._cursor import decode_cursor, encode_cursor
from chat.store._locks import LocalLocks
from chat.types import Message, Session, SessionPatch, format_timestamp, parse_timestamp

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as error:
    raise MissingExtra("the Redis session store", "redis") from error

__all__ = ["DEFAULT_LOCK_LEASE", "DEFAULT_PREFIX", "RedisStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "grpc-chat"
#: Seconds a turn lock outlives a server that stopped renewing it.
DEFAULT_LOCK_LEASE = 10.0

_ATTEMPTS = 3
#: Seconds an append's operation id is remembered (far longer than any retry takes).
_APPEND_MEMORY = 600
_BATCH = 500

# -- scripts ------------------------------------------------------------------------------
# Each returns what the caller needs, so that one operation is one round trip.

_SESSION_STATE = """
local function state(hash, list)
  return {redis.call('HGETALL', hash), redis.call('LLEN', list)}
end
"""

_GET = (
    _SESSION_STATE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return state(KEYS[1], KEYS[2])
"""
)

# KEYS: session, messages, by-created, by-activity, by-owner
# ARGV: id, created_member, activity_score, max_owned (-1: none), then field/value pairs
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local max_owned = tonumber(ARGV[4])
if max_owned >= 0 then
  local owned = redis.call('ZCARD', KEYS[5])
  if owned >= max_owned then return -1 - owned end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[2])
return 1
"""

# KEYS: session, messages, by-activity
# ARGV: id, activity_score, last_activity, then field/value/default triples. The activity
# moves only when a field changes (a record written before a field existed holds its
# default).
_UPDATE = (
    _SESSION_STATE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local changed = false
for i = 4, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i]) or ARGV[i + 2]
  if current ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    changed = true
  end
end
if changed then
  redis.call('HSET', KEYS[1], 'last_activity', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
return state(KEYS[1], KEYS[2])
"""
)

# KEYS: session, messages: the session and its whole history at one moment.
_READ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS: session, messages, by-created, by-activity; ARGV: id, prefix
_DELETE = """
local created = redis.call('HGET', KEYS[1], 'created_at')
if not created then return -1 end
local owner = redis.call('HGET', KEYS[1], 'owner') or 'anonymous'
local count = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], created .. '|' .. ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', ARGV[2] .. ':by-owner:' .. owner, created .. '|' .. ARGV[1])
return count
"""

# KEYS: session, messages, by-activity, operation marker
# ARGV: id, last_activity, activity_score, seconds to remember the operation, message 1..n
_APPEND = (
    _SESSION_STATE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[4]) then
  return state(KEYS[1], KEYS[2])
end
if #ARGV > 4 then
  for first = 5, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
  redis.call('HSET', KEYS[1], 'last_activity', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
return state(KEYS[1], KEYS[2])
"""
)

# KEYS: session, messages; ARGV: keep
_TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local excess = redis.call('LLEN', KEYS[2]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
redis.call('LTRIM', KEYS[2], excess, -1)
return excess
"""

_DROP_SESSIONS = """
local function drop(prefix, ids)
  for _, id in ipairs(ids) do
    local hash = prefix .. ':session:' .. id
    local created = redis.call('HGET', hash, 'created_at')
    if created then
      local owner = redis.call('HGET', hash, 'owner') or 'anonymous'
      redis.call('ZREM', KEYS[1], created .. '|' .. id)
      redis.call('ZREM', prefix .. ':by-owner:' .. owner, created .. '|' .. id)
    end
    redis.call('DEL', hash, prefix .. ':messages:' .. id)
    redis.call('ZREM', KEYS[2], id)
  end
  return ids
end
"""

# KEYS: by-created, by-activity; ARGV: prefix, keep, batch
_EVICT = (
    _DROP_SESSIONS
    + """
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if excess <= 0 then return {} end
local n = math.min(excess, tonumber(ARGV[3]))
return drop(ARGV[1], redis.call('ZRANGE', KEYS[2], 0, n - 1))
"""
)

# KEYS: by-created, by-activity; ARGV: prefix, activity_score_before, batch
_EXPIRE = (
    _DROP_SESSIONS
    + """
local ids = redis.call('ZRANGE', KEYS[2], '-inf', '(' .. ARGV[2], 'BYSCORE', 'LIMIT', 0, ARGV[3])
return drop(ARGV[1], ids)
"""
)

# KEYS: by-created; ARGV: prefix, max (exclusive lex bound or '+'), count
_LIST = """
local members = redis.call('ZRANGE', KEYS[1], ARGV[2], '-', 'BYLEX', 'REV', 'LIMIT', 0, ARGV[3])
local out = {}
for i, member in ipairs(members) do
  local id = string.sub(member, string.find(member, '|', 1, true) + 1)
  local hash = ARGV[1] .. ':session:' .. id
  out[i] = {member, redis.call('HGETALL', hash), redis.call('LLEN', ARGV[1] .. ':messages:' .. id)}
end
return out
"""

# KEYS: lock; ARGV: token, lease_ms. Idempotent, so that a retried acquire never waits for
# its own first attempt's lease.
# KEYS: by-created, schema; ARGV: prefix, min (exclusive lex bound or '-'), count. Indexes a
# batch of sessions by owner; at the end of by-created, marks the layout as version 2.
_INDEX_OWNERS = """
local members = redis.call('ZRANGE', KEYS[1], ARGV[2], '+', 'BYLEX', 'LIMIT', 0, ARGV[3])
for _, member in ipairs(members) do
  local id = string.sub(member, string.find(member, '|', 1, true) + 1)
  local owner = redis.call('HGET', ARGV[1] .. ':session:' .. id, 'owner') or 'anonymous'
  redis.call('ZADD', ARGV[1] .. ':by-owner:' .. owner, 0, member)
end
if #members < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], '2') end
return members[#members] or false
"""

_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if owner then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: secret; ARGV: a fresh value, used if there is none yet
_SECRET = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _micros(moment: datetime) -> int:
    # Integer microseconds are exact in a sorted-set score (a double) until the year 2255.
    return round(moment.astimezone(UTC).timestamp() * 1_000_000)


def _created_member(session: Session) -> str:
    # Fixed-width RFC 3339 sorts as time, so the member's byte order is the listing order.
    return f"{format_timestamp(session.created_at)}|{session.session_id}"


def _session(session_id: str, state: Sequence[Any]) -> Session:
    flat, count = state
    values = dict(zip(flat[::2], flat[1::2], strict=True))
    return session_from_values(session_id, values, int(count))


def _parse_url(url: str) -> tuple[str, str, float, str]:
    """``(client_url, prefix, lock_lease, location)`` from a store URL."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = query.pop("prefix", DEFAULT_PREFIX)
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigurationError(f"prefix={prefix!r} in the Redis store URL must be a word")
    try:
        lease = float(query.pop("lock_lease", DEFAULT_LOCK_LEASE))
    except ValueError:
        raise ConfigurationError("lock_lease in the Redis store URL must be seconds") from None
    if not 0.1 <= lease <= 3600:
        raise ConfigurationError(f"lock_lease must be between 0.1 and 3600 seconds, not {lease}")
    client_url = urlunsplit(parts._replace(query=urlencode(query)))
    host = parts.hostname or "localhost"
    netloc = f"{host}:{parts.port or 6379}"
    location = urlunsplit((parts.scheme, netloc, parts.path or "/0", "", "")) + f" prefix {prefix}"
    return client_url, prefix, lease, location


class RedisStore:
    """Sessions in Redis, shared by every server that uses the same URL and prefix.

    >>> store = RedisStore("redis://localhost:6379/0?prefix=staging")    # doctest: +SKIP
    >>> await store.open()                                              # doctest: +SKIP
    """

    kind = "redis"

    def __init__(
        self, url: str, *, decode_responses: bool = True, max_connections: int | None = None
    ) -> None:
        # For the replay log: a client that keeps bytes (its events are protobuf), with room
        # for a connection per reader waiting in XREAD BLOCK.
        client_url, self.prefix, self.lock_lease, self._location = _parse_url(url)
        #: The URL this store was opened with (the replay log shares it; secrets and all,
        #: so never logged: :attr:`location` is what logs show).
        self.url = url
        settings = dict(parse_qsl(urlsplit(client_url).query))
        defaults: dict[str, Any] = {}
        # Without a socket timeout a silent network partition hangs every call forever.
        if "socket_timeout" not in settings:
            defaults["socket_timeout"] = 10.0
        if "socket_connect_timeout" not in settings:
            defaults["socket_connect_timeout"] = 5.0
        if max_connections is not None and "max_connections" not in settings:
            defaults["max_connections"] = max_connections
        # redis-py retries every command by default, an append included, which could store
        # a turn twice; this store decides what to retry itself.
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            client_url,
            decode_responses=decode_responses,
            retry=Retry(NoBackoff(), 0),
            **defaults,
        )
        script = self._client.register_script
        self._scripts = {
            name: script(source)
            for name, source in {
                "get": _GET,
                "create": _CREATE,
                "update": _UPDATE,
                "read": _READ,
                "delete": _DELETE,
                "append": _APPEND,
                "trim": _TRIM,
                "evict": _EVICT,
                "expire": _EXPIRE,
                "list": _LIST,
                "index owners": _INDEX_OWNERS,
                "acquire": _ACQUIRE,
                "renew": _RENEW,
                "release": _RELEASE,
                "secret": _SECRET,
            }.items()
        }
        self._created_key = self._key("by-created")
        self._activity_key = self._key("by-activity")
        self._locks = LocalLocks()
        self._closed = False

    @property
    def location(self) -> str:
        return self._location

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _owner_key(self, owner: str) -> str:
        return self._key("by-owner", owner)

    # -- calling Redis ----------------------------------------------------------------------

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        attempts = _ATTEMPTS if retry else 1
        for attempt in range(attempts):
            try:
                return await operation()
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                if attempt + 1 < attempts:
                    # DEBUG: during an outage every request fails so; the server's store
                    # health logs the outage once.
                    log.debug("Redis %s failed (%s); retrying", what, error)
                    await asyncio.sleep(
                        backoff(attempt + 1, initial=0.05, maximum=0.25, multiplier=5)
                    )
                    continue
                reason = str(error).rstrip(".") or type(error).__name__
                raise StoreUnavailable(
                    detail=f"the session store (Redis at {self._location}) is unreachable "
                    f"({reason}); check that Redis is running"
                ) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, retry: bool
    ) -> Any:
        script = self._scripts[name]
        return await self._call(name, lambda: script(keys=list(keys), args=list(args)), retry=retry)

    async def open(self) -> None:
        if self._closed:
            raise StoreUnavailable(detail=f"the Redis store {self._location} is closed")
        await self._call("ping", self._client.ping, retry=True)
        schema = self._key("schema")
        if await self._call("schema", lambda: self._client.get(schema), retry=True) != "2":
            await self._index_owners(schema)
        log.info("using Redis store %s", self._location)

    async def _index_owners(self, schema: str) -> None:
        """Upgrade the layout from 1 to 2: index every session by its owner (idempotent)."""
        bound = "-"
        while True:
            last = await self._script(
                "index owners",
                [self._created_key, schema],
                [self.prefix, bound, _BATCH],
                retry=True,
            )
            if not last:
                break
            bound = f"({last}"
        log.info("Redis store %s: sessions indexed by owner (layout v2)", self._location)

    async def aclose(self) -> None:
        self._closed = True
        await self._client.aclose()

    async def ping(self) -> None:
        await self._call("ping", self._client.ping, retry=False)

    async def secret(self, name: str) -> bytes:
        value = await self._script(
            "secret", [self._key("secret", name)], [secrets.token_hex(32)], retry=True
        )
        return bytes.fromhex(value)

    # -- operations -------------------------------------------------------------------------

    def _session_keys(self, session_id: str) -> list[str]:
        return [self._key("session", session_id), self._key("messages", session_id)]

    async def create(self, session: Session, *, max_owned: int | None = None) -> None:
        fields = session_values(session)
        created = await self._script(
            "create",
            [
                *self._session_keys(session.session_id),
                self._created_key,
                self._activity_key,
                self._owner_key(session.owner),
            ],
            [
                session.session_id,
                _created_member(session),
                _micros(session.last_activity),
                -1 if max_owned is None else max_owned,
                *(item for pair in fields.items() for item in pair),
            ],
            retry=False,
        )
        if created < 0:
            raise OwnerLimitReached(session.owner, -1 - int(created))
        if not created:
            raise ValueError(f"session {session.session_id!r} already exists")

    async def get(self, session_id: str) -> Session:
        state = await self._script("get", self._session_keys(session_id), [], retry=True)
        if state is None:
            raise SessionNotFound(session_id)
        return _session(session_id, state)

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        triples = [
            (name, value, STORED_DEFAULTS.get(name, ""))
            for name, value in patch_values(patch).items()
        ]
        state = await self._script(
            "update",
            [*self._session_keys(session_id), self._activity_key],
            [
                session_id,
                _micros(now),
                format_timestamp(now),
                *(item for triple in triples for item in triple),
            ],
            retry=True,
        )
        if state is None:
            raise SessionNotFound(session_id)
        return _session(session_id, state)

    async def delete(self, session_id: str) -> int:
        count = await self._script(
            "delete",
            [*self._session_keys(session_id), self._created_key, self._activity_key],
            [session_id, self.prefix],
            retry=False,
        )
        if count < 0:
            raise SessionNotFound(session_id)
        return int(count)

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, owner: str | None = None
    ) -> SessionPage:
        index = self._created_key if owner is None else self._owner_key(owner)
        if cursor is None:
            bound = "+"
        else:
            created_at, session_id = decode_cursor(cursor)
            bound = f"({format_timestamp(created_at)}|{session_id}"
        rows = await self._script("list", [index], [self.prefix, bound, limit + 1], retry=True)
        page = rows[:limit]
        sessions = [
            _session(member.partition("|")[2], (flat, count))
            for member, flat, count in page
            # Gone between the index and the hash cannot happen inside one script, but a
            # hash without fields would be a broken entry: skip it rather than fail a page.
            if flat
        ]
        next_cursor = None
        if len(rows) > limit and page:
            stamp, _, session_id = page[-1][0].partition("|")
            next_cursor = encode_cursor(parse_timestamp(stamp), session_id)
        return SessionPage(sessions, next_cursor)

    async def count(self, *, owner: str | None = None) -> int:
        index = self._activity_key if owner is None else self._owner_key(owner)
        return int(await self._call("count", lambda: self._client.zcard(index), retry=True))

    async def messages(self, session_id: str) -> list[Message]:
        _session, history = await self.read(session_id)
        return history

    async def read(self, session_id: str) -> tuple[Session, list[Message]]:
        found = await self._script("read", self._session_keys(session_id), [], retry=True)
        if found is None:
            raise SessionNotFound(session_id)
        flat, raw = found
        history = [decode_message(item) for item in raw]
        return _session(session_id, (flat, len(history))), history

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        last_activity = messages[-1].created_at if messages else None
        operation = uuid.uuid4().hex
        state = await self._script(
            "append",
            [*self._session_keys(session_id), self._activity_key, self._key("append", operation)],
            [
                session_id,
                "" if last_activity is None else format_timestamp(last_activity),
                0 if last_activity is None else _micros(last_activity),
                _APPEND_MEMORY,
                *(encode_message(message) for message in messages),
            ],
            # Safe: the script remembers the operation id, so a retry of an append that did
            # happen (its reply lost with the connection) only reads the session back.
            retry=True,
        )
        if state is None:
            raise SessionNotFound(session_id)
        return _session(session_id, state)

    async def trim(self, session_id: str, keep: int) -> int:
        trimmed = await self._script("trim", self._session_keys(session_id), [keep], retry=True)
        if trimmed < 0:
            raise SessionNotFound(session_id)
        return int(trimmed)

    async def evict(self, keep: int) -> list[str]:
        evicted: list[str] = []
        while True:
            batch = await self._script(
                "evict",
                [self._created_key, self._activity_key],
                [self.prefix, keep, _BATCH],
                retry=True,
            )
            evicted.extend(batch)
            if len(batch) < _BATCH:
                return evicted

    async def expire(self, idle_before: datetime) -> list[str]:
        expired: list[str] = []
        while True:
            batch = await self._script(
                "expire",
                [self._created_key, self._activity_key],
                [self.prefix, _micros(idle_before), _BATCH],
                retry=True,
            )
            expired.extend(batch)
            if len(batch) < _BATCH:
                return expired

    # -- the turn lock ----------------------------------------------------------------------

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._lock(session_id)

    @asynccontextmanager
    async def _lock(self, session_id: str) -> AsyncIterator[None]:
        # Turns of this process queue up locally first (FIFO, no Redis traffic while
        # waiting); the lease in Redis orders them with the other servers.
        async with self._locks.hold(session_id):
            key = self._key("lock", session_id)
            token = secrets.token_hex(16)
            try:
                await self._acquire(session_id, key, token)
            except BaseException:
                # Cancelled (or cut off) after Redis took the lock but before the reply was
                # read, the lock would block the session for a whole lease: release it (a
                # compare-and-delete, so nothing happens if it was not taken).
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self._release(key, token))
                raise
            renewer = asyncio.create_task(self._renew(session_id, key, token))
            try:
                yield
            finally:
                renewer.cancel()
                await asyncio.wait((renewer,))
                try:
                    await asyncio.shield(self._release(key, token))
                except StoreUnavailable as error:
                    log.warning(
                        "could not release the lock of session %s (%s); it expires in %.1fs",
                        session_id,
                        error.detail,
                        self.lock_lease,
                    )

    @property
    def _lease_ms(self) -> int:
        return round(self.lock_lease * 1000)

    async def _acquire(self, session_id: str, key: str, token: str) -> None:
        polls = 0
        while not await self._script("acquire", [key], [token, self._lease_ms], retry=True):
            if not polls:
                log.debug("session %s is locked by another server; waiting", session_id)
            polls += 1
            # Polling: the holder is another process, which may also die without releasing;
            # the lease bounds the wait in that case.
            await asyncio.sleep(backoff(polls, initial=0.005, maximum=0.1, jitter=0.5))

    async def _renew(self, session_id: str, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lock_lease / 3)
            try:
                held = await self._script("renew", [key], [token, self._lease_ms], retry=True)
            except StoreUnavailable as error:
                log.warning("could not renew the lock of session %s: %s", session_id, error.detail)
                continue
            if not held:
                log.error(
                    "lost the lock of session %s (its lease of %.1fs ran out before renewal): "
                    "another server may run a turn on it at the same time",
                    session_id,
                    self.lock_lease,
                )
                return

    async def _release(self, key: str, token: str) -> None:
        await self._script("release", [key], [token], retry=True)

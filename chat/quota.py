"""Per-identity quotas and rate limits (each optional, all off by default).

============================  ==============================================================
option                        limit
============================  ==============================================================
``--rate-limit-messages``     ``N/PERIOD``: MESSAGE and RETRY requests per period
``--token-budget``            ``N/PERIOD``: tokens per period (what the backend reports for
                              prompt and reply; estimated where it reports none)
``--max-streams-per-identity``  ``Chat`` streams open at once
``--max-sessions-per-identity`` sessions stored
============================  ==============================================================

``PERIOD`` is a number and a unit: ``30s``, ``5m``, ``1h``, ``1d``. Periods are fixed windows
(a new one starts every PERIOD since the epoch) and ``retry_after`` is the time to the next.
A message is counted when it is accepted; tokens when the turn ends; a turn is refused while
the budget is used up (a reply already streaming is finished and counted).

Counters (:class:`Counters`) are per process (:class:`LocalCounters`) with the memory and
SQLite stores, and shared by every replica with the Redis store (:class:`RedisCounters`:
each check-and-count is one Lua script, so atomic). Open streams are counted in Redis as
leases renewed by the server holding them, so a replica that dies frees its streams within
:data:`STREAM_LEASE` seconds. Sessions are counted by the session store as it creates one,
in the same step (``SessionStore.create(max_owned=...)``: a SQLite transaction, a Redis
script), so no two servers pass the limit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from chat.errors import ConfigurationError, QuotaExceeded

__all__ = [
    "STREAM_LEASE",
    "Counters",
    "LocalCounters",
    "QuotaKeeper",
    "QuotaUsage",
    "Quotas",
    "Rate",
    "RedisCounters",
    "parse_period",
]

log = logging.getLogger(__name__)

#: Seconds an open stream is counted in Redis without its server renewing the lease.
STREAM_LEASE = 30.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_period(text: str) -> float:
    """Seconds in ``30s``, ``5m``, ``1h``, ``1d`` (a bare number is seconds).

    >>> parse_period("1h"), parse_period("90")
    (3600.0, 90.0)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match[1]) <= 0:
        raise ConfigurationError(f"period {text!r} must be a positive number with s, m, h or d")
    return float(match[1]) * _UNITS[match[2] or "s"]


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` per ``period`` seconds.

    >>> Rate.parse("20/60s")
    Rate(limit=20, period=60.0)
    """

    limit: int
    period: float

    def __post_init__(self) -> None:
        if self.limit < 1 or not self.period > 0:
            raise ConfigurationError(f"a rate needs a limit >= 1 and a period > 0, not {self}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        count, slash, period = text.partition("/")
        if not slash or not count.strip().isdigit():
            raise ConfigurationError(f"{text!r} is not N/PERIOD (e.g. 20/60s, 100000/1d)")
        return cls(int(count), parse_period(period))

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}s"


@dataclass(frozen=True, slots=True)
class Quotas:
    """The limits of every identity (``None``: no limit)."""

    messages: Rate | None = None
    tokens: Rate | None = None
    max_streams: int | None = None
    max_sessions: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_sessions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"{name} must be >= 1, not {value}")

    @property
    def any(self) -> bool:
        return any(
            v is not None for v in (self.messages, self.tokens, self.max_streams, self.max_sessions)
        )


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One limit and the caller's use of it now (``WhoAmI``)."""

    #: The option that sets it: ``rate-limit-messages``, ``token-budget``,
    #: ``max-streams-per-identity``, ``max-sessions-per-identity``.
    name: str
    limit: int
    used: int
    #: Length of the period in seconds; 0 for a limit on what exists at once.
    period_seconds: float = 0.0
    #: Seconds until the current period ends (and ``used`` starts again from 0).
    resets_in_seconds: float = 0.0


class Counters(Protocol):
    """Fixed-window counters and stream leases, keyed by identity."""

    async def take(self, key: str, amount: int, limit: int, period: float) -> tuple[bool, int]:
        """Add ``amount`` unless that would pass ``limit``: ``(taken, used)``."""
        ...

    async def add(self, key: str, amount: int, period: float) -> int:
        """Add ``amount`` whatever the limit; the new total of the window."""
        ...

    async def used(self, key: str, period: float) -> int: ...

    async def open_stream(self, key: str, stream: str, limit: int) -> bool:
        """Count ``stream`` open under ``key`` unless ``limit`` are open already."""
        ...

    async def close_stream(self, key: str, stream: str) -> None: ...

    async def streams(self, key: str) -> int: ...

    async def aclose(self) -> None: ...


def _window(period: float, now: float) -> tuple[int, float]:
    """The index of the window ``now`` is in, and seconds until it ends."""
    index = math.floor(now / period)
    return index, (index + 1) * period - now


class LocalCounters:
    """Counters in this process (memory and SQLite stores)."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}
        self._streams: dict[str, set[str]] = {}

    def _current(self, key: str, period: float) -> tuple[int, int]:
        index, _ = _window(period, time.time())
        window, used = self._windows.get(key, (index, 0))
        return index, used if window == index else 0

    async def take(self, key: str, amount: int, limit: int, period: float) -> tuple[bool, int]:
        index, used = self._current(key, period)
        if used + amount > limit:
            return False, used
        self._windows[key] = (index, used + amount)
        return True, used + amount

    async def add(self, key: str, amount: int, period: float) -> int:
        index, used = self._current(key, period)
        self._windows[key] = (index, used + amount)
        return used + amount

    async def used(self, key: str, period: float) -> int:
        return self._current(key, period)[1]

    async def open_stream(self, key: str, stream: str, limit: int) -> bool:
        open_now = self._streams.setdefault(key, set())
        if len(open_now) >= limit:
            return False
        open_now.add(stream)
        return True

    async def close_stream(self, key: str, stream: str) -> None:
        open_now = self._streams.get(key)
        if open_now is not None:
            open_now.discard(stream)
            if not open_now:
                del self._streams[key]

    async def streams(self, key: str) -> int:
        return len(self._streams.get(key, ()))

    async def aclose(self) -> None:
        return None


# KEYS: counter; ARGV: amount, limit (or -1: none), ttl_ms
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if limit >= 0 and used + amount > limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], amount)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""

# KEYS: streams; ARGV: stream, limit, now_ms, lease_ms
_OPEN_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3] + ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: streams; ARGV: now_ms
_COUNT_STREAMS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""


class RedisCounters:
    """Counters shared by every server on one Redis (the session store's URL and prefix)."""

    def __init__(self, url: str, *, lease: float = STREAM_LEASE) -> None:
        from chat.store.redis import RedisStore

        # The session store's client settings and error handling, not its data.
        self._redis = RedisStore(url)
        self._lease_ms = round(lease * 1000)
        self._held: dict[str, set[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def _key(self, key: str) -> str:
        return self._redis._key("quota", key)

    async def _eval(self, what: str, script: str, keys: list[str], *args: str | int) -> Any:
        client = self._redis._client
        return await self._redis._call(
            f"quota {what}",
            lambda: client.eval(script, len(keys), *keys, *args),
            # Counting twice is worse than failing once: a lost reply is not retried.
            retry=False,
        )

    async def take(self, key: str, amount: int, limit: int, period: float) -> tuple[bool, int]:
        index, _ = _window(period, time.time())
        ttl = round(period * 1000) + 1000
        taken, used = await self._eval(
            "take", _TAKE, [self._key(f"{key}:{index}")], amount, limit, ttl
        )
        return bool(taken), int(used)

    async def add(self, key: str, amount: int, period: float) -> int:
        index, _ = _window(period, time.time())
        ttl = round(period * 1000) + 1000
        _, used = await self._eval("add", _TAKE, [self._key(f"{key}:{index}")], amount, -1, ttl)
        return int(used)

    async def used(self, key: str, period: float) -> int:
        index, _ = _window(period, time.time())
        client = self._redis._client
        full = self._key(f"{key}:{index}")
        value = await self._redis._call(
            "quota used",
            lambda: client.get(full),
            retry=True,
        )
        return int(value or 0)

    async def open_stream(self, key: str, stream: str, limit: int) -> bool:
        now = round(time.time() * 1000)
        opened = await self._eval(
            "open stream", _OPEN_STREAM, [self._key(key)], stream, limit, now, self._lease_ms
        )
        if opened:
            self._held.setdefault(key, set()).add(stream)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew())
        return bool(opened)

    async def close_stream(self, key: str, stream: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.discard(stream)
            if not held:
                del self._held[key]
        client = self._redis._client
        full = self._key(key)
        await self._redis._call(
            "quota close stream",
            lambda: client.zrem(full, stream),
            retry=True,
        )

    async def streams(self, key: str) -> int:
        now = round(time.time() * 1000)
        return int(await self._eval("count streams", _COUNT_STREAMS, [self._key(key)], now))

    async def _renew(self) -> None:
        client = self._redis._client
        while self._held:
            await asyncio.sleep(self._lease_ms / 3000)
            expiry = round(time.time() * 1000) + self._lease_ms
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for key, streams in list(self._held.items()):
                        full = self._key(key)
                        pipe.zadd(full, dict.fromkeys(streams, expiry), xx=True)
                        pipe.pexpire(full, self._lease_ms)
                    await pipe.execute()
            except Exception as error:  # noqa: BLE001 - the next round tries again
                log.warning("could not renew the stream leases in Redis: %s", error)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait((self._renewer,))
        await self._redis.aclose()


def open_counters(store_url: str) -> Counters:
    """Shared counters for a Redis store, else counters of this process."""
    scheme = store_url.partition("://")[0]
    if scheme in ("redis", "rediss", "unix"):
        return RedisCounters(store_url)
    return LocalCounters()


class QuotaKeeper:
    """Applies :class:`Quotas` to identities with :class:`Counters`."""

    def __init__(self, quotas: Quotas | None = None, counters: Counters | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.counters = counters or LocalCounters()

    async def admit_message(self, identity: str) -> None:
        """Count a MESSAGE or RETRY; :class:`QuotaExceeded` when over a limit (not counted)."""
        quotas = self.quotas
        if quotas.tokens is not None:
            budget = quotas.tokens
            used = await self.counters.used(f"tokens:{identity}", budget.period)
            if used >= budget.limit:
                raise QuotaExceeded(
                    "token-budget",
                    f"{used} of {budget.limit} tokens used in this period of "
                    f"{budget.period:g}s; try again later",
                    _window(budget.period, time.time())[1],
                )
        if quotas.messages is not None:
            rate = quotas.messages
            taken, used = await self.counters.take(
                f"messages:{identity}", 1, rate.limit, rate.period
            )
            if not taken:
                raise QuotaExceeded(
                    "rate-limit-messages",
                    f"{rate.limit} messages per {rate.period:g}s; try again later",
                    _window(rate.period, time.time())[1],
                )

    async def spend_tokens(self, identity: str, tokens: int) -> None:
        budget = self.quotas.tokens
        if budget is not None and tokens > 0:
            await self.counters.add(f"tokens:{identity}", tokens, budget.period)

    def check_sessions(self, identity: str, owned: int) -> None:
        limit = self.quotas.max_sessions
        if limit is not None and owned >= limit:
            raise QuotaExceeded(
                "max-sessions-per-identity",
                f"you have {owned} sessions and the limit is {limit}: delete one first",
            )

    @contextlib.asynccontextmanager
    async def stream(self, identity: str) -> AsyncIterator[None]:
        """Hold one of the identity's stream slots while the block runs."""
        limit = self.quotas.max_streams
        if limit is None:
            yield
            return
        key, stream = f"streams:{identity}", uuid.uuid4().hex
        if not await self.counters.open_stream(key, stream, limit):
            raise QuotaExceeded(
                "max-streams-per-identity",
                f"{limit} Chat streams may be open at once; close one first",
            )
        try:
            yield
        finally:
            await asyncio.shield(self.counters.close_stream(key, stream))

    async def usage(self, identity: str, owned_sessions: int | None) -> list[QuotaUsage]:
        """Every limit that is set and the identity's use of it now."""
        quotas, now, out = self.quotas, time.time(), []
        if quotas.messages is not None:
            rate = quotas.messages
            used = await self.counters.used(f"messages:{identity}", rate.period)
            out.append(
                QuotaUsage(
                    "rate-limit-messages",
                    rate.limit,
                    used,
                    rate.period,
                    _window(rate.period, now)[1],
                )
            )
        if quotas.tokens is not None:
            budget = quotas.tokens
            used = await self.counters.used(f"tokens:{identity}", budget.period)
            out.append(
                QuotaUsage(
                    "token-budget",
                    budget.limit,
                    used,
                    budget.period,
                    _window(budget.period, now)[1],
                )
            )
        if quotas.max_streams is not None:
            used = await self.counters.streams(f"streams:{identity}")
            out.append(QuotaUsage("max-streams-per-identity", quotas.max_streams, used))
        if quotas.max_sessions is not None and owned_sessions is not None:
            out.append(QuotaUsage("max-sessions-per-identity", quotas.max_sessions, owned_sessions))
        return out

    async def aclose(self) -> None:
        await self.counters.aclose()

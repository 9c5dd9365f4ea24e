"""Retention: how long sessions live and how large they grow, and counting what is dropped.

:class:`Retention` is the policy (part of the frozen server config, all off by default).
:class:`RetentionKeeper` applies it to a store for one :class:`~chat.core.ChatCore`: it trims a
session's oldest messages after each stored turn, evicts the least recently active sessions
after a session is created (and on every sweep), and deletes idle sessions on a periodic
sweep. Everything it drops is counted in :class:`~chat.stats.ServerStats` and logged.

>>> Retention(session_ttl=3600, max_sessions=10_000).active
True
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from chat.errors import ChatError, ConfigurationError, SessionNotFound
from chat.stats import ServerStats
from chat.store import SessionStore
from chat.types import Session, SessionPatch, utcnow

__all__ = ["Retention", "RetentionKeeper"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retention:
    """What the server keeps; ``None`` switches a limit off (the default for each).

    ``session_ttl``: seconds a session may stay idle (no turn, no update) before it is
    deleted. ``max_sessions``: sessions kept; creating one more deletes the least recently
    active. ``max_messages_per_session``: messages kept per session; storing a turn beyond it
    deletes the session's oldest messages.
    """

    session_ttl: float | None = None
    max_sessions: int | None = None
    max_messages_per_session: int | None = None

    def __post_init__(self) -> None:
        if self.session_ttl is not None and not self.session_ttl > 0:
            raise ConfigurationError(f"session_ttl must be > 0 seconds, not {self.session_ttl}")
        for name in ("max_sessions", "max_messages_per_session"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"{name} must be >= 1, not {value}")

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return (
            self.session_ttl is not None
            or self.max_sessions is not None
            or self.max_messages_per_session is not None
        )

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: a tenth of the TTL, between 1 second and 1 minute."""
        if self.session_ttl is None:
            return 60.0
        return min(max(self.session_ttl / 10, 1.0), 60.0)


class RetentionKeeper:
    """Applies a :class:`Retention` to ``store``, counting drops in ``stats``."""

    def __init__(self, store: SessionStore, retention: Retention, stats: ServerStats) -> None:
        self.store = store
        self.retention = retention
        self.stats = stats

    async def turn_starting(self, session_id: str) -> Session:
        """The session a turn is about to use, marked active if sessions can be dropped.

        Touching it makes it the most recently active, so that neither expiry nor eviction
        removes a session while a reply to it is being written.
        """
        retention = self.retention
        if retention.session_ttl is None and retention.max_sessions is None:
            return await self.store.get(session_id)
        return await self.store.update(session_id, SessionPatch(), utcnow())

    async def turn_stored(self, session: Session) -> Session:
        """Trim the session to the cap on messages; return it as it now is."""
        keep = self.retention.max_messages_per_session
        if keep is None or session.message_count <= keep:
            return session
        try:
            trimmed = await self.store.trim(session.session_id, keep)
        except SessionNotFound:
            return session
        if trimmed:
            self.stats.trimmed_messages += trimmed
            log.info(
                "trimmed the %d oldest messages of session %s (max %d messages per session)",
                trimmed,
                session.session_id,
                keep,
            )
        return await self.store.get(session.session_id)

    async def session_created(self) -> None:
        """Evict the least recently active sessions beyond the cap."""
        keep = self.retention.max_sessions
        if keep is None:
            return
        evicted = await self.store.evict(keep)
        if evicted:
            self.stats.evicted_sessions += len(evicted)
            log.info(
                "evicted %d least recently active session(s) (max %d sessions): %s",
                len(evicted),
                keep,
                ", ".join(evicted),
            )

    async def sweep(self, now: datetime | None = None) -> None:
        """Expire idle sessions and evict beyond the cap (what a server does periodically)."""
        ttl = self.retention.session_ttl
        if ttl is not None:
            cutoff = (now or utcnow()) - timedelta(seconds=ttl)
            expired = await self.store.expire(cutoff)
            if expired:
                self.stats.expired_sessions += len(expired)
                log.info(
                    "expired %d session(s) idle for more than %gs: %s",
                    len(expired),
                    ttl,
                    ", ".join(expired),
                )
        # A server restarted with a lower cap applies it without waiting for a new session.
        await self.session_created()

    async def run(self) -> None:
        """Sweep now and then every :attr:`Retention.sweep_interval` seconds, until cancelled."""
        interval = self.retention.sweep_interval
        while True:
            try:
                await self.sweep()
            except ChatError as error:
                # The store may be briefly unreachable; the next sweep catches up.
                log.warning("retention sweep failed: %s", error)
            except Exception:
                # A bug must not stop retention for the rest of the server's life.
                log.exception("retention sweep failed")
            await asyncio.sleep(interval)

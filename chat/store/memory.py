"""An in-memory :class:`~chat.store.SessionStore`: fast, and gone when the process ends."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime

from chat.errors import SessionNotFound
from chat.store import OwnerLimitReached, SessionPage
from chat.store._cursor import decode_cursor, encode_cursor
from chat.store._locks import LocalLocks
from chat.types import Message, Session, SessionPatch

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Entry:
    session: Session
    messages: list[Message] = field(default_factory=list)


class MemoryStore:
    """Sessions in a dict owned by this store instance (never shared between servers)."""

    kind = "memory"
    location = "memory of this process"

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._locks = LocalLocks()
        self._secrets: dict[str, bytes] = {}

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def secret(self, name: str) -> bytes:
        return self._secrets.setdefault(name, secrets.token_bytes(32))

    def _entry(self, session_id: str) -> _Entry:
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        return entry

    async def create(self, session: Session, *, max_owned: int | None = None) -> None:
        if session.session_id in self._entries:
            raise ValueError(f"session {session.session_id!r} already exists")
        if max_owned is not None:
            owned = await self.count(owner=session.owner)
            if owned >= max_owned:
                raise OwnerLimitReached(session.owner, owned)
        self._entries[session.session_id] = _Entry(session)

    async def get(self, session_id: str) -> Session:
        return self._entry(session_id).session

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        entry = self._entry(session_id)
        entry.session = patch.apply(entry.session, now)
        return entry.session

    async def delete(self, session_id: str) -> int:
        entry = self._entry(session_id)
        del self._entries[session_id]
        return len(entry.messages)

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, owner: str | None = None
    ) -> SessionPage:
        ordered = sorted(
            (
                entry.session
                for entry in self._entries.values()
                if owner is None or entry.session.owner == owner
            ),
            key=lambda s: (s.created_at, s.session_id),
            reverse=True,
        )
        if cursor is not None:
            after = decode_cursor(cursor)
            ordered = [s for s in ordered if (s.created_at, s.session_id) < after]
        page = ordered[:limit]
        more = len(ordered) > limit
        next_cursor = encode_cursor(page[-1].created_at, page[-1].session_id) if more else None
        return SessionPage(page, next_cursor)

    async def count(self, *, owner: str | None = None) -> int:
        if owner is None:
            return len(self._entries)
        return sum(1 for entry in self._entries.values() if entry.session.owner == owner)

    async def messages(self, session_id: str) -> list[Message]:
        return list(self._entry(session_id).messages)

    async def read(self, session_id: str) -> tuple[Session, list[Message]]:
        entry = self._entry(session_id)
        return entry.session, list(entry.messages)

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        entry = self._entry(session_id)
        if not messages:
            return entry.session
        entry.messages.extend(messages)
        entry.session = dataclasses.replace(
            entry.session,
            message_count=len(entry.messages),
            last_activity=messages[-1].created_at,
        )
        return entry.session

    async def trim(self, session_id: str, keep: int) -> int:
        entry = self._entry(session_id)
        dropped = max(0, len(entry.messages) - keep)
        if dropped:
            del entry.messages[:dropped]
            entry.session = dataclasses.replace(entry.session, message_count=len(entry.messages))
        return dropped

    async def evict(self, keep: int) -> list[str]:
        excess = len(self._entries) - keep
        if excess <= 0:
            return []
        oldest = sorted(
            self._entries.values(), key=lambda e: (e.session.last_activity, e.session.session_id)
        )
        evicted = [entry.session.session_id for entry in oldest[:excess]]
        for session_id in evicted:
            del self._entries[session_id]
        return evicted

    async def expire(self, idle_before: datetime) -> list[str]:
        idle = sorted(
            (e.session for e in self._entries.values() if e.session.last_activity < idle_before),
            key=lambda s: (s.last_activity, s.session_id),
        )
        for session in idle:
            del self._entries[session.session_id]
        return [session.session_id for session in idle]

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(session_id)

    async def aclose(self) -> None:
        # Nothing to release; the sessions stay readable (handy for embedding and tests).
        return None

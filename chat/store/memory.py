"""An in-memory :class:`~chat.store.SessionStore`: fast, and gone when the process ends."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

from chat.errors import SessionNotFound
from chat.store import SessionPage
from chat.store._cursor import decode_cursor, encode_cursor
from chat.types import Message, Session, SessionPatch

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Entry:
    session: Session
    messages: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class MemoryStore:
    """Sessions in a dict owned by this store instance (never shared between servers)."""

    kind = "memory"

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, _Lock] = {}

    def _entry(self, session_id: str) -> _Entry:
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        return entry

    async def create(self, session: Session) -> None:
        if session.session_id in self._entries:
            raise ValueError(f"session {session.session_id!r} already exists")
        self._entries[session.session_id] = _Entry(session)

    async def get(self, session_id: str) -> Session:
        return self._entry(session_id).session

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        entry = self._entry(session_id)
        changes = {name: getattr(patch, name) for name in patch.changed()}
        entry.session = dataclasses.replace(entry.session, last_activity=now, **changes)
        return entry.session

    async def delete(self, session_id: str) -> int:
        entry = self._entry(session_id)
        del self._entries[session_id]
        return len(entry.messages)

    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        ordered = sorted(
            (entry.session for entry in self._entries.values()),
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

    async def count(self) -> int:
        return len(self._entries)

    async def messages(self, session_id: str) -> list[Message]:
        return list(self._entry(session_id).messages)

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

    @asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        # One lock per session while anybody holds or waits for it; dropped afterwards so
        # that the dict does not grow with every session ever used.
        holder = self._locks.get(session_id)
        if holder is None:
            holder = self._locks[session_id] = _Lock()
        holder.users += 1
        try:
            async with holder.lock:
                yield
        finally:
            holder.users -= 1
            if holder.users == 0:
                del self._locks[session_id]

    async def aclose(self) -> None:
        # Nothing to release; the sessions stay readable (handy for embedding and tests).
        return None

"""Per-session locks within one process, shared by the stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["LocalLocks"]


@dataclass(slots=True)
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class LocalLocks:
    """One FIFO ``asyncio.Lock`` per session id, kept only while somebody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, _Lock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        # Dropped when the last user leaves, so that the dict does not grow with every
        # session ever used.
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

"""Session stores: where sessions and their histories live.

Every store implements :class:`SessionStore` and passes the conformance suite in
``tests/test_store_conformance.py``. Choose one with a URL (:func:`open_store`):

- ``memory://``: in this process only; gone when the server stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from chat.errors import ConfigurationError
from chat.types import Message, Session, SessionPatch

__all__ = ["SessionPage", "SessionStore", "open_store"]


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of :meth:`SessionStore.list_sessions`: sessions newest first, and where to go on."""

    sessions: list[Session]
    next_cursor: str | None


@runtime_checkable
class SessionStore(Protocol):
    """Persistence of sessions and their message histories.

    All methods are coroutines so that stores may do I/O. Methods that take a
    ``session_id`` raise :class:`~chat.errors.SessionNotFound` when it does not exist;
    a store that cannot reach its backing service raises
    :class:`~chat.errors.StoreUnavailable`.
    """

    @property
    def kind(self) -> str:
        """Short name of the store (``memory``, ``sqlite``, ``redis``), shown in stats."""
        ...

    async def create(self, session: Session) -> None:
        """Store a new session (with no messages)."""
        ...

    async def get(self, session_id: str) -> Session:
        """The session, with its current ``message_count`` and ``last_activity``."""
        ...

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        """Apply ``patch``, set ``last_activity`` to ``now`` and return the new session."""
        ...

    async def delete(self, session_id: str) -> int:
        """Delete the session and its messages; return how many messages were deleted."""
        ...

    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        """Sessions ordered newest first (``created_at``, then ``session_id``, descending).

        ``cursor`` is the ``next_cursor`` of the previous page. The order is stable: sessions
        created after the first page was read never appear on later pages, and pages never
        repeat a session. Raise :class:`~chat.errors.InvalidArgument` for a cursor the
        store did not write.
        """
        ...

    async def count(self) -> int:
        """Number of sessions stored."""
        ...

    async def messages(self, session_id: str) -> list[Message]:
        """The history of the session, oldest first."""
        ...

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Append ``messages`` atomically (all or none) and return the updated session.

        ``last_activity`` becomes the ``created_at`` of the last message appended.
        """
        ...

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Hold this while running a turn, so turns on one session never interleave."""
        ...

    async def aclose(self) -> None:
        """Release connections and files."""
        ...


def open_store(url: str) -> SessionStore:
    """Create the store that ``url`` names.

    >>> open_store("memory://").kind
    'memory'
    """
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"store URL {url!r} has no scheme; expected e.g. memory://")
    if scheme == "memory":
        from chat.store.memory import MemoryStore

        return MemoryStore()
    raise ConfigurationError(f"unknown store {scheme!r} in {url!r}; expected memory://")

"""Session stores: where sessions and their histories live.

Every store implements :class:`SessionStore` and passes the conformance suite in
``tests/test_store_conformance.py``. Choose one with a URL (:func:`open_store`):

- ``sqlite:///absolute/path.db`` or ``sqlite://relative/path.db``: a SQLite file (WAL mode),
  the default (:func:`default_store_url`); survives restarts and crashes.
- ``redis://host:port/db?prefix=NAME``: Redis, shared by several servers (a fleet); needs
  ``pip install 'grpc-chat[redis]'``.
- ``memory://``: in this process only; gone when the server stops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from chat.errors import ConfigurationError
from chat.types import Message, Session, SessionPatch

__all__ = [
    "OwnerLimitReached",
    "SessionPage",
    "SessionStore",
    "default_store_path",
    "default_store_url",
    "open_store",
]


class OwnerLimitReached(ValueError):
    """:meth:`SessionStore.create` refused: the owner has ``max_owned`` sessions already."""

    def __init__(self, owner: str, owned: int) -> None:
        super().__init__(f"{owner} has {owned} sessions")
        self.owner = owner
        self.owned = owned


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

    A store connects on :meth:`open` (or on first use) and is closed with :meth:`aclose`::

        store = open_store("sqlite:///tmp/chat.db")
        await store.open()
        try:
            print(await store.count())
        finally:
            await store.aclose()
    """

    @property
    def kind(self) -> str:
        """Short name of the store (``memory``, ``sqlite``, ``redis``), shown in stats."""
        ...

    @property
    def location(self) -> str:
        """Where the data lives, for logs and banners (no secrets)."""
        ...

    async def open(self) -> None:
        """Connect, create files and upgrade the schema as needed. Calling it again is a no-op."""
        ...

    async def ping(self) -> None:
        """Check, in one attempt and without retrying, that the store can serve requests;
        :class:`~chat.errors.StoreUnavailable` if not (the server's health follows it)."""
        ...

    async def secret(self, name: str) -> bytes:
        """32 random bytes named ``name``, made when first asked for and then the same for
        every server sharing this store, across restarts (the server signs page tokens
        with them, so that any replica accepts a token another one issued)."""
        ...

    async def create(self, session: Session, *, max_owned: int | None = None) -> None:
        """Store a new session (with no messages); ``ValueError`` if its id exists.

        With ``max_owned``, :class:`OwnerLimitReached` instead when its owner has that many
        sessions already: counted and created in one step, so that servers sharing the
        store cannot pass the limit together.
        """
        ...

    async def get(self, session_id: str) -> Session:
        """The session, with its current ``message_count`` and ``last_activity``."""
        ...

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        """Apply ``patch`` and return the new session (:meth:`SessionPatch.apply`).

        ``last_activity`` becomes ``now`` only when a field changes: a patch that changes
        nothing cannot keep a session from expiring.
        """
        ...

    async def delete(self, session_id: str) -> int:
        """Delete the session and its messages; return how many messages were deleted."""
        ...

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, owner: str | None = None
    ) -> SessionPage:
        """Sessions ordered newest first (``created_at``, then ``session_id``, descending).

        With ``owner``, only the sessions of that identity (``Session.owner``).

        ``cursor`` is the ``next_cursor`` of the previous page. The order is stable: sessions
        created after the first page was read never appear on later pages, and pages never
        repeat a session. Raise :class:`~chat.errors.InvalidArgument` for a cursor the
        store did not write.
        """
        ...

    async def count(self, *, owner: str | None = None) -> int:
        """Number of sessions stored (with ``owner``: of that identity)."""
        ...

    async def messages(self, session_id: str) -> list[Message]:
        """The history of the session, oldest first."""
        ...

    async def read(self, session_id: str) -> tuple[Session, list[Message]]:
        """The session and its history, read at one moment: ``message_count`` is the number
        of messages returned, even while turns are being stored."""
        ...

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Append ``messages`` atomically (all or none) and return the updated session.

        ``last_activity`` becomes the ``created_at`` of the last message appended.
        """
        ...

    async def trim(self, session_id: str, keep: int) -> int:
        """Delete the oldest messages of the session beyond the newest ``keep``; return how many.

        ``message_count`` follows; ``last_activity`` does not change.
        """
        ...

    async def evict(self, keep: int) -> list[str]:
        """Delete the least recently active sessions until at most ``keep`` remain.

        Least recently active means smallest ``(last_activity, session_id)``. Return the ids
        deleted, in that order.
        """
        ...

    async def expire(self, idle_before: datetime) -> list[str]:
        """Delete every session whose ``last_activity`` is before ``idle_before``; return ids."""
        ...

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Hold this while running a turn, so turns on one session never interleave."""
        ...

    async def aclose(self) -> None:
        """Release connections and files."""
        ...


def default_store_path() -> Path:
    """The SQLite file a server uses when no store is given.

    ``$XDG_DATA_HOME/grpc-chat/chat.db`` on Linux (``~/.local/share/grpc-chat/chat.db`` when
    the variable is unset), the platform's user data directory elsewhere.
    """
    # platformdirs honours XDG_DATA_HOME on Linux; read at call time, so that a changed
    # environment (tests, containers) is seen.
    from platformdirs import user_data_path

    return user_data_path("grpc-chat", appauthor=False) / "chat.db"


def default_store_url() -> str:
    """``sqlite:///`` + :func:`default_store_path`: the store of a server run with no flags."""
    return f"sqlite://{default_store_path().as_posix()}"


def _shown(url: str) -> str:
    """``url`` as an error message may show it: user and password (before an ``@``) masked."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, _ = head.partition("://")
    return f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}"


def open_store(url: str) -> SessionStore:
    """Create the store that ``url`` names (not yet connected: see :meth:`SessionStore.open`).

    >>> open_store("memory://").kind
    'memory'
    >>> open_store("sqlite:///var/lib/chat/chat.db").location
    '/var/lib/chat/chat.db'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(
            f"store URL {_shown(url)!r} has no scheme; expected sqlite:///PATH, "
            "redis://HOST:PORT/DB or memory://"
        )
    if scheme == "memory":
        from chat.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from chat.store.sqlite import SqliteStore

        path, _, query = rest.partition("?")
        if not path:
            raise ConfigurationError(
                f"store URL {_shown(url)!r} names no file; expected sqlite:///absolute/path.db "
                "or sqlite://relative/path.db"
            )
        file = Path(os.path.expanduser(path))
        # Only the default store's directory is made: an explicit path names an existing one.
        return SqliteStore(file, options=query, create_directory=file == default_store_path())
    if scheme in ("redis", "rediss", "unix"):
        from chat.store.redis import RedisStore

        return RedisStore(url)
    raise ConfigurationError(
        f"unknown store {scheme!r} in {_shown(url)!r}; expected sqlite://, redis:// or memory://"
    )

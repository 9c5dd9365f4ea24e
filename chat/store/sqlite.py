"""A :class:`~chat.store.SessionStore` in a SQLite file: the default, for one server.

Durability: the database is in WAL mode with ``synchronous=FULL``, and every write is one
transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), so a process killed at any point keeps every
write that returned and none that did not. Several processes may open one file (SQLite's
locking keeps it consistent) but the per-session :meth:`SqliteStore.lock` only orders turns
within one process: run a fleet on Redis.

All database work runs on one worker thread that owns the connection; each operation is
one call on that thread, so operations never interleave and a cancelled caller never leaves
a transaction half done (the operation finishes, its result is dropped).

The schema is versioned in the table ``schema_migrations``; :data:`MIGRATIONS` brings a file
of any earlier version up to :data:`SCHEMA_VERSION` when the store opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from chat.errors import ConfigurationError, SessionNotFound, StoreUnavailable
from chat.store import OwnerLimitReached, SessionPage
from chat.store._codec import (
    MESSAGE_FIELDS,
    SESSION_FIELDS,
    message_from_values,
    message_values,
    session_from_values,
    session_values,
)
from chat.store._cursor import decode_cursor, encode_cursor
from chat.store._locks import LocalLocks
from chat.types import Message, Session, SessionPatch, format_timestamp, utcnow

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """The statements that bring a database from ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


#: Every schema change, oldest first. Never edit a released migration: add one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions and their messages",
        (
            """CREATE TABLE sessions (
                session_id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                last_activity TEXT NOT NULL,
                title TEXT NOT NULL DEFAULT '',
                model TEXT NOT NULL DEFAULT '',
                system_prompt TEXT NOT NULL DEFAULT '',
                context_policy INTEGER NOT NULL DEFAULT 0
            )""",
            # Keyset pagination, newest first: (created_at, session_id) descending.
            "CREATE INDEX sessions_by_created ON sessions (created_at, session_id)",
            """CREATE TABLE messages (
                session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
                seq INTEGER NOT NULL,
                role INTEGER NOT NULL,
                content TEXT NOT NULL,
                created_at TEXT NOT NULL,
                status INTEGER NOT NULL,
                request_id TEXT NOT NULL DEFAULT '',
                model TEXT NOT NULL DEFAULT '',
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                PRIMARY KEY (session_id, seq)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        2,
        "retention: message counters and an index on last activity",
        (
            # Counting a long history on every read and page of sessions is O(messages);
            # a counter kept by the writes is O(1).
            "ALTER TABLE sessions ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0",
            """UPDATE sessions SET message_count =
                (SELECT COUNT(*) FROM messages AS m WHERE m.session_id = sessions.session_id)""",
            # Eviction (least recently active first) and expiry (idle since) scan by activity.
            "CREATE INDEX sessions_by_activity ON sessions (last_activity, session_id)",
        ),
    ),
    Migration(
        3,
        "owners, per-session policies and reply limits, turn ids",
        (
            # Sessions stored before owners existed belong to the anonymous identity (that of
            # --auth none), never to everyone.
            "ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT 'anonymous'",
            "ALTER TABLE sessions ADD COLUMN concurrency_policy INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN on_disconnect INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN max_reply_tokens INTEGER NOT NULL DEFAULT 0",
            # Listing one identity's sessions, newest first.
            "CREATE INDEX sessions_by_owner ON sessions (owner, created_at, session_id)",
            "ALTER TABLE messages ADD COLUMN turn_id TEXT NOT NULL DEFAULT ''",
        ),
    ),
    Migration(
        4,
        "bearer tokens (--auth tokens): names, roles and hashes, never the tokens",
        (
            """CREATE TABLE tokens (
                name TEXT PRIMARY KEY,
                token_hash TEXT NOT NULL UNIQUE,
                admin INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        5,
        "secrets shared by the servers using the file (the key that signs page tokens)",
        (
            """CREATE TABLE secrets (
                name TEXT PRIMARY KEY,
                value BLOB NOT NULL
            )""",
        ),
    ),
)

#: The schema version this code reads and writes.
SCHEMA_VERSION = MIGRATIONS[-1].version

# Column names are those of chat.store._codec (the Session and Message fields), never
# anything a caller sends.
_SESSION_COLUMNS = ", ".join(("session_id", "message_count", *SESSION_FIELDS))
_MESSAGE_COLUMNS = ", ".join(MESSAGE_FIELDS)
_SYNCHRONOUS = ("full", "normal")


def _session(row: Sequence[Any]) -> Session:
    session_id, message_count, *values = row
    return session_from_values(
        session_id, dict(zip(SESSION_FIELDS, values, strict=True)), message_count
    )


def _message(row: Sequence[Any]) -> Message:
    return message_from_values(row)


def _message_row(session_id: str, seq: int, message: Message) -> tuple[object, ...]:
    return (session_id, seq, *message_values(message))


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring ``db`` to schema ``target`` in one transaction; return ``(before, after)``.

    Safe against another process migrating the same file at the same time: the version is
    read after the write lock is taken.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at TEXT NOT NULL
            )"""
        )
        (current,) = db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
        ).fetchone()
        if current > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the database was written by a newer grpc-chat (schema v{current}; this one "
                f"knows up to v{SCHEMA_VERSION}): upgrade grpc-chat or use another file"
            )
        for migration in MIGRATIONS:
            if current < migration.version <= target:
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (migration.version, migration.description, format_timestamp(utcnow())),
                )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return current, max(current, target)


def connect(
    path: Path, *, synchronous: str = "full", busy_timeout: float = 10.0
) -> sqlite3.Connection:
    """A connection to ``path`` set up as the store uses it (WAL, foreign keys, no migration)."""
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise ConfigurationError(f"SQLite file {path} cannot use WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore:
    """Sessions in a SQLite file.

    >>> store = SqliteStore(Path("/tmp/chat.db"))            # doctest: +SKIP
    >>> await store.open()                                     # doctest: +SKIP

    ``options`` is the query string of the store URL: ``synchronous=normal`` trades the
    last commits before a power loss (never a process crash) for fewer disk flushes.

    ``create_directory`` makes the file's directory when it is missing (for the default
    store in the user data directory); otherwise a missing directory is an error, so that
    a mistyped path is not created as a tree of directories somewhere.

    :attr:`opened_elsewhere` tells, once the store is open, whether another process had the
    file open then (servers started without ``--store`` by one user share the default
    file): each open store holds a shared POSIX lock on a byte of ``<file>.lock``.
    """

    kind = "sqlite"

    def __init__(self, path: Path, *, options: str = "", create_directory: bool = False) -> None:
        self.path = path
        self._create_directory = create_directory
        self._presence: int | None = None
        #: Another process had this file open when this store opened it.
        self.opened_elsewhere = False
        settings = dict(parse_qsl(options, keep_blank_values=True))
        self._synchronous = settings.pop("synchronous", "full").lower()
        if self._synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous={self._synchronous!r} in the SQLite store URL; "
                f"choose one of {', '.join(_SYNCHRONOUS)}"
            )
        if settings:
            raise ConfigurationError(
                f"unknown SQLite store option(s) {', '.join(sorted(settings))}; "
                "the only one is synchronous=full|normal"
            )
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._opening: asyncio.Lock | None = None
        self._locks = LocalLocks()

    @property
    def location(self) -> str:
        return str(self.path)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._db is not None:
                return
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-sqlite")
            loop = asyncio.get_running_loop()
            try:
                self._db = await loop.run_in_executor(executor, self._open_sync)
            except BaseException:
                executor.shutdown(wait=False)
                raise
            self._executor = executor

    def _open_sync(self) -> sqlite3.Connection:
        path = self.path
        existed = path.exists()
        if not path.parent.is_dir():
            if not self._create_directory:
                raise ConfigurationError(
                    f"cannot open the SQLite store {path}: the directory {path.parent} does "
                    "not exist (create it first, or choose another path)"
                )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot create the directory of the SQLite store {path}: {error}"
                ) from error
        try:
            db = connect(path, synchronous=self._synchronous)
        except (OSError, sqlite3.Error) as error:
            raise ConfigurationError(f"cannot open the SQLite store {path}: {error}") from error
        self._announce_presence()
        try:
            before, after = migrate(db)
        except sqlite3.Error as error:
            db.close()
            raise ConfigurationError(
                f"{path} is not a usable grpc-chat database: {error}"
            ) from error
        except BaseException:
            db.close()
            raise
        if not existed:
            log.info("created SQLite store %s (schema v%d)", path, after)
        elif before != after:
            log.info("upgraded SQLite store %s from schema v%d to v%d", path, before, after)
        else:
            log.info("opened SQLite store %s (schema v%d)", path, after)
        return db

    def _announce_presence(self) -> None:
        """Take this process's shared lock on ``<file>.lock``; see whether others hold one.

        POSIX record locks, as SQLite itself uses: they go with the process (a killed
        server leaves none behind), and a process never conflicts with its own. Asking for
        the byte exclusively, without waiting, fails exactly when another process holds it.
        Nothing is decided by it: it only lets the banner say that the file is shared.
        """
        try:
            import fcntl
        except ImportError:  # not a POSIX system: nothing to tell
            return
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            log.debug("cannot open the lock file of %s: %s", self.path, error)
            return
        try:
            # Waits while another process checks (it holds the byte exclusively an instant).
            fcntl.lockf(fd, fcntl.LOCK_SH, 1, 0)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                self.opened_elsewhere = True
            else:
                # Back to shared, so that the next process can take it too.
                fcntl.lockf(fd, fcntl.LOCK_SH, 1, 0)
        except OSError as error:
            log.debug("cannot lock %s.lock: %s", self.path, error)
            os.close(fd)
            return
        self._presence = fd

    async def aclose(self) -> None:
        if self._presence is not None:
            # Closing the descriptor releases the process's locks on that file.
            os.close(self._presence)
            self._presence = None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        db, self._db = self._db, None
        try:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(executor, db.close)
        finally:
            # The worker is idle now (the close was its last job): joining is immediate.
            executor.shutdown(wait=True)

    async def _run(self, operation: Callable[..., T], *args: Any) -> T:
        """Run ``operation(db, *args)`` on the worker thread; map database failures."""
        if self._db is None:
            await self.open()
        db, executor = self._db, self._executor
        if db is None or executor is None:
            raise StoreUnavailable(detail=f"the SQLite store {self.path} is closed")
        call = functools.partial(operation, db, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except sqlite3.OperationalError as error:
            # "database is locked" past the busy timeout, a full disk, an I/O error: the
            # store is there but cannot serve now.
            raise StoreUnavailable(
                detail=f"the SQLite store {self.path} cannot serve the request: {error}"
            ) from error

    async def ping(self) -> None:
        await self._run(self._ping_sync)

    @staticmethod
    def _ping_sync(db: sqlite3.Connection) -> None:
        db.execute("SELECT 1 FROM sessions LIMIT 1").fetchall()

    async def secret(self, name: str) -> bytes:
        return await self._run(self._secret_sync, name, secrets.token_bytes(32))

    @classmethod
    def _secret_sync(cls, db: sqlite3.Connection, name: str, fresh: bytes) -> bytes:
        with cls._transaction(db):
            # The first server to ask makes it; every other one (and every restart) reads it.
            db.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, fresh))
            (value,) = db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(value)

    # -- operations (each runs on the worker thread, each write in one transaction) ---------

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Any:
        # IMMEDIATE takes the write lock up front, so that a read-then-write (the next
        # message number, the count) is never stale when another process shares the file.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _get(db: sqlite3.Connection, session_id: str) -> Session:
        row = db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise SessionNotFound(session_id)
        return _session(row)

    async def create(self, session: Session, *, max_owned: int | None = None) -> None:
        await self._run(self._create_sync, session, max_owned)

    @classmethod
    def _create_sync(
        cls, db: sqlite3.Connection, session: Session, max_owned: int | None = None
    ) -> None:
        values = (session.session_id, 0, *session_values(session).values())
        placeholders = ", ".join("?" * len(values))
        with cls._transaction(db):
            if max_owned is not None:
                # In the write transaction: another process on the file waits for it.
                owned = cls._count_sync(db, session.owner)
                if owned >= max_owned:
                    raise OwnerLimitReached(session.owner, owned)
            try:
                db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({placeholders})", values
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"session {session.session_id!r} already exists") from None

    async def get(self, session_id: str) -> Session:
        return await self._run(self._get, session_id)

    async def update(self, session_id: str, patch: SessionPatch, now: datetime) -> Session:
        return await self._run(self._update_sync, session_id, patch, now)

    @classmethod
    def _update_sync(
        cls, db: sqlite3.Connection, session_id: str, patch: SessionPatch, now: datetime
    ) -> Session:
        with cls._transaction(db):
            current = cls._get(db, session_id)
            updated = patch.apply(current, now)
            if updated == current:
                return current
            before, after = session_values(current), session_values(updated)
            # Column names come from SESSION_FIELDS, never from the caller.
            changes = {name: value for name, value in after.items() if before[name] != value}
            assignments = ", ".join(f"{name} = ?" for name in changes)
            db.execute(
                f"UPDATE sessions SET {assignments} WHERE session_id = ?",
                (*changes.values(), session_id),
            )
            return updated

    async def delete(self, session_id: str) -> int:
        return await self._run(self._delete_sync, session_id)

    @classmethod
    def _delete_sync(cls, db: sqlite3.Connection, session_id: str) -> int:
        with cls._transaction(db):
            count = cls._get(db, session_id).message_count
            # The messages go with it (ON DELETE CASCADE).
            db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return count

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, owner: str | None = None
    ) -> SessionPage:
        after = None if cursor is None else decode_cursor(cursor)
        return await self._run(self._list_sync, limit, after, owner)

    @staticmethod
    def _list_sync(
        db: sqlite3.Connection,
        limit: int,
        after: tuple[datetime, str] | None,
        owner: str | None,
    ) -> SessionPage:
        # Fixed SQL texts (no caller text in them); the owner's listing uses sessions_by_owner.
        conditions, args = [], []
        if owner is not None:
            conditions.append("owner = ?")
            args.append(owner)
        if after is not None:
            conditions.append("(created_at, session_id) < (?, ?)")
            args.extend((format_timestamp(after[0]), after[1]))
        where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        rows = db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions {where}"
            "ORDER BY created_at DESC, session_id DESC LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        sessions = [_session(row) for row in rows[:limit]]
        more = len(rows) > limit
        last = sessions[-1] if sessions else None
        next_cursor = (
            encode_cursor(last.created_at, last.session_id) if more and last is not None else None
        )
        return SessionPage(sessions, next_cursor)

    async def count(self, *, owner: str | None = None) -> int:
        return await self._run(self._count_sync, owner)

    @staticmethod
    def _count_sync(db: sqlite3.Connection, owner: str | None = None) -> int:
        if owner is None:
            (count,) = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
        else:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)
            ).fetchone()
        return int(count)

    async def messages(self, session_id: str) -> list[Message]:
        _session, history = await self._run(self._read_sync, session_id)
        return history

    async def read(self, session_id: str) -> tuple[Session, list[Message]]:
        return await self._run(self._read_sync, session_id)

    @classmethod
    def _read_sync(cls, db: sqlite3.Connection, session_id: str) -> tuple[Session, list[Message]]:
        # One read transaction: the session and the rows see the same snapshot.
        db.execute("BEGIN")
        try:
            session = cls._get(db, session_id)
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        return session, [_message(row) for row in rows]

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        return await self._run(self._append_sync, session_id, list(messages))

    @classmethod
    def _append_sync(
        cls, db: sqlite3.Connection, session_id: str, messages: list[Message]
    ) -> Session:
        with cls._transaction(db):
            session = cls._get(db, session_id)
            if not messages:
                return session
            (next_seq,) = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM messages WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            db.executemany(
                f"INSERT INTO messages (session_id, seq, {_MESSAGE_COLUMNS}) "
                f"VALUES ({', '.join('?' * (2 + len(MESSAGE_FIELDS)))})",
                [
                    _message_row(session_id, next_seq + offset, message)
                    for offset, message in enumerate(messages)
                ],
            )
            db.execute(
                "UPDATE sessions SET message_count = message_count + ?, last_activity = ? "
                "WHERE session_id = ?",
                (len(messages), format_timestamp(messages[-1].created_at), session_id),
            )
            return cls._get(db, session_id)

    async def trim(self, session_id: str, keep: int) -> int:
        return await self._run(self._trim_sync, session_id, keep)

    @classmethod
    def _trim_sync(cls, db: sqlite3.Connection, session_id: str, keep: int) -> int:
        with cls._transaction(db):
            excess = cls._get(db, session_id).message_count - keep
            if excess <= 0:
                return 0
            db.execute(
                "DELETE FROM messages WHERE session_id = ? AND seq IN "
                "(SELECT seq FROM messages WHERE session_id = ? ORDER BY seq LIMIT ?)",
                (session_id, session_id, excess),
            )
            db.execute(
                "UPDATE sessions SET message_count = message_count - ? WHERE session_id = ?",
                (excess, session_id),
            )
            return excess

    async def evict(self, keep: int) -> list[str]:
        return await self._run(self._evict_sync, keep)

    @classmethod
    def _evict_sync(cls, db: sqlite3.Connection, keep: int) -> list[str]:
        with cls._transaction(db):
            excess = cls._count_sync(db) - keep
            if excess <= 0:
                return []
            rows = db.execute(
                "SELECT session_id FROM sessions ORDER BY last_activity, session_id LIMIT ?",
                (excess,),
            ).fetchall()
            return cls._delete_all(db, [row[0] for row in rows])

    async def expire(self, idle_before: datetime) -> list[str]:
        return await self._run(self._expire_sync, idle_before)

    @classmethod
    def _expire_sync(cls, db: sqlite3.Connection, idle_before: datetime) -> list[str]:
        with cls._transaction(db):
            rows = db.execute(
                "SELECT session_id FROM sessions WHERE last_activity < ? "
                "ORDER BY last_activity, session_id",
                (format_timestamp(idle_before),),
            ).fetchall()
            return cls._delete_all(db, [row[0] for row in rows])

    @staticmethod
    def _delete_all(db: sqlite3.Connection, session_ids: list[str]) -> list[str]:
        db.executemany("DELETE FROM sessions WHERE session_id = ?", [(i,) for i in session_ids])
        return session_ids

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        # Within this process only: several processes on one file stay consistent (each
        # write is a transaction) but their turns on one session are not ordered.
        return self._locks.hold(session_id)

"""Bearer tokens (``--auth tokens``): minted by ``chat-server tokens add``, kept as hashes.

A token is ``gct_`` and 43 URL-safe characters (256 random bits). Only its SHA-256 is kept
(a fast hash is enough for a secret that random: there is nothing to guess from it); a lookup
goes by that hash and the stored hash is compared with :func:`hmac.compare_digest`. The
token itself is shown once, by ``tokens add``, and never logged, stored or put in an error.

Where the hashes live (:func:`open_token_store`): in a file given by ``--tokens-file``
(JSON, mode 0600, re-read when it changes), or else in the session store the server uses:
the ``tokens`` table of the SQLite file (schema v4), or the ``PREFIX:tokens`` and
``PREFIX:token-hashes`` hashes of Redis. Every lookup reads the store, so a revoked token is
refused on the next RPC by every server that shares it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from chat.auth._identity import Credentials, Identity, bearer_token
from chat.errors import ConfigurationError, StoreUnavailable, Unauthenticated
from chat.types import format_timestamp, parse_timestamp, utcnow

__all__ = [
    "TOKEN_PREFIX",
    "FileTokenStore",
    "MemoryTokenStore",
    "RedisTokenStore",
    "SqliteTokenStore",
    "TokenAuth",
    "TokenRecord",
    "TokenStore",
    "hash_token",
    "new_token",
    "open_token_store",
]

TOKEN_PREFIX = "gct_"


def new_token() -> str:
    """A new random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of ``token``: what the stores keep."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token: its name (the identity), role and hash; never the token."""

    name: str
    admin: bool
    created_at: datetime
    token_hash: str

    def __repr__(self) -> str:
        # The hash is not the token, but it has no business in logs either.
        return f"TokenRecord(name={self.name!r}, admin={self.admin}, created_at={self.created_at})"


class TokenStore(Protocol):
    """Where token hashes are kept. ``add`` raises ``ValueError`` for a name in use."""

    @property
    def location(self) -> str: ...

    async def add(self, name: str, token_hash: str, *, admin: bool) -> TokenRecord: ...

    async def find(self, token_hash: str) -> TokenRecord | None: ...

    async def list(self) -> list[TokenRecord]: ...

    async def revoke(self, name: str) -> bool:
        """Delete the token called ``name``; ``False`` if there is none."""
        ...

    async def aclose(self) -> None: ...


def _check_name(name: str) -> str:
    if not name or len(name) > 200 or any(c.isspace() or not c.isprintable() for c in name):
        raise ConfigurationError(
            f"token name {name!r} must be 1 to 200 printable characters without spaces"
        )
    return name


def _record(name: str, values: Mapping[str, Any]) -> TokenRecord:
    return TokenRecord(
        name=name,
        admin=bool(values["admin"]),
        created_at=parse_timestamp(str(values["created_at"])),
        token_hash=str(values["hash"]),
    )


class MemoryTokenStore:
    """Tokens in this process (tests and embedding)."""

    location = "memory"

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}

    async def add(self, name: str, token_hash: str, *, admin: bool) -> TokenRecord:
        if _check_name(name) in self._records:
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        record = self._records[name] = TokenRecord(name, admin, utcnow(), token_hash)
        return record

    async def find(self, token_hash: str) -> TokenRecord | None:
        for record in self._records.values():
            if hmac.compare_digest(record.token_hash, token_hash):
                return record
        return None

    async def list(self) -> list[TokenRecord]:
        return sorted(self._records.values(), key=lambda r: r.name)

    async def revoke(self, name: str) -> bool:
        return self._records.pop(name, None) is not None

    async def aclose(self) -> None:
        return None


class FileTokenStore:
    """Token hashes in a JSON file (``--tokens-file``), re-read whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._by_hash: dict[str, TokenRecord] = {}

    @property
    def location(self) -> str:
        return str(self.path)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise StoreUnavailable(f"cannot read the tokens file {self.path}: {error}") from error
        try:
            tokens = json.loads(text)["tokens"]
            assert isinstance(tokens, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ConfigurationError(
                f"{self.path} is not a grpc-chat tokens file (written by chat-server tokens)"
            ) from None
        return tokens

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = (0, 0)
        if seen != self._seen:
            tokens = self._load()
            self._by_hash = {
                values["hash"]: _record(name, values) for name, values in tokens.items()
            }
            self._seen = seen

    def _save(self, tokens: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole to a private temporary file, then renamed: a reader never sees half
        # a file, and the hashes are never readable by others.
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"version": 1, "tokens": tokens}, file, indent=2, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise

    async def add(self, name: str, token_hash: str, *, admin: bool) -> TokenRecord:
        tokens = self._load()
        if _check_name(name) in tokens:
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        now = utcnow()
        tokens[name] = {"hash": token_hash, "admin": admin, "created_at": format_timestamp(now)}
        self._save(tokens)
        return TokenRecord(name, admin, now, token_hash)

    async def find(self, token_hash: str) -> TokenRecord | None:
        self._refresh()
        record = self._by_hash.get(token_hash)
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            return None
        return record

    async def list(self) -> list[TokenRecord]:
        return sorted(
            (_record(name, values) for name, values in self._load().items()),
            key=lambda r: r.name,
        )

    async def revoke(self, name: str) -> bool:
        tokens = self._load()
        if tokens.pop(name, None) is None:
            return False
        self._save(tokens)
        return True

    async def aclose(self) -> None:
        return None


class SqliteTokenStore:
    """Token hashes in the ``tokens`` table of the server's SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        # One worker thread owns the connection, as in the session store.
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    @property
    def location(self) -> str:
        return str(self.path)

    def _open_sync(self) -> sqlite3.Connection:
        from chat.store.sqlite import connect, migrate

        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = connect(self.path)
        try:
            migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    async def _run(self, sql: str, *args: object, write: bool = False) -> list[Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="chat-tokens")
            if self._db is None:
                self._db = await loop.run_in_executor(self._executor, self._open_sync)
            db, executor = self._db, self._executor

            def run() -> list[Any]:
                if not write:
                    return db.execute(sql, args).fetchall()
                db.execute("BEGIN IMMEDIATE")
                try:
                    rows = db.execute(sql, args).fetchall()
                    changed = db.execute("SELECT changes()").fetchone()[0]
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return [changed, *rows]

            try:
                return await loop.run_in_executor(executor, run)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as error:
                raise StoreUnavailable(
                    f"the SQLite store {self.path} cannot read its tokens: {error}"
                ) from error

    @staticmethod
    def _from_row(row: tuple[Any, ...]) -> TokenRecord:
        name, token_hash, admin, created_at = row
        return TokenRecord(name, bool(admin), parse_timestamp(created_at), token_hash)

    async def add(self, name: str, token_hash: str, *, admin: bool) -> TokenRecord:
        now = utcnow()
        try:
            await self._run(
                "INSERT INTO tokens (name, token_hash, admin, created_at) VALUES (?, ?, ?, ?)",
                _check_name(name),
                token_hash,
                int(admin),
                format_timestamp(now),
                write=True,
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a token named {name!r} exists; revoke it first") from None
        return TokenRecord(name, admin, now, token_hash)

    async def find(self, token_hash: str) -> TokenRecord | None:
        rows = await self._run(
            "SELECT name, token_hash, admin, created_at FROM tokens WHERE token_hash = ?",
            token_hash,
        )
        if not rows:
            return None
        record = self._from_row(rows[0])
        return record if hmac.compare_digest(record.token_hash, token_hash) else None

    async def list(self) -> list[TokenRecord]:
        rows = await self._run(
            "SELECT name, token_hash, admin, created_at FROM tokens ORDER BY name"
        )
        return [self._from_row(row) for row in rows]

    async def revoke(self, name: str) -> bool:
        changed, *_ = await self._run("DELETE FROM tokens WHERE name = ?", name, write=True)
        return bool(changed)

    async def aclose(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
            executor, self._executor = self._executor, None
            if executor is not None:
                if db is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, db.close)
                executor.shutdown(wait=True)


# KEYS: tokens, token-hashes; ARGV: name, hash, record
_ADD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: tokens, token-hashes; ARGV: hash
_FIND = """
local name = redis.call('HGET', KEYS[2], ARGV[1])
if not name then return false end
return {name, redis.call('HGET', KEYS[1], name)}
"""

# KEYS: tokens, token-hashes; ARGV: name
_REVOKE = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[2], cjson.decode(record)['hash'])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class RedisTokenStore:
    """Token hashes in Redis, next to the sessions (the same URL and prefix)."""

    def __init__(self, url: str) -> None:
        from chat.store.redis import RedisStore

        # The session store's own client settings (timeouts, retries, prefix).
        self._sessions = RedisStore(url)
        self._names = self._sessions._key("tokens")
        self._hashes = self._sessions._key("token-hashes")

    @property
    def location(self) -> str:
        return self._sessions.location

    async def _eval(self, what: str, script: str, *args: str | int) -> Any:
        client = self._sessions._client
        return await self._sessions._call(
            f"tokens {what}",
            lambda: client.eval(script, 2, self._names, self._hashes, *args),
            retry=what != "add",
        )

    async def add(self, name: str, token_hash: str, *, admin: bool) -> TokenRecord:
        now = utcnow()
        record = {"hash": token_hash, "admin": admin, "created_at": format_timestamp(now)}
        added = await self._eval(
            "add", _ADD, _check_name(name), token_hash, json.dumps(record, sort_keys=True)
        )
        if not added:
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        return TokenRecord(name, admin, now, token_hash)

    async def find(self, token_hash: str) -> TokenRecord | None:
        found = await self._eval("find", _FIND, token_hash)
        if not found or found[1] is None:
            return None
        name, raw = found
        record = _record(_text(name), json.loads(raw))
        return record if hmac.compare_digest(record.token_hash, token_hash) else None

    async def list(self) -> list[TokenRecord]:
        client = self._sessions._client
        raw = await self._sessions._call(
            "tokens list",
            lambda: client.hgetall(self._names),
            retry=True,
        )
        return sorted(
            (_record(_text(name), json.loads(value)) for name, value in raw.items()),
            key=lambda r: r.name,
        )

    async def revoke(self, name: str) -> bool:
        return bool(await self._eval("revoke", _REVOKE, name))

    async def aclose(self) -> None:
        await self._sessions.aclose()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_token_store(store_url: str, tokens_file: str | None = None) -> TokenStore:
    """The token store for a server on ``store_url`` (``tokens_file`` wins when given)."""
    if tokens_file:
        return FileTokenStore(Path(os.path.expanduser(tokens_file)))
    scheme, _, rest = store_url.partition("://")
    if scheme == "sqlite":
        path, _, _query = rest.partition("?")
        return SqliteTokenStore(Path(os.path.expanduser(path)))
    if scheme in ("redis", "rediss", "unix"):
        return RedisTokenStore(store_url)
    raise ConfigurationError(
        f"the {scheme or 'given'} store keeps nothing between processes, so it cannot hold "
        "tokens: give --tokens-file FILE (or CHAT_TOKENS_FILE), or use a sqlite:// or "
        "redis:// store"
    )


class TokenAuth:
    """``--auth tokens``: the identity is the name of the bearer token sent."""

    mode = "tokens"

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def _lookup(self, token_hash: str) -> Identity:
        record = await self.store.find(token_hash)
        if record is None:
            raise Unauthenticated(
                "the bearer token is not valid (unknown or revoked): ask the server's "
                "operator for a token (chat-server tokens add NAME)"
            )
        return Identity(record.name, record.admin)

    async def authenticate(
        self, metadata: Mapping[str, str], peer_certificate: dict[str, Any] | None
    ) -> Credentials:
        token_hash = hash_token(bearer_token(metadata, "a bearer token"))
        identity = await self._lookup(token_hash)

        async def recheck() -> None:
            await self._lookup(token_hash)

        return Credentials(identity, recheck)

    async def aclose(self) -> None:
        await self.store.aclose()

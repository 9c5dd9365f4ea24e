"""What only the SQLite store does: its file, its schema versions, several connections."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chat.errors import ConfigurationError
from chat.store import default_store_path, default_store_url, open_store
from chat.store._codec import MESSAGE_FIELDS, SESSION_FIELDS
from chat.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore, connect, migrate
from chat.types import ANONYMOUS, Message, Role, Session, parse_timestamp
from tests.helpers import TIMEOUT

T0 = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


def schema_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (version,) = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(version)


def test_the_default_store_is_a_file_in_the_user_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_store_path() == tmp_path / "data" / "grpc-chat" / "chat.db"
    assert default_store_url() == f"sqlite://{tmp_path}/data/grpc-chat/chat.db"
    store = open_store(default_store_url())
    assert isinstance(store, SqliteStore)
    assert store.location == str(tmp_path / "data" / "grpc-chat" / "chat.db")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/chat.db", "/var/lib/chat.db"),
        ("sqlite://chat.db", "chat.db"),
        ("sqlite://data/chat.db?synchronous=normal", "data/chat.db"),
    ],
)
def test_sqlite_urls_name_absolute_and_relative_files(url: str, path: str) -> None:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.path == Path(path)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "names no file"),
        ("sqlite:///x.db?synchronous=off", "synchronous='off'"),
        ("sqlite:///x.db?journal=delete", "unknown SQLite store option"),
        ("postgres://db/chat", "unknown store 'postgres'"),
        ("chat.db", "has no scheme"),
    ],
)
def test_bad_store_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_store(url)


@pytest.mark.parametrize(
    "url", ["reddis://:hunter2@cache:6379/0", "postgres://chat:hunter2@db/chat", "hunter2@db"]
)
def test_a_bad_store_url_is_not_shown_with_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_store(url)
    assert "hunter2" not in str(raised.value)


async def test_first_start_creates_the_directories_and_a_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dirs" / "chat.db"
    store = SqliteStore(path, create_directory=True)
    await store.open()
    try:
        await store.create(Session("s", T0, T0))
    finally:
        await store.aclose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
    assert {"sessions_by_created", "sessions_by_activity"} <= indexes
    assert schema_version(path) == SCHEMA_VERSION


async def test_only_the_default_store_makes_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nonexistent-dir"
    explicit = open_store(f"sqlite://{missing}/x.db")
    with pytest.raises(ConfigurationError, match="nonexistent-dir does not exist"):
        await explicit.open()
    assert not missing.exists()

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = open_store(default_store_url())
    await default.open()
    await default.aclose()
    assert default_store_path().is_file()


async def test_a_version_1_database_is_upgraded_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    db = connect(path)
    assert migrate(db, target=1) == (0, 1)
    # Data as the version 1 code wrote it: no message counter yet.
    db.execute(
        "INSERT INTO sessions (session_id, created_at, last_activity, title) "
        "VALUES ('old', '2025-01-01T00:00:00.000000Z', '2025-01-02T00:00:00.000000Z', 'kept')"
    )
    for seq in range(3):
        db.execute(
            "INSERT INTO messages (session_id, seq, role, content, created_at, status) "
            "VALUES ('old', ?, 2, ?, '2025-01-02T00:00:00.000000Z', 1)",
            (seq, f"m{seq}"),
        )
    db.close()
    assert schema_version(path) == 1

    store = SqliteStore(path)
    await store.open()
    try:
        old = await store.get("old")
        assert (old.title, old.message_count) == ("kept", 3)
        assert [m.content for m in await store.messages("old")] == ["m0", "m1", "m2"]
        await store.append("old", [Message(Role.USER, "m3", T0)])
        assert (await store.get("old")).message_count == 4
        assert await store.trim("old", 2) == 2
        assert [m.content for m in await store.messages("old")] == ["m2", "m3"]
        assert await store.expire(T0 + timedelta(seconds=1)) == ["old"]
    finally:
        await store.aclose()
    assert schema_version(path) == SCHEMA_VERSION == MIGRATIONS[-1].version
    with sqlite3.connect(path) as db:
        applied = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert applied == [m.version for m in MIGRATIONS]


async def test_a_version_2_database_gets_owners_policies_and_turn_ids(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    db = connect(path)
    assert migrate(db, target=2) == (0, 2)
    db.execute(
        "INSERT INTO sessions (session_id, created_at, last_activity, title, message_count) "
        "VALUES ('old', '2025-01-01T00:00:00.000000Z', '2025-01-02T00:00:00.000000Z', 'kept', 1)"
    )
    db.execute(
        "INSERT INTO messages (session_id, seq, role, content, created_at, status, request_id) "
        "VALUES ('old', 0, 2, 'hello', '2025-01-02T00:00:00.000000Z', 1, 'r1')"
    )
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        old, history = await store.read("old")
    finally:
        await store.aclose()
    # Sessions from before owners existed belong to the anonymous identity, not to everyone.
    assert old == Session(
        "old",
        parse_timestamp("2025-01-01T00:00:00.000000Z"),
        parse_timestamp("2025-01-02T00:00:00.000000Z"),
        title="kept",
        message_count=1,
        owner=ANONYMOUS,
    )
    assert [(m.content, m.request_id, m.turn_id) for m in history] == [("hello", "r1", "")]


def test_the_schema_has_a_column_for_every_stored_field(tmp_path: Path) -> None:
    # A field added to Session or Message needs a migration: this names the missing column.
    db = connect(tmp_path / "columns.db")
    migrate(db)
    sessions = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
    messages = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    db.close()
    assert set(SESSION_FIELDS) - sessions == set(), "add a migration for these session fields"
    assert set(MESSAGE_FIELDS) - messages == set(), "add a migration for these message fields"


async def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    db = connect(path)
    migrate(db)
    db.execute(
        "INSERT INTO schema_migrations VALUES (?, 'from the future', '2030-01-01T00:00:00Z')",
        (SCHEMA_VERSION + 1,),
    )
    db.close()
    store = SqliteStore(path)
    with pytest.raises(ConfigurationError, match="newer grpc-chat"):
        await store.open()
    await store.aclose()
    assert schema_version(path) == SCHEMA_VERSION + 1


async def test_a_file_that_is_not_a_database_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the sessions you are looking for\n" * 100)
    store = SqliteStore(path)
    with pytest.raises(
        ConfigurationError, match=r"cannot open the SQLite store .*file is not a database"
    ):
        await store.open()
    await store.aclose()


async def test_two_connections_on_one_file_keep_every_append(tmp_path: Path) -> None:
    # Two stores are two connections, as two processes would have: SQLite's file locks and
    # BEGIN IMMEDIATE keep message numbers unique and every append whole.
    path = tmp_path / "shared.db"
    first, second = SqliteStore(path), SqliteStore(path)
    await first.open()
    await second.open()
    try:
        await first.create(Session("s", T0, T0))

        async def turns(store: SqliteStore, name: str) -> None:
            for n in range(30):
                await store.append(
                    "s", [Message(Role.USER, f"{name}{n}", T0), Message(Role.ASSISTANT, name, T0)]
                )

        async with asyncio.timeout(TIMEOUT * 3):
            await asyncio.gather(turns(first, "a"), turns(second, "b"))
        history = await second.messages("s")
    finally:
        await first.aclose()
        await second.aclose()
    assert len(history) == 120
    for user, reply in zip(history[::2], history[1::2], strict=True):
        assert user.content[0] == reply.content
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT message_count FROM sessions").fetchone() == (120,)


async def test_closing_stops_the_worker_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    store = SqliteStore(tmp_path / "chat.db")
    await store.open()
    assert threading.active_count() == before + 1
    await store.aclose()
    await store.aclose()
    assert threading.active_count() == before

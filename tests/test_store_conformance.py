"""The contract of :class:`chat.store.SessionStore`, run against every store.

Memory, SQLite (a file in ``tmp_path``) and Redis (a unique key prefix, deleted afterwards).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chat.errors import InvalidArgument, SessionNotFound
from chat.store import OwnerLimitReached, SessionStore, open_store
from chat.store._codec import SESSION_FIELDS
from chat.store._cursor import encode_cursor
from chat.types import (
    ContextPolicy,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    Usage,
)
from tests.helpers import TIMEOUT
from tests.stores import STORE_KINDS, delete_prefix, open_test_store, store_url, unique_prefix

T0 = datetime(2026, 11, 26, 13, 33, 32, 5, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def session(session_id: str, created: float = 0.0, **fields: Any) -> Session:
    return dataclasses.replace(
        Session(session_id=session_id, created_at=at(created), last_activity=at(created)),
        **fields,
    )


def turn(n: int, when: float = 0.0) -> list[Message]:
    """A user message and its reply, tied by request id ``r{n}``."""
    return [
        Message(Role.USER, f"question {n}", at(when), request_id=f"r{n}"),
        Message(
            Role.ASSISTANT,
            f"answer {n}",
            at(when),
            MessageStatus.COMPLETE,
            f"r{n}",
            "echo",
            Usage(3, 4),
        ),
    ]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    async with open_test_store(request.param, tmp_path) as opened:
        yield opened


async def list_all(store: SessionStore, page_size: int) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_sessions(page_size, cursor)
        assert len(page.sessions) <= page_size
        ids.extend(s.session_id for s in page.sessions)
        cursor = page.next_cursor
        if cursor is None:
            return ids


# -- sessions -------------------------------------------------------------------------------


async def test_a_created_session_reads_back_with_every_field(store: SessionStore) -> None:
    created = session(
        "s-1",
        title="Trip to Kraków ✈",
        model="gpt-4o-mini",
        system_prompt="Be brief.\nAnswer in French.",
        context_policy=ContextPolicy.REJECT,
    )
    await store.create(created)
    assert await store.get("s-1") == created
    assert await store.messages("s-1") == []
    assert await store.count() == 1


async def test_creating_an_existing_id_is_refused_and_changes_nothing(store: SessionStore) -> None:
    await store.create(session("s", title="first"))
    with pytest.raises(ValueError, match="already exists"):
        await store.create(session("s", created=5, title="second"))
    assert (await store.get("s")).title == "first"
    assert await store.count() == 1


async def test_update_changes_only_the_patched_fields_and_the_activity(
    store: SessionStore,
) -> None:
    await store.create(session("s", title="old", model="echo", system_prompt="sp"))
    updated = await store.update("s", SessionPatch(title="new"), at(60))
    assert updated == session(
        "s", title="new", model="echo", system_prompt="sp", last_activity=at(60)
    )
    assert await store.get("s") == updated
    every = SessionPatch(
        title="", system_prompt="other", model="m2", context_policy=ContextPolicy.TRUNCATE
    )
    updated = await store.update("s", every, at(61))
    assert (updated.title, updated.system_prompt, updated.model) == ("", "other", "m2")
    assert updated.context_policy is ContextPolicy.TRUNCATE
    assert updated.last_activity == at(61)


async def test_an_update_that_changes_nothing_keeps_the_activity(store: SessionStore) -> None:
    # Otherwise any client could keep a session from expiring with empty updates.
    await store.create(session("s", title="same", model="echo"))
    for patch in (SessionPatch(), SessionPatch(title="same", model="echo")):
        assert await store.update("s", patch, at(60)) == session("s", title="same", model="echo")
    assert (await store.get("s")).last_activity == at(0)
    changed = await store.update("s", SessionPatch(title="same", model="other"), at(61))
    assert (changed.model, changed.last_activity) == ("other", at(61))


def _non_default(value: Any) -> Any:
    """A value of the same type as ``value`` that differs from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, enum.IntEnum):
        return next(member for member in type(value) if member != value)
    if isinstance(value, int):
        return value + 7
    if isinstance(value, str):
        return value + "-set ✓"
    if isinstance(value, datetime):
        return value + timedelta(seconds=3)
    raise TypeError(value)


async def test_every_stored_session_field_round_trips(store: SessionStore) -> None:
    # Derived from the Session fields: a field added to Session is covered here, and fails
    # until every store keeps it.
    base = session("s")
    values = {name: _non_default(getattr(base, name)) for name in SESSION_FIELDS}
    created = dataclasses.replace(base, **values)
    await store.create(created)
    assert await store.get("s") == created
    patch_fields = {f.name for f in dataclasses.fields(SessionPatch)}
    reverted = {name: getattr(base, name) for name in patch_fields}
    updated = await store.update("s", SessionPatch(**reverted), at(90))
    assert updated == dataclasses.replace(created, last_activity=at(90), **reverted)
    assert await store.get("s") == updated


async def test_read_gives_the_session_and_its_history_at_one_moment(store: SessionStore) -> None:
    await store.create(session("s"))

    async def writer() -> None:
        for n in range(20):
            await store.append("s", turn(n, when=n))

    task = asyncio.create_task(writer())
    try:
        while not task.done():
            found, history = await store.read("s")
            assert found.message_count == len(history)
            assert history == [m for n in range(len(history) // 2) for m in turn(n, when=n)]
            await asyncio.sleep(0)
    finally:
        await task
    found, history = await store.read("s")
    assert (found.message_count, len(history)) == (40, 40)
    assert found == await store.get("s")
    with pytest.raises(SessionNotFound):
        await store.read("nope")


async def test_delete_removes_the_session_and_its_messages(store: SessionStore) -> None:
    await store.create(session("s"))
    await store.create(session("other"))
    await store.append("s", [*turn(1), *turn(2)])
    assert await store.delete("s") == 4
    with pytest.raises(SessionNotFound):
        await store.get("s")
    assert await store.count() == 1
    assert await list_all(store, 10) == ["other"]
    # The id is free again, with an empty history.
    await store.create(session("s", created=9))
    assert await store.messages("s") == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("nope"),
        lambda s: s.update("nope", SessionPatch(title="x"), T0),
        lambda s: s.delete("nope"),
        lambda s: s.messages("nope"),
        lambda s: s.append("nope", turn(1)),
        lambda s: s.append("nope", []),
        lambda s: s.trim("nope", 1),
    ],
    ids=["get", "update", "delete", "messages", "append", "append-nothing", "trim"],
)
async def test_an_unknown_session_is_not_found(store: SessionStore, call: object) -> None:
    await store.create(session("exists"))
    with pytest.raises(SessionNotFound) as raised:
        await call(store)  # type: ignore[operator]
    assert raised.value.session_id == "nope"
    assert raised.value.status.name == "NOT_FOUND"
    assert await store.count() == 1


# -- listing --------------------------------------------------------------------------------


async def test_pages_list_every_session_once_newest_first(store: SessionStore) -> None:
    # Three sessions share each creation time: ties are ordered by id, descending.
    expected = []
    for n in range(24):
        sid = f"s{n % 3}-{n:02d}"
        await store.create(session(sid, created=n // 3))
        expected.append((at(n // 3), sid))
    expected.sort(reverse=True)
    for page_size in (1, 5, 24, 100):
        assert await list_all(store, page_size) == [sid for _, sid in expected]
    first = await store.list_sessions(24)
    assert first.next_cursor is None
    assert [s.session_id for s in first.sessions] == [sid for _, sid in expected]


async def test_pages_stay_stable_while_sessions_come_and_go(store: SessionStore) -> None:
    for n in range(10):
        await store.create(session(f"s{n}", created=n))
    first = await store.list_sessions(4)
    assert [s.session_id for s in first.sessions] == ["s9", "s8", "s7", "s6"]
    # Created between pages (newer than everything): never on a later page.
    await store.create(session("new-1", created=100))
    await store.create(session("new-2", created=101))
    # The session the cursor points at is deleted: the next page still starts after it.
    await store.delete("s6")
    await store.delete("s3")
    second = await store.list_sessions(4, first.next_cursor)
    assert [s.session_id for s in second.sessions] == ["s5", "s4", "s2", "s1"]
    third = await store.list_sessions(4, second.next_cursor)
    assert [s.session_id for s in third.sessions] == ["s0"]
    assert third.next_cursor is None
    everything = ["new-2", "new-1", "s9", "s8", "s7", "s5", "s4", "s2", "s1", "s0"]
    assert await list_all(store, 3) == everything


async def test_a_listed_session_carries_its_message_count(store: SessionStore) -> None:
    await store.create(session("s"))
    await store.append("s", turn(1))
    (listed,) = (await store.list_sessions(10)).sessions
    assert listed == await store.get("s")
    assert listed.message_count == 2


async def test_an_empty_store_lists_nothing(store: SessionStore) -> None:
    page = await store.list_sessions(10)
    assert page.sessions == []
    assert page.next_cursor is None
    assert await store.count() == 0


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "",
        base64.urlsafe_b64encode(b"no separator").decode(),
        base64.urlsafe_b64encode(b"yesterday|s1").decode(),
        base64.urlsafe_b64encode(b"2026-11-26T13:33:32Z|").decode(),
    ],
)
async def test_a_cursor_the_store_did_not_write_is_an_invalid_argument(
    store: SessionStore, cursor: str
) -> None:
    await store.create(session("s"))
    with pytest.raises(InvalidArgument) as raised:
        await store.list_sessions(10, cursor)
    assert raised.value.field == "page_token"


async def test_a_cursor_past_every_session_gives_an_empty_last_page(store: SessionStore) -> None:
    await store.create(session("s", created=10))
    page = await store.list_sessions(10, encode_cursor(at(-1), "zzz"))
    assert page == type(page)([], None)


# -- messages -------------------------------------------------------------------------------


async def test_messages_read_back_exactly_in_order(store: SessionStore) -> None:
    await store.create(session("s"))
    written = [
        Message(Role.USER, "Grüß dich 👋\n\ttabs and \"quotes\" and 'apostrophes'", at(1)),
        Message(Role.ASSISTANT, "", at(2), MessageStatus.CANCELLED, "r1", "echo", None),
        Message(Role.USER, "x" * 10_000, at(3), MessageStatus.FAILED, "r2"),
        Message(Role.ASSISTANT, "partial", at(4), MessageStatus.INTERRUPTED, "r2", "m", Usage()),
        Message(Role.SYSTEM, '{"json": [1, 2]}', at(5), usage=Usage(2**31 - 1, 7)),
    ]
    after = await store.append("s", written)
    assert after.message_count == 5
    assert after.last_activity == at(5)
    assert await store.messages("s") == written
    assert await store.get("s") == after


async def test_appending_nothing_changes_nothing(store: SessionStore) -> None:
    await store.create(session("s"))
    await store.append("s", turn(1, when=7))
    before = await store.get("s")
    assert await store.append("s", []) == before
    assert await store.messages("s") == turn(1, when=7)


async def test_concurrent_appends_to_one_session_are_each_whole(store: SessionStore) -> None:
    await store.create(session("s"))
    tasks = 40
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(store.append("s", turn(n, when=n)) for n in range(tasks)))
    history = await store.messages("s")
    assert len(history) == 2 * tasks
    # Each append is atomic: a user message is directly followed by its own reply.
    pairs = [(history[i].request_id, history[i + 1].request_id) for i in range(0, len(history), 2)]
    assert all(user == reply for user, reply in pairs)
    assert sorted(user for user, _ in pairs) == sorted(f"r{n}" for n in range(tasks))
    assert (await store.get("s")).message_count == 2 * tasks


async def test_turns_under_the_lock_see_every_earlier_turn(store: SessionStore) -> None:
    await store.create(session("s"))

    async def one_turn() -> None:
        async with store.lock("s"):
            seen = len(await store.messages("s"))
            # Give the other tasks every chance to interleave, were the lock not held.
            await asyncio.sleep(0)
            await store.append("s", [Message(Role.USER, str(seen), T0)])

    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(one_turn() for _ in range(25)))
    assert [m.content for m in await store.messages("s")] == [str(n) for n in range(25)]


async def test_the_lock_is_per_session_and_passes_on_when_released(
    store: SessionStore,
) -> None:
    inside = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with store.lock("s"):
            inside.set()
            await release.wait()
            order.append("holder out")

    async def waiter() -> None:
        async with store.lock("s"):
            order.append("waiter in")

    first = asyncio.create_task(holder())
    second: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(inside.wait(), TIMEOUT)
        # Another session's lock is free meanwhile.
        async with asyncio.timeout(TIMEOUT), store.lock("other"):
            pass
        second = asyncio.create_task(waiter())
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
    finally:
        release.set()
        for task in (first, second):
            if task is not None and not task.done():
                task.cancel()
    assert order == ["holder out", "waiter in"]


async def test_a_lock_is_released_when_its_holder_fails(store: SessionStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with store.lock("s"):
            raise RuntimeError("boom")
    entered = False
    async with asyncio.timeout(TIMEOUT), store.lock("s"):
        entered = True
    assert entered


async def test_large_histories_are_kept_whole_and_in_order(store: SessionStore) -> None:
    await store.create(session("big"))
    await store.append("big", [Message(Role.USER, f"m{n}", at(n)) for n in range(2500)])
    for start in range(2500, 4000, 100):
        await store.append(
            "big", [Message(Role.ASSISTANT, f"m{n}", at(n)) for n in range(start, start + 100)]
        )
    history = await store.messages("big")
    assert [m.content for m in history] == [f"m{n}" for n in range(4000)]
    assert (await store.get("big")).message_count == 4000
    assert await store.delete("big") == 4000


# -- retention primitives -------------------------------------------------------------------


async def test_trim_keeps_the_newest_messages(store: SessionStore) -> None:
    await store.create(session("s"))
    await store.append("s", [*turn(1, 1), *turn(2, 2), *turn(3, 3)])
    before = await store.get("s")
    assert await store.trim("s", 10) == 0
    assert await store.trim("s", 3) == 3
    assert await store.messages("s") == [*turn(2, 2)[1:], *turn(3, 3)]
    after = await store.get("s")
    assert after == dataclasses.replace(before, message_count=3)
    # New messages go after the kept ones.
    await store.append("s", turn(4, 4))
    assert [m.request_id for m in await store.messages("s")] == ["r2", "r3", "r3", "r4", "r4"]
    assert await store.trim("s", 0) == 5
    assert await store.messages("s") == []
    assert (await store.get("s")).message_count == 0


async def test_evict_drops_the_least_recently_active_sessions(store: SessionStore) -> None:
    for n in range(6):
        await store.create(session(f"s{n}", created=n))
    await store.append("s0", turn(1, when=50))  # the oldest session, recently active
    await store.update("s2", SessionPatch(title="touched"), at(40))
    await store.create(session("t3", created=3))  # same activity as s3: id breaks the tie
    assert await store.evict(10) == []
    assert await store.evict(4) == ["s1", "s3", "t3"]
    assert sorted(await list_all(store, 10)) == ["s0", "s2", "s4", "s5"]
    assert await store.count() == 4
    with pytest.raises(SessionNotFound):
        await store.messages("s1")


async def test_expire_drops_sessions_idle_since_before_the_cutoff(store: SessionStore) -> None:
    for n in range(5):
        await store.create(session(f"s{n}", created=n))
    await store.append("s1", turn(1, when=30))
    assert await store.expire(at(0)) == []
    assert await store.expire(at(3)) == ["s0", "s2"]
    assert sorted(await list_all(store, 10)) == ["s1", "s3", "s4"]
    assert await store.expire(at(31)) == ["s3", "s4", "s1"]
    assert await store.count() == 0


# -- persistence ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
async def test_a_reopened_store_has_everything(kind: str, tmp_path: Path) -> None:
    prefix = unique_prefix()
    url = store_url(kind, tmp_path, prefix)
    try:
        first = open_store(url)
        await first.open()
        await first.create(session("s", title="kept"))
        await first.append("s", turn(1))
        await first.aclose()

        second = open_store(url)
        try:
            await second.open()
            assert (await second.get("s")).title == "kept"
            assert await second.messages("s") == turn(1)
        finally:
            await second.aclose()
    finally:
        await delete_prefix(prefix)


async def test_listing_and_counting_by_owner_see_only_that_owners_sessions(
    store: SessionStore,
) -> None:
    for n, owner in enumerate(["alice", "bob", "alice", "alice", "bob"]):
        await store.create(session(f"s{n}", created=n, owner=owner))
    first = await store.list_sessions(2, owner="alice")
    assert [s.session_id for s in first.sessions] == ["s3", "s2"]
    assert first.next_cursor is not None
    rest = await store.list_sessions(2, first.next_cursor, owner="alice")
    assert [s.session_id for s in rest.sessions] == ["s0"]
    assert rest.next_cursor is None
    assert await store.count(owner="alice") == 3
    assert await store.count(owner="bob") == 2
    assert await store.count(owner="carol") == 0
    assert await store.count() == 5
    await store.delete("s3")
    await store.evict(keep=3)
    remaining = {s.session_id for s in (await store.list_sessions(10)).sessions}
    by_owner = {
        s.session_id
        for owner in ("alice", "bob")
        for s in (await store.list_sessions(10, owner=owner)).sessions
    }
    assert by_owner == remaining
    assert await store.count(owner="alice") + await store.count(owner="bob") == 3


async def test_create_with_max_owned_counts_and_creates_in_one_step(store: SessionStore) -> None:
    await store.create(session("a1", owner="alice"), max_owned=2)
    await store.create(session("b1", owner="bob"), max_owned=1)
    await store.create(session("a2", owner="alice", created=1), max_owned=2)
    with pytest.raises(OwnerLimitReached) as full:
        await store.create(session("a3", owner="alice", created=2), max_owned=2)
    assert (full.value.owner, full.value.owned) == ("alice", 2)
    with pytest.raises(SessionNotFound):
        await store.get("a3")
    # Concurrent creates (one store object or several servers on one store) never pass it.
    results = await asyncio.gather(
        *(store.create(session(f"c{n}", owner="carol", created=n), max_owned=3) for n in range(8)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 3
    assert all(r is None or isinstance(r, OwnerLimitReached) for r in results)
    assert await store.count(owner="carol") == 3


# -- health and secrets ---------------------------------------------------------------------


async def test_ping_answers_while_the_store_can_serve(store: SessionStore) -> None:
    await store.ping()
    await store.create(session("s"))
    await store.ping()


async def test_a_secret_is_made_once_per_name(store: SessionStore) -> None:
    first = await store.secret("page-tokens")
    assert len(first) == 32
    assert await store.secret("page-tokens") == first
    assert await store.secret("other") not in (first, b"")


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
async def test_servers_sharing_a_store_share_its_secrets_also_after_a_restart(
    kind: str, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    url = store_url(kind, tmp_path, prefix)
    try:
        one, two = open_store(url), open_store(url)
        await one.open()
        await two.open()
        try:
            made = await asyncio.gather(one.secret("k"), two.secret("k"))
            assert made[0] == made[1]
        finally:
            await one.aclose()
            await two.aclose()
        again = open_store(url)
        await again.open()
        try:
            assert await again.secret("k") == made[0]
        finally:
            await again.aclose()
    finally:
        await delete_prefix(prefix)

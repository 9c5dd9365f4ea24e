"""Every store behaves like a plain model of sessions, whatever the sequence of operations."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chat.errors import SessionNotFound
from chat.store import SessionStore, open_store
from chat.types import Message, Session, SessionPatch
from tests.stores import STORE_KINDS, delete_prefix, store_url, unique_prefix
from tests.strategies import close_moments, messages, moments, patches, session_ids

T = TypeVar("T")


class StoreModel(RuleBasedStateMachine):
    """Rules call the store and a dict side by side; the two must always agree."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.directory = Path(tempfile.mkdtemp(prefix="store-model-"))
        self.prefix = unique_prefix()
        self.store: SessionStore = open_store(store_url(self.kind, self.directory, self.prefix))
        self.run(self.store.open())
        self.sessions: dict[str, Session] = {}
        self.histories: dict[str, list[Message]] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.store.aclose())
            if self.kind == "redis":
                self.run(delete_prefix(self.prefix))
        finally:
            self.runner.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def expect_missing(self, coroutine: Coroutine[Any, Any, object]) -> None:
        with pytest.raises(SessionNotFound):
            self.run(coroutine)

    @rule(created=st.lists(st.tuples(session_ids, moments, st.text(max_size=5)), max_size=4))
    def create(self, created: list[tuple[str, datetime, str]]) -> None:
        for session_id, created_at, title in created:
            session = Session(session_id, created_at, created_at, title=title)
            if session_id in self.sessions:
                with pytest.raises(ValueError, match="already exists"):
                    self.run(self.store.create(session))
                continue
            self.run(self.store.create(session))
            self.sessions[session_id] = session
            self.histories[session_id] = []

    @rule(session_id=session_ids)
    def get(self, session_id: str) -> None:
        if session_id not in self.sessions:
            self.expect_missing(self.store.get(session_id))
            return
        assert self.run(self.store.get(session_id)) == self.sessions[session_id]
        assert self.run(self.store.messages(session_id)) == self.histories[session_id]
        assert self.run(self.store.read(session_id)) == (
            self.sessions[session_id],
            self.histories[session_id],
        )

    @rule(session_id=session_ids, patch=patches, now=moments)
    def update(self, session_id: str, patch: SessionPatch, now: datetime) -> None:
        if session_id not in self.sessions:
            self.expect_missing(self.store.update(session_id, patch, now))
            return
        current = self.sessions[session_id]
        changes = {
            name: getattr(patch, name)
            for name in patch.changed()
            if getattr(patch, name) != getattr(current, name)
        }
        # The activity moves only when something changes.
        expected = (
            dataclasses.replace(current, last_activity=now, **changes) if changes else current
        )
        assert self.run(self.store.update(session_id, patch, now)) == expected
        self.sessions[session_id] = expected

    @rule(session_id=session_ids, added=st.lists(messages, max_size=4))
    def append(self, session_id: str, added: list[Message]) -> None:
        if session_id not in self.sessions:
            self.expect_missing(self.store.append(session_id, added))
            return
        history = self.histories[session_id]
        history.extend(added)
        session = self.sessions[session_id]
        if added:
            session = dataclasses.replace(
                session, message_count=len(history), last_activity=added[-1].created_at
            )
        self.sessions[session_id] = session
        assert self.run(self.store.append(session_id, added)) == session

    @rule(session_id=session_ids)
    def delete(self, session_id: str) -> None:
        if session_id not in self.sessions:
            self.expect_missing(self.store.delete(session_id))
            return
        assert self.run(self.store.delete(session_id)) == len(self.histories[session_id])
        del self.sessions[session_id], self.histories[session_id]

    @rule(session_id=session_ids, keep=st.integers(0, 5))
    def trim(self, session_id: str, keep: int) -> None:
        if session_id not in self.sessions:
            self.expect_missing(self.store.trim(session_id, keep))
            return
        history = self.histories[session_id]
        dropped = max(0, len(history) - keep)
        del history[:dropped]
        self.sessions[session_id] = dataclasses.replace(
            self.sessions[session_id], message_count=len(history)
        )
        assert self.run(self.store.trim(session_id, keep)) == dropped

    def _drop(self, ids: list[str]) -> None:
        for session_id in ids:
            del self.sessions[session_id], self.histories[session_id]

    def _by_activity(self) -> list[str]:
        return sorted(self.sessions, key=lambda i: (self.sessions[i].last_activity, i))

    @rule(keep=st.integers(0, 8))
    def evict(self, keep: int) -> None:
        expected = self._by_activity()[: max(0, len(self.sessions) - keep)]
        assert self.run(self.store.evict(keep)) == expected
        self._drop(expected)

    @rule(idle_before=close_moments)
    def expire(self, idle_before: datetime) -> None:
        expected = [i for i in self._by_activity() if self.sessions[i].last_activity < idle_before]
        assert self.run(self.store.expire(idle_before)) == expected
        self._drop(expected)

    @rule(page_size=st.integers(1, 4))
    def list_every_page(self, page_size: int) -> None:
        listed: list[Session] = []
        cursor: str | None = None
        while True:
            page = self.run(self.store.list_sessions(page_size, cursor))
            listed.extend(page.sessions)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        expected = sorted(
            self.sessions.values(), key=lambda s: (s.created_at, s.session_id), reverse=True
        )
        assert listed == expected

    @invariant()
    def counts_agree(self) -> None:
        assert self.run(self.store.count()) == len(self.sessions)


def _machine(kind: str) -> type[StoreModel]:
    return type(f"{kind.title()}StoreModel", (StoreModel,), {"kind": kind})


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_the_store_behaves_like_the_model(kind: str) -> None:
    machine = _machine(kind)
    # Fewer, longer runs for the stores that do I/O; the memory store gets the profile's.
    examples = settings().max_examples if kind == "memory" else 20
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=40)
    machine.TestCase().runTest()

"""Private sessions as a state machine: several identities create, list, read, update,
delete, chat on, type in and cancel sessions, their own and each other's, at random.

Invariants: no identity ever observes another's session (by id, in a listing, in a pushed
update or in the statistics), and whatever it asks about another's session is answered
exactly as for an id that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from chat import ChatCore, ChatError, EchoBackend, MemoryStore, SessionPatch
from chat.auth import Credentials, Identity
from chat.core import Conversation
from chat.events import Event, EventKind, Request, RequestKind

PEOPLE = [Identity("alice"), Identity("bob"), Identity("carol")]
people = st.sampled_from(PEOPLE)


def normalized(error: ChatError, session_id: str) -> tuple[type, str, int]:
    """An error with the session id taken out: what must not depend on who owns it."""
    return type(error), error.message.replace(session_id, "<id>"), int(error.status)


class PrivacyMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.core = ChatCore(MemoryStore(), EchoBackend())
        self.owner: dict[str, str] = {}
        self.conversations: dict[str, Conversation] = {}
        self.seen: dict[str, list[Event]] = {p.name: [] for p in PEOPLE}
        for person in PEOPLE:
            conversation = self.core.open_conversation(Credentials(person))
            self.run(conversation.__aenter__())
            self.conversations[person.name] = conversation

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, 10))

    def teardown(self) -> None:
        for conversation in self.conversations.values():
            self.run(conversation.aclose())
        self.loop.close()

    # -- helpers -------------------------------------------------------------------------

    def outcome(self, call: Any) -> tuple[str, Any]:
        try:
            return "ok", self.run(call)
        except ChatError as error:
            return "error", error

    def same_as_unknown(self, make: Any, session_id: str) -> None:
        """``make(id)`` for another's session fails exactly as for an unknown id."""
        unknown = str(uuid.uuid4())
        kind, foreign = self.outcome(make(session_id))
        assert kind == "error", f"another identity's session {session_id} was usable"
        kind, missing = self.outcome(make(unknown))
        assert kind == "error"
        assert normalized(foreign, session_id) == normalized(missing, unknown)

    def drain(self, person: Identity) -> list[Event]:
        outbox = self.conversations[person.name].outbox
        events: list[Event] = []
        while len(outbox):
            batch = self.run(outbox.get())
            events.extend(batch or ())
        self.seen[person.name].extend(events)
        return events

    def chat(self, person: Identity, kind: RequestKind, session_id: str) -> list[Event]:
        """Send one request on the person's stream; the events that answer it."""
        request_id = uuid.uuid4().hex
        conversation = self.conversations[person.name]
        self.run(
            conversation.handle(Request(kind, session_id, "hello there", request_id=request_id))
        )
        answers: list[Event] = []
        if kind != RequestKind.MESSAGE:
            # Answered (if at all: typing on one's own session is not) by the time
            # handle() returns.
            return [e for e in self.drain(person) if e.request_id == request_id]

        async def until_answered() -> None:
            while True:
                batch = await conversation.outbox.get()
                for event in batch or ():
                    self.seen[person.name].append(event)
                    if event.request_id != request_id:
                        continue
                    answers.append(event)
                    if event.kind in (EventKind.RESPONSE_COMPLETE, EventKind.ERROR):
                        return

        self.run(until_answered())
        return answers

    # -- rules ---------------------------------------------------------------------------

    @rule(target=sessions, person=people, title=st.text(max_size=10))
    def create(self, person: Identity, title: str) -> str:
        session = self.run(self.core.create_session(title=title, identity=person))
        self.owner[session.session_id] = person.name
        return str(session.session_id)

    @rule(person=people, session_id=sessions, history=st.booleans())
    def read(self, person: Identity, session_id: str, history: bool) -> None:
        def make(sid: str) -> Any:
            if history:
                return self.core.read_session(sid, person)
            return self.core.get_session(sid, person)

        if self.owner.get(session_id) == person.name:
            kind, _ = self.outcome(make(session_id))
            assert kind == "ok"
        else:
            self.same_as_unknown(make, session_id)

    @rule(person=people, session_id=sessions, title=st.text(max_size=10))
    def update(self, person: Identity, session_id: str, title: str) -> None:
        def make(sid: str) -> Any:
            return self.core.update_session(sid, SessionPatch(title=title), person)

        if self.owner.get(session_id) == person.name:
            kind, result = self.outcome(make(session_id))
            assert kind == "ok"
            assert result.title == title
        else:
            self.same_as_unknown(make, session_id)

    @rule(person=people, session_id=sessions)
    def delete(self, person: Identity, session_id: str) -> None:
        if self.owner.get(session_id) == person.name:
            kind, _ = self.outcome(self.core.delete_session(session_id, person))
            assert kind == "ok"
            del self.owner[session_id]
        else:
            self.same_as_unknown(lambda sid: self.core.delete_session(sid, person), session_id)

    @rule(person=people, session_id=sessions, kind=st.sampled_from(["message", "typing"]))
    def talk(self, person: Identity, session_id: str, kind: str) -> None:
        request = RequestKind.MESSAGE if kind == "message" else RequestKind.TYPING_START
        answers = self.chat(person, request, session_id)
        unknown = str(uuid.uuid4())
        if self.owner.get(session_id) == person.name:
            if request == RequestKind.MESSAGE:
                assert answers[-1].kind == EventKind.RESPONSE_COMPLETE
            return
        (refused,) = answers
        (missing,) = self.chat(person, request, unknown)
        assert refused.kind == missing.kind == EventKind.ERROR
        assert refused.error_code == missing.error_code
        assert refused.error_message.replace(session_id, "<id>") == (
            missing.error_message.replace(unknown, "<id>")
        )

    @rule(person=people, session_id=sessions)
    def cancel(self, person: Identity, session_id: str) -> None:
        (answer,) = self.chat(person, RequestKind.CANCEL, session_id)
        unknown = str(uuid.uuid4())
        (missing,) = self.chat(person, RequestKind.CANCEL, unknown)
        if self.owner.get(session_id) != person.name:
            assert answer.kind == missing.kind
            assert answer.status_kind == missing.status_kind

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def listings_hold_only_ones_own_sessions(self) -> None:
        for person in PEOPLE:
            sessions, _, total = self.run(self.core.list_sessions(1000, "", person))
            mine = {sid for sid, owner in self.owner.items() if owner == person.name}
            assert {s.session_id for s in sessions} == mine
            assert total == len(mine)
            assert all(s.owner == "" for s in sessions)

    @invariant()
    def pushed_updates_reach_only_the_owner(self) -> None:
        for person in PEOPLE:
            self.drain(person)
            for event in self.seen[person.name]:
                if event.kind == EventKind.SESSION_UPDATE:
                    assert self.owner.get(event.session_id, person.name) == person.name
                    assert event.session is None or event.session.owner == ""

    @invariant()
    def stats_show_nothing_of_the_others(self) -> None:
        for person in PEOPLE:
            stats = self.run(self.core.stats_snapshot(person))
            mine = sum(1 for owner in self.owner.values() if owner == person.name)
            assert stats.active_sessions == mine
            assert stats.active_streams == 1
            assert stats.total_requests == stats.total_sessions_created == 0


PrivacyMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
test_no_identity_observes_another_identitys_session = PrivacyMachine.TestCase


class _RecordingStore(MemoryStore):
    """A memory store that records which of its methods are called, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if not name.startswith("_") and callable(value) and name != "calls":
            super().__getattribute__("calls").append(name)
        return value


async def test_another_identitys_session_costs_the_same_store_work_as_an_unknown_id() -> None:
    # Not a timing (tests never assert one): the same store operations, in the same order,
    # is what leaves nothing to measure between the two answers.
    store = _RecordingStore()
    core = ChatCore(store, EchoBackend())
    alice, bob = PEOPLE[0], PEOPLE[1]
    theirs = (await core.create_session(identity=alice)).session_id
    await core.read_session(theirs, alice)

    async def calls_for(session_id: str) -> list[list[str]]:
        recorded = []
        attempts = [
            core.get_session(session_id, bob),
            core.read_session(session_id, bob),
            core.update_session(session_id, SessionPatch(title="x"), bob),
            core.delete_session(session_id, bob),
        ]
        for attempt in attempts:
            store.calls.clear()
            with contextlib.suppress(ChatError):
                await attempt
            recorded.append(list(store.calls))
        async with core.open_conversation(Credentials(bob)) as conversation:
            store.calls.clear()
            await conversation.handle(Request(RequestKind.MESSAGE, session_id, "hi", "r"))
            (batch,) = [await conversation.outbox.get()]
            assert batch is not None
            assert batch[-1].kind == EventKind.ERROR
            recorded.append(list(store.calls))
        return recorded

    foreign = await calls_for(theirs)
    unknown = await calls_for(str(uuid.uuid4()))
    assert foreign == unknown
    assert all(calls == ["get"] for calls in foreign)

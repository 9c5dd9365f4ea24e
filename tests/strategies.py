"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from chat.backends import PromptMessage
from chat.client import ReconnectPolicy
from chat.types import ContextPolicy, Message, MessageStatus, Role, SessionPatch, Usage

#: Text as people type it, plus what breaks naive code: combining marks, emoji with
#: zero-width joiners, astral-plane characters, CJK, RTL, control-free whitespace.
_ALPHABET = st.characters(
    codec="utf-8",
    exclude_categories=["Cs"],  # lone surrogates cannot be encoded, so never sent
)
_SPECIAL = st.sampled_from(["👩‍👩‍👧", "🇫🇷", "é", "é", "日本語", "שלום", " ", "\n", "\t", ""])

text = st.one_of(st.text(_ALPHABET, max_size=60), _SPECIAL)

#: A reply as a model might stream it: any number of deltas, some empty.
deltas = st.lists(text, max_size=40)

#: A non-empty message a user could send.
user_message = st.text(_ALPHABET, min_size=1, max_size=80).filter(lambda s: s.strip() != "")

#: The text of a message in a prompt (a system prompt, history, the new message).
prompt_text = st.text(_ALPHABET, min_size=1, max_size=200)

#: A history of user and assistant messages, oldest first, as sent to a model.
histories = st.lists(
    st.builds(PromptMessage, st.sampled_from([Role.USER, Role.ASSISTANT]), prompt_text),
    max_size=30,
)

# -- stored sessions and messages -------------------------------------------------------------

#: Aware UTC datetimes with microseconds, in a range where RFC 3339 has a 4-digit year.
timestamps = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
)

#: Few distinct moments, so that orderings by time have ties (broken by session id), with
#: the occasional arbitrary one.
close_moments = st.integers(0, 12).map(
    lambda s: datetime(2026, 5, 1, tzinfo=UTC) + timedelta(seconds=s)
)
moments = close_moments | timestamps

#: Few distinct ids (so that rules hit existing sessions), with the separators stores use.
session_ids = st.text(alphabet="ab:|-", min_size=1, max_size=3)

usages = st.none() | st.builds(Usage, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))

messages = st.builds(
    Message,
    role=st.sampled_from(Role),
    content=text,
    created_at=moments,
    status=st.sampled_from(MessageStatus),
    request_id=st.text(max_size=8, alphabet="xyz0123456789"),
    model=st.sampled_from(["", "echo", "gpt-4o-mini"]),
    usage=usages,
)

patches = st.builds(
    SessionPatch,
    title=st.none() | text,
    system_prompt=st.none() | text,
    model=st.none() | st.sampled_from(["echo", "other"]),
    context_policy=st.none() | st.sampled_from(ContextPolicy),
)

#: Any valid reconnection policy of ChatClient.
reconnect_policies = st.builds(
    ReconnectPolicy,
    max_attempts=st.integers(1, 50),
    initial_backoff=st.floats(0, 2),
    max_backoff=st.floats(2, 30),
    multiplier=st.floats(1, 4),
    jitter=st.floats(0, 1),
)

# -- stored turns, as the core writes them ----------------------------------------------------

_NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _turn(kind: str, question: str, reply: str) -> list[Message]:
    """The messages one turn leaves in a history (see ``Conversation._write_turn``)."""
    asked = Message(Role.USER, question, _NOW)
    failed = Message(Role.USER, question, _NOW, MessageStatus.FAILED)
    if kind == "completed":
        return [asked, Message(Role.ASSISTANT, reply or "ok", _NOW)]
    if kind == "empty":  # the model said nothing
        return [asked, Message(Role.ASSISTANT, "", _NOW)]
    if kind == "cancelled":  # partial, or before the first word when reply is empty
        return [asked, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.CANCELLED)]
    if kind == "interrupted":
        return [asked, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.INTERRUPTED)]
    if kind == "failed":  # the model failed, after some words or none
        return (
            [failed, Message(Role.ASSISTANT, reply, _NOW, MessageStatus.FAILED)]
            if reply
            else [failed]
        )
    raise AssertionError(kind)


TURN_KINDS = ("completed", "empty", "cancelled", "interrupted", "failed")

#: Histories of completed, empty, cancelled, interrupted and failed turns, as stored; cut at a
#: random point at the start, as a per-session message cap leaves them.
turn_histories = st.builds(
    lambda turns, cut: [m for turn in turns for m in _turn(*turn)][cut:],
    st.lists(st.tuples(st.sampled_from(TURN_KINDS), user_message, text), max_size=12),
    st.integers(0, 2),
)

"""Hypothesis strategies for the domain types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from chat.types import ContextPolicy, Message, MessageStatus, Role, SessionPatch, Usage

#: Text as a client can send it: any Unicode scalar value (protobuf strings cannot carry
#: lone surrogates).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)

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
    content=texts,
    created_at=moments,
    status=st.sampled_from(MessageStatus),
    request_id=st.text(max_size=8, alphabet="xyz0123456789"),
    model=st.sampled_from(["", "echo", "gpt-4o-mini"]),
    usage=usages,
)

patches = st.builds(
    SessionPatch,
    title=st.none() | texts,
    system_prompt=st.none() | texts,
    model=st.none() | st.sampled_from(["echo", "other"]),
    context_policy=st.none() | st.sampled_from(ContextPolicy),
)

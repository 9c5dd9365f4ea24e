"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from chat.client import ReconnectPolicy

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

#: Any valid reconnection policy of ChatClient.
reconnect_policies = st.builds(
    ReconnectPolicy,
    max_attempts=st.integers(1, 50),
    initial_backoff=st.floats(0, 2),
    max_backoff=st.floats(2, 30),
    multiplier=st.floats(1, 4),
    jitter=st.floats(0, 1),
)

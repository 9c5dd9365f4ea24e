"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

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

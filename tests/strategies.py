"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from chat.backends import PromptMessage
from chat.types import Role

#: Text of the kinds models see: words, punctuation, accents and CJK.
texts = st.text(
    alphabet=st.sampled_from([*list("abcdefghij klmnop,.!?'\n"), "é", "ß", "日", "本", "🙂"]),
    min_size=1,
    max_size=200,
)

conversation_roles = st.sampled_from([Role.USER, Role.ASSISTANT])

prompt_messages = st.builds(PromptMessage, conversation_roles, texts)

#: A history of user and assistant messages, oldest first.
histories = st.lists(prompt_messages, max_size=30)

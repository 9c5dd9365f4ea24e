"""Building the prompt for a turn from a session's history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chat.backends import PromptMessage
from chat.types import Message, MessageStatus, Role, Session

__all__ = ["Context", "build_context"]


@dataclass(frozen=True, slots=True)
class Context:
    """The messages sent to the model for one turn.

    ``messages`` starts with the system prompt (if the session has one) and ends with the
    user's new message. ``omitted`` counts history messages left out.
    """

    messages: list[PromptMessage]
    omitted: int = 0

    @property
    def conversation_messages(self) -> int:
        """Messages sent, not counting the system prompt (``context_messages`` on the wire)."""
        return sum(1 for m in self.messages if m.role is not Role.SYSTEM)


def build_context(session: Session, history: Sequence[Message], text: str) -> Context:
    """The system prompt, then the history, then ``text`` as the new user message.

    Failed messages (a user message whose reply failed, and the partial reply of a failed
    turn) are history for the person but not for the model: they are left out, so that a
    retried message is not sent twice. Empty messages (a reply cancelled before its first
    word) are left out too.
    """
    messages: list[PromptMessage] = []
    if session.system_prompt:
        messages.append(PromptMessage(Role.SYSTEM, session.system_prompt))
    messages.extend(
        PromptMessage(m.role, m.content)
        for m in history
        if m.content and m.status is not MessageStatus.FAILED and m.role is not Role.SYSTEM
    )
    messages.append(PromptMessage(Role.USER, text))
    return Context(messages)

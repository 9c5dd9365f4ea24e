"""The offline default backend: a deterministic echo that shows what context it received."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

from chat.backends import Delta, GenerationRequest
from chat.types import FinishReason, Role, Usage

__all__ = ["EchoBackend", "echo_reply", "split_words"]

_WORD = re.compile(r"\S+\s*|\s+")


def split_words(text: str) -> list[str]:
    """Split ``text`` into word-sized pieces that concatenate back to it exactly.

    >>> split_words("Hello,  world!")
    ['Hello,  ', 'world!']
    """
    return _WORD.findall(text)


def echo_reply(request: GenerationRequest) -> str:
    """The echo backend's answer: the turn number, the context size and the user's words.

    >>> from chat.backends import PromptMessage
    >>> echo_reply(GenerationRequest("echo", [PromptMessage(Role.USER, "hi there")]))
    'Echo #1 (1 message in context): hi there'
    """
    # Counted with list.count: this runs over the whole context on every turn.
    roles = [m.role for m in request.messages]
    conversation = len(roles) - roles.count(Role.SYSTEM)
    turn = roles.count(Role.USER)
    last = next((m.content for m in reversed(request.messages) if m.role is Role.USER), "")
    plural = "" if conversation == 1 else "s"
    return f"Echo #{turn} ({conversation} message{plural} in context): {last}"


class EchoBackend:
    """Answers every message with :func:`echo_reply`, one word per delta.

    ``pace`` is the pause in seconds between deltas (0 for tests and benchmarks; a small
    value makes streaming visible in a terminal). Usage is reported in words, as an
    estimate of tokens, and ``max_output_tokens`` counts words too.

    ``models`` are the names it serves, checked like a remote backend's model list (a
    session asking for another is refused with ``INVALID_ARGUMENT``); ``None`` answers
    under any name. ``chat-server`` serves its default model only.
    """

    name = "echo"

    def __init__(
        self,
        *,
        pace: float = 0.0,
        default_model: str = "echo",
        models: Sequence[str] | None = None,
    ) -> None:
        if pace < 0:
            raise ValueError("pace must be >= 0")
        self._pace = pace
        self._default_model = default_model
        self._models = None if models is None else tuple(models)

    @property
    def default_model(self) -> str:
        return self._default_model

    async def list_models(self) -> Sequence[str] | None:
        return self._models

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        # Word by word from the text, not from a list of every word: a long reply holds
        # one string while it streams, not thousands.
        finish = FinishReason.STOP
        limit = request.max_output_tokens
        count = 0
        for match in _WORD.finditer(echo_reply(request)):
            if limit is not None and count >= limit:
                # A word counts as a token here, as in the usage reported.
                finish = FinishReason.LENGTH
                break
            if self._pace and count:
                await asyncio.sleep(self._pace)
            count += 1
            yield Delta(match.group())
        # The words of all messages: split once, joined by a space (no word spans two).
        prompt_words = len(" ".join([m.content for m in request.messages]).split())
        yield Delta(
            finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_words, completion_tokens=count),
        )

    async def aclose(self) -> None:
        return None

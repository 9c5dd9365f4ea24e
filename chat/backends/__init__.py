"""Model backends: what turns a conversation into a streamed reply.

Every backend implements :class:`ModelBackend` and passes the conformance suite in
``tests/test_backend_conformance.py``. The offline default is
:class:`~chat.backends.echo.EchoBackend`; :mod:`chat.backends.openai` (OpenAI-compatible
servers) and :mod:`chat.backends.gemini` need the extras of the same names, and share
:mod:`chat.backends.remote` (settings, retries, error mapping).
:class:`~chat.backends.coalesce.CoalescingBackend` wraps any backend to merge deltas that
arrive close together.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from chat.errors import excerpt
from chat.types import FinishReason, Role, Usage

__all__ = [
    "Delta",
    "GenerationRequest",
    "ModelBackend",
    "ModelCheck",
    "ModelChecker",
    "PromptMessage",
]

log = logging.getLogger(__name__)

#: Model names warned about once each (--model-check warn), at most.
_MAX_WARNED = 1024


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One message sent to the model: the system prompt, a user or an assistant message."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the model is asked: the conversation so far, ending with the user's new message.

    ``max_output_tokens`` is the longest reply the model may write, sent upstream in the
    field its API uses; a reply that reaches it ends with ``FinishReason.LENGTH``. ``None``
    leaves it to the upstream's default.
    """

    model: str
    messages: Sequence[PromptMessage]
    request_id: str = ""
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, not {self.max_output_tokens}")


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the reply as the model produced it.

    ``text`` may be empty (a delta that only reports ``finish_reason`` or ``usage``, usually
    the last one).
    """

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@runtime_checkable
class ModelBackend(Protocol):
    """A source of streamed replies.

    :meth:`generate` returns an async generator of :class:`Delta` (write it as an
    ``async def`` with ``yield``); the caller closes it (``aclose``) to cancel generation, and
    a backend must stop its upstream work when that happens. Failures are raised as
    :class:`~chat.errors.BackendError` subclasses.
    """

    @property
    def name(self) -> str:
        """Short name (``echo``, ``openai``, ``gemini``), shown in stats."""
        ...

    @property
    def default_model(self) -> str:
        """The model used when a session names none."""
        ...

    async def list_models(self) -> Sequence[str] | None:
        """The models this backend serves, or ``None`` when it cannot tell."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Stream the reply to ``request``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class ModelCheck(enum.StrEnum):
    """What to do with a model name the backend does not list (``--model-check``).

    A list is complete for OpenAI's and Gemini's own APIs; a server that loads models on
    demand (``transformers serve``, LM Studio, proxies) lists only what it has loaded, so a
    model it would serve can be missing from its list.
    """

    #: Refuse it: ``INVALID_ARGUMENT`` for a session, no start for ``--model``.
    STRICT = "strict"
    #: Accept it, and log a warning (once per name); the model server has the last word.
    WARN = "warn"
    #: Do not list models at all.
    OFF = "off"


class ModelChecker:
    """Checks model names against :meth:`ModelBackend.list_models` as a :class:`ModelCheck` says.

    A backend that cannot tell (``None``: no list, or listing failed) accepts every name.

    >>> import asyncio
    >>> from chat.backends.echo import EchoBackend
    >>> asyncio.run(ModelChecker(EchoBackend(), ModelCheck.STRICT).problem("any")) is None
    True
    """

    def __init__(self, backend: ModelBackend, mode: ModelCheck = ModelCheck.STRICT) -> None:
        self.backend = backend
        self.mode = mode
        self._warned: set[str] = set()

    async def problem(self, model: str) -> str | None:
        """Why ``model`` is refused, or ``None`` when it may be used."""
        if self.mode is ModelCheck.OFF or not model:
            return None
        served = await self.backend.list_models()
        if served is None or model in served:
            return None
        names = ", ".join(sorted(served)[:20])
        problem = (
            f"{excerpt(model)} is not served by the {self.backend.name} backend; available: {names}"
        )
        if self.mode is ModelCheck.STRICT:
            return problem
        # Bounded: clients choose the names, and each would stay here for good.
        if model not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(model)
            log.warning(
                "%s; using it anyway (--model-check warn: a server that loads models on "
                "demand lists only those it has loaded)",
                problem,
            )
        return None

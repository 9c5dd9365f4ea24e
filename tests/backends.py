"""Model backends for tests: scripted, gated step by step, recording, failing; and what the
backend tests share (:data:`REQUEST`, :func:`collect`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from chat.backends import Delta, GenerationRequest, PromptMessage
from chat.backends.echo import EchoBackend
from chat.types import FinishReason, Role, Usage


class ScriptedBackend:
    """Answers every request with the same deltas."""

    name = "scripted"
    default_model = "scripted-model"

    def __init__(
        self,
        deltas: Sequence[str],
        finish: FinishReason = FinishReason.STOP,
        usage: Usage | None = None,
    ) -> None:
        self.deltas = list(deltas)
        self.finish = finish
        self.usage = usage
        self.requests: list[GenerationRequest] = []

    async def list_models(self) -> Sequence[str] | None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        self.requests.append(request)
        for text in self.deltas:
            yield Delta(text)
        yield Delta(finish_reason=self.finish, usage=self.usage)

    async def aclose(self) -> None:
        return None


class GatedBackend:
    """Yields a delta each time the test calls :meth:`release`; records when it is closed.

    ``started`` is set when a generation begins; ``closed`` when its generator is closed
    (finished, cancelled or abandoned), which is how tests see that generation stopped.
    """

    name = "gated"
    default_model = "gated-model"

    def __init__(self) -> None:
        self._gate: asyncio.Queue[Delta | None] = asyncio.Queue()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.produced: list[str] = []
        self.requests: list[GenerationRequest] = []

    def release(self, text: str) -> None:
        self._gate.put_nowait(Delta(text))

    def finish(self, reason: FinishReason = FinishReason.STOP) -> None:
        self._gate.put_nowait(Delta(finish_reason=reason))
        self._gate.put_nowait(None)

    async def list_models(self) -> Sequence[str] | None:
        return ["gated-model", "other-model"]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        self.requests.append(request)
        self.closed.clear()
        self.started.set()
        try:
            while (delta := await self._gate.get()) is not None:
                self.produced.append(delta.text)
                yield delta
        finally:
            self.started.clear()
            self.closed.set()

    async def aclose(self) -> None:
        return None


class FailingBackend:
    """Yields ``deltas``, then raises ``error`` (until ``failures`` runs out; then echoes)."""

    name = "failing"
    default_model = "failing-model"

    def __init__(self, error: Exception, deltas: Sequence[str] = (), failures: int = 1) -> None:
        self.error = error
        self.deltas = list(deltas)
        self.failures = failures
        self._echo = EchoBackend()

    async def list_models(self) -> Sequence[str] | None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if self.failures <= 0:
            async for delta in self._echo.generate(request):
                yield delta
            return
        self.failures -= 1
        for text in self.deltas:
            yield Delta(text)
        raise self.error

    async def aclose(self) -> None:
        return None


#: A conversation every backend test sends.
REQUEST = GenerationRequest(
    "fake-model",
    [
        PromptMessage(Role.SYSTEM, "Be brief."),
        PromptMessage(Role.USER, "Hi"),
        PromptMessage(Role.ASSISTANT, "Hello."),
        PromptMessage(Role.USER, "How are you?"),
    ],
    "conformance",
)


async def collect(
    deltas: AsyncGenerator[Delta, None], *, into: list[str] | None = None
) -> list[Delta]:
    """Every delta; with ``into``, their texts are appended there as they come."""
    received: list[Delta] = []
    async with contextlib.aclosing(deltas) as stream:
        async for delta in stream:
            received.append(delta)
            if into is not None:
                into.append(delta.text)
    return received

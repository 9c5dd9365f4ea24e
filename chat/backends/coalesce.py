"""Merging deltas that arrive close together, to cut the cost per message under load.

A remote model's tokens often arrive in bursts (several server-sent events in one TCP
read). Each delta forwarded costs a queue hop, a protobuf message and an HTTP/2 frame; with a
window of a few milliseconds, the deltas of one burst leave as one chunk.

The window is a *throttle*, not a delay: a delta that arrives when nothing was forwarded in
the last ``window`` seconds is forwarded at once; deltas arriving sooner are held until the
window since the last forward has passed, then leave together. So no delta waits longer
than ``window``, a lone delta waits not at all, and at most one chunk per window leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence

from chat.backends import Delta, GenerationRequest, ModelBackend
from chat.types import FinishReason, Usage

__all__ = ["CoalescingBackend", "coalesce"]


#: Characters a reader may hold before it waits for the consumer (flow control).
_MAX_HELD_CHARS = 16_384


class _Held:
    """What the reader task has received and the consumer not yet taken."""

    __slots__ = ("chars", "done", "drained", "error", "finish", "ready", "texts", "usage")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.chars = 0
        self.finish: FinishReason | None = None
        self.usage: Usage | None = None
        self.done = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()
        self.drained = asyncio.Event()

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.texts.append(delta.text)
            self.chars += len(delta.text)
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage
        self.ready.set()

    @property
    def empty(self) -> bool:
        return not self.texts and self.finish is None and self.usage is None

    def take(self) -> Delta:
        delta = Delta("".join(self.texts), self.finish, self.usage)
        self.texts, self.chars, self.finish, self.usage = [], 0, None, None
        self.ready.clear()
        self.drained.set()
        return delta


async def _read(deltas: AsyncGenerator[Delta, None], held: _Held) -> None:
    """Pull ``deltas`` into ``held`` as fast as they come (up to the flow-control limit)."""
    try:
        async for delta in deltas:
            held.add(delta)
            while held.chars > _MAX_HELD_CHARS:
                held.drained.clear()
                await held.drained.wait()
    # Handed to the consumer, which raises it after forwarding what came before it.
    except Exception as error:  # noqa: BLE001
        held.error = error
    except BaseException as error:
        # Our own cancellation (the consumer is leaving), or the source cancelled itself:
        # then the consumer must not take the reply for complete.
        held.error = error
        raise
    finally:
        held.done = True
        held.ready.set()


async def coalesce(
    deltas: AsyncGenerator[Delta, None],
    window: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Delta, None]:
    """``deltas``, with those arriving within ``window`` seconds of the last forward merged.

    Texts are concatenated; the last ``finish_reason`` and ``usage`` seen are kept. A failure
    of ``deltas`` is raised after the text that came before it. Closing the result stops
    reading and closes ``deltas`` (and with it the upstream) before returning.

    One task reads ``deltas`` while the caller consumes, so that deltas arriving together
    cost one hop each, not a task each.

    >>> async def three():
    ...     for word in ("a", "b", "c"):
    ...         yield Delta(word)
    >>> async def main():
    ...     return [d.text async for d in coalesce(three(), 60.0)]
    >>> asyncio.run(main())
    ['abc']
    """
    if window <= 0:
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()
        return
    held = _Held()
    reader = asyncio.ensure_future(_read(deltas, held))
    last_sent = -math.inf
    try:
        while True:
            await held.ready.wait()
            remaining = last_sent + window - clock()
            if remaining > 0 and not held.done:
                # Sent too recently: let the window pass (or the reply end) first.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        while not held.done:
                            held.ready.clear()
                            await held.ready.wait()
            if not held.empty:
                last_sent = clock()
                yield held.take()
            if held.done and held.empty:
                if held.error is not None:
                    raise held.error
                return
            held.ready.clear()
            if held.done or not held.empty:
                held.ready.set()
    finally:
        reader.cancel()
        # Wait for the reader to unwind (it closes ``deltas`` as its cancellation runs
        # through the ``async for``); only then is ``deltas`` not running and can be closed.
        await asyncio.wait((reader,))
        await deltas.aclose()


class CoalescingBackend:
    """A backend whose deltas go through :func:`coalesce` with ``window`` seconds.

    >>> from chat.backends.echo import EchoBackend
    >>> CoalescingBackend(EchoBackend(), window=0.005).name
    'echo'
    """

    def __init__(self, inner: ModelBackend, *, window: float) -> None:
        if not window >= 0 or math.isinf(window):
            raise ValueError(f"window must be a finite number >= 0, not {window}")
        self.inner = inner
        self.window = window

    def __repr__(self) -> str:
        return f"CoalescingBackend({self.inner!r}, window={self.window})"

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def default_model(self) -> str:
        return self.inner.default_model

    async def list_models(self) -> Sequence[str] | None:
        return await self.inner.list_models()

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        return coalesce(self.inner.generate(request), self.window)

    async def aclose(self) -> None:
        await self.inner.aclose()

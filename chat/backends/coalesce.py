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
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence

from chat.backends import Delta, GenerationRequest, ModelBackend
from chat.types import FinishReason, Usage

__all__ = ["CoalescingBackend", "coalesce"]


async def coalesce(
    deltas: AsyncGenerator[Delta, None],
    window: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Delta, None]:
    """``deltas``, with those arriving within ``window`` seconds of the last forward merged.

    Texts are concatenated; the last ``finish_reason`` and ``usage`` seen are kept. Closing
    the result closes ``deltas`` (and with it the upstream) before returning.

    >>> async def three():
    ...     for word in ("a", "b", "c"):
    ...         yield Delta(word)
    >>> async def main():
    ...     return [d.text async for d in coalesce(three(), 60.0)]
    >>> asyncio.run(main())
    ['a', 'bc']
    """
    if window <= 0:
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()
        return
    texts: list[str] = []
    finish: FinishReason | None = None
    usage: Usage | None = None
    held = False
    last_sent = -math.inf
    # The step of ``deltas`` in flight while a held delta waits for the window to pass;
    # it is kept across windows (cancelling it would cancel the upstream read).
    step: asyncio.Future[Delta] | None = None
    try:
        while True:
            if held:
                if step is None:
                    step = asyncio.ensure_future(deltas.__anext__())
                remaining = last_sent + window - clock()
                if remaining > 0:
                    await asyncio.wait((step,), timeout=remaining)
                if not step.done():
                    yield Delta("".join(texts), finish, usage)
                    texts, finish, usage, held = [], None, None, False
                    last_sent = clock()
                    continue
                done, step = step, None
                try:
                    delta = done.result()
                except StopAsyncIteration:
                    break
                except Exception:
                    # What the model said before failing still reaches the client.
                    yield Delta("".join(texts), finish, usage)
                    raise
            else:
                try:
                    if step is not None:
                        # ``step`` stays set while awaited: if this is cancelled, the
                        # ``finally`` below waits for it before closing ``deltas``.
                        delta = await step
                        step = None
                    else:
                        delta = await deltas.__anext__()
                except StopAsyncIteration:
                    step = None
                    break
            texts.append(delta.text)
            if delta.finish_reason is not None:
                finish = delta.finish_reason
            if delta.usage is not None:
                usage = delta.usage
            held = True
            now = clock()
            if now - last_sent >= window:
                yield Delta("".join(texts), finish, usage)
                texts, finish, usage, held = [], None, None, False
                last_sent = now
        if held:
            yield Delta("".join(texts), finish, usage)
    finally:
        if step is not None:
            step.cancel()
            # Wait for the cancelled step to unwind, so that the generator is not running
            # when it is closed below.
            await asyncio.wait((step,))
            if not step.cancelled():
                step.exception()  # retrieved, so that asyncio does not log it
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

"""Ctrl-C (SIGINT) as an event-loop callback, shared by ``chat-client ask`` and the REPL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

__all__ = ["on_sigint"]


@contextlib.contextmanager
def on_sigint(callback: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT to ``callback`` while inside (main thread only; a no-op elsewhere)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):
        yield  # not the main thread, or no signals on this platform
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)

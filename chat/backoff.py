"""Exponential backoff with jitter: the one rule every retry in grpc-chat waits by.

The client's reconnections (:class:`~chat.client.ReconnectPolicy`), the model backends'
retries before the first token (:class:`~chat.backends.remote.RetryPolicy`) and the Redis
store's retries and lock polling all call :func:`backoff`.
"""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(
    retry: int,
    *,
    initial: float,
    maximum: float,
    multiplier: float = 2.0,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``retry`` (1-based).

    ``min(maximum, initial * multiplier ** (retry - 1))``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` so that many waiters do not all come back at once.

    >>> [backoff(n, initial=0.1, maximum=0.5) for n in (1, 2, 3, 4)]
    [0.1, 0.2, 0.4, 0.5]
    >>> 0.05 <= backoff(1, initial=0.1, maximum=1, jitter=0.5) <= 0.15
    True
    """
    if retry < 1:
        raise ValueError(f"retry must be >= 1, not {retry}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
    # Capped before it can overflow: a long outage means many retries.
    exponent = min(retry - 1, 1024)
    try:
        base = min(maximum, initial * multiplier**exponent)
    except OverflowError:
        base = maximum
    if not jitter:
        return base
    return base * (rng or random).uniform(1 - jitter, 1 + jitter)

"""What the HTTP backends (OpenAI-compatible, Gemini) share: settings, retries, error mapping.

Nothing here imports a provider SDK, so :class:`RemoteSettings` can be part of the server's
configuration whether or not the optional extras are installed.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from chat.backends import Delta
from chat.backoff import backoff
from chat.errors import (
    BackendAuthError,
    BackendBadRequest,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    ConfigurationError,
)
from chat.secret import Secret

__all__ = [
    "ModelListCache",
    "RemoteSettings",
    "RetryPolicy",
    "error_for_status",
    "parse_retry_after",
    "redact",
    "retry_before_first_delta",
]

log = logging.getLogger(__name__)

#: Longest upstream error text passed on to the client.
_MAX_UPSTREAM_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and after how long, a request that failed before its first token is retried.

    Only transient failures are retried (the server cannot be reached, answers 5xx, or rate
    limits with 429), and only while nothing has been forwarded to the client: a retry after
    the first token would repeat words the person already read. The pause before attempt
    ``n + 1`` is ``initial_backoff * 2**(n-1)`` capped at ``max_backoff``, scaled by a random
    factor between 0.5 and 1.5 (so that many servers hitting one upstream do not retry in
    step; :func:`chat.backoff.backoff`). A
    ``Retry-After`` given by the upstream is honoured when it is at most ``max_retry_after``;
    a longer one is not waited for: the client gets ``RESOURCE_EXHAUSTED`` with it.

    >>> RetryPolicy(attempts=1).attempts   # no retries
    1
    """

    attempts: int = 3
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"attempts must be >= 1, not {self.attempts}")
        for name in ("initial_backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ConfigurationError(f"{name} must be a finite number >= 0, not {value}")

    def delay(self, attempt: int, error: BackendError, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after failed attempt ``attempt`` (1-based).

        ``None`` when ``error`` is not worth retrying or no attempt is left.
        """
        if attempt >= self.attempts or not is_transient(error):
            return None
        pause = backoff(
            attempt, initial=self.initial_backoff, maximum=self.max_backoff, jitter=0.5, rng=rng
        )
        if isinstance(error, BackendRateLimited) and error.retry_after is not None:
            if error.retry_after > self.max_retry_after:
                return None
            pause = max(pause, error.retry_after)
        return pause


def is_transient(error: BackendError) -> bool:
    """Failures that may go away by themselves: unreachable, 5xx, rate limited."""
    return isinstance(error, BackendUnavailable | BackendRateLimited)


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """Where an HTTP backend sends requests and how patiently.

    ``base_url`` empty means the provider's public endpoint. ``read_timeout`` bounds each
    wait for bytes from the upstream (the first token included), not the whole reply.
    """

    base_url: str = ""
    api_key: Secret | None = field(default=None, repr=False)
    #: The model for sessions that name none; empty for the backend's own default.
    default_model: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: How long a successful model listing is trusted.
    models_ttl: float = 300.0
    #: Longest wait for a model listing; past it, session models are not checked.
    models_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "models_ttl", "models_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"{name} must be a finite number > 0, not {value}")
        if self.base_url:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(
                    f"base URL must be an http:// or https:// URL, not {self.host_for_messages}"
                )

    @property
    def host_for_messages(self) -> str:
        """The upstream's scheme, host and port, for messages (never credentials or paths)."""
        parts = urlsplit(self.base_url)
        if not parts.hostname:
            return repr(self.base_url.split("@")[-1][:60])
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


async def retry_before_first_delta(
    start: Callable[[], AsyncGenerator[Delta, None]],
    policy: RetryPolicy,
    *,
    what: str,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[BackendError], None] | None = None,
) -> AsyncGenerator[Delta, None]:
    """The deltas of ``start()``, starting it again after transient failures before the first.

    Once a delta has been yielded, failures are raised as they are. Each failed attempt's
    generator is closed before the pause, so its connection is released while waiting.
    ``on_retry(error)`` is called before each retry (the server counts them).
    """
    random_source = rng or random.Random()
    attempt = 1
    while True:
        async with aclosing(start()) as deltas:
            try:
                first = await anext(deltas)
            except StopAsyncIteration:
                return
            except BackendError as error:
                pause = policy.delay(attempt, error, random_source)
                if pause is None:
                    raise
                log.warning(
                    "%s failed before its first token (%s: %s); retry %d of %d in %.2fs",
                    what,
                    type(error).__name__,
                    error,
                    attempt,
                    policy.attempts - 1,
                    pause,
                )
                if on_retry is not None:
                    on_retry(error)
            else:
                yield first
                async for delta in deltas:
                    yield delta
                return
        await sleep(pause)
        attempt += 1


class ModelListCache:
    """The models a backend serves, fetched at most once per ``ttl``.

    A listing that fails, times out or comes back empty means "cannot tell" (``None``): a
    session's model is then not checked, so a flaky listing never blocks creating a session.
    A :class:`~chat.errors.ConfigurationError` from ``fetch`` (a listing that shows the
    server misconfigured) is raised, every time.
    Failures are remembered for ``failure_ttl`` so that an unreachable upstream does not make
    every ``CreateSession`` wait for the timeout.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Iterable[str]]],
        *,
        what: str,
        ttl: float = 300.0,
        failure_ttl: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._what = what
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._timeout = timeout
        self._clock = clock
        self._value: tuple[str, ...] | None = None
        self._expires = -math.inf
        self._lock = asyncio.Lock()

    async def get(self) -> Sequence[str] | None:
        if self._clock() < self._expires:
            return self._value
        async with self._lock:
            if self._clock() < self._expires:
                return self._value
            value: tuple[str, ...] | None
            try:
                async with asyncio.timeout(self._timeout):
                    value = tuple(sorted(set(await self._fetch())))
            except ConfigurationError:
                # The listing proved the server's configuration wrong (say, a base URL
                # without /v1): that is for the operator to fix, not to work around.
                raise
            # Any failure only means the models cannot be checked now; the error text is not
            # logged because an upstream may echo credentials in it.
            except Exception as error:  # noqa: BLE001
                log.warning(
                    "could not list the models of %s (%s); session models are not checked",
                    self._what,
                    type(error).__name__,
                )
                value = None
            if not value:
                value = None
            self._value = value
            self._expires = self._clock() + (self._ttl if value is not None else self._failure_ttl)
            return value


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if valid.

    >>> parse_retry_after("7")
    7.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def redact(text: str, secret: Secret | None) -> str:
    """``text`` without ``secret`` in it, cut to a length fit for an error message."""
    if secret:
        text = text.replace(secret.reveal(), "[redacted]")
    text = " ".join(text.split())
    if len(text) > _MAX_UPSTREAM_MESSAGE:
        text = text[: _MAX_UPSTREAM_MESSAGE - 1] + "…"
    return text


def error_for_status(
    status: int,
    upstream_message: str,
    *,
    provider: str,
    settings: RemoteSettings,
    model: str,
    retry_after: float | None = None,
    key_hint: str = "",
) -> BackendError:
    """The :class:`BackendError` for an HTTP error status from the upstream.

    ``upstream_message`` must already be :func:`redact`\\ ed. Authentication failures never
    quote the upstream (some providers echo part of the key back).
    """
    where = settings.host_for_messages
    detail = f": {upstream_message}" if upstream_message else ""
    if status in (401, 403):
        return BackendAuthError(
            f"{provider} at {where} rejected the server's credentials (HTTP {status}); "
            f"check the API key{key_hint}"
        )
    if status == 429:
        after = f"; retry in {retry_after:.0f}s" if retry_after is not None else ""
        return BackendRateLimited(
            f"{provider} at {where} is rate limiting this server (HTTP 429){after}{detail}",
            retry_after,
        )
    if status == 408:
        return BackendTimeout(f"{provider} at {where} timed out the request (HTTP 408){detail}")
    if status >= 500:
        return BackendUnavailable(
            f"{provider} at {where} failed (HTTP {status}); try again later{detail}"
        )
    if status == 404:
        return BackendBadRequest(
            f"{provider} at {where} has no such model or endpoint (HTTP 404, model {model!r})"
            f"{detail}"
        )
    return BackendBadRequest(
        f"{provider} at {where} refused the request for model {model!r} (HTTP {status}){detail}"
    )

"""The hooks through which the core reports what it does, and their no-op default.

:class:`~chat.core.ChatCore` calls one :class:`Observer` at a few points of each turn: when it
is received (:meth:`Observer.turn`), while it runs (:meth:`TurnObservation.running`), when
its reply starts and its first token arrives, and when it ends, with its outcome. Nothing
here imports a metrics or tracing library: :class:`chat.telemetry.Telemetry` is the
implementation a server uses (Prometheus metrics, OpenTelemetry spans, access logs), and
:data:`NO_OBSERVER` the default, which costs a method call per hook.

Store operations and model backend calls are observed by wrapping the store and the backend
(:mod:`chat.telemetry`), and the gRPC calls by grpclib's event listeners, so the core has no
hooks for them.

>>> from chat.events import Request
>>> observation = NO_OBSERVER.turn(Request(session_id="s-1", message="hi"), received=0.0)
>>> with observation.running():
...     observation.started("echo", omitted=0)
...     observation.first_token()
...     observation.finished(FinishReason.STOP, None, chunks=1)
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from chat.errors import ChatError
from chat.events import Request
from chat.types import FinishReason, Usage

__all__ = ["NO_OBSERVER", "NO_TURN", "NoObserver", "Observer", "TurnObservation", "TurnOutcome"]


class TurnOutcome(enum.Enum):
    """How a turn ended (the ``outcome`` label of ``chat_turns_total``)."""

    #: The reply completed (finish reason stop or length).
    SUCCESS = "success"
    #: An ERROR event ended it (bad request, context too long, backend or store failure).
    ERROR = "error"
    #: CANCEL, or the client went away; the partial reply is kept.
    CANCELLED = "cancelled"


class TurnObservation(Protocol):
    """One turn, from the moment it is received until it ends."""

    def running(self) -> AbstractContextManager[None]:
        """Held while the turn runs (in the task that runs it): its span and log context.

        Leaving it by a cancellation (the stream closing, a shutdown past its grace period)
        ends the turn as cancelled unless :meth:`finished` was called.
        """
        ...

    def started(self, model: str, omitted: int) -> None:
        """The reply starts (``RESPONSE_START``): the model, and the messages the context
        budget left out."""
        ...

    def first_token(self) -> None:
        """The first piece of the reply is on its way to the client."""
        ...

    def finished(
        self,
        finish_reason: FinishReason,
        usage: Usage | None,
        *,
        chunks: int,
        error: ChatError | None = None,
    ) -> None:
        """The turn ended: with ``error`` it failed, else its finish reason says how."""
        ...


class Observer(Protocol):
    """What :class:`~chat.core.ChatCore` reports to.

    The methods after :meth:`turn` are for features that report counts of their own
    (watchers, the replay log, rate limits); their default does nothing.
    """

    def turn(self, request: Request, *, received: float, turn_id: str = "") -> TurnObservation:
        """``request`` (a MESSAGE or RETRY) was accepted as turn ``turn_id``; ``received``
        is when (``time.monotonic()``)."""
        ...

    def watchers_changed(self, delta: int) -> None:
        """Streams watching sessions went up or down by ``delta``."""
        ...

    def replay_evicted(self, events: int) -> None:
        """The replay log dropped ``events`` events a client could no longer resume from."""
        ...

    def rate_limited(self, scope: str) -> None:
        """A request was refused by a quota or rate limit; ``scope`` names which (bounded)."""
        ...


class _NoTurn:
    __slots__ = ()

    def running(self) -> AbstractContextManager[None]:
        return nullcontext()

    def started(self, model: str, omitted: int) -> None:
        return None

    def first_token(self) -> None:
        return None

    def finished(
        self,
        finish_reason: FinishReason,
        usage: Usage | None,
        *,
        chunks: int,
        error: ChatError | None = None,
    ) -> None:
        return None


#: The observation of a turn nobody observes.
NO_TURN: TurnObservation = _NoTurn()


class NoObserver:
    """Observes nothing: the default of a :class:`~chat.core.ChatCore`."""

    __slots__ = ()

    def turn(self, request: Request, *, received: float, turn_id: str = "") -> TurnObservation:
        return NO_TURN

    def watchers_changed(self, delta: int) -> None:
        return None

    def replay_evicted(self, events: int) -> None:
        return None

    def rate_limited(self, scope: str) -> None:
        return None


NO_OBSERVER: Observer = NoObserver()

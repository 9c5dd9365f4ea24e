"""What travels on the ``Chat`` stream, without the wire: requests in, events out.

A :class:`Request` has the fields of ``ChatRequest`` and an :class:`Event` those of
``ChatResponse``, by the same names (``kind`` is ``type``; the timestamp is added when an
event is written). :mod:`chat._proto` converts them by name, and a test fails when a field
of the wire messages has no counterpart here.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chat.types import FinishReason, Session, SessionUpdateKind, StatusKind, Usage

if TYPE_CHECKING:
    from chat.replay import TurnLog

__all__ = ["Event", "EventKind", "ReplyCounter", "Request", "RequestKind"]


class RequestKind(enum.IntEnum):
    """The kinds of ``ChatRequest``, with their wire numbers."""

    MESSAGE = 0
    PING = 1
    TYPING_START = 2
    TYPING_STOP = 3
    CANCEL = 4
    RETRY = 5
    RESUME = 6
    WATCH = 7
    UNWATCH = 8


@dataclass(frozen=True, slots=True)
class Request:
    """One client event on a ``Chat`` stream; the fields are those of ``ChatRequest``.

    ``kind`` is an ``int``, not a :class:`RequestKind`: a client may send a number this
    server does not know, which gets an ERROR rather than failing the stream.
    """

    kind: int = RequestKind.MESSAGE
    session_id: str = ""
    message: str = ""
    request_id: str = ""
    timestamp: str = ""
    turn_id: str = ""
    after_seq: int = 0
    client_message_id: str = ""
    traceparent: str = ""


class EventKind(enum.IntEnum):
    """The kinds of ``ChatResponse``, with their wire numbers."""

    STATUS = 0
    RESPONSE_START = 1
    CHUNK = 2
    RESPONSE_COMPLETE = 3
    ERROR = 4
    PONG = 5
    SESSION_UPDATE = 6


@dataclass(slots=True, eq=False)
class ReplyCounter:
    """The live record of one turn: numbers its events as they leave the outbox (``seq``,
    and ``chunk_number`` for chunks), counts their text, and logs them for replay.

    Every event of a turn refers to it (``Event.reply``); where an event leaves for the
    client (:meth:`Outbox.get <chat.outbox.Outbox.get>`, or a turn's log alone once its
    client is gone) it gets the next ``seq`` and the ``turn_id``, and goes to ``log``, which
    therefore holds exactly what the client was sent. ``log`` is let go once the final
    event is in it.
    """

    turn_id: str = ""
    #: The ``seq`` of the turn's last event numbered.
    seq: int = 0
    log: TurnLog | None = None
    chunks: int = 0
    #: Characters of the reply's chunks that left the outbox for the stream (less those its
    #: writer then could not write): what a reply cut short keeps, so that the stored text
    #: is the text the client was sent.
    sent_chars: int = 0
    #: Set by :meth:`wait_sent` while it waits (the outbox wakes it as chunks leave).
    waiter: asyncio.Future[None] | None = None

    def note_sent(self, chars: int) -> None:
        self.sent_chars += chars
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_sent(self, chars: int) -> None:
        """Wait until ``chars`` characters of the reply have left the outbox."""
        while self.sent_chars < chars:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


@dataclass(slots=True)
class Event:
    """One server event; the fields are those of ``ChatResponse``."""

    kind: EventKind
    session_id: str = ""
    request_id: str = ""
    status_message: str = ""
    context_messages: int = 0
    chunk_text: str = ""
    chunk_number: int = 0
    total_chunks: int = 0
    processing_time: float = 0.0
    message_count: int = 0
    error_message: str = ""
    error_code: int = 0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage | None = None
    model: str = ""
    omitted_messages: int = 0
    retry_after: float = 0.0
    session: Session | None = None
    update_kind: SessionUpdateKind = SessionUpdateKind.UNSPECIFIED
    status_kind: StatusKind = StatusKind.UNSPECIFIED
    error_field: str = ""
    turn_id: str = ""
    seq: int = 0
    # The turn every event of a turn belongs to (STATUS, RESPONSE_START, CHUNK,
    # RESPONSE_COMPLETE, ERROR); numbers (seq, chunk_number, total_chunks) and the turn_id
    # are filled in from it when the event leaves the outbox.
    reply: ReplyCounter | None = field(default=None, repr=False, compare=False)

"""The domain types shared by the core, the stores and the backends.

They mirror the messages of ``chat.proto`` but carry no gRPC or protobuf dependency, so the
core is tested without sockets and stores persist plain values. The enums have the numbers of
their protobuf counterparts, so converting is ``chatpb.Role(role)`` in the service layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime

__all__ = [
    "ANONYMOUS",
    "ConcurrencyPolicy",
    "ContextPolicy",
    "DisconnectPolicy",
    "FinishReason",
    "Message",
    "MessageStatus",
    "Role",
    "Session",
    "SessionPatch",
    "SessionUpdateKind",
    "StatusKind",
    "Usage",
    "format_timestamp",
    "parse_timestamp",
    "utcnow",
]


class Role(enum.IntEnum):
    """Who wrote a message."""

    SYSTEM = 1
    USER = 2
    ASSISTANT = 3


class MessageStatus(enum.IntEnum):
    """The state of a stored message."""

    COMPLETE = 1
    CANCELLED = 2
    FAILED = 3
    INTERRUPTED = 4


class FinishReason(enum.IntEnum):
    """Why a reply ended."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    CANCELLED = 3
    ERROR = 4


class ContextPolicy(enum.IntEnum):
    """What to do with a history longer than the model's context window."""

    UNSPECIFIED = 0
    TRUNCATE = 1
    REJECT = 2


class ConcurrencyPolicy(enum.IntEnum):
    """What a session does with a message that arrives while one of its turns runs."""

    UNSPECIFIED = 0
    QUEUE = 1
    REJECT = 2
    INTERRUPT = 3


class DisconnectPolicy(enum.IntEnum):
    """What happens to a reply whose client goes away before it ends."""

    UNSPECIFIED = 0
    CANCEL = 1
    CONTINUE = 2


class SessionUpdateKind(enum.IntEnum):
    """What a ``SESSION_UPDATE`` event reports."""

    UNSPECIFIED = 0
    TYPING_STARTED = 1
    TYPING_STOPPED = 2
    TURN_COMPLETED = 3
    SESSION_UPDATED = 4
    SESSION_DELETED = 5


class StatusKind(enum.IntEnum):
    """What a ``STATUS`` event is about."""

    UNSPECIFIED = 0
    CONTEXT_TRUNCATED = 1
    SHUTDOWN = 2
    HEARTBEAT = 3
    NOTHING_TO_CANCEL = 4
    WATCHING = 5
    NOT_WATCHING = 6


#: The owner of sessions created without authentication (``--auth none``), and of sessions
#: stored before sessions had owners.
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one reply, as reported by the backend."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a session's history."""

    role: Role
    content: str
    created_at: datetime
    status: MessageStatus = MessageStatus.COMPLETE
    request_id: str = ""
    model: str = ""
    usage: Usage | None = None
    #: The turn that produced it; empty for turns stored before turns had ids.
    turn_id: str = ""


@dataclass(frozen=True, slots=True)
class Session:
    """A conversation and its settings (without its messages).

    ``turn_running`` and ``watchers`` describe the session's live state; stores do not keep
    them (they return the defaults) and the core fills them in where it knows them.
    """

    session_id: str
    created_at: datetime
    last_activity: datetime
    title: str = ""
    model: str = ""
    system_prompt: str = ""
    context_policy: ContextPolicy = ContextPolicy.UNSPECIFIED
    message_count: int = 0
    owner: str = ANONYMOUS
    concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.UNSPECIFIED
    on_disconnect: DisconnectPolicy = DisconnectPolicy.UNSPECIFIED
    #: Longest reply asked of the model, in tokens; 0: the server's default.
    max_reply_tokens: int = 0
    turn_running: bool = False
    watchers: int = 0


@dataclass(frozen=True, slots=True)
class SessionPatch:
    """The fields of a session to change; ``None`` leaves a field as it is."""

    title: str | None = None
    system_prompt: str | None = None
    model: str | None = None
    context_policy: ContextPolicy | None = None
    concurrency_policy: ConcurrencyPolicy | None = None
    on_disconnect: DisconnectPolicy | None = None
    max_reply_tokens: int | None = None

    def changed(self) -> list[str]:
        """Names of the fields this patch sets."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def apply(self, session: Session, now: datetime) -> Session:
        """``session`` with the fields this patch sets, and ``last_activity`` ``now`` when
        anything changes (a patch that changes nothing leaves the session as it is)."""
        changes = {
            name: value
            for name in self.changed()
            if (value := getattr(self, name)) != getattr(session, name)
        }
        if not changes:
            return session
        return replace(session, last_activity=now, **changes)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` suffix.

    >>> format_timestamp(datetime(2026, 11, 26, 13, 33, 32, 5, tzinfo=UTC))
    '2026-11-26T13:33:32.000005Z'
    """
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (as written by :func:`format_timestamp`) into UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)

"""The domain types shared by the core, the stores and the backends.

They mirror the messages of ``chat.proto`` but carry no gRPC or protobuf dependency, so the
core is tested without sockets and stores persist plain values. The enums have the numbers of
their protobuf counterparts, so converting is ``chatpb.Role(role)`` in the service layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "ContextPolicy",
    "FinishReason",
    "Message",
    "MessageStatus",
    "Role",
    "Session",
    "SessionPatch",
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


@dataclass(frozen=True, slots=True)
class Session:
    """A conversation and its settings (without its messages)."""

    session_id: str
    created_at: datetime
    last_activity: datetime
    title: str = ""
    model: str = ""
    system_prompt: str = ""
    context_policy: ContextPolicy = ContextPolicy.UNSPECIFIED
    message_count: int = 0


@dataclass(frozen=True, slots=True)
class SessionPatch:
    """The fields of a session to change; ``None`` leaves a field as it is."""

    title: str | None = None
    system_prompt: str | None = None
    model: str | None = None
    context_policy: ContextPolicy | None = None

    def changed(self) -> list[str]:
        """Names of the fields this patch sets."""
        return [name for name in _PATCH_FIELDS if getattr(self, name) is not None]


_PATCH_FIELDS = ("title", "system_prompt", "model", "context_policy")


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

"""The exceptions of grpc-chat, and the gRPC status each one maps to.

Every error a client can see is a :class:`ChatError`. Each class names its gRPC status once,
in :attr:`ChatError.status`; the service layer turns it into a ``grpclib`` status (unary
RPCs) or an ``ERROR`` event with ``error_code`` (the ``Chat`` stream). Nothing else decides
status codes.

::

    ChatError                     INTERNAL
    ├── InvalidArgument           INVALID_ARGUMENT     a request field is wrong; names it
    │   └── ContextTooLong        INVALID_ARGUMENT     history too long, policy rejects
    ├── SessionNotFound           NOT_FOUND            no session with that id (or not the caller's)
    ├── TurnNotFound              NOT_FOUND            RESUME: no such turn in the replay log
    ├── TurnOutOfRange            OUT_OF_RANGE         RESUME: its events left the replay log
    ├── Aborted                   ABORTED              a turn runs and the session rejects another
    ├── Unauthenticated           UNAUTHENTICATED      missing, bad or revoked credentials
    ├── PermissionDenied          PERMISSION_DENIED    authenticated, but not allowed (admins only)
    ├── RateLimited               RESOURCE_EXHAUSTED   carries ``retry_after``
    │   └── QuotaExceeded         RESOURCE_EXHAUSTED   a per-identity limit; names it
    ├── FailedPrecondition        FAILED_PRECONDITION  e.g. RETRY when nothing failed
    ├── Unavailable               UNAVAILABLE          the server is draining
    │   ├── StoreUnavailable      UNAVAILABLE          the session store is unreachable
    │   └── ServerUnreachable     UNAVAILABLE          client: cannot connect to the server
    │       ├── ConnectTimeout    DEADLINE_EXCEEDED    client: connected, but no answer in time
    │       └── ConnectionLost    UNAVAILABLE          client: the connection broke
    ├── DeadlineExceeded          DEADLINE_EXCEEDED    client: no answer within the deadline
    ├── ConfigurationError        FAILED_PRECONDITION  bad server configuration
    │   └── MissingExtra          FAILED_PRECONDITION  an optional dependency is missing
    └── BackendError              INTERNAL             the model backend failed
        ├── BackendAuthError      FAILED_PRECONDITION  the upstream refused the server's key
        ├── BackendRateLimited    RESOURCE_EXHAUSTED   also a RateLimited
        ├── BackendTimeout        DEADLINE_EXCEEDED
        ├── BackendUnavailable    UNAVAILABLE
        └── BackendBadRequest     INVALID_ARGUMENT

The status numbers are those of the gRPC specification; :class:`StatusCode` keeps this
module free of any gRPC library. :class:`~chat.client.ChatClient` raises the same classes
for the statuses the server sends, and the ``client:`` ones for what happens on its side.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "Aborted",
    "BackendAuthError",
    "BackendBadRequest",
    "BackendError",
    "BackendRateLimited",
    "BackendTimeout",
    "BackendUnavailable",
    "ChatError",
    "ConfigurationError",
    "ConnectTimeout",
    "ConnectionLost",
    "ContextTooLong",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "MissingExtra",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "ServerUnreachable",
    "SessionNotFound",
    "StatusCode",
    "StoreUnavailable",
    "TurnNotFound",
    "TurnOutOfRange",
    "Unauthenticated",
    "Unavailable",
]


def excerpt(text: str, limit: int = 40) -> str:
    """``text`` as an error message may quote it: ``repr``, cut to ``limit`` characters.

    (For the server's messages; not part of the public API.)

    >>> excerpt("x" * 100, 5)
    "'xxxxx…' (100 characters)"
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit] + '…'!r} ({len(text)} characters)"


class StatusCode(enum.IntEnum):
    """gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ChatError(Exception):
    """Base of every error grpc-chat reports to a client.

    ``str(error)`` is the message shown to the person: say what is wrong and what to do.
    """

    status: ClassVar[StatusCode] = StatusCode.INTERNAL

    @property
    def message(self) -> str:
        return str(self)

    @property
    def detail(self) -> str:
        """What the server's log (or its operator) is told: the message, or more."""
        return str(self)


class InvalidArgument(ChatError):
    """A request field has a value the server cannot accept.

    ``field`` is empty when the request as a whole was refused (say, by the model backend).

    >>> str(InvalidArgument("message", "must not be empty"))
    'message: must not be empty'
    >>> str(InvalidArgument("", "the model refused the request"))
    'the model refused the request'
    """

    status = StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem

    @classmethod
    def from_message(cls, field: str, message: str) -> InvalidArgument:
        """The error a server reported for ``field`` with the whole text ``message``.

        >>> error = InvalidArgument.from_message("title", "title: is too long")
        >>> (error.field, str(error))
        ('title', 'title: is too long')
        """
        error = cls.__new__(cls)
        ChatError.__init__(error, message)
        error.field = field
        error.problem = message
        return error


class ContextTooLong(InvalidArgument):
    """The history does not fit the model's context window and the session rejects the turn."""


class SessionNotFound(ChatError):
    """No session has this id (it never existed, was deleted, or expired)."""

    status = StatusCode.NOT_FOUND

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {excerpt(session_id)} not found (it may have been deleted or expired)"
        )
        self.session_id = session_id


class TurnNotFound(ChatError):
    """RESUME named a turn the replay log has never held (or not for this session)."""

    status = StatusCode.NOT_FOUND

    def __init__(self, turn_id: str) -> None:
        super().__init__(
            f"turn {excerpt(turn_id)} not found; its messages, if it was stored, are in "
            "the session's history (GetSessionInfo)"
        )
        self.turn_id = turn_id


class TurnOutOfRange(ChatError):
    """The events a RESUME asks for are no longer in the replay log (past the window, or
    dropped to keep the log within its size)."""

    status = StatusCode.OUT_OF_RANGE

    def __init__(self, turn_id: str) -> None:
        super().__init__(
            f"turn {excerpt(turn_id)} is no longer in the replay log (past the replay window "
            "or its size); its stored reply is in the session's history (GetSessionInfo)"
        )
        self.turn_id = turn_id


class Aborted(ChatError):
    """A turn of the session is running and the session's concurrency policy refuses
    another meanwhile (``CONCURRENCY_POLICY_REJECT``); nothing was stored."""

    status = StatusCode.ABORTED


class Unauthenticated(ChatError):
    """The caller sent no credentials, or ones the server does not accept (any more).

    The message says what to supply; it never contains the credential itself.
    """

    status = StatusCode.UNAUTHENTICATED


class PermissionDenied(ChatError):
    """The caller is known but may not do this (e.g. list every identity's sessions)."""

    status = StatusCode.PERMISSION_DENIED


class RateLimited(ChatError):
    """Too many requests for now; ``retry_after`` is in seconds, when known."""

    status = StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """A per-identity limit of the server (``limit`` names it, e.g. ``rate-limit-messages``).

    Nothing of the refused request is stored.

    >>> error = QuotaExceeded("max-sessions-per-identity", "you have 5 sessions, the limit")
    >>> (error.limit, error.retry_after)
    ('max-sessions-per-identity', None)
    """

    def __init__(self, limit: str, problem: str, retry_after: float | None = None) -> None:
        super().__init__(f"quota {limit}: {problem}", retry_after)
        self.limit = limit


class FailedPrecondition(ChatError):
    """The request is well formed but the session is not in a state that allows it."""

    status = StatusCode.FAILED_PRECONDITION


class Unavailable(ChatError):
    """The server cannot serve the request now; retrying later (or elsewhere) may work."""

    status = StatusCode.UNAVAILABLE


class StoreUnavailable(Unavailable):
    """The session store cannot be reached.

    The message is what clients are told; :attr:`detail` says where the store is and what
    failed, for the server's log (clients have no business knowing the store's address).

    >>> error = StoreUnavailable(detail="Redis at redis://10.0.0.5:6379/0 is unreachable")
    >>> (str(error), error.detail)  # doctest: +NORMALIZE_WHITESPACE
    ('the session store is unreachable; try again in a moment',
     'Redis at redis://10.0.0.5:6379/0 is unreachable')
    """

    def __init__(
        self,
        message: str = "the session store is unreachable; try again in a moment",
        *,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self._detail = detail

    @property
    def detail(self) -> str:
        return self._detail or str(self)


class ServerUnreachable(Unavailable):
    """The client cannot open a connection to the server (not running, wrong address).

    >>> str(ServerUnreachable("localhost:50051", "connection refused", refused=True))
    'cannot reach a chat server at localhost:50051: connection refused'

    ``refused`` says that nothing listens at the target (the connection was refused), as
    opposed to a name that does not resolve or a network that does not route.
    """

    def __init__(self, target: str, reason: str, *, refused: bool = False) -> None:
        super().__init__(f"cannot reach a chat server at {target}: {reason}")
        self.target = target
        self.reason = reason
        self.refused = refused


class ConnectTimeout(ServerUnreachable):
    """Something accepted the connection, but no chat server answered within the deadline.

    The server may be stopped, overloaded, or not a gRPC server at all.
    """

    status = StatusCode.DEADLINE_EXCEEDED


class ConnectionLost(ServerUnreachable):
    """The connection to the server broke; replies in flight on it are cut short."""

    def __init__(self, target: str, reason: str) -> None:
        Unavailable.__init__(self, f"lost the connection to the chat server at {target}: {reason}")
        self.target = target
        self.reason = reason
        self.refused = False


class DeadlineExceeded(ChatError):
    """A call did not get its answer within the client's deadline."""

    status = StatusCode.DEADLINE_EXCEEDED


class ConfigurationError(ChatError):
    """The server was configured with values it cannot use."""

    status = StatusCode.FAILED_PRECONDITION


class MissingExtra(ConfigurationError):
    """An optional dependency is needed for the chosen feature but is not installed."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs the optional dependencies of grpc-chat[{extra}]: "
            f"pip install 'grpc-chat[{extra}]'"
        )
        self.extra = extra


class BackendError(ChatError):
    """The model backend failed to produce a reply."""

    status = StatusCode.INTERNAL


class BackendAuthError(BackendError):
    """The backend rejected the server's credentials (check the API key).

    ``FAILED_PRECONDITION``, not ``UNAUTHENTICATED``: the caller's own credentials are fine;
    the server is misconfigured, and retrying cannot help until its operator fixes the key.
    """

    status = StatusCode.FAILED_PRECONDITION


class BackendRateLimited(BackendError, RateLimited):
    """The backend is rate limiting this server; ``retry_after`` is in seconds, when known."""

    status = StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        RateLimited.__init__(self, message, retry_after)


class BackendTimeout(BackendError):
    """The backend did not answer in time."""

    status = StatusCode.DEADLINE_EXCEEDED


class BackendUnavailable(BackendError):
    """The backend cannot be reached."""

    status = StatusCode.UNAVAILABLE


class BackendBadRequest(BackendError):
    """The backend refused the request as invalid (for example, the context is too long)."""

    status = StatusCode.INVALID_ARGUMENT

"""The exit statuses of ``chat-client``, shared by its commands and its script mode."""

from __future__ import annotations

from chat.errors import (
    ChatError,
    ConfigurationError,
    ConnectTimeout,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ServerUnreachable,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_DENIED",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "exit_code_for",
]

#: Exit statuses scripts can rely on (also in ``chat-client --help`` and the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 5
EXIT_DENIED = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "any other error (the server failed the request, the reply failed, not serving)",
    EXIT_USAGE: "usage error or invalid argument (bad option, empty message, bad --target)",
    EXIT_UNREACHABLE: "server unreachable, connection lost, or server unavailable",
    EXIT_NOT_FOUND: "session not found",
    EXIT_TIMEOUT: "no answer within --timeout",
    EXIT_DENIED: "not authenticated or not allowed (missing, bad or revoked token or certificate)",
    EXIT_INTERRUPTED: "interrupted with Ctrl-C (the reply was cancelled)",
}


def exit_code_for(error: ChatError) -> int:
    """The documented exit status for ``error``."""
    if isinstance(error, SessionNotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, InvalidArgument | ConfigurationError):
        return EXIT_USAGE
    # Before ServerUnreachable, of which it is a kind: something answered the connection.
    if isinstance(error, DeadlineExceeded | ConnectTimeout):
        return EXIT_TIMEOUT
    if isinstance(error, ServerUnreachable | Unavailable):
        return EXIT_UNREACHABLE
    if isinstance(error, Unauthenticated | PermissionDenied):
        return EXIT_DENIED
    return EXIT_ERROR

"""What to tell a person whose client cannot reach the server: advice that fits the cause."""

from __future__ import annotations

import contextlib
import socket

from chat.client import ClientConfig, format_target
from chat.errors import ConnectionLost, ConnectTimeout, ServerUnreachable

__all__ = ["unreachable_hint"]

_LOOPBACK = {"localhost": ("127.0.0.1", "::1"), "127.0.0.1": ("::1",), "::1": ("127.0.0.1",)}


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections at ``host:port`` (loopback only: instant)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        sock.connect((host, port))
        return True
    return False


def unreachable_hint(error: ServerUnreachable, config: ClientConfig) -> str | None:
    """One sentence of advice for ``error``, or ``None`` when there is nothing useful to add.

    Starting a server is suggested only when nothing listens there: a refused connection,
    and no server on the other loopback address either (``chat-server --host 127.0.0.1``
    and ``--target '[::1]:PORT'`` miss each other).
    """
    if isinstance(error, ConnectionLost):
        return None
    if isinstance(error, ConnectTimeout):
        return (
            f"something at {config.target} accepted the connection but did not answer: "
            "the server may be stopped or busy (--timeout sets how long to wait)"
        )
    if not error.refused:
        return f"check the host and port of --target (or CHAT_TARGET): {config.target}"
    for other in _LOOPBACK.get(config.host.lower(), ()):
        if other != config.host and _listening(other, config.port):
            address = format_target(other, config.port)
            return f"a server is listening on {address}: use --target {address}"
    start = "chat-server" if config.port == 50051 else f"chat-server --port {config.port}"
    return f"start one with `{start}`, or point to another with --target HOST:PORT (or CHAT_TARGET)"

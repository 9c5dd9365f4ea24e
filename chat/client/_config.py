"""What a :class:`~chat.client.ChatClient` is configured with: target, deadlines, reconnection."""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass, field

from chat.backoff import backoff
from chat.errors import ConfigurationError
from chat.secret import Secret

#: Where ``chat-server`` listens by default.
DEFAULT_TARGET = "localhost:50051"
DEFAULT_PORT = 50051

# A DNS name (RFC 1123 labels; underscores too, as container and service names have them).
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _check_host(host: str, target: str) -> None:
    """Refuse what no resolver would find, so that it is a usage error and not "unreachable"."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigurationError(
                f"target {target!r}: {host!r} is not an IPv6 address"
            ) from None
        return
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ConfigurationError(
            f"target {target!r}: {host!r} is not a host name or IP address; "
            "expected HOST:PORT, e.g. localhost:50051"
        )


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port``; the port defaults to 50051); check both.

    >>> parse_target("localhost:6000")
    ('localhost', 6000)
    >>> parse_target("[::1]:6000")
    ('::1', 6000)
    >>> parse_target("example.org")
    ('example.org', 50051)
    """
    text = target.strip()
    if not text:
        raise ConfigurationError("target is empty; expected HOST:PORT, e.g. localhost:50051")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"target {target!r} is not [IPV6]:PORT")
        if rest == ":":
            raise ConfigurationError(f"target {target!r} has an empty port; expected HOST:PORT")
        if ":" not in host:
            raise ConfigurationError(f"target {target!r}: brackets are for IPv6 addresses only")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ConfigurationError(f"target {target!r} has an empty port; expected HOST:PORT")
    else:
        # No colon, or a bare IPv6 address: no port given.
        host, port_text = text, ""
        if ":" in text:
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                raise ConfigurationError(
                    f"target {target!r} is not HOST:PORT (write IPv6 addresses as [ADDRESS]:PORT)"
                ) from None
    if not host:
        raise ConfigurationError(f"target {target!r} has no host; expected HOST:PORT")
    _check_host(host, target)
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigurationError(f"target {target!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How the client reconnects after losing its connection.

    Before attempt ``n`` (1-based) of a reconnection the client waits
    ``min(max_backoff, initial_backoff * multiplier ** (n - 2))`` seconds (nothing before the
    first attempt), scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    clients of a restarted server do not all come back at once. After ``max_attempts``
    failed attempts it raises :class:`~chat.errors.ServerUnreachable`.

    >>> ReconnectPolicy(jitter=0).delay(3, random.Random(0))
    0.4
    """

    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ConfigurationError("backoff must satisfy 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ConfigurationError(f"multiplier must be >= 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, not {self.jitter}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based)."""
        if attempt <= 1:
            return 0.0
        return backoff(
            attempt - 1,
            initial=self.initial_backoff,
            maximum=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
            rng=rng,
        )


def format_target(host: str, port: int) -> str:
    """``host:port`` as a target (IPv6 addresses in brackets).

    >>> format_target("::1", 6000)
    '[::1]:6000'
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a :class:`ChatClient` needs; validated when it is made.

    ``target`` is kept as ``HOST:PORT`` with the port it dials, so that every message that
    names it says where the client went:

    >>> ClientConfig(target="localhost:6000").port
    6000
    >>> ClientConfig(target="localhost").target
    'localhost:50051'
    """

    #: ``HOST:PORT`` (``[IPV6]:PORT``); the port defaults to 50051.
    target: str = DEFAULT_TARGET
    #: Deadline of each unary call and of :meth:`ChatClient.ping`, in seconds.
    timeout: float = 10.0
    #: Time allowed to open the connection and get the first PONG, in seconds.
    connect_timeout: float = 5.0
    #: Reconnect automatically after a loss; ``None``: raise ConnectionLost instead.
    reconnect: ReconnectPolicy | None = None
    #: Seconds a reply may stay silent before the client PINGs the server to check that the
    #: stream is alive (a model thinking is fine: the PONG comes at once); no PONG within
    #: ``timeout`` means the connection is lost. ``None`` never checks.
    keepalive: float | None = 15.0
    #: Connect over TLS, verifying the server against ``ca_file`` (default: the system's CAs).
    tls: bool = False
    ca_file: str | None = None
    #: A client certificate and its key, for a server that requires one (mTLS).
    cert_file: str | None = None
    key_file: str | None = None
    #: Sent as ``authorization: Bearer TOKEN`` on every call (``--auth tokens`` or ``jwt``).
    token: Secret | None = field(default=None, repr=False)
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        host, port = parse_target(self.target)
        object.__setattr__(self, "target", format_target(host, port))
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        if not self.timeout > 0:
            raise ConfigurationError(f"timeout must be > 0, not {self.timeout}")
        if not self.connect_timeout > 0:
            raise ConfigurationError(f"connect_timeout must be > 0, not {self.connect_timeout}")
        if self.keepalive is not None and not self.keepalive > 0:
            raise ConfigurationError(f"keepalive must be > 0 or None, not {self.keepalive}")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigurationError("--ca-file, --cert and --key are for TLS: add --tls")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("a client certificate needs both --cert and --key")
        if self.token is not None and not isinstance(self.token, Secret):
            raise ConfigurationError("token must be a chat.Secret (it is never shown)")

"""The server's configuration: one frozen object, validated when it is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from chat.core import Limits
from chat.errors import ConfigurationError
from chat.retention import Retention
from chat.store import default_store_url

__all__ = ["BACKENDS", "ServerConfig"]

#: Backend names ``--backend`` accepts.
BACKENDS = ("echo",)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``chat-server`` needs; ``chat-server --help`` documents each field.

    >>> ServerConfig(port=0).port
    0
    """

    host: str = "localhost"
    port: int = 50051
    backend: str = "echo"
    #: The default model for new sessions; empty for the backend's own default.
    model: str = ""
    #: Session store URL; the default is a SQLite file in the user's data directory.
    store: str = field(default_factory=default_store_url)
    #: Seconds between the echo backend's words (0: as fast as possible).
    pace: float = 0.0
    #: Seconds that replies in flight get to finish on shutdown before they are cancelled.
    grace_period: float = 10.0
    limits: Limits = field(default_factory=Limits)
    retention: Retention = field(default_factory=Retention)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be between 0 and 65535, not {self.port}")
        if self.backend not in BACKENDS:
            raise ConfigurationError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.pace < 0:
            raise ConfigurationError(f"pace must be >= 0, not {self.pace}")
        if self.grace_period < 0:
            raise ConfigurationError(f"grace_period must be >= 0, not {self.grace_period}")

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

"""The server's configuration: one frozen object, validated when it is made."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chat.auth import AUTH_MODES
from chat.auth.jwts import JwtSettings
from chat.backends import ModelCheck
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.context import ContextSettings
from chat.core import Limits
from chat.errors import ConfigurationError
from chat.quota import Quotas
from chat.replay import ReplaySettings
from chat.retention import Retention
from chat.secret import Secret
from chat.store import default_store_url

__all__ = [
    "API_KEY_ENV_VARS",
    "BACKENDS",
    "DEFAULT_COALESCE_WINDOW",
    "DISCONNECT_POLICIES",
    "EVENT_LOOPS",
    "MODEL_CHECKS",
    "REFLECTION_MODES",
    "ServerConfig",
]

#: Who may use server reflection (``--reflection``).
REFLECTION_MODES = ("public", "authenticated", "off")

#: Event loops ``--event-loop`` accepts: ``auto`` is uvloop when it is installed.
EVENT_LOOPS = ("auto", "asyncio", "uvloop")

#: What ``--on-disconnect`` accepts: what a reply does when its client goes away.
DISCONNECT_POLICIES = ("continue", "cancel")

#: Backend names ``--backend`` accepts.
BACKENDS = ("echo", "openai", "gemini")

#: What ``--model-check`` accepts (see :class:`~chat.backends.ModelCheck`).
MODEL_CHECKS = tuple(check.value for check in ModelCheck)

#: Environment variables an API key is read from, per backend, first match wins.
API_KEY_ENV_VARS: Mapping[str, tuple[str, ...]] = {
    "echo": (),
    "openai": ("CHAT_API_KEY", "OPENAI_API_KEY"),
    # GOOGLE_API_KEY first: the google-genai SDK prefers it when both are set.
    "gemini": ("CHAT_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY"),
}

#: The coalescing window (seconds) of each backend when the config sets none. The echo
#: backend's deltas are paced (or instant, in tests and benchmarks); remote models' deltas
#: arrive in bursts that are worth merging (see benchmarks/coalescing.py).
DEFAULT_COALESCE_WINDOW: Mapping[str, float] = {"echo": 0.0, "openai": 0.005, "gemini": 0.005}


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
    #: The OpenAI-compatible or Gemini endpoint; empty for the provider's public one.
    base_url: str = ""
    #: The backend's API key (never logged or shown; see :class:`~chat.secret.Secret`).
    api_key: Secret | None = field(default=None, repr=False)
    #: Seconds to wait for a connection to the model server.
    connect_timeout: float = 10.0
    #: Seconds to wait for each read from the model server (the first token included).
    read_timeout: float = 120.0
    #: Retries of a transient failure before the first token (0: none).
    retries: int = 2
    #: Deltas arriving within this many seconds are merged; ``None``: the backend's default.
    coalesce_window: float | None = None
    context: ContextSettings = field(default_factory=ContextSettings)
    #: Session store URL; the default is a SQLite file in the user's data directory.
    store: str = field(default_factory=default_store_url)
    #: Seconds between the echo backend's words (0: as fast as possible).
    pace: float = 0.0
    #: Seconds between probes of the session store (health follows the store).
    store_check_interval: float = 1.0
    #: Seconds that replies in flight get to finish on shutdown before they are cancelled.
    grace_period: float = 10.0
    #: The asyncio event loop that ``chat-server`` runs on (see :data:`EVENT_LOOPS`).
    event_loop: str = "auto"
    #: How model names are checked against the backend's list (:data:`MODEL_CHECKS`), for
    #: ``model`` at start-up and for each session; ``None``: see :attr:`effective_model_check`.
    model_check: str | None = None
    limits: Limits = field(default_factory=Limits)
    retention: Retention = field(default_factory=Retention)
    #: PEM certificate (chain) and key: serve over TLS. ``None``: plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM CA(s) whose client certificates are required and accepted (mTLS).
    tls_client_ca: str | None = None
    #: How callers are identified (see :mod:`chat.auth`): none, tokens, mtls, jwt.
    auth: str = "none"
    #: Where ``--auth tokens`` keeps token hashes; ``None``: in the session store.
    tokens_file: str | None = None
    #: How ``--auth jwt`` verifies tokens.
    jwt: JwtSettings | None = field(default=None, repr=False)
    #: Identities that are administrators with ``--auth mtls``.
    admin_identities: tuple[str, ...] = ()
    #: Who may use server reflection: public, authenticated (like ChatService) or off.
    reflection: str = "public"
    #: Per-identity quotas and rate limits (all off by default).
    quotas: Quotas = field(default_factory=Quotas)
    #: Serve Prometheus metrics at ``http://metrics_host:metrics_port/metrics`` (``None``:
    #: no metrics; 0 picks a free port).
    metrics_port: int | None = None
    #: The interface of the metrics endpoint; empty: the same as :attr:`host`.
    metrics_host: str = ""
    #: Record OpenTelemetry traces, exported as the ``OTEL_*`` variables say (the ``otel``
    #: extra).
    otel: bool = False
    #: Seconds between HTTP/2 PINGs on a connection with open streams (0: none).
    keepalive_time: float = 60.0
    #: Seconds a PING may go unanswered before the connection is closed.
    keepalive_timeout: float = 20.0
    #: Seconds after which a connection is retired (0: never), so that clients reconnect
    #: and a load balancer can spread them again (each connection gets up to 10% more, at
    #: random, so that they do not all reconnect at once).
    max_connection_age: float = 0.0
    #: Seconds a retired connection keeps its open streams before it is closed anyway.
    max_connection_age_grace: float = 600.0
    #: Send a heartbeat on a Chat stream that has been silent this many seconds (0: never),
    #: for proxies that close silent streams while a model thinks.
    heartbeat: float = 15.0
    #: What a reply does when its client goes away, for sessions without their own setting
    #: (:data:`DISCONNECT_POLICIES`): ``continue`` runs it to its end and stores it (a
    #: client that comes back resumes it), ``cancel`` stops the model at once.
    on_disconnect: str = "continue"
    #: How long, and how much, the replay log keeps (RESUME, WATCH, resends).
    replay: ReplaySettings = field(default_factory=ReplaySettings)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def exposed(self) -> bool:
        """Whether the host is reachable from other machines (not a loopback address)."""
        host = self.host.strip("[]")
        if host in ("localhost", ""):
            return host == ""
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.auth not in AUTH_MODES:
            raise ConfigurationError(
                f"unknown --auth {self.auth!r}; choose one of {', '.join(AUTH_MODES)}"
            )
        if self.auth == "mtls" and self.tls_client_ca is None:
            raise ConfigurationError(
                "--auth mtls takes the identity from client certificates: give --tls-cert, "
                "--tls-key and --tls-client-ca"
            )
        if self.auth == "jwt" and self.jwt is None:
            raise ConfigurationError(
                "--auth jwt needs --jwt-secret-file (HS256) or --jwt-jwks (RS256/ES256)"
            )
        if self.reflection not in REFLECTION_MODES:
            raise ConfigurationError(
                f"unknown --reflection {self.reflection!r}; "
                f"choose one of {', '.join(REFLECTION_MODES)}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be between 0 and 65535, not {self.port}")
        if self.backend not in BACKENDS:
            raise ConfigurationError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.pace < 0:
            raise ConfigurationError(f"pace must be >= 0, not {self.pace}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigurationError(
                f"unknown event loop {self.event_loop!r}; choose one of {', '.join(EVENT_LOOPS)}"
            )
        if self.model_check is not None and self.model_check not in MODEL_CHECKS:
            raise ConfigurationError(
                f"unknown model check {self.model_check!r}; choose one of {', '.join(MODEL_CHECKS)}"
            )
        if self.on_disconnect not in DISCONNECT_POLICIES:
            raise ConfigurationError(
                f"unknown --on-disconnect {self.on_disconnect!r}; "
                f"choose one of {', '.join(DISCONNECT_POLICIES)}"
            )
        if self.grace_period < 0:
            raise ConfigurationError(f"grace_period must be >= 0, not {self.grace_period}")
        for name in ("connect_timeout", "read_timeout", "store_check_interval"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"{name} must be a finite number > 0, not {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(
                f"metrics_port must be between 0 and 65535, not {self.metrics_port}"
            )
        for name in (
            "keepalive_time",
            "max_connection_age",
            "max_connection_age_grace",
            "heartbeat",
        ):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ConfigurationError(f"{name} must be a finite number >= 0, not {value}")
        if not self.keepalive_timeout > 0 or math.isinf(self.keepalive_timeout):
            raise ConfigurationError(
                f"keepalive_timeout must be a finite number > 0, not {self.keepalive_timeout}"
            )
        if not 0 <= self.retries <= 10:
            raise ConfigurationError(f"retries must be between 0 and 10, not {self.retries}")
        window = self.coalesce_window
        if window is not None and not 0 <= window <= 1:
            raise ConfigurationError(f"coalesce_window must be between 0 and 1s, not {window}")
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            raise ConfigurationError("api_key must be a chat.Secret (so that it is never shown)")
        # Builds and so checks the URL.
        self.remote_settings()

    def remote_settings(self) -> RemoteSettings:
        """What an HTTP backend (openai, gemini) needs from this config."""
        return RemoteSettings(
            base_url=self.base_url,
            api_key=self.api_key,
            default_model=self.model,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retry=RetryPolicy(attempts=self.retries + 1),
        )

    @property
    def effective_model_check(self) -> ModelCheck:
        """The model check, with the default applied.

        ``strict`` where the backend's list is complete: OpenAI's own API and Gemini.
        ``warn`` for any other OpenAI-compatible server, which may list only the models it
        has loaded (``transformers serve``, LM Studio, proxies) and still serve others.

        >>> ServerConfig(backend="openai", base_url="http://localhost:8000/v1").effective_model_check
        <ModelCheck.WARN: 'warn'>
        """
        if self.model_check is not None:
            return ModelCheck(self.model_check)
        if self.backend == "openai":
            host = urlsplit(self.base_url).hostname if self.base_url else "api.openai.com"
            return ModelCheck.STRICT if host == "api.openai.com" else ModelCheck.WARN
        return ModelCheck.STRICT

    @property
    def effective_coalesce_window(self) -> float:
        """The coalescing window in seconds, with the backend's default applied."""
        if self.coalesce_window is not None:
            return self.coalesce_window
        return DEFAULT_COALESCE_WINDOW.get(self.backend, 0.0)

    @property
    def metrics_address(self) -> str:
        """Where ``/metrics`` is served (``host:port`` of the config, before binding)."""
        host = self.metrics_host or self.host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.metrics_port}"

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

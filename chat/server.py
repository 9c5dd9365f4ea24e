"""Running the service: :class:`ChatServer` (lifecycle) and :func:`serve` (until a signal)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import signal
import socket
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from grpclib.events import RecvRequest, listen
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health

from chat._compat import (
    HookedServer,
    IServable,
    demote_client_gone_logs,
    listening_port,
    open_streams,
    send_goaway,
    server_configuration,
)
from chat._cork import CorkedTransport, CorkingProtocol
from chat._receive import ACCEPT_ENCODING, guarded
from chat._reflection import with_reflection
from chat.auth import Authenticator, NoAuth
from chat.backends import ModelBackend
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend
from chat.config import ServerConfig
from chat.context import ContextBudget
from chat.core import ChatCore
from chat.errors import BackendError, ConfigurationError
from chat.health import StoreHealth
from chat.metrics import Metrics
from chat.quota import QuotaKeeper, open_counters
from chat.replay import MemoryReplayLog, ReplayLog
from chat.secret import keep_headers_out_of_logs
from chat.service import ChatService
from chat.store import SessionStore, open_store
from chat.telemetry import PROVIDERS, Telemetry, provider_name
from chat.tls import reload_server_context, server_context
from chat.types import DisconnectPolicy

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "ChatServer",
    "ConnectionRetirer",
    "create_authenticator",
    "create_backend",
    "event_loop_factory",
    "exposure_warning",
    "listen_hosts",
    "serve",
]

log = logging.getLogger(__name__)

#: Seconds streams get, past the grace period, to write the final events of the replies the
#: shutdown cut short; a client that does not read them meanwhile is cut off.
FINAL_EVENTS_WITHIN = 1.0


def create_authenticator(config: ServerConfig) -> Authenticator:
    """The authenticator of ``config.auth`` (tokens: in the store or ``--tokens-file``)."""
    if config.auth == "tokens":
        from chat.auth.tokens import TokenAuth, open_token_store

        return TokenAuth(open_token_store(config.store, config.tokens_file))
    if config.auth == "mtls":
        from chat.auth.mtls import MtlsAuth

        return MtlsAuth(config.admin_identities)
    if config.auth == "jwt":
        from chat.auth.jwts import JwtAuth

        assert config.jwt is not None
        return JwtAuth(config.jwt)
    return NoAuth()


def open_replay_log(
    config: ServerConfig, store: SessionStore, *, on_evicted: Callable[[int], None]
) -> ReplayLog:
    """The replay log for ``config`` (RESUME, WATCH, resends), within ``config.replay``.

    With the Redis store it is in Redis too (same URL and prefix), so that any replica can
    replay, watch or attach to a turn another one runs; with any other store, in this
    process.
    """
    if store.kind == "redis":
        from chat.store.redis import RedisStore
        from chat.store.redis_replay import RedisReplayLog

        if isinstance(store, RedisStore):
            return RedisReplayLog(store.url, config.replay, on_evicted=on_evicted)
    return MemoryReplayLog(config.replay, on_evicted=on_evicted)


def exposure_warning(config: ServerConfig) -> str | None:
    """What to tell the operator of a server others can reach without protection."""
    if not config.exposed:
        return None
    problems = []
    if config.auth == "none":
        problems.append("without authentication (--auth none)")
    if not config.tls:
        problems.append("without TLS")
    if not problems:
        return None
    return (
        f"listening on {config.host}, which other machines can reach, "
        f"{' and '.join(problems)}: anyone who can reach the port can read every session"
        + ("" if config.tls else " and everything sent is readable on the network")
    )


def create_backend(
    config: ServerConfig, *, on_retry: Callable[[BackendError], None] | None = None
) -> ModelBackend:
    """The model backend that ``config`` names, with its coalescing window.

    The SDK-based backends are imported here, so that the server runs without their extras
    until one is chosen; then a missing extra is a :class:`~chat.errors.MissingExtra`.
    ``on_retry`` is told about each retry of a model call (metrics).
    """
    backend: ModelBackend
    if config.backend == "openai":
        from chat.backends.openai import OpenAIBackend

        backend = OpenAIBackend(config.remote_settings(), on_retry=on_retry)
    elif config.backend == "gemini":
        from chat.backends.gemini import GeminiBackend

        backend = GeminiBackend(config.remote_settings(), on_retry=on_retry)
    else:
        model = config.model or "echo"
        # One model, as a remote backend's list would say: a session asking for another
        # is told so, rather than answered by echo under a name it does not have.
        backend = EchoBackend(pace=config.pace, default_model=model, models=(model,))
    window = config.effective_coalesce_window
    return CoalescingBackend(backend, window=window) if window > 0 else backend


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """How to make the event loop ``name`` (``auto``, ``asyncio`` or ``uvloop``).

    uvloop cuts the loop's own overhead per socket event and task switch, which is most of
    what remains per streamed chunk; ``auto`` uses it when it is installed (it is a
    dependency on the platforms it supports) and asyncio's default loop otherwise.

    >>> asyncio.Runner(loop_factory=event_loop_factory("asyncio"))  # doctest: +ELLIPSIS
    <asyncio.runners.Runner object at ...>
    """
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigurationError("--event-loop uvloop: uvloop is not installed") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def listen_hosts(host: str) -> list[str]:
    """The addresses to listen on for ``host``: ``localhost`` is both loopback addresses.

    Resolving ``localhost`` often gives 127.0.0.1 alone (``/etc/hosts``), and a client that
    dials ``[::1]:PORT`` (or whose resolver prefers IPv6) would be refused. ``::1`` is left
    out where this machine has no IPv6 loopback.
    """
    if host.lower() != "localhost":
        return [host]
    hosts = ["127.0.0.1"]
    if socket.has_ipv6:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            hosts.append("::1")
    return hosts


async def _listen(
    server: HookedServer,
    host: str,
    port: int,
    attempts: int = 5,
    *,
    ssl: ssl.SSLContext | None = None,
) -> None:
    """Start ``server`` on every address of ``host`` (see :func:`listen_hosts`), one port.

    For port 0 the kernel picks a port per socket: one is taken on the first address and
    asked for on the others (again, if another program took it meanwhile).
    """
    hosts = listen_hosts(host)
    if port or len(hosts) == 1:
        await server.start_on(hosts, port, ssl=ssl)
        return
    for attempt in range(attempts):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            free = int(probe.getsockname()[1])
        try:
            await server.start_on(hosts, free, ssl=ssl)
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise


class ConnectionRetirer:
    """Retires connections older than ``age`` seconds (each gets up to 10% more, at random,
    so that clients do not all reconnect at once): once a connection's streams have ended,
    or ``grace`` seconds after its time anyway, it is sent a GOAWAY and closed.

    A connection past its age is not told to stop opening streams first: hyper-h2 sends
    nothing after a GOAWAY, and grpclib's clients end their open streams when they get one.
    """

    def __init__(
        self,
        connections: set[CorkedTransport],
        age: float,
        grace: float,
        rng: random.Random | None = None,
    ) -> None:
        self._connections = connections
        self._age = age
        self._grace = grace
        self._rng = rng or random.Random()
        self._due: dict[CorkedTransport, float] = {}
        #: Seconds between sweeps.
        self.interval = min(age / 4, grace / 4 or age, 5.0)
        #: Connections retired so far.
        self.retired = 0

    def due(self, connection: CorkedTransport) -> float:
        """When ``connection`` is to be retired (``loop.time()``)."""
        due = self._due.get(connection)
        if due is None:
            due = connection.opened + self._age * (1 + self._rng.random() / 10)
            self._due[connection] = due
        return due

    def sweep(self, now: float) -> int:
        """Retire what is due at ``now``; return how many connections were closed."""
        closed = 0
        for connection in list(self._connections):
            due = self.due(connection)
            protocol = connection.protocol
            if now < due or protocol is None or connection.is_closing():
                continue
            if open_streams(protocol) and now < due + self._grace:
                continue
            log.debug("retiring a connection after %.0fs", now - connection.opened)
            send_goaway(protocol)
            connection.close()
            closed += 1
        self.retired += closed
        for connection in [c for c in self._due if c not in self._connections]:
            del self._due[connection]
        return closed


class ChatServer:
    """A grpc-chat server: the chat service, health checking and server reflection.

    >>> async def main() -> None:                          # doctest: +SKIP
    ...     async with ChatServer(ServerConfig(port=0)) as server:
    ...         print("listening on port", server.port)
    ...         await server.wait_closed()

    ``store`` and ``backend`` replace the ones the config names (for tests and embedding);
    the server closes them when it stops. ``tracer_provider`` (an OpenTelemetry SDK
    provider) turns traces on with it, instead of the one ``config.otel`` builds from the
    ``OTEL_*`` variables; the caller shuts it down.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        store: SessionStore | None = None,
        backend: ModelBackend | None = None,
        authenticator: Authenticator | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._backend = backend
        self._tracer_provider = tracer_provider
        # The provider built from the environment (config.otel), shut down on stop.
        self._own_tracer_provider: TracerProvider | None = None
        self._telemetry: Telemetry | None = None
        # The heartbeat and connection-age loops.
        self._tasks: list[asyncio.Task[None]] = []
        #: Retires connections past ``config.max_connection_age`` (when it is set).
        self.retirer: ConnectionRetirer | None = None
        self._authenticator = authenticator
        self._quotas: QuotaKeeper | None = None
        self._tls: ssl.SSLContext | None = None
        self._core: ChatCore | None = None
        self._server: HookedServer | None = None
        # Open connections, so that stop() can close them: grpclib's close() stops listening
        # and cancels the handlers but leaves connections open, so the clients of a server
        # stopped in its process would wait forever (and could still start calls on it).
        self._connections: set[CorkedTransport] = set()
        self._serving = ServiceStatus()
        # The store's part of the health status (chat.health.StoreHealth sets it).
        self._store_reachable = ServiceStatus()
        self._closed = asyncio.Event()
        self._stopping = False
        # Set to cut the grace period short (a second SIGINT or SIGTERM).
        self._hurry = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def core(self) -> ChatCore:
        if self._core is None:
            raise RuntimeError("the server is not started")
        return self._core

    @property
    def telemetry(self) -> Telemetry:
        """The server's metrics, traces and access logs."""
        if self._telemetry is None:
            raise RuntimeError("the server is not started")
        return self._telemetry

    @property
    def metrics(self) -> Metrics | None:
        """The server's Prometheus metrics (``None`` when ``metrics_port`` is not set)."""
        return self.telemetry.metrics

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (useful with ``metrics_port=0``)."""
        metrics = self.telemetry.metrics
        return None if metrics is None else metrics.port

    @property
    def port(self) -> int:
        """The TCP port the server listens on (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return listening_port(self._server)

    async def start(self) -> None:
        """Open the store and the backend, bind, and start serving."""
        config = self.config
        demote_client_gone_logs()
        telemetry = self._telemetry = self._make_telemetry()
        # The backend first: a configuration error there should not leave a store open.
        backend = (
            self._backend
            if self._backend is not None
            else create_backend(config, on_retry=telemetry.backend_retry)
        )
        telemetry.provider = provider_name(backend.name)
        if backend.name in PROVIDERS:
            telemetry.model_server(config.base_url)
        try:
            store = self._store if self._store is not None else open_store(config.store)
        except BaseException:
            await backend.aclose()
            await self._close_telemetry()
            raise
        self._store, self._backend = store, backend
        try:
            await store.open()
            if self._authenticator is None:
                self._authenticator = create_authenticator(config)
            authenticator = self._authenticator
            quotas = self._quotas = QuotaKeeper(
                config.quotas, open_counters(config.store) if config.quotas.any else None
            )
            if config.tls_cert is not None and config.tls_key is not None:
                self._tls = server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            core = self._core = ChatCore(
                telemetry.wrap_store(store),
                backend,
                limits=config.limits,
                retention=config.retention,
                context=ContextBudget(config.context),
                quotas=quotas,
                model_check=config.effective_model_check,
                observer=telemetry,
                replay=open_replay_log(config, store, on_evicted=telemetry.replay_evicted),
                on_disconnect=DisconnectPolicy[config.on_disconnect.upper()],
                health=StoreHealth(
                    store,
                    interval=config.store_check_interval,
                    timeout=max(2.0, config.store_check_interval),
                    on_change=self._store_reachable.set,
                ),
            )
            # The default model is checked now, not at the first turn of every session
            # (a strict check refuses to start; a listing that fails checks nothing).
            if (problem := await core.models.problem(backend.default_model)) is not None:
                raise ConfigurationError(
                    f"--model {backend.default_model}: {problem} "
                    "(--model-check off or warn to use it anyway)"
                )
            open_services = ["grpc.health.v1.Health"]
            if config.reflection == "public":
                open_services += [
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection",
                ]
            service = ChatService(core, auth=authenticator, open_services=tuple(open_services))
            checks = [self._serving, self._store_reachable]
            health = Health({service: checks, OVERALL: checks})
            handlers: list[IServable] = [service, health]
            if config.reflection != "off":
                handlers = with_reflection(handlers)
            handlers = guarded(handlers, max_receive_bytes=config.limits.max_receive_bytes)
            keepalive = config.keepalive_time or None
            self._server = HookedServer(
                handlers,
                wrap_protocol=lambda inner: CorkingProtocol(inner, self._connections),
                response_headers=[ACCEPT_ENCODING],
                config=server_configuration(
                    keepalive_time=keepalive, keepalive_timeout=config.keepalive_timeout
                ),
            )
            # Before the authenticating listener: calls it refuses are counted too.
            telemetry.install(self._server, handlers)
            if authenticator.mode != "none":
                keep_headers_out_of_logs()
                listen(self._server, RecvRequest, service.authenticate)
            await _listen(self._server, config.host, config.port, ssl=self._tls)
            telemetry.bind(core)
            if telemetry.metrics is not None and config.metrics_port is not None:
                metrics_host = config.metrics_host or config.host
                port = telemetry.metrics.serve(metrics_host, config.metrics_port)
                log.info("metrics at http://%s:%d/metrics", metrics_host, port)
        except BaseException:
            # Not serving, so stop() will not run: close what was opened here.
            self._server = None
            await self._close_security()
            await store.aclose()
            await backend.aclose()
            await self._close_telemetry()
            raise
        retention = config.retention
        if retention.session_ttl is not None or retention.max_sessions is not None:
            self._sweeper = asyncio.create_task(core.retention.run())
        self._store_reachable.set(True)
        self._tasks.append(asyncio.create_task(core.health.run()))
        if config.heartbeat:
            self._tasks.append(asyncio.create_task(self._send_heartbeats(core, config.heartbeat)))
        if config.max_connection_age:
            self.retirer = ConnectionRetirer(
                self._connections, config.max_connection_age, config.max_connection_age_grace
            )
            self._tasks.append(asyncio.create_task(self._retire_connections(self.retirer)))
        self._serving.set(True)
        log.info(
            "serving on %s:%d over %s (auth %s; backend %s, model %s, store %s at %s)",
            config.host,
            self.port,
            "TLS" if config.tls else "plaintext",
            authenticator.mode,
            backend.name,
            backend.default_model,
            store.kind,
            store.location,
        )
        if (warning := exposure_warning(config)) is not None:
            log.warning("%s", warning)

    def reload_tls(self) -> bool:
        """Load the certificate and key files again, for connections made from now on.

        Open connections (and their streams) keep the certificate they started with. A bad
        file is logged and the current certificate stays in use. ``False`` without TLS.
        """
        config = self.config
        if self._tls is None or config.tls_cert is None or config.tls_key is None:
            return False
        try:
            reload_server_context(self._tls, config.tls_cert, config.tls_key, config.tls_client_ca)
        except ConfigurationError as error:
            log.error("kept the current TLS certificate: %s", error)
            return False
        log.info("reloaded the TLS certificate %s for new connections", config.tls_cert)
        return True

    async def _close_security(self) -> None:
        authenticator, self._authenticator = self._authenticator, None
        quotas, self._quotas = self._quotas, None
        if authenticator is not None:
            await authenticator.aclose()
        if quotas is not None:
            await quotas.aclose()

    async def stop(self, grace_period: float | None = None) -> None:
        """Shut down gracefully.

        Health turns NOT_SERVING and new sessions and messages are refused with UNAVAILABLE.
        Each Chat stream finishes the turns it has queued, then gets a STATUS event with
        error code UNAVAILABLE asking its client to end the stream (which then ends with
        OK) and reconnect elsewhere. After ``grace_period`` seconds (default: the config's)
        the turns still running are stopped: each reply cut short keeps the text its client
        was sent, as INTERRUPTED, and ends with an ERROR event (UNAVAILABLE), and each
        stream with that STATUS and a clean end (:data:`FINAL_EVENTS_WITHIN` seconds are
        given to write them). Then connections close, and the store and backend.
        """
        if self._stopping or self._server is None or self._core is None:
            return
        self._stopping = True
        grace = self.config.grace_period if grace_period is None else grace_period
        self._serving.set(False)
        self._core.start_draining()
        try:
            if not await self._wait_idle_or_hurry(grace):
                log.warning(
                    "%d streams (%d replies) still open after %.1fs; ending them",
                    self._core.stats.active_streams,
                    self._core.stats.active_replies,
                    grace,
                )
                # Each reply cut short gets a final event, and each stream a clean end,
                # before the connections close: clients are not left guessing.
                self._core.interrupt()
                if not await self._core.wait_idle(FINAL_EVENTS_WITHIN):
                    log.warning(
                        "%d streams did not take their final events within %.1fs; cancelling them",
                        self._core.stats.active_streams,
                        FINAL_EVENTS_WITHIN,
                    )
            self._server.close()
            await self._server.wait_closed()
            if closed := self._close_connections():
                log.info("closed %d client connections", closed)
        finally:
            tasks = [*self._tasks, *([self._sweeper] if self._sweeper is not None else [])]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            self._tasks.clear()
            await self._close_telemetry()
            await self._close_security()
            if self._core is not None:
                await self._core.replay.aclose()
            if self._backend is not None:
                await self._backend.aclose()
            if self._store is not None:
                await self._store.aclose()
            self._closed.set()
            log.info("server stopped")

    def _make_telemetry(self) -> Telemetry:
        config = self.config
        provider = self._tracer_provider
        if provider is None and config.otel:
            from chat.tracing import tracer_provider_from_environment

            provider = self._own_tracer_provider = tracer_provider_from_environment()
        metrics = Metrics() if config.metrics_port is not None else None
        return Telemetry(metrics=metrics, tracer_provider=provider)

    async def _close_telemetry(self) -> None:
        telemetry = self._telemetry
        if telemetry is not None and telemetry.metrics is not None:
            await telemetry.metrics.stop_serving()
        provider, self._own_tracer_provider = self._own_tracer_provider, None
        if provider is not None:
            # Exports what is left: network I/O, not on the event loop.
            await asyncio.to_thread(provider.shutdown)

    async def _send_heartbeats(self, core: ChatCore, silent_for: float) -> None:
        """Every stream silent for ``silent_for`` seconds gets a heartbeat (checked four
        times as often, so that none is silent for more than 1.25 times as long)."""
        while True:
            await asyncio.sleep(silent_for / 4)
            core.send_heartbeats(silent_for)

    async def _retire_connections(self, retirer: ConnectionRetirer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(retirer.interval)
            retirer.sweep(loop.time())

    def stop_now(self) -> None:
        """End the grace period now: replies still running are cancelled (and kept)."""
        self._hurry.set()

    async def _wait_idle_or_hurry(self, grace: float) -> bool:
        assert self._core is not None
        idle = asyncio.ensure_future(self._core.wait_idle(grace))
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait((idle, hurry), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            if not idle.done():
                idle.cancel()
                log.warning("stopping at once (second signal)")
            await asyncio.wait((idle, hurry))
        return not idle.cancelled() and idle.result()

    def _close_connections(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        return len(connections)

    async def wait_closed(self) -> None:
        """Wait until :meth:`stop` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(config: ServerConfig, *, ready: Callable[[ChatServer], None] | None = None) -> None:
    """Run a server until SIGINT or SIGTERM, then stop it gracefully.

    SIGHUP reloads the TLS certificate and key for new connections (open streams go on).
    A second SIGINT or SIGTERM during the grace period stops it at once (replies still
    running are cancelled and kept as interrupted), as uvicorn and grpclib do. ``ready`` is
    called once the server listens (the CLI prints its banner there).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: ChatServer | None = None

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
        elif server is not None:
            server.stop_now()

    def on_hangup() -> None:
        if server is not None:
            server.reload_tls()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        async with ChatServer(config) as server:
            if ready is not None:
                ready(server)
            await stop.wait()
            log.info(
                "shutting down (grace period %.1fs; a second signal stops at once)",
                config.grace_period,
            )
    finally:
        for signum in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(signum)

"""Running the service: :class:`ChatServer` (lifecycle) and :func:`serve` (until a signal)."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health

from chat._compat import (
    HookedServer,
    demote_client_gone_logs,
    listening_port,
    open_streams,
    send_goaway,
    server_configuration,
)
from chat._cork import CorkedTransport, CorkingProtocol
from chat._reflection import with_reflection
from chat.backends import ModelBackend
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend
from chat.config import ServerConfig
from chat.context import ContextBudget
from chat.core import ChatCore
from chat.errors import BackendError, ConfigurationError
from chat.metrics import Metrics
from chat.service import ChatService
from chat.store import SessionStore, open_store
from chat.telemetry import PROVIDERS, Telemetry, provider_name

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["ChatServer", "ConnectionRetirer", "create_backend", "event_loop_factory", "serve"]

log = logging.getLogger(__name__)


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
        backend = EchoBackend(pace=config.pace, default_model=config.model or "echo")
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
        self._core: ChatCore | None = None
        self._server: HookedServer | None = None
        # Open connections, so that stop() can close them: grpclib's close() stops listening
        # and cancels the handlers but leaves connections open, so the clients of a server
        # stopped in its process would wait forever (and could still start calls on it).
        self._connections: set[CorkedTransport] = set()
        self._serving = ServiceStatus()
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
            core = self._core = ChatCore(
                telemetry.wrap_store(store),
                backend,
                limits=config.limits,
                retention=config.retention,
                context=ContextBudget(config.context),
                model_check=config.effective_model_check,
                observer=telemetry,
            )
            # The default model is checked now, not at the first turn of every session
            # (a strict check refuses to start; a listing that fails checks nothing).
            if (problem := await core.models.problem(backend.default_model)) is not None:
                raise ConfigurationError(
                    f"--model {backend.default_model}: {problem} "
                    "(--model-check off or warn to use it anyway)"
                )
            service = ChatService(core)
            health = Health({service: [self._serving], OVERALL: [self._serving]})
            handlers = with_reflection([service, health])
            keepalive = config.keepalive_time or None
            self._server = HookedServer(
                handlers,
                wrap_protocol=lambda inner: CorkingProtocol(inner, self._connections),
                config=server_configuration(
                    keepalive_time=keepalive, keepalive_timeout=config.keepalive_timeout
                ),
            )
            # Before any other RecvRequest listener: calls another refuses are counted too.
            telemetry.install(self._server, handlers)
            await self._server.start(config.host, config.port)
            telemetry.bind(core)
            if telemetry.metrics is not None and config.metrics_port is not None:
                metrics_host = config.metrics_host or config.host
                port = telemetry.metrics.serve(metrics_host, config.metrics_port)
                log.info("metrics at http://%s:%d/metrics", metrics_host, port)
        except BaseException:
            # Not serving, so stop() will not run: close what was opened here.
            self._server = None
            await store.aclose()
            await backend.aclose()
            await self._close_telemetry()
            raise
        retention = config.retention
        if retention.session_ttl is not None or retention.max_sessions is not None:
            self._sweeper = asyncio.create_task(core.retention.run())
        if config.heartbeat:
            self._tasks.append(asyncio.create_task(self._send_heartbeats(core, config.heartbeat)))
        if config.max_connection_age:
            self.retirer = ConnectionRetirer(
                self._connections, config.max_connection_age, config.max_connection_age_grace
            )
            self._tasks.append(asyncio.create_task(self._retire_connections(self.retirer)))
        self._serving.set(True)
        log.info(
            "serving on %s:%d (backend %s, model %s, store %s at %s)",
            config.host,
            self.port,
            backend.name,
            backend.default_model,
            store.kind,
            store.location,
        )

    async def stop(self, grace_period: float | None = None) -> None:
        """Shut down gracefully.

        Health turns NOT_SERVING and new messages are refused with UNAVAILABLE. Each Chat
        stream finishes the turns it has queued, then gets a STATUS event with error code
        UNAVAILABLE asking its client to end the stream (which then ends with OK) and
        reconnect elsewhere. After ``grace_period`` seconds (default: the config's) the
        streams still open are cancelled, keeping partial replies as INTERRUPTED, and the
        store and backend are closed.
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
                    "%d streams (%d replies) still open after %.1fs; cancelling them",
                    self._core.stats.active_streams,
                    self._core.stats.active_replies,
                    grace,
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

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal)
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
        for signum in signals:
            loop.remove_signal_handler(signum)

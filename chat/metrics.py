"""Prometheus metrics of one server, in a registry of its own, served at ``/metrics``.

Names follow the OpenTelemetry GenAI semantic conventions in their Prometheus form
(``gen_ai.server.time_to_first_token`` in seconds is ``gen_ai_server_time_to_first_token_seconds``,
with the conventions' bucket boundaries) and, for the gRPC server, the grpc-ecosystem
convention of go-grpc-prometheus (``grpc_server_handled_total{grpc_code="NotFound"}``), so
that existing dashboards and alerts apply. ``docs/operations.md`` lists every metric.

Label values are bounded: methods, status codes, outcomes, finish reasons, store operations,
error classes, and model names (at most :data:`MAX_MODELS` distinct ones; the rest are
``_OTHER``). Never a session id, request id or identity.

:class:`Metrics` is written to from the event loop. ``prometheus_client`` serves it from a
thread of its own; what is read from the running server at scrape time (open streams,
replies in flight and queued, message counts) is read on the event loop
(:meth:`Metrics.bind`), so the scrape sees a consistent state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from chat.core import ChatCore

__all__ = [
    "CLIENT_DURATION_BUCKETS",
    "MAX_MODELS",
    "TIME_PER_OUTPUT_TOKEN_BUCKETS",
    "TIME_TO_FIRST_TOKEN_BUCKETS",
    "TOKEN_USAGE_BUCKETS",
    "LiveCounts",
    "Metrics",
]

#: ``gen_ai.server.time_to_first_token`` (seconds), as the GenAI conventions give them.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
#: ``gen_ai.server.time_per_output_token`` (seconds).
TIME_PER_OUTPUT_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
#: ``gen_ai.server.request.duration`` and ``gen_ai.client.operation.duration`` (seconds).
CLIENT_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
#: ``gen_ai.client.token.usage`` (tokens).
TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
#: Store operations are local or one network round trip: milliseconds, up to seconds.
STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

#: Distinct model names kept as label values; later ones are counted as ``_OTHER``. (A
#: backend that cannot list its models accepts any name a client sends.)
MAX_MODELS = 50
OTHER = "_OTHER"

_GEN_AI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
_GRPC = ("grpc_type", "grpc_service", "grpc_method")

#: Seconds a scrape waits for the event loop to read the running server's state.
_SCRAPE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class LiveCounts:
    """What a scrape reads from the running server (on its event loop)."""

    streams_open: int = 0
    replies_in_flight: int = 0
    replies_queued: int = 0
    chunks_sent: int = 0
    expired_sessions: int = 0
    evicted_sessions: int = 0
    trimmed_messages: int = 0
    #: gRPC messages received and sent, by (grpc_type, grpc_service, grpc_method).
    messages: tuple[tuple[tuple[str, str, str], int, int], ...] = ()


class _BoundedValues:
    """The first ``limit`` distinct values of a label; the others become ``_OTHER``."""

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class Metrics:
    """Every metric of one server, registered in :attr:`registry` (never the global one).

    >>> metrics = Metrics()
    >>> metrics.turns.labels("success", "stop", "echo").inc()
    >>> metrics.registry.get_sample_value(
    ...     "chat_turns_total",
    ...     {"outcome": "success", "finish_reason": "stop", "gen_ai_request_model": "echo"},
    ... )
    1.0
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.model = _BoundedValues(MAX_MODELS)
        # -- GenAI: this server, serving turns ---------------------------------------------
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from receiving a message to sending the first chunk of its reply, for "
            "successful replies (gen_ai.server.time_to_first_token).",
            _GEN_AI,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, for successful replies "
            "(gen_ai.server.time_per_output_token).",
            _GEN_AI,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from receiving a message to the end of its turn (gen_ai.server.request."
            "duration); error_type is set when the turn failed.",
            (*_GEN_AI, "error_type"),
            buckets=CLIENT_DURATION_BUCKETS,
            registry=registry,
        )
        self.turns = Counter(
            "chat_turns_total",
            "Turns (MESSAGE and RETRY) by outcome (success, error, cancelled) and finish reason.",
            ("outcome", "finish_reason", "gen_ai_request_model"),
            registry=registry,
        )
        self.context_truncated = Counter(
            "chat_context_truncated_turns_total",
            "Turns whose history did not fit the model's context window, so that older "
            "messages were left out.",
            registry=registry,
        )
        self.context_omitted = Counter(
            "chat_context_omitted_messages_total",
            "History messages left out of prompts to fit the context window.",
            registry=registry,
        )
        # -- GenAI: this server as a client of the model provider ---------------------------
        self.client_token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per model call as the provider reported them, by gen_ai_token_type "
            "(input, output) (gen_ai.client.token.usage).",
            (*_GEN_AI, "gen_ai_token_type"),
            buckets=TOKEN_USAGE_BUCKETS,
            registry=registry,
        )
        self.client_operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model calls, retries included (gen_ai.client.operation.duration); "
            "error_type is set when the call failed.",
            (*_GEN_AI, "error_type"),
            buckets=CLIENT_DURATION_BUCKETS,
            registry=registry,
        )
        self.backend_errors = Counter(
            "chat_backend_errors_total",
            "Model calls that failed, by error class and the gRPC status clients get.",
            ("gen_ai_provider_name", "error_type", "grpc_code"),
            registry=registry,
        )
        self.backend_retries = Counter(
            "chat_backend_retries_total",
            "Model calls retried after a transient failure before their first token.",
            ("gen_ai_provider_name", "error_type"),
            registry=registry,
        )
        # -- gRPC (grpc-ecosystem names) -----------------------------------------------------
        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", _GRPC, registry=registry
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code (Canceled: the client went away).",
            (*_GRPC, "grpc_code"),
            registry=registry,
        )
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (a Chat stream lives as long as its "
            "client keeps it open).",
            _GRPC,
            registry=registry,
        )
        # -- stores ----------------------------------------------------------------------------
        self.store_duration = Histogram(
            "chat_store_operation_duration_seconds",
            "Session store operations, by store kind and operation (lock: waiting for a "
            "session's turn lock).",
            ("store", "operation"),
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "chat_store_errors_total",
            "Session store operations that failed (not found and bad cursors are answers, "
            "not failures).",
            ("store", "operation", "error_type"),
            registry=registry,
        )
        # -- features that report counts of their own (chat.observe.Observer) ---------------
        self.watchers = Gauge(
            "chat_watchers", "Streams watching a session now (WATCH).", registry=registry
        )
        self.replay_evicted = Counter(
            "chat_replay_evicted_events_total",
            "Events dropped from the replay log (a client can no longer RESUME from them).",
            registry=registry,
        )
        self.rate_limited = Counter(
            "chat_rate_limited_total",
            "Requests refused by a quota or rate limit, by scope.",
            ("scope",),
            registry=registry,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._live = _LiveCollector()
        registry.register(self._live)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the server records a few per turn, and
        looking a child up in ``prometheus_client`` costs more than the recording itself."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def bind(self, read: Callable[[], LiveCounts]) -> None:
        """Read the running server's state with ``read()``, on this event loop, at each scrape."""
        self._live.bind(read, asyncio.get_running_loop())

    @staticmethod
    def live_counts(
        core: ChatCore, messages: Iterable[tuple[tuple[str, str, str], int, int]] = ()
    ) -> LiveCounts:
        """The :class:`LiveCounts` of ``core`` (and the gRPC message counts given)."""
        stats = core.stats
        return LiveCounts(
            streams_open=stats.active_streams,
            replies_in_flight=stats.active_replies,
            replies_queued=core.queued_turns(),
            chunks_sent=stats.total_chunks_sent,
            expired_sessions=stats.expired_sessions,
            evicted_sessions=stats.evicted_sessions,
            trimmed_messages=stats.trimmed_messages,
            messages=tuple(messages),
        )

    # -- the /metrics endpoint -------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (a thread of its own); return the port."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    @property
    def port(self) -> int | None:
        """The port ``/metrics`` is served on, if it is."""
        return None if self._http is None else int(self._http.server_port)

    async def stop_serving(self) -> None:
        """Stop the endpoint (waits for a scrape in progress)."""
        http, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if http is None:
            return
        # shutdown() waits for the serving loop to notice (up to half a second): not on
        # the event loop, which a scrape in progress may be waiting for.
        await asyncio.to_thread(http.shutdown)
        http.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join)


class _LiveCollector(Collector):
    """Gauges and counters read from the running server at each scrape."""

    def __init__(self) -> None:
        self._read: Callable[[], LiveCounts] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, read: Callable[[], LiveCounts], loop: asyncio.AbstractEventLoop) -> None:
        self._read, self._loop = read, loop
        self._loop_thread = threading.get_ident()

    def _counts(self) -> LiveCounts:
        read, loop = self._read, self._loop
        if read is None or loop is None:
            return LiveCounts()
        if threading.get_ident() == self._loop_thread:
            return read()
        if loop.is_closed():
            return LiveCounts()

        async def on_loop() -> LiveCounts:
            return read()

        # The server's state changes on its event loop: read it there, not from this thread.
        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(_SCRAPE_TIMEOUT)

    def describe(self) -> Iterator[Metric]:
        # Registering calls this: describe without reading a server that may not run yet.
        yield from self._families(LiveCounts())

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._counts())

    @staticmethod
    def _families(counts: LiveCounts) -> Iterator[Metric]:
        def gauge(name: str, documentation: str, value: int) -> Metric:
            return GaugeMetricFamily(name, documentation, value=value)

        def counter(name: str, documentation: str, value: int) -> Metric:
            return CounterMetricFamily(name, documentation, value=value)

        yield gauge("chat_streams_open", "Chat streams open now.", counts.streams_open)
        yield gauge(
            "chat_replies_in_flight",
            "Replies being generated now.",
            counts.replies_in_flight,
        )
        yield gauge(
            "chat_replies_queued",
            "Turns accepted and waiting for an earlier turn of their session on their stream.",
            counts.replies_queued,
        )
        yield counter("chat_chunks_sent", "CHUNK events sent.", counts.chunks_sent)
        deleted = CounterMetricFamily(
            "chat_retention_deleted_sessions",
            "Sessions deleted by retention: idle too long (expired) or over the cap (evicted).",
            labels=("reason",),
        )
        deleted.add_metric(("expired",), counts.expired_sessions)
        deleted.add_metric(("evicted",), counts.evicted_sessions)
        yield deleted
        yield counter(
            "chat_retention_trimmed_messages",
            "Messages deleted by retention from sessions over the cap on messages.",
            counts.trimmed_messages,
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", "gRPC messages received by the server.", labels=_GRPC
        )
        sent = CounterMetricFamily(
            "grpc_server_msg_sent", "gRPC messages sent by the server.", labels=_GRPC
        )
        for key, in_count, out_count in counts.messages:
            received.add_metric(key, in_count)
            sent.add_metric(key, out_count)
        yield received
        yield sent

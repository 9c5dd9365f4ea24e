"""Prometheus metrics of one server, in a registry of its own, served at ``/metrics``.

Names follow the OpenTelemetry GenAI semantic conventions in their Prometheus form
(``gen_ai.server.time_to_first_token`` in seconds is ``gen_ai_server_time_to_first_token_seconds``,
with the conventions' bucket boundaries) and, for the gRPC server, the grpc-ecosystem
convention of go-grpc-prometheus (``grpc_server_handled_total{grpc_code="NotFound"}``), so
that existing dashboards and alerts apply. ``docs/operations.md`` lists every metric.

Label values are bounded: methods, status codes, outcomes, finish reasons, store operations,
error classes, and model names (at most :data:`MAX_MODELS` distinct ones; the rest are
``_OTHER``). Never a session id, request id or identity.

:class:`Metrics` is written to from the event loop only, as plain numbers (no lock per
update). ``prometheus_client`` writes the text format and serves it from a thread of its
own; a scrape reads every value on the event loop, with what it reads from the running server
(open streams, replies in flight and queued, message counts: :meth:`Metrics.bind`), so it
sees one consistent state.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


#: prometheus_client's default buckets (seconds), as go-grpc-prometheus uses them.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _GaugeValue(_CounterValue):
    __slots__ = ()

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Buckets are upper bounds, inclusive: the first bound >= value (the last: +Inf).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """One metric and its labelled series, recorded on the event loop, read by a scrape.

    ``prometheus_client``'s own metric types take a lock for every update (they may be
    updated from any thread) and look their buckets up one by one; the server records a
    dozen values per turn, always on its event loop, and a scrape reads them there too
    (:class:`_LiveCollector`): plain numbers do, at a fraction of the cost. The families are
    exposed through ``prometheus_client``, which writes the format and serves it.
    """

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        *,
        into: list[_Family],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], Any] = {}
        into.append(self)

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} has labels {self.labelnames}, not {values}")
            series = self._series[values] = self._new()
        return series

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Metric:
        return self._family()

    def collect(self) -> Metric:
        family = self._family()
        for values, series in list(self._series.items()):
            self._add(family, values, series)
        return family

    def _add(self, family: Any, values: tuple[str, ...], series: Any) -> None:
        family.add_metric(values, series.value)


class _Counter(_Family):
    def _new(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def _family(self) -> Metric:
        return CounterMetricFamily(
            self.name.removesuffix("_total"), self.documentation, labels=self.labelnames
        )


class _Gauge(_Family):
    def _new(self) -> _GaugeValue:
        return _GaugeValue()

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self.labels().dec(amount)

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _Histogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        *,
        buckets: tuple[float, ...],
        into: list[_Family],
    ) -> None:
        super().__init__(name, documentation, labelnames, into=into)
        self.buckets = tuple(float(b) for b in buckets)
        self._les = [repr(b) for b in self.buckets] + ["+Inf"]

    def _new(self) -> _HistogramValue:
        return _HistogramValue(self.buckets)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Any, values: tuple[str, ...], series: Any) -> None:
        cumulative, buckets = 0, []
        for le, count in zip(self._les, list(series.counts), strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric(values, buckets, series.sum)


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
        families: list[_Family] = []
        # -- GenAI: this server, serving turns ---------------------------------------------
        self.time_to_first_token = _Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from receiving a message to sending the first chunk of its reply, for "
            "successful replies (gen_ai.server.time_to_first_token).",
            _GEN_AI,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            into=families,
        )
        self.time_per_output_token = _Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, for successful replies "
            "(gen_ai.server.time_per_output_token).",
            _GEN_AI,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            into=families,
        )
        self.request_duration = _Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from receiving a message to the end of its turn (gen_ai.server.request."
            "duration); error_type is set when the turn failed.",
            (*_GEN_AI, "error_type"),
            buckets=CLIENT_DURATION_BUCKETS,
            into=families,
        )
        self.turns = _Counter(
            "chat_turns_total",
            "Turns (MESSAGE and RETRY) by outcome (success, error, cancelled) and finish reason.",
            ("outcome", "finish_reason", "gen_ai_request_model"),
            into=families,
        )
        self.context_truncated = _Counter(
            "chat_context_truncated_turns_total",
            "Turns whose history did not fit the model's context window, so that older "
            "messages were left out.",
            into=families,
        )
        self.context_omitted = _Counter(
            "chat_context_omitted_messages_total",
            "History messages left out of prompts to fit the context window.",
            into=families,
        )
        # -- GenAI: this server as a client of the model provider ---------------------------
        self.client_token_usage = _Histogram(
            "gen_ai_client_token_usage",
            "Tokens per model call as the provider reported them, by gen_ai_token_type "
            "(input, output) (gen_ai.client.token.usage).",
            (*_GEN_AI, "gen_ai_token_type"),
            buckets=TOKEN_USAGE_BUCKETS,
            into=families,
        )
        self.client_operation_duration = _Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model calls, retries included (gen_ai.client.operation.duration); "
            "error_type is set when the call failed.",
            (*_GEN_AI, "error_type"),
            buckets=CLIENT_DURATION_BUCKETS,
            into=families,
        )
        self.backend_errors = _Counter(
            "chat_backend_errors_total",
            "Model calls that failed, by error class and the gRPC status clients get.",
            ("gen_ai_provider_name", "error_type", "grpc_code"),
            into=families,
        )
        self.backend_retries = _Counter(
            "chat_backend_retries_total",
            "Model calls retried after a transient failure before their first token.",
            ("gen_ai_provider_name", "error_type"),
            into=families,
        )
        # -- gRPC (grpc-ecosystem names) -----------------------------------------------------
        self.grpc_started = _Counter(
            "grpc_server_started_total", "RPCs started on the server.", _GRPC, into=families
        )
        self.grpc_handled = _Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code (Canceled: the client went away).",
            (*_GRPC, "grpc_code"),
            into=families,
        )
        self.grpc_handling = _Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (a Chat stream lives as long as its "
            "client keeps it open).",
            _GRPC,
            buckets=DEFAULT_BUCKETS,
            into=families,
        )
        # -- stores ----------------------------------------------------------------------------
        self.store_duration = _Histogram(
            "chat_store_operation_duration_seconds",
            "Session store operations, by store kind and operation (lock: waiting for a "
            "session's turn lock).",
            ("store", "operation"),
            buckets=STORE_BUCKETS,
            into=families,
        )
        self.store_errors = _Counter(
            "chat_store_errors_total",
            "Session store operations that failed (not found and bad cursors are answers, "
            "not failures).",
            ("store", "operation", "error_type"),
            into=families,
        )
        # -- features that report counts of their own (chat.observe.Observer) ---------------
        self.watchers = _Gauge(
            "chat_watchers", "Streams watching a session now (WATCH).", into=families
        )
        self.replay_evicted = _Counter(
            "chat_replay_evicted_events_total",
            "Events dropped from the replay log (a client can no longer RESUME from them).",
            into=families,
        )
        self.rate_limited = _Counter(
            "chat_rate_limited_total",
            "Requests refused by a quota or rate limit, by scope.",
            ("scope",),
            into=families,
        )
        self._live = _LiveCollector(families)
        registry.register(self._live)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    @staticmethod
    def child(metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``."""
        return metric.labels(*labels)

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

    def __init__(self, families: list[_Family]) -> None:
        self._metrics = families
        self._read: Callable[[], LiveCounts] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, read: Callable[[], LiveCounts], loop: asyncio.AbstractEventLoop) -> None:
        self._read, self._loop = read, loop
        self._loop_thread = threading.get_ident()

    def _snapshot(self) -> list[Metric]:
        read = self._read
        counts = read() if read is not None else LiveCounts()
        return [*self._families(counts), *(f.collect() for f in self._metrics)]

    def describe(self) -> Iterator[Metric]:
        # Registering calls this: describe without reading a server that may not run yet.
        yield from self._families(LiveCounts())
        for family in self._metrics:
            yield family.describe()

    def collect(self) -> Iterator[Metric]:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            yield from self._snapshot()
            return

        async def on_loop() -> list[Metric]:
            return self._snapshot()

        # Metrics change on the event loop (without locks: they are not shared with other
        # threads): read them there, not from this thread, for a consistent scrape.
        yield from asyncio.run_coroutine_threadsafe(on_loop(), loop).result(_SCRAPE_TIMEOUT)

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

"""What a server reports about itself: metrics, traces and access logs, in one place.

:class:`Telemetry` is the :class:`~chat.observe.Observer` a :class:`~chat.server.ChatServer`
gives its core, and it watches the gRPC calls through grpclib's event listeners
(:meth:`Telemetry.install`): ``RecvRequest`` starts a call (its span, continuing a client's
``traceparent``; its log context; ``grpc_server_started_total``), ``RecvMessage`` reads the
session id of unary requests, ``SendTrailingMetadata`` sees the status sent, and the end of
the call's task ends it (``grpc_server_handled_total``, the access line). Message counts are
read from grpclib's streams at scrape time, so that no listener sits on the path of each
message sent (which would stop replies from being written in batches).

Store operations are timed by :class:`TimedStore`, a wrapper the server puts around its store
when metrics are on. Model calls are observed from the turn (the model is called when the
reply starts, and its last delta ends the turn), so nothing sits between the backend and each
delta. With both off, only access lines are written (at INFO, by the
``chat.access`` logger), so a server at ``--log-level warning`` pays close to nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Collection, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from contextvars import ContextVar
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from grpclib.const import Cardinality, Status
from grpclib.events import RecvMessage, RecvRequest, SendTrailingMetadata, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError

from chat import logs
from chat._compat import IServable, message_counts
from chat.errors import (
    BackendError,
    ChatError,
    InvalidArgument,
    QuotaExceeded,
    SessionNotFound,
)
from chat.events import Request
from chat.metrics import Metrics
from chat.observe import TurnObservation, TurnOutcome
from chat.store import SessionPage, SessionStore
from chat.types import FinishReason, Message, Session, Usage

if TYPE_CHECKING:
    from grpclib.server import Server, Stream
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from chat.core import ChatCore

__all__ = [
    "Telemetry",
    "TimedStore",
    "grpc_code_name",
    "provider_name",
]

log = logging.getLogger(__name__)
access_log = logging.getLogger("chat.access")

#: ``gen_ai.provider.name`` of each backend (the GenAI conventions' well-known values).
PROVIDERS = {"openai": "openai", "gemini": "gcp.gemini"}
#: Where each provider's calls go when no base URL is configured.
PUBLIC_ENDPOINTS = {
    "openai": "https://api.openai.com",
    "gcp.gemini": "https://generativelanguage.googleapis.com",
}

_OPERATION = "chat"

_GRPC_TYPES = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}

#: Statuses a server span is marked failed for (OpenTelemetry's RPC conventions): the
#: others are the client's doing.
_SERVER_ERRORS = frozenset(
    {
        Status.UNKNOWN,
        Status.DEADLINE_EXCEEDED,
        Status.UNIMPLEMENTED,
        Status.INTERNAL,
        Status.UNAVAILABLE,
        Status.DATA_LOSS,
    }
)


@functools.cache
def _otel() -> Any:
    """OpenTelemetry's API modules, imported once (only when traces are on)."""
    import opentelemetry.context
    import opentelemetry.propagate
    import opentelemetry.trace

    return opentelemetry


def provider_name(backend: str) -> str:
    """``gen_ai.provider.name`` for a backend name.

    >>> provider_name("gemini"), provider_name("echo")
    ('gcp.gemini', 'echo')
    """
    return PROVIDERS.get(backend, backend)


def grpc_code_name(status: Status | int) -> str:
    """The code's name as gRPC's own libraries (and so grpc-ecosystem metrics) write it.

    >>> grpc_code_name(5), grpc_code_name(1)
    ('NotFound', 'Canceled')
    """
    name = (status if isinstance(status, Status) else Status(status)).name
    if name in ("OK", "CANCELLED"):
        return "OK" if name == "OK" else "Canceled"
    return "".join(word.capitalize() for word in name.split("_"))


_CODE_NAMES = {status: grpc_code_name(status) for status in Status}


#: The call the running task handles (set by ``RecvRequest``, read by the other listeners).
_CALL: ContextVar[_Call | None] = ContextVar("chat_grpc_call", default=None)


@functools.cache
def _has_session_id(message_type: Hashable) -> bool:
    """Whether a request message has a ``session_id`` field (asking a upb message for an
    attribute it lacks costs tens of microseconds)."""
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    return fields is not None and "session_id" in fields


def _wall_ns(monotonic: float) -> int:
    """``time.time_ns()`` at the moment ``monotonic`` (a ``time.monotonic()``) was taken."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class _Call:
    """One gRPC call, from ``RecvRequest`` to the end of its task."""

    __slots__ = (
        "code",
        "identity",
        "key",
        "method",
        "request_id",
        "session_id",
        "span",
        "start",
        "stream",
        "trailers",
        "unary",
    )

    def __init__(self, key: tuple[str, str, str], unary: bool, request_id: str) -> None:
        self.key = key
        self.method = key[2]
        self.unary = unary
        self.request_id = request_id
        self.session_id = ""
        self.identity = ""
        self.start = time.monotonic()
        self.span: Span | None = None
        self.stream: Stream[Any, Any] | None = None
        #: The status the handler ended with (None: it did not run, or has not ended).
        self.code: Status | None = None
        #: The status grpclib sent in the trailers.
        self.trailers: Status | None = None


class Telemetry:
    """Metrics (optional), traces (optional) and access logs of one server.

    ``tracer_provider`` is an OpenTelemetry SDK provider (``grpc-chat[otel]``), e.g.
    :func:`chat.tracing.tracer_provider_from_environment`, or one with an in-memory exporter
    in tests. ``provider`` is the ``gen_ai.provider.name`` of the model backend.
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
        provider: str = "",
    ) -> None:
        self.metrics = metrics
        self.provider = provider
        self.tracer: Tracer | None = None
        if tracer_provider is not None:
            from chat._version import __version__

            self.tracer = tracer_provider.get_tracer("chat", __version__)
            _otel()  # imported now (its propagators load entry points), not in the first call
        self._keys: dict[str, tuple[tuple[str, str, str], bool]] = {}
        self._open_calls: set[_Call] = set()
        #: Messages (received, sent) of the calls that ended, by method.
        self._closed_messages: dict[tuple[str, str, str], list[int]] = {}
        self._remote = False
        self._address = ""
        self._port: int | None = None

    @property
    def active(self) -> bool:
        """Whether metrics or traces are on (else only access lines are written)."""
        return self.metrics is not None or self.tracer is not None

    # -- the core's observer ---------------------------------------------------------------

    def turn(self, request: Request, *, received: float, turn_id: str = "") -> TurnObservation:
        return _ObservedTurn(self, request, received, turn_id)

    def watchers_changed(self, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.watchers.inc(delta)

    def replay_evicted(self, events: int) -> None:
        if self.metrics is not None:
            self.metrics.replay_evicted.inc(events)

    def rate_limited(self, scope: str) -> None:
        if self.metrics is not None:
            self.metrics.rate_limited.labels(scope).inc()

    def backend_retry(self, error: BackendError) -> None:
        """A model call is retried after ``error`` (before its first token)."""
        if self.metrics is not None:
            self.metrics.backend_retries.labels(self.provider, type(error).__name__).inc()

    # -- wiring ------------------------------------------------------------------------------

    def wrap_store(self, store: SessionStore) -> SessionStore:
        """``store``, timed when metrics are on."""
        if self.metrics is None:
            return store
        return TimedStore(store, self.metrics)

    def model_server(self, base_url: str = "") -> None:
        """Model calls go over the network, to ``base_url`` (empty: the provider's public
        endpoint): each gets a ``CLIENT`` span, with ``server.address`` and ``server.port``.

        Without this (the echo backend, a backend in the process), a turn has no such span:
        there is no call to trace, and a span costs more than a short reply's metrics.
        """
        self._remote = True
        parts = urlsplit(base_url or PUBLIC_ENDPOINTS.get(self.provider, ""))
        self._address = parts.hostname or ""
        self._port = parts.port

    def install(self, server: Server, handlers: Collection[IServable]) -> None:
        """Watch the calls of ``server`` (add its listeners before any other ``RecvRequest``
        listener, so that calls another refuses are counted too)."""
        for handler in handlers:
            for path, route in handler.__mapping__().items():
                service, _, method = path.lstrip("/").partition("/")
                key = (_GRPC_TYPES[route.cardinality], service, method)
                self._keys[path] = (key, route.cardinality is Cardinality.UNARY_UNARY)
        listen(server, RecvRequest, self._on_request)
        listen(server, RecvMessage, self._on_message)
        listen(server, SendTrailingMetadata, self._on_trailers)

    def bind(self, core: ChatCore) -> None:
        """Let scrapes read ``core``'s state (on the running event loop)."""
        if self.metrics is not None:
            self.metrics.bind(lambda: Metrics.live_counts(core, self.message_counts()))

    def message_counts(self) -> list[tuple[tuple[str, str, str], int, int]]:
        """gRPC messages (received, sent) by method, open calls included."""
        totals = {key: list(pair) for key, pair in self._closed_messages.items()}
        for call in self._open_calls:
            if call.stream is not None:
                received, sent = message_counts(call.stream)
                pair = totals.setdefault(call.key, [0, 0])
                pair[0] += received
                pair[1] += sent
        return [(key, received, sent) for key, (received, sent) in sorted(totals.items())]

    # -- gRPC calls ----------------------------------------------------------------------------

    async def _on_request(self, event: RecvRequest) -> None:
        path = event.method_name
        known = self._keys.get(path)
        if known is None:
            service, _, method = path.lstrip("/").partition("/")
            known = (("unknown", service, method), True)
        key, unary = known
        metadata = event.metadata
        request_id = ""
        if unary:
            request_id = str(metadata.get("x-request-id", "")) or uuid.uuid4().hex[:16]
        call = _Call(key, unary, request_id)
        if self.metrics is not None:
            self.metrics.child(self.metrics.grpc_started, *key).inc()
        # The rest of this task (the handler) logs with the call's context and runs in its
        # span: both are context variables, set here for the handler's task.
        logs.bind(method=call.method, request_id=request_id)
        if self.tracer is not None:
            self._start_span(call, event)
        _CALL.set(call)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: self._call_ended(call))
        handler = event.method_func

        async def observed(stream: Stream[Any, Any], **kwargs: Any) -> None:
            call.stream = stream
            # Known once every RecvRequest listener ran (authentication among them).
            call.identity = logs.current().identity
            self._open_calls.add(call)
            try:
                await handler(stream, **kwargs)
            except GRPCError as error:
                call.code = error.status
                if isinstance(error.__cause__, QuotaExceeded):
                    self.rate_limited(error.__cause__.limit)
                raise
            except (StreamTerminatedError, asyncio.CancelledError):
                call.code = Status.CANCELLED
                raise
            except TimeoutError:
                call.code = Status.DEADLINE_EXCEEDED
                raise
            except Exception:
                call.code = Status.UNKNOWN
                raise
            else:
                call.code = Status.OK

        event.method_func = observed

    def _start_span(self, call: _Call, event: RecvRequest) -> None:
        otel = _otel()
        trace = otel.trace
        assert self.tracer is not None
        parent = otel.propagate.extract(event.metadata)
        _, service, method = call.key
        span = self.tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        call.span = span
        otel.context.attach(trace.set_span_in_context(span, parent))

    async def _on_message(self, event: RecvMessage) -> None:
        call = _CALL.get()
        if call is None or not call.unary or call.session_id:
            return
        message = event.message
        if not _has_session_id(cast(Hashable, type(message))):
            return
        session_id = message.session_id
        if isinstance(session_id, str) and session_id:
            call.session_id = session_id
            logs.bind(session_id=session_id)

    async def _on_trailers(self, event: SendTrailingMetadata) -> None:
        call = _CALL.get()
        if call is not None:
            call.trailers = event.status

    def _call_ended(self, call: _Call) -> None:
        try:
            self._record_call(call)
        except Exception:
            log.exception("could not record the end of a %s call", call.method)

    def _record_call(self, call: _Call) -> None:
        code = call.code or call.trailers or Status.CANCELLED
        seconds = time.monotonic() - call.start
        self._open_calls.discard(call)
        if call.stream is not None:
            received, sent = message_counts(call.stream)
            pair = self._closed_messages.setdefault(call.key, [0, 0])
            pair[0] += received
            pair[1] += sent
        code_name = _CODE_NAMES[code]
        metrics = self.metrics
        if metrics is not None:
            metrics.child(metrics.grpc_handled, *call.key, code_name).inc()
            metrics.child(metrics.grpc_handling, *call.key).observe(seconds)
        span = call.span
        if span is not None:
            trace = _otel().trace
            span.set_attribute("rpc.grpc.status_code", code.value)
            if code in _SERVER_ERRORS:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code_name))
            span.end()
        level = logging.INFO if call.unary else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(
                level,
                "%s %s in %.1f ms",
                call.method,
                code_name,
                seconds * 1000,
                extra={
                    "method": call.method,
                    "session_id": call.session_id,
                    "request_id": call.request_id,
                    "identity": call.identity,
                    logs.ACCESS: {
                        "event": "rpc",
                        "grpc_service": call.key[1],
                        "grpc_code": code_name,
                        "duration_ms": round(seconds * 1000, 3),
                    },
                },
            )

    # -- turns -----------------------------------------------------------------------------------

    def _turn_finished(
        self,
        turn: _ObservedTurn,
        finish_reason: FinishReason,
        usage: Usage | None,
        chunks: int,
        error: ChatError | None,
    ) -> None:
        now = time.monotonic()
        duration = now - turn.received
        if turn.call_started is not None:
            call_error = error if isinstance(error, BackendError) else None
            self._client_call_ended(turn, now - turn.call_started, usage, call_error)
        if error is not None or finish_reason is FinishReason.ERROR:
            outcome = TurnOutcome.ERROR
        elif finish_reason is FinishReason.CANCELLED:
            outcome = TurnOutcome.CANCELLED
        else:
            outcome = TurnOutcome.SUCCESS
        error_type = "" if error is None else type(error).__name__
        reason = finish_reason.name.lower()
        metrics = self.metrics
        if metrics is not None:
            model = metrics.model(turn.model)
            child = metrics.child
            provider = self.provider
            child(metrics.turns, outcome.value, reason, model).inc()
            child(metrics.request_duration, _OPERATION, provider, model, error_type).observe(
                duration
            )
            if outcome is TurnOutcome.SUCCESS and turn.first_at is not None:
                child(metrics.time_to_first_token, _OPERATION, provider, model).observe(
                    turn.first_at - turn.received
                )
                tokens = usage.completion_tokens if usage is not None else chunks
                if tokens > 1:
                    child(metrics.time_per_output_token, _OPERATION, provider, model).observe(
                        (now - turn.first_at) / (tokens - 1)
                    )
        if self.tracer is not None:
            self._record_spans(turn, reason, usage, error, error_type)
        if access_log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "event": "turn",
                "outcome": outcome.value,
                "finish_reason": reason,
                "model": turn.model,
                "duration_ms": round(duration * 1000, 3),
                "chunks": chunks,
            }
            if turn.first_at is not None:
                fields["time_to_first_token_ms"] = round((turn.first_at - turn.received) * 1000, 3)
            if usage is not None:
                fields["input_tokens"] = usage.prompt_tokens
                fields["output_tokens"] = usage.completion_tokens
            if error is not None:
                fields["error_type"] = error_type
                fields["grpc_code"] = _CODE_NAMES[Status(int(error.status))]
            access_log.info(
                "turn %s (%s) in %.1f ms, %d chunks%s",
                outcome.value,
                reason,
                duration * 1000,
                chunks,
                ""
                if usage is None
                else f", {usage.prompt_tokens}+{usage.completion_tokens} tokens",
                extra={
                    "session_id": turn.session_id,
                    "request_id": turn.request_id,
                    "turn_id": turn.turn_id,
                    "identity": turn.identity,
                    logs.ACCESS: fields,
                },
            )

    def _turn_started(self, turn: _ObservedTurn, model: str, omitted: int) -> None:
        # The model is called right after this: the call is timed (and traced) from here to
        # the end of the turn, so that no wrapper sits between the backend and each delta.
        turn.call_started = time.monotonic()
        metrics = self.metrics
        if metrics is not None and omitted:
            metrics.context_truncated.inc()
            metrics.context_omitted.inc(omitted)
        turn.omitted = omitted

    def _record_spans(
        self,
        turn: _ObservedTurn,
        reason: str,
        usage: Usage | None,
        error: ChatError | None,
        error_type: str,
    ) -> None:
        """The turn's span and, with a model server, the model call's, as the turn ends.

        Both are recorded in one go, with the times they started: every attribute given when
        the span is made, no span kept open while the reply streams (setting attributes on
        an open span, or renaming it, costs more than all of a turn's metrics).
        """
        assert self.tracer is not None
        otel = _otel()
        trace = otel.trace
        model = turn.model
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _OPERATION,
            "gen_ai.provider.name": self.provider,
            "gen_ai.conversation.id": turn.session_id,
            "gen_ai.response.finish_reasons": (reason,),
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if turn.omitted:
            attributes["chat.context.omitted_messages"] = turn.omitted
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if error is not None:
            attributes["error.type"] = error_type
        # The client's context for this message, if it sent one; else the stream's span.
        parent = (
            otel.propagate.extract({"traceparent": turn.traceparent}) if turn.traceparent else None
        )
        end = time.time_ns()
        span = self.tracer.start_span(
            f"{_OPERATION} {model}" if model else _OPERATION,
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            start_time=_wall_ns(turn.received),
            attributes=attributes,
        )
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        if self._remote and turn.call_started is not None:
            call: dict[str, Any] = {
                "gen_ai.operation.name": _OPERATION,
                "gen_ai.provider.name": self.provider,
                "gen_ai.request.model": model,
            }
            if self._address:
                call["server.address"] = self._address
                if self._port is not None:
                    call["server.port"] = self._port
            if isinstance(error, BackendError):
                call["error.type"] = error_type
            child = self.tracer.start_span(
                f"{_OPERATION} {model}",
                context=trace.set_span_in_context(span),
                kind=trace.SpanKind.CLIENT,
                start_time=_wall_ns(turn.call_started),
                attributes=call,
            )
            if isinstance(error, BackendError):
                child.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
            child.end(end)
        span.end(end)

    def _client_call_ended(
        self,
        turn: _ObservedTurn,
        seconds: float,
        usage: Usage | None,
        error: BackendError | None,
    ) -> None:
        error_type = "" if error is None else type(error).__name__
        metrics = self.metrics
        if metrics is not None:
            child = metrics.child
            model = metrics.model(turn.model)
            provider = self.provider
            child(
                metrics.client_operation_duration, _OPERATION, provider, model, error_type
            ).observe(seconds)
            if usage is not None:
                tokens = metrics.client_token_usage
                child(tokens, _OPERATION, provider, model, "input").observe(usage.prompt_tokens)
                child(tokens, _OPERATION, provider, model, "output").observe(
                    usage.completion_tokens
                )
            if error is not None:
                status = _CODE_NAMES[Status(int(error.status))]
                child(metrics.backend_errors, provider, error_type, status).inc()


class _ObservedTurn:
    """A turn as :class:`Telemetry` sees it (a :class:`~chat.observe.TurnObservation`)."""

    __slots__ = (
        "_telemetry",
        "call_started",
        "done",
        "first_at",
        "identity",
        "model",
        "omitted",
        "received",
        "request_id",
        "session_id",
        "traceparent",
        "turn_id",
    )

    def __init__(
        self, telemetry: Telemetry, request: Request, received: float, turn_id: str
    ) -> None:
        self._telemetry = telemetry
        self.session_id = request.session_id
        self.request_id = request.request_id
        self.turn_id = turn_id
        # The stream's caller (the turn may end in another task, e.g. a CANCEL's).
        self.identity = logs.current().identity
        self.received = received
        self.model = ""
        self.first_at: float | None = None
        self.done = False
        self.traceparent = request.traceparent
        self.omitted = 0
        #: When the model was called.
        self.call_started: float | None = None

    def running(self) -> AbstractContextManager[None]:
        return _Running(self)

    def started(self, model: str, omitted: int) -> None:
        self.model = model
        self._telemetry._turn_started(self, model, omitted)

    def first_token(self) -> None:
        self.first_at = time.monotonic()

    def finished(
        self,
        finish_reason: FinishReason,
        usage: Usage | None,
        *,
        chunks: int,
        error: ChatError | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        self._telemetry._turn_finished(self, finish_reason, usage, chunks, error)


class _Running:
    """While a turn runs: its log context; a cancellation ends it as cancelled."""

    __slots__ = ("_bound", "_turn")

    def __init__(self, turn: _ObservedTurn) -> None:
        self._turn = turn
        self._bound = logs.bound(
            session_id=turn.session_id, request_id=turn.request_id, turn_id=turn.turn_id
        )

    def __enter__(self) -> None:
        self._bound.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bound.__exit__(exc_type, exc, tb)
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self._turn.finished(FinishReason.CANCELLED, None, chunks=0)


# -- the store and the backend, observed ------------------------------------------------------


#: Errors that answer a request rather than say the store failed (and cancellation).
_STORE_ANSWERS = (SessionNotFound, InvalidArgument, ValueError, asyncio.CancelledError)


class TimedStore:
    """A :class:`~chat.store.SessionStore` whose operations are timed and their failures
    counted (``chat_store_operation_duration_seconds``, ``chat_store_errors_total``).

    Attributes that are not store operations are those of the wrapped store. Each operation
    awaits the store's own coroutine directly (no coroutine in between): a turn makes several.
    """

    def __init__(self, store: SessionStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._kind = store.kind
        self._timers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @property
    def kind(self) -> str:
        return self._store.kind

    @property
    def location(self) -> str:
        return self._store.location

    def _done(self, operation: str, started: float) -> None:
        timer = self._timers.get(operation)
        if timer is None:
            timer = self._timers[operation] = self._metrics.store_duration.labels(
                self._kind, operation
            )
        timer.observe(time.perf_counter() - started)

    def _failed(self, operation: str, started: float, error: BaseException) -> None:
        self._done(operation, started)
        if not isinstance(error, _STORE_ANSWERS):
            self._metrics.store_errors.labels(self._kind, operation, type(error).__name__).inc()

    async def open(self) -> None:
        await self._store.open()

    async def aclose(self) -> None:
        await self._store.aclose()

    async def create(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            await self._store.create(*args, **kwargs)
        except BaseException as error:
            self._failed("create", started, error)
            raise
        self._done("create", started)

    async def get(self, *args: Any, **kwargs: Any) -> Session:
        started = time.perf_counter()
        try:
            result = await self._store.get(*args, **kwargs)
        except BaseException as error:
            self._failed("get", started, error)
            raise
        self._done("get", started)
        return result

    async def update(self, *args: Any, **kwargs: Any) -> Session:
        started = time.perf_counter()
        try:
            result = await self._store.update(*args, **kwargs)
        except BaseException as error:
            self._failed("update", started, error)
            raise
        self._done("update", started)
        return result

    async def delete(self, *args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            result = await self._store.delete(*args, **kwargs)
        except BaseException as error:
            self._failed("delete", started, error)
            raise
        self._done("delete", started)
        return result

    async def list_sessions(self, *args: Any, **kwargs: Any) -> SessionPage:
        started = time.perf_counter()
        try:
            result = await self._store.list_sessions(*args, **kwargs)
        except BaseException as error:
            self._failed("list_sessions", started, error)
            raise
        self._done("list_sessions", started)
        return result

    async def count(self, *args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            result = await self._store.count(*args, **kwargs)
        except BaseException as error:
            self._failed("count", started, error)
            raise
        self._done("count", started)
        return result

    async def messages(self, *args: Any, **kwargs: Any) -> list[Message]:
        started = time.perf_counter()
        try:
            result = await self._store.messages(*args, **kwargs)
        except BaseException as error:
            self._failed("messages", started, error)
            raise
        self._done("messages", started)
        return result

    async def read(self, *args: Any, **kwargs: Any) -> tuple[Session, list[Message]]:
        started = time.perf_counter()
        try:
            result = await self._store.read(*args, **kwargs)
        except BaseException as error:
            self._failed("read", started, error)
            raise
        self._done("read", started)
        return result

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        started = time.perf_counter()
        try:
            result = await self._store.append(session_id, messages)
        except BaseException as error:
            self._failed("append", started, error)
            raise
        self._done("append", started)
        return result

    async def trim(self, *args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            result = await self._store.trim(*args, **kwargs)
        except BaseException as error:
            self._failed("trim", started, error)
            raise
        self._done("trim", started)
        return result

    async def evict(self, *args: Any, **kwargs: Any) -> list[str]:
        started = time.perf_counter()
        try:
            result = await self._store.evict(*args, **kwargs)
        except BaseException as error:
            self._failed("evict", started, error)
            raise
        self._done("evict", started)
        return result

    async def expire(self, idle_before: datetime) -> list[str]:
        started = time.perf_counter()
        try:
            result = await self._store.expire(idle_before)
        except BaseException as error:
            self._failed("expire", started, error)
            raise
        self._done("expire", started)
        return result

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return _TimedLock(self, self._store.lock(session_id))


class _TimedLock:
    """A session lock, timed until it is held: how long turns wait for each other (and for
    the store). A class, not a generator: one is taken per turn."""

    __slots__ = ("_lock", "_store")

    def __init__(self, store: TimedStore, lock: AbstractAsyncContextManager[None]) -> None:
        self._store = store
        self._lock = lock

    async def __aenter__(self) -> None:
        started = time.perf_counter()
        try:
            await self._lock.__aenter__()
        except BaseException as error:
            self._store._failed("lock", started, error)
            raise
        self._store._done("lock", started)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._lock.__aexit__(exc_type, exc, tb)

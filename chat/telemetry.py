"""What a server reports about itself: metrics, traces and access logs, in one place.

:class:`Telemetry` is the :class:`~chat.observe.Observer` a :class:`~chat.server.ChatServer`
gives its core, and it watches the gRPC calls through grpclib's event listeners
(:meth:`Telemetry.install`): ``RecvRequest`` starts a call (its span, continuing a client's
``traceparent``; its log context; ``grpc_server_started_total``), ``RecvMessage`` reads the
session id of unary requests, ``SendTrailingMetadata`` sees the status sent, and the end of
the call's task ends it (``grpc_server_handled_total``, the access line). Message counts are
read from grpclib's streams at scrape time, so that no listener sits on the path of each
message sent (which would stop replies from being written in batches).

Store operations are timed by :class:`TimedStore` and model calls observed by
:class:`ObservedBackend`, wrappers the server puts around its store and backend when metrics
or traces are on. With both off, only access lines are written (at INFO, by the
``chat.access`` logger), so a server at ``--log-level warning`` pays close to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, aclosing
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from grpclib.const import Cardinality, Status
from grpclib.events import RecvMessage, RecvRequest, SendTrailingMetadata, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError

from chat import logs
from chat._compat import IServable, message_counts
from chat.backends import Delta, GenerationRequest, ModelBackend
from chat.errors import BackendError, ChatError, InvalidArgument, SessionNotFound
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
    "ObservedBackend",
    "Telemetry",
    "TimedStore",
    "grpc_code_name",
    "provider_name",
]

log = logging.getLogger(__name__)
access_log = logging.getLogger("chat.access")

#: ``gen_ai.provider.name`` of each backend (the GenAI conventions' well-known values).
PROVIDERS = {"openai": "openai", "gemini": "gcp.gemini"}

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


def _wall_ns(monotonic: float) -> int:
    """``time.time_ns()`` at the moment ``monotonic`` (a ``time.monotonic()``) was taken."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class _Call:
    """One gRPC call, from ``RecvRequest`` to the end of its task."""

    __slots__ = (
        "code",
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
        self._keys: dict[str, tuple[tuple[str, str, str], bool]] = {}
        self._open_calls: set[_Call] = set()
        #: Messages (received, sent) of the calls that ended, by method.
        self._closed_messages: dict[tuple[str, str, str], list[int]] = {}

    @property
    def active(self) -> bool:
        """Whether metrics or traces are on (else only access lines are written)."""
        return self.metrics is not None or self.tracer is not None

    # -- the core's observer ---------------------------------------------------------------

    def turn(self, request: Request, *, received: float) -> TurnObservation:
        return _ObservedTurn(self, request, received)

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

    def wrap_backend(self, backend: ModelBackend, *, base_url: str = "") -> ModelBackend:
        """``backend``, observed (client metrics, the model call's span) when either is on."""
        if not self.active:
            return backend
        return ObservedBackend(backend, self, base_url=base_url)

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
            self.metrics.grpc_started.labels(*key).inc()
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
            self._open_calls.add(call)
            try:
                await handler(stream, **kwargs)
            except GRPCError as error:
                call.code = error.status
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
        from opentelemetry import context, propagate, trace

        assert self.tracer is not None
        parent = propagate.extract(event.metadata)
        _, service, method = call.key
        span = self.tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        call.span = span
        context.attach(trace.set_span_in_context(span, parent))

    async def _on_message(self, event: RecvMessage) -> None:
        call = _CALL.get()
        if call is None or not call.unary or call.session_id:
            return
        session_id = getattr(event.message, "session_id", "")
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
            metrics.grpc_handled.labels(*call.key, code_name).inc()
            metrics.grpc_handling.labels(*call.key).observe(seconds)
        span = call.span
        if span is not None:
            from opentelemetry.trace import Status as SpanStatus
            from opentelemetry.trace import StatusCode

            span.set_attribute("rpc.grpc.status_code", code.value)
            if code in _SERVER_ERRORS:
                span.set_status(SpanStatus(StatusCode.ERROR, code_name))
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
            labels = (_OPERATION, self.provider, model)
            metrics.turns.labels(outcome.value, reason, model).inc()
            metrics.request_duration.labels(*labels, error_type).observe(duration)
            if outcome is TurnOutcome.SUCCESS and turn.first_at is not None:
                metrics.time_to_first_token.labels(*labels).observe(turn.first_at - turn.received)
                tokens = usage.completion_tokens if usage is not None else chunks
                if tokens > 1:
                    metrics.time_per_output_token.labels(*labels).observe(
                        (now - turn.first_at) / (tokens - 1)
                    )
        span = turn.span
        if span is not None:
            from opentelemetry.trace import Status as SpanStatus
            from opentelemetry.trace import StatusCode

            span.set_attribute("gen_ai.response.finish_reasons", (reason,))
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if error is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(SpanStatus(StatusCode.ERROR, error.message))
            span.end()
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
                    logs.ACCESS: fields,
                },
            )

    def _turn_started(self, turn: _ObservedTurn, model: str, omitted: int) -> None:
        metrics = self.metrics
        if metrics is not None and omitted:
            metrics.context_truncated.inc()
            metrics.context_omitted.inc(omitted)
        span = turn.span
        if span is not None:
            span.update_name(f"{_OPERATION} {model}")
            span.set_attribute("gen_ai.request.model", model)
            if omitted:
                span.set_attribute("chat.context.omitted_messages", omitted)

    def _turn_span(self, turn: _ObservedTurn, traceparent: str) -> Span | None:
        if self.tracer is None:
            return None
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        # The client's context for this message, if it sent one; else the stream's span.
        parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
        return self.tracer.start_span(
            _OPERATION,
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=_wall_ns(turn.received),
            attributes={
                "gen_ai.operation.name": _OPERATION,
                "gen_ai.provider.name": self.provider,
                "gen_ai.conversation.id": turn.session_id,
                "chat.request_id": turn.request_id,
            },
        )

    # -- model calls -----------------------------------------------------------------------------

    def _client_span(self, request: GenerationRequest, address: str, port: int | None) -> Any:
        if self.tracer is None:
            return None
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _OPERATION,
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": request.model,
        }
        if address:
            attributes["server.address"] = address
            if port is not None:
                attributes["server.port"] = port
        return self.tracer.start_span(
            f"{_OPERATION} {request.model}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def _client_call_ended(
        self,
        request: GenerationRequest,
        seconds: float,
        usage: Usage | None,
        finish: FinishReason | None,
        error: BaseException | None,
        span: Any,
    ) -> None:
        error_type = "" if error is None else type(error).__name__
        metrics = self.metrics
        if metrics is not None:
            labels = (_OPERATION, self.provider, metrics.model(request.model))
            metrics.client_operation_duration.labels(*labels, error_type).observe(seconds)
            if usage is not None:
                metrics.client_token_usage.labels(*labels, "input").observe(usage.prompt_tokens)
                metrics.client_token_usage.labels(*labels, "output").observe(
                    usage.completion_tokens
                )
            if error is not None:
                status = (
                    Status(int(error.status)) if isinstance(error, ChatError) else Status.UNKNOWN
                )
                metrics.backend_errors.labels(self.provider, error_type, _CODE_NAMES[status]).inc()
        if span is not None:
            from opentelemetry.trace import Status as SpanStatus
            from opentelemetry.trace import StatusCode

            if finish is not None:
                span.set_attribute("gen_ai.response.finish_reasons", (finish.name.lower(),))
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if error is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(SpanStatus(StatusCode.ERROR, str(error)))
            span.end()


class _ObservedTurn:
    """A turn as :class:`Telemetry` sees it (a :class:`~chat.observe.TurnObservation`)."""

    __slots__ = (
        "_telemetry",
        "done",
        "first_at",
        "model",
        "received",
        "request_id",
        "session_id",
        "span",
    )

    def __init__(self, telemetry: Telemetry, request: Request, received: float) -> None:
        self._telemetry = telemetry
        self.session_id = request.session_id
        self.request_id = request.request_id
        self.received = received
        self.model = ""
        self.first_at: float | None = None
        self.done = False
        self.span = telemetry._turn_span(self, request.traceparent)

    def running(self) -> AbstractContextManager[None]:
        return self._running()

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with logs.bound(session_id=self.session_id, request_id=self.request_id):
            token = None
            if self.span is not None:
                from opentelemetry import context, trace

                token = context.attach(trace.set_span_in_context(self.span))
            try:
                yield
            except asyncio.CancelledError:
                self.finished(FinishReason.CANCELLED, None, chunks=0)
                raise
            finally:
                if token is not None:
                    from opentelemetry import context

                    context.detach(token)

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


# -- the store and the backend, observed ------------------------------------------------------


#: Errors that answer a request rather than say the store failed (and cancellation).
_STORE_ANSWERS = (SessionNotFound, InvalidArgument, ValueError, asyncio.CancelledError)


class TimedStore:
    """A :class:`~chat.store.SessionStore` whose operations are timed and their failures
    counted (``chat_store_operation_duration_seconds``, ``chat_store_errors_total``).

    Attributes that are not store operations are those of the wrapped store.
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

    def _observe(self, operation: str, started: float, error: BaseException | None) -> None:
        timer = self._timers.get(operation)
        if timer is None:
            timer = self._timers[operation] = self._metrics.store_duration.labels(
                self._kind, operation
            )
        timer.observe(time.perf_counter() - started)
        if error is not None and not isinstance(error, _STORE_ANSWERS):
            self._metrics.store_errors.labels(self._kind, operation, type(error).__name__).inc()

    async def _timed(self, operation: str, call: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await call
        except BaseException as error:
            self._observe(operation, started, error)
            raise
        self._observe(operation, started, None)
        return result

    async def open(self) -> None:
        await self._store.open()

    async def aclose(self) -> None:
        await self._store.aclose()

    async def create(self, session: Session, *args: Any, **kwargs: Any) -> None:
        await self._timed("create", self._store.create(session, *args, **kwargs))

    async def get(self, session_id: str, *args: Any, **kwargs: Any) -> Session:
        result: Session = await self._timed("get", self._store.get(session_id, *args, **kwargs))
        return result

    async def update(self, *args: Any, **kwargs: Any) -> Session:
        result: Session = await self._timed("update", self._store.update(*args, **kwargs))
        return result

    async def delete(self, *args: Any, **kwargs: Any) -> int:
        result: int = await self._timed("delete", self._store.delete(*args, **kwargs))
        return result

    async def list_sessions(self, *args: Any, **kwargs: Any) -> SessionPage:
        call = self._store.list_sessions(*args, **kwargs)
        result: SessionPage = await self._timed("list_sessions", call)
        return result

    async def count(self, *args: Any, **kwargs: Any) -> int:
        result: int = await self._timed("count", self._store.count(*args, **kwargs))
        return result

    async def messages(self, *args: Any, **kwargs: Any) -> list[Message]:
        result: list[Message] = await self._timed("messages", self._store.messages(*args, **kwargs))
        return result

    async def read(self, *args: Any, **kwargs: Any) -> tuple[Session, list[Message]]:
        result: tuple[Session, list[Message]] = await self._timed(
            "read", self._store.read(*args, **kwargs)
        )
        return result

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        result: Session = await self._timed("append", self._store.append(session_id, messages))
        return result

    async def trim(self, *args: Any, **kwargs: Any) -> int:
        result: int = await self._timed("trim", self._store.trim(*args, **kwargs))
        return result

    async def evict(self, *args: Any, **kwargs: Any) -> list[str]:
        result: list[str] = await self._timed("evict", self._store.evict(*args, **kwargs))
        return result

    async def expire(self, idle_before: datetime) -> list[str]:
        result: list[str] = await self._timed("expire", self._store.expire(idle_before))
        return result

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._lock(session_id)

    @contextlib.asynccontextmanager
    async def _lock(self, session_id: str) -> AsyncGenerator[None, None]:
        # Timed until it is held: how long turns wait for each other (and for the store).
        lock = self._store.lock(session_id)
        started = time.perf_counter()
        try:
            await lock.__aenter__()
        except BaseException as error:
            self._observe("lock", started, error)
            raise
        self._observe("lock", started, None)
        try:
            yield
        except BaseException as error:
            if not await lock.__aexit__(type(error), error, error.__traceback__):
                raise
        else:
            await lock.__aexit__(None, None, None)


class ObservedBackend:
    """A :class:`~chat.backends.ModelBackend` whose calls are measured and traced: the GenAI
    client metrics (operation duration, token usage), backend errors, and a ``CLIENT`` span
    for each call, a child of the turn's."""

    def __init__(self, backend: ModelBackend, telemetry: Telemetry, *, base_url: str = "") -> None:
        self._backend = backend
        self._telemetry = telemetry
        parts = urlsplit(base_url) if base_url else None
        self._address = (parts.hostname or "") if parts is not None else ""
        self._port = parts.port if parts is not None else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def default_model(self) -> str:
        return self._backend.default_model

    async def list_models(self) -> Sequence[str] | None:
        return await self._backend.list_models()

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        telemetry = self._telemetry
        span = telemetry._client_span(request, self._address, self._port)
        started = time.perf_counter()
        usage: Usage | None = None
        finish: FinishReason | None = None
        failure: BaseException | None = None
        try:
            async with aclosing(self._backend.generate(request)) as deltas:
                async for delta in deltas:
                    if delta.usage is not None:
                        usage = delta.usage
                    if delta.finish_reason is not None:
                        finish = delta.finish_reason
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            # Closed by the turn (a CANCEL, the client going away): not the model's failure.
            raise
        except Exception as error:
            failure = error
            raise
        finally:
            telemetry._client_call_ended(
                request, time.perf_counter() - started, usage, finish, failure, span
            )

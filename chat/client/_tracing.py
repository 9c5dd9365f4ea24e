"""The caller's trace context on what the client sends, when OpenTelemetry is installed.

With the OpenTelemetry API installed and a span current (the application traces), each call
carries the W3C ``traceparent`` as metadata (:func:`send_trace_context`), and each MESSAGE
and RETRY carries it in ``ChatRequest.traceparent`` (:func:`current_traceparent`): the
``Chat`` stream is opened once per connection, so its metadata cannot tell the server which
of the caller's operations a message belongs to. Without OpenTelemetry, or with no span
current, nothing is added.
"""

from __future__ import annotations

from grpclib.client import Channel
from grpclib.events import SendRequest, listen

try:
    from opentelemetry import propagate
except ImportError:  # the otel extra is not installed: the client sends no trace context
    propagate = None  # type: ignore[assignment]

__all__ = ["current_traceparent", "send_trace_context"]


async def _inject(event: SendRequest) -> None:
    propagate.inject(event.metadata)


def send_trace_context(channel: Channel) -> None:
    """Send the current trace context with every call made on ``channel``."""
    if propagate is not None:
        listen(channel, SendRequest, _inject)


def current_traceparent() -> str:
    """The ``traceparent`` of the current span, or ``""``."""
    if propagate is None:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")

"""OpenTelemetry traces (``pip install 'grpc-chat[otel]'``, ``chat-server --otel``).

:func:`tracer_provider_from_environment` builds the SDK's tracer provider the way the
standard ``OTEL_*`` variables say: ``OTEL_SERVICE_NAME`` (default ``grpc-chat``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_EXPORTER`` (``otlp``, the
default, ``console`` or ``none``) and the OTLP exporter's ``OTEL_EXPORTER_OTLP_*`` (endpoint,
headers, timeout, certificates; OTLP over HTTP with protobuf, port 4318 by default).

What the server records with it (:mod:`chat.telemetry`): a span per RPC (continuing the
``traceparent`` a client sent), a span per turn with the GenAI conventions' ``gen_ai.*``
attributes, and the model call as its child.
"""

from __future__ import annotations

import os

from chat._version import __version__
from chat.errors import ConfigurationError, MissingExtra

try:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
except ImportError as error:  # pragma: no cover - exercised by the MissingExtra test
    raise MissingExtra("tracing (--otel)", "otel") from error

__all__ = ["TRACES_EXPORTERS", "tracer_provider_from_environment"]

#: The values of ``OTEL_TRACES_EXPORTER`` understood here.
TRACES_EXPORTERS = ("otlp", "console", "none")


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol not in ("", "http/protobuf"):
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: the server exports OTLP over HTTP "
            "(http/protobuf) only; point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's "
            "HTTP port (4318)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:  # pragma: no cover - the extra installs it
        raise MissingExtra("the OTLP exporter", "otel") from error
    return OTLPSpanExporter()


def tracer_provider_from_environment() -> TracerProvider:
    """A tracer provider configured by the ``OTEL_*`` environment variables.

    Raises :class:`~chat.errors.ConfigurationError` for an exporter or protocol it does not
    support. The caller shuts it down (which flushes the spans not exported yet).
    """
    names = [
        n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()
    ]
    unknown = [n for n in names if n not in TRACES_EXPORTERS]
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not supported here; "
            f"choose {', '.join(TRACES_EXPORTERS)}"
        )
    attributes = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or "grpc-chat",
        "service.version": __version__,
    }
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        exporter = _exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider

"""Traces of an MCP server, exported as the standard OTEL_* variables say; nothing is installed when they say nothing.

The `mcp` SDK opens a span for every request, in the caller's trace when the request's `_meta` carries a
`traceparent`; `span` adds the server's own operations beneath it. The orchestrator passes its OTEL_* variables to
the stdio servers it starts; a server started by hand reads its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

TRACER = trace.get_tracer("tiny-backspace.servers")


def setup(service_name: str) -> bool:
    """Export this server's spans if OTEL_TRACES_EXPORTER or an OTLP endpoint asks for it; False when not."""
    env = os.environ
    kinds = [k.strip() for k in env.get("OTEL_TRACES_EXPORTER", "").lower().split(",") if k.strip() != "none"]
    if not env.get("OTEL_TRACES_EXPORTER"):
        kinds = ["otlp"] if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") \
            else []
    if not kinds or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or
                                                        service_name}))
    for kind in kinds:
        if kind == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
        elif kind == "console":
            exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout may be the MCP wire
        else:
            raise SystemExit(f"OTEL_TRACES_EXPORTER={kind!r}: use otlp, console or none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # flushed at exit by the SDK
    return True


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A span under the current request's; a failure sets `error.type` only, since messages may quote input."""
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with TRACER.start_as_current_span(name, attributes=attrs, record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_attribute("error.type", type(exc).__qualname__)
            current.set_status(StatusCode.ERROR)
            raise

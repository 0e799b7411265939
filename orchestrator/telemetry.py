"""Traces and metrics, set up once from the standard OTEL_* variables; off, and costless, when they name no exporter.

One trace per run: `run` → `invoke_agent <role>` → `chat <model>` and `execute_tool <tool>`; the `mcp` SDK's client
span sits under each tool span and carries the trace into the server (`_meta.traceparent`), whose spans join it.

    OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER   otlp | console | none (default: otlp once an endpoint is set)
    OTEL_EXPORTER_OTLP_ENDPOINT                   e.g. http://localhost:4318 (OTLP over HTTP/protobuf)
    OTEL_SERVICE_NAME                             default: tiny-backspace
    TB_TRACE_CONTENT=1                            prompts, model output and tool input/output on spans

Until `setup` installs a provider, the API's no-op tracer and meter answer every call. Every exported span passes
the run's one redaction step first (`RedactingExporter`), content or not.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, StatusCode, TraceFlags

from common.redact import Redactor

SERVICE = "tiny-backspace"
CONTENT_CHARS = 16_000  # the most of one prompt or tool output a span holds: its head and tail

TRACER = trace.get_tracer("tiny-backspace")
METER = metrics.get_meter("tiny-backspace")
RUNS = METER.create_counter("tb.runs", unit="{run}", description="Finished runs, by outcome.")
RUN_DURATION = METER.create_histogram("tb.run.duration", unit="s", description="Wall-clock time of a run.")
TOOL_DURATION = METER.create_histogram("tb.tool.duration", unit="s", description="Latency of MCP tool calls.")
TOKENS = METER.create_counter("tb.tokens", unit="{token}", description="Model tokens, by gen_ai.token.type.")
SANDBOXES = METER.create_up_down_counter("tb.sandboxes.alive", unit="{sandbox}",
                                         description="Sandboxes created by runs and not yet destroyed.")

_state: dict[str, Any] = {"installed": False, "content": False, "providers": []}


def exporters_for(signal: str, env: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_* in `env` ask for, for "traces" or "metrics": [] when none."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        return ["otlp"] if endpoint else []
    kinds = [k.strip() for k in raw.split(",") if k.strip() not in ("", "none")]
    unknown = set(kinds) - {"otlp", "console"}
    if unknown:
        raise SystemExit(f"OTEL_{signal.upper()}_EXPORTER={raw!r}: use otlp, console or none")
    return kinds


def otlp_endpoint(signal: str, env: Mapping[str, str]) -> str:
    """Where OTLP/HTTP sends `signal`, as the OTLP exporter specification derives it."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific:
        return specific
    return (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/") + f"/v1/{signal}"


def setup(service_name: str = SERVICE, env: Mapping[str, str] | None = None, *, redact: Redactor | None = None,
          span_exporters: Sequence[Any] = (), metric_readers: Sequence[Any] = ()) -> bool:
    """Install tracing and metrics as `env` (os.environ) asks, once per process; False when nothing is exported.

    `span_exporters` and `metric_readers` are added to those the environment names (tests pass in-memory ones).
    """
    if _state["installed"]:
        return True
    env = os.environ if env is None else env
    traces, meters = exporters_for("traces", env), exporters_for("metrics", env)
    if not (traces or meters or span_exporters or metric_readers):
        return False
    # The SDK loads only when something is exported.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    redact = redact or Redactor()
    providers: list[Any] = []
    if traces or span_exporters:
        tracer_provider = TracerProvider(resource=resource)
        for kind in traces:
            if kind == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=otlp_endpoint("traces", env))
            else:
                exporter = ConsoleSpanExporter()
            tracer_provider.add_span_processor(BatchSpanProcessor(RedactingExporter(exporter, redact)))
        for exporter in span_exporters:
            tracer_provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(exporter, redact)))
        trace.set_tracer_provider(tracer_provider)
        providers.append(tracer_provider)
    if meters or metric_readers:
        readers = list(metric_readers)
        for kind in meters:
            if kind == "otlp":
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(
                    endpoint=otlp_endpoint("metrics", env))))
            else:
                readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        providers.append(meter_provider)
    _state.update(installed=True, content=env.get("TB_TRACE_CONTENT") == "1", providers=providers)
    return True


def flush(timeout_s: float = 5.0) -> None:
    """Export what is buffered now (the providers also flush at exit)."""
    for provider in _state["providers"]:
        provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop the providers; spans and measurements after this are dropped."""
    for provider in _state["providers"]:
        provider.shutdown()


class RedactingExporter:
    """A span exporter that hands `inner` each span with its name, attributes, events and status redacted."""

    def __init__(self, inner: Any, redact: Redactor):
        self.inner = inner
        self.redact = redact

    def export(self, spans: Sequence[Any]) -> Any:
        return self.inner.export([self._clean(s) for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def _clean(self, span: Any) -> Any:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import Status

        status = span.status
        if status.description:
            status = Status(status.status_code, self.redact(status.description))
        return ReadableSpan(
            name=self.redact(span.name), context=span.context, parent=span.parent, resource=span.resource,
            attributes=self._attributes(span.attributes), links=span.links, kind=span.kind, status=status,
            events=[Event(e.name, self._attributes(e.attributes), e.timestamp) for e in span.events],
            start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)

    def _attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            if isinstance(value, str):
                return self.redact(value)
            if isinstance(value, (tuple, list)):
                return tuple(self.redact(v) if isinstance(v, str) else v for v in value)
            return value

        return {k: clean(v) for k, v in (attributes or {}).items()}


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, kind: SpanKind = SpanKind.INTERNAL
         ) -> Iterator[Span]:
    """A span, current inside the block; an exception leaving it sets `error.type` and the error status."""
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with TRACER.start_as_current_span(name, kind=kind, attributes=attrs) as current:
        try:
            yield current
        except Exception as exc:
            current.set_attribute("error.type", type(exc).__qualname__)
            raise
        except BaseException as exc:
            # A cancelled call (deadline, client gone) is not an exception to OpenTelemetry; still say so.
            if not isinstance(exc, GeneratorExit):
                current.set_attribute("error.type", type(exc).__qualname__)
                current.set_status(StatusCode.ERROR, type(exc).__qualname__)
            raise


@contextmanager
def untraced() -> Iterator[None]:
    """Calls in this block are not traced, in this process or in the MCP servers (an unsampled parent)."""
    parent = NonRecordingSpan(SpanContext(trace_id=1, span_id=1, is_remote=False, trace_flags=TraceFlags(0)))
    token = context.attach(trace.set_span_in_context(parent))
    try:
        yield
    finally:
        context.detach(token)


def record_content(target: Span, key: str, value: Any) -> None:
    """Put prompt or tool content on a span, only with TB_TRACE_CONTENT=1; the exporter redacts it."""
    if not (_state["content"] and target.is_recording()):
        return
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=_plain)
    if len(text) > CONTENT_CHARS:
        half = CONTENT_CHARS // 2
        text = f"{text[:half]} … [{len(text) - 2 * half} characters dropped] … {text[-half:]}"
    target.set_attribute(key, text)


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(mode="json", exclude_none=True) if dump else str(value)


@dataclass
class RunTrace:
    """The root span of a run: `trace_id` for the `run` event, and the `outcome` to record when it ends."""

    trace_id: str | None
    outcome: str = "cancelled"  # until the run says otherwise


@contextmanager
def run_span(run_id: str, repo: str, **attributes: Any) -> Iterator[RunTrace]:
    """The root `run` span of one run; on the way out it counts the run by outcome and records its duration."""
    started = time.monotonic()
    attrs = {"tb.run.id": run_id, "tb.repository": repo, **{f"tb.run.{k}": v for k, v in attributes.items()}}
    # A root whatever is current: one trace per run.
    with TRACER.start_as_current_span("run", context=context.Context(), attributes=attrs) as root:
        ctx = root.get_span_context()
        run = RunTrace(format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None)
        try:
            yield run
        except Exception:
            run.outcome = "error"
            raise
        finally:
            root.set_attribute("tb.run.outcome", run.outcome)
            if run.outcome == "error":
                root.set_status(StatusCode.ERROR, "the run failed")
            labels = {"tb.run.outcome": run.outcome}
            RUNS.add(1, labels)
            RUN_DURATION.record(time.monotonic() - started, labels)


@contextmanager
def sandbox_span(operation: str, **attributes: Any) -> Iterator[Span]:
    """`sandbox.create` or `sandbox.destroy`. A sandbox counts as alive from a creation that succeeds until its
    run lets go of it by destroying it, however that ends (the server's reaper is the backstop)."""
    with span(f"sandbox.{operation}", {f"tb.sandbox.{k}": v for k, v in attributes.items()}) as current:
        try:
            yield current
        finally:
            if operation == "destroy":
                SANDBOXES.add(-1)
    if operation == "create":
        SANDBOXES.add(1)


@contextmanager
def agent_span(agent: str, model: str, system: str, brief: str) -> Iterator[Span]:
    """`invoke_agent <agent>`: one agent of a run, from its brief to its hand-over."""
    with span(f"invoke_agent {agent}", {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                                        "gen_ai.request.model": model}) as current:
        record_content(current, "gen_ai.system_instructions", system)
        record_content(current, "tb.agent.brief", brief)
        yield current


@contextmanager
def model_span(model: str, max_tokens: int, messages: list[dict[str, Any]]) -> Iterator[Span]:
    """`chat <model>`: one model call (retries included), with the GenAI semantic conventions' attributes."""
    with span(f"chat {model}", {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                                "gen_ai.request.model": model, "gen_ai.request.max_tokens": max_tokens},
              SpanKind.CLIENT) as current:
        record_content(current, "gen_ai.input.messages", messages)
        yield current


TOKEN_TYPES = {"input_tokens": ("input", "gen_ai.usage.input_tokens"),
               "output_tokens": ("output", "gen_ai.usage.output_tokens"),
               "cache_read_input_tokens": ("cache_read", "gen_ai.usage.cache_read.input_tokens"),
               "cache_creation_input_tokens": ("cache_creation", "gen_ai.usage.cache_creation.input_tokens")}


def record_response(target: Span, model: str, usage: Mapping[str, int], stop_reason: str | None,
                    content: Any = None, response_id: str | None = None, response_model: str | None = None) -> None:
    """A model call's result on its span (tokens, stop reason), and its tokens in the `tb.tokens` metric."""
    for key, (kind, attribute) in TOKEN_TYPES.items():
        count = usage.get(key, 0)
        target.set_attribute(attribute, count)
        if count:
            TOKENS.add(count, {"gen_ai.token.type": kind, "gen_ai.request.model": model})
    target.set_attribute("gen_ai.response.finish_reasons", (stop_reason or "",))
    if response_id:
        target.set_attribute("gen_ai.response.id", response_id)
    if response_model:
        target.set_attribute("gen_ai.response.model", response_model)
    record_content(target, "gen_ai.output.messages", content)


class ToolCall:
    """The span of one MCP tool call, told how the call came out."""

    def __init__(self, current: Span):
        self.span = current
        self.error: str | None = None

    def done(self, is_error: bool, output: Any) -> None:
        if is_error:
            self.error = "tool_error"
            self.span.set_attribute("error.type", "tool_error")
            self.span.set_status(StatusCode.ERROR)
        record_content(self.span, "gen_ai.tool.call.result", output)


@contextmanager
def tool_span(server: str, tool: str, arguments: Mapping[str, Any]) -> Iterator[ToolCall]:
    """`execute_tool <tool>`: one MCP tool call, its latency recorded in `tb.tool.duration` by server and tool."""
    started = time.monotonic()
    labels = {"tb.mcp.server": server, "gen_ai.tool.name": tool}
    with span(f"execute_tool {tool}", {"gen_ai.operation.name": "execute_tool", **labels}) as current:
        call = ToolCall(current)
        record_content(current, "gen_ai.tool.call.arguments", arguments)
        try:
            yield call
        except BaseException as exc:
            call.error = type(exc).__qualname__
            raise
        finally:
            TOOL_DURATION.record(time.monotonic() - started,
                                 {**labels, "error.type": call.error} if call.error else labels)

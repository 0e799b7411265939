"""Traces and metrics of a run: one trace from the `run` span through the agents, the model and the tool calls into
both MCP servers (the sandbox over stdio, the github server over streamable HTTP), seen in memory and as the
OTLP/HTTP protobuf a collector receives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import telemetry
from orchestrator.config import Settings
from orchestrator.events import EventLog
from orchestrator.mcp_pool import ToolPool, load_config
from orchestrator.model import AnthropicModel
from orchestrator.run import RunRequest, Services, execute, new_run_id
from tests.conftest import git
from tests.fakes.messages_api import messages_api
from tests.fakes.otlp import OTLPReceiver, otlp_receiver

from .conftest import API_KEY, FAST, GITHUB_TOKEN, free_port, of_type
from .test_run import BUGGY
from .test_team import coder, planner, reviewer

ROOT = Path(__file__).resolve().parents[2]
PLANTED = "ghp_" + "P" * 36  # a token in the prompt: prompts are on spans here, and must come out redacted
PROMPT = f"Fix add(); its test fails. Do not print the CI token {PLANTED}."
SERVICE = "tb-orchestrator-test"
SERVERS = ("tiny-backspace-sandbox", "tiny-backspace-github")
WAIT_S = 15


@dataclass
class TracedRun:
    events: list[dict[str, Any]]
    trace_id: str
    spans: list[ReadableSpan]  # the orchestrator's, from the in-memory exporter
    received: OTLPReceiver  # everything exported over OTLP/HTTP, by all three processes
    metrics: dict[str, list[tuple[dict[str, Any], Any]]]  # the orchestrator's, in memory: name -> points

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        return next((p for p in self.spans if span.parent and p.context.span_id == span.parent.span_id), None)

    def parents(self, name: str) -> set[str]:
        return {self.parent_of(s).name for s in self.named(name)}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def exporters(receiver: OTLPReceiver) -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    """Telemetry as `OTEL_EXPORTER_OTLP_ENDPOINT` sets it up, plus in-memory copies; stopped after this module."""
    memory, reader = InMemorySpanExporter(), InMemoryMetricReader()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": SERVICE, "TB_TRACE_CONTENT": "1"}
    assert telemetry.setup(env=env, span_exporters=[memory], metric_readers=[reader])
    yield memory, reader
    telemetry.shutdown()


def otel_env(receiver: OTLPReceiver) -> dict[str, str]:
    """What a server needs to export its spans to the receiver at once."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "20"}


@pytest.fixture(scope="module")
def github_over_http(receiver: OTLPReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The github server over streamable HTTP, as a real subprocess that exports its spans to the receiver."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "GITHUB_TOKEN": GITHUB_TOKEN,
           "GITHUB_BRANCH_PREFIX": "tb/", "GITHUB_WRITE_INTERVAL_S": "0", **otel_env(receiver)}
    proc = subprocess.Popen([sys.executable, "-m", "servers.github", "--transport", "http", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client() as http:
            for _ in range(200):  # bounded: ~20 s at most
                try:
                    http.get(f"http://127.0.0.1:{port}/", timeout=0.1)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "the github server exited at start-up"
                    try:
                        proc.wait(timeout=0.1)
                    except subprocess.TimeoutExpired:
                        pass
            else:
                raise RuntimeError("the github server did not start within 20 s")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced_pool(exporters, receiver: OTLPReceiver, github_over_http: str, mcp_config: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ToolPool]:
    """The sandbox over stdio, started by the pool with the orchestrator's OTEL_* variables; github over HTTP."""
    config = json.loads(mcp_config.read_text())
    config["mcpServers"]["github"] = {"type": "http", "url": github_over_http}
    path = tmp_path_factory.mktemp("traced") / "mcp.json"
    path.write_text(json.dumps(config))
    env = {"PATH": os.environ["PATH"], "OTEL_SERVICE_NAME": SERVICE, "ANTHROPIC_API_KEY": API_KEY,
           **otel_env(receiver)}
    pool = ToolPool(load_config(path, env=env))
    await pool.start(wait_s=30)
    assert all(c.state == "up" for c in pool.connections.values()), pool.health()
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced(exporters, receiver: OTLPReceiver, traced_pool: ToolPool,
                 tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """One team run through the real servers, its spans and metrics collected."""
    memory, reader = exporters
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q", "-b", "main")
    for name, content in BUGGY.items():
        (repo / name).write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial commit")
    memory.clear()
    async with messages_api(planner() + coder() + reviewer("approve")) as api:
        settings = Settings(model="claude-sonnet-test", limits=FAST)
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens)
        services = Services(settings, traced_pool, model)
        run = execute(RunRequest(repo_url=str(repo), prompt=PROMPT), services, EventLog(new_run_id()))
        events = [event async for event in run]
    assert events[-1]["type"] == "completion" and events[-1]["status"] == "success", events[-1]
    trace_id = events[0].get("trace_id")
    assert trace_id, "the run event carries no trace_id: run.py must open the run span (telemetry.run_span)"
    telemetry.flush()

    def complete(r: OTLPReceiver) -> bool:
        names = {(s.service, s.name) for s in r.spans if s.trace_id == trace_id}
        return ({(SERVICE, "run"), (SERVERS[0], "tools/call destroy_sandbox"), (SERVERS[1], "forge.open_pull_request")}
                <= names and {m.name for m in r.metrics} >= {"tb.runs", "tb.tool.duration"})

    assert await receiver.wait_for(complete, WAIT_S), "the receiver did not get the run's spans and metrics"
    points: dict[str, list] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(
                    (dict(p.attributes), getattr(p, "value", None) if hasattr(p, "value") else p.count)
                    for p in metric.data.data_points)
    return TracedRun(events, trace_id, list(memory.get_finished_spans()), receiver, points)


def test_a_run_is_one_trace_and_the_run_event_names_it(traced: TracedRun):
    run = traced.events[0]
    assert run["type"] == "run" and len(traced.trace_id) == 32
    assert {format(s.context.trace_id, "032x") for s in traced.spans} == {traced.trace_id}
    (root,) = [s for s in traced.spans if s.parent is None]
    assert root.name == "run"
    assert root.attributes["tb.run.id"] == run["run_id"]
    assert root.attributes["tb.repository"] == run["repo"]
    assert root.attributes["tb.run.outcome"] == "success"


def test_agents_model_calls_and_tool_calls_nest_under_the_run(traced: TracedRun):
    assert traced.parents("invoke_agent planner") == traced.parents("invoke_agent coder") == {"run"}
    assert traced.parents("invoke_agent reviewer") == {"run"}
    assert traced.parents("chat claude-sonnet-test") == {"invoke_agent planner", "invoke_agent coder",
                                                         "invoke_agent reviewer"}
    assert len(traced.named("chat claude-sonnet-test")) == len(planner() + coder() + reviewer("approve"))
    assert traced.parents("execute_tool read_file") == {"invoke_agent planner"}
    assert traced.parents("execute_tool edit_file") == {"invoke_agent coder"}
    assert traced.parents("execute_tool exec") == {"invoke_agent coder", "invoke_agent reviewer"}
    # The run's own steps: the sandbox's life, and publishing what the agents left.
    assert traced.parents("sandbox.create") == traced.parents("sandbox.destroy") == {"run"}
    assert traced.parents("publish") == {"run"}
    assert traced.parents("execute_tool create_sandbox") == {"sandbox.create"}
    assert traced.parents("execute_tool destroy_sandbox") == {"sandbox.destroy"}
    for tool in ("commit_changes", "open_pull_request"):  # commit_changes makes the branch
        assert traced.parents(f"execute_tool {tool}") == {"publish"}
    # Under every tool span, the mcp SDK's client span that carries the trace to the server.
    for span in traced.spans:
        if span.name.startswith("execute_tool "):
            tool = span.name.removeprefix("execute_tool ")
            assert traced.parents(f"MCP send tools/call {tool}") == {span.name}
            assert span.attributes["gen_ai.tool.name"] == tool
            assert span.attributes["tb.mcp.server"] in ("sandbox", "github")
            assert span.end_time > span.start_time


def test_model_call_spans_carry_the_gen_ai_attributes(traced: TracedRun):
    chats = traced.named("chat claude-sonnet-test")
    usage = of_type(traced.events, "usage")[-1]
    for chat in chats:
        a = chat.attributes
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
        assert a["gen_ai.request.model"] == "claude-sonnet-test" and a["gen_ai.response.model"]
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert "gen_ai.usage.cache_read.input_tokens" in a and "gen_ai.usage.cache_creation.input_tokens" in a
        assert a["gen_ai.response.finish_reasons"] in (("tool_use",), ("end_turn",))
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats) == usage["input_tokens"]
    assert sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats) == usage["output_tokens"]
    agent = traced.named("invoke_agent coder")[0].attributes
    assert agent["gen_ai.operation.name"] == "invoke_agent" and agent["tb.agent.turns"] == 3


def test_the_servers_spans_join_the_run_trace_over_stdio_and_over_http(traced: TracedRun):
    received = traced.received
    by_id = {s.span_id: s for s in received.in_trace(traced.trace_id)}
    server_spans = [s for s in received.spans if s.service in SERVERS]
    # Connecting and the pool's liveness listings are in no trace: every server span belongs to the run.
    assert server_spans and {s.trace_id for s in server_spans} == {traced.trace_id}

    def chain(span) -> list[str]:
        names = [span.name]
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            names.append(span.name)
        return names

    execs = [s for s in server_spans if s.name == "sandbox.exec"]
    assert len(execs) == 2 and {s.service for s in execs} == {"tiny-backspace-sandbox"}
    for span in execs:
        assert span.attributes["process.exit.code"] == 0 and span.attributes["tb.exec.timed_out"] is False
        assert chain(span)[:4] == ["sandbox.exec", "tools/call exec", "MCP send tools/call exec",
                                   "execute_tool exec"]
    for tool in ("commit_changes", "open_pull_request"):  # commit_changes makes the branch
        (forge,) = [s for s in server_spans if s.name == f"forge.{tool}"]
        assert forge.service == "tiny-backspace-github" and forge.attributes["tb.forge"] == "local"
        assert chain(forge) == [f"forge.{tool}", f"tools/call {tool}", f"MCP send tools/call {tool}",
                                f"execute_tool {tool}", "publish", "run"]


def test_the_otlp_export_decodes_to_the_same_spans(traced: TracedRun):
    exported = [s for s in traced.received.in_trace(traced.trace_id) if s.service == SERVICE]
    assert sorted(s.name for s in exported) == sorted(s.name for s in traced.spans)
    (root,) = [s for s in exported if s.name == "run"]
    assert root.parent_id == "" and root.attributes["tb.run.outcome"] == "success"
    chat = next(s for s in exported if s.name.startswith("chat "))
    assert isinstance(chat.attributes["gen_ai.usage.input_tokens"], int)
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert {m.name for m in traced.received.metrics if m.service == SERVICE} >= {
        "tb.runs", "tb.run.duration", "tb.tool.duration", "tb.tokens", "tb.sandboxes.alive"}


def test_metrics_count_runs_tool_latency_tokens_and_sandboxes(traced: TracedRun):
    m = traced.metrics
    assert m["tb.runs"] == [({"tb.run.outcome": "success"}, 1)]
    assert m["tb.run.duration"] == [({"tb.run.outcome": "success"}, 1)]
    execs = [count for attrs, count in m["tb.tool.duration"] if attrs.get("gen_ai.tool.name") == "exec"]
    assert execs == [2]
    tokens = {attrs["gen_ai.token.type"]: value for attrs, value in m["tb.tokens"]}
    usage = of_type(traced.events, "usage")[-1]
    assert tokens["input"] == usage["input_tokens"] and tokens["output"] == usage["output_tokens"]
    assert m["tb.sandboxes.alive"] == [({}, 0)]  # created, then destroyed


def test_no_secret_reaches_any_span_and_recorded_content_is_redacted(traced: TracedRun):
    values = []
    for span in traced.spans:
        values += [span.name, span.status.description or "", *map(str, span.attributes.values())]
        values += [str(v) for event in span.events for v in event.attributes.values()]
    for span in traced.received.spans:
        values += [span.name, span.status_message, *map(str, span.attributes.values())]
        values += [str(v) for _, attrs in span.events for v in attrs.values()]
    text = "\n".join(values)
    for secret in (API_KEY, GITHUB_TOKEN, PLANTED):
        assert secret not in text
    # TB_TRACE_CONTENT=1: the prompt and tool output are there, with the planted token masked.
    brief = traced.named("invoke_agent planner")[0].attributes["tb.agent.brief"]
    assert "Fix add(); its test fails." in brief and "[redacted]" in brief
    assert "a - b" in traced.named("execute_tool read_file")[0].attributes["gen_ai.tool.call.result"]


def run_python(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_otel_variables_nothing_is_installed_and_spans_cost_nothing():
    out = run_python(
        "import sys\n"
        "from opentelemetry import metrics, trace\n"
        "from orchestrator import telemetry\n"
        "installed = telemetry.setup()\n"
        "with telemetry.run_span('run_1', '/repo') as run, telemetry.model_span('m', 1, []) as span:\n"
        "    telemetry.record_content(span, 'gen_ai.input.messages', ['x'])\n"
        "print(installed, run.trace_id, span.is_recording(), type(trace.get_tracer_provider()).__name__,\n"
        "      type(metrics.get_meter_provider()).__name__, 'opentelemetry.sdk' in sys.modules)\n")
    assert out.split() == ["False", "None", "False", "ProxyTracerProvider", "_ProxyMeterProvider", "False"]


@pytest.mark.parametrize("content", ["", "1"])
def test_prompts_and_tool_output_reach_spans_only_when_asked(content: str):
    out = run_python(
        "from orchestrator import telemetry\n"
        "assert telemetry.setup()\n"
        "with telemetry.tool_span('sandbox', 'exec', {'command': 'echo PROMPT-TEXT'}) as call:\n"
        "    call.done(False, 'TOOL-OUTPUT sk-ant-" + "x" * 30 + "')\n"
        "telemetry.flush()\n",
        OTEL_TRACES_EXPORTER="console", TB_TRACE_CONTENT=content)
    span = json.loads(out)
    assert span["name"] == "execute_tool exec" and span["attributes"]["gen_ai.tool.name"] == "exec"
    assert ("PROMPT-TEXT" in out) == ("TOOL-OUTPUT" in out) == (content == "1")
    assert "sk-ant-" not in out


def test_the_exporters_follow_the_standard_otel_variables():
    assert telemetry.exporters_for("traces", {}) == []
    assert telemetry.exporters_for("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert telemetry.exporters_for("metrics", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert telemetry.exporters_for("traces", {"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert telemetry.exporters_for("metrics", {"OTEL_TRACES_EXPORTER": "console"}) == []
    assert telemetry.exporters_for("traces", {"OTEL_TRACES_EXPORTER": "none",
                                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == []
    assert telemetry.exporters_for("traces", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == []
    assert telemetry.otlp_endpoint("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == \
        "http://c:4318/v1/traces"
    assert telemetry.otlp_endpoint("metrics", {}) == "http://localhost:4318/v1/metrics"
    with pytest.raises(SystemExit, match="OTEL_TRACES_EXPORTER"):
        telemetry.exporters_for("traces", {"OTEL_TRACES_EXPORTER": "jaeger"})


def test_stdio_servers_get_the_otel_variables_and_no_other_variable_of_ours(tmp_path: Path):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"sandbox": {"command": "python", "env": {"SANDBOX_BACKEND": "local"}},
                                                 "github": {"command": "python", "env": {"OTEL_SERVICE_NAME": "gh"}}}}))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SERVICE_NAME": "orchestrator",
           "ANTHROPIC_API_KEY": API_KEY, "TB_TRACE_CONTENT": "1", "PATH": "/usr/bin"}
    sandbox, github = load_config(config, env=env)
    assert sandbox.target.env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "SANDBOX_BACKEND": "local"}
    assert github.target.env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SERVICE_NAME": "gh"}

"""An OTLP/HTTP collector on loopback that decodes the protobuf exports of traces and metrics.

It serves from a thread of its own, so exporters in this process (whose threads post at any time) and in the
servers' processes reach it whether or not a test's event loop is running.

    with otlp_receiver() as receiver:
        ...  # OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
        await receiver.wait_for(lambda r: any(s.name == "run" for s in r.spans), timeout=10)
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                          ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    status_message: str


@dataclass
class Metric:
    service: str
    name: str
    points: list[tuple[dict[str, Any], float]]  # (attributes, value: the sum, or a histogram's count)


@dataclass
class OTLPReceiver:
    url: str = ""
    spans: list[Span] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    requests: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    async def wait_for(self, predicate: Callable[[OTLPReceiver], bool], timeout: float) -> bool:
        """Whether `predicate` held within `timeout` seconds; checked on every export received."""
        return await asyncio.to_thread(self._wait, predicate, timeout)

    def _wait(self, predicate: Callable[[OTLPReceiver], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def in_trace(self, trace_id: str) -> list[Span]:
        with self.changed:
            return [s for s in self.spans if s.trace_id == trace_id]

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await _body(request))
        spans = [Span(_service(rs.resource), s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                      s.kind, _attributes(s.attributes), [(e.name, _attributes(e.attributes)) for e in s.events],
                      s.status.code, s.status.message)
                 for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with self.changed:
            self.requests += 1
            self.spans.extend(spans)
            self.changed.notify_all()
        return _protobuf(ExportTraceServiceResponse())

    async def _metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await _body(request))
        found = []
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    data = getattr(m, m.WhichOneof("data"))
                    points = [(_attributes(p.attributes),
                               p.count if hasattr(p, "bucket_counts") else
                               (p.as_int if p.WhichOneof("value") == "as_int" else p.as_double))
                              for p in data.data_points]
                    found.append(Metric(_service(rm.resource), m.name, points))
        with self.changed:
            self.requests += 1
            self.metrics.extend(found)
            self.changed.notify_all()
        return _protobuf(ExportMetricsServiceResponse())


async def _body(request: web.Request) -> bytes:
    assert request.content_type == "application/x-protobuf", request.content_type
    raw = await request.read()
    return gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw


def _protobuf(message: Any) -> web.Response:
    return web.Response(body=message.SerializeToString(), content_type="application/x-protobuf")


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _service(resource: Any) -> str:
    return _attributes(resource.attributes).get("service.name", "")


@contextmanager
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """A receiver serving on a free loopback port until the block ends."""
    receiver = OTLPReceiver()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="otlp-receiver", daemon=True)
    thread.start()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver._traces)
    app.router.add_post("/v1/metrics", receiver._metrics)
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    receiver.url = "http://127.0.0.1:%d" % runner.addresses[0][1]
    try:
        yield receiver
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

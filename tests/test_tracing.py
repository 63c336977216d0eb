"""OpenTelemetry: spans, parentage, GenAI attributes and W3C context propagation."""
from __future__ import annotations

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.tracing import Tracing

try:
    from tests.helpers import free_port, start_simulator
    from tests.inproc import running_gateway
except ImportError:
    from helpers import free_port, start_simulator
    from inproc import running_gateway

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


def by_name(spans, name):
    return [s for s in spans if s.name == name]


@pytest.fixture
def sim():
    with start_simulator("traced", ttft_ms=1, itl_ms=0) as proc:
        yield proc


async def test_request_span_continues_client_trace_and_propagates_to_model(sim):
    exporter = InMemorySpanExporter()
    config = {"models": [{"name": "traced", "backend": "static", "url": sim.url}]}
    async with running_gateway(config, span_exporter=exporter) as (url, _app):
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"{url}/v1/chat/completions",
                                     headers={"traceparent": TRACEPARENT, "X-Sim-Echo-Headers": "1"},
                                     json={"model": "traced", "max_tokens": 3,
                                           "messages": [{"role": "user", "content": "a b c"}]})
    assert resp.status_code == 200
    spans = exporter.get_finished_spans()
    [root] = by_name(spans, "gateway.request")
    [attempt] = by_name(spans, "gateway.upstream_attempt")
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert format(root.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert root.kind == SpanKind.SERVER and attempt.kind == SpanKind.CLIENT
    assert attempt.parent.span_id == root.context.span_id
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "traced"
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["gen_ai.usage.input_tokens"] == 3
    assert attrs["http.response.status_code"] == 200
    assert any(e.name == "gateway.queue_wait" for e in root.events)
    # the model server received the gateway's span as its parent, same trace
    received = {k.lower(): v for k, v in resp.json()["received_headers"].items()}
    _, trace_id, parent_id, _ = received["traceparent"].split("-")
    assert trace_id == CLIENT_TRACE_ID
    assert parent_id == format(attempt.context.span_id, "016x")


async def test_each_retry_is_an_attempt_span_and_an_event():
    exporter = InMemorySpanExporter()
    config = {"upstream": {"retries": 2, "backoff_s": 0.01, "connect_timeout_s": 1},
              "models": [{"name": "gone", "backend": "static",
                          "url": f"http://127.0.0.1:{free_port()}"}]}
    async with running_gateway(config, span_exporter=exporter) as (url, _app):
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"{url}/v1/completions", json={"model": "gone", "prompt": "x"})
    assert resp.status_code == 503
    spans = exporter.get_finished_spans()
    [root] = by_name(spans, "gateway.request")
    attempts = by_name(spans, "gateway.upstream_attempt")
    assert len(attempts) == 3
    assert all(a.parent.span_id == root.context.span_id for a in attempts)
    assert [e.attributes["attempt"] for e in root.events if e.name == "gateway.retry"] == [1, 2]
    assert root.attributes["gen_ai.operation.name"] == "text_completion"


async def test_cold_start_has_its_own_span(tmp_path):
    exporter = InMemorySpanExporter()
    config = {"models": [{"name": "cold", "backend": "process",
                          "command": ["vllm-gateway", "simulate", "--port", "{port}",
                                      "--served-model-name", "{name}", "--startup-s", "0.2"]}]}
    async with running_gateway(config, span_exporter=exporter) as (url, _app):
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.post(f"{url}/v1/completions", json={"model": "cold", "prompt": "x"})
            second = await client.post(f"{url}/v1/completions", json={"model": "cold", "prompt": "x"})
    assert first.status_code == second.status_code == 200
    spans = exporter.get_finished_spans()
    [cold] = by_name(spans, "gateway.cold_start")
    roots = by_name(spans, "gateway.request")
    assert len(roots) == 2
    assert cold.parent.span_id in {r.context.span_id for r in roots}


def test_tracing_is_off_by_default_and_costs_nothing():
    tracing = Tracing()
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert not tracing.enabled and headers == {}
    # the same no-op context manager object every time: nothing allocated per request
    assert tracing.span("x") is tracing.span("y")

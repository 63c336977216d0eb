"""With OTEL_EXPORTER_OTLP_ENDPOINT set, a real gateway exports its spans over OTLP/HTTP."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

try:
    from tests.helpers import start_gateway, start_simulator
except ImportError:
    from helpers import start_gateway, start_simulator

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Collector(BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector on loopback: records every POST."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spans_reach_an_otlp_collector(tmp_path):
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with start_simulator("otlp", ttft_ms=1, itl_ms=0) as sim:
            config = {"models": [{"name": "otlp", "backend": "static", "url": sim.url}]}
            gw = start_gateway(config, tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
            with gw:
                resp = httpx.post(f"{gw.url}/v1/completions", trust_env=False, timeout=10,
                                  headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
                                  json={"model": "otlp", "prompt": "x", "max_tokens": 2})
                assert resp.status_code == 200
            # stopping the gateway flushes the batch processor
    finally:
        server.shutdown()
    traces = [body for path, body in _Collector.received if path == "/v1/traces"]
    assert traces, f"no OTLP export; got {[p for p, _ in _Collector.received]}"
    payload = b"".join(traces)
    assert bytes.fromhex(TRACE_ID) in payload  # the client's trace, continued
    assert b"gateway.request" in payload and b"gateway.upstream_attempt" in payload

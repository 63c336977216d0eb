"""X-Request-ID is on every answer, not only proxied ones: admin, status, the gateway's
own errors (404 no route, 405, 400 bad path) and the connection-cap 503."""
from __future__ import annotations

import httpx
from inproc import running_gateway

CONFIG = {"limits": {"max_connections": 2},
          "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}


async def test_every_answer_carries_a_request_id():
    async with running_gateway(CONFIG) as (url, _app):
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as c:
            for method, path in (("GET", "/health"), ("GET", "/gateway/status"),
                                 ("GET", "/nope"), ("PUT", "/v1/models"),
                                 ("POST", "/v1/%2e%2e/sleep"), ("GET", "/metrics")):
                r = await c.request(method, path)
                assert r.headers.get("x-request-id"), (method, path, r.status_code)
            r = await c.get("/health", headers={"X-Request-ID": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            r = await c.get("/health", headers={"X-Request-ID": "bad id!"})
            assert r.headers["x-request-id"] != "bad id!"


def test_connection_cap_refusal_carries_a_request_id(tmp_path):
    import socket

    from helpers import start_gateway

    with start_gateway(CONFIG, tmp_path) as gw:
        held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
        try:
            extra = socket.create_connection(("127.0.0.1", gw.port))
            extra.settimeout(5)
            head = extra.recv(4096)
            extra.close()
        finally:
            for s in held:
                s.close()
    assert head.startswith(b"HTTP/1.1 503") and b"x-request-id:" in head.lower()

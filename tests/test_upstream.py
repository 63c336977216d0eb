"""The upstream pool is a transparent pipe: no cookie jar, no invented headers."""
from __future__ import annotations

import httpx
import pytest
from aiohttp import web

from gateway.upstream import UpstreamPool, read_raw


@pytest.fixture
async def echo_server():
    """A real loopback server that sets a cookie and echoes the request headers."""
    async def handler(request: web.Request) -> web.Response:
        resp = web.json_response({k.lower(): v for k, v in request.headers.items()})
        resp.set_cookie("session", "client-a-secret")
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _get_headers(pool: UpstreamPool, url: str, headers: dict, params=None) -> dict:
    resp = await pool.request("POST", url + "/v1/x", content=b"{}", headers=headers, params=params)
    return httpx.Response(200, content=await read_raw(resp)).json()


@pytest.mark.parametrize("params", [None, "a=1"], ids=["fast-path", "httpx-path"])
async def test_cookie_from_one_client_never_reaches_another(echo_server, params):
    pool = UpstreamPool(4, connect_timeout_s=2, timeout_s=5)
    try:
        first = await _get_headers(pool, echo_server, {"content-type": "application/json"}, params)
        second = await _get_headers(pool, echo_server, {"content-type": "application/json"}, params)
    finally:
        await pool.aclose()
    assert "cookie" not in first and "cookie" not in second


@pytest.mark.parametrize("params", [None, "a=1"], ids=["fast-path", "httpx-path"])
async def test_no_headers_are_invented_and_client_headers_pass(echo_server, params):
    pool = UpstreamPool(4, connect_timeout_s=2, timeout_s=5)
    try:
        seen = await _get_headers(pool, echo_server,
                                  {"Content-Type": "application/json", "X-Custom": "1",
                                   "traceparent": "00-abc-def-01"}, params)
    finally:
        await pool.aclose()
    assert seen["x-custom"] == "1" and seen["traceparent"] == "00-abc-def-01"
    assert "user-agent" not in seen and "accept-encoding" not in seen


def test_usage_is_decoded_alone_from_a_large_body():
    from gateway.forward import _usage

    big = b'{"data": [' + b",".join([b'{"embedding": [0.1, 0.2, 0.3]}'] * 50_000) + b"],"
    body = big + b'"usage": {"prompt_tokens": 7, "total_tokens": 7}, "model": "m"}'
    assert _usage(body) == {"prompt_tokens": 7, "total_tokens": 7}
    # text that merely mentions usage inside a string is escaped and never matched
    assert _usage(b'{"choices": [{"text": "say \\"usage\\": {}"}]}') == {}

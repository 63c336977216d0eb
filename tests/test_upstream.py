"""The upstream pool is a transparent pipe: no cookie jar, no invented headers."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from gateway.upstream import (
    UpstreamFailure,
    UpstreamPool,
    bad_header_value,
    forward_request_headers,
)


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
    resp = await pool.request("POST", url, "/v1/x", content=b"{}", headers=headers,
                              query=params or "")
    try:
        return json.loads(await resp.read())
    finally:
        resp.release()


@pytest.mark.parametrize("params", [None, "a=1"], ids=["plain", "query"])
async def test_cookie_from_one_client_never_reaches_another(echo_server, params):
    pool = UpstreamPool(4, connect_timeout_s=2, timeout_s=5)
    try:
        first = await _get_headers(pool, echo_server, {"content-type": "application/json"}, params)
        second = await _get_headers(pool, echo_server, {"content-type": "application/json"}, params)
    finally:
        await pool.aclose()
    assert "cookie" not in first and "cookie" not in second


@pytest.mark.parametrize("params", [None, "a=1"], ids=["plain", "query"])
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


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded():
    from sanic.compat import Header

    h = Header([("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"),
                ("Expect", "100-continue"), ("TE", "trailers"), ("X-Keep", "a"), ("X-Keep", "b")])
    out = forward_request_headers(h)
    assert out == {"x-keep": "a, b"}


async def _raw_server(reply: bytes, hang: bool = False):
    """A loopback TCP server that answers every connection with ``reply`` (any bytes)."""
    async def on_conn(reader, writer):
        await reader.read(65536)
        if hang:
            await asyncio.sleep(30)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("reply,kind", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", "protocol"),
    (b"", "disconnected"),
], ids=["garbage", "oversize-header", "closed-after-send"])
async def test_upstream_misbehaviour_is_classified_as_sent(reply, kind):
    server, url = await _raw_server(reply)
    pool = UpstreamPool(2, connect_timeout_s=2, timeout_s=5)
    try:
        with pytest.raises(UpstreamFailure) as info:
            resp = await pool.request("POST", url, "/v1/x", content=b"{}", headers={})
            await resp.read()
    finally:
        await pool.aclose()
        server.close()
    assert info.value.kind == kind and info.value.sent


async def test_read_timeout_is_sent_and_refused_is_not():
    server, url = await _raw_server(b"", hang=True)
    pool = UpstreamPool(2, connect_timeout_s=2, timeout_s=0.3)
    try:
        with pytest.raises(UpstreamFailure) as hung:
            await pool.request("POST", url, "/v1/x", content=b"{}", headers={})
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamFailure) as refused:
            await pool.request("POST", url, "/v1/x", content=b"{}", headers={})
    finally:
        await pool.aclose()
    assert hung.value.kind == "read_timeout" and hung.value.sent
    assert refused.value.kind == "connect" and not refused.value.sent


async def test_truncated_body_is_classified():
    server, url = await _raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
    pool = UpstreamPool(2, connect_timeout_s=2, timeout_s=5)
    try:
        resp = await pool.request("POST", url, "/v1/x", content=b"{}", headers={})
        with pytest.raises(UpstreamFailure) as info:
            await resp.read()
    finally:
        await pool.aclose()
        server.close()
    assert info.value.kind == "truncated"


@pytest.mark.parametrize("pairs, bad", [
    ([("Content-Type", "application/json"), ("X-A", "ok value")], None),
    ([("X-Tab", "a\tb"), ("X-A", "b")], None),  # a tab is allowed in a value
    ([("X-A", "fine"), ("X-Ctl", "a\x01b")], "X-Ctl"),
    ([("X-Utf", "caf\u00e9"), ("X-Ctl", "\x7f")], "X-Utf"),  # the first bad one is named
    ([("X-Tab", "\t"), ("X-Del", "x\x7f")], "X-Del"),
], ids=["clean", "tab", "control", "non-ascii-first", "tab-then-del"])
def test_bad_header_value_names_the_first_bad_header(pairs, bad):
    from sanic.compat import Header

    assert bad_header_value(Header(pairs)) == bad

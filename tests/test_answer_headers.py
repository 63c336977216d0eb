"""A model server's answer headers reach the client as sent, less what is hop-by-hop,
and never over the gateway's own: checked on the wire, for a whole answer and a stream."""
from __future__ import annotations

import asyncio

import pytest

try:
    from tests.inproc import running_gateway
except ImportError:  # tests/ on sys.path directly
    from inproc import running_gateway

BODY = (b'{"id":"x","object":"chat.completion","model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}')
UPSTREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: must-not-pass\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: b=2\r\n"
    b"X-Queue-Depth: 999\r\n"
    b"x-request-id: forged\r\n"
    b"X-Accel-Buffering: yes\r\n"
    b"X-Upstream: caf\xc3\xa9\r\n"
    b"\r\n" % len(BODY))


async def _upstream() -> tuple[asyncio.AbstractServer, str]:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(UPSTREAM_HEAD + BODY)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _exchange(base: str, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """One request on a raw socket: the answer's header lines exactly, and its body."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nX-Request-ID: mine-1\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")[1:-2]
    pairs = [(k.strip().lower(), v.strip()) for k, v in (ln.split(b":", 1) for ln in lines)]
    values = dict(pairs)
    if b"content-length" in values:
        rest = await reader.readexactly(int(values[b"content-length"]))
    else:
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)  # chunked
    writer.close()
    return pairs, rest


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_answer_headers_pass_as_sent_and_the_gateways_win(stream):
    server, url = await _upstream()
    config = {"models": [{"name": "m", "backend": "static", "url": url}]}
    request = b'{"model":"m","messages":[{"role":"user","content":"hi"}]%b}' % (
        b',"stream":true' if stream else b"")
    try:
        async with running_gateway(config) as (base, _app):
            pairs, body = await _exchange(base, request)
    finally:
        server.close()
    names = [k for k, _ in pairs]
    values = dict(pairs)
    # Repeats kept, in order, bytes as sent (a UTF-8 value is not re-encoded).
    assert [v for k, v in pairs if k == b"set-cookie"] == [b"a=1", b"b=2"]
    assert values[b"x-upstream"] == b"caf\xc3\xa9"
    # Hop-by-hop: the fixed list and what the answer's own Connection header names.
    assert b"x-hop" not in values and b"keep-alive" not in values
    # Each once; the gateway's own value, never the upstream's.
    for name in (b"content-type", b"connection", b"x-queue-depth", b"x-request-id",
                 b"x-gateway-model"):
        assert names.count(name) == 1, (name, pairs)
    assert values[b"content-type"] == b"application/json"
    assert values[b"x-queue-depth"] == b"0"
    assert values[b"x-request-id"] == b"mine-1"
    assert values[b"x-gateway-model"] == b"m"
    assert values[b"connection"] == b"keep-alive"
    if stream:
        assert names.count(b"x-accel-buffering") == 1 and values[b"x-accel-buffering"] == b"no"
        assert values[b"transfer-encoding"] == b"chunked" and BODY in body
    else:
        assert values[b"x-accel-buffering"] == b"yes"  # the gateway sets it on streams only
        assert values[b"content-length"] == str(len(BODY)).encode() and body == BODY

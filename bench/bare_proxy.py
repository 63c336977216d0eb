"""The reference: the least a Sanic reverse proxy can do, for ``bench/run_bench.py``.

One route (POST, any path), one client created at start-up, the request body forwarded
as is and the upstream's status and body returned. No admission, metrics, tracing,
hooks or header filtering: whatever the gateway spends beyond this is its own overhead.

``--client`` picks how the upstream request is sent:

* ``aiohttp``        one ``aiohttp.ClientSession`` (the reference the gateway is held to);
* ``httpx``          ``httpx.AsyncClient`` with its default (httpcore) transport;
* ``httpx-aiohttp``  ``httpx.AsyncClient`` over ``httpx_aiohttp.AiohttpTransport`` (what
  the gateway uses, see gateway/upstream.py).

All three get the same pool size (``--pool``, default 64 = the bench gateway's
max_concurrent) so the comparison is of the client stack, not of pool limits.

    python bench/bare_proxy.py --port 18082 --upstream http://127.0.0.1:18081 --client aiohttp
"""
from __future__ import annotations

import argparse

from sanic import Sanic
from sanic.request import Request
from sanic.response import HTTPResponse

CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")


def build_app(upstream: str, client: str, pool: int) -> Sanic:
    app = Sanic("bare_proxy")
    app.config.FALLBACK_ERROR_FORMAT = "json"
    upstream = upstream.rstrip("/")

    @app.before_server_start
    async def _open(app: Sanic) -> None:
        import aiohttp

        if client == "aiohttp":
            app.ctx.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=pool), auto_decompress=False)
            return
        import httpx

        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        if client == "httpx":
            app.ctx.client = httpx.AsyncClient(limits=limits, timeout=300)
        else:
            from httpx_aiohttp import AiohttpTransport

            app.ctx.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=pool), auto_decompress=False)
            app.ctx.client = httpx.AsyncClient(
                transport=AiohttpTransport(client=app.ctx.session), timeout=300)

    @app.after_server_stop
    async def _close(app: Sanic) -> None:
        if getattr(app.ctx, "client", None) is not None:
            await app.ctx.client.aclose()
        if getattr(app.ctx, "session", None) is not None:
            await app.ctx.session.close()

    def _headers(request: Request) -> dict[str, str]:
        return {"Content-Type": request.headers.get("content-type", "application/json")}

    if client == "aiohttp":
        @app.post("/<path:path>")
        async def proxy(request: Request, path: str) -> HTTPResponse:
            async with request.app.ctx.session.post(upstream + request.path, data=request.body,
                                                    headers=_headers(request)) as r:
                body = await r.read()
                return HTTPResponse(body, status=r.status,
                                    content_type=r.headers.get("Content-Type"))
    else:
        @app.post("/<path:path>")
        async def proxy(request: Request, path: str) -> HTTPResponse:
            r = await request.app.ctx.client.post(upstream + request.path, content=request.body,
                                                  headers=_headers(request))
            return HTTPResponse(r.content, status=r.status_code,
                                content_type=r.headers.get("content-type"))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:18081")
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    parser.add_argument("--pool", type=int, default=64)
    args = parser.parse_args()
    app = build_app(args.upstream, args.client, args.pool)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False,
            debug=False)


if __name__ == "__main__":
    main()

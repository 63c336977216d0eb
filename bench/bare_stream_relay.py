"""The streaming reference: the least a Sanic + aiohttp SSE relay can do, for bench/stream_bench.py.

One route (POST, any path), one ``aiohttp.ClientSession`` created at start-up (no pool
cap), the request body forwarded as is, the upstream's status and Content-Type sent with
``request.respond()`` and its body relayed with ``response.send()`` chunk by chunk as
``readany()`` hands them over, the same read loop as the gateway's (gateway/upstream.py
``UpstreamResponse.chunks``). No admission, metrics, usage parsing, renaming, hooks or
header filtering: whatever the gateway spends per stream or per chunk beyond this is its
own. Sanic's own limits are lifted as the gateway lifts them (no response timeout, a
long keep-alive), so both hold the same streams, and it tunes the garbage collector as
``vllm-gateway serve`` does (gateway/cli.py ``_tune_gc``: ``gc.freeze()`` once serving,
young collections every 50,000 allocations), so the comparison is of the request path.

    python bench/bare_stream_relay.py --port 18092 --upstream http://127.0.0.1:18090
"""
from __future__ import annotations

import argparse
import gc
import resource

from sanic import Sanic
from sanic.request import Request

NO_TIMEOUT_S = 86_400.0


def build_app(upstream: str) -> Sanic:
    app = Sanic("bare_stream_relay")
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.RESPONSE_TIMEOUT = NO_TIMEOUT_S
    app.config.KEEP_ALIVE_TIMEOUT = 75
    upstream = upstream.rstrip("/")

    @app.before_server_start
    async def _open(app: Sanic) -> None:
        import aiohttp

        app.ctx.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, trust_env=False)

    @app.after_server_start
    async def _tune_gc(app: Sanic) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

    @app.after_server_stop
    async def _close(app: Sanic) -> None:
        await app.ctx.session.close()

    @app.post("/<path:path>")
    async def relay(request: Request, path: str) -> None:
        headers = {"Content-Type": request.headers.get("content-type", "application/json")}
        async with request.app.ctx.session.post(upstream + request.path, data=request.body,
                                                headers=headers) as r:
            response = await request.respond(status=r.status,
                                             content_type=r.headers.get("Content-Type"))
            content = r.content
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                await response.send(chunk)
            await response.eof()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:18090")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = build_app(args.upstream)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False,
            debug=False)


if __name__ == "__main__":
    main()

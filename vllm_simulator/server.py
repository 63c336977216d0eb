"""A vLLM OpenAI-API simulator for the gateway's demo, tests and load tests.

Run it with ``python -m vllm_simulator --port 8001 --served-model-name m`` (or
``vllm-gateway simulate ...``). It serves what the gateway needs from vLLM, in vLLM's shapes:
``GET /health`` (503 for ``--startup-s`` after listening starts, then 200 with an empty body),
``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``"stream": true`` and ``stream_options.include_usage``), ``POST /v1/embeddings`` (8-dim
deterministic unit vectors, ``float`` or ``base64``), ``POST /tokenize``, ``GET /metrics``
(vLLM metric names, label ``model_name``) and ``GET /sim/stats``. Generation waits ``--ttft-ms``
before the first token and ``--itl-ms`` between tokens; at most ``--max-num-seqs`` requests
generate at once, the rest wait FIFO (an embeddings request holds a slot for ``--ttft-ms``).
Until startup is over every other path except ``/metrics`` and ``/sim/stats`` answers 503 too.

A stream is: (chat only) a role chunk ``delta: {"role": "assistant", "content": ""}``, then one
event per token, the last one carrying ``finish_reason``, then a ``choices: []`` usage chunk if
``stream_options.include_usage``, then ``data: [DONE]``. Every event is its own ``send()``, so
its own HTTP chunk. Response headers go out at once, before queueing, as vLLM's do.

Test-only fault knobs (request headers):

- ``X-Sim-Delay-Ms: N`` waits N ms before anything else (so before response headers).
- ``X-Sim-Status: CODE`` answers CODE at once (after any delay) with an OpenAI error body.
- ``X-Sim-Break-After: N`` (streams) closes the connection after N token events (the chat role
  chunk does not count), without the terminating chunk and without ``[DONE]``; this is the
  server's doing, so it is not counted in ``cancelled_total``.
- ``X-Sim-Echo-Headers: 1`` adds ``"received_headers"`` (lower-cased names) to non-stream
  bodies. ``"received_model"`` (the body's ``model``) is in every non-stream body.

``GET /sim/stats`` returns ``{"requests_total", "running", "waiting", "cancelled_total"}``:
``requests_total`` counts POST requests received (faulted ones included); ``cancelled_total``
counts generation requests whose client went away while queued or generating.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
import uuid
from time import monotonic

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sanic import Request, Sanic
from sanic.exceptions import MethodNotAllowed, NotFound
from sanic.response import HTTPResponse

from vllm_simulator import text as st
from vllm_simulator.sleep import add_sleep_routes

UNGATED = ("/health", "/metrics", "/sim/stats")


class SimState:
    """Per-app counters, the admission semaphore and the Prometheus metrics."""

    def __init__(self, name: str, ttft_ms: float, itl_ms: float, startup_s: float, seqs: int):
        self.name, self.ttft, self.itl = name, ttft_ms / 1000, itl_ms / 1000
        self.startup_s, self.max_num_seqs = startup_s, seqs
        self.started = monotonic()  # reset by before_server_start
        self.serving = True  # run() holds it False until Sanic's startup is complete
        self.sem = asyncio.Semaphore(seqs)
        self.running = self.waiting = self.requests_total = self.cancelled_total = 0
        reg = self.registry = CollectorRegistry()
        lbl = {"model_name": name}
        for metric, doc, fn in (
            ("vllm:num_requests_running", "Requests running.", lambda: self.running),
            ("vllm:num_requests_waiting", "Requests waiting.", lambda: self.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100%.",
             lambda: self.running / self.max_num_seqs),
        ):
            Gauge(metric, doc, ["model_name"], registry=reg).labels(**lbl).set_function(fn)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens.", ["model_name"],
                                     registry=reg).labels(**lbl)
        self.gen_tokens = Counter("vllm:generation_tokens", "Generation tokens.",
                                  ["model_name"], registry=reg).labels(**lbl)
        success = Counter("vllm:request_success", "Finished requests.",
                          ["model_name", "finished_reason"], registry=reg)
        self.success = {r: success.labels(model_name=name, finished_reason=r)
                        for r in ("stop", "length", "abort")}
        self.ttft_hist = Histogram("vllm:time_to_first_token_seconds", "TTFT.", ["model_name"],
                                   buckets=st.TTFT_BUCKETS, registry=reg).labels(**lbl)
        self.e2e_hist = Histogram("vllm:e2e_request_latency_seconds", "E2E latency.",
                                  ["model_name"], buckets=st.E2E_BUCKETS,
                                  registry=reg).labels(**lbl)

    def ready(self) -> bool:
        return self.serving and monotonic() - self.started >= self.startup_s

    @contextlib.asynccontextmanager
    async def generation(self, prompt_tokens: int):
        """Queue FIFO for one of max_num_seqs slots, then account the request; the caller
        updates the yielded record. try/finally everywhere: the counts can never drift."""
        g = _Gen(self, prompt_tokens)
        try:
            self.waiting += 1
            try:
                await self.sem.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            try:
                yield g
            finally:
                self.running -= 1
                self.sem.release()
        except asyncio.CancelledError:  # also sanic's RequestCancelled: the client went away
            self.cancelled_total += 1
            raise
        finally:
            self.gen_tokens.inc(g.produced)
            self.success[g.reason].inc()
            self.e2e_hist.observe(monotonic() - g.t0)


class _Gen:
    """One request's progress: tokens produced and the finish reason so far."""

    def __init__(self, sim: SimState, prompt_tokens: int):
        self.sim, self.prompt_tokens, self.t0 = sim, prompt_tokens, monotonic()
        self.produced, self.reason = 0, "abort"

    def first_token(self) -> None:
        self.sim.ttft_hist.observe(monotonic() - self.t0)
        self.sim.prompt_tokens.inc(self.prompt_tokens)


def _json(obj, status: int = 200) -> HTTPResponse:
    return HTTPResponse(st.dumps(obj), status=status, content_type="application/json")


def _error(message: str, status: int) -> HTTPResponse:
    return HTTPResponse(st.error_body(message, status), status=status,
                        content_type="application/json")


async def _sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _generate(request: Request, chat: bool):
    sim: SimState = request.app.ctx.sim
    p = st.parse_generation(request.body, sim.name, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, n, pt = int(time.time()), p["n"], p["prompt_tokens"]
    usage = {"prompt_tokens": pt, "total_tokens": pt + n, "completion_tokens": n}
    if p["stream"]:
        return await _stream(request, sim, p, chat, rid, created, usage)
    async with sim.generation(pt) as g:
        await asyncio.sleep(sim.ttft)
        g.first_token()
        if n > 1 and sim.itl:
            await asyncio.sleep((n - 1) * sim.itl)
        g.produced, g.reason = n, p["reason"]
    out = st.completion_body(rid, chat, created, sim.name, n, p["reason"], usage)
    out["received_model"] = p["model"]
    if request.headers.get("x-sim-echo-headers", "0") != "0":
        out["received_headers"] = {k.lower(): v for k, v in request.headers.items()}
    return _json(out)


async def _stream(request: Request, sim: SimState, p: dict, chat: bool, rid: str,
                  created: int, usage: dict) -> None:
    """SSE, one send() (so one HTTP chunk) per event; see the module docstring."""
    brk = st.header_number(request.headers, "x-sim-break-after")
    head = st.chunk_head(rid, chat, created, sim.name)
    response = await request.respond(content_type="text/event-stream")
    await response.send(b"")  # headers go out now, as vLLM's do; writes no body chunk
    async with sim.generation(p["prompt_tokens"]) as g:
        deadline = asyncio.get_running_loop().time() + sim.ttft
        await _sleep_until(deadline)
        g.first_token()
        if chat:
            await response.send(st.role_event(head))
        n = p["n"]
        for i in range(n):
            if brk is not None and i >= brk:
                break
            if i and sim.itl:
                deadline += sim.itl
                await _sleep_until(deadline)
            elif i % 64 == 63:
                await asyncio.sleep(0)  # itl 0: still let other requests run
            fin = p["reason"] if i == n - 1 else None
            await response.send(st.token_event(head, chat, i, fin))
            g.produced += 1
        if brk is not None and g.produced >= brk:
            request.transport.close()  # abrupt: no terminating chunk, no [DONE]
            return
        g.reason = p["reason"]
        if p["include_usage"]:
            await response.send(st.usage_event(head, usage))
        await response.send("data: [DONE]\n\n")
        await response.eof()


def build_app(served_model_name: str, ttft_ms: float = 20, itl_ms: float = 5,
              startup_s: float = 0, max_num_seqs: int = 256,
              app_name: str | None = None, enable_sleep_mode: bool = False) -> Sanic:
    """Build a simulator app serving ``served_model_name`` (unique Sanic name per call)."""
    app = Sanic(app_name or f"sim_{uuid.uuid4().hex}")
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # Sanic's 60 s would cut long queues/streams
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 1.0
    app.config.FALLBACK_ERROR_FORMAT = "json"
    sim = app.ctx.sim = SimState(served_model_name, ttft_ms, itl_ms, startup_s, max_num_seqs)
    sleep = add_sleep_routes(app) if enable_sleep_mode else None

    @app.before_server_start
    async def _started(_app):
        sim.started = monotonic()

    @app.on_request
    async def _faults(request: Request):
        if request.method == "POST":
            sim.requests_total += 1
        delay = st.header_number(request.headers, "x-sim-delay-ms")
        if delay:
            await asyncio.sleep(delay / 1000)
        code = st.header_number(request.headers, "x-sim-status")
        if code is not None:
            if code != int(code) or not 200 <= code <= 599:
                raise st.SimError(f"Invalid x-sim-status header: {code}")
            if code in (204, 304):
                return HTTPResponse(status=int(code))
            return _error(f"Simulated error (X-Sim-Status: {int(code)})", int(code))
        if request.path not in UNGATED and not sim.ready():
            return _error("The server is starting up.", 503)

    @app.get("/health")
    async def health(_request):
        return HTTPResponse(b"", status=200 if sim.ready() else 503, content_type="text/plain")

    @app.get("/v1/models")
    async def models(_request):
        return _json({"object": "list", "data": [{
            "id": sim.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": sim.name, "parent": None, "max_model_len": st.MAX_MODEL_LEN}]})

    @app.post("/v1/chat/completions")
    async def chat(request):
        return await _generate(request, True)

    @app.post("/v1/completions")
    async def completions(request):
        return await _generate(request, False)

    @app.post("/v1/embeddings")
    async def embeddings(request):
        model, items, pt, b64 = st.parse_embeddings(request.body, sim.name)
        async with sim.generation(pt) as g:
            await asyncio.sleep(sim.ttft)
            g.first_token()
            g.reason = "stop"
        data = [{"index": i, "object": "embedding",
                 "embedding": st.embedding_b64(v) if b64 else v}
                for i, v in enumerate(map(st.embedding, items))]
        return _json({"id": f"embd-{uuid.uuid4().hex}", "object": "list",
                      "created": int(time.time()), "model": sim.name, "data": data,
                      "usage": {"prompt_tokens": pt, "total_tokens": pt, "completion_tokens": 0},
                      "received_model": model})

    @app.post("/tokenize")
    async def tokenize(request):
        ids = st.token_ids(st.parse_tokenize(request.body, sim.name))
        return _json({"tokens": ids, "count": len(ids), "max_model_len": st.MAX_MODEL_LEN})

    @app.get("/metrics")
    async def metrics(_request):
        return HTTPResponse(generate_latest(sim.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/sim/stats")
    async def stats(_request):
        stats = {"requests_total": sim.requests_total, "running": sim.running,
                 "waiting": sim.waiting, "cancelled_total": sim.cancelled_total}
        if sleep is not None:
            stats.update(sleeping=sleep.sleeping, sleeps_total=sleep.sleeps_total,
                         wakes_total=sleep.wakes_total)
        return _json(stats)

    @app.exception(st.SimError)
    async def refused(_request, exc):
        return _error(exc.message, exc.status)

    @app.exception(NotFound, MethodNotAllowed)
    async def no_route(_request, exc):  # FastAPI's bodies, as vLLM sends them
        not_found = isinstance(exc, NotFound)
        return _json({"detail": "Not Found" if not_found else "Method Not Allowed"},
                     404 if not_found else 405)

    @app.exception(Exception)
    async def failed(_request, exc):
        status = getattr(exc, "status_code", 500)
        return _error(str(exc) or type(exc).__name__, status if 400 <= status <= 599 else 500)

    return app


def run(port: int, served_model_name: str, host: str = "127.0.0.1", ttft_ms: float = 20,
        itl_ms: float = 5, startup_s: float = 0, max_num_seqs: int = 256,
        enable_sleep_mode: bool = False) -> None:
    """Serve the simulator in this one process until SIGTERM/SIGINT, then exit cleanly.

    Sanic answers requests a moment before it installs its own SIGTERM/SIGINT handlers
    (after_server_start runs after that), so /health stays 503 until then (a healthy
    simulator always stops gracefully) and a signal during startup just ends the process.
    """
    app = build_app(served_model_name, ttft_ms, itl_ms, startup_s, max_num_seqs,
                    enable_sleep_mode=enable_sleep_mode)
    sim: SimState = app.ctx.sim
    sim.serving = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os._exit(0))  # replaced by Sanic's graceful handler

    @app.after_server_start
    async def _serving(_app):
        sim.serving = True
        print(f"vLLM simulator serving {served_model_name!r} on http://{host}:{port}", flush=True)

    app.run(host=host, port=port, single_process=True, access_log=False, motd=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options; bad values end in ``parser.error`` naming the option."""
    parser.add_argument("--port", type=st.arg_number(int, 1, 65535), required=True,
                        help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--served-model-name", required=True, help="the one model name served")
    parser.add_argument("--ttft-ms", type=st.arg_number(float, 0), default=20.0,
                        help="delay before the first token, ms (default %(default)s)")
    parser.add_argument("--itl-ms", type=st.arg_number(float, 0), default=5.0,
                        help="delay between tokens, ms (default %(default)s)")
    parser.add_argument("--startup-s", type=st.arg_number(float, 0), default=0.0,
                        help="seconds /health answers 503 after start (default %(default)s)")
    parser.add_argument("--max-num-seqs", type=st.arg_number(int, 1), default=256,
                        help="requests generating at once; the rest wait (default %(default)s)")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="serve vLLM's /sleep, /wake_up and /is_sleeping")


def main_from_args(args: argparse.Namespace) -> None:
    run(port=args.port, served_model_name=args.served_model_name, host=args.host,
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, startup_s=args.startup_s,
        max_num_seqs=args.max_num_seqs, enable_sleep_mode=args.enable_sleep_mode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_simulator",
                                     description="Simulate a vLLM OpenAI-compatible server.")
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""A vLLM OpenAI-API simulator for the gateway's demo, tests and load tests.

Run it with ``python -m vllm_simulator --port 8001 --served-model-name m`` (or
``vllm-gateway simulate ...``). It serves what the gateway needs from vLLM 0.32, in vLLM's
shapes: ``GET /health`` (200, empty body), ``GET /v1/models``, ``POST /tokenize``,
``GET /metrics`` (vLLM metric names, label ``model_name``) and ``GET /sim/stats``, plus
per ``--runner`` (as vLLM registers routes by what the model does):

- ``generate`` (the default): ``POST /v1/chat/completions`` and ``POST /v1/completions``
  (both with ``"stream": true`` and ``stream_options.include_usage``);
- ``pooling``: ``POST /v1/embeddings`` (8-dim deterministic unit vectors, ``float`` or
  ``base64``).

The other runner's routes answer FastAPI's 404 ``{"detail": "Not Found"}``, as vLLM does.
Generation waits ``--ttft-ms`` before the first token and ``--itl-ms`` between tokens; at
most ``--max-num-seqs`` requests generate at once, the rest wait FIFO (an embeddings request
holds a slot for ``--ttft-ms``).

Start-up: like vLLM, the port is **not listening** (connections are refused) for
``--startup-s`` seconds after launch; the socket is bound at once (so a port in use fails
at once) but listened on only then, and ``/health`` answers 200 from its first answer (a
503 is possible only in the instant between listening and Sanic's start-up being done).

Idle keep-alive connections are closed after 5 s, as uvicorn (vLLM's server) does.

Errors are vLLM's ``{"error": {"message", "type", "param", "code"}}`` with an integer
``code``: a wrong model is 404 ``NotFoundError``, param ``model``, "The model `x` does not
exist. Valid aliases: NAME."; a body that fails vLLM's schema (not JSON, no ``messages``,
``stream_options`` without ``stream``) is 400 type ``Bad Request`` with the field as
``param`` (``body.messages``, ``stream_options``); ``max_tokens`` < 1 or above the context
length, or a prompt that fills the context, is 400 ``BadRequestError`` with its param; a
limit the context cannot hold beside the prompt is clamped to what is left ("length").

A stream is: (chat only) a role chunk ``delta: {"role": "assistant", "content": ""}``, then
the content events, then a final event with empty content (``delta: {"content": ""}`` /
``text: ""``) carrying ``finish_reason``, then a ``choices: []`` usage chunk only if
``stream_options.include_usage``, then ``data: [DONE]``. Like vLLM's, some content events
carry two tokens: every ``--merge-every`` N-th one (default 4, 0: never), so 6 tokens are 5
events (``text.event_sizes``); the usage counts tokens, not events, and each token still
takes its ``--itl-ms``. Every event is its own ``send()``, so its own HTTP chunk. Response
headers go out at once, before queueing, as vLLM's do.

Sleep mode (``--enable-sleep-mode``, see ``sleep.py``): ``/sleep?level=N``, ``/wake_up``,
``/is_sleeping``; while asleep, generation requests are held (counted as waiting) until
``/wake_up`` and then served. ``vllm:engine_sleep_state`` (labels ``engine="0"``,
``sleep_state`` awake / weights_offloaded / discard_all; 1 for the current state) is
always exported.

Test-only fault knobs (request headers):

- ``X-Sim-Delay-Ms: N`` waits N ms before anything else (so before response headers).
- ``X-Sim-Status: CODE`` answers CODE at once (after any delay) with an OpenAI error body.
- ``X-Sim-Break-After: N`` (streams) closes the connection after N content events (the chat
  role chunk does not count; a merged event counts once), without the finish event, usage
  and ``[DONE]``; this is the server's doing, so it is not counted in ``cancelled_total``.
- ``X-Sim-Echo-Headers: 1`` adds ``"received_headers"`` (lower-cased names) to non-stream
  bodies. ``"received_model"`` (the body's ``model``) is in every non-stream body.

``GET /sim/stats`` returns ``{"requests_total", "running", "waiting", "cancelled_total"}``
(and ``sleeping``, ``sleeps_total``, ``wakes_total`` in sleep mode): ``requests_total``
counts POST requests received (faulted ones included); ``cancelled_total`` counts
generation requests whose client went away while queued, held or generating.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
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
RUNNERS = ("generate", "pooling")
KEEP_ALIVE_TIMEOUT_S = 5  # uvicorn's timeout_keep_alive default, which vLLM keeps
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # vLLM's, by sleep level


class SimState:
    """Per-app counters, the admission semaphore and the Prometheus metrics."""

    def __init__(self, name: str, ttft_ms: float, itl_ms: float, seqs: int,
                 merge_every: int = 4):
        self.name, self.ttft, self.itl = name, ttft_ms / 1000, itl_ms / 1000
        self.max_num_seqs, self.merge_every = seqs, merge_every
        self.serving = True  # run() holds it False until Sanic's startup is complete
        self.sem = asyncio.Semaphore(seqs)
        self.awake = asyncio.Event()  # cleared while asleep: generation waits for it
        self.awake.set()
        self.running = self.waiting = self.requests_total = self.cancelled_total = 0
        self.unauthorized_total = 0
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
        sleep_state = Gauge("vllm:engine_sleep_state",
                            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 "
                            "means engine is awake; weights_offloaded = 1 means sleep level 1; "
                            "discard_all = 1 means sleep level 2.",
                            ["engine", "model_name", "sleep_state"], registry=reg)
        self.sleep_state = {s: sleep_state.labels(engine="0", model_name=name, sleep_state=s)
                            for s in SLEEP_STATES}
        self.set_sleep_state(None)

    def set_sleep_state(self, level: int | None) -> None:
        """vLLM's gauge: awake 1 while awake (``level`` None); asleep at level 1
        weights_offloaded 1, at level 2 discard_all 1 (level 0: all 0)."""
        current = "awake" if level is None else SLEEP_STATES[level] if level else None
        for state, gauge in self.sleep_state.items():
            gauge.set(1 if state == current else 0)

    def ready(self) -> bool:
        return self.serving

    @contextlib.asynccontextmanager
    async def generation(self, prompt_tokens: int):
        """Queue FIFO for one of max_num_seqs slots, then account the request; the caller
        updates the yielded record. try/finally everywhere: the counts can never drift."""
        g = _Gen(self, prompt_tokens)
        try:
            self.waiting += 1
            try:
                if not self.awake.is_set():
                    await self.awake.wait()  # asleep: held until /wake_up, as vLLM does
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


def _refused(exc: st.SimError) -> HTTPResponse:
    return HTTPResponse(exc.body(), status=exc.status, content_type="application/json")


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
        events = 0
        for size in st.event_sizes(p["n"], sim.merge_every):
            if brk is not None and events >= brk:
                break
            i = g.produced
            if sim.itl:  # each token takes its itl, also when two go out in one event
                steps = size if i else size - 1
                if steps:
                    deadline += steps * sim.itl
                    await _sleep_until(deadline)
            elif events % 64 == 63:
                await asyncio.sleep(0)  # itl 0: still let other requests run
            await response.send(st.token_event(head, chat, i, size))
            g.produced += size
            events += 1
        if brk is not None and events >= brk:
            request.transport.close()  # abrupt: no finish event, no usage, no [DONE]
            return
        g.reason = p["reason"]
        await response.send(st.finish_event(head, chat, p["reason"]))
        if p["include_usage"]:
            await response.send(st.usage_event(head, usage))
        await response.send("data: [DONE]\n\n")
        await response.eof()


def build_app(served_model_name: str, ttft_ms: float = 20, itl_ms: float = 5,
              max_num_seqs: int = 256, app_name: str | None = None,
              enable_sleep_mode: bool = False, runner: str = "generate",
              merge_every: int = 4, api_key: str | None = None) -> Sanic:
    """Build a simulator app serving ``served_model_name`` (unique Sanic name per call).
    With ``api_key`` every ``/v1`` route needs ``Authorization: Bearer <api_key>``
    (vLLM's --api-key), else 401 ``{"error": "Unauthorized"}``, as vLLM answers."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    app = Sanic(app_name or f"sim_{uuid.uuid4().hex}")
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # Sanic's 60 s would cut long queues/streams
    app.config.KEEP_ALIVE_TIMEOUT = KEEP_ALIVE_TIMEOUT_S
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 1.0
    app.config.FALLBACK_ERROR_FORMAT = "json"
    sim = app.ctx.sim = SimState(served_model_name, ttft_ms, itl_ms, max_num_seqs, merge_every)
    sleep = add_sleep_routes(app) if enable_sleep_mode else None

    @app.on_request
    async def _faults(request: Request):
        if request.method == "POST":
            sim.requests_total += 1
        if api_key is not None and request.path.startswith("/v1") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            sim.unauthorized_total += 1
            return _json({"error": "Unauthorized"}, status=401)
        delay = st.header_number(request.headers, "x-sim-delay-ms")
        if delay:
            await asyncio.sleep(delay / 1000)
        code = st.header_number(request.headers, "x-sim-status")
        if code is not None:
            if code != int(code) or not 200 <= code <= 599:
                raise st.SimError(f"Invalid x-sim-status header: {code}", param="x-sim-status")
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

    async def chat(request):
        return await _generate(request, True)

    async def completions(request):
        return await _generate(request, False)

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

    if runner == "generate":
        app.add_route(chat, "/v1/chat/completions", methods=["POST"])
        app.add_route(completions, "/v1/completions", methods=["POST"])
    else:
        app.add_route(embeddings, "/v1/embeddings", methods=["POST"])

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
                 "waiting": sim.waiting, "cancelled_total": sim.cancelled_total,
                 "unauthorized_total": sim.unauthorized_total}
        if sleep is not None:
            stats.update(sleeping=sleep.sleeping, sleeps_total=sleep.sleeps_total,
                         wakes_total=sleep.wakes_total)
        return _json(stats)

    @app.exception(st.SimError)
    async def refused(_request, exc):
        return _refused(exc)

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


def _bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) but not listening: connections to it are refused,
    as vLLM's are while it starts, yet a port in use fails now. Sanic's server listens on
    it (asyncio's create_server calls listen())."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(port: int, served_model_name: str, host: str = "127.0.0.1", ttft_ms: float = 20,
        itl_ms: float = 5, startup_s: float = 0, max_num_seqs: int = 256,
        enable_sleep_mode: bool = False, runner: str = "generate",
        merge_every: int = 4, api_key: str | None = None) -> None:
    """Serve the simulator in this one process until SIGTERM/SIGINT, then exit cleanly.

    The port is bound at once but listened on only after ``startup_s`` (connections are
    refused until then, as vLLM's). A signal before Sanic has installed its own handlers
    (after_server_start runs after that) just ends the process; /health stays 503 in
    that instant after listening starts, so a healthy simulator always stops gracefully.
    """
    app = build_app(served_model_name, ttft_ms, itl_ms, max_num_seqs,
                    enable_sleep_mode=enable_sleep_mode, runner=runner,
                    merge_every=merge_every, api_key=api_key)
    sim: SimState = app.ctx.sim
    sim.serving = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os._exit(0))  # replaced by Sanic's graceful handler
    sock = _bound_socket(host, port)
    if startup_s:
        print(f"vLLM simulator starting: listening on {host}:{port} in {startup_s:g} s",
              flush=True)
        time.sleep(startup_s)

    @app.after_server_start
    async def _serving(_app):
        sim.serving = True
        print(f"vLLM simulator serving {served_model_name!r} ({runner}) on "
              f"http://{host}:{port}", flush=True)

    app.run(sock=sock, single_process=True, access_log=False, motd=False)


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
                        help="seconds after launch before the port listens; connections are "
                             "refused until then, as vLLM's (default %(default)s)")
    parser.add_argument("--max-num-seqs", type=st.arg_number(int, 1), default=256,
                        help="requests generating at once; the rest wait (default %(default)s)")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="serve vLLM's /sleep, /wake_up and /is_sleeping")
    parser.add_argument("--runner", choices=RUNNERS, default="generate",
                        help="generate: chat/completions; pooling: embeddings; the other's "
                             "routes are 404, as with vLLM (default %(default)s)")
    parser.add_argument("--merge-every", type=st.arg_number(int, 0), default=4,
                        help="every N-th stream content event carries two tokens, as vLLM's "
                             "sometimes do; 0: one token per event (default %(default)s)")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes "
                                          "(vLLM's --api-key)")


def main_from_args(args: argparse.Namespace) -> None:
    run(port=args.port, served_model_name=args.served_model_name, host=args.host,
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, startup_s=args.startup_s,
        max_num_seqs=args.max_num_seqs, enable_sleep_mode=args.enable_sleep_mode,
        runner=args.runner, merge_every=args.merge_every, api_key=args.api_key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_simulator",
                                     description="Simulate a vLLM OpenAI-compatible server.")
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()

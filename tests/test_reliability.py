"""The regression net for the hardening work: real processes, real sockets, hostile inputs.

Every scenario runs against a real gateway subprocess (``start_gateway``) in front of real
simulator subprocesses, tiny raw TCP servers that misbehave on purpose, or process-backend
models; clients are raw sockets wherever an HTTP client would normalise what must be sent
as is. After every scenario ``assert_invariants(gw)`` checks that admission settled (queue
depth, in flight and drift all 0 for every model), that no model has waiters beside a free
slot (``gateway_admission_stalled_seconds`` 0) and that a normal chat completion still
works. Scenarios that end the gateway check what is left to check: every request answered,
exit code 0, no model server left behind.

Gateways are shared per module where the scenarios don't interfere (``gw``: paths,
admission, retries, garbage upstreams, client input, hooks, fuzz; ``limits_gw``: the
resource bounds); the ones that are signalled, drained or need their own settings are
started per test. Every request has a client-side bound: a hang is a failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers import (
    REPO,
    free_port,
    pid_alive,
    sim_command,
    start_gateway,
    start_simulator,
    wait_until,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(90)

HEALTHY = "sim-r"  # the fast simulator's served name; a static model of every shared gateway
EMBED = "sim-r-embed"  # a pooling simulator's (vLLM serves embeddings only with --runner pooling)
CHAT = [{"role": "user", "content": "hello there"}]
FAST = ("--ttft-ms", "2", "--itl-ms", "1", "--startup-s", "0.2")
UPSTREAM_TIMEOUT_S = 1.5  # the shared gateway's upstream.timeout_s
RETRIES = 2
OWNER = "VLLM_GATEWAY_OWNER"
HOOK_MODULE = "reliability_hook_plugin"


# --- raw HTTP over sockets ---------------------------------------------------------------------

@dataclass
class RawReply:
    """One HTTP answer read off a socket: ``status`` None when nothing (or no full head)
    came back before the peer closed."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names, last one wins
    head: bytes = b""
    body: bytes = b""  # de-chunked when chunk-framed
    raw: bytes = b""  # every byte received
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before it

    def json(self):
        return json.loads(self.body)


def build_request(path: str, body: bytes = b"", headers: list[tuple[str, str]] = (),
                  method: str = "POST", version: str = "1.1", close: bool = True,
                  content_type: bool = True) -> bytes:
    """Bytes of one request, exactly as given (latin-1: control characters pass)."""
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if content_type and method == "POST":
        lines.append("Content-Type: application/json")
    if method == "POST" and not any(k.lower() == "content-length" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    if close and not any(k.lower() == "connection" for k, _ in headers):
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """(body, complete) of a chunk-framed body."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        size = int(data[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out), True
        start = end + 2
        if len(data) < start + size + 2:
            out += data[start:]
            return bytes(out), False
        out += data[start:start + size]
        pos = start + size + 2


def parse_reply(data: bytes) -> tuple[RawReply, bool]:
    """(reply, complete) from the bytes received so far."""
    interim: list[int] = []
    rest = data
    while True:
        if b"\r\n\r\n" not in rest:
            return RawReply(None, raw=data, interim=interim), False
        head, rest = rest.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            return RawReply(None, head=head, raw=data, interim=interim), False
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            interim.append(status)
            continue
        reply = RawReply(status, headers, head, rest, data, interim)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            reply.body, complete = _dechunk(rest)
            return reply, complete
        if "content-length" in headers:
            n = int(headers["content-length"])
            reply.body = rest[:n]
            return reply, len(rest) >= n
        return reply, False  # read to the close


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> RawReply:
    """Send ``data`` on a fresh connection and read one answer, bounded by ``timeout``.
    A peer that closes (or resets) early gives what arrived; a hang fails the test."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            reply, complete = parse_reply(buf)
            if complete:
                return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no complete answer within {timeout:g}s; got {buf[:300]!r}")
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"no complete answer within {timeout:g}s; got {buf[:300]!r}") from None
            except ConnectionError:
                chunk = b""
            if not chunk:
                return parse_reply(buf)[0]
            buf += chunk


def read_reply(s: socket.socket, buf: bytes = b"") -> RawReply:
    """Read one answer from a blocking socket (its timeout bounds each read), after
    ``buf`` (what was read already); a peer that closes early gives what arrived."""
    while not parse_reply(buf)[1]:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return parse_reply(buf)[0]


class AsyncRaw:
    """One raw connection in asyncio: send, read one answer (bounded), or reset it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def send(cls, port: int, data: bytes) -> AsyncRaw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        return cls(reader, writer)

    async def reply(self, timeout: float) -> RawReply:
        buf = b""

        async def read() -> RawReply:
            nonlocal buf
            while True:
                reply, complete = parse_reply(buf)
                if complete:
                    return reply
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    return parse_reply(buf)[0]
                buf += chunk
        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(f"no answer within {timeout:g}s; got {buf[:300]!r}") from None
        finally:
            self.writer.close()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a client that crashed would."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def chat_body(model: str = HEALTHY, **extra) -> bytes:
    return json.dumps({"model": model, "messages": CHAT, "max_tokens": 3, **extra}).encode()


def openai_error(body: bytes | str | dict, context: object = "") -> dict:
    """The ``error`` object of an OpenAI error body; fails the test on any other shape."""
    try:
        obj = body if isinstance(body, dict) else json.loads(body)
    except ValueError:
        raise AssertionError(f"not a JSON error body ({context}): {body[:300]!r}") from None
    assert isinstance(obj, dict) and isinstance(obj.get("error"), dict), (context, obj)
    err = obj["error"]
    assert isinstance(err.get("message"), str) and err["message"], (context, err)
    assert isinstance(err.get("type"), str) and err["type"], (context, err)
    assert "code" in err, (context, err)
    return err


# --- gateway observations -----------------------------------------------------------------------

def per_model(text: str, name: str) -> dict[str, float]:
    """{model: value} of a per-model metric."""
    return {s.labels.get("model", ""): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


def sim_requests(sim) -> int:
    return httpx.get(f"{sim.url}/sim/stats", timeout=5, trust_env=False).json()["requests_total"]


def admitted(gw) -> float:
    return gw.metric("gateway_admission_admitted_total")


def model_state(gw, model: str) -> str:
    return gw.status()["models"][model]["state"]


def assert_invariants(gw, healthy: str = HEALTHY, settle_s: float = 5.0) -> None:
    """Admission settled everywhere, work-conserving, and the gateway still serves."""
    last: dict = {}

    def settled() -> bool:
        nonlocal last
        models = gw.status()["models"]
        last = {n: {k: m[k] for k in ("queue_depth", "in_flight", "drift")}
                for n, m in models.items() if m["queue_depth"] or m["in_flight"] or m["drift"]}
        return not last
    try:
        wait_until(settled, settle_s, what="admission to settle")
    except AssertionError:
        raise AssertionError(f"admission did not settle within {settle_s:g}s: {last}") from None
    stalled = per_model(gw.metrics(), "gateway_admission_stalled_seconds")
    assert stalled and not any(stalled.values()), f"admission stalled: {stalled}"
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False,
                   json={"model": healthy, "messages": CHAT, "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion", body
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"].split()) == 3, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3, body


async def await_model(client: httpx.AsyncClient, gw, model: str, pred, timeout: float,
                      what: str) -> dict:
    """Poll /gateway/status (without blocking the loop) until ``pred(entry)``."""
    deadline = time.monotonic() + timeout
    while True:
        entry = (await client.get(f"{gw.url}/gateway/status")).json()["models"][model]
        if pred(entry):
            return entry
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}: {entry}")
        await asyncio.sleep(0.02)


def environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def marked_by(owner_pid: int) -> list[int]:
    """Live processes whose environment carries ``VLLM_GATEWAY_OWNER=<owner_pid>:``."""
    marker = f"{OWNER}={owner_pid}:".encode()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and pid_alive(int(d))
            and any(item.startswith(marker) for item in environ_of(int(d)).split(b"\0"))]


def kill_marked(owner_pid: int) -> None:
    for pid in marked_by(owner_pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# --- misbehaving upstreams ----------------------------------------------------------------------

BIG_CONTENT = 20_000_000


def big_body() -> bytes:
    return (b'{"id":"big","object":"chat.completion","created":0,"model":"g-big","choices":'
            b'[{"index":0,"message":{"role":"assistant","content":"' + b"x" * BIG_CONTENT +
            b'"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')


class RawUpstreams:
    """Tiny asyncio TCP servers, one per misbehaviour, on a thread of their own.
    ``posts[behaviour]`` counts POST requests each has read."""

    BEHAVIOURS = ("nonhttp", "bighdr", "trunc", "reset", "hang", "big", "slowsse", "stallsse")

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.posts: Counter[str] = Counter()
        self.big = big_body()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def url(self, behaviour: str) -> str:
        return f"http://127.0.0.1:{self.ports[behaviour]}"

    async def _start(self) -> None:
        self.servers = []
        for b in self.BEHAVIOURS:
            srv = await asyncio.start_server(lambda r, w, b=b: self._handle(b, r, w),
                                             "127.0.0.1", 0)
            self.ports[b] = srv.sockets[0].getsockname()[1]
            self.servers.append(srv)

    async def _handle(self, behaviour: str, reader, writer) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            if head.startswith(b"POST "):
                self.posts[behaviour] += 1
            if behaviour == "nonhttp":
                writer.write(b"\x00\x01\x02 SSH-2.0-definitely-not-http \xff\xfe\r\n\r\n")
            elif behaviour == "bighdr":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: " +
                             b"a" * 100_000 + b"\r\ncontent-length: 2\r\n\r\n{}")
            elif behaviour == "trunc":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n" + b'{"id":"tr"')
            elif behaviour == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            elif behaviour == "hang":
                await asyncio.wait_for(reader.read(), 30)  # until the gateway gives up
            elif behaviour in ("slowsse", "stallsse"):
                # An event every 0.5 s (slowsse: 6 then [DONE], 3 s in all, longer than
                # the read timeout but no gap as long); stallsse: 2, then nothing.
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i in range(6 if behaviour == "slowsse" else 2):
                    event = (b'data: {"id":"s","object":"chat.completion.chunk","choices":'
                             b'[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i)
                    writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(0.5)
                if behaviour == "stallsse":
                    await asyncio.wait_for(reader.read(), 30)  # until the gateway gives up
                else:
                    done = b"data: [DONE]\n\n"
                    writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
            elif behaviour == "big":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\n"
                             b"content-length: %d\r\n\r\n" % len(self.big))
                writer.write(self.big)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop():
            for srv in self.servers:
                srv.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- the hook plugin ----------------------------------------------------------------------------

HOOK_SOURCE = '''
"""admit_request tries to change what is forwarded; records what it was refused."""
import json

from gateway import hookimpl

RECORD = {record!r}


def _tries(request):
    body, headers = request.body, request.headers
    return {{
        "body_setitem": lambda: body.__setitem__("model", "evil"),
        "body_delitem": lambda: body.__delitem__("messages"),
        "body_update": lambda: body.update({{"model": "evil"}}),
        "body_nested_setitem": lambda: body["messages"][0].__setitem__("content", "evil"),
        "body_list_append": lambda: body["messages"].append({{"role": "user", "content": "x y"}}),
        "body_list_setitem": lambda: body["messages"].__setitem__(0, {{"role": "user"}}),
        "headers_setitem": lambda: headers.__setitem__("x-injected", "1"),
        "headers_delitem": lambda: headers.__delitem__("x-probe"),
        "headers_update": lambda: headers.update({{"x-probe": "changed"}}),
        "request_body_attr": lambda: setattr(request, "body", {{"model": "evil"}}),
        "request_headers_attr": lambda: setattr(request, "headers", {{"x-injected": "1"}}),
    }}


@hookimpl
def admit_request(request, model):
    if request.model != "hooked":
        return None
    results = {{}}
    for name, attempt in _tries(request).items():
        try:
            attempt()
            results[name] = "allowed"
        except (TypeError, AttributeError):
            results[name] = "refused"
        except Exception as exc:  # noqa: BLE001 - recorded, never raised into the gateway
            results[name] = "raised " + type(exc).__name__
    with open(RECORD, "a") as fh:
        fh.write(json.dumps(results) + "\\n")
    return None
'''


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    with start_simulator(HEALTHY, ttft_ms=2, itl_ms=1) as s:
        yield s


@pytest.fixture(scope="module")
def embed_sim():
    with start_simulator(EMBED, ttft_ms=2, runner="pooling") as s:
        yield s


@pytest.fixture(scope="module")
def raw_upstreams():
    servers = RawUpstreams()
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def gw(sim, embed_sim, raw_upstreams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    plugin_dir = tmp / "plugins"
    plugin_dir.mkdir()
    record = tmp / "hook-record.jsonl"
    (plugin_dir / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE.format(record=str(record)))
    static = {"backend": "static", "url": sim.url, "served_model_name": HEALTHY}
    config = {
        "idle_timeout_s": 600,
        "server_logs": {"dir": str(tmp / "server-logs")},
        "plugins": {"modules": [HOOK_MODULE]},
        "upstream": {"retries": RETRIES, "backoff_s": 0.05, "backoff_multiplier": 1,
                     "connect_timeout_s": 2, "timeout_s": UPSTREAM_TIMEOUT_S,
                     "health_interval_s": 0.05, "start_timeout_s": 20},
        "models": [
            {"name": HEALTHY, "backend": "static", "url": sim.url},
            {"name": EMBED, "backend": "static", "url": embed_sim.url},
            {"name": "one", **static, "max_concurrent": 1, "max_queue": 4},
            {"name": "hooked", **static},
            {"name": "dead", "backend": "static", "url": f"http://127.0.0.1:{free_port()}"},
            *({"name": f"g-{b}", "backend": "static", "url": raw_upstreams.url(b)}
              for b in ("nonhttp", "bighdr", "trunc", "reset", "hang", "slowsse", "stallsse")),
            {"name": "cold", "backend": "process", "command": sim_command(*FAST)},
        ],
    }
    env = {"PYTHONPATH": os.pathsep.join((str(REPO), str(plugin_dir)))}
    with start_gateway(config, tmp, env=env) as g:
        g.hook_record = record
        yield g
    assert not g.orphans, g.orphans


@pytest.fixture(scope="module")
def limits_gw(sim, raw_upstreams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    config = {
        "limits": {"header_timeout_s": 2, "body_timeout_s": 2, "max_connections": 20,
                   "max_body_buffer_bytes": 4_000_000,
                   "max_buffered_response_bytes": 1_000_000},
        "upstream": {"retries": 1, "backoff_s": 0.05, "timeout_s": 10},
        "models": [{"name": HEALTHY, "backend": "static", "url": sim.url},
                   {"name": "g-big", "backend": "static", "url": raw_upstreams.url("big")}],
    }
    with start_gateway(config, tmp) as g:
        yield g


# --- 1. path traversal --------------------------------------------------------------------------

TRAVERSALS = ["/v1/../sleep", "/v1/%2e%2e/sleep", "/v1/%2E%2E/sleep", "/v1/.%2e/sleep",
              "/v1/chat/../../sleep", "/v1/%2fsleep", "/v1/chat%2fcompletions",
              "/v1/./chat/completions", "//v1/chat/completions", "/v1/chat/completions/..",
              "/v1\\..\\sleep", "/v1/chat/completions;x=1"]
OUTSIDE = ["/v1/sleep", "/v1/collective_rpc", "/v1/anything", "/sleep", "/collective_rpc"]


def test_path_traversal_never_reaches_the_model_server(gw, sim):
    failures = []
    for path in TRAVERSALS + OUTSIDE:
        before = sim_requests(sim)
        reply = raw_http(gw.port, build_request(path, chat_body()))
        reached = sim_requests(sim) - before
        allowed = (404,) if path in OUTSIDE else (400, 404)
        problem = None
        if reply.status not in allowed:
            problem = f"status {reply.status} (want {allowed})"
        else:
            try:
                openai_error(reply.body, path)
            except AssertionError as exc:
                problem = f"body not an OpenAI error: {exc}"
        if reached:
            problem = (problem or "") + f"; simulator got {reached} request(s)"
        if problem:
            failures.append(f"POST {path!r}: {problem}; body {reply.body[:200]!r}")
    assert not failures, "\n".join(failures)
    assert model_state(gw, HEALTHY) == "ready"
    assert_invariants(gw)


# --- 2. admission liveness under cancellation ---------------------------------------------------

async def test_admission_stays_live_when_queued_clients_reset(gw):
    """max_concurrent 1, max_queue 4: one in flight, two queued, one queued client resets
    its TCP connection (at a random moment), the in-flight one finishes and a new one
    arrives at once. Every live request completes within the delay budget."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    delay_ms = 500
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for round_no in range(5):
            victim_index = rng.randrange(2)
            when = rng.choice(["at_once", "as_first_finishes", "after_first_finished"])
            ctx = f"seed {seed}, round {round_no}: reset queued #{victim_index} {when}"
            started = time.monotonic()
            first = await AsyncRaw.send(gw.port, build_request(
                "/v1/chat/completions", chat_body("one"), [("X-Sim-Delay-Ms", str(delay_ms))]))
            await await_model(client, gw, "one", lambda m: m["in_flight"] == 1, 5,
                              f"the first request in flight ({ctx})")
            queued = []
            for i in range(2):
                queued.append(await AsyncRaw.send(gw.port, build_request(
                    "/v1/chat/completions", chat_body("one"))))
                await await_model(client, gw, "one", lambda m, n=i + 1: m["queue_depth"] == n,
                                  5, f"{i + 1} queued ({ctx})")
            victim = queued[victim_index]
            survivor = queued[1 - victim_index]
            if when == "at_once":
                victim.reset()
            elif when == "as_first_finishes":
                left = delay_ms / 1000 - (time.monotonic() - started)
                await asyncio.sleep(max(0.0, left - 0.01))
                victim.reset()
            budget = delay_ms / 1000 + 3.0
            first_reply = await first.reply(budget)
            if when == "after_first_finished":
                victim.reset()
            late = await AsyncRaw.send(gw.port, build_request("/v1/chat/completions",
                                                              chat_body("one")))
            for name, conn in (("survivor", survivor), ("late", late)):
                left = budget - (time.monotonic() - started)
                reply = await conn.reply(max(0.1, left))
                assert reply.status == 200, (ctx, name, reply.status, reply.body[:300])
                assert reply.json()["object"] == "chat.completion", (ctx, name)
            assert first_reply.status == 200, (ctx, "first", first_reply.body[:300])
            took = time.monotonic() - started
            assert took < budget, (ctx, took)
            assert_invariants(gw)


# --- 3. orphans and signals ---------------------------------------------------------------------

SIGNAL_CASES = {
    "sigterm-twice-0ms": [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.0)],
    "sigterm-twice-50ms": [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05)],
    "sigterm-twice-300ms": [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.3)],
    "sigint-then-sigterm": [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.05)],
    "sighup": [(signal.SIGHUP, 0.0)],
    "sigkill": [(signal.SIGKILL, 0.0)],
}


@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signals_leave_no_model_server_behind(case, tmp_path):
    name = f"sig-{case}"
    config = {"upstream": {"health_interval_s": 0.05, "start_timeout_s": 20},
              "server_logs": {"dir": str(tmp_path / "server-logs")},
              "models": [{"name": name, "backend": "process", "command": sim_command(*FAST)}]}
    gw = start_gateway(config, tmp_path)
    pid = gw.proc.pid
    try:
        assert_invariants(gw, healthy=name)  # also makes the model ready (a cold start)
        assert model_state(gw, name) == "ready"
        assert marked_by(pid), "no model-server process carries the owner marker"
        for sig, pause in SIGNAL_CASES[case]:
            time.sleep(pause)
            os.kill(pid, sig)
        if case == "sighup":
            time.sleep(0.5)
            assert gw.proc.poll() is None, f"SIGHUP killed the gateway:\n{gw.log_text()[-2000:]}"
            assert httpx.get(f"{gw.url}/health", timeout=5, trust_env=False).status_code == 200
            assert_invariants(gw, healthy=name)
            assert gw.stop() == 0, gw.log_text()[-2000:]
        elif case == "sigkill":
            gw.proc.wait(5)
            wait_until(lambda: not marked_by(pid), 5,
                       what="the SIGKILLed gateway's model servers to go away")
            return
        else:
            try:
                code = gw.proc.wait(15)
            except Exception:
                raise AssertionError(f"{case}: gateway did not exit within 15 s") from None
            assert code == 0, f"{case}: exit code {code}\n{gw.log_text()[-2000:]}"
        try:
            wait_until(lambda: not marked_by(pid), 1.0, what="model servers to be gone")
        except AssertionError:
            raise AssertionError(f"{case}: model-server processes left after the gateway "
                                 f"exited: {marked_by(pid)}") from None
        assert not gw.orphans
    finally:
        gw.stop()
        kill_marked(pid)


# --- 4. retries -------------------------------------------------------------------------------------

def test_retries_only_where_the_request_never_arrived(gw, sim):
    url = f"{gw.url}/v1/chat/completions"
    # a read timeout: 504, and never sent twice
    before = sim_requests(sim)
    started = time.monotonic()
    r = httpx.post(url, timeout=15, trust_env=False, content=chat_body(),
                   headers={"X-Sim-Delay-Ms": str(int(UPSTREAM_TIMEOUT_S * 1000 + 1500)),
                            "Content-Type": "application/json"})
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    openai_error(r.content, "read timeout")
    assert took < UPSTREAM_TIMEOUT_S + 1.0, took
    time.sleep(0.2)
    assert sim_requests(sim) - before == 1, "a timed-out request was sent again"

    # an HTTP 503 from the server: passed through, delivered once
    before = sim_requests(sim)
    r = httpx.post(url, timeout=10, trust_env=False, content=chat_body(),
                   headers={"X-Sim-Status": "503", "Content-Type": "application/json"})
    assert r.status_code == 503, r.text
    err = openai_error(r.content, "sim 503")
    assert "Simulated error" in err["message"], err
    assert sim_requests(sim) - before == 1

    # a refused connection: retried `retries` times, then 503
    retries_before = gw.metric("gateway_upstream_retries_total", model="dead", kind="connect")
    r = httpx.post(url, timeout=15, trust_env=False, json={"model": "dead", "messages": CHAT})
    assert r.status_code == 503, r.text
    err = openai_error(r.content, "refused")
    assert f"after {RETRIES + 1} attempt" in err["message"], err
    retries = gw.metric("gateway_upstream_retries_total", model="dead", kind="connect")
    assert retries - retries_before == RETRIES
    assert_invariants(gw)


# --- 5. upstream garbage --------------------------------------------------------------------------

@pytest.mark.parametrize("behaviour,status", [("nonhttp", 502), ("bighdr", 502), ("trunc", 502),
                                              ("reset", 502), ("hang", 504)])
def test_garbage_upstream_becomes_a_clean_error(gw, raw_upstreams, behaviour, status):
    model = f"g-{behaviour}"
    errors_before = gw.metric("gateway_upstream_errors_total", model=model)
    posts_before = raw_upstreams.posts[behaviour]
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=15, trust_env=False,
                   json={"model": model, "messages": CHAT, "max_tokens": 3})
    took = time.monotonic() - started
    assert r.status_code == status, (behaviour, r.status_code, r.text[:300])
    openai_error(r.content, behaviour)
    assert took < UPSTREAM_TIMEOUT_S + 2.0, (behaviour, took)
    assert gw.metric("gateway_upstream_errors_total", model=model) > errors_before
    time.sleep(0.1)
    assert raw_upstreams.posts[behaviour] - posts_before == 1, "a maybe-sent request was resent"
    assert_invariants(gw)


async def test_stream_broken_by_upstream_ends_with_sse_error_event(gw):
    errors_before = gw.metric("gateway_upstream_errors_total", model=HEALTHY)
    body = {"model": HEALTHY, "messages": CHAT, "max_tokens": 10, "stream": True}
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                                 headers={"X-Sim-Break-After": "3"}) as r:
            assert r.status_code == 200
            raw = await asyncio.wait_for(r.aread(), 10)
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert "data: [DONE]" not in events, events
    last = events[-1]
    assert last.startswith("data: {"), events
    openai_error(last[len("data: "):], "stream break")
    assert gw.metric("gateway_upstream_errors_total", model=HEALTHY) > errors_before
    assert_invariants(gw)


async def test_stream_read_timeout_is_the_gap_between_events_not_the_whole_stream(gw):
    """upstream.timeout_s (1.5 s here) bounds the silence between a stream's bytes: a
    stream 3 s long with an event every 0.5 s completes; one that goes silent ends with
    an SSE error event (read_timeout) about that long after its last byte."""
    async def stream(model: str) -> tuple[list[str], float]:
        body = {"model": model, "messages": CHAT, "stream": True}
        async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
            started = time.monotonic()
            async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                raw = await asyncio.wait_for(r.aread(), 20)
        return [e for e in raw.decode().split("\n\n") if e.strip()], time.monotonic() - started

    timeouts_before = gw.metric("gateway_upstream_errors_total", model="g-stallsse",
                                kind="read_timeout")
    events, took = await stream("g-slowsse")
    assert events[-1] == "data: [DONE]" and len(events) == 7, events
    assert took >= 2.5
    events, took = await stream("g-stallsse")
    assert "data: [DONE]" not in events and len(events) == 3, events
    err = openai_error(events[-1][len("data: "):], "stall")
    assert "read_timeout" in err["message"]
    # Its last byte comes at 0.5 s; the stream ends one timeout after (lazily re-armed:
    # at most one more timeout late).
    assert 0.5 + UPSTREAM_TIMEOUT_S - 0.1 <= took < 0.5 + 2 * UPSTREAM_TIMEOUT_S + 1
    assert gw.metric("gateway_upstream_errors_total", model="g-stallsse",
                     kind="read_timeout") == timeouts_before + 1
    assert_invariants(gw)


# --- 6. client input ------------------------------------------------------------------------------

BAD_INPUTS = {
    "nested-lists": (b"[" * 50000, []),
    "nested-objects": (b'{"a":' * 20000, []),
    "control-char-header": (chat_body("cold"), [("X-Bad", "a\x01b")]),
    "stream-yes": (chat_body("cold", stream="yes"), []),
    "stream-1": (chat_body("cold", stream=1), []),
    "stream-true-string": (chat_body("cold", stream="true"), []),
    "model-missing": (json.dumps({"messages": CHAT}).encode(), []),
    "model-number": (json.dumps({"model": 7, "messages": CHAT}).encode(), []),
    "model-list": (json.dumps({"model": ["cold"], "messages": CHAT}).encode(), []),
    "model-null": (json.dumps({"model": None, "messages": CHAT}).encode(), []),
    "not-json": (b"model=cold&stream=true", []),
    "json-array": (b'["cold"]', []),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_client_input_is_refused_before_admission(gw, case):
    body, headers = BAD_INPUTS[case]
    admitted_before = admitted(gw)
    reply = raw_http(gw.port, build_request("/v1/chat/completions", body, headers))
    assert reply.status == 400, (case, reply.status, reply.body[:300])
    openai_error(reply.body, case)
    assert admitted(gw) == admitted_before, f"{case}: admitted before being refused"
    assert model_state(gw, "cold") == "stopped", f"{case}: caused a cold start"
    assert_invariants(gw)


def test_oversized_header_is_431(gw):
    admitted_before = admitted(gw)
    reply = raw_http(gw.port, build_request("/v1/chat/completions", chat_body("cold"),
                                            [("X-Large", "a" * 9000)]))
    assert reply.status == 431, (reply.status, reply.body[:300])
    err = openai_error(reply.body, "431")
    assert "body" not in err["message"].lower(), err
    assert admitted(gw) == admitted_before
    assert model_state(gw, "cold") == "stopped"
    assert_invariants(gw)


def test_expect_100_continue_is_not_forwarded(gw):
    body = chat_body()
    head = build_request("/v1/chat/completions", b"", [
        ("Content-Length", str(len(body))), ("Expect", "100-continue"),
        ("X-Sim-Echo-Headers", "1")])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(1.5)
        first = b""
        with contextlib.suppress(TimeoutError):
            first = s.recv(65536)  # "100 Continue" if the gateway sends one
        s.sendall(body)
        s.settimeout(10)
        reply = read_reply(s, first)
    assert reply.status == 200, (reply.status, reply.raw[:300])
    received = reply.json()["received_headers"]
    assert "expect" not in received, received
    assert_invariants(gw)


def test_headers_named_in_connection_are_not_forwarded(gw):
    reply = raw_http(gw.port, build_request("/v1/chat/completions", chat_body(), [
        ("Connection", "close, X-Hop"), ("X-Hop", "1"), ("X-Keep", "2"),
        ("X-Sim-Echo-Headers", "1")]))
    assert reply.status == 200, (reply.status, reply.body[:300])
    received = reply.json()["received_headers"]
    assert received.get("x-keep") == "2", received
    assert "x-hop" not in received, received
    assert_invariants(gw)


def test_http10_client_gets_an_unchunked_stream(gw):
    reply = raw_http(gw.port, build_request("/v1/chat/completions", chat_body(stream=True),
                                            version="1.0", close=False))
    assert reply.status == 200, (reply.status, reply.raw[:300])
    assert "chunked" not in reply.headers.get("transfer-encoding", ""), reply.head
    assert b"data: [DONE]" in reply.body, reply.body[-300:]
    assert reply.body.startswith(b"data: {"), reply.body[:300]
    assert_invariants(gw)


# --- 7. unbounded resources ---------------------------------------------------------------------

def _closed_or(reply: RawReply, status: int) -> bool:
    return reply.status is None or reply.status == status


def test_stalled_body_is_cut_off(limits_gw):
    started = time.monotonic()
    reply = raw_http(limits_gw.port, build_request(
        "/v1/chat/completions", b'{"model": ', [("Content-Length", "1000")]), timeout=2 + 4)
    took = time.monotonic() - started
    assert _closed_or(reply, 408), (reply.status, reply.raw[:300])
    if reply.status:
        openai_error(reply.body, "408 body")
    assert took < 2 + 3, took
    assert_invariants(limits_gw)


@pytest.mark.parametrize("split_at", [0, 7, -1], ids=["headers-alone", "mid-body", "last-byte"])
def test_a_body_arriving_in_pieces_is_read_whole(limits_gw, split_at):
    """The usual small POST comes with its headers and is read without a timer; one that
    arrives later, in parts, takes the deadline path and is read whole all the same."""
    body = chat_body()
    data = build_request("/v1/chat/completions", body)
    cut = len(data) - len(body) + (split_at % len(body))
    with socket.create_connection(("127.0.0.1", limits_gw.port), timeout=10) as s:
        s.sendall(data[:cut])
        time.sleep(0.3)  # well inside body_timeout_s (2)
        s.sendall(data[cut:])
        reply = read_reply(s)
    assert reply.status == 200, (reply.status, reply.raw[:300])
    assert reply.json()["object"] == "chat.completion"
    assert_invariants(limits_gw)


def test_stalled_headers_are_cut_off(limits_gw):
    started = time.monotonic()
    partial = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ab"
    reply = raw_http(limits_gw.port, partial, timeout=2 + 4)
    took = time.monotonic() - started
    assert _closed_or(reply, 408), (reply.status, reply.raw[:300])
    assert took < 2 + 3, took
    assert_invariants(limits_gw)


async def test_connections_beyond_max_connections_are_refused(limits_gw):
    conns = []
    try:
        for _ in range(40):
            conns.append(await asyncio.open_connection("127.0.0.1", limits_gw.port))

        async def outcome(reader) -> str:
            try:
                data = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                return "open"
            except ConnectionError:
                return "closed"
            if not data:
                return "closed"
            reply, _ = parse_reply(data)
            if reply.status == 503:
                openai_error(reply.body, "too many connections")
                return "503"
            return f"other: {data[:100]!r}"
        outcomes = Counter(await asyncio.gather(*(outcome(r) for r, _ in conns)))
    finally:
        for _, w in conns:
            w.close()
        # closing completes on the loop: wait for it before anything blocks the loop
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    assert outcomes["open"] <= 20, outcomes
    assert outcomes["503"] + outcomes["closed"] >= 20, outcomes
    assert set(outcomes) <= {"open", "503", "closed"}, outcomes
    deadline = time.monotonic() + 3
    while True:
        try:
            async with httpx.AsyncClient(timeout=2, trust_env=False) as fresh:
                status = (await fresh.get(f"{limits_gw.url}/health")).status_code
        except httpx.HTTPError as exc:
            status = repr(exc)
        if status == 200:
            break
        assert time.monotonic() < deadline, f"/health after closing them: {status}"
        await asyncio.sleep(0.05)
    assert_invariants(limits_gw)


async def test_concurrent_large_bodies_share_the_buffer_budget(limits_gw):
    content = "a" * 2_000_000  # one word: well inside the simulator's context length
    payload = json.dumps({"model": HEALTHY, "messages": [{"role": "user", "content": content}],
                          "max_tokens": 2}).encode()
    done = asyncio.Event()
    health_times: list[float] = []

    async def poll_health():
        async with httpx.AsyncClient(timeout=3, trust_env=False) as c:
            while not done.is_set():
                t = time.monotonic()
                r = await c.get(f"{limits_gw.url}/health")
                assert r.status_code == 200, r.text
                health_times.append(time.monotonic() - t)
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        poller = asyncio.create_task(poll_health())
        try:
            replies = await asyncio.wait_for(asyncio.gather(*(
                client.post(f"{limits_gw.url}/v1/chat/completions", content=payload,
                            headers={"Content-Type": "application/json"})
                for _ in range(6))), 30)
        finally:
            done.set()
        await asyncio.wait_for(poller, 5)
    for r in replies:
        if r.status_code == 200:
            assert r.json()["usage"]["prompt_tokens"] == 1, r.text[:300]
        else:
            assert 400 <= r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)
            openai_error(r.content, "large body")
    assert sum(r.status_code == 200 for r in replies) >= 1, [r.status_code for r in replies]
    assert health_times and max(health_times) < 2.0, health_times
    assert_invariants(limits_gw)


def test_large_upstream_answer_reaches_the_client_intact(limits_gw, raw_upstreams):
    r = httpx.post(f"{limits_gw.url}/v1/chat/completions", timeout=60, trust_env=False,
                   json={"model": "g-big", "messages": CHAT})
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == len(raw_upstreams.big)
    assert r.content == raw_upstreams.big
    assert_invariants(limits_gw)


# --- 8. SIGTERM with requests queued and in flight ------------------------------------------------

async def _assert_draining(gw) -> None:
    """On fresh connections: /ready is 503 and a proxied request gets 503 shutting_down."""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as fresh:
        ready = await fresh.get(f"{gw.url}/ready")
        assert ready.status_code == 503, ready.text
    async with httpx.AsyncClient(timeout=5, trust_env=False) as fresh:
        late = await fresh.post(f"{gw.url}/v1/chat/completions",
                                json={"model": HEALTHY, "messages": CHAT, "max_tokens": 1})
        assert late.status_code == 503, late.text
        assert openai_error(late.content, "late")["code"] == "shutting_down"
        assert "retry-after" in late.headers


async def test_sigterm_rejects_queued_and_finishes_in_flight(sim, tmp_path):
    config = {"models": [{"name": HEALTHY, "backend": "static", "url": sim.url},
                         {"name": "q", "backend": "static", "url": sim.url,
                          "served_model_name": HEALTHY, "max_concurrent": 1, "max_queue": 8}]}
    gw = start_gateway(config, tmp_path)
    try:
        assert_invariants(gw)
        async with httpx.AsyncClient(timeout=15, trust_env=False) as client:
            url = f"{gw.url}/v1/chat/completions"
            body = {"model": "q", "messages": CHAT, "max_tokens": 3}
            in_flight = asyncio.create_task(client.post(url, json=body,
                                                        headers={"X-Sim-Delay-Ms": "1500"}))
            await await_model(client, gw, "q", lambda m: m["in_flight"] == 1, 5, "one in flight")
            queued = [asyncio.create_task(client.post(url, json=body)) for _ in range(5)]
            await await_model(client, gw, "q", lambda m: m["queue_depth"] == 5, 5, "5 queued")
            started = time.monotonic()
            os.kill(gw.proc.pid, signal.SIGTERM)
            rejected = await asyncio.wait_for(asyncio.gather(*queued), 5)
            took = time.monotonic() - started
            for r in rejected:
                assert r.status_code == 503, r.text
                assert openai_error(r.content, "queued")["code"] == "shutting_down"
                assert "retry-after" in r.headers, r.headers
            assert took < 1.0, f"queued requests answered {took:.2f}s after SIGTERM"
            assert not in_flight.done(), "the in-flight request ended early"
            await _assert_draining(gw)
            r = await asyncio.wait_for(in_flight, 5)
            assert r.status_code == 200, r.text
            assert r.json()["object"] == "chat.completion"
        try:
            code = await asyncio.to_thread(gw.proc.wait, 15)
        except Exception:
            raise AssertionError("gateway did not exit within 15 s of SIGTERM") from None
        assert code == 0, gw.log_text()[-2000:]
    finally:
        gw.stop()


async def test_sigterm_grace_ends_an_open_stream_with_an_error_event(tmp_path):
    with start_simulator(HEALTHY, ttft_ms=0, itl_ms=100) as slow:
        config = {"shutdown_grace_s": 1,
                  "models": [{"name": HEALTHY, "backend": "static", "url": slow.url}]}
        gw = start_gateway(config, tmp_path)
        try:
            assert_invariants(gw)
            body = {"model": HEALTHY, "messages": CHAT, "max_tokens": 100, "stream": True}
            async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                async with client.stream("POST", f"{gw.url}/v1/chat/completions",
                                         json=body) as r:
                    assert r.status_code == 200
                    raw = b""
                    chunks = r.aiter_raw()
                    while raw.count(b"\n\n") < 3:  # role chunk + 2 tokens
                        raw += await asyncio.wait_for(chunks.__anext__(), 5)
                    started = time.monotonic()
                    os.kill(gw.proc.pid, signal.SIGTERM)
                    await _assert_draining(gw)

                    async def rest() -> bytes:
                        out = b""
                        async for chunk in chunks:
                            out += chunk
                        return out
                    raw += await asyncio.wait_for(rest(), 8)
                    took = time.monotonic() - started
            events = [e for e in raw.decode().split("\n\n") if e.strip()]
            assert "data: [DONE]" not in events
            last = events[-1]
            assert last.startswith("data: {"), events[-3:]
            err = openai_error(last[len("data: "):], "stream at shutdown")
            assert err["code"] == "shutting_down", err
            assert took < 1 + 3.5, took
            try:
                code = await asyncio.to_thread(gw.proc.wait, 15)
            except Exception:
                raise AssertionError("gateway did not exit within 15 s of SIGTERM") from None
            assert code == 0, gw.log_text()[-2000:]
        finally:
            gw.stop()


# --- 9. concurrent starts -------------------------------------------------------------------------

async def test_a_hung_start_does_not_block_another_model(tmp_path):
    config = {"upstream": {"health_interval_s": 0.05, "start_timeout_s": 20},
              "server_logs": {"dir": str(tmp_path / "server-logs")},
              "models": [{"name": "hung", "backend": "process", "start_timeout_s": 40,
                          "command": sim_command("--startup-s", "30")},
                         {"name": "quick", "backend": "process", "command": sim_command(*FAST)}]}
    with start_gateway(config, tmp_path) as gw:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            url = f"{gw.url}/v1/chat/completions"
            hung = asyncio.create_task(client.post(url, json={"model": "hung", "messages": CHAT}))
            await await_model(client, gw, "hung", lambda m: m["state"] == "starting", 5,
                              "the hung model to be starting")
            started = time.monotonic()
            r = await asyncio.wait_for(client.post(
                url, json={"model": "quick", "messages": CHAT, "max_tokens": 2}), 15)
            took = time.monotonic() - started
            assert r.status_code == 200, r.text
            assert took < 5, f"the normal model took {took:.1f}s behind the hung start"
            assert not hung.done(), hung.result() if hung.done() else None
            hung.cancel()
            await asyncio.gather(hung, return_exceptions=True)
        assert_invariants(gw, healthy="quick")
    assert gw.proc.returncode == 0, gw.log_text()[-2000:]
    assert not gw.orphans, gw.orphans


# --- 10. hooks see read-only requests ---------------------------------------------------------------

def test_admission_hook_cannot_change_the_forwarded_request(gw):
    def send(model: str) -> dict:
        r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False,
                       json={"model": model, "messages": CHAT, "max_tokens": 2},
                       headers={"X-Probe": "original", "X-Sim-Echo-Headers": "1"})
        assert r.status_code == 200, r.text
        return r.json()
    baseline = send(HEALTHY)
    lines_before = (gw.hook_record.read_text().splitlines() if gw.hook_record.exists() else [])
    hooked = send("hooked")
    lines = gw.hook_record.read_text().splitlines()
    assert len(lines) == len(lines_before) + 1, lines
    results = json.loads(lines[-1])
    assert results and set(results.values()) == {"refused"}, results
    received = hooked["received_headers"]
    assert received.get("x-probe") == "original", received
    assert "x-injected" not in received, received
    assert hooked["received_model"] == HEALTHY, hooked["received_model"]
    assert hooked["usage"]["prompt_tokens"] == baseline["usage"]["prompt_tokens"]
    assert_invariants(gw)


# --- 11. model-server logs ------------------------------------------------------------------------

SECRET_HF = "hf_abcdefghijklmnop1234"
SECRET_KV = "supersecret123"


def test_server_logs_live_in_their_dir_and_errors_are_redacted(tmp_path):
    log_dir = tmp_path / "server-logs"
    failing = ["sh", "-c", f'echo "failed: {SECRET_HF} token={SECRET_KV}"; exit 3', "sh",
               "{port}"]
    config = {"upstream": {"health_interval_s": 0.05, "start_timeout_s": 20},
              "server_logs": {"dir": str(log_dir), "max_bytes": 65536},
              "models": [{"name": "logged", "backend": "process", "command": sim_command(*FAST)},
                         {"name": "failing", "backend": "process", "command": failing}]}
    gw = start_gateway(config, tmp_path)
    try:
        assert_invariants(gw, healthy="logged")
        logs = [p.name for p in log_dir.iterdir()]
        assert any(n.startswith("logged-") and n.endswith(".log") for n in logs), logs

        r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=20, trust_env=False,
                       json={"model": "failing", "messages": CHAT})
        assert r.status_code == 503, r.text
        message = openai_error(r.content, "failed start")["message"]
        last_error = gw.status()["models"]["failing"]["last_error"] or ""
        for where, text in (("client 503", r.text), ("last_error", last_error),
                            ("gateway log", gw.log_text())):
            assert SECRET_HF not in text and SECRET_KV not in text, f"secret leaked in {where}"
        assert "failed: *** token=***" in message, f"client 503 lacks the log line: {message!r}"
        assert "failed: *** token=***" in last_error, f"last_error lacks it: {last_error!r}"
        assert_invariants(gw, healthy="logged")
        assert gw.stop() == 0, gw.log_text()[-2000:]
        left = [p.name for p in log_dir.iterdir()] if log_dir.exists() else []
        assert not [n for n in left if ".log" in n], left
    finally:
        gw.stop()


# --- fuzz -------------------------------------------------------------------------------------------

OTHER_MODELS = {"one", "hooked", "dead", "cold", "g-nonhttp", "g-bighdr", "g-trunc", "g-reset",
                "g-hang"}
MISSING = object()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)


def _field(*choices):
    return st.one_of(st.just(MISSING), json_values, *choices)


fuzz_objects = st.fixed_dictionaries({
    "model": _field(st.just(HEALTHY), st.just(HEALTHY), st.text(max_size=12)),
    "stream": _field(st.booleans()),
    "messages": _field(st.just(CHAT)),
    "prompt": _field(st.text(max_size=30)),
    "input": _field(st.text(max_size=30)),
    "max_tokens": _field(st.integers(-2, 6)),
    "stream_options": _field(st.just({"include_usage": True})),
}).map(lambda d: {k: v for k, v in d.items() if v is not MISSING})
fuzz_bodies = st.one_of(fuzz_objects.map(lambda d: json.dumps(d).encode()),
                        json_values.map(lambda v: json.dumps(v).encode()),
                        st.binary(max_size=200))
# printable ASCII; HTTP strips a value's outer whitespace (and h11 refuses to send it)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                        max_size=40).map(str.strip)


def test_fuzz_requests_get_clean_answers(gw):
    endpoints = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"]
    with httpx.Client(timeout=15, trust_env=False) as client:
        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(endpoint=st.sampled_from(endpoints), body=fuzz_bodies, header=header_values)
        def one(endpoint, body, header):
            with contextlib.suppress(ValueError):
                decoded = json.loads(body)
                model = decoded.get("model") if isinstance(decoded, dict) else None
                assume(not (isinstance(model, str) and model in OTHER_MODELS))
            if endpoint == "/v1/embeddings":  # the generating simulator has no such route
                body = body.replace(json.dumps(HEALTHY).encode(), json.dumps(EMBED).encode())
            r = client.post(f"{gw.url}{endpoint}", content=body,
                            headers={"Content-Type": "application/json", "X-Fuzz": header})
            ctx = (endpoint, body[:200], header, r.status_code, r.text[:300])
            assert r.status_code < 500 or r.status_code in (502, 503, 504), ctx
            if not 200 <= r.status_code < 300:
                openai_error(r.content, ctx)
        one()
    assert_invariants(gw)

"""The streaming bench's load generator: thousands of concurrent SSE streams from one process.

wrk (bench/run_bench.py) measures whole responses; a streaming proxy is judged by what
happens inside one: time to the first event, the gaps between events, how many events
per second it relays and how many streams it holds open. This is one asyncio process on
uvloop (``RLIMIT_NOFILE`` raised to its hard limit) that keeps thousands of streams open
and times every read.

Its HTTP client is a minimal HTTP/1.1 protocol of its own (keep-alive, chunked and
Content-Length bodies) rather than aiohttp's: it does its counting and timing in
``data_received`` with no task switch per read. aiohttp's client measured ~25 µs of CPU
per event read here, about what the bare Sanic relay spends relaying it, so with one core
for the load side it could not saturate the relay; this client spends a few µs.

Two modes, each bounded in time (``--deadline``), each writing one JSON object
(``--output``, else stdout):

* ``closed``: ``--concurrency`` users, each sending one stream after another on its own
  keep-alive connection, their first requests spread over ``--stagger`` seconds, for
  ``--warmup`` + ``--duration`` seconds; then each finishes the stream it is in. Streams
  started after the warm-up give TTFT (request written to the first ``data:`` event
  read) and inter-event gaps (a read with k events: one gap since the previous read, then
  k - 1 gaps of 0); events read inside the measured window give events/s. The CPU time
  of the processes named by ``--cpu NAME=PID[+PID...]`` (and of this one) is read from
  ``/proc/PID/stat`` at the start and end of that window. ``--lockstep``: the upstream
  (bench/sse_upstream.py) sends each event once this process has read the previous one
  (a UDP ack), so exactly one event per stream is in flight.
* ``open``: ``--concurrency`` streams of 2 events ``--interval-ms`` apart (each stays
  open that long after its first event), opened at ``--open-rate`` per second, each on
  its own connection; once every one has its first event the RSS (VmRSS) of
  ``--rss NAME=PID`` is read again (first read before any stream) and ``--status-url``
  (the gateway's /gateway/status) fetched, then all streams finish normally.

Every stream is checked: HTTP 200, no error event, and ``data: [DONE]`` at its end;
anything else is counted under ``errors`` (non_200, error_event, missing_done, broken).

    python bench/stream_load.py --url http://127.0.0.1:18090 --mode closed --lockstep \\
        --concurrency 64 --chunks 200 --duration 5 --cpu upstream=1234
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import re
import resource
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PATH = "/v1/chat/completions"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACK_SLOT = b"ACKID"
_ACK_PORT = re.compile(rb"ack:(\d+)")
clock = time.perf_counter


def request_body(model: str, chunks: int, interval_ms: float, lockstep: bool = False) -> bytes:
    """The pace travels in the message text (bench/sse_upstream.py): every proxy forwards it.
    With ``lockstep`` the text has an ``ack=ACKID`` slot for each stream's id."""
    text = f"chunks={chunks} interval_ms={interval_ms:g}" + (" ack=ACKID" if lockstep else "")
    return json.dumps({
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": chunks, "messages": [{"role": "user", "content": text}],
    }, separators=(",", ":")).encode()


# --- /proc -------------------------------------------------------------------------------

def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parse_pids(items: list[str]) -> dict[str, list[int]]:
    """``NAME=PID[+PID...]`` options into {name: [pids]}."""
    out: dict[str, list[int]] = {}
    for item in items:
        name, _, pids = item.partition("=")
        out[name] = [int(p) for p in pids.split("+") if p]
    return out


def cpus_busy() -> dict[str, float]:
    """Busy seconds so far of each CPU (everything but idle and iowait), from /proc/stat."""
    out: dict[str, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            ticks = [int(f) for f in fields[:8]]
            out[name] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return out


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far per named group (a process that is gone counts 0), ours, and
    each CPU's busy time (``cpu0``...: whatever ran there, other work on the box too)."""
    snap: dict[str, float] = {}
    for name, pids in groups.items():
        ticks = 0
        for pid in pids:
            try:
                ticks += cpu_ticks(pid)
            except (OSError, IndexError, ValueError):
                pass
        snap[name] = ticks / CLK_TCK
    t = os.times()
    snap["loadgen"] = t.user + t.system
    snap.update(cpus_busy())
    return snap


# --- statistics --------------------------------------------------------------------------

def summary_ms(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles in ms."""
    s = sorted(values)
    if not s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] * 1000.0

    return {"n": len(s), "p50": round(at(0.50), 3), "p90": round(at(0.90), 3),
            "p99": round(at(0.99), 3), "max": round(s[-1] * 1000.0, 3)}


@dataclass
class Stats:
    window_start: float = math.inf
    window_end: float = math.inf
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    events_in_window: int = 0
    reads_in_window: int = 0
    streams_started: int = 0
    streams_ok: int = 0
    streams_measured: int = 0
    first_event: int = 0  # streams that have had their first event
    finished: int = 0     # streams over, well or not
    errors: dict[str, int] = field(default_factory=lambda: {
        "non_200": 0, "error_event": 0, "missing_done": 0, "broken": 0})
    unfinished: int = 0  # closed mode: streams still going --drain s after the window
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        if kind == "unfinished":
            self.unfinished += 1
            return
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail}"[:300])


class Acker(asyncio.DatagramProtocol):
    """Lockstep acks, batched: the ids read in one event-loop turn go out in one datagram
    per upstream process."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.ids = itertools.count(os.getpid() * 1_000_000)
        self.pending: dict[int, list[bytes]] = {}
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def ack(self, port: int, ack_id: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.setdefault(port, []).append(ack_id)

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        if self.transport is not None:
            for port, ids in pending.items():
                self.transport.sendto(b" ".join(ids), ("127.0.0.1", port))


# --- the client --------------------------------------------------------------------------

HEAD, SIZE, DATA, CRLF, TRAILER, LENGTH, UNTIL_CLOSE = range(7)


class Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one stream at a time; every read is
    counted and timed where it arrives."""

    def __init__(self, stats: Stats, acker: Acker | None) -> None:
        self.stats = stats
        self.acker = acker
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.done: asyncio.Future[None] | None = None
        self.buf = bytearray()
        self.phase = HEAD
        self.left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.done is not None and not self.done.done():
            if self.phase == UNTIL_CLOSE:
                self._end()
            else:
                self._fail(f"connection lost ({exc or 'closed by peer'}) in phase {self.phase}")

    def start(self, request: bytes, record: bool, ack_id: bytes) -> asyncio.Future[None]:
        """Write one request; the future is done when its answer has been read."""
        self.done = asyncio.get_running_loop().create_future()
        self.record = record
        self.ack_id = ack_id
        self.ack_port = 0
        self.phase = HEAD
        self.status = 0
        self.keep_alive = True
        self.first = 0.0
        self.last = 0.0
        self.tail = b""
        self.errored = False
        self.body = b""
        self.stats.streams_started += 1
        self.sent = clock()
        assert self.transport is not None
        self.transport.write(request)
        return self.done

    # --- parsing -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = clock()
        if self.done is None or self.done.done():
            return  # nothing asked for: ignore
        buf = self.buf
        buf += data
        if self.phase == HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self._head(bytes(buf[:end])):
                return
            del buf[:end + 4]
        parts: list[bytes] = []
        complete = False
        while buf:
            phase = self.phase
            if phase == SIZE:
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
                del buf[:i + 2]
                if size == 0:
                    self.phase = TRAILER
                else:
                    self.left, self.phase = size, DATA
            elif phase == DATA:
                take = self.left
                if take >= len(buf):
                    parts.append(bytes(buf))
                    self.left -= len(buf)
                    buf.clear()
                else:
                    parts.append(bytes(buf[:take]))
                    del buf[:take]
                    self.left = 0
                if self.left == 0:
                    self.phase = CRLF
            elif phase == CRLF:
                if len(buf) < 2:
                    break
                del buf[:2]
                self.phase = SIZE
            elif phase == TRAILER:
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                line = buf[:i]
                del buf[:i + 2]
                if not line:
                    complete = True
                    break
            elif phase == LENGTH:
                take = min(self.left, len(buf))
                parts.append(bytes(buf[:take]))
                del buf[:take]
                self.left -= take
                if self.left == 0:
                    complete = True
                    break
            else:  # UNTIL_CLOSE
                parts.append(bytes(buf))
                buf.clear()
        if self.phase == LENGTH and self.left == 0:
            complete = True
        if parts:
            self._payload(parts[0] if len(parts) == 1 else b"".join(parts), now)
        if complete:
            self._end()

    def _head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._fail(f"bad status line {lines[0][:80]!r}")
            return False
        chunked, length = False, None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
        if chunked:
            self.phase = SIZE
        elif length is not None:
            self.phase, self.left = LENGTH, length
        else:
            self.phase, self.keep_alive = UNTIL_CLOSE, False
        return True

    def _payload(self, payload: bytes, now: float) -> None:
        tail = self.tail
        if self.status != 200:
            self.body = (self.body + payload)[:300]
            return
        # a marker split across two reads: 4 bytes of overlap find it, and cannot hold a
        # whole (already counted) one
        n = (tail[-4:] + payload).count(b"data:")
        edge = tail[-8:] + payload
        self.tail = edge[-64:]
        if not n:
            return
        stats = self.stats
        if not self.errored and b'"error"' in edge:
            self.errored = True
            stats.error("error_event", edge[-300:].decode(errors="replace"))
        if stats.window_start <= now < stats.window_end:
            stats.events_in_window += n
            stats.reads_in_window += 1
        if self.acker is not None:
            if not self.ack_port:
                m = _ACK_PORT.search(payload)
                self.ack_port = int(m.group(1)) if m else -1
            if self.ack_port > 0:
                self.acker.ack(self.ack_port, self.ack_id)
        if self.first == 0.0:
            self.first = now
            stats.first_event += 1
            if self.record:  # recorded as they come: a stream cut off still has its TTFT
                stats.streams_measured += 1
                stats.ttft.append(now - self.sent)
                if n > 1:
                    stats.gaps.extend([0.0] * (n - 1))
        elif self.record:
            stats.gaps.append(now - self.last)
            if n > 1:
                stats.gaps.extend([0.0] * (n - 1))
        self.last = now

    # --- outcome -----------------------------------------------------------------------

    def _end(self) -> None:
        stats = self.stats
        stats.finished += 1
        if self.status != 200:
            stats.error("non_200", f"HTTP {self.status}: {self.body.decode(errors='replace')}")
        elif b"data: [DONE]" not in self.tail:
            stats.error("missing_done", self.tail.decode(errors="replace"))
        elif not self.errored:
            stats.streams_ok += 1
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
        self.buf.clear()
        assert self.done is not None
        self.done.set_result(None)

    def _fail(self, detail: str, kind: str = "broken") -> None:
        self.stats.finished += 1
        self.stats.error(kind, detail)
        if self.transport is not None:
            self.transport.close()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def abort(self, detail: str, kind: str = "broken") -> None:
        if self.done is not None and not self.done.done():
            self._fail(detail, kind)

    @property
    def busy(self) -> bool:
        return self.done is not None and not self.done.done()


class Target:
    """Where streams go: the request bytes for a body, and new connections."""

    def __init__(self, url: str, stats: Stats, acker: Acker | None, timeout: float,
                 auth: str = "bench") -> None:
        parts = urlsplit(url)
        self.auth = auth
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.stats, self.acker, self.timeout = stats, acker, timeout
        self.loop = asyncio.get_running_loop()

    def request(self, body: bytes) -> bytes:
        return (f"POST {PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {self.auth}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def connect(self) -> Client | None:
        try:
            _, client = await asyncio.wait_for(self.loop.create_connection(
                lambda: Client(self.stats, self.acker), self.host, self.port), self.timeout)
        except (TimeoutError, OSError) as exc:
            self.stats.streams_started += 1
            self.stats.finished += 1
            self.stats.error("broken", f"connect: {type(exc).__name__}: {exc}")
            return None
        return client

    async def stream(self, client: Client, body: bytes, record: bool) -> None:
        ack_id = b""
        if self.acker is not None:
            ack_id = b"%d" % next(self.acker.ids)
            body = body.replace(ACK_SLOT, ack_id)
        done = client.start(self.request(body), record, ack_id)
        timer = self.loop.call_later(self.timeout, client.abort,
                                     f"no complete answer within {self.timeout:g}s")
        try:
            await done
        finally:
            timer.cancel()


async def sleep_until(t: float) -> None:
    delay = t - clock()
    if delay > 0:
        await asyncio.sleep(delay)


# --- modes -------------------------------------------------------------------------------

async def run_closed(args: argparse.Namespace) -> dict[str, Any]:
    body = request_body(args.model, args.chunks, args.interval_ms, args.lockstep)
    groups = parse_pids(args.cpu)
    stats = Stats()
    acker: Acker | None = None
    udp: asyncio.BaseTransport | None = None
    if args.lockstep:
        udp, acker = await asyncio.get_running_loop().create_datagram_endpoint(
            Acker, local_addr=("127.0.0.1", 0))
    target = Target(args.url, stats, acker, args.read_timeout, args.auth)
    start = clock() + 0.05
    stats.window_start = start + args.warmup
    stats.window_end = stats.window_start + args.duration
    cpu: dict[str, dict[str, float]] = {}

    clients: list[Client] = []

    async def user(i: int) -> None:
        await sleep_until(start + i * args.stagger / max(1, args.concurrency))
        client: Client | None = None
        while clock() < stats.window_end:
            if client is None or client.closed:
                client = await target.connect()
                if client is None:
                    await asyncio.sleep(0.1)
                    continue
                clients.append(client)
            await target.stream(client, body, clock() >= stats.window_start)
        if client is not None and client.transport is not None:
            client.transport.close()

    async def drain() -> None:
        """After the window, streams get --drain s to finish; then they are cut off (an
        overloaded target), counted apart from errors."""
        await sleep_until(stats.window_end + args.drain)
        for client in clients:
            client.abort(f"still streaming {args.drain:g}s after the window", "unfinished")

    async def sampler() -> None:
        await sleep_until(stats.window_start)
        t0, before = clock(), cpu_snapshot(groups)
        await sleep_until(stats.window_end)
        t1, after = clock(), cpu_snapshot(groups)
        for name in after:
            used = after[name] - before.get(name, 0.0)
            cpu[name] = {"cpu_s": round(used, 3), "util": round(used / (t1 - t0), 3)}

    try:
        drainer = asyncio.create_task(drain())
        await asyncio.gather(sampler(), *(user(i) for i in range(args.concurrency)))
        drainer.cancel()
    finally:
        if udp is not None:
            udp.close()
    events = stats.events_in_window
    return {
        "mode": "closed", "url": args.url, "concurrency": args.concurrency,
        "chunks": args.chunks, "interval_ms": args.interval_ms, "lockstep": args.lockstep,
        "warmup_s": args.warmup, "window_s": args.duration, "events_in_window": events,
        "events_per_s": round(events / args.duration, 1) if args.duration else 0.0,
        "events_per_read": round(events / stats.reads_in_window, 2)
        if stats.reads_in_window else 0.0,
        "streams_started": stats.streams_started, "streams_ok": stats.streams_ok,
        "streams_measured": stats.streams_measured,
        "ttft_ms": summary_ms(stats.ttft), "gap_ms": summary_ms(stats.gaps),
        "unfinished": stats.unfinished, "drain_s": args.drain, "cpu": cpu, "errors": stats.errors,
        "error_count": sum(stats.errors.values()), "error_samples": stats.error_samples,
    }


def fetch_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def run_open(args: argparse.Namespace) -> dict[str, Any]:
    body = request_body(args.model, 2, args.interval_ms)
    rss_groups = parse_pids(args.rss)
    stats = Stats()
    target = Target(args.url, stats, None, args.read_timeout, args.auth)
    n = args.concurrency

    def rss() -> dict[str, int]:
        return {name: sum(rss_kb(p) for p in pids) for name, pids in rss_groups.items()}

    async def one() -> None:
        client = await target.connect()
        if client is not None:
            await target.stream(client, body, True)
            if client.transport is not None:
                client.transport.close()

    rss_before = rss()
    started = clock()
    tasks: list[asyncio.Task[None]] = []
    batch = max(1, int(args.open_rate / 50))  # opened 50 times a second
    for i in range(0, n, batch):
        tasks.extend(asyncio.create_task(one()) for _ in range(min(batch, n - i)))
        await sleep_until(started + (i + batch) / args.open_rate)
    opened_by = clock()
    limit = opened_by + args.open_timeout
    while stats.first_event + (stats.finished - stats.streams_ok) < n and clock() < limit:
        await asyncio.sleep(0.02)
    all_open_after = clock() - started
    await asyncio.sleep(args.settle)
    open_before = stats.first_event - stats.finished
    rss_open = rss()
    status = None
    if args.status_url:
        status = await asyncio.get_running_loop().run_in_executor(None, fetch_json,
                                                                  args.status_url)
    open_after = stats.first_event - stats.finished
    await asyncio.gather(*tasks)
    return {
        "mode": "open", "url": args.url, "streams": n, "hold_ms": args.interval_ms,
        "open_rate": args.open_rate, "opened_in_s": round(opened_by - started, 2),
        "all_first_event_after_s": round(all_open_after, 2),
        "open_at_rss_sample": min(open_before, open_after), "rss_kb_before": rss_before,
        "rss_kb_open": rss_open, "status_while_open": status,
        "streams_ok": stats.streams_ok, "ttft_ms": summary_ms(stats.ttft),
        "errors": stats.errors, "error_count": sum(stats.errors.values()),
        "error_samples": stats.error_samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the target")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--lockstep", action="store_true",
                        help="closed: the upstream sends each event once the previous one "
                             "has been read here (one event in flight per stream)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--stagger", type=float, default=0.2,
                        help="closed: seconds over which the users' first requests spread")
    parser.add_argument("--open-rate", type=float, default=1000.0, help="open: streams/s")
    parser.add_argument("--open-timeout", type=float, default=15.0)
    parser.add_argument("--settle", type=float, default=0.5,
                        help="open: seconds between the last first event and the RSS read")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="closed: seconds streams may run past the window")
    parser.add_argument("--read-timeout", type=float, default=60.0,
                        help="seconds a stream (or a connect) may take")
    parser.add_argument("--cpu", action="append", default=[], metavar="NAME=PID[+PID]")
    parser.add_argument("--rss", action="append", default=[], metavar="NAME=PID[+PID]")
    parser.add_argument("--status-url")
    parser.add_argument("--auth", default="bench", help="bearer token sent with every stream")
    parser.add_argument("--deadline", type=float, default=120.0, help="hard bound, seconds")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    coro = run_closed(args) if args.mode == "closed" else run_open(args)
    try:
        result = asyncio.run(asyncio.wait_for(coro, args.deadline))
    except TimeoutError:
        result = {"mode": args.mode, "url": args.url, "error_count": 1,
                  "errors": {"deadline": 1}, "error_samples": [f"over {args.deadline}s"]}
    text = json.dumps(result)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

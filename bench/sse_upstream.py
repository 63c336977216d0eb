"""The streaming bench's upstream: an OpenAI-style SSE server far cheaper than any proxy.

``bench/stream_bench.py`` needs a model server that streams ``chat.completion.chunk``
events at a chosen pace without being the bottleneck itself. Sanic or aiohttp would spend
more per event than the proxies measured in front of it, so this is a raw asyncio
protocol on uvloop: a minimal HTTP/1.1 parser (keep-alive, Content-Length bodies), every
event precomputed as one HTTP chunk (``Transfer-Encoding: chunked``), no timer per event,
and optionally several worker processes on one port (``SO_REUSEPORT``).

``POST /v1/chat/completions`` with ``"stream": true`` streams; the pace is read from the
request's message text, which every proxy forwards untouched (a custom body field or
header might be dropped by one of them)::

    {"model": "bench", "stream": true,
     "messages": [{"role": "user", "content": "chunks=40 interval_ms=50"}]}

``chunks=N`` content events (the first also carries the role, the last the
``finish_reason``), then a usage chunk and ``data: [DONE]``: N + 2 ``data:`` events in
all; the first event goes out at once, the others:

* ``interval_ms=T`` (T > 0): each T ms after the previous one;
* ``ack=ID`` (lockstep): each as soon as the client has read the previous one, which it
  says by sending ``ID`` in a UDP datagram (several ids may share one, space-separated)
  to the port this process names in the stream's first event (its content is
  ``ack:PORT``). One event is in flight per stream, so a relay in between gets them one
  by one however slow it is, as from a model server that keeps pace with its readers;
  an event not acknowledged within ``ACK_TIMEOUT_S`` is followed anyway;
* neither (free-running): one event per stream per event-loop turn, as fast as this
  process can write, skipping turns while the socket is not drained. A slower reader
  then gets many events per read (batches), which measures bytes, not events.

Without ``stream`` it answers one canned chat completion; ``GET /health`` and
``GET /v1/models`` answer 200.

    python bench/sse_upstream.py --port 18090 --workers 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import sys

MODEL = "bench"
MAX_CHUNKS = 100_000
ACK_TIMEOUT_S = 0.2
_CHUNKS = re.compile(rb"chunks=(\d+)")
_INTERVAL = re.compile(rb"interval_ms=(\d+(?:\.\d+)?)")
_ACK = re.compile(rb"ack=(\d+)")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def _event(obj: object) -> bytes:
    """One SSE event framed as one HTTP/1.1 chunk."""
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": MODEL, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}


FIRST = _event(_chunk({"role": "assistant", "content": "tok"}, None))
# Tokens vary, as a model's do (LiteLLM stops a stream whose chunks repeat 100 times).
MIDDLE = [_event(_chunk({"content": w}, None))
          for w in (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog")]
LAST = _event(_chunk({"content": " tok"}, "stop"))
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"  # 14 bytes of data, then the last chunk
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


def _usage(n: int) -> bytes:
    return _event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                   "created": 1700000000, "model": MODEL, "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": n,
                             "total_tokens": 9 + n}})


def _plain(status: str, body: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body))


COMPLETION = _plain("200 OK", json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    separators=(",", ":")).encode())
MODELS = _plain("200 OK", json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}]}).encode())
HEALTH = _plain("200 OK", b"{}")
NOT_FOUND = _plain("404 Not Found", b'{"error":"not found"}')
BAD = _plain("400 Bad Request", b'{"error":"bad request"}')


class Driver(asyncio.DatagramProtocol):
    """Schedules one process's streams: acknowledgements (UDP), the free-running turn and
    the sweep that moves lockstep streams on whose ack is overdue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lockstep: dict[bytes, Conn] = {}  # id -> stream waiting for its ack
        self.free: set[Conn] = set()
        self.turn_scheduled = False
        self.first_ack = FIRST
        self.loop.call_later(ACK_TIMEOUT_S / 2, self.sweep)

    def datagram_received(self, data: bytes, addr: object) -> None:
        waiting = self.lockstep
        for ack_id in data.split():
            conn = waiting.get(ack_id)
            if conn is not None and conn.waiting:
                conn.next_event()

    def sweep(self) -> None:
        deadline = self.loop.time() - ACK_TIMEOUT_S
        for conn in [c for c in self.lockstep.values() if c.waiting and c.sent_at < deadline]:
            conn.next_event()
        self.loop.call_later(ACK_TIMEOUT_S / 2, self.sweep)

    def add_free(self, conn: Conn) -> None:
        self.free.add(conn)
        if not self.turn_scheduled:
            self.turn_scheduled = True
            self.loop.call_soon(self.turn)

    def turn(self) -> None:
        self.turn_scheduled = False
        for conn in list(self.free):
            if not conn.paused:
                conn.next_event()
        if self.free:
            self.turn_scheduled = True
            self.loop.call_soon(self.turn)


class Conn(asyncio.Protocol):
    """One client connection; at most one request in progress (no pipelining needed)."""

    driver: Driver

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.paused = False
        self.left = 0  # content events still to send in the current stream
        self.total = 0
        self.interval = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.ack_id: bytes | None = None
        self.waiting = False  # lockstep: an event sent, its ack not yet here
        self.sent_at = 0.0

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # --- requests ----------------------------------------------------------------------

    def _parse(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self._handle(head, body)

    def _handle(self, head: bytes, body: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) != 3:
            self._write(BAD)
            return
        method, path = line[0], line[1].split(b"?", 1)[0]
        if method == b"POST" and path == b"/v1/chat/completions":
            if not _STREAM.search(body):
                self._write(COMPLETION)
                return
            m = _CHUNKS.search(body)
            n = min(int(m.group(1)), MAX_CHUNKS) if m else 20
            m = _INTERVAL.search(body)
            interval = float(m.group(1)) / 1000.0 if m else 0.0
            m = _ACK.search(body)
            self._start(max(1, n), interval, m.group(1) if m else None)
        elif method == b"GET" and path in (b"/health", b"/healthz"):
            self._write(HEALTH)
        elif method == b"GET" and path == b"/v1/models":
            self._write(MODELS)
        else:
            self._write(NOT_FOUND)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    # --- streaming ---------------------------------------------------------------------

    def _start(self, n: int, interval: float, ack_id: bytes | None) -> None:
        self.busy = True
        self.total, self.left, self.interval = n, n, interval
        if ack_id is not None:
            self.ack_id = ack_id
            self.driver.lockstep[ack_id] = self
        self._write(HEAD)
        self.next_event()

    def next_event(self) -> None:
        """Send the next content event (then usage and [DONE] after the last one)."""
        transport = self.transport
        if transport is None:
            return
        n, left = self.total, self.left
        self.timer = None
        self.waiting = False
        if left == n:
            transport.write(LAST if n == 1 else FIRST if self.ack_id is None
                            else self.driver.first_ack)
        elif left > 1:
            transport.write(MIDDLE[left % 9])
        else:
            transport.write(LAST)
        self.left = left = left - 1
        if left == 0:
            transport.write(_usage(n) + DONE)
            self._stop()
            if self.buf:
                self._parse()
        elif self.ack_id is not None:
            self.waiting = True
            self.sent_at = self.driver.loop.time()
        elif self.interval > 0:
            self.timer = self.driver.loop.call_later(self.interval, self.next_event)
        else:
            self.driver.add_free(self)

    def _stop(self) -> None:
        self.busy = False
        self.waiting = False
        self.driver.free.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ack_id is not None:
            self.driver.lockstep.pop(self.ack_id, None)
            self.ack_id = None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(host: str, port: int) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio still works, just slower
        pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    driver = Driver(loop)
    Conn.driver = driver
    udp, _ = loop.run_until_complete(
        loop.create_datagram_endpoint(lambda: driver, local_addr=(host, 0)))
    ack_port = udp.get_extra_info("sockname")[1]
    driver.first_ack = _event(_chunk({"role": "assistant", "content": f"ack:{ack_port}"}, None))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    server = loop.run_until_complete(loop.create_server(Conn, sock=sock, backlog=4096))
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        loop.run_until_complete(stop)
    finally:
        server.close()
        udp.close()
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes on the port")
    args = parser.parse_args()
    children: list[int] = []
    for _ in range(max(0, args.workers - 1)):
        pid = os.fork()
        if pid == 0:
            serve(args.host, args.port)
            os._exit(0)
        children.append(pid)
    try:
        serve(args.host, args.port)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    sys.exit(0)


if __name__ == "__main__":
    main()

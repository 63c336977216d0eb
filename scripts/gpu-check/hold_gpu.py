"""A fake model server that holds GPU memory: the gateway's process backend starts it
like a vLLM server, and NVML sees exactly what it allocated (plus the CUDA context).

    python hold_gpu.py --port 8001 --served-model-name m --mib 2048

It allocates ``--mib`` MiB with torch before it starts listening, then answers
GET /health, GET /v1/models and POST /v1/chat/completions (stdlib only besides torch)
and holds the memory until killed. With ``--mib 0`` it runs without CUDA where there is
none (with CUDA it still creates a context, so the context's size can be measured).
``--fake-vram-dir DIR`` (the driver's --dry-run) allocates nothing and instead writes
``DIR/<pid>`` holding the MiB it pretends to hold, for a fake read_vram plugin.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024


def hold(mib: int, fake_dir: str | None):
    """Allocate and keep the memory; returns what must stay referenced."""
    if fake_dir:
        path = os.path.join(fake_dir, str(os.getpid()))
        with open(path + ".tmp", "w") as fh:
            fh.write(str(mib))
        os.replace(path + ".tmp", path)
        return path
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        if mib > 0:
            sys.exit(f"hold_gpu: --mib {mib} needs CUDA (torch.cuda.is_available() is False)")
        return None
    torch.cuda.init()
    block = torch.empty(max(mib, 0) * MIB or 1, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    return block


def make_handler(name: str):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "gpu-check"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            self._send(200, {
                "id": f"chatcmpl-{os.getpid()}-{time.monotonic_ns()}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def log_message(self, *args) -> None:
            pass

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--served-model-name", default="hold-gpu")
    ap.add_argument("--mib", type=int, default=0)
    ap.add_argument("--fake-vram-dir")
    args = ap.parse_args()
    held = hold(args.mib, args.fake_vram_dir)  # noqa: F841 (kept alive until exit)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.served_model_name))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hold_gpu: {args.served_model_name} holds {args.mib} MiB, on port {args.port}",
          flush=True)
    try:
        server.serve_forever()
    finally:
        if isinstance(held, str):
            os.unlink(held)


if __name__ == "__main__":
    main()

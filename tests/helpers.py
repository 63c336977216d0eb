"""Shared test helpers: free ports, real vLLM-simulator subprocesses, HTTP readiness polling.

``start_simulator`` runs ``python -m gateway.simulator`` as a real process (the same code path
the demo and load tests use). Use it as a context manager, or call ``.stop()`` in a fixture's
teardown, so no simulator outlives its test::

    with start_simulator("m", ttft_ms=0, itl_ms=0) as sim:
        httpx.get(f"{sim.url}/v1/models")
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout: float = START_TIMEOUT_S) -> httpx.Response:
    """Poll GET ``url`` until it answers 200 and return that response; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            r = httpx.get(url, timeout=1.0, trust_env=False)
            if r.status_code == 200:
                return r
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} not OK after {timeout:.1f} s (last: {last})")
        time.sleep(0.05)


class SimProcess:
    """A running simulator subprocess: ``.port``, ``.url`` (no trailing slash), ``.proc``."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen, log_path: Path):
        self.name, self.port, self.proc, self.log_path = name, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        """What the process has written to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait for ``GET /health`` 200; fail fast, with its output, if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_http_ok(f"{self.url}/health", timeout=min(0.5, timeout))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"simulator on {self.url} not healthy after {timeout} s:"
                                       f"\n{self.log()}") from None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def start_simulator(name: str, port: int | None = None, **opts) -> SimProcess:
    """Start ``python -m gateway.simulator`` serving model ``name``.

    ``opts`` become options: ``ttft_ms=0`` → ``--ttft-ms 0`` (also ``itl_ms``, ``startup_s``,
    ``max_num_seqs``, ``host``). ``wait=False`` returns at once instead of waiting for
    ``/health`` 200; ``timeout`` (default 15 s) bounds that wait. Without ``port`` a free one
    is picked, and picked again if another process grabbed it first.
    """
    wait = opts.pop("wait", True)
    timeout = opts.pop("timeout", START_TIMEOUT_S)
    extra = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for attempt in range(3):
        p = port or free_port()
        fd, log_name = tempfile.mkstemp(prefix=f"sim-{p}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.simulator", "--port", str(p),
                 "--served-model-name", name, *extra],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        sim = SimProcess(name, p, proc, Path(log_name))
        if not wait:
            return sim
        try:
            sim.wait_healthy(timeout)
            return sim
        except RuntimeError:  # it exited: retry only a lost race for an auto-picked port
            lost_race = port is None and "in use" in sim.log() and attempt < 2
            sim.__exit__()
            if not lost_race:
                raise
        except BaseException:
            sim.__exit__()
            raise
    raise AssertionError("unreachable")

"""Shared test helpers: free ports, real vLLM-simulator subprocesses, HTTP readiness polling.

``start_simulator`` runs ``python -m vllm_simulator`` as a real process (the same code path
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


def terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
        terminate(self.proc, timeout)
        return self.proc.returncode

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def start_simulator(name: str, port: int | None = None, **opts) -> SimProcess:
    """Start ``python -m vllm_simulator`` serving model ``name``.

    ``opts`` become options: ``ttft_ms=0`` → ``--ttft-ms 0`` (also ``itl_ms``, ``startup_s``,
    ``max_num_seqs``, ``host``). ``wait=False`` returns at once instead of waiting for
    ``/health`` 200; ``timeout`` (default 15 s) bounds that wait. Without ``port`` a free one
    is picked, and picked again if another process grabbed it first.
    """
    wait = opts.pop("wait", True)
    timeout = opts.pop("timeout", START_TIMEOUT_S)
    extra = [a for k, v in opts.items()  # True: a bare flag (enable_sleep_mode=True)
             for a in ((f"--{k.replace('_', '-')}",) if v is True
                       else (f"--{k.replace('_', '-')}", str(v)))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for attempt in range(3):
        p = port or free_port()
        fd, log_name = tempfile.mkstemp(prefix=f"sim-{p}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_simulator", "--port", str(p),
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


# --- the gateway as a real process -------------------------------------------------------------

GATEWAY_START_TIMEOUT_S = 20.0
GATEWAY_STOP_TIMEOUT_S = 20.0  # the gateway's own shutdown stops its model servers first
# Variables the gateway reads as config overrides; a developer's shell must not leak them in.
GATEWAY_ENV_VARS = ("GATEWAY_MAX_QUEUE_SIZE", "GATEWAY_MAX_CONCURRENT",
                    "GATEWAY_MAX_MODELS_CONCURRENT", "VLLM_INACTIVITY_TIMEOUT", "VLLM_PORT",
                    "VLLM_IMAGE", "HF_TOKEN", "TOTAL_GPU_VRAM", "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "ALLOWED_MODELS_JSON")
LOAD_PLUGINS = "VLLM_GATEWAY_LOAD_PLUGINS"  # the entry-point allow-list; tests load none


def gateway_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a gateway/CLI subprocess: ours, minus config overrides, plus ``env``.

    ``VLLM_GATEWAY_LOAD_PLUGINS`` is empty unless ``env`` names plugins: entry-point plugins
    someone installed into the environment must not change what a test sees.
    """
    out = {k: v for k, v in os.environ.items() if k not in GATEWAY_ENV_VARS}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
    out[LOAD_PLUGINS] = ""
    out.update(env or {})
    return out


def sim_command(*opts: str) -> list[str]:
    """A process-backend ``command`` running the simulator with this interpreter."""
    return [sys.executable, "-m", "vllm_simulator", "--port", "{port}",
            "--served-model-name", "{name}", *opts]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def live_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and pid_alive(int(d))]


def child_pids(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    return [p for p in live_pids() if (_proc_stat(p) or ("", -1))[1] == pid]


def pids_matching(*parts: str) -> list[int]:
    """Live processes whose command line contains every one of ``parts`` as an argument."""
    return [p for p in live_pids() if p != os.getpid()
            and all(part in proc_cmdline(p) for part in parts)]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of every sample called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


class GatewayProcess:
    """A running ``python -m gateway serve``: ``.url``, ``.port``, ``.proc``, ``.config_path``.

    ``stop()`` sends SIGTERM and waits, then SIGKILL; model servers the gateway left behind
    are killed and listed in ``.orphans`` (a test of shutdown asserts that it stays empty).
    """

    def __init__(self, port: int, proc: subprocess.Popen, log_path: Path, config_path: Path):
        self.port, self.proc, self.log_path, self.config_path = port, proc, log_path, config_path
        self.url = f"http://127.0.0.1:{port}"
        self.orphans: list[int] = []

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def children(self) -> list[int]:
        """Live child processes (the model servers it started)."""
        return child_pids(self.proc.pid)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/gateway/status", timeout=5, trust_env=False).json()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5, trust_env=False).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the matching samples (0 when there is none)."""
        return sum(metric_samples(self.metrics(), name, **labels))

    def stop(self, timeout: float = GATEWAY_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent. Returns the exit code."""
        children = self.children() if self.proc.poll() is None else []
        terminate(self.proc, timeout)
        for pid in children:
            if pid_alive(pid):
                self.orphans.append(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)  # process-backend children lead a group
                except OSError:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_gateway(config: dict, tmp_path: Path, port: int | None = None,
                  env: dict[str, str] | None = None,
                  timeout: float = GATEWAY_START_TIMEOUT_S) -> GatewayProcess:
    """Write ``config`` as YAML under ``tmp_path``, run ``python -m gateway serve`` on it and
    wait for ``GET /health``; fails the test, with the gateway's log, if it does not come up.

    Use it as a context manager (or call ``.stop()``) so no gateway outlives its test.
    """
    import pytest
    import yaml

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        p = port or free_port()
        config_path = tmp_path / f"gateway-{p}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = tmp_path / f"gateway-{p}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
                 "--port", str(p)],
                cwd=REPO, env=gateway_env(env), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        gw = GatewayProcess(p, proc, log_path, config_path)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{gw.url}/health", timeout=1.0, trust_env=False).status_code == 200:
                    return gw
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        gw.stop()
        text = gw.log_text()
        if port is None and "in use" in text and attempt < 2:
            continue  # lost a race for the auto-picked port
        pytest.fail(f"gateway did not answer GET /health within {timeout:g} s "
                    f"(exit code {proc.returncode}); its log:\n{text}", pytrace=False)
    raise AssertionError("unreachable")

"""Gateway overhead benchmark: nginx vs a bare Sanic proxy vs the gateway, in one run.

``make bench`` (= ``.venv/bin/python bench/run_bench.py``):

1. starts nginx (own temporary prefix, ``daemon off``, one worker, no access log) answering
   POST /v1/chat/completions with a canned OpenAI chat completion: the fast upstream;
2. measures nginx directly, then ``bench/bare_proxy.py`` (Sanic + one aiohttp session) in
   front of it - the reference - and the same bare proxy with httpx's default transport
   and with httpx over ``httpx_aiohttp.AiohttpTransport`` (the gateway's choice);
3. starts the gateway (``vllm-gateway serve``, one ``static`` model in front of nginx) and
   measures it at 1 and 32 connections, then 32 connections a second time, reading its
   RSS (VmRSS) before, after the first and after the second 32-connection round;
4. prints a table and the targets, writes ``bench/results/latest.json``.

Every load is wrk (``--latency``, POST with a small chat body), 2 s warm-up then the
measured run. Everything started is stopped in ``finally``; the whole run is bounded
(about 2 minutes with the defaults). ``--strict`` exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
PATH = "/v1/chat/completions"
REQUEST_BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
CANNED = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help?"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
}
# Targets (see bench/README.md).
TARGET_RPS_RATIO = 0.60      # gateway req/s / bare aiohttp proxy req/s, 32 connections
TARGET_P50_ADDED_MS = 0.5    # gateway p50 - nginx p50, 1 connection
TARGET_RSS_MB = 150.0
TARGET_KEYED_COST = 0.05     # keys + every per-key limit cost at most 5% of req/s
RSS_GROWTH_TOLERANCE_MB = 3.0  # allocator noise; a leak grows with every request
HARD_DEADLINE_S = 200.0


# --- processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own session, so stopping it also stops its children (nginx's worker)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout)
        # the process group may still hold a child (an nginx worker) after the leader exits
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
        except (ProcessLookupError, PermissionError):
            pass


def wait_ready(proc: Proc, url: str, timeout: float = 20.0) -> None:
    """POST the bench body until it answers 200; fail fast with the log if the process died.
    On failure the process is stopped here: the caller never got it to stop."""
    try:
        _wait_ready(proc, url, timeout)
    except BaseException:
        proc.stop()
        raise


def _wait_ready(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            r = httpx.post(url + PATH, content=REQUEST_BODY, timeout=2.0, trust_env=False,
                           headers={"Content-Type": "application/json",
                                    "Authorization": f"Bearer {BENCH_KEY}"})
            if r.status_code == 200 and r.json().get("object") == "chat.completion":
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout}s ({last}):\n{proc.log()}")


def start_nginx(tmp: Path) -> tuple[Proc, str]:
    prefix = tmp / "nginx"
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    body = json.dumps(CANNED, separators=(",", ":"))
    assert "'" not in body and "\\" not in body
    conf = f"""
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
        location = {PATH} {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    proc = Proc("nginx", [NGINX, "-p", str(prefix), "-c", str(conf_path)], tmp)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OTEL_") and k.lower() not in ("http_proxy", "https_proxy",
                                                              "all_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_bare(tmp: Path, upstream: str, client: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(f"bare-{client}", [sys.executable, str(REPO / "bench" / "bare_proxy.py"),
                                   "--port", str(port), "--upstream", upstream,
                                   "--client", client], tmp, cwd=REPO, env=_env())
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def gateway_argv() -> list[str]:
    script = Path(sys.executable).parent / "vllm-gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


BENCH_KEY = "sk-bench-0123456789abcdef"
# Every per-key limit on, none of them reached: what checking them costs.
KEYED_AUTH = (
    "auth:\n"
    "  keys:\n"
    f"    - {{name: bench, key_sha256: \"{hashlib.sha256(BENCH_KEY.encode()).hexdigest()}\", "
    "models: [\"bench*\"], rpm: 10000000, tpm: 10000000000, max_concurrent: 100000, "
    "tokens_per_day: 10000000000000, max_queued: 1000}\n"
    + "".join(f"    - {{name: other-{i}, key_sha256: \"{hashlib.sha256(str(i).encode()).hexdigest()}\"}}\n"
              for i in range(8))
    + f"  admin_keys: [{{name: ops, key_sha256: \"{'0' * 64}\"}}]\n")


def start_gateway(tmp: Path, upstream: str, keyed: bool = False) -> tuple[Proc, str]:
    port = free_port()
    cfg = tmp / f"gateway{'-keyed' if keyed else ''}.yaml"
    cfg.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        "limits: {max_concurrent: 64, max_queue: 1000}\n"
        + (KEYED_AUTH if keyed else "")
        + "models:\n"
        f"  - {{name: bench, backend: static, url: \"{upstream}\"}}\n")
    argv = gateway_argv() + ["serve", "--config", str(cfg), "--port", str(port)]
    proc = Proc("gateway-keyed" if keyed else "gateway", argv, tmp, cwd=tmp, env=_env())
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- wrk ---------------------------------------------------------------------------------

@dataclass
class Run:
    target: str
    connections: int
    threads: int
    duration_s: float
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str, run: Run) -> Run:
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output without Requests/sec:\n{out}")
    run.rps = float(m.group(1))
    for pct, attr in (("50", "p50_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            setattr(run, attr, _ms(m.group(1)))
    m = re.search(r"(\d+) requests in", out)
    run.requests = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    run.non_2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    run.socket_errors = sum(int(x) for x in m.groups()) if m else 0
    return run


def wrk(url: str, script: Path, connections: int, threads: int, seconds: float) -> str:
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s", "-s", str(script), url + PATH]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 20)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


class Bench:
    def __init__(self, tmp: Path, duration: float, warmup: float, deadline: float) -> None:
        self.script = tmp / "post.lua"
        self.script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{REQUEST_BODY}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n')
        self.keyed_script = tmp / "post-keyed.lua"
        self.keyed_script.write_text(self.script.read_text()
                                     + f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n')
        self.duration = duration
        self.warmup = warmup
        self.deadline = deadline
        self.runs: list[Run] = []

    def measure(self, target: str, url: str, connections: int, note: str = "",
                warmup: bool = True, keyed: bool = False) -> Run:
        if time.monotonic() + self.warmup + self.duration > self.deadline:
            raise TimeoutError(f"bench would exceed its {HARD_DEADLINE_S:.0f}s bound "
                               f"before measuring {target} c={connections}")
        threads = 1 if connections == 1 else 2
        script = self.keyed_script if keyed else self.script
        if warmup and self.warmup > 0:
            wrk(url, script, connections, threads, self.warmup)
        run = parse_wrk(wrk(url, script, connections, threads, self.duration),
                        Run(target, connections, threads, self.duration, note=note))
        self.runs.append(run)
        print(f"  {target:<26} c={connections:<3} {run.rps:9.0f} req/s  p50 {run.p50_ms:7.3f} ms"
              f"  p99 {run.p99_ms:7.3f} ms" + (f"  non-2xx {run.non_2xx}" if run.non_2xx else "")
              + (f"  socket errors {run.socket_errors}" if run.socket_errors else ""),
              flush=True)
        return run


# --- the run -----------------------------------------------------------------------------

def find(runs: list[Run], target: str, connections: int, note: str = "") -> Run | None:
    return next((r for r in runs if r.target == target and r.connections == connections
                 and r.note == note), None)


def gateway_status(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/gateway/status", timeout=5.0, trust_env=False)
    r.raise_for_status()
    return r.json()


def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started = time.monotonic()
    bench = Bench(tmp, args.duration, args.warmup, started + HARD_DEADLINE_S)
    procs: list[Proc] = []
    rss: dict[str, float] = {}
    status_after: dict[str, Any] = {}
    try:
        nginx, upstream = start_nginx(tmp)
        procs.append(nginx)
        print(f"nginx upstream at {upstream}", flush=True)
        bench.measure("nginx", upstream, 1)
        bench.measure("nginx", upstream, 32)

        for client in ("aiohttp", "httpx", "httpx-aiohttp"):
            proc, url = start_bare(tmp, upstream, client)
            procs.append(proc)
            if client == "aiohttp":
                bench.measure("bare-aiohttp", url, 1)
            bench.measure(f"bare-{client}", url, 32)
            proc.stop()

        gw, gw_url = start_gateway(tmp, upstream)
        procs.append(gw)
        rss["before"] = rss_mb(gw.pid)
        bench.measure("gateway", gw_url, 1)
        bench.measure("gateway", gw_url, 32, note="round 1")
        rss["after_round_1"] = rss_mb(gw.pid)
        bench.measure("gateway", gw_url, 32, note="round 2", warmup=False)
        rss["after_round_2"] = rss_mb(gw.pid)
        status_after = gateway_status(gw_url)
        gw.stop()
        # The same gateway with API keys and every per-key limit configured (none hit).
        keyed, keyed_url = start_gateway(tmp, upstream, keyed=True)
        procs.append(keyed)
        bench.measure("gateway-keyed", keyed_url, 32, keyed=True)
        status_after["keyed"] = gateway_status(keyed_url)
        # And the plain one again right after, so the ratio compares neighbours in time.
        gw, gw_url = start_gateway(tmp, upstream)
        procs.append(gw)
        bench.measure("gateway", gw_url, 32, note="round 3")
    finally:
        for p in reversed(procs):
            p.stop()
    return summarize(bench.runs, rss, status_after, time.monotonic() - started, args)


def summarize(runs: list[Run], rss: dict[str, float], status: dict[str, Any], elapsed: float,
              args: argparse.Namespace) -> dict[str, Any]:
    def get(target: str, c: int, note: str = "") -> Run:
        r = find(runs, target, c, note)
        assert r is not None, (target, c, note)
        return r

    nginx1, bare32 = get("nginx", 1), get("bare-aiohttp", 32)
    gw1, gw32 = get("gateway", 1), get("gateway", 32, "round 1")
    ratio = gw32.rps / bare32.rps if bare32.rps else 0.0
    added_p50 = gw1.p50_ms - nginx1.p50_ms
    growth = rss["after_round_2"] - rss["after_round_1"]
    peak = max(rss.values())
    models = [*status.get("models", {}).values(),
              *status.get("keyed", {}).get("models", {}).values()]
    clean = all(m.get("in_flight") == 0 and m.get("queue_depth") == 0 and m.get("drift") == 0
                for m in models) and len(models) == 2
    keyed32 = get("gateway-keyed", 32)
    plain_near = (get("gateway", 32, "round 2").rps + get("gateway", 32, "round 3").rps) / 2
    keyed_cost = 1 - keyed32.rps / plain_near if plain_near else 1.0
    errors = sum(r.non_2xx + r.socket_errors for r in runs)
    targets = {
        "rps_ratio_vs_bare_32c": {"value": round(ratio, 3), "target": f">= {TARGET_RPS_RATIO}",
                                  "ok": ratio >= TARGET_RPS_RATIO},
        "p50_added_vs_nginx_1c_ms": {"value": round(added_p50, 3),
                                     "target": f"<= {TARGET_P50_ADDED_MS}",
                                     "ok": added_p50 <= TARGET_P50_ADDED_MS},
        "rss_peak_mb": {"value": round(peak, 1), "target": f"< {TARGET_RSS_MB}",
                        "ok": peak < TARGET_RSS_MB},
        "rss_growth_round2_mb": {"value": round(growth, 2),
                                 "target": f"<= {RSS_GROWTH_TOLERANCE_MB} (no growth)",
                                 "ok": growth <= RSS_GROWTH_TOLERANCE_MB},
        "keys_and_limits_cost": {"value": round(keyed_cost, 3),
                                 "target": f"<= {TARGET_KEYED_COST} (req/s lost with keys, "
                                           "32 conns)", "ok": keyed_cost <= TARGET_KEYED_COST},
        "errors": {"value": errors, "target": "0", "ok": errors == 0},
        "gateway_accounting_clean": {"value": clean, "target": "in_flight/queue/drift all 0",
                                     "ok": clean},
    }
    transports = {c: get(f"bare-{c}", 32).rps for c in ("aiohttp", "httpx", "httpx-aiohttp")}
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "nginx": NGINX, "wrk": WRK},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                     "body": REQUEST_BODY},
        "elapsed_s": round(elapsed, 1),
        "runs": [asdict(r) for r in runs],
        "gateway_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "transport_rps_32c": transports,
        "gateway_status_after": status,
        "targets": targets,
        "all_ok": all(t["ok"] for t in targets.values()),
    }


def print_report(res: dict[str, Any]) -> None:
    print()
    print(f"{'target':<26}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}")
    for r in res["runs"]:
        name = r["target"] + (f" ({r['note']})" if r["note"] else "")
        print(f"{name:<26}{r['connections']:>6}{r['rps']:>10.0f}{r['p50_ms']:>9.3f}"
              f"{r['p90_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['non_2xx'] + r['socket_errors']:>8}")
    t = res["transport_rps_32c"]
    base = t["aiohttp"] or 1.0
    print("\nupstream client in the bare proxy, 32 conns: "
          + ", ".join(f"{k} {v:.0f} req/s ({v / base:.2f}x)" for k, v in t.items()))
    rss = res["gateway_rss_mb"]
    print("gateway RSS MB: " + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()))
    print()
    for name, tgt in res["targets"].items():
        mark = "ok" if tgt["ok"] else "MISS"
        print(f"  [{mark}] {name}: {tgt['value']} (target {tgt['target']})")
    print(f"\n{'all targets met' if res['all_ok'] else 'some targets missed'}"
          f" in {res['elapsed_s']}s; results in {RESULTS / 'latest.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    for tool in (NGINX, WRK):
        if not os.access(tool, os.X_OK):
            print(f"bench needs {tool} (Debian: apt-get install nginx-light wrk)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="vllm-gw-bench-") as tmp:
        res = run_all(args, Path(tmp))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    return 1 if args.strict and not res["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

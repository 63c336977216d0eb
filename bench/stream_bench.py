"""Streaming benchmark: the upstream direct vs a bare Sanic relay vs the gateway vs LiteLLM.

``make bench`` runs it after bench/run_bench.py. The non-streaming bench says what the
gateway costs per request; for a model gateway what matters more is what it costs per
streamed event and per open stream, and how it compares with the proxy users would pick
instead (LiteLLM). In one run, with the same upstream and the same load generator:

1. **upstream** (bench/sse_upstream.py): a raw uvloop protocol server streaming
   OpenAI ``chat.completion.chunk`` events at the pace each request asks for;
2. targets: ``direct`` (the upstream itself), ``bare-relay``
   (bench/bare_stream_relay.py: Sanic + aiohttp, relaying chunk by chunk: the limit of
   our stack), ``gateway`` (``vllm-gateway serve``, one ``static`` model on the upstream)
   and ``litellm`` (its proxy, one worker, an ``openai/`` model on the upstream, from
   ``.venv-litellm``: ``make litellm``; reported as failed, not fatal, if it cannot start);
3. for each, bench/stream_load.py (one process) runs the phases below; direct, the relay
   and the gateway are up together and take turns run by run (so that a drift of a
   shared machine hits them alike), LiteLLM comes last:

   * **saturation**: 64 and 256 streams of 200 events, each event sent by the upstream
     once the client has read the previous one (lockstep, one event in flight per
     stream, so the proxy relays events one by one instead of batching a backlog),
     closed loop, 1 s warm-up + 5 s measured, two rounds (the better one counts):
     events/s, and the proxy's CPU µs per event (utime+stime from /proc/PID/stat over
     the window ÷ events); the throughput targets compare events per proxy CPU-second;
   * **fixed load**: 500 and 1,000 streams of 40 events at 20 events/s (50 ms apart),
     arrivals spread evenly, measured after every user's first stream: TTFT and
     inter-event gap percentiles, reported as added over ``direct`` (LiteLLM at 500
     only: at 1,000 it is far past saturation);
   * **open streams** (bare relay and gateway, and direct as the check on the load side):
     5,000 streams opened at 1,000/s that stay open, VmRSS of the proxy before and while
     all are open, RSS per stream = delta / N, and the gateway's own in_flight then;

4. after every gateway run GET /gateway/status: in_flight, queue_depth and drift of the
   model must be 0; every run counts errors (non-200, error events, broken streams, no
   ``data: [DONE]``);
5. prints a table and the issue's targets, writes ``bench/results/stream-latest.json``.

The proxy under test is pinned to the last CPU and everything else (upstream, load
generator, this script) to the others (``taskset``; ``--no-pin`` to leave the scheduler
alone): on the 2-core box the proxy gets one core and the load side the other.
Everything started is stopped in ``finally``; the run is bounded (about 4.5 minutes by
default, ``HARD_DEADLINE_S`` at most). ``--quick`` shrinks every phase (the smoke test);
``--strict`` exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import Proc, _env, free_port, gateway_argv  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
LITELLM = REPO / ".venv-litellm" / "bin" / "litellm"
PATH = "/v1/chat/completions"
HARD_DEADLINE_S = 360.0
QUICK_DEADLINE_S = 150.0
TARGETS = ("direct", "bare-relay", "gateway", "litellm")

# The issue's targets (bench/README.md, "Streaming").
TARGET_VS_BARE = 0.9        # gateway events/s ÷ bare relay events/s at saturation
TARGET_VS_LITELLM = 20.0    # gateway events/s ÷ LiteLLM events/s at saturation
TARGET_TTFT_P50_MS = 2.0    # added over direct at the largest fixed load
TARGET_TTFT_P99_MS = 10.0
TARGET_GAP_P99_MS = 5.0
TARGET_RSS_KB = 25.0        # per open stream


@dataclass
class Plan:
    sat_streams: tuple[int, ...] = (64, 256)
    sat_chunks: int = 200
    sat_warmup: float = 1.0
    sat_duration: float = 5.0
    sat_rounds: int = 2  # the best round counts (noise on a shared box only slows down)
    fixed_streams: tuple[int, ...] = (500, 1000)
    litellm_fixed_streams: tuple[int, ...] = (500,)
    fixed_chunks: int = 40
    fixed_interval_ms: float = 50.0
    fixed_window: float = 4.0
    drain: float = 10.0  # streams still going this long after a window are cut off
    litellm_drain: float = 5.0  # LiteLLM, far past its capacity, sooner
    open_streams: int = 5000
    open_rate: float = 1000.0
    open_hold: float = 4.0  # each stream stays open this long past the last one's opening
    deadline: float = HARD_DEADLINE_S

    @classmethod
    def quick(cls) -> Plan:
        # One load of each kind: the smoke test checks the bookkeeping, not the figures.
        return cls(sat_streams=(64,), sat_chunks=100, sat_warmup=0.5, sat_duration=1.5,
                   sat_rounds=1,
                   fixed_streams=(100,), litellm_fixed_streams=(100,), fixed_chunks=10,
                   fixed_window=1.0, open_streams=300, open_rate=600.0, open_hold=2.0,
                   deadline=QUICK_DEADLINE_S)


# --- processes ---------------------------------------------------------------------------

class Pinning:
    """The proxy under test on the last CPU, the rest of the work on the others."""

    def __init__(self, enabled: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cpus) >= 2 and shutil.which("taskset") is not None
        self.proxy = [cpus[-1]] if self.enabled else cpus
        self.load = cpus[:-1] if self.enabled else cpus

    def argv(self, cpus: list[int], argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        return ["taskset", "-c", ",".join(map(str, cpus))] + argv


def raise_nofile() -> None:
    """Children inherit it: the gateway and LiteLLM do not raise their own."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a worker the proxy forked, the upstream's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def wait_ready(proc: Proc, url: str, timeout: float, headers: dict[str, str] | None = None,
               ) -> None:
    """One streamed request must come back whole (200, ends with [DONE])."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    body = {"model": "bench", "stream": True,
            "messages": [{"role": "user", "content": "chunks=2 interval_ms=0"}]}
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}: "
                               f"{proc.log()[-1500:]}")
        try:
            r = httpx.post(url + PATH, json=body, timeout=5.0, trust_env=False,
                           headers=headers or {})
            if r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"):
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last})")


class Bench:
    """Starts the pieces, runs the load generator, keeps every result."""

    def __init__(self, tmp: Path, plan: Plan, pin: Pinning, started: float) -> None:
        self.tmp, self.plan, self.pin = tmp, plan, pin
        self.deadline = started + plan.deadline
        self.procs: list[Proc] = []
        self.upstream_url = ""
        self.upstream_pids: list[int] = []
        self.litellm_key = "sk-bench-" + secrets.token_hex(16)
        self.runs: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}
        self.status_checks: list[dict[str, Any]] = []
        self.gateway_url = ""
        self.seq = 0

    def spawn(self, name: str, argv: list[str], cpus: list[int],
              env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, self.pin.argv(cpus, argv), self.tmp, cwd=self.tmp,
                    env=env or _env())
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    # --- the pieces --------------------------------------------------------------------

    def start_upstream(self, workers: int) -> None:
        port = free_port()
        proc = self.spawn("upstream", [sys.executable, str(BENCH / "sse_upstream.py"),
                                       "--port", str(port), "--workers", str(workers)],
                          self.pin.load)
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_ready(proc, self.upstream_url, 20)
        time.sleep(0.2)  # the forked workers are listening too
        self.upstream_pids = process_tree(proc.pid)

    def start_target(self, target: str) -> tuple[Proc | None, str, dict[str, str]]:
        """(process, url, request headers) of a target; (None, upstream, {}) for direct."""
        if target == "direct":
            return None, self.upstream_url, {}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if target == "bare-relay":
            proc = self.spawn("bare-relay", [sys.executable, str(BENCH / "bare_stream_relay.py"),
                                             "--port", str(port), "--upstream",
                                             self.upstream_url], self.pin.proxy)
            wait_ready(proc, url, 20)
            return proc, url, {}
        if target == "gateway":
            cfg = self.tmp / "gateway.yaml"
            conc = min(10_000, max(8000, self.plan.open_streams + 100))
            cfg.write_text(
                f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                f"limits: {{max_concurrent: {conc}, max_queue: 10000, max_connections: 20000}}\n"
                "models:\n"
                f"  - {{name: bench, backend: static, urls: [\"{self.upstream_url}\"]}}\n")
            proc = self.spawn("gateway", gateway_argv() + ["serve", "--config", str(cfg)],
                              self.pin.proxy)
            wait_ready(proc, url, 30)
            self.gateway_url = url
            return proc, url, {}
        # litellm
        if not LITELLM.exists():
            raise RuntimeError(f"{LITELLM.relative_to(REPO)} missing (make litellm)")
        cfg = self.tmp / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            "  - model_name: bench\n"
            "    litellm_params:\n"
            "      model: openai/bench\n"
            f"      api_base: {self.upstream_url}/v1\n"
            "      api_key: dummy\n"
            "general_settings:\n"
            f"  master_key: {self.litellm_key}\n")
        env = _env()
        for k in ("DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST"):
            env.pop(k, None)
        # no outbound calls: the bundled cost map, no admin UI or docs, no banner
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", DISABLE_ADMIN_UI="True",
                   NO_DOCS="True", LITELLM_DONT_SHOW_FEEDBACK_BOX="True",
                   LITELLM_LOG="ERROR")
        proc = self.spawn("litellm", [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1",
                                      "--port", str(port), "--num_workers", "1"],
                          self.pin.proxy, env=env)
        headers = {"Authorization": f"Bearer {self.litellm_key}"}
        wait_ready(proc, url, 90, headers)
        return proc, url, headers

    # --- the load generator ------------------------------------------------------------

    def load(self, live: Live, kind: str, args: list[str], budget: float,
             meta: dict[str, Any]) -> dict[str, Any] | None:
        """One stream_load.py run, then the target settles; None (and a 'skipped' record)
        when it would pass the deadline."""
        target, url, headers = live.target, live.url, live.headers
        record: dict[str, Any] = {"target": target, "kind": kind, **meta}
        if time.monotonic() + budget > self.deadline:
            record["skipped"] = f"would pass the {self.plan.deadline:.0f}s bound"
            self.runs.append(record)
            print(f"  {target:<11} {kind:<6} skipped: {record['skipped']}", flush=True)
            return None
        self.seq += 1
        out = self.tmp / f"load-{self.seq}.json"
        argv = [sys.executable, str(BENCH / "stream_load.py"), "--url", url,
                "--deadline", str(budget), "--output", str(out)] + args
        if "Authorization" in headers:
            argv += ["--auth", headers["Authorization"].split(" ", 1)[1]]
        try:
            done = subprocess.run(self.pin.argv(self.pin.load, argv), capture_output=True,
                                  text=True, timeout=budget + 20, env=_env())
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"load generator failed ({done.returncode}): "
                                   f"{(done.stderr or done.stdout)[-1500:]}")
            result = json.loads(out.read_text())
        except (subprocess.TimeoutExpired, RuntimeError, ValueError) as exc:
            result = {"error_count": 1, "errors": {"load_generator": 1},
                      "error_samples": [str(exc)[:500]]}
        record.update(result)
        self.runs.append(record)
        print("  " + describe(record), flush=True)
        self.after_run(target, live.pids)
        return record

    def settle(self, pids: list[int], limit: float = 20.0) -> float | None:
        """Wait until the target is idle (under 5% CPU over 0.5 s): a proxy past its
        capacity may still be working off cut-off streams. Seconds waited, None if it
        did not settle within ``limit``."""
        from stream_load import CLK_TCK, cpu_ticks

        def ticks() -> int:
            total = 0
            for pid in pids:
                try:
                    total += cpu_ticks(pid)
                except (OSError, IndexError, ValueError):
                    pass
            return total

        started = time.monotonic()
        limit = min(limit, max(0.0, self.deadline - started))
        prev = ticks()
        while time.monotonic() - started < limit:
            time.sleep(0.5)
            cur = ticks()
            if (cur - prev) / CLK_TCK < 0.025:
                return round(time.monotonic() - started, 1)
            prev = cur
        return None

    def after_run(self, target: str, pids: list[int]) -> None:
        """Let the target go idle; then the gateway's accounting must be back to zero."""
        waited = self.settle(pids or self.upstream_pids)
        last = self.runs[-1]
        last["settled_after_s"] = waited
        if waited is None:
            print(f"  {target} still busy 20 s after the run", flush=True)
        if target == "gateway" and self.gateway_url:
            what = f"{last['kind']} {last['streams']}" + (
                f" round {last['round']}" if "round" in last else "")
            self.check_status(self.gateway_url, what)

    def sat(self, live: Live, c: int, round_no: int) -> None:
        p = self.plan
        drain = p.litellm_drain if live.target == "litellm" else p.drain
        args = ["--mode", "closed", "--lockstep", "--concurrency", str(c),
                "--chunks", str(p.sat_chunks), "--interval-ms", "0",
                "--warmup", str(p.sat_warmup), "--duration", str(p.sat_duration),
                "--stagger", "0.2", "--read-timeout", str(drain + 60), "--drain", str(drain)]
        self.load(live, "sat", args + live.cpu_args(self.upstream_pids),
                  p.sat_warmup + p.sat_duration + drain + 15, {"streams": c, "round": round_no})

    def fixed(self, live: Live, c: int) -> None:
        p = self.plan
        drain = p.litellm_drain if live.target == "litellm" else p.drain
        length = p.fixed_chunks * p.fixed_interval_ms / 1000.0
        args = ["--mode", "closed", "--concurrency", str(c), "--chunks", str(p.fixed_chunks),
                "--interval-ms", str(p.fixed_interval_ms), "--stagger", str(length),
                "--warmup", str(2 * length + 0.3), "--duration", str(p.fixed_window),
                "--read-timeout", str(drain + 60), "--drain", str(drain)]
        self.load(live, "fixed", args + live.cpu_args(self.upstream_pids),
                  2 * length + 0.3 + p.fixed_window + drain + 15, {"streams": c})

    def open_streams(self, live: Live) -> None:
        p = self.plan
        n = p.open_streams
        ramp = n / p.open_rate
        hold_ms = (ramp + p.open_hold) * 1000.0  # all still open when the last one opens
        who, pids = ("proxy", live.pids) if live.pids else ("upstream", self.upstream_pids)
        args = ["--mode", "open", "--concurrency", str(n), "--interval-ms", str(hold_ms),
                "--open-rate", str(p.open_rate), "--open-timeout", "3",
                "--read-timeout", str(hold_ms / 1000.0 + 30),
                "--rss", f"{who}={'+'.join(map(str, pids))}"]
        if live.target == "gateway":
            args += ["--status-url", live.url + "/gateway/status"]
        self.load(live, "open", args, ramp + hold_ms / 1000.0 + 45, {"streams": n})

    def check_status(self, gw_url: str, after: str) -> None:
        try:
            r = httpx.get(gw_url + "/gateway/status", timeout=5.0, trust_env=False)
            body = r.json()
            model = body.get("models", {}).get("bench", {})
            clean = (r.status_code == 200 and bool(model)
                     and all(model.get(k) == 0 for k in ("in_flight", "queue_depth", "drift")))
            check = {"after": after, "clean": clean,
                     **{k: model.get(k) for k in ("in_flight", "queue_depth", "drift", "state")}}
        except (httpx.HTTPError, ValueError) as exc:
            check = {"after": after, "clean": False, "error": f"{type(exc).__name__}: {exc}"}
        self.status_checks.append(check)
        if not check["clean"]:
            print(f"  gateway status after {after} NOT clean: {check}", flush=True)

    # --- the targets ------------------------------------------------------------------

    def bring_up(self, target: str) -> Live | None:
        """Start a target; on failure it is reported (table: failed: reason), not fatal."""
        try:
            proc, url, headers = self.start_target(target)
        except (RuntimeError, TimeoutError, OSError) as exc:
            reason = " ".join(str(exc).split())[:300]
            self.failed[target] = reason
            print(f"{target} failed: {reason}", flush=True)
            for pr in [pr for pr in self.procs if pr.name == target]:
                self.stop(pr)
            return None
        pids = process_tree(proc.pid) if proc else []  # taskset execs: same pid
        live = Live(target, proc, url, headers, pids)
        live.rss_start = rss_kb(pids) if pids else None
        return live

    def take_down(self, live: Live) -> None:
        if live.pids:
            try:
                self.runs.append({"target": live.target, "kind": "rss",
                                  "rss_kb_start": live.rss_start,
                                  "rss_kb_end": rss_kb(live.pids)})
            except OSError:
                pass
        if live.proc is not None:
            self.stop(live.proc)
        if live.target == "gateway":
            self.gateway_url = ""

    def run_all(self, with_litellm: bool, with_open: bool) -> None:
        """direct, the bare relay and the gateway are up together (idle ones cost nothing)
        and measured in turn, phase by phase, so that drifts of a shared machine hit them
        alike; saturation runs ``plan.sat_rounds`` times. LiteLLM, far slower, comes last."""
        p = self.plan
        lives: list[Live] = []
        try:
            for target in ("direct", "bare-relay", "gateway"):
                live = self.bring_up(target)
                if live is not None:
                    lives.append(live)
            print("saturation:", flush=True)
            for round_no in range(1, p.sat_rounds + 1):
                for c in p.sat_streams:
                    for live in lives:
                        self.sat(live, c, round_no)
            print("fixed load:", flush=True)
            for c in p.fixed_streams:
                for live in lives:
                    self.fixed(live, c)
            if with_open:
                print("open streams:", flush=True)
                for live in lives:
                    self.open_streams(live)
        finally:
            for live in lives:
                self.take_down(live)
        if not with_litellm:
            self.failed["litellm"] = "skipped (--no-litellm)"
            return
        print("litellm:", flush=True)
        live = self.bring_up("litellm")
        if live is None:
            return
        try:
            for c in p.sat_streams:
                self.sat(live, c, 1)
            for c in p.litellm_fixed_streams:
                self.fixed(live, c)
        finally:
            self.take_down(live)


@dataclass
class Live:
    """A target that is up: its process (None for direct), URL, request headers, pids."""

    target: str
    proc: Proc | None
    url: str
    headers: dict[str, str]
    pids: list[int]
    rss_start: int | None = None

    def cpu_args(self, upstream_pids: list[int]) -> list[str]:
        args = ["--cpu", f"upstream={'+'.join(map(str, upstream_pids))}"]
        if self.pids:
            args += ["--cpu", f"proxy={'+'.join(map(str, self.pids))}"]
        return args


# --- report ------------------------------------------------------------------------------

def proxy_core(r: dict[str, Any], pin: dict[str, Any]) -> float | None:
    """How busy the proxy's CPU was over the window, whoever ran there."""
    cpus = pin.get("proxy_cpus") or []
    if not pin.get("enabled") or len(cpus) != 1:
        return None
    return r.get("cpu", {}).get(f"cpu{cpus[0]}", {}).get("util")


def describe(r: dict[str, Any]) -> str:
    kind = r["kind"] + (f" r{r['round']}" if "round" in r else "")
    head = f"{r['target']:<11} {kind:<7} {r.get('streams', ''):>5}"
    if "events_per_s" not in r and "rss_kb_open" not in r:
        return f"{head}  errors {r.get('error_count')}: {r.get('error_samples')}"
    errs = f"  errors {r['error_count']}" + (f" {r['error_samples'][:2]}" if r["error_count"]
                                             else "")
    if r.get("unfinished"):
        errs += f"  unfinished {r['unfinished']} (cut off {r.get('drain_s', '')}s after the window)"
    if r["kind"] == "open":
        return (f"{head}  open {r['open_at_rss_sample']}  rss {kb_per_stream(r):.1f} KB/stream"
                + errs)
    cpu = r.get("cpu", {})
    proxy = cpu.get("proxy", {})
    us = (f"  {proxy['cpu_s'] * 1e6 / r['events_in_window']:6.1f} µs/event"
          if proxy and r["events_in_window"] else "")
    return (f"{head}  {r['events_per_s']:>9.0f} events/s  TTFT p50 {fmt(r['ttft_ms']['p50'], '.2f')}"
            f" p99 {fmt(r['ttft_ms']['p99'], '.2f')} ms  gap p99 {fmt(r['gap_ms']['p99'], '.2f')} ms{us}"
            f"  util proxy {proxy.get('util', 0):.2f} upstream "
            f"{cpu.get('upstream', {}).get('util', 0):.2f} load "
            f"{cpu.get('loadgen', {}).get('util', 0):.2f}" + errs)


def kb_per_stream(r: dict[str, Any]) -> float:
    before = sum(r["rss_kb_before"].values())
    during = sum(r["rss_kb_open"].values())
    return (during - before) / max(1, r["streams"])


def sat_score(r: dict[str, Any]) -> float:
    """A saturation round's figure: events per CPU-second of the proxy (its rate with its
    core to itself), or events/s for direct."""
    proxy = r.get("cpu", {}).get("proxy")
    if proxy and proxy["cpu_s"] > 0:
        return r["events_in_window"] / proxy["cpu_s"]
    return r["events_per_s"]


def find(runs: list[dict[str, Any]], target: str, kind: str, streams: int | None = None
         ) -> dict[str, Any] | None:
    for r in runs:
        if (r["target"] == target and r["kind"] == kind and "skipped" not in r
                and (streams is None or r.get("streams") == streams)):
            return r
    return None


def summarize(bench: Bench, elapsed: float, args: argparse.Namespace) -> dict[str, Any]:
    plan, runs = bench.plan, bench.runs
    pin = {"enabled": bench.pin.enabled, "proxy_cpus": bench.pin.proxy,
           "load_cpus": bench.pin.load}
    table: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        if target in bench.failed:
            table[target] = {"failed": bench.failed[target]}
            continue
        if not any(r["target"] == target for r in runs):
            table[target] = {"failed": "not run"}
            continue
        mine = [r for r in runs if r["target"] == target]
        row: dict[str, Any] = {"errors": sum(r.get("error_count", 0) for r in mine),
                               "unfinished": sum(r.get("unfinished", 0) for r in mine),
                               "skipped_runs": sum(1 for r in mine if "skipped" in r)}
        for c in plan.sat_streams:
            rounds = [r for r in runs if r["target"] == target and r["kind"] == "sat"
                      and r.get("streams") == c and "events_per_s" in r]
            r = max(rounds, key=sat_score) if rounds else None
            if r:
                row[f"sat{c}_rounds"] = [round(sat_score(x)) for x in rounds]
                row[f"sat{c}_best_round"] = r.get("round")
                cpu = r.get("cpu", {})
                proxy = cpu.get("proxy")
                events = r["events_in_window"]
                row[f"sat{c}_errors"] = sum(x.get("error_count", 0) for x in rounds)
                row[f"sat{c}_unfinished"] = sum(x.get("unfinished", 0) for x in rounds)
                row[f"sat{c}_events_per_s"] = r["events_per_s"]
                row[f"sat{c}_events_per_read"] = r["events_per_read"]
                row[f"sat{c}_ttft_p50_ms"] = r["ttft_ms"]["p50"]
                row[f"sat{c}_load_side_util"] = round(
                    cpu.get("upstream", {}).get("util", 0)
                    + cpu.get("loadgen", {}).get("util", 0), 3)
                if proxy and events and proxy["cpu_s"] > 0:
                    row[f"sat{c}_cpu_us_per_event"] = round(proxy["cpu_s"] * 1e6 / events, 1)
                    row[f"sat{c}_events_per_cpu_s"] = round(events / proxy["cpu_s"])
                    row[f"sat{c}_proxy_util"] = proxy["util"]
                    row[f"sat{c}_proxy_core_busy"] = proxy_core(r, pin)
        for c in sorted(set(plan.fixed_streams) | set(plan.litellm_fixed_streams)):
            r, d = find(runs, target, "fixed", c), find(runs, "direct", "fixed", c)
            if r and "ttft_ms" in r:
                row[f"fixed{c}_ttft_p50_ms"] = r["ttft_ms"]["p50"]
                row[f"fixed{c}_ttft_p99_ms"] = r["ttft_ms"]["p99"]
                row[f"fixed{c}_gap_p99_ms"] = r["gap_ms"]["p99"]
                row[f"fixed{c}_events_per_s"] = r["events_per_s"]
                row[f"fixed{c}_unfinished"] = r.get("unfinished", 0)
                row[f"fixed{c}_errors"] = r.get("error_count")
                proxy = r.get("cpu", {}).get("proxy")
                if proxy:
                    row[f"fixed{c}_proxy_util"] = proxy["util"]
                if d and "ttft_ms" in d:
                    for name, a, q in (("ttft_p50", "ttft_ms", "p50"), ("ttft_p99", "ttft_ms", "p99"),
                                       ("gap_p99", "gap_ms", "p99")):
                        mine, base = r[a][q], d[a][q]
                        row[f"fixed{c}_added_{name}_ms"] = (
                            round(mine - base, 3) if mine is not None and base is not None
                            else None)
        r = find(runs, target, "open")
        if r and "rss_kb_open" in r:
            row["open_streams"] = r["streams"]
            row["open_at_sample"] = r["open_at_rss_sample"]
            row["open_errors"] = r.get("error_count")
            row["open_rss_mb_before"] = round(sum(r["rss_kb_before"].values()) / 1024, 1)
            row["open_rss_mb_open"] = round(sum(r["rss_kb_open"].values()) / 1024, 1)
            row["open_rss_kb_per_stream"] = round(kb_per_stream(r), 2)
            status = r.get("status_while_open") or {}
            model = status.get("models", {}).get("bench") if isinstance(status, dict) else None
            row["open_gateway_in_flight"] = model.get("in_flight") if model else None
        r = find(runs, target, "rss")
        if r:
            row["rss_mb_start"] = round(r["rss_kb_start"] / 1024, 1)
            row["rss_mb_end"] = round(r["rss_kb_end"] / 1024, 1)
        table[target] = row

    targets = compute_targets(table, bench, plan)
    scored = [t for t in targets.values() if t["ok"] is not None]
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "pinning": pin,
                 "load_average_at_end": os.getloadavg(), "litellm": litellm_version()},
        "plan": dict(vars(plan)),
        "quick": args.quick,
        "elapsed_s": round(elapsed, 1),
        "table": table,
        "gateway_status_checks": bench.status_checks,
        "runs": runs,
        "targets": targets,
        "all_ok": all(t["ok"] for t in scored),
    }


def compute_targets(table: dict[str, dict[str, Any]], bench: Bench, plan: Plan
                    ) -> dict[str, dict[str, Any]]:
    """The issue's targets. Throughput ratios compare events per CPU-second of each proxy
    (its rate at saturation, i.e. with its core to itself), since on a shared box other
    work takes a varying share of that core; the raw events/s ratio is given as well."""
    gw, bare, ll = table["gateway"], table["bare-relay"], table["litellm"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: Any, target: str, ok: bool | None, note: str = "") -> None:
        out[name] = {"value": value, "target": target, "ok": ok,
                     **({"note": note} if note else {})}

    def ratio(a: float | None, b: float | None, digits: int) -> float | None:
        return round(a / b, digits) if a and b else None

    for c in plan.sat_streams:
        key, raw = f"sat{c}_events_per_cpu_s", f"sat{c}_events_per_s"
        r = ratio(gw.get(key), bare.get(key), 3)
        add(f"gateway_vs_bare_relay_sat{c}", r, f">= {TARGET_VS_BARE}",
            r is not None and r >= TARGET_VS_BARE,
            f"events/s ratio {ratio(gw.get(raw), bare.get(raw), 3)}")
        if "failed" in ll:
            add(f"gateway_vs_litellm_sat{c}", None, f">= {TARGET_VS_LITELLM}", None,
                f"litellm {ll['failed']}")
        else:
            r = ratio(gw.get(key), ll.get(key), 1)
            add(f"gateway_vs_litellm_sat{c}", r, f">= {TARGET_VS_LITELLM}",
                r is not None and r >= TARGET_VS_LITELLM,
                f"events/s ratio {ratio(gw.get(raw), ll.get(raw), 1)}")
    c = max(plan.fixed_streams)
    rate = f"{1000 / plan.fixed_interval_ms:g}"
    for name, key, limit in (("ttft_p50", "added_ttft_p50_ms", TARGET_TTFT_P50_MS),
                             ("ttft_p99", "added_ttft_p99_ms", TARGET_TTFT_P99_MS),
                             ("gap_p99", "added_gap_p99_ms", TARGET_GAP_P99_MS)):
        v = gw.get(f"fixed{c}_{key}")
        add(f"gateway_added_{name}_ms_at_{c}x{rate}per_s", v, f"<= {limit}",
            v is not None and v <= limit)
    n = plan.open_streams
    opened, in_flight = gw.get("open_at_sample"), gw.get("open_gateway_in_flight")
    add(f"gateway_holds_{n}_open_streams", f"{opened} open, in_flight {in_flight}",
        f"{n} open", opened == n and in_flight == n)
    kb = gw.get("open_rss_kb_per_stream")
    add("gateway_rss_kb_per_open_stream", kb, f"<= {TARGET_RSS_KB}",
        kb is not None and kb <= TARGET_RSS_KB)
    errors = {t: table[t].get("errors") for t in ("direct", "bare-relay", "gateway")}
    add("errors_direct_relay_gateway", errors, "all 0", all(v == 0 for v in errors.values()))
    clean = bool(bench.status_checks) and all(s["clean"] for s in bench.status_checks)
    add("gateway_accounting_clean", clean, "in_flight/queue_depth/drift 0 after every run",
        clean)
    skipped = sum(table[t].get("skipped_runs", 0) for t in table if "failed" not in table[t])
    add("runs_within_deadline", f"{skipped} skipped", "0 skipped", skipped == 0)
    return out


def litellm_version() -> str | None:
    py = LITELLM.parent / "python"
    if not py.exists():
        return None
    done = subprocess.run([str(py), "-c", "import importlib.metadata as m;"
                           "print(m.version('litellm'))"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() or None


def fmt(v: Any, spec: str = ".0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def print_report(res: dict[str, Any], output: Path) -> None:
    plan, table = res["plan"], res["table"]
    ok_rows = {t: row for t, row in table.items() if "failed" not in row}
    print(f"\nSaturation: lockstep streams of {plan['sat_chunks']} events, "
          f"{plan['sat_duration']:g} s measured, best of {plan['sat_rounds']} round(s) by "
          "events per proxy CPU-second")
    print(f"{'target':<11}{'streams':>8}{'events/s':>10}{'µs/event':>10}{'events/CPU-s':>13}"
          f"{'proxy util':>11}{'its core':>9}{'load side':>10}{'TTFT p50':>9}{'errors':>7}"
          f"{'cut off':>8}  rounds")
    for target, row in table.items():
        if "failed" in row:
            print(f"{target:<11}  failed: {row['failed']}")
            continue
        for c in plan["sat_streams"]:
            k = f"sat{c}_"
            print(f"{target:<11}{c:>8}{fmt(row.get(k + 'events_per_s')):>10}"
                  f"{fmt(row.get(k + 'cpu_us_per_event'), '.1f'):>10}"
                  f"{fmt(row.get(k + 'events_per_cpu_s')):>13}"
                  f"{fmt(row.get(k + 'proxy_util'), '.2f'):>11}"
                  f"{fmt(row.get(k + 'proxy_core_busy'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'load_side_util'), '.2f'):>10}"
                  f"{fmt(row.get(k + 'ttft_p50_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'errors')):>7}{fmt(row.get(k + 'unfinished')):>8}"
                  f"  {'/'.join(map(str, row.get(k + 'rounds') or []))}")
    print(f"\nFixed load: {plan['fixed_chunks']} events {plan['fixed_interval_ms']:g} ms apart, "
          f"{plan['fixed_window']:g} s measured (ms; added = over direct)")
    print(f"{'target':<11}{'streams':>8}{'TTFT p50':>9}{'p99':>9}{'gap p99':>9}"
          f"{'+TTFT p50':>10}{'+p99':>9}{'+gap p99':>9}{'events/s':>9}{'proxy util':>11}"
          f"{'errors':>7}{'cut off':>8}")
    for target, row in ok_rows.items():
        for c in sorted(set(plan["fixed_streams"]) | set(plan["litellm_fixed_streams"])):
            k = f"fixed{c}_"
            if k + "ttft_p50_ms" not in row:
                continue
            print(f"{target:<11}{c:>8}{fmt(row.get(k + 'ttft_p50_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'ttft_p99_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'gap_p99_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'added_ttft_p50_ms'), '.2f'):>10}"
                  f"{fmt(row.get(k + 'added_ttft_p99_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'added_gap_p99_ms'), '.2f'):>9}"
                  f"{fmt(row.get(k + 'events_per_s')):>9}"
                  f"{fmt(row.get(k + 'proxy_util'), '.2f'):>11}"
                  f"{fmt(row.get(k + 'errors')):>7}{fmt(row.get(k + 'unfinished')):>8}")
    print("\nOpen streams (direct: the upstream's RSS)")
    print(f"{'target':<11}{'streams':>8}{'open':>6}{'RSS MB before':>14}{'while open':>11}"
          f"{'KB/stream':>10}{'in_flight':>10}{'errors':>7}")
    for target, row in ok_rows.items():
        if "open_streams" not in row:
            continue
        print(f"{target:<11}{row['open_streams']:>8}{fmt(row['open_at_sample']):>6}"
              f"{fmt(row['open_rss_mb_before'], '.1f'):>14}"
              f"{fmt(row['open_rss_mb_open'], '.1f'):>11}"
              f"{fmt(row['open_rss_kb_per_stream'], '.1f'):>10}"
              f"{fmt(row.get('open_gateway_in_flight')):>10}{fmt(row.get('open_errors')):>7}")
    print("\nerrors: " + ", ".join(f"{t} {row['errors']}" for t, row in ok_rows.items()))
    print()
    for name, t in res["targets"].items():
        mark = "skip" if t["ok"] is None else "ok" if t["ok"] else "MISS"
        note = f" ({t['note']})" if t.get("note") else ""
        print(f"  [{mark}] {name}: {t['value']} (target {t['target']}){note}")
    print(f"\n{'all targets met' if res['all_ok'] else 'some targets missed'}"
          f" in {res['elapsed_s']}s; results in {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every phase shrunk (smoke run)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--streams-open", type=int, help="streams in the open-streams phase")
    parser.add_argument("--no-open", action="store_true", help="skip the open-streams phase")
    parser.add_argument("--upstream-workers", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--output", type=Path, default=RESULTS / "stream-latest.json")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.streams_open:
        plan.open_streams = args.streams_open
    raise_nofile()
    pin = Pinning(not args.no_pin)
    if pin.enabled:
        os.sched_setaffinity(0, pin.load)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vllm-gw-stream-bench-") as tmp:
        bench = Bench(Path(tmp), plan, pin, started)
        try:
            bench.start_upstream(args.upstream_workers)
            print(f"upstream at {bench.upstream_url} (pids {bench.upstream_pids}); proxy on "
                  f"CPU {pin.proxy}, load side on CPU {pin.load}", flush=True)
            bench.run_all(with_litellm=not args.no_litellm, with_open=not args.no_open)
        finally:
            bench.stop_all()
        res = summarize(bench, time.monotonic() - started, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res, args.output)
    return 1 if args.strict and not res["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

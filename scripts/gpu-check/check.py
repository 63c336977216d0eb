"""GPU check of the gateway's memory handling, on a real GPU without vLLM.

Runs ``python -m gateway serve`` with three process-backend models that are
hold_gpu.py servers holding known amounts of GPU memory, and checks against pynvml's
own readings that:

  1. the NVML probe works (/metrics gateway_vram_total_bytes and _used_bytes);
  2. the budget read from NVML (/gateway/status totals.vram_total_mib) is the device's total;
  3. each model's footprint, learned from NVML, is its allocation plus a CUDA context;
  4. past a (configured, small) budget the least recently used model is evicted, and
     NVML shows its memory released before the next model takes its place.

Exit status: 0 all checks passed, 1 some failed, 77 no GPU here (nothing checked).
``--dry-run`` runs the same steps against a pretend GPU (fake_vram.py), no GPU needed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MIB = 1024 * 1024
NO_GPU = 77
SIZES = {"hold-a": 2048, "hold-b": 3072, "hold-c": 4096}  # MiB each model allocates
FOOTPRINT_TOL = 0.15  # of the allocation, besides the measured context
IDLE_TOL_MIB = 64  # NVML noise on an otherwise idle GPU
RUN_ID = uuid.uuid4().hex[:12]  # marks every process this run starts (cleanup)

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


# --- what the GPU shows ---------------------------------------------------------------

class Vram:
    """Total and used MiB of one device: pynvml, or the pretend GPU of --dry-run."""

    def __init__(self, device: int, fake: tuple[str, int] | None = None) -> None:
        self.fake = fake
        if fake is not None:
            sys.path.insert(0, str(HERE))
            import fake_vram
            self._fake = fake_vram
        else:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device)

    def read(self) -> tuple[int, int]:
        if self.fake is not None:
            return self._fake.read(*self.fake)
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return info.total // MIB, info.used // MIB

    def used(self) -> int:
        return self.read()[1]

    def wait_used_below(self, limit: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (used := self.used()) > limit and time.monotonic() < deadline:
            time.sleep(0.2)
        return used


class MinSampler:
    """Samples used memory in the background; ``low`` is the least seen."""

    def __init__(self, vram: Vram) -> None:
        self.vram, self.low, self._stop = vram, vram.used(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.low = min(self.low, self.vram.used())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.low


def no_gpu_reason(device: int, hold_python: str) -> str | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no library, no driver, no device
        return f"NVML unavailable ({type(exc).__name__}: {exc})"
    if device >= count:
        return f"NVML sees {count} device(s), no device {device}"
    probe = "import torch; print(torch.cuda.is_available())"
    try:
        out = subprocess.run([hold_python, "-c", probe], capture_output=True, text=True,
                             timeout=120, env=child_env(device, {}))
    except subprocess.TimeoutExpired:
        return "torch took over 120s to report on CUDA"
    if out.stdout.strip() != "True":
        return f"torch.cuda.is_available() is not True in {hold_python}: " \
               f"{(out.stdout + out.stderr).strip()[-300:]}"
    return None


# --- processes and HTTP -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: int, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "GPU_CHECK_RUN": RUN_ID, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **extra}
    env.setdefault("CUDA_VISIBLE_DEVICES", str(device))  # cuda:0 is NVML's device
    return env


def http(url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if http(url, timeout=2)[0] == 200:
            return True
        time.sleep(0.2)
    return False


def stop_process(proc: subprocess.Popen | None, grace_s: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Stopped(Exception):
    """SIGTERM (gpu-check.sh's timeout): stop, clean up, still print the summary."""


def _on_sigterm(*_) -> None:
    raise Stopped("SIGTERM received (timed out?)")


def _die_with_parent() -> None:
    """In the gateway's child process: SIGTERM it should this script die (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kill_leftovers() -> None:
    """SIGKILL any process still carrying this run's GPU_CHECK_RUN marker."""
    marker = f"GPU_CHECK_RUN={RUN_ID}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    print(f"note: killed leftover process {pid}", flush=True)
        except OSError:
            continue


class Gateway:
    def __init__(self, work: Path, name: str, cfg: dict, env: dict[str, str]) -> None:
        self.port = cfg["listen"]["port"]
        self.base = f"http://127.0.0.1:{self.port}"
        self.footprints = Path(cfg["gpu"]["footprints_file"])
        self.config = work / f"{name}.yaml"
        self.config.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        self.log = work / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
        if not wait_http(self.base + "/health", timeout_s, self.proc):
            code = self.proc.poll()
            raise RuntimeError(f"gateway exited with status {code} (log below)" if code is not None
                               else f"gateway did not answer /health within {timeout_s:g}s")

    def stop(self) -> None:
        stop_process(self.proc)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def status(self) -> dict:
        code, text = http(self.base + "/gateway/status")
        if code != 200:
            raise RuntimeError(f"/gateway/status answered {code}: {text[:300]}")
        return json.loads(text)

    def metric(self, name: str, labels: str = "") -> float | None:
        code, text = http(self.base + "/metrics")
        if code != 200:
            raise RuntimeError(f"/metrics answered {code}: {text[:300]}")
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == want or (labels and key.startswith(name + "{")
                               and all(p in key for p in labels.split(","))):
                return float(value)
        return None

    def chat(self, model: str, timeout_s: float = 180) -> tuple[bool, str]:
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        code, text = http(self.base + "/v1/chat/completions", body, timeout=timeout_s)
        if code != 200:
            return False, f"HTTP {code}: {text[:300]}"
        answered = json.loads(text).get("model")
        return answered == model, f"answered by {answered!r}"


# --- the check ------------------------------------------------------------------------------

def model_config(work: Path, hold_python: str, fake_dir: str | None,
                 total_mib: int | None) -> dict:
    hold = [hold_python, str(HERE / "hold_gpu.py"), "--port", "{port}",
            "--served-model-name", "{name}"]
    fake = ["--fake-vram-dir", fake_dir] if fake_dir else []
    gpu = {"footprints_file": str(work / "footprints.json"), "estimate_mib": 5000,
           "min_residency_s": 0, "release_timeout_s": 30, "load_timeout_s": 60}
    if total_mib:
        gpu["total_vram_mib"] = total_mib
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "idle_timeout_s": 0,  # never stop for idleness: only evictions stop models here
        "shutdown_grace_s": 2,
        "upstream": {"start_timeout_s": 120, "health_interval_s": 0.2, "retries": 0},
        "gpu": gpu,
        "server_logs": {"dir": str(work / "server-logs")},
        "plugins": {"load_entrypoints": False, "modules": ["fake_vram"] if fake_dir else []},
        "models": [{"name": name, "backend": "process",
                    "command": hold + ["--mib", str(mib)] + fake}
                   for name, mib in SIZES.items()],
    }


def measure_context(vram: Vram, hold_python: str, env: dict, fake_dir: str | None) -> int:
    """What a 0-MiB hold_gpu.py adds to used memory: the CUDA context (and torch's)."""
    port = free_port()
    before = vram.used()
    cmd = [hold_python, str(HERE / "hold_gpu.py"), "--port", str(port), "--mib", "0"]
    proc = subprocess.Popen(cmd + (["--fake-vram-dir", fake_dir] if fake_dir else []), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_die_with_parent)
    try:
        if not wait_http(f"http://127.0.0.1:{port}/health", 120, proc):
            raise RuntimeError("hold_gpu.py --mib 0 did not become healthy: "
                               + (proc.stderr.read().decode(errors="replace")[-500:]
                                  if proc.poll() is not None else "timeout"))
        ctx = vram.used() - before
    finally:
        stop_process(proc)
    vram.wait_used_below(before + IDLE_TOL_MIB, 30)
    return ctx


def read_footprints(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def phase_budget_from_nvml(gw: Gateway, vram: Vram, ctx: int) -> dict[str, int]:
    total, used = vram.read()
    gw_total, gw_used = gw.metric("gateway_vram_total_bytes"), gw.metric("gateway_vram_used_bytes")
    check("nvml probe total", gw_total is not None and close(gw_total / MIB, total, 0.03 * total),
          f"/metrics {gw_total and gw_total / MIB:.0f} MiB vs pynvml {total} MiB")
    check("nvml probe used", gw_used is not None
          and close(gw_used / MIB, used, max(0.03 * used, IDLE_TOL_MIB)),
          f"/metrics {gw_used and gw_used / MIB:.0f} MiB vs pynvml {used} MiB")
    budget = gw.status()["totals"]["vram_total_mib"]
    check("budget from nvml", budget is not None and close(budget, total, 1),
          f"totals.vram_total_mib {budget} vs device total {total} MiB")
    learned: dict[str, int] = {}
    for name, mib in SIZES.items():
        ok, detail = gw.chat(name)
        if not check(f"start {name}", ok, detail):
            continue
        status = gw.status()["models"][name]["vram_mib"]
        saved = read_footprints(gw.footprints).get(name)
        learned[name] = saved or 0
        expected = mib + ctx
        check(f"footprint {name}", saved == status and saved is not None
              and close(saved, expected, FOOTPRINT_TOL * mib),
              f"learned {saved} MiB (status {status}) vs {mib} allocated + {ctx} context "
              f"= {expected} MiB")
    return learned


def phase_eviction(gw: Gateway, vram: Vram, learned: dict[str, int], budget: int) -> None:
    fb, fc = learned["hold-b"], learned["hold-c"]
    total = gw.status()["totals"]["vram_total_mib"]
    check("configured budget", total == budget, f"totals.vram_total_mib {total} vs {budget} set")
    for name in ("hold-a", "hold-b", "hold-a"):  # a used again: b is now least recently used
        check(f"request {name}", *gw.chat(name))
    before = vram.used()
    sampler = MinSampler(vram)
    ok, detail = gw.chat("hold-c")
    low = sampler.stop()
    after = vram.used()
    check("request hold-c", ok, detail)
    states = {n: m["state"] for n, m in gw.status()["models"].items()}
    evictions = gw.metric("gateway_evictions_total", 'model="hold-b",reason="vram"')
    check("lru evicted", states == {"hold-a": "ready", "hold-b": "stopped", "hold-c": "ready"}
          and evictions == 1, f"states {states}, evictions of hold-b {evictions}")
    check("released on eviction", close(before - low, fb, FOOTPRINT_TOL * fb),
          f"used fell {before - low} MiB (from {before} to {low}) vs hold-b's {fb} MiB")
    check("used after eviction", close(after - before, fc - fb, FOOTPRINT_TOL * fc),
          f"used changed {after - before:+d} MiB vs {fc - fb:+d} (hold-c in, hold-b out)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=int, default=0, help="NVML device index (default 0)")
    ap.add_argument("--hold-python", default=os.environ.get("GPU_CHECK_HOLD_PYTHON", sys.executable),
                    help="interpreter with torch that runs hold_gpu.py")
    ap.add_argument("--dry-run", action="store_true", help="pretend GPU, no CUDA needed")
    ap.add_argument("--fake-total-mib", type=int, default=81920)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, _on_sigterm)
    if not args.dry_run:
        reason = no_gpu_reason(args.device, args.hold_python)
        if reason:
            print(f"SKIP no GPU here: {reason}", flush=True)
            return NO_GPU
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    fake_dir = None
    extra = {"VLLM_GATEWAY_GPU_DEVICES": str(args.device)}
    if args.dry_run:
        fake_dir = str(work / "fake-vram")
        os.mkdir(fake_dir)
        extra.update(GPU_CHECK_FAKE_VRAM_DIR=fake_dir,
                     GPU_CHECK_FAKE_TOTAL_MIB=str(args.fake_total_mib),
                     PYTHONPATH=os.pathsep.join(filter(None, [str(HERE),
                                                              os.environ.get("PYTHONPATH")])))
    env = child_env(args.device, extra)
    vram = Vram(args.device, (fake_dir, args.fake_total_mib) if fake_dir else None)
    started = time.monotonic()
    gw: Gateway | None = None
    try:
        baseline = vram.used()
        print(f"device {args.device}: {vram.read()[0]} MiB total, {baseline} MiB used"
              f"{' (pretend GPU: --dry-run)' if fake_dir else ''}; work dir {work}", flush=True)
        ctx = measure_context(vram, args.hold_python, env, fake_dir)
        check("cuda context", 0 <= ctx < 4096, f"a 0-MiB hold_gpu.py adds {ctx} MiB")

        gw = Gateway(work, "budget-from-nvml", model_config(work, args.hold_python, fake_dir, None),
                     env)
        gw.start()
        learned = phase_budget_from_nvml(gw, vram, ctx)
        gw.stop()
        left = vram.wait_used_below(baseline + IDLE_TOL_MIB, 30)
        check("released on shutdown", left <= baseline + IDLE_TOL_MIB,
              f"used {left} MiB after the gateway stopped (baseline {baseline})")

        if len(learned) == len(SIZES) and all(learned.values()):
            fa, fb, fc = learned.values()
            budget = fb + fc + fa // 2  # a+b fit, a+b+c don't, a+c and b+c do
            gw = Gateway(work, "small-budget",
                         model_config(work, args.hold_python, fake_dir, budget), env)
            gw.start()
            phase_eviction(gw, vram, learned, budget)
            gw.stop()
            left = vram.wait_used_below(baseline + IDLE_TOL_MIB, 30)
            check("released on shutdown (small budget)", left <= baseline + IDLE_TOL_MIB,
                  f"used {left} MiB after the gateway stopped (baseline {baseline})")
        else:
            check("eviction phase", False, "skipped: not every footprint was learned")
    except Exception as exc:
        check("run", False, f"{type(exc).__name__}: {exc}")
    finally:
        if gw is not None:
            gw.stop()
        kill_leftovers()
    failed = [r for r in results if not r[1]]
    if failed and gw is not None:
        print(f"--- last lines of {gw.log} ---\n{gw.tail()}")
    print(f"\n{'check':38} result  detail")
    for name, ok, detail in results:
        print(f"{name:38} {'PASS' if ok else 'FAIL':6}  {detail[:110]}")
    print(f"{len(results) - len(failed)}/{len(results)} passed in {time.monotonic() - started:.0f}s"
          f"{' (dry run: pretend GPU)' if fake_dir else ''}")
    if failed or args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

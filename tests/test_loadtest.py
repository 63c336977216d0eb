"""Load tests as real processes: locust against the gateway, and a short run of the bench.

``test_locust_run_is_clean`` runs ``loadtests/locustfile.py`` headless (20 users, 8 s) as a
subprocess against a gateway subprocess in front of two simulators, then reads locust's CSV:
enough requests, every task kind seen, no failures at all (the queue is large enough that
nothing is refused with 429), and afterwards the gateway is idle with consistent accounting.

``test_bench_smoke`` runs ``bench/run_bench.py`` with 1-second runs so ``make bench`` cannot
rot unnoticed; it checks the bench's own bookkeeping, not the performance targets (timings on
a shared CI machine would make that flaky).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import REPO, start_gateway, start_simulator
from tools import require_tool

pytestmark = pytest.mark.slow

LOCUST = Path(sys.executable).parent / "locust"
USERS, SPAWN_RATE, RUN_S = 20, 10, 8
MIN_REQUESTS = 150  # ~5/s per user after ramp-up; a slow shared box still does several hundred
MODELS = ("load-a", "load-b")
TASKS = ("chat", "chat stream", "completion")


@pytest.fixture
def gateway(tmp_path):
    with start_simulator(MODELS[0], ttft_ms=5, itl_ms=1) as a, \
            start_simulator(MODELS[1], ttft_ms=10, itl_ms=2) as b:
        config = {
            # fewer slots than users, so requests queue; a queue far larger than the user
            # count, so none is refused
            "limits": {"max_concurrent": 8, "max_queue": 1000},
            "models": [{"name": MODELS[0], "backend": "static", "url": a.url},
                       {"name": MODELS[1], "backend": "static", "url": b.url}],
        }
        with start_gateway(config, tmp_path / "gw") as gw:
            yield gw


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _status(url: str) -> dict:
    return httpx.get(f"{url}/gateway/status", timeout=5, trust_env=False).json()


def test_locust_run_is_clean(gateway, tmp_path):
    assert LOCUST.exists(), f"{LOCUST} missing: install the test extras (make install)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env["LOADTEST_MODELS"] = ",".join(MODELS)
    prefix = tmp_path / "stats"
    argv = [str(LOCUST), "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
            "-u", str(USERS), "-r", str(SPAWN_RATE), "-t", f"{RUN_S}s",
            "--host", gateway.url, "--csv", str(prefix), "--only-summary",
            "--loglevel", "WARNING"]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=RUN_S + 60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"locust did not finish within {RUN_S + 60} s:\n{exc.stdout}\n{exc.stderr}")
    output = f"locust exit code {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    stats = _read_csv(Path(f"{prefix}_stats.csv"))
    failures = _read_csv(Path(f"{prefix}_failures.csv"))
    posts = [row for row in stats if row["Type"] == "POST"]
    total = sum(int(row["Request Count"]) for row in posts)
    failed = sum(int(row["Failure Count"]) for row in posts)
    assert failed == 0 and not failures, f"failures: {failures}\n{output}"
    assert total >= MIN_REQUESTS, f"only {total} requests in {RUN_S} s\n{output}"
    names = {row["Name"] for row in posts}
    for kind in TASKS:
        assert any(n.startswith(f"{kind} [") for n in names), f"no {kind!r} requests: {names}"
    assert {n.split("[")[1].rstrip("]") for n in names} == set(MODELS), names
    assert any(row["Type"] == "SSE" for row in stats), "no time-to-first-token entries"
    assert done.returncode == 0, output

    # Users stopped mid-request are client disconnects; once those settle, nothing may be
    # left queued or in flight, and admitted = finished for every model.
    deadline = time.monotonic() + 15
    while True:
        models = _status(gateway.url)["models"]
        idle = all(m["in_flight"] == 0 and m["queue_depth"] == 0 for m in models.values())
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for name in MODELS:
        m = models[name]
        assert (m["in_flight"], m["queue_depth"], m["drift"]) == (0, 0, 0), (name, m)
        assert m["admitted_total"] == m["finished_total"] >= 1, (name, m)
        assert m["rejected_total"] == 0, (name, m)


def _tool(name: str, fallback: str, why: str) -> None:
    if not os.access(fallback, os.X_OK):
        require_tool(name, why)  # skips, or fails under VLLM_GATEWAY_REQUIRE_TOOLS=1


def test_bench_smoke(tmp_path):
    _tool("nginx", "/usr/sbin/nginx", "Debian package nginx")
    _tool("wrk", "/usr/bin/wrk", "Debian package wrk")
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(REPO / "bench" / "run_bench.py"), "--duration", "1",
            "--warmup", "0", "--output", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    res = json.loads(out.read_text())
    targets = {(r["target"], r["connections"], r["note"]) for r in res["runs"]}
    assert {("nginx", 1, ""), ("bare-aiohttp", 32, ""), ("bare-httpx", 32, ""),
            ("bare-httpx-aiohttp", 32, ""), ("gateway", 1, ""), ("gateway", 32, "round 1"),
            ("gateway", 32, "round 2")} <= targets
    assert all(r["rps"] > 0 and r["requests"] > 0 for r in res["runs"]), res["runs"]
    assert res["targets"]["errors"]["ok"], res["targets"]["errors"]
    assert res["targets"]["gateway_accounting_clean"]["ok"], res["gateway_status_after"]
    assert set(res["gateway_rss_mb"]) == {"before", "after_round_1", "after_round_2"}

"""A real Prometheus scrapes a real gateway under load; every dashboard query has data.

Prometheus also discovers the model servers through the gateway's HTTP service
discovery, so the vLLM-side panels (the simulators speak vLLM's metric names) are
checked the same way. Skipped with a reason when Debian's prometheus is missing,
failed instead under VLLM_GATEWAY_REQUIRE_TOOLS=1 (CI).
"""
from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.auth_config import digest

try:
    from tests.helpers import free_port, start_gateway
    from tests.tools import require_tool
except ImportError:
    from helpers import free_port, start_gateway
    from tools import require_tool

pytestmark = pytest.mark.prometheus
REPO = Path(__file__).resolve().parent.parent
SIM = ["vllm-gateway", "simulate", "--port", "{port}", "--served-model-name", "{name}",
       "--startup-s", "0.2", "--ttft-ms", "5", "--itl-ms", "1"]
LOAD_SECONDS = 8.0
METERED_KEY = "sk-metered-0123456789"
ADMIN_KEY = "sk-admin-0123456789ab"  # Prometheus's service discovery needs it once keys exist
SCRAPE = "1s"


def _exprs() -> list[tuple[str, str]]:
    out = []
    for f in sorted((REPO / "dashboards" / "grafana").glob("*.json")):
        dash = json.loads(f.read_text())
        panels = [p for top in dash["panels"] for p in [top, *top.get("panels", [])]]
        for p in panels:
            for t in p.get("targets", []):
                expr = t["expr"]
                for var, value in (("${model}", ".*"), ("$model", ".*"), ("$__rate_interval", "1m"),
                                   ("$__interval", "1m"), ("$__range", "1m")):
                    expr = expr.replace(var, value)
                out.append((f"{f.name}: {p.get('title')}", expr))
    return out


def _load(url: str, stop_at: float) -> None:
    """Bounded mixed traffic: chat, streams, completions, queue overflow, unknown model."""
    bodies = [
        ("chat-a", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}),
        ("chat-a", {"messages": [{"role": "user", "content": "stream"}], "max_tokens": 4,
                    "stream": True, "stream_options": {"include_usage": True}}),
        ("tiny", {"prompt": "x y", "max_tokens": 30}),
        ("nope", {"prompt": "x"}),
        ("chat-a", {"prompt": "fail", "headers": {"X-Sim-Status": "500"}}),
        # A key with token limits: the per-key budget and tokens-left series.
        ("chat-a", {"messages": [{"role": "user", "content": "metered"}], "max_tokens": 4,
                    "stream": True, "headers": {"Authorization": f"Bearer {METERED_KEY}"}}),
    ]
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        i = 0
        while time.monotonic() < stop_at and i < 2000:
            model, body = bodies[i % len(bodies)]
            body = dict(body)
            headers = body.pop("headers", {})
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            client.post(path, json={"model": model, **body}, headers=headers).read()
            i += 1


def test_every_dashboard_query_returns_data(tmp_path):
    prometheus = require_tool("prometheus", "the Prometheus integration test")
    config = {
        "idle_timeout_s": 0,
        "auth": {"allow_anonymous": True,
                 "keys": [{"name": "metered", "key_sha256": digest(METERED_KEY),
                           "tpm": 10_000_000, "tokens_per_day": 100_000_000}],
                 "admin_keys": [{"name": "prometheus", "key_sha256": digest(ADMIN_KEY)}]},
        "plugins": {"modules": ["tests.fake_gpu"]},  # no GPU here: VRAM through the hook
        "models": [
            {"name": "chat-a", "backend": "process", "command": SIM, "max_concurrent": 8},
            # one slot, no queue, slow: a share of its requests is answered 429
            {"name": "tiny", "backend": "process", "max_concurrent": 1, "max_queue": 0,
             "command": SIM[:-4] + ["--ttft-ms", "50", "--itl-ms", "2"],
             "fallbacks": ["chat-a"]},  # the fallback series exist (born at 0)
        ],
    }
    with start_gateway(config, tmp_path / "gw") as gw:
        prom_port = free_port()
        prom_cfg = {
            "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
            "rule_files": [str(REPO / "dashboards" / "prometheus" / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "vllm-gateway", "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"]}]},
                {"job_name": "vllm", "http_sd_configs": [
                    {"url": f"{gw.url}/gateway/sd", "refresh_interval": "1s",
                     # type given: Prometheus 2.42 sends the bare credentials without it
                     "authorization": {"type": "Bearer", "credentials": ADMIN_KEY}}]},
            ],
        }
        cfg_path = tmp_path / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(prom_cfg))
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen([prometheus, f"--config.file={cfg_path}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            with ThreadPoolExecutor(4) as pool:
                stop_at = time.monotonic() + LOAD_SECONDS
                for f in [pool.submit(_load, gw.url, stop_at) for _ in range(4)]:
                    f.result()
            time.sleep(3)  # let the last scrapes land
            api = f"http://127.0.0.1:{prom_port}/api/v1"
            targets = httpx.get(f"{api}/targets", trust_env=False).json()["data"]["activeTargets"]
            jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            assert {"vllm-gateway", "vllm"} <= jobs, targets
            empty = []
            for where, expr in _exprs():
                result = httpx.get(f"{api}/query", params={"query": expr}, trust_env=False).json()
                assert result["status"] == "success", (where, expr, result)
                if not result["data"]["result"]:
                    empty.append(f"{where}: {expr}")
            assert not empty, "queries without data:\n" + "\n".join(empty)
            status = gw.status()
            for name, model in status["models"].items():
                assert model["drift"] == 0 and model["in_flight"] == 0, (name, model)
        finally:
            prom.terminate()
            prom.wait(10)
            log.close()

"""Smoke test of the streaming bench (bench/stream_bench.py, the second half of ``make bench``).

It runs the bench in ``--quick`` mode (every phase shrunk: a few hundred streams, 1-2 s
windows) so the bench cannot rot unnoticed, and checks its bookkeeping, not the
performance targets (timings on a shared 2-core CI machine would make that flaky): every
figure is there for direct, the bare relay and the gateway, no run had an error or a
stream cut off, all streams of the open-streams phase were open at once (the gateway's own
in_flight says so too) and the gateway's accounting was clean after every run.

LiteLLM is left out (``--no-litellm``): the bench runs it from ``.venv-litellm`` (about
750 MB, ``make litellm``), which ``make test`` does not build; the test checks that the
bench reports it as skipped rather than failing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_stream_bench_quick(tmp_path):
    out = tmp_path / "stream.json"
    argv = [sys.executable, str(REPO / "bench" / "stream_bench.py"), "--quick", "--no-litellm",
            "--output", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    res = json.loads(out.read_text())
    plan, table = res["plan"], res["table"]
    assert res["quick"] is True
    assert table["litellm"] == {"failed": "skipped (--no-litellm)"}

    for target in ("direct", "bare-relay", "gateway"):
        row = table[target]
        assert "failed" not in row, (target, row)
        assert (row["errors"], row["unfinished"], row["skipped_runs"]) == (0, 0, 0), (target, row)
        for c in plan["sat_streams"]:
            assert row[f"sat{c}_events_per_s"] > 0, (target, c, row)
            # lockstep: one event per read, give or take the usage chunk and [DONE]
            assert 1.0 <= row[f"sat{c}_events_per_read"] < 1.5, (target, c, row)
            if target != "direct":
                assert row[f"sat{c}_cpu_us_per_event"] > 0, (target, c, row)
                assert row[f"sat{c}_events_per_cpu_s"] > 0, (target, c, row)
        for c in plan["fixed_streams"]:
            for key in ("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "events_per_s"):
                assert row[f"fixed{c}_{key}"] is not None, (target, c, key, row)
            if target != "direct":
                for key in ("added_ttft_p50_ms", "added_ttft_p99_ms", "added_gap_p99_ms"):
                    assert row[f"fixed{c}_{key}"] is not None, (target, c, key, row)
        assert row["open_streams"] == plan["open_streams"], (target, row)
        assert row["open_at_sample"] == plan["open_streams"], (target, row)
        assert row["open_rss_kb_per_stream"] is not None, (target, row)

    gw = table["gateway"]
    assert gw["open_gateway_in_flight"] == plan["open_streams"], gw
    checks = res["gateway_status_checks"]  # one after every gateway run
    runs = [f"{r['kind']} {r['streams']}" + (f" round {r['round']}" if "round" in r else "")
            for r in res["runs"] if r["target"] == "gateway" and r["kind"] != "rss"]
    assert [c["after"] for c in checks] == runs, (checks, runs)
    assert all(c["clean"] for c in checks), checks

    targets = res["targets"]
    assert {f"gateway_vs_bare_relay_sat{c}" for c in plan["sat_streams"]} <= set(targets)
    for c in plan["sat_streams"]:
        assert targets[f"gateway_vs_litellm_sat{c}"]["ok"] is None  # skipped, not failed
    for name in ("errors_direct_relay_gateway", "gateway_accounting_clean",
                 f"gateway_holds_{plan['open_streams']}_open_streams", "runs_within_deadline"):
        assert targets[name]["ok"], (name, targets[name])
    assert "gateway_rss_kb_per_open_stream" in targets
    assert any(k.startswith("gateway_added_ttft_p99_ms_at_") for k in targets)

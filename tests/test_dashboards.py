"""Generated Grafana dashboards stay valid and only query metrics that exist.

The gateway's metric contract is gateway/metrics.py. These tests build the real
registry, read back what it exports, and fail if a dashboard (or docs/metrics.md)
drifts from it: a renamed metric or label breaks here, not silently in Grafana.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MODEL_STATES, GatewayMetrics, ModelGauges

try:
    from tests.tools import require_tool
except ImportError:  # tests/ is not a package: pytest puts tests/ on sys.path
    from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_DIR = ROOT / "dashboards" / "grafana"
GENERATE = ROOT / "dashboards" / "generate.py"
DOCS = ROOT / "docs" / "metrics.md"

# vLLM's own metrics (scraped through the gateway's HTTP service discovery) that
# the dashboards may use. Keep in sync with the vLLM version the gateway runs.
VLLM_METRICS = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
}
# Grafana variables a query may use, and what promtool sees instead.
GRAFANA_VARS = {
    "${model}": ".*", "$model": ".*",
    "$__rate_interval": "5m", "$__interval": "5m", "$__range": "5m",
}
# Labels every scraped series carries besides the exporter's own.
TARGET_LABELS = {"job", "instance", "le"}
METRIC_RE = re.compile(r"\b(gateway_[a-z_]+|vllm:[a-z_:]+)")
SELECTOR_RE = re.compile(r"\b(gateway_[a-z_]+)\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------- fixtures

def _registry_text() -> str:
    m = GatewayMetrics()
    m.attach_state(lambda: [ModelGauges(
        model="chat-small", backend="process", state="ready", waiting=1, in_flight=2,
        max_concurrent=4, max_queue=8, admitted_total=10, finished_total=7,
        anomalies_total=0, pool_size=8, pool_in_use=2, vram_reserved_mib=1024)],
        lambda: 80_000, lambda: 20_000)
    m.attach_keys(lambda: {"team-a": {"active": 1, "in_flight": 1, "tokens_today": 5,
                                      "tokens_per_day": 10, "tpm_left": 3}})
    # Labelled request-path metrics export no samples until a child exists; make one
    # child each so their label names show up in the exposition too.
    for attr in vars(m).values():
        # prometheus_client's metrics keep theirs in _labelnames, loop_metrics' in labelnames.
        names = getattr(attr, "_labelnames", None) or getattr(attr, "labelnames", None)
        if names:
            attr.labels(*["x"] * len(names))
    return generate_latest(m.registry).decode()


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Queryable series name -> label names, as the gateway really exports them."""
    families = list(text_string_to_metric_families(_registry_text()))
    # prometheus_client adds an X_created gauge per counter/histogram X (its start
    # time); those are client plumbing, not part of the metric contract.
    created = {f"{fam.name}_created" for fam in families if fam.type in ("counter", "histogram")}
    out: dict[str, set[str]] = {}
    for fam in families:
        if fam.name in created:
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = {k for s in fam.samples for k in s.labels} - {"le"}
    return out


def _dashboards() -> dict[str, dict]:
    files = sorted(GRAFANA_DIR.glob("*.json"))
    assert files, f"no dashboards under {GRAFANA_DIR}"
    return {f.name: json.loads(f.read_text()) for f in files}


def _panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows nest their panels


def _exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target."""
    out = []
    for fname, dash in _dashboards().items():
        for p in _panels(dash):
            for t in p.get("targets", []):
                out.append((fname, p.get("title", "?"), t["expr"]))
    return out


def _base(name: str) -> str:
    """Histogram series name -> the histogram's name (counters keep _total)."""
    for suffix in HIST_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


# --------------------------------------------------------------------------- dashboards

def test_dashboards_are_valid_json_with_uid_title_panels():
    uids = []
    for fname, dash in _dashboards().items():
        assert dash.get("uid"), fname
        assert dash.get("title"), fname
        assert dash.get("panels"), fname
        assert dash.get("schemaVersion") == 39, fname
        uids.append(dash["uid"])
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        model = variables["model"]
        assert model["multi"] is True, fname
        assert "label_values(gateway_max_concurrent, model)" in json.dumps(model["query"])
        ids = [p["id"] for p in _panels(dash)]
        assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
    assert len(uids) == len(set(uids)), f"duplicate dashboard uids: {uids}"


def test_every_panel_has_title_description_and_queries():
    for fname, dash in _dashboards().items():
        for p in _panels(dash):
            if p["type"] == "row":
                assert p.get("title"), f"{fname}: untitled row"
                continue
            where = f"{fname} panel {p.get('id')} {p.get('title')!r}"
            assert p.get("title"), where
            assert p.get("description"), f"{where}: no description"
            assert p["datasource"]["uid"] == "${datasource}", where
            assert p.get("targets"), f"{where}: no targets"
            for t in p["targets"]:
                assert t.get("expr"), where
                assert t["datasource"]["uid"] == "${datasource}", where


def test_only_known_grafana_variables():
    for fname, title, expr in _exprs():
        left = _substitute(expr)
        assert "$" not in left, f"{fname} {title!r}: unknown variable in {expr}"


@pytest.mark.prometheus
def test_every_expr_parses_as_promql(tmp_path):
    promtool = require_tool("promtool", "Debian package prometheus")
    rules = []
    for i, (fname, title, expr) in enumerate(_exprs()):
        stem = re.sub(r"\W", "_", Path(fname).stem)
        rules.append({"record": f"dashboard:{stem}:expr_{i}", "expr": _substitute(expr)})
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"{len(rules)} rules found" in proc.stdout


def test_every_metric_is_exported(exported):
    unknown = []
    for fname, title, expr in _exprs():
        for name in METRIC_RE.findall(expr):
            base = _base(name)
            if base not in exported and name not in exported and base not in VLLM_METRICS:
                unknown.append(f"{fname} {title!r}: {name}")
    assert not unknown, "queries name metrics nobody exports:\n" + "\n".join(unknown)


def test_every_label_matcher_names_a_real_label(exported):
    bad = []
    for fname, title, expr in _exprs():
        for name, matchers in SELECTOR_RE.findall(expr):
            base = _base(name)
            labels = exported.get(base, exported.get(name, set())) | TARGET_LABELS
            for label in MATCHER_RE.findall(matchers):
                if label not in labels:
                    bad.append(f"{fname} {title!r}: {name} has no label {label!r}")
    assert not bad, "\n".join(bad)


def test_dashboards_cover_every_exported_metric(exported):
    used = {_base(n) for _, _, e in _exprs() for n in METRIC_RE.findall(e)}
    missing = sorted(set(exported) - used)
    assert not missing, f"exported but on no dashboard: {missing}"


def test_generated_json_is_up_to_date():
    proc = subprocess.run([sys.executable, str(GENERATE), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- docs

def test_docs_mention_every_exported_metric(exported):
    text = DOCS.read_text()
    missing = sorted(n for n in exported if not re.search(rf"\b{re.escape(n)}\b", text))
    assert not missing, f"docs/metrics.md does not mention: {missing}"


def test_docs_list_every_model_state():
    text = DOCS.read_text()
    assert all(s in text for s in MODEL_STATES)

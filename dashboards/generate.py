#!/usr/bin/env python3
"""Build the gateway's Grafana dashboards from code (stdlib only).

    python dashboards/generate.py           # (re)write dashboards/grafana/*.json
    python dashboards/generate.py --check   # exit 1 if the committed JSON is stale

Edit this file, never the JSON: the JSON is generated and checked in CI
(tests/test_dashboards.py runs ``--check``). Metric names and labels come from
gateway/metrics.py; tests/test_dashboards.py fails if a query names a metric the
gateway does not export.

Every query filters on ``model=~"$model"``. The ``model`` variable has
``allValue: .*`` so "All" also matches requests that never named a valid model
(label ``model=""``). vLLM metrics are scraped through the gateway's HTTP service
discovery, which adds the target labels ``model`` and ``backend``; vLLM's own
label is ``model_name``, so vLLM queries aggregate ``by (model)`` to line up with
the gateway's series.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "grafana"
SCHEMA_VERSION = 39
TAG = "vllm-gateway"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'  # the model filter every query uses
RI = "$__rate_interval"


# --------------------------------------------------------------------------- helpers

def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
            "range": True, "refId": ref}


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def quantiles(metric: str, qs: tuple[float, ...], window: str = RI) -> list[dict]:
    """histogram_quantile targets per model, one per quantile, over ``metric``_bucket."""
    return targets(*[
        (f"histogram_quantile({q}, sum by (model, le) (rate({metric}_bucket{{{M}}}[{window}])))",
         f"{{{{model}}}} p{round(q * 100)}")
        for q in qs])


def timeseries(title: str, description: str, tgts: list[dict], unit: str = "short", *,
               min_zero: bool = True, stack: bool = False, bars: bool = False,
               overrides: list | None = None, thresholds: list | None = None) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1,
              "fillOpacity": 60 if bars else 10, "showPoints": "never",
              "spanNulls": False, "axisSoftMin": 0 if min_zero else None,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    custom = {k: v for k, v in custom.items() if v is not None}
    defaults: dict = {"unit": unit, "custom": custom}
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
        custom["thresholdsStyle"] = {"mode": "line"}
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": DS, "targets": tgts,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["lastNotNull", "max"], "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, description: str, tgts: list[dict], unit: str = "short",
         thresholds: list | None = None, mappings: list | None = None) -> dict:
    steps = thresholds or [{"color": "green", "value": None}]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": tgts,
            "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                         "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "background", "graphMode": "area",
                        "justifyMode": "auto", "textMode": "auto", "orientation": "auto"}}


def state_timeline(title: str, description: str, tgts: list[dict], mappings: list) -> dict:
    return {"type": "state-timeline", "title": title, "description": description,
            "datasource": DS, "targets": tgts,
            "fieldConfig": {"defaults": {"mappings": mappings, "custom": {"fillOpacity": 80},
                                         "thresholds": {"mode": "absolute", "steps": [
                                             {"color": "text", "value": None}]}},
                            "overrides": []},
            "options": {"showValue": "never", "rowHeight": 0.8, "mergeValues": True,
                        "alignValue": "left", "legend": {"showLegend": True,
                                                         "displayMode": "list",
                                                         "placement": "bottom"},
                        "tooltip": {"mode": "single", "sort": "none"}}}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def limit_override(regex: str, color: str = "red") -> dict:
    """Draw series whose legend matches ``regex`` as a dashed, unstacked limit line."""
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "custom.fillOpacity", "value": 0},
                {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}


def layout(panels: list[dict]) -> list[dict]:
    """Assign ids and a grid: rows span the width, other panels go two per line."""
    x = y = 0
    line_h = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        if p["type"] == "row":
            if x:
                y += line_h
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            x, y, line_h = 0, y + 1, 0
            continue
        w = p.pop("_w", 12)
        h = p.pop("_h", 8)
        if x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        line_h = max(line_h, h)
    return panels


def sized(panel: dict, w: int, h: int = 8) -> dict:
    panel["_w"], panel["_h"] = w, h
    return panel


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "__comment": "Generated by dashboards/generate.py; edit that, not this file.",
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "title": "vllm-gateway",
                   "icon": "external link", "targetBlank": False, "tooltip": "",
                   "url": ""}],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "regex": "", "hide": 0, "refresh": 1,
             "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
             "options": [], "includeAll": False, "multi": False},
            {"name": "model", "label": "Model", "type": "query", "datasource": DS,
             "definition": "label_values(gateway_max_concurrent, model)",
             "query": "label_values(gateway_max_concurrent, model)",
             "refresh": 2, "regex": "", "sort": 1, "hide": 0,
             "multi": True, "includeAll": True, "allValue": ".*",
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "options": []},
        ]},
        "panels": layout(panels),
    }


# --------------------------------------------------------------------------- dashboards

def overview() -> dict:
    req = f"gateway_requests_total{{{M}}}"
    return dashboard("vllm-gateway-overview", "vLLM gateway / Overview",
                     "Traffic, errors, latency and tokens across all models.", [
        row("Traffic"),
        timeseries("Request rate by model and code",
                   "Requests answered per second (gateway_requests_total), split by model "
                   "and HTTP status code. Includes gateway rejections (4xx/5xx).",
                   targets((f"sum by (model, code) (rate({req}[{RI}]))", "{{model}} {{code}}")),
                   "reqps"),
        timeseries("Error ratio (5xx and 429)",
                   "Share of answered requests with a 5xx status, and share answered 429 "
                   "(queue full, rate limited). 429 above a few percent means a model is "
                   "saturated; see the Saturation dashboard.",
                   targets(
                       (f'sum by (model) (rate(gateway_requests_total{{{M},code=~"5.."}}[{RI}]))'
                        f" / sum by (model) (rate({req}[{RI}]))", "{{model}} 5xx"),
                       (f'sum by (model) (rate(gateway_requests_total{{{M},code="429"}}[{RI}]))'
                        f" / sum by (model) (rate({req}[{RI}]))", "{{model}} 429")),
                   "percentunit",
                   thresholds=[{"color": "green", "value": None},
                               {"color": "red", "value": 0.05}]),
        timeseries("Request latency p50 / p95 / p99",
                   "Arrival to last byte (gateway_request_duration_seconds), all endpoints, "
                   "including queue wait and cold starts.",
                   quantiles("gateway_request_duration_seconds", (0.5, 0.95, 0.99)), "s"),
        timeseries("Time to first token p50 / p95",
                   "Arrival to the first streamed byte sent to the client "
                   "(gateway_time_to_first_token_seconds); streaming requests only.",
                   quantiles("gateway_time_to_first_token_seconds", (0.5, 0.95)), "s"),
        row("Tokens and failures"),
        timeseries("Tokens per second (input / output)",
                   "Prompt (input) and completion (output) tokens per second, from the "
                   "upstream usage reports (gateway_tokens_total).",
                   targets(
                       (f'sum by (model) (rate(gateway_tokens_total{{{M},type="input"}}[{RI}]))',
                        "{{model}} in"),
                       (f'sum by (model) (rate(gateway_tokens_total{{{M},type="output"}}[{RI}]))',
                        "{{model}} out")),
                   "short"),
        timeseries("Rejections by reason",
                   "Requests refused by the gateway itself (gateway_rejections_total): "
                   "queue_full / queue_timeout / admission / rate_limit are capacity or "
                   "policy; auth / too_large / bad_request / unknown_model are client errors.",
                   targets((f"sum by (model, reason) (rate(gateway_rejections_total{{{M}}}[{RI}]))",
                            "{{model}} {{reason}}")),
                   "reqps"),
        timeseries("Fallbacks",
                   "Requests for a model answered by one of its fallbacks instead "
                   "(gateway_fallbacks_total): the model was unavailable, or its queue full "
                   "with fallback_on: [queue_full].",
                   targets((f"sum by (model, fallback) (rate(gateway_fallbacks_total{{{M}}}[{RI}]))",
                            "{{model}} -> {{fallback}}")),
                   "reqps"),
        timeseries("Broken streams",
                   "Streams that failed after the first byte was sent "
                   "(gateway_stream_errors_total); the client got a truncated answer.",
                   targets((f"sum by (model) (rate(gateway_stream_errors_total{{{M}}}[{RI}]))",
                            "{{model}}")),
                   "reqps"),
        timeseries("Plugin errors and p95 hook time",
                   "Hook implementations that raised (gateway_plugin_errors_total, left) "
                   "and p95 time spent in each plugin hook "
                   "(gateway_plugin_duration_seconds, right). Not filtered by model.",
                   targets(
                       (f"sum by (hook, plugin) (rate(gateway_plugin_errors_total[{RI}]))",
                        "errors {{plugin}}.{{hook}}"),
                       ("histogram_quantile(0.95, sum by (hook, plugin, le) "
                        f"(rate(gateway_plugin_duration_seconds_bucket[{RI}])))",
                        "p95 {{plugin}}.{{hook}}")),
                   "ops",
                   overrides=[{"matcher": {"id": "byRegexp", "options": "p95 .*"},
                               "properties": [{"id": "unit", "value": "s"},
                                              {"id": "custom.axisPlacement",
                                               "value": "right"}]}]),
    ])


def saturation() -> dict:
    return dashboard("vllm-gateway-saturation", "vLLM gateway / Saturation",
                     "Per-model queueing and concurrency limits, and whether the gateway "
                     "queues while vLLM has spare capacity.", [
        row("Gateway limits"),
        timeseries("Queue depth vs max_queue",
                   "Requests waiting for a concurrency slot (gateway_queue_depth) against "
                   "the configured bound (gateway_max_queue, dashed). At the bound new "
                   "requests get 429 queue_full.",
                   targets((f"sum by (model) (gateway_queue_depth{{{M}}})", "{{model}} queued"),
                           (f"max by (model) (gateway_max_queue{{{M}}})", "{{model}} max_queue")),
                   overrides=[limit_override(".* max_queue")]),
        timeseries("In flight vs max_concurrent",
                   "Requests holding a concurrency slot (gateway_requests_in_flight) "
                   "against the configured limit (gateway_max_concurrent, dashed).",
                   targets((f"sum by (model) (gateway_requests_in_flight{{{M}}})",
                            "{{model}} in flight"),
                           (f"max by (model) (gateway_max_concurrent{{{M}}})",
                            "{{model}} max_concurrent")),
                   overrides=[limit_override(".* max_concurrent")]),
        timeseries("429 rate (queue full)",
                   "Requests refused because the model's queue was full "
                   "(gateway_rejections_total{reason=\"queue_full\"}), and those that "
                   "timed out waiting (reason=\"queue_timeout\").",
                   targets(
                       (f'sum by (model) (rate(gateway_rejections_total{{{M},reason="queue_full"}}[{RI}]))',
                        "{{model}} queue_full"),
                       (f'sum by (model) (rate(gateway_rejections_total{{{M},reason="queue_timeout"}}[{RI}]))',
                        "{{model}} queue_timeout")),
                   "reqps"),
        timeseries("Queue wait p95",
                   "95th percentile of time spent waiting for a slot "
                   "(gateway_queue_wait_seconds). Cold starts show up here.",
                   quantiles("gateway_queue_wait_seconds", (0.95,)), "s"),
        row("Gateway vs vLLM"),
        sized(timeseries(
            "Gateway queueing while vLLM is idle",
            "Gateway queue depth beside vLLM's own waiting and running requests "
            "(vllm:num_requests_waiting / vllm:num_requests_running) and KV-cache use "
            "(vllm:kv_cache_usage_perc, right axis). Gateway queue > 0 while vLLM has "
            "nothing waiting and KV cache is low means max_concurrent is set too low "
            "for this model. vLLM series come from the gateway's service discovery "
            "(job vllm, target label model).",
            targets((f"sum by (model) (gateway_queue_depth{{{M}}})", "{{model}} gateway queued"),
                    (f"sum by (model) (vllm:num_requests_waiting{{{M}}})",
                     "{{model}} vLLM waiting"),
                    (f"sum by (model) (vllm:num_requests_running{{{M}}})",
                     "{{model}} vLLM running"),
                    (f"max by (model) (vllm:kv_cache_usage_perc{{{M}}})",
                     "{{model}} vLLM KV cache")),
            overrides=[{"matcher": {"id": "byRegexp", "options": ".* KV cache"},
                        "properties": [{"id": "unit", "value": "percentunit"},
                                       {"id": "max", "value": 1},
                                       {"id": "custom.axisPlacement", "value": "right"}]}]),
            24, 10),
        timeseries("vLLM time to first token p95",
                   "vLLM's own TTFT (vllm:time_to_first_token_seconds), excluding gateway "
                   "queueing; compare with the gateway's TTFT on the Overview dashboard.",
                   quantiles("vllm:time_to_first_token_seconds", (0.95,)), "s"),
        timeseries("vLLM tokens per second",
                   "Prompt and generation tokens per second as counted by vLLM "
                   "(vllm:prompt_tokens_total, vllm:generation_tokens_total).",
                   targets((f"sum by (model) (rate(vllm:prompt_tokens_total{{{M}}}[{RI}]))",
                            "{{model}} prompt"),
                           (f"sum by (model) (rate(vllm:generation_tokens_total{{{M}}}[{RI}]))",
                            "{{model}} generation"))),
    ])


def upstream() -> dict:
    err = "gateway_upstream_errors_total"
    return dashboard("vllm-gateway-upstream", "vLLM gateway / Upstream pool",
                     "Connection pool use, upstream errors and retries per model.", [
        timeseries("Pool in use vs pool size",
                   "Upstream connections in use (gateway_upstream_pool_in_use) against the "
                   "pool size (gateway_upstream_pool_size, dashed). A full pool makes "
                   "requests wait for a connection and eventually fail with pool_timeout.",
                   targets((f"sum by (model) (gateway_upstream_pool_in_use{{{M}}})",
                            "{{model}} in use"),
                           (f"max by (model) (gateway_upstream_pool_size{{{M}}})",
                            "{{model}} pool size")),
                   overrides=[limit_override(".* pool size")]),
        timeseries("Pool timeouts",
                   "Upstream attempts that could not get a pooled connection in time "
                   "(gateway_upstream_errors_total{kind=\"pool_timeout\"}). Should be 0.",
                   targets((f'sum by (model) (rate({err}{{{M},kind="pool_timeout"}}[{RI}]))',
                            "{{model}}")),
                   "ops"),
        timeseries("Upstream errors by kind",
                   "Failed upstream attempts (gateway_upstream_errors_total) by kind: "
                   "connect, timeout, pool_timeout, read, protocol, http_5xx.",
                   targets((f"sum by (model, kind) (rate({err}{{{M}}}[{RI}]))",
                            "{{model}} {{kind}}")),
                   "ops"),
        timeseries("Retries by kind",
                   "Upstream attempts that were retried (gateway_upstream_retries_total), "
                   "by the kind of failure that caused the retry.",
                   targets((f"sum by (model, kind) (rate(gateway_upstream_retries_total{{{M}}}[{RI}]))",
                            "{{model}} {{kind}}")),
                   "ops"),
        timeseries("Retry ratio",
                   "Retries per answered request. Above 10% fires GatewayHighRetryRatio.",
                   targets((f"sum by (model) (rate(gateway_upstream_retries_total{{{M}}}[{RI}]))"
                            f" / sum by (model) (rate(gateway_requests_total{{{M}}}[{RI}]))",
                            "{{model}}")),
                   "percentunit",
                   thresholds=[{"color": "green", "value": None},
                               {"color": "red", "value": 0.1}]),
        timeseries("Upstream attempt duration p95",
                   "95th percentile of one upstream attempt, send to last byte "
                   "(gateway_upstream_duration_seconds); excludes gateway queueing.",
                   quantiles("gateway_upstream_duration_seconds", (0.95,)), "s"),
    ])


STATE_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "stopped", "color": "transparent", "index": 0},
    "1": {"text": "starting", "color": "yellow", "index": 1},
    "2": {"text": "ready", "color": "green", "index": 2},
    "3": {"text": "stopping", "color": "orange", "index": 3},
    "4": {"text": "sleeping", "color": "blue", "index": 4},
    "5": {"text": "failed", "color": "red", "index": 5}}}]


def lifecycle() -> dict:
    st = "gateway_model_state"
    state_expr = (f'sum by (model) ({st}{{{M},state="starting"}})'
                  f' + 2 * sum by (model) ({st}{{{M},state="ready"}})'
                  f' + 3 * sum by (model) ({st}{{{M},state="stopping"}})'
                  f' + 4 * sum by (model) ({st}{{{M},state="sleeping"}})'
                  f' + 5 * sum by (model) ({st}{{{M},state="failed"}})')
    return dashboard("vllm-gateway-lifecycle", "vLLM gateway / Model lifecycle",
                     "Model server starts, stops, evictions, state and VRAM reservations.", [
        sized(state_timeline("Model state",
                             "Each model's lifecycle state from gateway_model_state "
                             "(stopped / starting / ready / stopping / sleeping / failed).",
                             targets((state_expr, "{{model}}")), STATE_MAPPINGS), 24, 8),
        timeseries("Starts by result",
                   "Model server starts per interval (gateway_backend_starts_total) by "
                   "result: success, failure, adopted (found running at gateway start), "
                   "woken (a sleeping vLLM woken instead of a cold start).",
                   targets((f"sum by (model, result) (increase(gateway_backend_starts_total{{{M}}}[{RI}]))",
                            "{{model}} {{result}}")),
                   bars=True),
        timeseries("Start duration p50 / p95 (last hour)",
                   "Start request to healthy (gateway_backend_start_duration_seconds) over "
                   "the starts of the last hour; empty when nothing started.",
                   quantiles("gateway_backend_start_duration_seconds", (0.5, 0.95),
                             window="1h"), "s"),
        timeseries("Stops by reason",
                   "Model server stops per interval (gateway_backend_stops_total) by reason: "
                   "idle, eviction, crash, shutdown, failed_start, unload, removed (left the "
                   "config in a reload).",
                   targets((f"sum by (model, reason) (increase(gateway_backend_stops_total{{{M}}}[{RI}]))",
                            "{{model}} {{reason}}")),
                   bars=True),
        timeseries("Evictions by reason",
                   "Models stopped to make room for another (gateway_evictions_total): "
                   "vram (not enough GPU memory) or max_models (model count limit). "
                   "Frequent evictions mean the models in use do not fit together.",
                   targets((f"sum by (model, reason) (increase(gateway_evictions_total{{{M}}}[{RI}]))",
                            "{{model}} {{reason}}")),
                   bars=True),
        timeseries("Config reloads by result",
                   "Config reloads per interval (gateway_config_reloads_total; SIGHUP or "
                   "POST /gateway/reload) by result: success, invalid (the running config "
                   "was kept; the gateway log lists the problems), error. Not filtered by "
                   "model.",
                   targets((f"sum by (result) (increase(gateway_config_reloads_total[{RI}]))",
                            "{{result}}")),
                   bars=True),
        sized(timeseries("VRAM reserved per model vs total",
                         "GPU memory the gateway reserves for each loaded model "
                         "(gateway_vram_reserved_bytes, stacked) against the memory it may "
                         "use (gateway_vram_total_bytes, dashed) and what the GPU reports in use "
                         "(gateway_vram_used_bytes, dashed): used far above reserved means a "
                         "footprint is underestimated.",
                         targets((f"sum by (model) (gateway_vram_reserved_bytes{{{M}}})",
                                  "{{model}}"),
                                 ("max(gateway_vram_total_bytes)", "total"),
                                 ("max(gateway_vram_used_bytes)", "used")),
                         "bytes", stack=True,
                         overrides=[limit_override("total"), limit_override("used")]), 24, 8),
    ])


def drift() -> dict:
    return dashboard("vllm-gateway-drift", "vLLM gateway / Admission drift",
                     "Admission accounting health. Drift must always read 0; anything else "
                     "is a gateway bug that leaks or double-frees concurrency slots.", [
        sized(stat("Max |drift|",
                   "Largest absolute gateway_admission_drift over the selected models "
                   "(admitted - finished - waiting - in flight). Must be 0.",
                   targets((f"max(abs(gateway_admission_drift{{{M}}}))", "")),
                   thresholds=[{"color": "green", "value": None},
                               {"color": "red", "value": 1}]), 6),
        sized(stat("Anomalies (range)",
                   "Impossible admission counts observed in the selected time range "
                   "(gateway_admission_anomalies_total). Must be 0.",
                   targets((f"sum(increase(gateway_admission_anomalies_total{{{M}}}[$__range]))",
                            "")),
                   thresholds=[{"color": "green", "value": None},
                               {"color": "red", "value": 1}]), 6),
        sized(timeseries("Drift per model",
                         "gateway_admission_drift per model; GatewayAdmissionDrift fires "
                         "when it is not 0 for 1m.",
                         targets((f"sum by (model) (gateway_admission_drift{{{M}}})",
                                  "{{model}}")),
                         min_zero=False,
                         thresholds=[{"color": "green", "value": None},
                                     {"color": "red", "value": 1}]), 12),
        sized(timeseries("Stalled seconds",
                         "gateway_admission_stalled_seconds per model: how long requests "
                         "have waited while a concurrency slot was free. Must be 0 (a freed "
                         "slot goes to the oldest waiter at once); GatewayAdmissionStalled "
                         "fires when it is over 5s for 1m.",
                         targets((f"max by (model) (gateway_admission_stalled_seconds{{{M}}})",
                                  "{{model}}")),
                         "s",
                         thresholds=[{"color": "green", "value": None},
                                     {"color": "red", "value": 5}]), 24),
        timeseries("Anomalies rate",
                   "Negative or impossible admission counts observed per second "
                   "(gateway_admission_anomalies_total).",
                   targets((f"sum by (model) (rate(gateway_admission_anomalies_total{{{M}}}[{RI}]))",
                            "{{model}}")),
                   "ops"),
        timeseries("Admitted vs finished",
                   "Requests entering (gateway_admission_admitted_total) and leaving "
                   "(gateway_admission_finished_total) a model's queue or slot per second. "
                   "Over time the two lines must track each other.",
                   targets((f"sum by (model) (rate(gateway_admission_admitted_total{{{M}}}[{RI}]))",
                            "{{model}} admitted"),
                           (f"sum by (model) (rate(gateway_admission_finished_total{{{M}}}[{RI}]))",
                            "{{model}} finished")),
                   "reqps"),
    ])


def keys() -> dict:
    """Per API key: what each tenant sends, uses and is refused (label ``key``)."""
    return dashboard("vllm-gateway-keys", "vLLM gateway / API keys",
                     "Tenancy: requests, tokens, refusals, queue wait and budgets per API key "
                     "(auth.keys names; \"anonymous\" without keys).", [
        row("Traffic"),
        timeseries("Requests per key by code",
                   "Requests answered per second per API key (gateway_key_requests_total). "
                   "Key \"\" is requests without a valid key (401).",
                   targets(("sum by (key, code) (rate(gateway_key_requests_total[$__rate_interval]))",
                            "{{key}} {{code}}")), "reqps"),
        timeseries("Tokens per key",
                   "Prompt and completion tokens per second per key, from the answers' usage "
                   "(gateway_key_tokens_total).",
                   targets(("sum by (key, type) (rate(gateway_key_tokens_total[$__rate_interval]))",
                            "{{key}} {{type}}")), "short"),
        timeseries("Refusals per key by reason",
                   "Requests refused on a key's account per second "
                   "(gateway_key_rejections_total): invalid_api_key, model_not_allowed, "
                   "rate_limit_requests, rate_limit_tokens, rate_limit_concurrency, "
                   "insufficient_quota, queue_full.",
                   targets(("sum by (key, reason) (rate(gateway_key_rejections_total[$__rate_interval]))",
                            "{{key}} {{reason}}")), "reqps"),
        timeseries("Queue wait p95 per key",
                   "Time each key's requests waited for a model slot "
                   "(gateway_key_queue_wait_seconds). Fair queuing keeps a light key's wait "
                   "low while another floods the same model.",
                   targets(("histogram_quantile(0.95, sum by (key, le) (rate("
                            "gateway_key_queue_wait_seconds_bucket[$__rate_interval])))",
                            "{{key}}")), "s"),
        row("Limits"),
        timeseries("In the gateway per key",
                   "Requests of each key queued or in flight (gateway_key_active) and "
                   "holding a model slot (gateway_key_in_flight), against max_concurrent.",
                   targets(("sum by (key) (gateway_key_active)", "{{key}} active"),
                           ("sum by (key) (gateway_key_in_flight)", "{{key}} in flight")),
                   "short"),
        timeseries("Daily budget used",
                   "Tokens used today (UTC) over tokens_per_day, per key with a budget "
                   "(gateway_key_tokens_today / gateway_key_budget_tokens). "
                   "GatewayKeyBudgetExhausted fires at 100%.",
                   targets(("gateway_key_tokens_today / gateway_key_budget_tokens", "{{key}}")),
                   "percentunit",
                   thresholds=[{"color": "green", "value": None},
                               {"color": "orange", "value": 0.9},
                               {"color": "red", "value": 1}]),
        timeseries("Tokens left this minute",
                   "What is left of each key's per-minute token limit "
                   "(gateway_key_tpm_remaining); at 0 its requests get 429 rate_limit_tokens.",
                   targets(("min by (key) (gateway_key_tpm_remaining)", "{{key}}")), "short"),
    ])


DASHBOARDS = {
    "overview": overview,
    "saturation": saturation,
    "upstream-pool": upstream,
    "lifecycle": lifecycle,
    "drift": drift,
    "keys": keys,
}


def render() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {f"{name}.json": json.dumps(build(), indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    unknown = [a for a in argv if a != "--check"]
    if unknown:
        print(f"usage: {Path(__file__).name} [--check]", file=sys.stderr)
        return 2
    wanted = render()
    if check:
        problems = []
        for name, text in wanted.items():
            path = OUT_DIR / name
            if not path.exists():
                problems.append(f"{path}: missing")
            elif path.read_text() != text:
                problems.append(f"{path}: differs from what generate.py produces")
        for path in sorted(OUT_DIR.glob("*.json")):
            if path.name not in wanted:
                problems.append(f"{path}: not produced by generate.py (stale?)")
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python dashboards/generate.py", file=sys.stderr)
            return 1
        print(f"{len(wanted)} dashboards up to date")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

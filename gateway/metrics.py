"""Every Prometheus series the gateway exports, defined in one place.

Counters and histograms are updated on the request path. Gauges (queue depth, in
flight, state, pool use, drift) are *read* from their owners at scrape time by a
collector, so a gauge can never disagree with the state it describes.
Label ``model`` only ever holds configured model names, or "" for requests that
never named a valid model, so a client cannot create series.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.loop_metrics import LoopCounter, LoopHistogram

MIB = 1024 * 1024
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300, 600)
START_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
MODEL_STATES = ("stopped", "starting", "ready", "stopping", "sleeping", "failed")
REJECTION_REASONS = ("queue_full", "queue_timeout", "admission", "auth", "rate_limit", "too_large",
                     "bad_request", "unknown_model", "shutting_down",
                     "too_many_connections")
ERROR_KINDS = ("connect", "dns", "connect_timeout", "pool_timeout", "read_timeout", "disconnected",
               "truncated", "protocol", "http_5xx", "http_429")
START_RESULTS = ("success", "failure", "adopted", "woken")
STOP_REASONS = ("idle", "eviction", "crash", "shutdown", "failed_start", "unload", "removed")
EVICTION_REASONS = ("vram", "max_models")
RELOAD_RESULTS = ("success", "invalid", "error")
KEY_REJECTIONS = ("invalid_api_key", "model_not_allowed", "rate_limit_requests",
                  "rate_limit_tokens", "rate_limit_concurrency", "insufficient_quota",
                  "queue_full")


@dataclass(frozen=True)
class ModelGauges:
    """One model's instantaneous values, produced by its owner at scrape time."""

    model: str
    backend: str
    state: str
    waiting: int
    in_flight: int
    max_concurrent: int
    max_queue: int
    admitted_total: int
    finished_total: int
    anomalies_total: int
    pool_size: int
    pool_in_use: int
    vram_reserved_mib: int
    stalled_seconds: float = 0.0  # admission's work-conservation check; must stay 0

    @property
    def drift(self) -> int:
        return self.admitted_total - self.finished_total - self.waiting - self.in_flight


class _StateCollector(Collector):
    def __init__(self, rows: Callable[[], Iterable[ModelGauges]],
                 vram_total_mib: Callable[[], int | None],
                 vram_used_mib: Callable[[], int | None]):
        self._rows = rows
        self._vram_total = vram_total_mib
        self._vram_used = vram_used_mib

    def collect(self):
        rows = list(self._rows())
        for name, doc, value in PER_MODEL_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for r in rows:
                family.add_metric([r.model], value(r))
            yield family
        for name, doc, value in PER_MODEL_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["model"])
            for r in rows:
                family.add_metric([r.model], value(r))
            yield family
        state = GaugeMetricFamily("gateway_model_state", "1 for the model's current lifecycle state.",
                                  labels=["model", "backend", "state"])
        for r in rows:
            for s in MODEL_STATES:
                state.add_metric([r.model, r.backend, s], 1.0 if r.state == s else 0.0)
        yield state
        for name, doc, read in (
                ("gateway_vram_total_bytes", "GPU memory the gateway may use.", self._vram_total),
                ("gateway_vram_used_bytes", "GPU memory in use (NVML or read_vram hook).",
                 self._vram_used)):
            mib = read()
            if mib is not None:
                yield GaugeMetricFamily(name, doc, value=mib * MIB)


class _KeyCollector(Collector):
    """Per-key gauges read from tenancy's status at scrape time."""

    GAUGES = (("gateway_key_active", "Requests of the key in the gateway (queued or in flight).",
               "active"),
              ("gateway_key_in_flight", "Requests of the key holding a model slot.", "in_flight"),
              ("gateway_key_tokens_today", "Tokens the key used today (UTC), against its budget.",
               "tokens_today"),
              ("gateway_key_budget_tokens", "The key's daily token budget (tokens_per_day).",
               "tokens_per_day"),
              ("gateway_key_tpm_remaining", "Tokens left in the key's per-minute limit.",
               "tpm_left"))

    def __init__(self, rows: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._rows = rows

    def collect(self):
        rows = self._rows()
        for name, doc, field in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["key"])
            for key, row in rows.items():
                if row.get(field) is not None:
                    family.add_metric([key], float(row[field]))
            yield family


# (name, help, value from a ModelGauges row): each read from its owner at scrape time.
PER_MODEL_GAUGES: tuple[tuple[str, str, Callable[[ModelGauges], float]], ...] = (
    ("gateway_queue_depth", "Requests waiting for a slot.", lambda r: r.waiting),
    ("gateway_requests_in_flight", "Requests holding a concurrency slot.", lambda r: r.in_flight),
    ("gateway_max_concurrent", "Configured concurrency limit.", lambda r: r.max_concurrent),
    ("gateway_max_queue", "Configured queue bound.", lambda r: r.max_queue),
    ("gateway_admission_drift", "admitted - finished - waiting - in flight; must be 0.",
     lambda r: r.drift),
    ("gateway_admission_stalled_seconds",
     "Seconds a model has had waiters while a slot was free; must stay 0.",
     lambda r: r.stalled_seconds),
    ("gateway_upstream_pool_size", "Upstream connection pool size.", lambda r: r.pool_size),
    ("gateway_upstream_pool_in_use", "Upstream connections in use.", lambda r: r.pool_in_use),
    ("gateway_vram_reserved_bytes", "GPU memory reserved for a loaded model.",
     lambda r: r.vram_reserved_mib * MIB),
)
PER_MODEL_COUNTERS: tuple[tuple[str, str, Callable[[ModelGauges], float]], ...] = (
    ("gateway_admission_admitted", "Requests that entered a model's queue or slot.",
     lambda r: r.admitted_total),
    ("gateway_admission_finished", "Requests that left a model's queue or slot.",
     lambda r: r.finished_total),
    ("gateway_admission_anomalies", "Negative or impossible admission counts observed.",
     lambda r: r.anomalies_total),
)


class GatewayMetrics:
    """The gateway's registry; one per app so tests can build many apps."""

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set: ``labels()`` checks its
        arguments and takes a lock on every call. Label values are bounded (see above)."""
        found = self._children.get((metric, labels))
        if found is None:
            found = self._children[(metric, labels)] = metric.labels(*labels)
        return found

    def count_request(self, model: str, endpoint: str, code: str, key: str,
                      elapsed_s: float) -> None:
        """A request answered: its three series, found with one lookup."""
        found = self._answered.get((model, endpoint, code, key))
        if found is None:
            found = self._answered[(model, endpoint, code, key)] = (
                self.requests.labels(model, endpoint, code), self.key_requests.labels(key, code),
                self.request_duration.labels(model, endpoint))
        found[0].value += 1
        found[1].value += 1
        found[2].observe(elapsed_s)

    def count_tokens(self, model: str, key: str, prompt: int, completion: int) -> None:
        """An answer's usage (counts of 0 or less are left out): four series, one lookup."""
        found = self._used.get((model, key))
        if found is None:
            found = self._used[(model, key)] = (
                self.tokens.labels(model, "input"), self.key_tokens.labels(key, "input"),
                self.tokens.labels(model, "output"), self.key_tokens.labels(key, "output"))
        if prompt > 0:
            found[0].value += prompt
            found[1].value += prompt
        if completion > 0:
            found[2].value += completion
            found[3].value += completion

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # Label values are bounded (configured models and keys, a fixed set of codes and
        # endpoints), so these combinations are too.
        self._answered: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
        self._used: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        r = self.registry
        # Updated on every request, on the event loop's thread: plain numbers (loop_metrics).
        self.requests = LoopCounter("gateway_requests", "Requests answered, by status code.",
                                    ["model", "endpoint", "code"], r)
        self.request_duration = LoopHistogram("gateway_request_duration_seconds",
                                              "Arrival to last byte.", ["model", "endpoint"], r,
                                              LATENCY_BUCKETS)
        self.queue_wait = LoopHistogram("gateway_queue_wait_seconds",
                                        "Time spent waiting for a slot.", ["model"], r,
                                        LATENCY_BUCKETS)
        self.ttft = LoopHistogram("gateway_time_to_first_token_seconds",
                                  "Arrival to first streamed byte sent to the client.", ["model"],
                                  r, LATENCY_BUCKETS)
        self.upstream_duration = LoopHistogram("gateway_upstream_duration_seconds",
                                               "One upstream attempt, send to last byte.",
                                               ["model"], r, LATENCY_BUCKETS)
        self.tokens = LoopCounter("gateway_tokens", "Tokens from upstream usage reports.",
                                  ["model", "type"], r)
        self.key_requests = LoopCounter("gateway_key_requests", "Requests answered, per API key.",
                                        ["key", "code"], r)
        self.key_tokens = LoopCounter("gateway_key_tokens",
                                      "Tokens used per API key (from usage).", ["key", "type"], r)
        self.key_queue_wait = LoopHistogram("gateway_key_queue_wait_seconds",
                                            "Time a key's requests waited for a slot.", ["key"],
                                            r, LATENCY_BUCKETS)
        self.rejections = Counter("gateway_rejections", "Requests refused by the gateway.",
                                  ["model", "reason"], registry=r)
        self.fallbacks = Counter("gateway_fallbacks",
                                 "Requests for a model served by one of its fallbacks instead.",
                                 ["model", "fallback"], registry=r)
        self.retries = Counter("gateway_upstream_retries", "Upstream attempts retried.",
                               ["model", "kind"], registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors", "Failed upstream attempts.",
                                       ["model", "kind"], registry=r)
        self.backend_starts = Counter("gateway_backend_starts", "Model server starts.",
                                      ["model", "result"], registry=r)
        self.start_duration = Histogram("gateway_backend_start_duration_seconds",
                                        "Start request to healthy.", ["model"],
                                        buckets=START_BUCKETS, registry=r)
        self.stops = Counter("gateway_backend_stops", "Model server stops.", ["model", "reason"],
                             registry=r)
        self.evictions = Counter("gateway_evictions", "Models stopped to make room.",
                                 ["model", "reason"], registry=r)
        self.stream_errors = Counter("gateway_stream_errors",
                                     "Streams that broke after the first byte.", ["model"],
                                     registry=r)
        self.plugin_duration = Histogram("gateway_plugin_duration_seconds",
                                         "Time in one plugin's hook implementation.",
                                         ["hook", "plugin"],
                                         buckets=(0.00001, 0.0001, 0.001, 0.01, 0.1, 1, 10),
                                         registry=r)
        self.plugin_errors = Counter("gateway_plugin_errors", "Hook implementations that raised.",
                                     ["hook", "plugin"], registry=r)
        # Per API key: label ``key`` holds configured key names only ("" = no valid key).
        self.key_rejections = Counter("gateway_key_rejections",
                                      "Requests refused on a key's account, by reason.",
                                      ["key", "reason"], registry=r)
        self.config_reloads = Counter("gateway_config_reloads",
                                      "Config reloads (SIGHUP, POST /gateway/reload) by result.",
                                      ["result"], registry=r)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)  # born at 0

    def init_model(self, model: str) -> None:
        """Create every fixed label combination at 0, so the first event is an increase
        that ``increase()``/``rate()`` can see (a series born at 1 is invisible)."""
        for reason in REJECTION_REASONS:
            self.rejections.labels(model, reason)
        for kind in ERROR_KINDS:
            self.upstream_errors.labels(model, kind)
            self.retries.labels(model, kind)
        for result in START_RESULTS:
            self.backend_starts.labels(model, result)
        for reason in STOP_REASONS:
            self.stops.labels(model, reason)
        for reason in EVICTION_REASONS:
            self.evictions.labels(model, reason)
        for kind in ("input", "output"):
            self.tokens.labels(model, kind)
        self.stream_errors.labels(model)

    def init_keys(self, names: Iterable[str]) -> None:
        """Per-key series born at 0 (names come from config, so they are bounded)."""
        for key in ("", *names):
            for reason in KEY_REJECTIONS:
                self.key_rejections.labels(key, reason)
            for kind in ("input", "output"):
                self.key_tokens.labels(key, kind)

    def attach_keys(self, rows: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry.register(_KeyCollector(rows))

    def attach_state(self, rows: Callable[[], Iterable[ModelGauges]],
                     vram_total_mib: Callable[[], int | None],
                     vram_used_mib: Callable[[], int | None] = lambda: None) -> None:
        self.registry.register(_StateCollector(rows, vram_total_mib, vram_used_mib))

"""gateway.loop_metrics must expose exactly what prometheus_client's Counter and Histogram
would for the same events (dashboards, alerts and recording rules read these names)."""
from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from gateway.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1, 10)
# On the bounds, between them, below the first and past the last.
OBSERVED = (0.0, 0.001, 0.0010001, 0.05, 0.1, 1, 9.99, 10, 10.5, 1e6)


def _registry(loop: bool) -> CollectorRegistry:
    r = CollectorRegistry()
    if loop:
        c = LoopCounter("gw_things", "Things.", ["model", "code"], r)
        h = LoopHistogram("gw_wait_seconds", "Waits.", ["model"], r, BUCKETS)
    else:
        c = Counter("gw_things", "Things.", ["model", "code"], registry=r)
        h = Histogram("gw_wait_seconds", "Waits.", ["model"], buckets=BUCKETS, registry=r)
    c.labels("a", "200").inc()
    c.labels("a", "200").inc(2.5)
    c.labels("b", "429")  # born at 0
    for v in OBSERVED:
        h.labels("a").observe(v)
    h.labels("b")
    return r


@pytest.mark.parametrize("exposition", [generate_latest, openmetrics_latest])
def test_exposition_matches_prometheus_client(exposition):
    def text(loop: bool) -> str:  # creation times differ by microseconds
        return re.sub(r"_created(\{[^}]*\})? \S+", r"_created\1 T",
                      exposition(_registry(loop)).decode())

    ours, theirs = text(True), text(False)
    assert ours == theirs
    assert "gw_wait_seconds_bucket" in ours and "gw_things_total" in ours


def test_values_read_through_the_registry():
    r = _registry(True)
    assert r.get_sample_value("gw_wait_seconds_count", {"model": "a"}) == len(OBSERVED)
    assert r.get_sample_value("gw_wait_seconds_sum", {"model": "a"}) == pytest.approx(sum(OBSERVED))
    bucket = {"model": "a"}
    assert r.get_sample_value("gw_wait_seconds_bucket", {**bucket, "le": "0.001"}) == 2  # on it
    assert r.get_sample_value("gw_wait_seconds_bucket", {**bucket, "le": "10.0"}) == 8
    assert r.get_sample_value("gw_wait_seconds_bucket", {**bucket, "le": "+Inf"}) == 10
    assert r.get_sample_value("gw_things_total", {"model": "a", "code": "200"}) == 3.5
    assert r.get_sample_value("gw_things_total", {"model": "b", "code": "429"}) == 0


def test_misuse_is_refused():
    r = CollectorRegistry()
    c = LoopCounter("gw_x", "X.", ["model"], r)
    with pytest.raises(ValueError):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError):
        c.labels("a", "b")
    with pytest.raises(ValueError):
        LoopHistogram("gw_y", "Y.", [], r, (1, 0.5))
    with pytest.raises(ValueError):  # one name, one family, as prometheus_client insists
        LoopCounter("gw_x", "X again.", ["model"], r)


def test_count_request_and_count_tokens_feed_their_series():
    from gateway.metrics import GatewayMetrics

    m = GatewayMetrics()
    for _ in range(2):
        m.count_request("m", "chat", "200", "team", 0.05)
    m.count_request("m", "chat", "429", "", 0.001)
    m.count_tokens("m", "team", 3, 0)
    m.count_tokens("m", "team", 4, 5)
    m.count_tokens("m", "", -1, 2)  # a negative count is left out, the other kept
    text = generate_latest(m.registry).decode()

    def value(line_start: str) -> float:
        return float(next(ln for ln in text.splitlines() if ln.startswith(line_start + " "))
                     .rsplit(" ", 1)[1])
    assert value('gateway_requests_total{code="200",endpoint="chat",model="m"}') == 2
    assert value('gateway_requests_total{code="429",endpoint="chat",model="m"}') == 1
    assert value('gateway_key_requests_total{code="200",key="team"}') == 2
    assert value('gateway_request_duration_seconds_count{endpoint="chat",model="m"}') == 3
    assert value('gateway_tokens_total{model="m",type="input"}') == 7
    assert value('gateway_tokens_total{model="m",type="output"}') == 7
    assert value('gateway_key_tokens_total{key="team",type="output"}') == 5
    assert value('gateway_key_tokens_total{key="",type="output"}') == 2
    assert value('gateway_key_tokens_total{key="",type="input"}') == 0

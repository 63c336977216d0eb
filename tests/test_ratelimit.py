"""The per-key limiter's arithmetic on a clock the test moves (gateway/ratelimit.py)."""
from __future__ import annotations

import pytest

from gateway.keys import Tenant
from gateway.ratelimit import DAY_S, Grant, LimitStore, Refusal, duration, estimate_tokens


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 10 * DAY_S + 3600.0  # 01:00 UTC

    def tick(self, s: float) -> None:
        self.mono += s
        self.wall += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> LimitStore:
    return LimitStore(monotonic=lambda: clock.mono, wall=lambda: clock.wall)


def test_rpm_allows_a_minutes_burst_then_one_per_interval(store, clock):
    t = Tenant("k", rpm=6)  # one every 10 s
    grants = [store.acquire(t, 0) for _ in range(6)]
    assert all(isinstance(g, Grant) for g in grants)
    assert [g.headers["x-ratelimit-remaining-requests"] for g in grants] == list("543210")
    refused = store.acquire(t, 0)
    assert isinstance(refused, Refusal) and refused.code == "rate_limit_requests"
    assert refused.retry_after_s == 10
    clock.tick(9.9)
    assert isinstance(store.acquire(t, 0), Refusal)
    clock.tick(0.2)
    assert isinstance(store.acquire(t, 0), Grant)
    clock.tick(60)
    assert store.acquire(t, 0).headers["x-ratelimit-remaining-requests"] == "5"  # full again


def test_refusals_commit_nothing_and_unsent_requests_are_refunded(store, clock):
    t = Tenant("k", rpm=2, tpm=100)
    assert isinstance(store.acquire(t, 150), Refusal)  # too big for the tpm: rpm untouched
    g1 = store.acquire(t, 60)
    assert isinstance(g1, Grant)
    assert isinstance(store.acquire(t, 60), Refusal)  # 40 left: refused, not held
    store.settle(g1, None, served=False)  # never reached a server: both refunded
    g2, g3 = store.acquire(t, 50), store.acquire(t, 50)
    assert isinstance(g2, Grant) and isinstance(g3, Grant)
    assert store.acquire(t, 1).code == "rate_limit_requests"


def test_tokens_settle_to_usage_and_debt_refuses_until_refilled(store, clock):
    t = Tenant("k", tpm=600)  # 10 tokens/s
    g = store.acquire(t, 100)
    store.settle(g, 900, served=True)  # it used far more than estimated: 400 in debt
    assert store.tokens_left(t) == pytest.approx(-300)
    refused = store.acquire(t, 10)
    assert refused.code == "rate_limit_tokens" and refused.retry_after_s == 31  # (10+300)/10
    clock.tick(31)
    assert isinstance(store.acquire(t, 10), Grant)
    store.settle(g, 1, served=True)  # settling twice changes nothing
    assert store.tokens_left(t) == pytest.approx(0)


def test_daily_budget_rolls_at_midnight_utc(store, clock):
    t = Tenant("k", tokens_per_day=1000)
    g = store.acquire(t, 100)
    store.settle(g, 990, served=True)
    refused = store.acquire(t, 20)
    assert refused.code == "insufficient_quota"
    assert refused.retry_after_s == 23 * 3600  # 01:00 -> midnight
    assert refused.headers["x-gateway-budget-remaining-tokens"] == "10"
    assert isinstance(store.acquire(t, 5), Grant)  # what fits still passes
    clock.tick(23 * 3600)
    assert store.used_today(t) == 0
    assert isinstance(store.acquire(t, 500), Grant)


def test_estimates_and_reset_format():
    assert estimate_tokens({"max_tokens": 50}, 400) == 150
    assert estimate_tokens({"max_completion_tokens": 10, "max_tokens": 99, "n": 3}, 0) == 30
    assert estimate_tokens({"max_tokens": True}, 8) == 2  # a bool is not a number
    assert [duration(s) for s in (0.02, 1, 59.2, 360)] == ["20ms", "1s", "1m0s", "6m0s"]

"""Per-key request rate, token rate and daily token budget.

Each key's state is a ``KeyUsage`` held by a ``LimitStore``, keyed by the key's name,
so it survives a config reload and a shared store (Redis, with the same arithmetic in
one Lua script per call) can hold it later for several gateways. ``acquire`` checks
every limit and commits all of them or none; ``settle`` replaces the reservation with
what the answer's ``usage`` says was used (or refunds it when nothing was served).

- Requests per minute: GCRA, a minute's worth of burst (``rpm`` at once, then one
  every 60/rpm seconds).
- Tokens per minute: a bucket of ``tpm`` refilled at tpm/60 per second. A request
  reserves its estimate (max_tokens plus a quarter of its body's bytes); one that
  would not fit what is left is refused, not held. Usage beyond the estimate is
  charged when the answer ends, so the bucket can go below zero and refuse until it
  has refilled.
- Tokens per day: a UTC calendar day's budget, reserved and settled the same way.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.keys import Tenant

DAY_S = 86_400.0
MINUTE_S = 60.0


@dataclass
class KeyUsage:
    """One key's limiter state; written only by its LimitStore."""

    tat: float = 0.0  # GCRA theoretical arrival time (monotonic)
    tokens: float | None = None  # bucket level; None = full (not yet used)
    tokens_at: float = 0.0
    day: int = -1
    day_ends: float = 0.0  # wall time the day rolls at
    used_today: int = 0


@dataclass
class Grant:
    """An accepted request's reservation, to be settled when its answer ends."""

    tenant: Tenant
    reserved: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    counted_request: bool = False
    settled: bool = False


@dataclass(frozen=True)
class Refusal:
    code: str  # rate_limit_requests, rate_limit_tokens, insufficient_quota
    message: str
    retry_after_s: int
    headers: dict[str, str]


class LimitStore:
    """The in-process store: one gateway's keys."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._usage: dict[str, KeyUsage] = {}
        self._monotonic = monotonic
        self._wall = wall

    def usage(self, name: str) -> KeyUsage:
        u = self._usage.get(name)
        if u is None:
            u = self._usage[name] = KeyUsage()
        return u

    def forget_except(self, names: set[str]) -> None:
        """Drop the state of keys no longer configured (after a reload)."""
        for name in [n for n in self._usage if n not in names]:
            del self._usage[name]

    # ------------------------------------------------------------------ the decision

    def acquire(self, tenant: Tenant, estimate: int) -> Grant | Refusal:
        """Check every limit of ``tenant``; commit them all, or refuse naming the first
        one exceeded with the time until it would pass."""
        now, wall = self._monotonic(), self._wall()
        u = self.usage(tenant.name)
        headers: dict[str, str] = {}
        refusal: Refusal | None = None
        new_tat = None
        if tenant.rpm is not None:
            interval = MINUTE_S / tenant.rpm
            new_tat = max(u.tat, now) + interval
            over = new_tat - now - MINUTE_S
            if over > 1e-9:
                headers.update(_request_headers(tenant.rpm, 0, max(u.tat, now) - now))
                refusal = Refusal("rate_limit_requests",
                                  f"key {tenant.name!r} is over its limit of {tenant.rpm} "
                                  f"requests per minute", _ceil(over), headers)
            else:
                remaining = int((MINUTE_S - (new_tat - now)) / interval + 1e-9)
                headers.update(_request_headers(tenant.rpm, remaining, new_tat - now))
        level = None
        if tenant.tpm is not None:
            level = self._level(u, tenant.tpm, now)
            if refusal is not None or estimate > level or level <= 0:
                headers.update(_token_headers(tenant.tpm, level))
            if refusal is None and (estimate > level or level <= 0):
                rate = tenant.tpm / MINUTE_S
                if estimate > tenant.tpm:
                    message = (f"this request needs about {estimate} tokens, more than key "
                               f"{tenant.name!r}'s limit of {tenant.tpm} tokens per minute; "
                               f"lower max_tokens")
                    wait = MINUTE_S
                else:
                    message = (f"key {tenant.name!r} is over its limit of {tenant.tpm} tokens "
                               f"per minute ({max(0, int(level))} left, this request needs "
                               f"about {estimate})")
                    wait = (max(estimate, 1) - level) / rate
                refusal = Refusal("rate_limit_tokens", message, _ceil(wait), headers)
        if tenant.tokens_per_day is not None:
            self._roll_day(u, wall)
            left = tenant.tokens_per_day - u.used_today
            if refusal is not None or left <= 0 or estimate > left:
                headers["x-gateway-budget-remaining-tokens"] = str(max(0, left))
            if refusal is None and (left <= 0 or estimate > left):
                until = (u.day + 1) * DAY_S - wall
                refusal = Refusal("insufficient_quota",
                                  f"key {tenant.name!r} has used its budget of "
                                  f"{tenant.tokens_per_day} tokens for today (UTC); "
                                  f"{max(0, left)} left, this request needs about {estimate}",
                                  _ceil(until), headers)
        if refusal is not None:
            return refusal
        # Every limit passes: commit them all in this one step.
        if new_tat is not None:
            u.tat = new_tat
        if level is not None:
            u.tokens, u.tokens_at = level - estimate, now
            headers.update(_token_headers(tenant.tpm or 0, level - estimate))
        if tenant.tokens_per_day is not None:
            u.used_today += estimate
            headers["x-gateway-budget-remaining-tokens"] = str(
                max(0, tenant.tokens_per_day - u.used_today))
        return Grant(tenant, estimate, headers, counted_request=new_tat is not None)

    def settle(self, grant: Grant, used: int | None, served: bool) -> None:
        """Replace the reservation with tokens actually used (``None``: unknown, so the
        estimate stands if anything was served). Unserved requests are refunded,
        their request too. Idempotent."""
        if grant.settled:
            return
        grant.settled = True
        tenant = grant.tenant
        u = self.usage(tenant.name)
        if not served:
            charged = 0
            if grant.counted_request and tenant.rpm is not None:
                u.tat -= MINUTE_S / tenant.rpm
        else:
            charged = grant.reserved if used is None else max(0, used)
        delta = charged - grant.reserved
        if tenant.tpm is not None and u.tokens is not None:
            now = self._monotonic()
            u.tokens = self._level(u, tenant.tpm, now) - delta
            u.tokens_at = now
        if tenant.tokens_per_day is not None:
            self._roll_day(u, self._wall())
            u.used_today = max(0, u.used_today + delta)

    # ------------------------------------------------------------------ readings

    def used_today(self, tenant: Tenant) -> int:
        u = self.usage(tenant.name)
        self._roll_day(u, self._wall())
        return u.used_today

    def tokens_left(self, tenant: Tenant) -> float | None:
        if tenant.tpm is None:
            return None
        return self._level(self.usage(tenant.name), tenant.tpm, self._monotonic())

    @staticmethod
    def _level(u: KeyUsage, tpm: int, now: float) -> float:
        if u.tokens is None:
            return float(tpm)
        return min(float(tpm), u.tokens + (now - u.tokens_at) * tpm / MINUTE_S)

    @staticmethod
    def _roll_day(u: KeyUsage, wall: float) -> None:
        if wall >= u.day_ends or wall < u.day_ends - DAY_S:  # a new day (or a clock step)
            day = int(wall // DAY_S)
            if day != u.day:
                u.day, u.used_today = day, 0
            u.day_ends = (day + 1) * DAY_S


def estimate_tokens(payload: dict, body_bytes: int) -> int:
    """A request's token cost before it runs: what it may generate plus its prompt
    (a quarter of the body's bytes is an upper-ish bound for English text)."""
    most = 0
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            most = value
            break
    n = payload.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 128:
        most *= n
    return most + body_bytes // 4


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _request_headers(rpm: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(0, remaining)),
            "x-ratelimit-reset-requests": duration(reset_s)}


def _token_headers(tpm: int, level: float) -> dict[str, str]:
    missing = tpm - level
    return {"x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(max(0, int(level))),
            "x-ratelimit-reset-tokens": duration(missing / (tpm / MINUTE_S))}


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))

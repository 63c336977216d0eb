"""How long a refused client should wait: ``Retry-After``, computed, not guessed.

A constant is wrong both ways: too short and clients hammer a full queue, too long and
they idle while it drains. ``retry_after_s`` says when a retry can succeed, from what the
runtime knows: the remaining start backoff, the learned start time, or the queue length
over the model's measured drain rate (``DrainRate``).
"""
from __future__ import annotations

import math

WINDOW_S = 1.0  # a drain-rate sample covers at least this long
ALPHA = 0.3  # weight of the newest sample in the moving average
QUEUE_MIN_S, QUEUE_MAX_S = 1, 60
UNKNOWN_START_S = 10.0  # a model that never started: no learned start time yet


class DrainRate:
    """Requests leaving a model's queue or slot per second while it is busy: an
    exponentially weighted average over windows of at least ``WINDOW_S``. Idle time
    says nothing about service speed, so an idle sample only restarts the window."""

    def __init__(self) -> None:
        self.per_s: float | None = None
        self._since: float | None = None
        self._count = 0

    def sample(self, now: float, finished_total: int, busy: bool) -> None:
        if not busy or self._since is None:
            self._since, self._count = now, finished_total
            return
        elapsed = now - self._since
        if elapsed < WINDOW_S:
            return
        rate = (finished_total - self._count) / elapsed
        self.per_s = rate if self.per_s is None else ALPHA * rate + (1 - ALPHA) * self.per_s
        self._since, self._count = now, finished_total


def retry_after_s(*, ready: bool, waiting: int, max_concurrent: int, drain_per_s: float | None,
                  backoff_left_s: float, expected_start_s: float, starting_for_s: float) -> int:
    """Whole seconds until a retry may succeed (at least 1).

    In a start backoff: what is left of it. Not ready (starting, stopping, asleep, or a
    stop under way): the learned start time minus the time already spent starting.
    Ready: the queue over the drain rate (one request per second per slot until one
    has been measured), clamped to [1, 60].
    """
    if backoff_left_s > 0:
        return max(1, math.ceil(backoff_left_s))
    if not ready:
        expected = expected_start_s if expected_start_s > 0 else UNKNOWN_START_S
        return max(1, math.ceil(expected - starting_for_s))
    rate = drain_per_s if drain_per_s is not None else float(max_concurrent)
    if rate <= 0:
        return QUEUE_MAX_S
    return min(QUEUE_MAX_S, max(QUEUE_MIN_S, math.ceil(waiting / rate)))

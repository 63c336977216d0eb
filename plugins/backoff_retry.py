"""Built-in retry policy: exponential backoff on errors where nothing reached vLLM.

Connect errors, timeouts and pool timeouts are retried after
``backoff_s * backoff_multiplier ** (attempt - 1)`` seconds. HTTP errors from the
model server are its answer and pass through unchanged; a read error mid-response
is not retried because the request may already be running upstream.
"""
from __future__ import annotations

from gateway.hookspecs import hookimpl
from gateway.types import RetryDecision

RETRYABLE = frozenset({"connect", "timeout", "pool_timeout"})


@hookimpl(trylast=True)
def decide_retry(outcome, settings):
    if outcome.kind not in RETRYABLE:  # the core caps attempts at settings.retries + 1
        return RetryDecision(retry=False)
    delay = settings.backoff_s * settings.backoff_multiplier ** (outcome.attempt - 1)
    return RetryDecision(retry=True, delay_s=delay)

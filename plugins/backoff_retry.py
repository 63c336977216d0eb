"""Built-in retry policy: exponential backoff, only where the request never reached vLLM.

Refused connections, DNS failures, connect and pool timeouts (``outcome.sent`` False)
are retried after ``backoff_s * backoff_multiplier ** (attempt - 1)`` seconds.
Anything that may have reached the server (a read timeout, a connection closed or
reset after sending, a truncated or garbled answer) is not: the generation may already
be running, and sending it again would run it twice. HTTP answers are the server's
and pass through unchanged; a plugin may opt into retrying some (``outcome.status``).
"""
from __future__ import annotations

from gateway.hookspecs import hookimpl
from gateway.types import RetryDecision


@hookimpl(trylast=True)
def decide_retry(outcome, settings):
    if outcome.sent:  # the core caps attempts at settings.retries + 1
        return RetryDecision(retry=False)
    delay = settings.backoff_s * settings.backoff_multiplier ** (outcome.attempt - 1)
    return RetryDecision(retry=True, delay_s=delay)

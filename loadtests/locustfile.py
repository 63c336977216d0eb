"""Locust load for the gateway, in the shape OpenAI clients send (see loadtests/README.md).

One user class, three weighted tasks:

* ``chat``         POST /v1/chat/completions, non-streaming (weight 5);
* ``chat_stream``  the same with ``"stream": true`` and ``stream_options.include_usage``,
                   reading the SSE stream to ``data: [DONE]`` (weight 3);
* ``completion``   POST /v1/completions, non-streaming (weight 2).

Every response is checked, not just its status: a chat answer needs a message and usage, a
stream needs parseable events, no error event and a final ``[DONE]``. A 429 is reported as a
failure whose message starts with "HTTP 429" so a run can tell queue-full rejections from
real errors. Stream entries are timed to the last event; a second entry per stream,
"... first token", records the time to the first content event.

Environment:

* ``LOADTEST_MODELS``      comma-separated model names (default ``chat-small,chat-large``,
                           the models of ``make run``'s demo config); each request picks one;
* ``LOADTEST_MAX_TOKENS``  ``max_tokens`` per request (default 16);
* ``LOADTEST_WAIT``        ``MIN,MAX`` seconds each user waits between requests
                           (default ``0.05,0.25``).
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task

PROMPTS = (
    "Say hello.",
    "Summarise the plot of a heist film in two sentences.",
    "Write a haiku about load balancers.",
    "List three prime numbers.",
    "What is the capital of France?",
)


def _models() -> list[str]:
    raw = os.environ.get("LOADTEST_MODELS", "chat-small,chat-large")
    models = [m.strip() for m in raw.split(",") if m.strip()]
    if not models:
        raise ValueError("LOADTEST_MODELS names no model (comma-separated names expected)")
    return models


def _wait() -> tuple[float, float]:
    raw = os.environ.get("LOADTEST_WAIT", "0.05,0.25")
    try:
        low, high = (float(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"LOADTEST_WAIT must be MIN,MAX seconds (got {raw!r})") from None
    if not 0 <= low <= high:
        raise ValueError(f"LOADTEST_WAIT must be 0 <= MIN <= MAX (got {raw!r})")
    return low, high


MODELS = _models()
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "16"))
WAIT_MIN_S, WAIT_MAX_S = _wait()


def _http_error(resp: Any) -> str:
    """``HTTP <status>: <error.code>`` from an OpenAI-style error body, if there is one."""
    code = ""
    try:
        err = resp.json().get("error") or {}
        code = err.get("code") or err.get("type") or ""
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status_code}" + (f": {code}" if code else "")


class OpenAIUser(HttpUser):
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)

    def _payload(self, model: str) -> dict[str, Any]:
        return {"model": model, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}

    @task(5)
    def chat(self) -> None:
        model = random.choice(MODELS)
        with self.client.post("/v1/chat/completions", json=self._payload(model),
                              name=f"chat [{model}]", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(_http_error(resp))
                return
            try:
                body = resp.json()
                content = body["choices"][0]["message"]["content"]
                usage = body["usage"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"malformed chat completion: {type(exc).__name__}: {exc}")
                return
            if not isinstance(content, str) or not isinstance(usage.get("completion_tokens"), int):
                resp.failure("chat completion without content or usage")
                return
            resp.success()

    @task(3)
    def chat_stream(self) -> None:
        model = random.choice(MODELS)
        payload = self._payload(model)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        name = f"chat stream [{model}]"
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=payload, name=name, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(_http_error(resp))
                return
            try:
                problem, size, first = self._read_sse(resp, started)
            except Exception as exc:  # a connection that breaks mid-stream
                problem, size, first = f"stream broke: {type(exc).__name__}: {exc}", 0, None
            # time and size of the whole stream, not just of its headers
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            resp.request_meta["response_length"] = size
            if problem:
                resp.failure(problem)
                return
            resp.success()
        if first is not None:
            self.environment.events.request.fire(
                request_type="SSE", name=f"{name} first token", response_time=first,
                response_length=0, exception=None, context={})

    @staticmethod
    def _read_sse(resp: Any, started: float) -> tuple[str | None, int, float | None]:
        """Read to the end: (problem or None, bytes read, ms to the first content event)."""
        size, first, done, usage = 0, None, False, False
        for line in resp.iter_lines():
            size += len(line) + 1
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                continue
            if done:
                return "event after [DONE]", size, first
            try:
                event = json.loads(data)
            except ValueError:
                return f"unparseable event: {data[:80]!r}", size, first
            if "error" in event:
                err = event["error"] or {}
                return f"error event: {err.get('code') or err.get('message')}", size, first
            if event.get("usage"):
                usage = True
            if first is None and any((c.get("delta") or {}).get("content")
                                     for c in event.get("choices") or ()):
                first = (time.perf_counter() - started) * 1000
        if not done:
            return "stream ended without data: [DONE]", size, first
        if not usage:
            return "stream without a usage event (include_usage was asked for)", size, first
        return None, size, first

    @task(2)
    def completion(self) -> None:
        model = random.choice(MODELS)
        payload = {"model": model, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS}
        with self.client.post("/v1/completions", json=payload, name=f"completion [{model}]",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(_http_error(resp))
                return
            try:
                text = resp.json()["choices"][0]["text"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"malformed completion: {type(exc).__name__}: {exc}")
                return
            if not isinstance(text, str):
                resp.failure("completion without text")
                return
            resp.success()

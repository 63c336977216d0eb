"""The request path end to end: a real gateway process in front of real simulator processes,
driven over real sockets with the openai client and httpx.

One gateway serves the whole module; each model entry sets up one situation (a small queue,
a dead upstream, a renamed model, ...). Tests that count things read deltas, so their order
does not matter.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import openai
import pytest
from helpers import (
    free_port,
    metric_samples,
    sim_command,
    start_gateway,
    start_simulator,
    wait_until,
)
from openai import AsyncOpenAI, OpenAI

SIM = "sim-a"  # the fast simulator's served name
EMBED = "embed-a"  # a pooling simulator (vLLM serves embeddings only with --runner pooling)
SLOW = "slow"  # a simulator whose first token takes SLOW_TTFT_MS
SLOW_TTFT_MS = 800
MAX_REQUEST_BYTES = 4096
RETRIES = 2
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def sim():
    with start_simulator(SIM, ttft_ms=5, itl_ms=2) as s:
        yield s


@pytest.fixture(scope="module")
def embed_sim():
    with start_simulator(EMBED, ttft_ms=5, runner="pooling") as s:
        yield s


@pytest.fixture(scope="module")
def slow_sim():
    with start_simulator(SLOW, ttft_ms=SLOW_TTFT_MS, itl_ms=1) as s:
        yield s


@pytest.fixture(scope="module")
def gw(sim, slow_sim, embed_sim, tmp_path_factory):
    config = {
        "limits": {"max_concurrent": 8, "max_queue": 16, "max_request_bytes": MAX_REQUEST_BYTES},
        "upstream": {"retries": RETRIES, "backoff_s": 0.05, "backoff_multiplier": 1,
                     "connect_timeout_s": 3, "extra_paths": ["/v1/not-a-gateway-route"]},
        "models": [
            {"name": SIM, "backend": "static", "url": sim.url},
            {"name": EMBED, "backend": "static", "url": embed_sim.url},
            {"name": "alias", "backend": "static", "url": sim.url, "served_model_name": SIM},
            {"name": "dead", "backend": "static", "url": f"http://127.0.0.1:{free_port()}"},
            {"name": "tiny", "backend": "static", "url": slow_sim.url,
             "served_model_name": SLOW, "max_concurrent": 1, "max_queue": 1},
            {"name": "fifo", "backend": "static", "url": sim.url, "served_model_name": SIM,
             "max_concurrent": 1, "max_queue": 5},
            {"name": "storm", "backend": "static", "url": sim.url, "served_model_name": SIM,
             "max_concurrent": 4, "max_queue": 100},
            {"name": "lazy", "backend": "process", "command": sim_command()},
        ],
    }
    with start_gateway(config, tmp_path_factory.mktemp("gw")) as g:
        yield g


@pytest.fixture
def client(gw) -> OpenAI:
    with OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
async def aclient(gw):
    async with AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0,
                           timeout=30) as c:
        yield c


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


def sim_stats(sim) -> dict:
    return httpx.get(f"{sim.url}/sim/stats", timeout=5, trust_env=False).json()


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """The gateway's own errors carry OpenAI's body: {"error": {"message", "type", "code"}}."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "code" in err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(raw: bytes) -> list[str]:
    """The events of an SSE body, one string each."""
    return [e for e in raw.decode().split("\n\n") if e.strip()]


def normalise(event: str) -> str:
    """An event with its per-request parts (id, created) blanked."""
    event = re.sub(r'"id":"[^"]*"', '"id":""', event)
    return re.sub(r'"created":\d+', '"created":0', event)


def wait_idle(gw, model: str, timeout: float = 10.0) -> dict:
    """Wait until ``model`` has nothing queued or in flight; returns its status entry."""
    def idle():
        m = gw.status()["models"][model]
        return m if m["in_flight"] == 0 and m["queue_depth"] == 0 else None
    return wait_until(idle, timeout, what=f"{model} to be idle")


# --- the happy path ---------------------------------------------------------------------------

def test_chat_completion_non_stream(client):
    resp = client.chat.completions.create(model=SIM, messages=CHAT, max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.choices[0].finish_reason == "length"
    assert len(resp.choices[0].message.content.split()) == 5
    assert resp.usage.completion_tokens == 5 and resp.usage.prompt_tokens == 2


def test_completion_non_stream(client):
    resp = client.completions.create(model=SIM, prompt="one two three", max_tokens=4)
    assert resp.object == "text_completion"
    assert len(resp.choices[0].text.split()) == 4
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 4


def test_embeddings_non_stream(client):
    resp = client.embeddings.create(model=EMBED, input=["a b", "c"])
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.usage.prompt_tokens == 3


async def test_stream_passes_events_through_unchanged(gw, sim, http):
    body = {"model": SIM, "messages": CHAT, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    direct = await http.post(f"{sim.url}/v1/chat/completions", json=body)
    proxied = await http.post(f"{gw.url}/v1/chat/completions", json=body)
    assert direct.status_code == proxied.status_code == 200
    want, got = sse_events(direct.content), sse_events(proxied.content)
    # role chunk + 10 content events (12 tokens: every 4th event carries two, as vLLM
    # merges them) + the finish_reason event + usage + [DONE]
    assert len(want) == 1 + 10 + 1 + 1 + 1
    assert len(got) == len(want)
    assert [normalise(e) for e in got] == [normalise(e) for e in want]
    assert got[-1] == "data: [DONE]"


async def test_stream_through_openai_client_with_include_usage(aclient):
    stream = await aclient.chat.completions.create(
        model=SIM, messages=CHAT, max_tokens=7, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content.split()) == 7
    # role, 6 content events (7 tokens, the 4th event carries two), finish_reason, usage
    assert len(chunks) == 1 + 6 + 1 + 1
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7


async def test_completion_stream_event_count(aclient):
    stream = await aclient.completions.create(model=SIM, prompt="a b c", max_tokens=9,
                                              stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 8 + 1  # 9 tokens in 8 events (every 4th carries two), finish_reason
    assert len("".join(c.choices[0].text for c in chunks).split()) == 9
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].text == ""


# --- response headers ---------------------------------------------------------------------------

def test_queue_headers_on_proxied_response(gw):
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False,
                   json={"model": "tiny", "messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200
    assert r.headers["X-Queue-Depth"] == "0"
    assert r.headers["X-Max-Concurrent"] == "1"
    assert r.headers["X-Max-Queue-Size"] == "1"


async def test_stream_headers_disable_proxy_buffering(gw, http):
    body = {"model": SIM, "messages": CHAT, "max_tokens": 2, "stream": True}
    async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Max-Concurrent"] == "8"
        assert r.headers["X-Max-Queue-Size"] == "16"
        assert r.headers["X-Queue-Depth"] == "0"
        await r.aread()


# --- the gateway's own errors ----------------------------------------------------------------

def test_unknown_model_is_404_model_not_found(gw, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "no-such-model",
                                                          "messages": CHAT}, trust_env=False)
    err = assert_openai_error(r, 404, "model_not_found")
    assert "no-such-model" in err["message"] and SIM in err["message"]


def test_bad_json_is_400(gw):
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b'{"model": "sim-a", ',
                   headers={"content-type": "application/json"}, trust_env=False)
    assert_openai_error(r, 400, "invalid_json")
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b'["a list"]', trust_env=False)
    assert_openai_error(r, 400, "invalid_request")


def test_missing_model_is_400(gw, client):
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"messages": CHAT}, trust_env=False)
    err = assert_openai_error(r, 400, "missing_model")
    assert "model" in err["message"]
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": 3, "messages": CHAT},
                   trust_env=False)
    assert_openai_error(r, 400, "missing_model")


def test_body_over_max_request_bytes_is_413(gw, sim):
    before = sim_stats(sim)["requests_total"]
    big = {"model": SIM, "messages": [{"role": "user", "content": "x " * MAX_REQUEST_BYTES}]}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=big, trust_env=False)
    err = assert_openai_error(r, 413, "request_too_large")
    assert str(MAX_REQUEST_BYTES) in err["message"]
    assert sim_stats(sim)["requests_total"] == before  # never forwarded
    # just under the limit is fine
    small = {"model": SIM, "messages": CHAT, "max_tokens": 1, "user": "y" * 3000}
    assert httpx.post(f"{gw.url}/v1/chat/completions", json=small,
                      trust_env=False).status_code == 200


@pytest.mark.parametrize("status", [400, 500, 503])
def test_upstream_http_error_passes_through_unretried(gw, sim, status):
    body = {"model": SIM, "messages": CHAT}
    headers = {"X-Sim-Status": str(status)}
    direct = httpx.post(f"{sim.url}/v1/chat/completions", json=body, headers=headers,
                        trust_env=False)
    retries_before = gw.metric("gateway_upstream_retries_total", model=SIM)
    before = sim_stats(sim)["requests_total"]
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, trust_env=False)
    assert r.status_code == status == direct.status_code
    assert r.content == direct.content  # the model server's own body, byte for byte
    assert r.json()["error"]["code"] == status
    assert sim_stats(sim)["requests_total"] == before + 1  # exactly one attempt
    assert gw.metric("gateway_upstream_retries_total", model=SIM) == retries_before


def test_upstream_error_on_stream_request_passes_through(gw, sim):
    body = {"model": SIM, "messages": CHAT, "stream": True}
    before = sim_stats(sim)["requests_total"]
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"X-Sim-Status": "500"},
                   trust_env=False)
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["message"] == "Simulated error (X-Sim-Status: 500)"
    assert sim_stats(sim)["requests_total"] == before + 1


def test_wrong_method_and_unknown_route_use_openai_body(gw):
    r = httpx.get(f"{gw.url}/v1/chat/completions", trust_env=False)
    err = assert_openai_error(r, 405, "method_not_allowed")
    assert err["type"] == "invalid_request_error"
    r = httpx.post(f"{gw.url}/not/a/route", json={"model": SIM}, trust_env=False)
    assert_openai_error(r, 404, "not_found")


def test_upstream_error_through_openai_client(client):
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=SIM, messages=CHAT,
                                       extra_headers={"X-Sim-Status": "500"})
    assert info.value.status_code == 500
    assert "Simulated error" in info.value.message


def test_unreachable_upstream_is_503_after_retries(gw):
    retries = gw.metric("gateway_upstream_retries_total", model="dead", kind="connect")
    errors = gw.metric("gateway_upstream_errors_total", model="dead", kind="connect")
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "dead", "messages": CHAT},
                   timeout=30, trust_env=False)
    elapsed = time.monotonic() - started
    err = assert_openai_error(r, 503, "upstream_unavailable")
    assert f"after {RETRIES + 1} attempt(s)" in err["message"]
    assert "Retry-After" in r.headers
    assert gw.metric("gateway_upstream_retries_total", model="dead", kind="connect") \
        == retries + RETRIES
    assert gw.metric("gateway_upstream_errors_total", model="dead", kind="connect") \
        == errors + RETRIES + 1
    assert elapsed >= RETRIES * 0.05
    assert wait_idle(gw, "dead")["drift"] == 0


async def test_stream_broken_midway_ends_with_error_event(gw, sim, http):
    body = {"model": SIM, "messages": CHAT, "max_tokens": 10, "stream": True}
    errors_before = gw.metric("gateway_stream_errors_total", model=SIM)
    r = await http.post(f"{gw.url}/v1/chat/completions", json=body,
                        headers={"X-Sim-Break-After": "2"})
    assert r.status_code == 200
    events = sse_events(r.content)
    assert len(events) == 1 + 2 + 1  # role, two tokens, the gateway's error event
    assert "data: [DONE]" not in events
    last = events[-1]
    assert last.startswith("data: {")
    err = json.loads(last[len("data: "):])["error"]
    assert err["code"] == "upstream_error" and err["message"]
    assert gw.metric("gateway_stream_errors_total", model=SIM) == errors_before + 1
    assert wait_idle(gw, SIM)["drift"] == 0


# --- what reaches the model server ----------------------------------------------------------

def test_served_model_name_rewrites_body_model(gw):
    r = httpx.post(f"{gw.url}/v1/chat/completions", trust_env=False,
                   json={"model": "alias", "messages": CHAT, "max_tokens": 1},
                   headers={"X-Sim-Echo-Headers": "1", "X-Custom": "kept"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["received_model"] == SIM
    received = out["received_headers"]
    assert received["x-custom"] == "kept"
    assert "keep-alive" not in received and "proxy-authorization" not in received


def test_model_without_served_name_is_forwarded_as_is(gw):
    r = httpx.post(f"{gw.url}/v1/completions", trust_env=False,
                   json={"model": SIM, "prompt": "hi", "max_tokens": 1})
    assert r.json()["received_model"] == SIM


def test_tokenize_passes_through(gw, sim):
    before = sim_stats(sim)["requests_total"]
    r = httpx.post(f"{gw.url}/tokenize", json={"model": SIM, "prompt": "one two three"},
                   trust_env=False)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 3
    assert sim_stats(sim)["requests_total"] == before + 1


def test_configured_extra_path_passes_through(gw, sim):
    before = sim_stats(sim)["requests_total"]
    r = httpx.post(f"{gw.url}/v1/not-a-gateway-route", json={"model": SIM}, trust_env=False)
    # the simulator's (FastAPI-shaped) 404, not the gateway's own error body
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}
    assert sim_stats(sim)["requests_total"] == before + 1


def test_path_outside_the_allow_list_never_reaches_the_server(gw, sim):
    before = sim_stats(sim)["requests_total"]
    r = httpx.post(f"{gw.url}/v1/some-private-thing", json={"model": SIM}, trust_env=False)
    assert_openai_error(r, 404, "not_found")
    assert sim_stats(sim)["requests_total"] == before


# --- admission: queue bound, FIFO -------------------------------------------------------------

async def test_queue_full_is_429_with_retry_after(gw, http):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 1}
    rejected_before = gw.metric("gateway_rejections_total", model="tiny", reason="queue_full")
    results = await asyncio.gather(*(http.post(f"{gw.url}/v1/chat/completions", json=body)
                                     for _ in range(4)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429]  # one in flight, one queued, two refused
    for r in results:
        if r.status_code == 429:
            err = assert_openai_error(r, 429, "queue_full")
            assert err["type"] == "rate_limit_error"
            assert int(r.headers["Retry-After"]) >= 1
            assert r.headers["X-Max-Queue-Size"] == "1"
            assert r.headers["X-Queue-Depth"] == "1"
    assert gw.metric("gateway_rejections_total", model="tiny", reason="queue_full") \
        == rejected_before + 2
    assert wait_idle(gw, "tiny")["drift"] == 0


async def test_queue_full_through_openai_client(gw, aclient):
    async def one():
        return await aclient.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    results = await asyncio.gather(*(one() for _ in range(3)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 1, results
    assert refused[0].code == "queue_full"
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 2
    wait_idle(gw, "tiny")


async def test_queued_requests_complete_in_fifo_order(gw, http):
    done: list[str] = []

    async def send(tag: str) -> int:
        r = await http.post(f"{gw.url}/v1/chat/completions",
                            json={"model": "fifo", "messages": CHAT, "max_tokens": 1},
                            headers={"X-Sim-Delay-Ms": "250"})
        done.append(tag)
        return r.status_code

    async def status(key: str) -> int:
        r = await http.get(f"{gw.url}/gateway/status")
        return r.json()["models"]["fifo"][key]

    async def until(key: str, value: int) -> None:
        for _ in range(200):
            if await status(key) == value:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"fifo {key} never reached {value}")

    a = asyncio.create_task(send("a"))
    await until("in_flight", 1)
    b = asyncio.create_task(send("b"))
    await until("queue_depth", 1)
    c = asyncio.create_task(send("c"))
    await until("queue_depth", 2)
    assert await asyncio.wait_for(asyncio.gather(a, b, c), 10) == [200, 200, 200]
    assert done == ["a", "b", "c"]


# --- cancellation -----------------------------------------------------------------------------

async def test_client_disconnect_mid_stream_cancels_upstream(gw, sim, http):
    cancelled = sim_stats(sim)["cancelled_total"]
    body = {"model": SIM, "messages": CHAT, "max_tokens": 2000, "stream": True}  # ~4 s
    tokens = 0
    async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if '"content":"' in line and '"role"' not in line:
                tokens += 1
                if tokens == 2:
                    break
    # leaving the block closed the connection mid-stream
    wait_until(lambda: sim_stats(sim)["cancelled_total"] == cancelled + 1, 5,
               what="the simulator to see the cancellation")
    assert sim_stats(sim)["running"] == 0
    m = wait_idle(gw, SIM)
    assert m["in_flight"] == 0 and m["queue_depth"] == 0 and m["drift"] == 0
    assert gw.status()["totals"]["in_flight"] == 0


async def test_cancellation_storm_leaks_no_slot_or_connection(gw, sim):
    rng = random.Random(1234)
    sim_cancelled = sim_stats(sim)["cancelled_total"]
    body = {"model": "storm", "messages": CHAT, "max_tokens": 150, "stream": True}  # ~0.3 s

    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        async def consume():
            async with h.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_raw():
                    pass

        tasks = [asyncio.create_task(consume()) for _ in range(40)]
        for task in tasks:
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.8), task.cancel)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled >= 20, results  # most were cut off: queued, waiting or mid-stream
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results

    m = wait_idle(gw, "storm")
    assert m["drift"] == 0
    # the streams cut off mid-way were cancelled upstream too
    wait_until(lambda: sim_stats(sim)["running"] == 0, 5, what="the simulator to go idle")
    assert sim_stats(sim)["cancelled_total"] > sim_cancelled

    # every slot and pooled connection came back: max_concurrent requests run at once
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        started = time.monotonic()
        rs = await asyncio.gather(*(
            h.post(f"{gw.url}/v1/chat/completions", headers={"X-Sim-Delay-Ms": "500"},
                   json={"model": "storm", "messages": CHAT, "max_tokens": 1})
            for _ in range(4)))
        elapsed = time.monotonic() - started
    assert [r.status_code for r in rs] == [200] * 4
    assert elapsed < 1.5, f"4 requests took {elapsed:.2f}s: they did not run concurrently"

    wait_idle(gw, "storm")
    text = gw.metrics()
    assert metric_samples(text, "gateway_admission_drift", model="storm") == [0.0]
    assert metric_samples(text, "gateway_admission_anomalies_total", model="storm") == [0.0]
    wait_until(lambda: gw.metric("gateway_upstream_pool_in_use", model="storm") == 0, 5,
               what="the storm model's pool to drain")


# --- listing and status -----------------------------------------------------------------------

def test_v1_models_lists_configured_models_with_state(client, gw):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {SIM, EMBED, "alias", "dead", "tiny", "fifo", "storm", "lazy"}
    raw = httpx.get(f"{gw.url}/v1/models", trust_env=False).json()
    states = {m["id"]: m["state"] for m in raw["data"]}
    assert states[SIM] == "ready"  # static backends are ready from the start
    assert states["lazy"] == "stopped"  # process backends start on demand
    assert all(m["object"] == "model" for m in raw["data"])


def test_gateway_status_reports_every_model(gw, client):
    client.chat.completions.create(model="fifo", messages=CHAT, max_tokens=1)
    status = gw.status()
    keys = {"state", "queue_depth", "in_flight", "max_concurrent", "max_queue", "last_used",
            "backend"}
    for name, m in status["models"].items():
        assert keys <= set(m), name
    fifo = status["models"]["fifo"]
    assert (fifo["state"], fifo["backend"]) == ("ready", "static")
    assert (fifo["max_concurrent"], fifo["max_queue"]) == (1, 5)
    assert abs(fifo["last_used"] - time.time()) < 30
    assert fifo["urls"] == [status["models"][SIM]["urls"][0]]
    lazy = status["models"]["lazy"]
    assert (lazy["state"], lazy["backend"], lazy["last_used"]) == ("stopped", "process", None)
    assert (lazy["max_concurrent"], lazy["max_queue"]) == (8, 16)  # the global limits
    totals = status["totals"]
    assert totals["models"] == 8
    assert totals["running"] == 7
    assert {"queue_depth", "in_flight"} <= set(totals)

"""The vLLM simulator, tested as a real subprocess with httpx, raw sockets and the openai client.

The gateway's own tests lean on the simulator's exact behaviour (chunk counts, fault knobs,
queueing, cancellation accounting), so these pin it down.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import time

import httpx
import openai
import pytest
from helpers import free_port, start_simulator, wait_until
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from vllm_simulator import server as simulator
from vllm_simulator import text as simulator_text

MODEL = "sim-model"
CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hello there world"}]}


@pytest.fixture(scope="module")
def sim():
    """A fast simulator shared by the tests that only look at response shapes."""
    with start_simulator(MODEL, ttft_ms=5, itl_ms=1) as s:
        yield s


@pytest.fixture(scope="module")
def pooling_sim():
    """A simulator with vLLM's pooling runner: embeddings, no generation."""
    with start_simulator(MODEL, ttft_ms=5, runner="pooling") as s:
        yield s


@pytest.fixture
def slow_sim():
    """A fresh simulator with visible delays, so counters start at zero."""
    with start_simulator(MODEL, ttft_ms=100, itl_ms=50, max_num_seqs=4) as s:
        yield s


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


def start_sleepy(runner: str = "generate", **opts):
    """A simulator with ``--enable-sleep-mode``: start_simulator writes each option as
    ``--key value``, so the bare flag takes ``--runner=...`` as its "value"."""
    return start_simulator(MODEL, enable_sleep_mode=f"--runner={runner}", **opts)


def oai(s) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name} {labels} not in /metrics")


async def stats(http, s) -> dict:
    return (await http.get(f"{s.url}/sim/stats")).json()


async def wait_for_stats(http, s, timeout: float = 5.0, **want) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = await stats(http, s)
        if all(got[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


async def raw_post(port: int, path: str, body: dict, headers: dict | None = None):
    """POST over a bare socket; returns (head, HTTP chunks, saw terminating chunk)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
    head, chunks, complete = await reader.readuntil(b"\r\n\r\n"), [], False
    try:
        while size_line := await reader.readline():
            size = int(size_line.strip(), 16)
            if size == 0:
                complete = True
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
    except asyncio.IncompleteReadError:
        pass
    writer.close()
    return head, chunks, complete


async def test_health_and_models(sim, http):
    r = await http.get(f"{sim.url}/health")
    assert (r.status_code, r.content) == (200, b"")
    body = (await http.get(f"{sim.url}/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card | {"created": 0} == {"id": MODEL, "object": "model", "created": 0,
                                     "owned_by": "vllm", "root": MODEL, "parent": None,
                                     "max_model_len": 4096}
    async with oai(sim) as client:
        assert [m.id async for m in client.models.list()] == [MODEL]


async def test_chat_non_stream(sim):
    async with oai(sim) as client:
        r = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                                 max_tokens=5)
        assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
        assert r.model == MODEL
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == simulator_text.completion_text(5)
        assert len(r.choices[0].message.content.split()) == 5
        assert r.choices[0].finish_reason == "length"
        usage = r.usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 5, 10)
        # No limit: 16 tokens and a natural stop; max_completion_tokens wins over max_tokens.
        r = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (16, "stop")
        r = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                                 max_tokens=9, max_completion_tokens=3)
        assert r.usage.completion_tokens == 3


async def test_completion_non_stream(sim):
    async with oai(sim) as client:
        r = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=4)
        assert r.id.startswith("cmpl-") and r.object == "text_completion"
        assert r.choices[0].text == simulator_text.completion_text(4)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)
        r = await client.completions.create(model=MODEL, prompt="", max_tokens=1)
        assert r.usage.prompt_tokens == 1  # never below one


async def test_chat_stream_chunk_order(sim):
    """vLLM's order: role, content events (every 4th carrying two tokens), a final event
    with empty content and the finish_reason, the usage chunk, [DONE]."""
    n = 7
    async with oai(sim) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], max_tokens=n, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    role, content, final, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert simulator_text.event_sizes(n, 4) == [1, 1, 1, 2, 1, 1]
    assert len(chunks) == 1 + 6 + 1 + 1
    assert role.choices[0].delta.role == "assistant" and role.choices[0].delta.content == ""
    assert [len(c.choices[0].delta.content.split()) for c in content] == [1, 1, 1, 2, 1, 1]
    assert "".join(c.choices[0].delta.content for c in content) == \
        simulator_text.completion_text(n)
    assert [c.choices[0].finish_reason for c in content] == [None] * 6
    assert final.choices[0].delta.content == "" and final.choices[0].finish_reason == "length"
    assert usage.choices == []
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (5, n)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    # without a limit: 16 tokens, a natural stop, in the final event too
    async with oai(sim) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                                      stream=True)
        chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in chunks) == \
        simulator_text.completion_text(16)


async def test_completion_stream_without_usage(sim):
    async with oai(sim) as client:
        stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3,
                                                 stream=True)
        chunks = [c async for c in stream]
    assert [c.choices[0].text for c in chunks] == \
        [simulator_text.token_text(i) for i in range(3)] + [""]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    assert all(c.usage is None for c in chunks)


async def test_every_sse_event_is_its_own_http_chunk(sim):
    body = {**CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    head, chunks, complete = await raw_post(sim.port, "/v1/chat/completions", body)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert complete
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n\n") == 1
               for c in chunks)
    assert len(chunks) == 1 + 4 + 1 + 1 + 1  # role, 4 single-token events, finish, usage, [DONE]
    assert chunks[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("chat", [True, False])
async def test_stream_event_sequence_on_the_wire(sim, http, chat):
    """Raw SSE: content events never carry finish_reason; the finish event has empty
    content; the usage event (only with include_usage) comes after it, then [DONE]."""
    path, body = (("/v1/chat/completions", {**CHAT}) if chat else
                  ("/v1/completions", {"model": MODEL, "prompt": "one two"}))
    for include_usage in (True, False):
        req = {**body, "max_tokens": 6, "stream": True}
        if include_usage:
            req["stream_options"] = {"include_usage": True}
        r = await http.post(f"{sim.url}{path}", json=req)
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        objs = [json.loads(e[len("data: "):]) for e in events[:-1]]
        if include_usage:
            *objs, usage = objs
            assert usage["choices"] == [] and usage["usage"] == {
                "prompt_tokens": 5 if chat else 2, "completion_tokens": 6,
                "total_tokens": 11 if chat else 8}
        assert all("usage" not in o for o in objs)
        if chat:
            assert objs.pop(0)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        *content, final = [o["choices"][0] for o in objs]
        texts = [c["delta"]["content"] if chat else c["text"] for c in content]
        assert texts and all(texts) and "".join(texts) == simulator_text.completion_text(6)
        assert len(texts) == 5  # 6 tokens in 5 events, as vLLM was seen to send them
        assert all(c["finish_reason"] is None for c in content)
        assert final["finish_reason"] == "length"
        if chat:
            assert final["delta"] == {"content": ""}
        else:
            assert final["text"] == ""


async def test_merged_tokens_keep_usage_and_metrics_right(http):
    with start_simulator(MODEL, ttft_ms=0, itl_ms=0, merge_every=2) as s:
        body = {**CHAT, "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
        head, chunks, complete = await raw_post(s.port, "/v1/chat/completions", body)
        assert complete
        content = [json.loads(c[6:])["choices"][0]["delta"]["content"] for c in chunks[1:-3]]
        assert [len(t.split()) for t in content] == [1, 2, 1, 2, 1, 2]  # every 2nd: two
        assert "".join(content) == simulator_text.completion_text(9)
        assert json.loads(chunks[-2][6:])["usage"]["completion_tokens"] == 9
        text = (await http.get(f"{s.url}/metrics")).text
        assert metric(text, "vllm:generation_tokens_total", model_name=MODEL) == 9
    with start_simulator(MODEL, ttft_ms=0, itl_ms=0, merge_every=0) as s:
        head, chunks, complete = await raw_post(s.port, "/v1/completions",
                                                {"prompt": "x", "max_tokens": 9, "stream": True})
        assert complete and len(chunks) == 9 + 1 + 1  # one token per event, finish, [DONE]
    assert simulator_text.event_sizes(6, 4) == [1, 1, 1, 2, 1]
    assert simulator_text.event_sizes(1, 1) == [1]
    assert simulator_text.event_sizes(5, 1) == [2, 2, 1]
    assert sum(simulator_text.event_sizes(4096, 4)) == 4096


async def test_errors_look_like_vllm(sim, http):
    def error(r, status: int) -> dict:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["code"] == status and isinstance(err["code"], int)
        return err

    # vLLM 0.32's shapes: schema failures are "Bad Request" with the field as param
    err = error(await http.post(f"{sim.url}/v1/chat/completions", content=b"{not json",
                                headers={"content-type": "application/json"}), 400)
    assert err["type"] == "Bad Request" and err["param"] == "body.1"
    err = error(await http.post(f"{sim.url}/v1/chat/completions", json={"model": MODEL}), 400)
    assert (err["type"], err["param"]) == ("Bad Request", "body.messages")
    err = error(await http.post(f"{sim.url}/v1/completions", json=[1]), 400)
    assert (err["type"], err["param"]) == ("Bad Request", "body")
    err = error(await http.post(f"{sim.url}/v1/completions",
                                json={"prompt": "x", "stream_options": {"include_usage": True}}),
                400)
    assert (err["type"], err["param"]) == ("Bad Request", "stream_options")
    # a wrong model: vLLM's check_model answer
    err = error(await http.post(f"{sim.url}/v1/completions",
                                json={"model": "nope", "prompt": "x"}), 404)
    assert err == {"message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
                   "type": "NotFoundError", "param": "model", "code": 404}
    # errors raised while serving: the exception's type, with their param
    err = error(await http.post(f"{sim.url}/v1/chat/completions",
                                json={**CHAT, "max_tokens": 0}), 400)
    assert (err["type"], err["param"]) == ("BadRequestError", "max_tokens")
    assert err["message"] == "max_tokens must be at least 1, got 0."
    err = error(await http.post(f"{sim.url}/v1/chat/completions",
                                json={**CHAT, "max_completion_tokens": 5000}), 400)
    assert (err["type"], err["param"]) == ("BadRequestError", "max_completion_tokens")
    assert "cannot be greater than max_model_len=4096" in err["message"]
    err = error(await http.post(f"{sim.url}/v1/completions",
                                json={"prompt": "x " * 4096, "max_tokens": 1}), 400)
    assert (err["type"], err["param"]) == ("BadRequestError", "input_tokens")
    assert "maximum context length is 4096" in err["message"]
    # a limit the context cannot hold beside the prompt is clamped, as vLLM does
    r = await http.post(f"{sim.url}/v1/completions", json={"prompt": "x " * 4090,
                                                           "max_tokens": 100})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = await http.get(f"{sim.url}/v1/nothing-here")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    async with oai(sim) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=CHAT["messages"])


async def test_sim_status_and_delay(sim, http):
    before = (await stats(http, sim))["requests_total"]
    r = await http.post(f"{sim.url}/v1/chat/completions", json=CHAT,
                        headers={"X-Sim-Status": "503"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "ServiceUnavailableError"
    assert r.json()["error"]["code"] == 503
    async with oai(sim) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                                 extra_headers={"X-Sim-Status": "429"})
    r = await http.post(f"{sim.url}/v1/chat/completions", json=CHAT,
                        headers={"X-Sim-Status": "banana"})
    assert r.status_code == 400
    assert (await stats(http, sim))["requests_total"] == before + 3
    t0 = time.monotonic()
    r = await http.post(f"{sim.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                        headers={"X-Sim-Delay-Ms": "300", "X-Sim-Status": "500"})
    assert r.status_code == 500 and time.monotonic() - t0 >= 0.3


async def test_echo_headers_and_received_model(sim, http):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await http.post(f"{sim.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1},
                        headers={"X-Sim-Echo-Headers": "1", "traceparent": tp})
    body = r.json()
    assert body["received_model"] == MODEL
    assert body["received_headers"]["traceparent"] == tp
    r = await http.post(f"{sim.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1})
    assert "received_headers" not in r.json() and r.json()["received_model"] == MODEL


async def test_break_after_closes_without_done(sim, http):
    body = {**CHAT, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    head, chunks, complete = await raw_post(sim.port, "/v1/chat/completions", body,
                                            {"X-Sim-Break-After": "3"})
    assert head.startswith(b"HTTP/1.1 200")
    assert not complete
    assert len(chunks) == 1 + 3 and all(b"[DONE]" not in c for c in chunks)
    # httpx sees the same thing as a protocol error, after the events that did arrive.
    events = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", f"{sim.url}/v1/completions",
                               json={"prompt": "x", "max_tokens": 10, "stream": True},
                               headers={"X-Sim-Break-After": "2"}) as r:
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
    assert len(events) == 2
    got = await wait_for_stats(http, sim, running=0)
    assert got["running"] == 0


async def test_embeddings(pooling_sim, http):
    sim = pooling_sim
    async with oai(sim) as client:  # the openai client asks for base64 by default
        r = await client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == simulator_text.EMBEDDING_DIM for d in r.data)
    assert all(math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-5) for d in r.data)
    assert r.data[0].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens == 3
    floats = (await http.post(f"{sim.url}/v1/embeddings",
                              json={"model": MODEL, "input": "alpha beta"})).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    assert floats["data"][0]["embedding"] == pytest.approx(r.data[0].embedding, rel=1e-5)
    r = await http.post(f"{sim.url}/v1/embeddings", json={"model": MODEL, "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body.input"


async def test_routes_follow_the_runner(sim, pooling_sim, http):
    """vLLM registers routes by runner: a generating server has no /v1/embeddings, a
    pooling one no chat/completions; both answer FastAPI's 404 for the other's."""
    not_found = (404, {"detail": "Not Found"})
    r = await http.post(f"{sim.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert (r.status_code, r.json()) == not_found
    for path, body in (("/v1/chat/completions", CHAT),
                       ("/v1/completions", {"model": MODEL, "prompt": "x"})):
        r = await http.post(f"{pooling_sim.url}{path}", json=body)
        assert (r.status_code, r.json()) == not_found
    for s in (sim, pooling_sim):  # both runners: health, models, tokenize, metrics
        assert (await http.get(f"{s.url}/health")).status_code == 200
        assert (await http.get(f"{s.url}/v1/models")).json()["data"][0]["id"] == MODEL
        r = await http.post(f"{s.url}/tokenize", json={"model": MODEL, "prompt": "a b"})
        assert r.json()["count"] == 2
        assert (await http.get(f"{s.url}/metrics")).status_code == 200
    async with oai(pooling_sim) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])


async def test_tokenize(sim, http):
    r = await http.post(f"{sim.url}/tokenize", json={"model": MODEL, "prompt": "a b a"})
    body = r.json()
    assert body["count"] == 3 and body["max_model_len"] == 4096
    assert body["tokens"][0] == body["tokens"][2] != body["tokens"][1]


async def test_metrics_count_tokens(slow_sim, http):
    async with oai(slow_sim) as client:
        await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                             max_tokens=2)
    text = (await http.get(f"{slow_sim.url}/metrics")).text
    lbl = {"model_name": MODEL}
    assert metric(text, "vllm:prompt_tokens_total", **lbl) == 5
    assert metric(text, "vllm:generation_tokens_total", **lbl) == 2
    assert metric(text, "vllm:request_success_total", finished_reason="length", **lbl) == 1
    assert metric(text, "vllm:time_to_first_token_seconds_count", **lbl) == 1
    assert metric(text, "vllm:time_to_first_token_seconds_sum", **lbl) >= 0.1
    assert metric(text, "vllm:e2e_request_latency_seconds_sum", **lbl) >= 0.15 * 0.9  # timer slack
    assert metric(text, "vllm:num_requests_running", **lbl) == 0


async def test_ttft_and_itl_are_honoured(slow_sim, http):
    t0 = time.monotonic()
    arrivals = []
    async with http.stream("POST", f"{slow_sim.url}/v1/completions",
                           json={"prompt": "x", "max_tokens": 5, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.monotonic() - t0, json.loads(line[6:])))
    # 5 tokens: events of 1, 1, 1 and 2 tokens, then the finish event
    assert [len(e["choices"][0]["text"].split()) for _, e in arrivals] == [1, 1, 1, 2, 0]
    assert arrivals[0][0] >= 0.1  # ttft
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:-1])]
    assert all(g >= 0.05 * 0.9 for g in gaps[:2]), gaps  # itl, minus timer slack
    assert gaps[2] >= 2 * 0.05 * 0.9, gaps  # a merged event still waits for both tokens
    assert arrivals[-1][0] - arrivals[0][0] >= 4 * 0.05 * 0.9


async def test_max_num_seqs_queues_requests(http):
    with start_simulator(MODEL, ttft_ms=400, itl_ms=0, max_num_seqs=1) as s:
        async with oai(s) as client:
            t0 = time.monotonic()
            tasks = [asyncio.create_task(client.chat.completions.create(
                model=MODEL, messages=CHAT["messages"], max_tokens=1)) for _ in range(3)]
            waiting = running = kv = 0.0
            while time.monotonic() - t0 < 1.0 and waiting == 0:
                text = (await http.get(f"{s.url}/metrics")).text
                waiting = metric(text, "vllm:num_requests_waiting", model_name=MODEL)
                running = metric(text, "vllm:num_requests_running", model_name=MODEL)
                kv = metric(text, "vllm:kv_cache_usage_perc", model_name=MODEL)
                await asyncio.sleep(0.02)
            assert waiting > 0 and running == 1 and kv == 1.0
            # A queued stream still gets its response headers at once, as with vLLM.
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            payload = json.dumps({**CHAT, "max_tokens": 1, "stream": True}).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Length: %d"
                         b"\r\nContent-Type: application/json\r\n\r\n%b" % (len(payload), payload))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.gather(*tasks)
            assert time.monotonic() - t0 >= 3 * 0.4 * 0.9  # one at a time
            writer.close()
        got = await wait_for_stats(http, s, running=0, waiting=0)
        assert (got["running"], got["waiting"]) == (0, 0)


async def test_startup_s_refuses_connections_then_serves():
    """Like vLLM, nothing listens while starting: connection refused, not 503."""
    t0 = time.monotonic()
    with start_simulator(MODEL, startup_s=1.5, wait=False) as s:
        refused = 0
        first = None
        async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
            while first is None and time.monotonic() - t0 < 15:
                try:
                    first = await http.get(f"{s.url}/health")
                except httpx.ConnectError:
                    refused += 1
                    await asyncio.sleep(0.05)
            assert first is not None, s.log()
            took = time.monotonic() - t0
            assert refused > 10 and took >= 1.5, (refused, took)
            # the first answer is already the ready one (no 503 phase)
            assert first.status_code == 200, first
            assert (await http.get(f"{s.url}/v1/models")).status_code == 200
        # a bare socket sees ECONNREFUSED too, and the port is bound from the start
        with start_simulator(MODEL, startup_s=30, wait=False) as late:
            wait_until(lambda: "listening on" in late.log(), 10, what="the simulator to bind")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", late.port), timeout=2)
            with socket.socket() as other:
                with pytest.raises(OSError):  # the port is taken, though not listening
                    other.bind(("127.0.0.1", late.port))
            assert late.stop() == 0  # a signal while starting just ends it


def test_startup_on_a_busy_port_fails_at_once():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with start_simulator(MODEL, port=port, startup_s=30, wait=False) as s:
            t0 = time.monotonic()
            assert s.proc.wait(10) != 0
            assert time.monotonic() - t0 < 10 and "in use" in s.log(), s.log()


async def test_keep_alive_closes_idle_connections_after_5_s(sim):
    """uvicorn's (so vLLM's) keep-alive timeout: an idle connection is closed after 5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"keep-alive" in head.lower()
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        idle = time.monotonic() - t0
        assert 4.5 <= idle <= 7, idle
    finally:
        writer.close()


async def test_sleep_holds_requests_until_wake_up(http):
    with start_sleepy(ttft_ms=5, itl_ms=1) as s:
        def sleep_state(text: str) -> dict:
            return {st: metric(text, "vllm:engine_sleep_state", engine="0", model_name=MODEL,
                               sleep_state=st)
                    for st in ("awake", "weights_offloaded", "discard_all")}

        assert sleep_state((await http.get(f"{s.url}/metrics")).text) == \
            {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
        r = await http.post(f"{s.url}/sleep", params={"level": "1"})
        assert (r.status_code, r.json()) == (200, {"status": "sleeping", "level": 1})
        assert (await http.get(f"{s.url}/is_sleeping")).json() == {"is_sleeping": True}
        assert sleep_state((await http.get(f"{s.url}/metrics")).text) == \
            {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
        # asleep: health and models stay 200, generation is held (not refused)
        assert (await http.get(f"{s.url}/health")).status_code == 200
        assert (await http.get(f"{s.url}/v1/models")).status_code == 200
        held = asyncio.create_task(http.post(f"{s.url}/v1/chat/completions",
                                             json={**CHAT, "max_tokens": 3}))
        stream_body = {**CHAT, "max_tokens": 2, "stream": True}
        async with http.stream("POST", f"{s.url}/v1/chat/completions", json=stream_body) as sr:
            assert sr.status_code == 200  # a stream's headers still go out at once
            got = await wait_for_stats(http, s, waiting=2)
            assert (got["waiting"], got["running"], got["sleeping"]) == (2, 0, True)
            await asyncio.sleep(0.5)
            assert not held.done()
            text = (await http.get(f"{s.url}/metrics")).text
            assert metric(text, "vllm:num_requests_waiting", model_name=MODEL) == 2
            r = await http.post(f"{s.url}/wake_up")
            assert (r.status_code, r.json()) == (200, {"status": "awake", "tags": None})
            raw = await sr.aread()
        assert raw.endswith(b"data: [DONE]\n\n")
        r = await asyncio.wait_for(held, 5)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert (await http.get(f"{s.url}/is_sleeping")).json() == {"is_sleeping": False}
        got = await stats(http, s)
        assert (got["sleeps_total"], got["wakes_total"], got["waiting"]) == (1, 1, 0)
        # level 2, then a bad level: vLLM's 400
        await http.post(f"{s.url}/sleep", params={"level": "2"})
        assert sleep_state((await http.get(f"{s.url}/metrics")).text) == \
            {"awake": 0, "weights_offloaded": 0, "discard_all": 1}
        r = await http.post(f"{s.url}/sleep", params={"level": "3"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query.level"
        await http.post(f"{s.url}/wake_up")
        assert sleep_state((await http.get(f"{s.url}/metrics")).text)["awake"] == 1


async def test_sleep_holds_embeddings_and_a_held_client_can_leave(http):
    with start_sleepy(ttft_ms=5, runner="pooling") as s:
        await http.post(f"{s.url}/sleep")
        with pytest.raises(httpx.TimeoutException):  # held, and the client gives up
            await http.post(f"{s.url}/v1/embeddings", json={"model": MODEL, "input": "x"},
                            timeout=0.5)
        got = await wait_for_stats(http, s, cancelled_total=1, waiting=0)
        assert (got["cancelled_total"], got["waiting"]) == (1, 0)
        held = asyncio.create_task(http.post(f"{s.url}/v1/embeddings",
                                             json={"model": MODEL, "input": "x"}))
        await wait_for_stats(http, s, waiting=1)
        await http.post(f"{s.url}/wake_up")
        r = await asyncio.wait_for(held, 5)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8


async def test_client_disconnect_counts_cancelled(slow_sim, http):
    body = {**CHAT, "max_tokens": 100, "stream": True}
    async with http.stream("POST", f"{slow_sim.url}/v1/chat/completions", json=body) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += bool(line)
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    got = await wait_for_stats(http, slow_sim, cancelled_total=1, running=0)
    assert (got["cancelled_total"], got["running"]) == (1, 0)
    with pytest.raises(httpx.TimeoutException):  # non-stream: give up during generation
        await http.post(f"{slow_sim.url}/v1/chat/completions",
                        json={**CHAT, "max_tokens": 100}, timeout=0.3)
    got = await wait_for_stats(http, slow_sim, cancelled_total=2, running=0)
    assert (got["cancelled_total"], got["running"], got["waiting"]) == (2, 0, 0)
    text = (await http.get(f"{slow_sim.url}/metrics")).text
    assert metric(text, "vllm:request_success_total", finished_reason="abort",
                  model_name=MODEL) == 2


def test_sigterm_exits_cleanly():
    s = start_simulator(MODEL)
    try:
        t0 = time.monotonic()
        assert s.stop() == 0, s.log()
        assert time.monotonic() - t0 < 5
    finally:
        s.__exit__()


def test_cli_rejects_negative_values(capsys):
    parser = argparse.ArgumentParser(prog="sim")
    simulator.add_arguments(parser)
    args = parser.parse_args(["--port", "8000", "--served-model-name", "m", "--ttft-ms", "2.5"])
    assert (args.port, args.ttft_ms, args.itl_ms, args.max_num_seqs) == (8000, 2.5, 5.0, 256)
    assert (args.runner, args.merge_every, args.startup_s) == ("generate", 4, 0)
    for option, value in (("--ttft-ms", "-1"), ("--itl-ms", "-0.5"), ("--startup-s", "-3"),
                          ("--max-num-seqs", "-2"), ("--max-num-seqs", "0"), ("--port", "0"),
                          ("--merge-every", "-1"), ("--runner", "embed")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--port", "8000", "--served-model-name", "m", option, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert option in err and value in err, err


def test_build_app_names_are_unique():
    a, b = simulator.build_app("m"), simulator.build_app("m")
    assert a.name != b.name
    assert simulator.build_app("m", app_name="custom_sim").name == "custom_sim"


def test_free_port_is_bindable():
    assert 1024 <= free_port() <= 65535

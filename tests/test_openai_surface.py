"""The rest of the OpenAI surface, end to end through a real gateway process: model
lookup by id, aliases, the client's model name in every answer (buffered, passed
through, every SSE chunk), fallbacks, other vLLM paths, X-Request-ID and the access log.

Upstreams are simulator processes and, where the simulator cannot show it (other
paths, the ``"model": "x"`` spacing, a name split across two TCP writes), a tiny aiohttp
server in this process that echoes what it received.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web
from helpers import gateway_env, metric_samples, start_gateway, start_simulator, wait_until
from openai import OpenAI

from gateway.rename import ModelRenamer

SIM = "sim-s"  # the fast simulator's served name
SLOW = "slow-s"  # a simulator whose first token takes SLOW_TTFT_MS
SLOW_TTFT_MS = 1500
BUFFER_CAP = 4096  # limits.max_buffered_response_bytes: larger answers pass through
CHAT = [{"role": "user", "content": "hi there"}]
FAILING = [sys.executable, "-c", "import sys; sys.exit(3)", "{port}"]  # exits at once
HEX32 = re.compile(r"[0-9a-f]{32}")


class EchoServer:
    """An OpenAI-ish upstream that answers what it got: path, headers, body's model.

    Non-stream answers use json.dumps' default spacing (``"model": "x"``, as FastAPI
    writes it); ``"pad": N`` adds N bytes. Streams send two events and [DONE], the first
    one's ``"model"`` key split across two writes.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EchoServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/v1/models", lambda r: web.json_response({"data": []}))
        app.router.add_post("/{tail:.*}", self._echo)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"id": "e1", "object": "chat.completion.chunk", "mod')
            await asyncio.sleep(0.05)  # its own TCP segment: the name arrives split
            await resp.write(f'el": {json.dumps(model)}, "choices": []}}\n\n'.encode())
            await resp.write(f'data: {{"id": "e1", "model": {json.dumps(model)}, '
                             '"choices": []}\n\n'.encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        out = {"id": "e1", "object": "echo", "model": model, "path": request.path,
               "received_model": model,
               "received_headers": {k.lower(): v for k, v in request.headers.items()},
               "pad": "x" * int(body.get("pad", 0))}
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")


@pytest.fixture(scope="module")
def sim():
    with start_simulator(SIM, ttft_ms=2, itl_ms=1) as s:
        yield s


@pytest.fixture(scope="module")
def slow_sim():
    with start_simulator(SLOW, ttft_ms=SLOW_TTFT_MS, itl_ms=1) as s:
        yield s


@pytest.fixture(scope="module")
def echo():
    with EchoServer() as e:
        yield e


def surface_config(sim, slow_sim, echo, tmp: Path) -> dict:
    slow = {"backend": "static", "url": slow_sim.url, "served_model_name": SLOW,
            "max_concurrent": 1, "max_queue": 0}
    return {
        "limits": {"max_buffered_response_bytes": BUFFER_CAP},
        "upstream": {"retries": 0},
        "server_logs": {"dir": str(tmp / "server-logs")},
        "models": [
            {"name": "chat", "backend": "static", "url": sim.url, "served_model_name": SIM,
             "aliases": ["chat-alias", "org/chat@v1"]},
            {"name": SIM, "backend": "static", "url": sim.url, "aliases": ["sim-alias"]},
            {"name": "echo", "backend": "static", "url": echo.url,
             "served_model_name": "echo-up", "aliases": ["echo-alias"]},
            {"name": "broken", "backend": "process", "command": FAILING,
             "fallbacks": ["chat"]},
            {"name": "broken-b", "backend": "process", "command": FAILING,
             "fallbacks": ["broken"]},  # broken's own fallback (chat) must not be followed
            {"name": "tight", **slow, "fallbacks": ["chat"], "fallback_on": ["queue_full"]},
            {"name": "tight-strict", **slow, "fallbacks": ["chat"]},  # default: unavailable
        ],
    }


@pytest.fixture(scope="module")
def gw(sim, slow_sim, echo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surface")
    with start_gateway(surface_config(sim, slow_sim, echo, tmp), tmp) as g:
        yield g


@pytest.fixture(autouse=True)
def settles(request):
    """After each test that used the gateway, nothing is queued or in flight and no
    count drifted, for every model."""
    yield
    if "gw" not in request.fixturenames:
        return
    gw = request.getfixturevalue("gw")

    def idle():
        models = gw.status()["models"]
        return all(m["queue_depth"] == 0 and m["in_flight"] == 0 and m["drift"] == 0
                   for m in models.values())
    wait_until(idle, 10, what="every model idle with no drift")


@pytest.fixture
def client(gw):
    with OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


def post(gw, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, headers=headers, timeout=30, trust_env=False)


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": CHAT, "max_tokens": 3, **extra}


# --- GET /v1/models and /v1/models/{id} -------------------------------------------------------

def test_models_list_has_every_alias_as_its_own_id(client):
    by_id = {m.id: m for m in client.models.list().data}
    assert {"chat", "chat-alias", "org/chat@v1", SIM, "sim-alias", "echo"} <= set(by_id)
    alias = by_id["chat-alias"].model_dump()
    assert alias["alias_of"] == "chat" and alias["backend"] == "static"
    assert "alias_of" not in by_id["chat"].model_dump()


@pytest.mark.parametrize("model_id", ["chat", "org/chat@v1", "sim-alias"])
def test_retrieve_model_by_id_with_the_openai_client(client, model_id):
    model = client.models.retrieve(model_id)  # sends org%2Fchat@v1
    assert model.id == model_id and model.object == "model"
    assert isinstance(model.created, int) and model.owned_by == "vllm-gateway"
    extra = model.model_dump()
    assert extra["state"] == "ready" and extra["backend"] == "static"


def test_retrieve_model_with_a_raw_slash_in_the_path(gw):
    r = httpx.get(f"{gw.url}/v1/models/org/chat@v1", trust_env=False)
    assert r.status_code == 200 and r.json()["id"] == "org/chat@v1"
    assert r.json()["alias_of"] == "chat"


def test_retrieve_unknown_model_is_openai_404(client, gw):
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no/such-model")
    assert info.value.code == "model_not_found"
    r = httpx.get(f"{gw.url}/v1/models/nope", trust_env=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["type"] == "invalid_request_error"


# --- the client's model name in every answer ---------------------------------------------------

@pytest.mark.parametrize("asked", ["chat", "chat-alias", "org/chat@v1", "sim-alias"])
def test_buffered_answer_names_the_model_asked_for(client, asked):
    resp = client.chat.completions.create(model=asked, messages=CHAT, max_tokens=3)
    assert resp.model == asked
    assert resp.model_dump()["received_model"] == SIM  # what the model server was sent


@pytest.mark.parametrize("asked", ["chat", "chat-alias", "sim-alias"])
def test_every_sse_chunk_names_the_model_asked_for(client, asked):
    chunks = list(client.chat.completions.create(
        model=asked, messages=CHAT, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert len(chunks) >= 12
    assert {c.model for c in chunks} == {asked}
    assert chunks[-1].usage is not None  # the usage chunk is renamed and still counted


def test_completions_stream_names_the_model_asked_for(client):
    chunks = list(client.completions.create(model="chat-alias", prompt="a b c", max_tokens=8,
                                            stream=True))
    assert chunks and {c.model for c in chunks} == {"chat-alias"}


def test_model_named_as_served_needs_no_rename(client):
    resp = client.chat.completions.create(model=SIM, messages=CHAT, max_tokens=2)
    assert resp.model == SIM


def test_spaced_model_field_is_renamed_and_length_recomputed(gw):
    r = post(gw, "/v1/chat/completions", chat_body("echo-alias"))
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    assert b'"model": "echo-alias"' in r.content and b"echo-up" not in r.content.split(
        b'"received_model"')[0]
    assert r.json()["received_model"] == "echo-up"


def test_stream_with_the_name_split_across_writes_is_renamed(gw):
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", trust_env=False, timeout=30,
                      json=chat_body("echo", stream=True)) as r:
        raw = r.read()
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    models = [json.loads(e[len("data: "):])["model"] for e in events[:-1]]
    assert models == ["echo", "echo"]


def test_large_pass_through_answer_is_renamed_and_sent_chunked(gw):
    r = post(gw, "/v1/chat/completions", chat_body("echo-alias", pad=BUFFER_CAP * 4))
    assert r.status_code == 200
    assert "content-length" not in r.headers  # the length may change: chunked instead
    out = r.json()
    assert out["model"] == "echo-alias" and len(out["pad"]) == BUFFER_CAP * 4


def test_renamer_is_exact_however_the_body_is_split():
    served, shown = "org/served-model", "alias"
    body = b"".join(f'data: {{"id":"{i}","model":"{served}","x":"\\"model\\":\\"{served}\\""}}\n\n'
                    f'{{"model": "{served}"}}'.encode() for i in range(30))
    expected = ModelRenamer(served, shown).whole(body)
    assert expected.count(b'"alias"') == 60 and b'"model":"org' not in expected
    assert b'\\"model\\":\\"org/served-model\\"' in expected  # a string value is left alone
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 40)))
        renamer = ModelRenamer(served, shown)
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        assert b"".join(renamer.feed(p) for p in pieces) + renamer.flush() == expected


def test_renamer_never_holds_back_a_complete_event():
    renamer = ModelRenamer("served", "shown")
    event = b'data: {"model":"served","choices":[]}\n\n'
    assert renamer.feed(event) == b'data: {"model":"shown","choices":[]}\n\n'


# --- other vLLM paths --------------------------------------------------------------------------

def test_responses_path_reaches_the_simulator(gw, sim):
    before = httpx.get(f"{sim.url}/sim/stats", trust_env=False).json()["requests_total"]
    r = post(gw, "/v1/responses", {"model": "chat", "input": "hi"})
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}  # vLLM's own 404
    assert r.headers["x-gateway-model"] == "chat"
    after = httpx.get(f"{sim.url}/sim/stats", trust_env=False).json()["requests_total"]
    assert after == before + 1


def test_responses_path_is_forwarded_by_model(gw):
    r = post(gw, "/v1/responses", {"model": "echo-alias", "input": "hi"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["path"] == "/v1/responses" and out["received_model"] == "echo-up"
    assert out["model"] == "echo-alias"


# --- fallbacks ---------------------------------------------------------------------------------

def test_unavailable_model_falls_back(gw):
    before = gw.metric("gateway_fallbacks_total", model="broken", fallback="chat")
    for _ in range(2):  # the failed start, then its backoff: both fall back
        r = post(gw, "/v1/chat/completions", chat_body("broken"), **{"X-Sim-Echo-Headers": "1"})
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-model"] == "chat"
        assert r.json()["received_model"] == SIM  # rewritten for the fallback's served name
        assert r.json()["model"] == "chat"
    assert gw.metric("gateway_fallbacks_total", model="broken", fallback="chat") == before + 2
    assert gw.status()["models"]["broken"]["state"] in ("failed", "stopped")


def test_fallback_stream_names_the_fallback(client):
    chunks = list(client.chat.completions.create(model="broken", messages=CHAT, max_tokens=4,
                                                 stream=True))
    assert chunks and {c.model for c in chunks} == {"chat"}


def test_fallbacks_own_fallbacks_are_not_followed(gw):
    r = post(gw, "/v1/chat/completions", chat_body("broken-b"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert r.headers["x-gateway-model"] == "broken-b"
    assert "broken-b" in r.json()["error"]["message"]


def test_fallback_series_are_born_at_zero(gw):
    text = gw.metrics()
    assert metric_samples(text, "gateway_fallbacks_total", model="tight-strict",
                          fallback="chat") == [0.0]
    assert metric_samples(text, "gateway_fallbacks_total", model="broken-b", fallback="broken")


async def _while_slot_held(gw, model: str, second: dict) -> tuple[httpx.Response, httpx.Response]:
    """Hold ``model``'s only slot with one slow request, send ``second`` meanwhile."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, trust_env=False) as http:
        first = asyncio.create_task(http.post("/v1/chat/completions", json=chat_body(model)))
        await asyncio.to_thread(wait_until, lambda: gw.status()["models"][model]["in_flight"],
                                10, what=f"{model} busy")
        other = await http.post("/v1/chat/completions", json=second,
                                headers={"X-Request-ID": "q-1"})
        return await first, other


async def test_queue_full_falls_back_when_configured(gw):
    before = gw.metric("gateway_fallbacks_total", model="tight", fallback="chat")
    first, other = await _while_slot_held(gw, "tight", chat_body("tight"))
    assert first.status_code == 200 and first.headers["x-gateway-model"] == "tight"
    assert other.status_code == 200, other.text
    assert other.headers["x-gateway-model"] == "chat" and other.json()["model"] == "chat"
    assert gw.metric("gateway_fallbacks_total", model="tight", fallback="chat") == before + 1


async def test_queue_full_without_fallback_on_is_429(gw):
    first, other = await _while_slot_held(gw, "tight-strict", chat_body("tight-strict"))
    assert first.status_code == 200
    assert other.status_code == 429 and other.json()["error"]["code"] == "queue_full"
    assert other.headers["x-gateway-model"] == "tight-strict"
    assert other.headers["x-request-id"] == "q-1" and other.headers["retry-after"]


def test_every_proxied_answer_names_its_model(gw):
    r = post(gw, "/v1/chat/completions", chat_body("chat-alias", stream=True))
    assert r.headers["x-gateway-model"] == "chat"
    r = post(gw, "/v1/chat/completions", chat_body(SIM))
    assert r.headers["x-gateway-model"] == SIM


# --- X-Request-ID and the access log -----------------------------------------------------------

@pytest.mark.parametrize("sent,kept", [("req-1.a_B", True), ("a" * 128, True),
                                       ("a" * 129, False), ("has space", False),
                                       ("semi;colon", False), (None, False)])
def test_request_id_is_honoured_or_replaced_and_sent_upstream(gw, sent, kept):
    headers = {"X-Sim-Echo-Headers": "1", **({"X-Request-ID": sent} if sent else {})}
    r = post(gw, "/v1/chat/completions", chat_body("chat"), **headers)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid == sent if kept else HEX32.fullmatch(rid)
    assert r.json()["received_headers"]["x-request-id"] == rid


def test_request_id_on_streams_and_the_gateways_own_errors(gw):
    r = post(gw, "/v1/chat/completions", chat_body("chat", stream=True), **{"X-Request-ID": "s1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "s1"
    for body, status in ((chat_body("no-such-model"), 404), ({"messages": CHAT}, 400)):
        r = post(gw, "/v1/chat/completions", body, **{"X-Request-ID": "e1"})
        assert r.status_code == status and r.headers["x-request-id"] == "e1"
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b"{not json", trust_env=False)
    assert r.status_code == 400 and HEX32.fullmatch(r.headers["x-request-id"])
    r = httpx.get(f"{gw.url}/v1/models/nope", headers={"X-Request-ID": "m1"}, trust_env=False)
    assert r.headers["x-request-id"] == "m1"


def test_access_log_line_per_request(gw):
    post(gw, "/v1/chat/completions", chat_body("chat-alias"), **{"X-Request-ID": "acc-1"})
    post(gw, "/v1/chat/completions", chat_body("ghost"), **{"X-Request-ID": "acc-2"})

    def lines():
        found = [ln for ln in gw.log_text().splitlines() if "vllm_gateway.access" in ln
                 and "request_id=acc-" in ln]
        return found if len(found) == 2 else None
    ok, missing = wait_until(lines, 5, what="two access lines")
    assert "POST /v1/chat/completions 200 model=chat key=anonymous duration_ms=" in ok
    assert "queue_ms=" in ok and ok.endswith("request_id=acc-1")
    assert "POST /v1/chat/completions 404 model=- " in missing


def test_log_lines_about_a_request_carry_its_id(gw):
    post(gw, "/v1/chat/completions", chat_body("broken"), **{"X-Request-ID": "fb-7"})
    text = wait_until(lambda: "trying fallback chat request_id=fb-7" in gw.log_text()
                      and gw.log_text(), 5, what="fallback log line")
    assert "vllm_gateway.proxy: model broken" in text


def test_json_log_format(sim, tmp_path):
    config = {"logging": {"format": "json"}, "upstream": {"retries": 0},
              "models": [{"name": "chat", "backend": "static", "url": sim.url,
                          "served_model_name": SIM},
                         {"name": "dead", "backend": "static", "url": "http://127.0.0.1:9"}]}
    with start_gateway(config, tmp_path) as g:
        assert post(g, "/v1/chat/completions", chat_body("chat"),
                    **{"X-Request-ID": "j-1"}).status_code == 200
        assert post(g, "/v1/chat/completions", chat_body("dead"),
                    **{"X-Request-ID": "j-2"}).status_code == 503
        wait_until(lambda: "j-2" in g.log_text(), 5, what="the dead model's log lines")
        assert all(m["queue_depth"] == 0 and m["in_flight"] == 0 and m["drift"] == 0
                   for m in g.status()["models"].values())
    records = [json.loads(line) for line in g.log_text().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("sanic") for r in records)  # Sanic's lines too
    access = [r for r in records if r["logger"] == "vllm_gateway.access"]
    assert [(r["request_id"], r["status"], r["model"]) for r in access] == [
        ("j-1", 200, "chat"), ("j-2", 503, "dead")]
    assert access[0]["path"] == "/v1/chat/completions" and access[0]["method"] == "POST"
    assert access[0]["duration_ms"] >= 0 and access[0]["queue_ms"] >= 0
    upstream = [r for r in records if r["logger"] == "vllm_gateway.forward"]
    assert upstream and all(r["request_id"] == "j-2" for r in upstream)


async def test_request_id_is_on_the_trace_span(sim):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    try:
        from tests.inproc import running_gateway
    except ImportError:
        from inproc import running_gateway
    exporter = InMemorySpanExporter()
    config = {"models": [{"name": SIM, "backend": "static", "url": sim.url}]}
    async with running_gateway(config, span_exporter=exporter) as (url, _app):
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{url}/v1/chat/completions", json=chat_body(SIM),
                                headers={"X-Request-ID": "trace-1"})
    assert r.status_code == 200
    [root] = [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]
    assert root.attributes["gateway.request_id"] == "trace-1"


# --- configuration -----------------------------------------------------------------------------

def check_config(tmp_path: Path, models: list[dict]) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"models": models}))
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                          env=gateway_env(), capture_output=True, text=True, timeout=60)


def static(name: str, **extra) -> dict:
    return {"name": name, "backend": "static", "url": "http://127.0.0.1:9", **extra}


@pytest.mark.parametrize("models,fragments", [
    ([static("y", aliases=["x"]), static("z", aliases=["x"])],
     ("z", "aliases: 'x' is already the name or alias of model 'y'")),
    ([static("y"), static("z", aliases=["y"])],
     ("z", "aliases: 'y' is already the name or alias of model 'y'")),
    ([static("y", aliases=["bad alias"])], ("aliases.0", "String should match pattern")),
    ([static("y", fallbacks=["nope"])], ("fallbacks: 'nope' is not a configured model",)),
    ([static("y", fallbacks=["y"])], ("fallbacks: 'y': a model cannot fall back to itself",)),
    ([static("y", fallback_on=["sometimes"])], ("fallback_on.0", "Input should be")),
])
def test_bad_alias_or_fallback_is_one_config_line(tmp_path, models, fragments):
    result = check_config(tmp_path, models)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    problems = [ln for ln in result.stderr.splitlines()  # log records left out
                if ln.strip() and not (ln[:4].isdigit() and " INFO " in ln[:40])]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(str(tmp_path / "config.yaml") + ": models")
    assert all(f in problems[0] for f in fragments), problems[0]


def test_aliases_and_fallbacks_in_the_effective_config(tmp_path):
    result = check_config(tmp_path, [static("y", aliases=["a/b"], fallbacks=["z"]), static("z")])
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["models"][0]["aliases"] == ["a/b"]
    assert effective["models"][0]["fallback_on"] == ["unavailable"]
    assert effective["logging"] == {"format": "text", "access_log": True}



async def test_a_fallback_gets_the_body_for_its_own_upstream_name(sim, slow_sim, echo, tmp_path):
    """The first model rewrote the body for its served name; the fallback's served name is
    what the client sent, so it needs no rewrite of its own, and must not get the first
    model's."""
    config = {"upstream": {"retries": 0}, "models": [
        {"name": "hold", "backend": "static", "url": slow_sim.url, "served_model_name": SLOW,
         "max_concurrent": 1, "max_queue": 0, "fallbacks": ["exact"],
         "fallback_on": ["queue_full"]},
        {"name": "exact", "backend": "static", "url": echo.url, "served_model_name": "hold"},
    ]}
    with start_gateway(config, tmp_path) as g:
        first, other = await _while_slot_held(g, "hold", chat_body("hold"))
    assert first.status_code == 200 and first.headers["x-gateway-model"] == "hold"
    assert other.status_code == 200, other.text
    assert other.headers["x-gateway-model"] == "exact"
    assert other.json()["received_model"] == "hold"  # not SLOW, the first model's name

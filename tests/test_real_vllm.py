"""Conformance: the gateway in front of real vLLM (its CPU build), not the simulator.

``make test`` builds ``.venv-vllm`` (scripts/vllm-venv.sh) and a tiny random-weight
Llama with a locally trained tokenizer (scripts/build_tiny_models.py, cached in
``.cache/tiny-models``); ``make test-vllm`` runs only this file. Servers are shared per
module and started with ``--enforce-eager``: five vLLM starts in all (two overlapped), through
the process, static and docker backends. Without the venv the tests skip with the
reason, and fail when VLLM_GATEWAY_REQUIRE_TOOLS=1 (CI).

Output is random text; token counts are real. vLLM on 2 cores sometimes sends a
stream's first chunk only after generating everything, so nothing here is timed off
the first chunk.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers import REPO, metric_samples, sim_command, start_gateway, wait_until
from openai import AsyncOpenAI, OpenAI
from tools import REQUIRE_ENV

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(300)]

VLLM_VENV = REPO / ".venv-vllm"
VLLM = VLLM_VENV / "bin" / "vllm"
MODEL_DIR = REPO / ".cache" / "tiny-models" / "tiny-llama"
START_TIMEOUT_S = 180
CHAT = [{"role": "user", "content": "hi"}]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def vllm_command(*extra: str) -> list[str]:
    return [str(VLLM), "serve", str(MODEL_DIR), "--port", "{port}", "--host", "127.0.0.1",
            "--served-model-name", "{name}", "--enforce-eager", "--max-model-len", "512",
            "--max-num-seqs", "8", *extra]


@pytest.fixture(scope="module", autouse=True)
def vllm_installed():
    if VLLM.exists() and (MODEL_DIR / "config.json").exists():
        return
    reason = (f"real vLLM not installed ({VLLM} and {MODEL_DIR}: run `make vllm`, which "
              "`make test` does)")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; required because {REQUIRE_ENV}=1")
    pytest.skip(reason)


def base_config(tmp_path: Path, models: list[dict], **top) -> dict:
    upstream = {"start_timeout_s": START_TIMEOUT_S, "health_interval_s": 0.5, "retries": 1,
                "backoff_s": 0.2, "timeout_s": 120}
    upstream.update(top.pop("upstream", {}))
    return {"upstream": upstream, "server_logs": {"dir": str(tmp_path / "logs")},
            "gpu": {"footprints_file": str(tmp_path / "footprints.json")},
            "plugins": {"load_entrypoints": False}, "models": models, **top}


def vllm_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text


def vllm_counter(url: str, name: str) -> float:
    return sum(metric_samples(vllm_metrics(url), name))


def model_url(gw, name: str) -> str:
    urls = gw.status()["models"][name]["urls"]
    assert len(urls) == 1, urls
    return urls[0]


def owned_pids(gw_pid: int, model: str) -> list[int]:
    """Processes carrying this gateway's owner marker for ``model`` (guard, vLLM, its
    EngineCore and Worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"VLLM_GATEWAY_MODEL={model}".encode() in env
                and any(e.startswith(f"VLLM_GATEWAY_OWNER={gw_pid}:".encode()) for e in env)):
            found.append(int(entry.name))
    return found


def api_server_pid(pids: list[int]) -> int:
    """vLLM's API server among a model's processes: the guard's own child."""
    guard = next(p for p in pids if b"process_guard" in Path(f"/proc/{p}/cmdline").read_bytes())
    for p in pids:
        stat = Path(f"/proc/{p}/stat").read_text()
        if int(stat.rsplit(")", 1)[1].split()[1]) == guard:
            return p
    raise AssertionError(f"no child of the guard {guard} among {pids}")


def settled(gw, name: str) -> dict:
    def ok() -> bool:
        m = gw.status()["models"][name]
        return m["queue_depth"] == 0 and m["in_flight"] == 0 and m["drift"] == 0
    wait_until(ok, 15, what=f"{name}'s admission to settle")
    return gw.status()["models"][name]


# --- the process backend: one generating server for most tests ---------------------------

@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-vllm")
    cfg = base_config(tmp, [
        {"name": "gen", "backend": "process", "command": vllm_command(), "env": VLLM_ENV,
         "max_concurrent": 2, "max_queue": 2},
        {"name": "emb", "backend": "process", "env": VLLM_ENV, "idle_timeout_s": 6,
         "command": vllm_command("--runner", "pooling")},
    ])
    with start_gateway(cfg, tmp) as g:
        yield g


@pytest.fixture(scope="module")
def client(gw):
    with OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def emb_started(gw):
    """Cold-starts ``emb`` in a thread, begun before ``gen``'s cold start so that the two
    vLLM starts (each mostly one core's work) overlap on two cores. Gives the answer and
    the model's processes while it was up; it may have stopped for idleness since."""
    def embed() -> tuple[object, list[int]]:
        with OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=240) as c:
            r = c.embeddings.create(model="emb", input=["hello", "world wide"])
        return r, owned_pids(gw.proc.pid, "emb")
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(embed)


@pytest.fixture(scope="module")
def gen_url(gw, client, emb_started):
    """Cold-starts ``gen`` through the process backend (the first test to ask)."""
    t0 = time.monotonic()
    r = client.chat.completions.create(model="gen", messages=CHAT, max_tokens=3)
    took = time.monotonic() - t0
    print(f"\nvLLM cold start through the process backend: {took:.1f}s", file=sys.stderr)
    assert r.choices[0].message.role == "assistant"
    assert gw.status()["models"]["gen"]["state"] == "ready"
    assert gw.metric("gateway_backend_starts_total", model="gen", result="success") == 1
    return model_url(gw, "gen")


def test_chat_and_completions_plain_and_streamed(gw, client, gen_url):
    r = client.chat.completions.create(model="gen", messages=CHAT, max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "length"
    c = client.completions.create(model="gen", prompt="one two", max_tokens=3)
    assert c.usage.completion_tokens == 3 and isinstance(c.choices[0].text, str)
    chunks = list(client.chat.completions.create(
        model="gen", messages=CHAT, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].choices == []  # the usage chunk comes last, on its own
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    text_chunks = list(client.completions.create(model="gen", prompt="one", max_tokens=3,
                                                 stream=True))
    assert text_chunks and all(ch.choices for ch in text_chunks)
    assert settled(gw, "gen")["drift"] == 0


def test_tokenize_and_vllm_errors_pass_through(gw, gen_url):
    r = httpx.post(f"{gw.url}/tokenize", json={"model": "gen", "prompt": "hello world"},
                   trust_env=False, timeout=30)
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0
    direct = httpx.post(f"{gen_url}/v1/chat/completions", json={"model": "gen", "messages": "x"},
                        trust_env=False, timeout=30)
    via = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gen", "messages": "x"},
                     trust_env=False, timeout=30)
    assert via.status_code == direct.status_code == 400
    assert via.json() == direct.json()  # vLLM's own body, unchanged
    assert via.json()["error"]["type"] == "Bad Request"


def test_burst_above_the_queue_gets_only_200s_and_clean_429s(gw, gen_url):
    async def burst():
        async with httpx.AsyncClient(timeout=120, trust_env=False) as h:
            return await asyncio.gather(*(
                h.post(f"{gw.url}/v1/chat/completions",
                       json={"model": "gen", "messages": CHAT, "max_tokens": 16})
                for _ in range(12)))
    results = asyncio.run(burst())
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 429} and codes.count(200) >= 4, codes
    for r in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
    settled(gw, "gen")


def test_tokens_counted_equal_vllms_own_counters(gw, client, gen_url):
    before_p = vllm_counter(gen_url, "vllm:prompt_tokens_total")
    before_g = vllm_counter(gen_url, "vllm:generation_tokens_total")
    gin = gw.metric("gateway_tokens_total", model="gen", type="input")
    gout = gw.metric("gateway_tokens_total", model="gen", type="output")
    for i in range(3):
        client.chat.completions.create(model="gen", messages=CHAT, max_tokens=3 + i)
        list(client.chat.completions.create(model="gen", messages=CHAT, max_tokens=4,
                                            stream=True, stream_options={"include_usage": True}))
        client.completions.create(model="gen", prompt="a b c", max_tokens=2)
    settled(gw, "gen")
    d_p = vllm_counter(gen_url, "vllm:prompt_tokens_total") - before_p
    d_g = vllm_counter(gen_url, "vllm:generation_tokens_total") - before_g
    assert gw.metric("gateway_tokens_total", model="gen", type="input") - gin == d_p > 0
    assert gw.metric("gateway_tokens_total", model="gen", type="output") - gout == d_g > 0


def test_streams_that_reached_done_are_counted_as_200(gw, gen_url):
    """The openai client closes the connection right after [DONE]: still a 200, with
    its usage counted (vLLM defect 2)."""
    ok = gw.metric("gateway_requests_total", model="gen", code="200")
    closed = gw.metric("gateway_requests_total", model="gen", code="499")
    out = gw.metric("gateway_tokens_total", model="gen", type="output")

    async def streams():
        async with AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0,
                               timeout=120) as c:
            async def one():
                s = await c.chat.completions.create(model="gen", messages=CHAT, max_tokens=3,
                                                    stream=True,
                                                    stream_options={"include_usage": True})
                async for _ in s:
                    pass
            for _ in range(4):
                await asyncio.gather(one(), one())
    asyncio.run(streams())
    settled(gw, "gen")
    assert gw.metric("gateway_requests_total", model="gen", code="200") - ok == 8
    assert gw.metric("gateway_requests_total", model="gen", code="499") == closed
    assert gw.metric("gateway_tokens_total", model="gen", type="output") - out == 24


def test_client_disconnect_mid_stream_frees_slot_connection_and_sequence(gw, gen_url):
    with httpx.Client(timeout=120, trust_env=False) as h:
        with h.stream("POST", f"{gw.url}/v1/chat/completions",
                      json={"model": "gen", "messages": CHAT, "max_tokens": 480,
                            "min_tokens": 480, "stream": True}) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                break  # one chunk, then hang up
    m = settled(gw, "gen")
    assert m["in_flight"] == 0
    wait_until(lambda: gw.metric("gateway_upstream_pool_in_use", model="gen") == 0, 15,
               what="the upstream connection to be released")
    # vLLM aborts a dropped stream, or (seen on 2 cores) finishes it: either way it ends.
    wait_until(lambda: vllm_counter(gen_url, "vllm:num_requests_running") == 0, 90,
               what="vLLM's num_requests_running back to 0")


def test_dashboards_vllm_names_exist_in_real_metrics(gen_url):
    import re

    text = " ".join(p.read_text() for p in (REPO / "dashboards").rglob("*")
                    if p.suffix in (".json", ".yml", ".py"))
    used = set(re.findall(r"vllm:[a-z_]+", text))
    assert used, "the dashboards use no vllm: series?"
    real = vllm_metrics(gen_url)
    families = set(re.findall(r"^# TYPE (vllm:[a-z_]+)", real, re.M))
    names = families | {f + s for f in families for s in ("_total", "_bucket", "_sum", "_count")}
    missing = sorted(n for n in used if n not in names)
    assert not missing, f"dashboard series not exported by vLLM: {missing}"


def test_read_timeout_is_never_resent(gw, gen_url, tmp_path):
    """vLLM defect 1, through the static backend: a 504 after one delivery, not three."""
    cfg = base_config(tmp_path, [
        {"name": "gen", "backend": "static", "url": gen_url},
        {"name": "wrong", "backend": "static", "url": gen_url, "served_model_name": "nope"}],
        upstream={"timeout_s": 0.3, "retries": 2})
    with start_gateway(cfg, tmp_path) as sgw:
        prompt = "seven words make a prompt of tokens"
        ref = httpx.post(f"{gen_url}/v1/completions", trust_env=False, timeout=60,
                         json={"model": "gen", "prompt": prompt, "max_tokens": 1})
        prompt_tokens = ref.json()["usage"]["prompt_tokens"]
        settled(gw, "gen")
        wait_until(lambda: vllm_counter(gen_url, "vllm:num_requests_running") == 0, 60,
                   what="vLLM idle")
        before = vllm_counter(gen_url, "vllm:prompt_tokens_total")
        r = httpx.post(f"{sgw.url}/v1/completions", trust_env=False, timeout=60,
                       json={"model": "gen", "prompt": prompt, "max_tokens": 480,
                             "min_tokens": 480})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        time.sleep(2)  # a re-send (the old behaviour) would have arrived by now
        wait_until(lambda: vllm_counter(gen_url, "vllm:num_requests_running") == 0, 90,
                   what="vLLM idle again")
        # vLLM prefilled the prompt once: one delivery (three with the old retry policy)
        assert vllm_counter(gen_url, "vllm:prompt_tokens_total") - before == prompt_tokens
        assert sgw.metric("gateway_upstream_retries_total", model="gen") == 0
        # vLLM's own 404 (a model name it does not serve) passes through unchanged
        nf = httpx.post(f"{sgw.url}/v1/chat/completions", trust_env=False, timeout=30,
                        json={"model": "wrong", "messages": CHAT, "max_tokens": 1})
        assert nf.status_code == 404 and nf.json()["error"]["type"] == "NotFoundError"
        assert "Valid aliases" in nf.json()["error"]["message"]


def test_vllm_killed_mid_stream_ends_with_an_error_event_and_restarts(gw, gen_url):
    """The stream ends with an error event, and the request sent right after (before the
    health check can notice) gets a restart, not a 503 (vLLM defect 3, with retries: 1)."""
    old = owned_pids(gw.proc.pid, "gen")
    server = api_server_pid(old)
    body = b""
    with httpx.Client(timeout=120, trust_env=False) as h:
        with h.stream("POST", f"{gw.url}/v1/chat/completions",
                      json={"model": "gen", "messages": CHAT, "max_tokens": 480,
                            "min_tokens": 480, "stream": True}) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                if not body:
                    os.kill(server, signal.SIGKILL)
                body += chunk
    assert b'"error"' in body.split(b"data: ")[-1]  # the last event is an error
    assert b"[DONE]" not in body
    r = httpx.post(f"{gw.url}/v1/chat/completions", trust_env=False, timeout=240,
                   json={"model": "gen", "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert gw.metric("gateway_backend_starts_total", model="gen", result="success") == 2
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in old), 20,
               what="every process of the killed server to be gone")


def test_embeddings_on_the_pooling_model_then_idle_stop(gw, emb_started):
    r, pids = emb_started.result(timeout=240)
    assert len(r.data) == 2 and len(r.data[0].embedding) > 0
    assert r.usage.prompt_tokens > 0
    assert pids
    wait_until(lambda: gw.status()["models"]["emb"]["state"] == "stopped", 30,
               what="the idle pooling model to stop")
    assert gw.metric("gateway_backend_stops_total", model="emb", reason="idle") == 1
    wait_until(lambda: not owned_pids(gw.proc.pid, "emb"), 20, what="its processes to exit")


# --- sleep mode: vLLM's own /sleep, /wake_up, /is_sleeping --------------------------------

def test_sleep_and_wake_through_vllms_endpoints(tmp_path):
    """On CPU, --enable-sleep-mode --no-enable-sleep-mode serves the dev endpoints (the
    HTTP exchange is real; nothing is freed). A second model that does not fit puts it
    to sleep; asking for it again wakes it."""
    sleepy = {"name": "sleepy", "backend": "process", "sleep_mode": True, "vram_mib": 600,
              "env": VLLM_ENV, "command": vllm_command("--enable-sleep-mode",
                                                       "--no-enable-sleep-mode")}
    other = {"name": "other", "backend": "process", "vram_mib": 600, "command": sim_command()}
    cfg = base_config(tmp_path, [sleepy, other],
                      gpu={"total_vram_mib": 1000, "sleep_residual_mib": 100,
                           "min_residency_s": 0,
                           "footprints_file": str(tmp_path / "footprints.json")})
    with start_gateway(cfg, tmp_path) as g:
        chat = {"messages": CHAT, "max_tokens": 2}
        r = httpx.post(f"{g.url}/v1/chat/completions", json={"model": "sleepy", **chat},
                       trust_env=False, timeout=240)
        assert r.status_code == 200, r.text
        url = model_url(g, "sleepy")
        assert httpx.get(f"{url}/is_sleeping", trust_env=False).json() == {"is_sleeping": False}
        r = httpx.post(f"{g.url}/v1/chat/completions", json={"model": "other", **chat},
                       trust_env=False, timeout=60)
        assert r.status_code == 200, r.text
        assert g.status()["models"]["sleepy"]["state"] == "sleeping"
        assert httpx.get(f"{url}/is_sleeping", trust_env=False).json() == {"is_sleeping": True}
        r = httpx.post(f"{g.url}/v1/chat/completions", json={"model": "sleepy", **chat},
                       trust_env=False, timeout=120)
        assert r.status_code == 200, r.text
        assert g.metric("gateway_backend_starts_total", model="sleepy", result="woken") == 1
        assert httpx.get(f"{url}/is_sleeping", trust_env=False).json() == {"is_sleeping": False}
        sleep_state = metric_samples(vllm_metrics(url), "vllm:engine_sleep_state")
        assert sleep_state, "vllm:engine_sleep_state not exported"


# --- the docker backend: cold start, loopback only, an API key, adoption ------------------

def _docker():
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception as exc:
        reason = f"Docker daemon not available: {type(exc).__name__}: {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; required because {REQUIRE_ENV}=1")
        pytest.skip(reason)


def _listening_on(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp: no traffic sent)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_docker_cold_start_loopback_api_key_and_adoption(tmp_path):
    import io
    import tarfile

    client = _docker()
    image = "vllm-gateway-test/empty:1"
    try:
        client.images.get(image)
    except Exception:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w"):
            pass
        client.api.import_image_from_data(buf.getvalue(), repository=image.split(":")[0],
                                          tag="1")
    prefix = f"vgw-real-{os.getpid()}"
    # The empty image runs the host's Python and venv; vLLM's CPU worker shells out to
    # lscpu, so /bin (sh) is needed too.
    mounts = sorted({sys.base_prefix, str(VLLM_VENV), str(MODEL_DIR.parent), "/usr", "/lib",
                     "/lib64", "/etc", "/bin"})
    model = {"name": "dock", "backend": "docker", "image": image, "network": "host",
             "gpus": "none", "model": str(MODEL_DIR), "env": VLLM_ENV,
             "volumes": [f"{p}:{p}:ro" for p in mounts if os.path.exists(p)],
             "command": [str(VLLM), "serve", "{model}", "--served-model-name", "{name}",
                         "--port", "{port}", "--host", "127.0.0.1", "--enforce-eager",
                         "--max-model-len", "512"]}
    cfg = base_config(tmp_path, [model], docker={"label_prefix": prefix,
                                                 "hf_cache": str(tmp_path / "hf"),
                                                 "stop_on_shutdown": False})
    try:
        with start_gateway(cfg, tmp_path) as g:
            t0 = time.monotonic()
            r = httpx.post(f"{g.url}/v1/chat/completions", trust_env=False, timeout=240,
                           json={"model": "dock", "messages": CHAT, "max_tokens": 2})
            print(f"\nvLLM cold start through the docker backend: {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)
            assert r.status_code == 200, r.text
            url = model_url(g, "dock")
            port = int(url.rsplit(":", 1)[1])
            assert _listening_on(port) == {"127.0.0.1"}
            # Only the gateway holds the key: a direct request is refused.
            assert httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=30,
                              json={"model": "dock", "messages": CHAT,
                                    "max_tokens": 1}).status_code == 401
        with start_gateway(cfg, tmp_path) as g2:
            assert g2.metric("gateway_backend_starts_total", model="dock", result="adopted") == 1
            r = httpx.post(f"{g2.url}/v1/chat/completions", trust_env=False, timeout=60,
                           json={"model": "dock", "messages": CHAT, "max_tokens": 2})
            assert r.status_code == 200, r.text
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{prefix}.managed=true"}):
            c.remove(force=True)


def test_vllm_start_failure_gives_vllms_reason(tmp_path):
    """vLLM defect 8: the 503 and last_error carry vLLM's own reason, not a pointer."""
    bad = {"name": "bad", "backend": "process", "env": VLLM_ENV,
           "command": [str(VLLM), "serve", str(tmp_path / "no-such-model"), "--port", "{port}"]}
    with start_gateway(base_config(tmp_path, [bad]), tmp_path) as g:
        r = httpx.post(f"{g.url}/v1/chat/completions", trust_env=False, timeout=240,
                       json={"model": "bad", "messages": CHAT})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "last log lines" in message and "gateway log" not in message
        assert g.status()["models"]["bad"]["last_error"].startswith("model 'bad'")


def test_openai_client_error_types(client, gen_url):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gen", messages=CHAT, max_tokens=-1)

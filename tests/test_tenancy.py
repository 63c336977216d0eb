"""Tenancy end to end: real gateway processes, real simulators, the real openai client.

Keys decide which models a caller sees and may use; per-key RPM, TPM, concurrency and
daily budgets refuse with OpenAI's codes, ``Retry-After`` and ``x-ratelimit-*``
headers; the client's credentials never reach a model server (the model's own key
does); admin routes and internals need an admin key; a key never shows up in an
answer, a metric, the status or the log. A bounded fuzz throws malformed credentials
at the auth path.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import statistics
import time

import httpx
import openai
import pytest
import yaml
from helpers import start_gateway, start_simulator, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.auth_config import Auth, digest
from gateway.config import ConfigError, load_settings
from gateway.keys import Keyring

pytestmark = pytest.mark.timeout(120)

UPSTREAM_KEY = "upstream-secret-0001"  # the simulator's --api-key (vLLM's)
KEYS = {name: f"sk-{name}-{hashlib.sha256(name.encode()).hexdigest()[:24]}"
        for name in ("team-a", "team-b", "team-c", "team-d", "team-r", "ops", "flood-a",
                     "flood-b", "batchy")}
CHAT = [{"role": "user", "content": "hello there"}]


def sha(name: str) -> str:
    return digest(KEYS[name])


def key_entry(name: str, **limits) -> dict:
    return {"name": name, "key_sha256": sha(name), **limits}


@pytest.fixture(scope="module")
def sims():
    with start_simulator("t-chat", ttft_ms=0, itl_ms=0, api_key=UPSTREAM_KEY) as locked, \
            start_simulator("t-open", ttft_ms=20, itl_ms=1, api_key=KEYS["team-a"]) as leaky:
        yield locked, leaky


@pytest.fixture(scope="module")
def gw(sims, tmp_path_factory):
    locked, leaky = sims
    served = {"backend": "static", "url": locked.url, "served_model_name": "t-chat",
              "upstream_api_key_env": "T_UPSTREAM_KEY"}
    cfg = {
        "upstream": {"retries": 0},
        "auth": {
            "keys": [
                key_entry("team-a", models=["chat-*"]),
                {"name": "team-b", "key_env": "TEAM_B_KEY", "tpm": 300},
                {"name": "team-c", "key": KEYS["team-c"], "tokens_per_day": 200},
                key_entry("team-d", max_concurrent=1),
                key_entry("team-r", rpm=4),
                key_entry("flood-a"), key_entry("flood-b"),
                key_entry("batchy", priority="batch"),
            ],
            "admin_keys": [key_entry("ops")],
        },
        "cors": {"allow_origins": ["https://app.example"]},
        "models": [
            {"name": "chat-small", **served},
            {"name": "chat-large", **served},
            {"name": "secret-model", **served},
            # No upstream key: the client's key must not be forwarded in its place.
            {"name": "chat-leaky", "backend": "static", "url": leaky.url,
             "served_model_name": "t-open"},
            {"name": "fair", **served, "max_concurrent": 1, "max_queue": 100},
        ],
    }
    with start_gateway(cfg, tmp_path_factory.mktemp("tenancy"),
                       env={"TEAM_B_KEY": KEYS["team-b"], "T_UPSTREAM_KEY": UPSTREAM_KEY}) as g:
        yield g


def client(gw, name: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[name] if name else "none",
                         max_retries=0, timeout=30)


def admin_get(gw, path: str, key: str | None = "ops") -> httpx.Response:
    headers = {"authorization": f"Bearer {KEYS[key]}"} if key else {}
    return httpx.get(gw.url + path, headers=headers, timeout=10, trust_env=False)


def post(gw, key: str | None, model: str = "chat-small", headers: dict | None = None,
         **body) -> httpx.Response:
    h = {"authorization": f"Bearer {KEYS[key]}"} if key else {}
    h.update(headers or {})
    return httpx.post(f"{gw.url}/v1/chat/completions", headers=h, timeout=30, trust_env=False,
                      json={"model": model, "messages": CHAT, "max_tokens": 3, **body})


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    return body["error"]


def assert_settled(gw) -> None:
    status = admin_get(gw, "/gateway/status").json()
    for name, m in status["models"].items():
        assert (m["queue_depth"], m["in_flight"], m["drift"]) == (0, 0, 0), name
    for name, k in status["keys"].items():
        assert (k["active"], k["in_flight"]) == (0, 0), name


# --- who may use what -------------------------------------------------------------------------

def test_keys_decide_which_models_are_listed_and_usable(gw):
    a = client(gw, "team-a")
    assert sorted(m.id for m in a.models.list()) == ["chat-large", "chat-leaky", "chat-small"]
    assert a.chat.completions.create(model="chat-small", messages=CHAT, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError) as denied:
        a.chat.completions.create(model="secret-model", messages=CHAT, max_tokens=2)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError):  # a model it may not use is not there for it
        a.models.retrieve("secret-model")
    # Every model for a key without a list.
    assert "secret-model" in {m.id for m in client(gw, "team-d").models.list()}
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(gw, None).chat.completions.create(model="chat-small", messages=CHAT)
    assert wrong.value.code == "invalid_api_key"
    missing = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "chat-small"},
                         timeout=10, trust_env=False)
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{gw.url}/v1/models", timeout=10, trust_env=False).status_code == 401
    # The Azure and Anthropic-style headers work as well.
    for header in ("api-key", "x-api-key"):
        resp = post(gw, None, headers={header: KEYS["team-a"]})
        assert resp.status_code == 200, resp.text


def test_the_model_server_gets_the_models_key_never_the_clients(gw, sims):
    locked, leaky = sims
    before = httpx.get(f"{locked.url}/sim/stats", timeout=5).json()["unauthorized_total"]
    assert post(gw, "team-a").status_code == 200  # the simulator accepted UPSTREAM_KEY
    assert httpx.get(f"{locked.url}/sim/stats", timeout=5).json()["unauthorized_total"] == before
    # chat-leaky's server would accept team-a's own key; it never gets it.
    resp = post(gw, "team-a", model="chat-leaky")
    assert resp.status_code == 401
    assert httpx.get(f"{leaky.url}/sim/stats", timeout=5).json()["unauthorized_total"] >= 1


# --- limits --------------------------------------------------------------------------------------

def test_requests_per_minute_with_openai_headers_and_retry_after(gw):
    seen = []
    for _ in range(4):
        resp = post(gw, "team-r")
        assert resp.status_code == 200, resp.text
        seen.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert resp.headers["x-ratelimit-limit-requests"] == "4"
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    assert seen == [3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as limited:
        client(gw, "team-r").chat.completions.create(model="chat-small", messages=CHAT)
    assert limited.value.code == "rate_limit_requests"
    retry = int(limited.value.response.headers["retry-after"])
    assert 10 <= retry <= 15  # one request per 15 s; the first went out just now
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_per_minute_are_reserved_then_settled_from_usage_streamed_or_not(gw):
    b = client(gw, "team-b")
    with pytest.raises(openai.RateLimitError) as too_big:  # can never fit: refused, not held
        b.chat.completions.create(model="chat-small", messages=CHAT, max_tokens=400)
    assert too_big.value.code == "rate_limit_tokens"
    assert "lower max_tokens" in too_big.value.message
    raw = b.chat.completions.with_raw_response.create(model="chat-small", messages=CHAT,
                                                      max_tokens=20)
    used = raw.parse().usage.total_tokens
    left_after_first = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert raw.headers["x-ratelimit-limit-tokens"] == "300"
    assert left_after_first < 300
    # A stream whose client did not ask for usage: the gateway asks, counts it, and the
    # client still gets no usage chunk.
    chunks = list(b.chat.completions.create(model="chat-small", messages=CHAT, max_tokens=20,
                                            stream=True))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    tokens = gw.metric("gateway_key_tokens_total", key="team-b", type="output")
    assert tokens >= 2 * 1  # both answers counted
    # Spend the rest; then the minute's budget refuses with a Retry-After.
    refused = None
    for _ in range(40):
        resp = post(gw, "team-b", max_tokens=20)
        if resp.status_code == 429:
            refused = resp
            break
        assert resp.status_code == 200
    assert refused is not None, "tpm never refused"
    assert error_of(refused)["code"] == "rate_limit_tokens"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert used > 0


def test_daily_budget_gives_insufficient_quota_until_midnight_utc(gw):
    codes = []
    for _ in range(30):
        resp = post(gw, "team-c", max_tokens=20)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            break
    assert codes[-1] == 429 and codes[0] == 200
    assert error_of(resp)["code"] == "insufficient_quota"
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(int(resp.headers["retry-after"]) - (midnight - now).total_seconds()) < 30
    with pytest.raises(openai.RateLimitError) as quota:
        client(gw, "team-c").chat.completions.create(model="chat-small", messages=CHAT,
                                                     max_tokens=20)
    assert quota.value.code == "insufficient_quota"
    status = admin_get(gw, "/gateway/status").json()["keys"]["team-c"]
    assert status["tokens_today"] <= 200 + 60 and status["tokens_per_day"] == 200


def test_a_keys_concurrency_limit_counts_its_requests_in_flight(gw):
    async def scenario():
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            def one(delay: int):
                return http.post(f"{gw.url}/v1/chat/completions",
                                 headers={"authorization": f"Bearer {KEYS['team-d']}",
                                          "x-sim-delay-ms": str(delay)},
                                 json={"model": "chat-small", "messages": CHAT, "max_tokens": 2})
            slow = asyncio.create_task(one(1500))
            for _ in range(100):
                status = (await http.get(f"{gw.url}/gateway/status", headers={
                    "authorization": f"Bearer {KEYS['ops']}"})).json()
                if status["keys"]["team-d"]["active"] == 1:
                    break
                await asyncio.sleep(0.02)
            second = await one(0)
            return (await slow), second

    slow, second = asyncio.run(scenario())
    assert slow.status_code == 200
    assert second.status_code == 429 and error_of(second)["code"] == "rate_limit_concurrency"
    assert second.headers["retry-after"] == "1"
    assert post(gw, "team-d").status_code == 200  # free again once the first finished
    assert_settled(gw)


# --- fairness, end to end -------------------------------------------------------------------------

def test_fair_queuing_under_a_flood_with_numbers(gw, capsys):
    """flood-a queues 40 on a one-slot model, then flood-b queues 5: B's 5 finish before
    15 more of A's. Prints who was served when (the closing note's figures)."""
    async def scenario():
        done: list[tuple[str, float]] = []
        async with httpx.AsyncClient(timeout=60, trust_env=False,
                                     limits=httpx.Limits(max_connections=100)) as http:
            async def one(key: str, i: int):
                resp = await http.post(f"{gw.url}/v1/chat/completions",
                                       headers={"authorization": f"Bearer {KEYS[key]}",
                                                "x-sim-delay-ms": "25"},
                                       json={"model": "fair", "messages": CHAT, "max_tokens": 2})
                done.append((f"{key[-1].upper()}{i}", time.monotonic()))
                return resp.status_code

            t0 = time.monotonic()
            a = [asyncio.create_task(one("flood-a", i)) for i in range(40)]
            for _ in range(200):
                st_ = (await http.get(f"{gw.url}/gateway/status", headers={
                    "authorization": f"Bearer {KEYS['ops']}"})).json()
                if st_["models"]["fair"]["queue_depth"] >= 30:
                    break
                await asyncio.sleep(0.01)
            a_before = sum(1 for n, _ in done if n.startswith("A"))
            b = [asyncio.create_task(one("flood-b", i)) for i in range(5)]
            codes = await asyncio.gather(*a, *b)
            return codes, done, a_before, t0

    codes, done, a_before, t0 = asyncio.run(scenario())
    assert codes == [200] * 45
    order = [n for n, _ in done]
    last_b = max(i for i, n in enumerate(order) if n.startswith("B"))
    a_during = sum(1 for n in order[:last_b + 1] if n.startswith("A")) - a_before
    assert a_during < 15, order
    with capsys.disabled():
        b_times = [round(t - t0, 2) for n, t in done if n.startswith("B")]
        print(f"\n[fairness] A done before B arrived: {a_before}; A finished while B's 5 were "
              f"served: {a_during}; B finished at {b_times} s; order: {' '.join(order)}")
    assert_settled(gw)


def test_a_lower_priority_band_is_refused_at_a_lower_depth(gw):
    """batch may queue only up to half of max_queue (the default band's queue_share)."""
    async def scenario():
        async with httpx.AsyncClient(timeout=60, trust_env=False,
                                     limits=httpx.Limits(max_connections=200)) as http:
            def one(key: str, delay: int = 40):
                return http.post(f"{gw.url}/v1/chat/completions",
                                 headers={"authorization": f"Bearer {KEYS[key]}",
                                          "x-sim-delay-ms": str(delay)},
                                 json={"model": "fair", "messages": CHAT, "max_tokens": 2})
            flood = [asyncio.create_task(one("flood-a")) for _ in range(60)]
            for _ in range(300):
                st_ = (await http.get(f"{gw.url}/gateway/status", headers={
                    "authorization": f"Bearer {KEYS['ops']}"})).json()
                if st_["models"]["fair"]["queue_depth"] >= 55:
                    break
                await asyncio.sleep(0.01)
            batch = await one("batchy")
            interactive = asyncio.create_task(one("flood-b"))
            results = await asyncio.gather(*flood, interactive)
            return batch, results

    batch, results = asyncio.run(scenario())
    assert batch.status_code == 429 and error_of(batch)["code"] == "queue_full"
    assert "batch" in error_of(batch)["message"]
    assert all(r.status_code == 200 for r in results)
    assert_settled(gw)


# --- what operators and strangers see -------------------------------------------------------------

def test_status_metrics_and_logs_show_names_never_keys(gw):
    plain = admin_get(gw, "/gateway/status", key=None)
    assert plain.status_code == 200  # status is not in auth.protect here
    for m in plain.json()["models"].values():
        assert m["urls"] == []
    assert "keys" not in plain.json()
    full = admin_get(gw, "/gateway/status").json()
    assert full["models"]["chat-small"]["urls"]
    assert {"team-a", "team-b", "ops"} <= set(full["keys"])
    metrics = gw.metrics()
    assert 'gateway_key_requests_total{code="200",key="team-a"}' in metrics
    assert 'gateway_key_rejections_total{key="team-r",reason="rate_limit_requests"}' in metrics
    text = "\n".join([json.dumps(full), metrics, gw.log_text()])
    for name, key in KEYS.items():
        assert key not in text, name
    assert UPSTREAM_KEY not in text
    # Admin routes want the admin key, from loopback too.
    assert admin_get(gw, "/gateway/sd", key=None).status_code == 401
    refused = httpx.post(f"{gw.url}/gateway/models/chat-small/pin", timeout=10, trust_env=False)
    assert refused.status_code == 401
    client_key = httpx.post(f"{gw.url}/gateway/models/chat-small/pin", timeout=10,
                            trust_env=False,
                            headers={"authorization": f"Bearer {KEYS['team-a']}"})
    assert client_key.status_code == 403 and error_of(client_key)["code"] == "admin_forbidden"
    ok = httpx.post(f"{gw.url}/gateway/models/chat-small/unpin", timeout=10, trust_env=False,
                    headers={"authorization": f"Bearer {KEYS['ops']}"})
    assert ok.status_code == 200


def test_cors_answers_listed_origins_only(gw):
    pre = httpx.options(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False, headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    other = httpx.options(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False,
                          headers={"origin": "https://evil.example",
                                   "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    real = post(gw, "team-a", headers={"origin": "https://app.example"})
    assert real.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-ratelimit-remaining-requests" in real.headers["access-control-expose-headers"]
    denied = post(gw, None, headers={"origin": "https://app.example"})
    assert denied.status_code == 401  # the browser can read the refusal too
    assert denied.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in post(
        gw, "team-a", headers={"origin": "https://evil.example"}).headers


# --- hostile credentials --------------------------------------------------------------------------

credential = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.builds(lambda s: "Bearer " + s, st.text(max_size=80)),
    st.builds(lambda s: "bearer  " + s, st.text(alphabet="abc-_ ", max_size=20)),
    st.sampled_from(["Bearer", "Bearer ", "Basic b3BzOm9wcw==", "Bearer " + "k" * 5000,
                     "Bearer " + KEYS["team-a"][:-1], "Bearer " + KEYS["team-a"] + "x",
                     "Bearer " + KEYS["team-a"].upper(), "Bearer \u00e9\u00e9\u00e9",
                     "Bearer sk-\x00\x01", KEYS["team-a"]]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(value=credential, header=st.sampled_from(["authorization", "api-key", "x-api-key"]))
def test_fuzzed_credentials_get_a_clear_401_and_are_never_echoed(gw, value, header):
    raw = value.encode("utf-8", "surrogateescape")
    if b"\r" in raw or b"\n" in raw or raw.strip() != raw:
        raw = raw.replace(b"\r", b"").replace(b"\n", b"").strip()
    try:
        resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10, trust_env=False,
                          headers=[(header.encode(), raw)],
                          json={"model": "chat-small", "messages": CHAT, "max_tokens": 2})
    except httpx.LocalProtocolError:
        return  # not sendable as a header at all
    assert resp.status_code in (200, 400, 401, 431), (value, resp.status_code, resp.text)
    if resp.status_code == 200:  # only ever the real key, as sent
        assert raw.removeprefix(b"Bearer ").strip() == KEYS["team-a"].encode()
    elif resp.status_code == 401:
        err = error_of(resp)
        assert err["code"] == "invalid_api_key"
        # One of a few fixed sentences: nothing of what was sent comes back.
        assert err["message"] in REFUSALS, err["message"]
    assert b"Traceback" not in resp.content


REFUSALS = {"the API key is not valid", "an empty API key was given",
            "the Authorization header must be 'Bearer <key>'",
            "no API key given: send Authorization: Bearer <key>"}


def test_wrong_keys_take_as_long_whatever_their_prefix():
    """The comparison is of digests, every one of them: a wrong key sharing all but its
    last character with a real one is refused as fast as an unrelated one."""
    keys = [{"name": f"k{i}", "key_sha256": digest(f"sk-real-key-{i:04d}-{'x' * 40}")}
            for i in range(20)]
    ring = Keyring(Auth.model_validate({"keys": keys}))
    close = [{"authorization": f"Bearer sk-real-key-0007-{'x' * 39}y"}] * 400
    far = [{"authorization": f"Bearer zz{'q' * 56}"}] * 400

    def timed(batch) -> float:
        started = time.perf_counter_ns()
        for headers in batch:
            assert ring.identify(headers).tenant is None
        return (time.perf_counter_ns() - started) / len(batch)

    rounds = [(timed(close), timed(far)) for _ in range(15)]  # interleaved: same noise
    ratio = statistics.median(c for c, _ in rounds) / statistics.median(f for _, f in rounds)
    assert 0.67 < ratio < 1.5, rounds


# --- config ---------------------------------------------------------------------------------------

def test_auth_config_problems_are_one_line_each_naming_the_key(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"name": "f1", "key_sha256": "nothex"},
                                         {"name": "team-x", "key_sha256": sha("team-a")}]))
    raw = {"listen": {"host": "0.0.0.0"},
           "auth": {"keys": [{"name": "team-x", "key_env": "NOT_SET_ANYWHERE"},
                             {"name": "two", "key_sha256": sha("team-a"), "key": "sk-abcdefgh"},
                             {"name": "pri", "key_sha256": sha("team-b"), "priority": "vip"},
                             {"name": "short", "key": "sk-1"}],
                    "keys_file": str(keys_file), "protect": ["everything"]},
           "cors": {"allow_origins": ["https://ok.example/path"]}}
    with pytest.raises(ConfigError) as err:
        load_settings(raw=raw, environ={})
    lines = err.value.lines
    text = "\n".join(lines)
    assert any("auth.keys.1" in ln and "exactly one of" in ln for ln in lines), text
    assert any("auth.keys.3.key" in ln for ln in lines), text
    assert "sk-1" not in text  # a plaintext key is never echoed, even when invalid
    assert any("protect" in ln and "everything" in ln for ln in lines), text
    assert any("cors" in ln and "allow_origins" in ln for ln in lines), text
    # Once the sections themselves validate: environment, file, names, priorities, exposure.
    raw["auth"]["keys"] = [raw["auth"]["keys"][0], raw["auth"]["keys"][2]]
    raw["auth"]["protect"] = []
    raw["cors"] = {}
    with pytest.raises(ConfigError) as err:
        load_settings(raw=raw, environ={})
    text = "\n".join(err.value.lines)
    assert "auth.keys[team-x].key_env: environment variable NOT_SET_ANYWHERE is not set" in text
    assert f"auth.keys_file {keys_file}: [f1]" in text and "64 hex digits" in text
    assert "auth.keys[team-x].name: 'team-x' is already the name of a key" in text
    assert "auth.keys[pri].priority: 'vip' is not a band" in text
    assert all(ln.count("\n") == 0 for ln in err.value.lines)
    open_raw = {"listen": {"host": "0.0.0.0"}}
    with pytest.raises(ConfigError) as err:
        load_settings(raw=open_raw, environ={})
    assert err.value.lines == [
        "config: auth: no API keys configured and listen.host '0.0.0.0' is not loopback: "
        "anyone who can reach the port could use every model; add auth.keys or set "
        "auth.allow_anonymous: true"]
    assert load_settings(raw={**open_raw, "auth": {"allow_anonymous": True}}, environ={})


def test_keys_file_is_reread_on_reload(tmp_path, sims):
    locked, _ = sims
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([key_entry("team-a")]))
    cfg = {"auth": {"keys_file": str(keys_file), "admin_keys": [key_entry("ops")]},
           "models": [{"name": "m", "backend": "static", "url": locked.url,
                       "served_model_name": "t-chat", "upstream_api_key": UPSTREAM_KEY}]}
    with start_gateway(cfg, tmp_path) as g:
        assert post(g, "team-a", model="m").status_code == 200
        assert post(g, "team-b", model="m").status_code == 401
        keys_file.write_text(yaml.safe_dump([key_entry("team-b", rpm=100)]))
        resp = httpx.post(f"{g.url}/gateway/reload", timeout=30, trust_env=False,
                          headers={"authorization": f"Bearer {KEYS['ops']}"})
        assert resp.status_code == 200, resp.text
        wait_until(lambda: post(g, "team-b", model="m").status_code == 200, 5,
                   what="the new key")
        assert post(g, "team-a", model="m").status_code == 401
        assert post(g, "team-b", model="m").headers["x-ratelimit-limit-requests"] == "100"


def test_hook_limit_store():
    """A plugin's store holds the limits (here an async one, as a shared store's would
    be): the gateway awaits its acquire and settles through it."""
    from inproc import running_gateway

    from gateway import hookimpl
    from gateway.ratelimit import LimitStore

    calls: list[str] = []

    class AsyncStore(LimitStore):
        async def acquire(self, tenant, estimate):
            calls.append(f"acquire {tenant.name}")
            return super().acquire(tenant, estimate)

        async def settle(self, grant, used, served):
            calls.append(f"settle {grant.tenant.name} {used}")
            super().settle(grant, used, served)

    class Plugin:
        @hookimpl
        def limit_store(self, settings):
            assert settings.auth.keys[0].name == "team-r"
            return AsyncStore()

    async def scenario():
        with start_simulator("t-chat", ttft_ms=0, itl_ms=0) as sim:
            cfg = {"auth": {"keys": [key_entry("team-r", rpm=2)]},
                   "models": [{"name": "m", "backend": "static", "url": sim.url,
                               "served_model_name": "t-chat"}]}
            async with running_gateway(cfg, extra_plugins=[("store", Plugin())]) as (url, _):
                async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
                    codes = []
                    for _ in range(3):
                        r = await http.post(f"{url}/v1/chat/completions", json={
                            "model": "m", "messages": CHAT, "max_tokens": 2},
                            headers={"authorization": f"Bearer {KEYS['team-r']}"})
                        codes.append(r.status_code)
                    for _ in range(50):
                        if sum(c.startswith("settle") for c in calls) == 2:
                            break
                        await asyncio.sleep(0.02)
                    return codes

    assert asyncio.run(scenario()) == [200, 200, 429]
    assert calls.count("acquire team-r") == 3
    assert sum(c.startswith("settle team-r") for c in calls) == 2  # the refused one: none

"""Who may call admin routes: loopback only (unless admin.allow_remote), and never a
state-changing request a browser sends from another site."""
from __future__ import annotations

import types

import pytest

from gateway.auth_config import digest
from gateway.config import load_settings
from gateway.routes.guard import admin_refusal
from gateway.tenancy import Tenancy

KEYS = {"keys": [{"name": "team-a", "key_sha256": digest("sk-team-a-000")}],
        "admin_keys": [{"name": "ops", "key_sha256": digest("sk-ops-000000")}]}


def request(ip: str = "127.0.0.1", method: str = "POST", allow_remote: bool = False,
            auth: dict | None = None, **headers: str):
    settings = load_settings(raw={"admin": {"allow_remote": allow_remote}, "auth": auth or {}},
                             environ={})
    app = types.SimpleNamespace(ctx=types.SimpleNamespace(
        gateway=types.SimpleNamespace(settings=settings, tenancy=Tenancy(settings.auth))))
    return types.SimpleNamespace(ip=ip, method=method, scheme="http", host="127.0.0.1:8080",
                                 app=app,
                                 headers={k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.0.9", "::1"])
def test_loopback_clients_may_use_admin_routes(ip):
    assert admin_refusal(request(ip)) is None


@pytest.mark.parametrize("ip", ["203.0.113.5", "198.51.100.2", "2001:db8::7", "", "not-an-ip"])
def test_other_clients_are_refused_unless_allowed(ip):
    refused = admin_refusal(request(ip))
    assert refused is not None and refused.status == 403
    assert b'"admin_forbidden"' in refused.body
    assert admin_refusal(request(ip, allow_remote=True)) is None


@pytest.mark.parametrize("headers", [{"origin": "https://evil.example"},
                                     {"origin": "null"},
                                     {"sec_fetch_site": "cross-site"},
                                     {"sec_fetch_site": "same-site"}])
def test_cross_site_browser_posts_are_refused_even_on_loopback(headers):
    refused = admin_refusal(request(**headers))
    assert refused is not None and refused.status == 403
    assert admin_refusal(request(method="GET", **headers)) is None  # reads are harmless


def test_same_origin_and_non_browser_posts_pass():
    assert admin_refusal(request(origin="http://127.0.0.1:8080",
                                 sec_fetch_site="same-origin")) is None
    assert admin_refusal(request()) is None  # the CLI, curl: no Origin at all


@pytest.mark.parametrize("ip", ["127.0.0.1", "203.0.113.5"])
def test_with_keys_an_admin_key_is_needed_from_anywhere(ip):
    """Loopback is no longer enough once keys exist; the admin key works from anywhere."""
    for headers, status, code in (({}, 401, "invalid_api_key"),
                                  ({"authorization": "Bearer sk-team-a-000"}, 403,
                                   "admin_forbidden"),
                                  ({"authorization": "Bearer sk-wrong-0000"}, 401,
                                   "invalid_api_key"),
                                  ({"authorization": "Basic b3BzOm9wcw=="}, 401,
                                   "invalid_api_key")):
        refused = admin_refusal(request(ip, auth=KEYS, **headers))
        assert refused is not None and refused.status == status, headers
        assert f'"{code}"'.encode() in refused.body
        assert b"sk-" not in refused.body  # a key is never echoed
    assert admin_refusal(request(ip, auth=KEYS, authorization="Bearer sk-ops-000000")) is None
    assert admin_refusal(request(ip, auth=KEYS, x_api_key="sk-ops-000000")) is None


def test_client_keys_without_admin_keys_lock_the_admin_routes():
    auth = {"keys": KEYS["keys"]}
    refused = admin_refusal(request(auth=auth, authorization="Bearer sk-team-a-000"))
    assert refused is not None and refused.status == 403
    refused = admin_refusal(request(auth=auth))
    assert refused is not None and b"auth.admin_keys" in refused.body


def test_admin_keys_alone_lock_the_admin_routes_and_leave_clients_open():
    """Only admin keys: clients need none (whatever they send is not judged), admin
    routes need the admin key."""
    from gateway.tenancy import Tenancy as T

    auth = {"admin_keys": KEYS["admin_keys"]}
    for headers in ({}, {"authorization": "Basic eA=="}, {"authorization": "Bearer nope-0000"}):
        req = request(auth=auth, **headers)
        assert T(req.app.ctx.gateway.settings.auth).identify(req.headers).tenant.name == "anonymous"
        refused = admin_refusal(req)
        assert refused is not None and refused.status == 401, headers
    assert admin_refusal(request(auth=auth, authorization="Bearer sk-ops-000000")) is None

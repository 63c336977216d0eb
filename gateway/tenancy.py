"""Tenancy: the request path's one entry point to keys, limits and per-key counts.

``Tenancy`` owns the ``Keyring`` (rebuilt on reload), the ``LimitStore`` and each key's
``KeyLoad`` (both kept across reloads, by key name), and turns their answers into
OpenAI-style errors. The queue itself (fairness, priorities, the per-key concurrency
count) is ``ModelAdmission``'s; this module only hands it the tenant and its load.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from sanic.response import HTTPResponse

from gateway.admission import KeyLoad
from gateway.auth_config import Auth
from gateway.errors import error_response
from gateway.keys import ANONYMOUS, Identity, Keyring, Tenant
from gateway.ratelimit import Grant, LimitStore, Refusal, estimate_tokens

log = logging.getLogger("vllm_gateway.tenancy")


class Tenancy:
    def __init__(self, auth: Auth, store: Any = None) -> None:
        self.store = store if store is not None else LimitStore()  # the limit_store hook's
        self._settling: set[asyncio.Task[Any]] = set()
        self.loads: dict[str, KeyLoad] = {}
        self.keyring: Keyring
        self._admin_tenants: dict[str, Tenant]
        self.reconfigure(auth)

    def reconfigure(self, auth: Auth) -> None:
        """New keys (config reload): counts and limiter state stay with each key's name."""
        self.keyring = Keyring(auth)
        band = self.keyring.anonymous
        # An admin key may also call the models, unlimited, under its own name.
        self._admin_tenants = {a.name: Tenant(a.name, band=band.band, band_name=band.band_name,
                                              queue_share=band.queue_share)
                               for a in auth.admin_keys}
        names = set(self.names)
        self.store.forget_except(names)
        for name in names:
            self.loads.setdefault(name, KeyLoad())

    @property
    def enabled(self) -> bool:
        return self.keyring.enabled

    @property
    def names(self) -> list[str]:
        """Every key label metrics may carry (bounded by config)."""
        return [*self.keyring.names, *self._admin_tenants]

    def load(self, tenant: Tenant) -> KeyLoad:
        load = self.loads.get(tenant.name)
        if load is None:  # a key removed by a reload while its request was in flight
            load = self.loads[tenant.name] = KeyLoad()
        return load

    # ------------------------------------------------------------------ identify

    def identify(self, headers: Mapping[str, str]) -> Identity:
        identity = self.keyring.identify(headers)
        if identity.tenant is None and identity.admin is not None:
            return Identity(self._admin_tenants[identity.admin], identity.admin, True)
        return identity

    @staticmethod
    def unauthorized(identity: Identity) -> HTTPResponse:
        return error_response(401, identity.problem or "the API key is not valid",
                              "invalid_api_key", {"WWW-Authenticate": 'Bearer realm="vllm-gateway"'})

    @staticmethod
    def not_allowed(tenant: Tenant, model: str) -> HTTPResponse:
        return error_response(403, f"key {tenant.name!r} may not use model {model!r}",
                              "model_not_allowed")

    # ------------------------------------------------------------------ limits

    async def acquire(self, tenant: Tenant, payload: dict[str, Any], body_bytes: int
                      ) -> Grant | Refusal | None:
        """Reserve this request against the key's limits; None when it has none."""
        if tenant.rpm is None and tenant.tpm is None and tenant.tokens_per_day is None:
            return None
        result = self.store.acquire(tenant, estimate_tokens(payload, body_bytes))
        return await result if inspect.isawaitable(result) else result

    def settle(self, grant: Grant | None, usage: Mapping[str, Any] | None, sent: bool,
               answered: bool) -> None:
        """A request ended: charge what its usage says; without usage, its estimate if
        it was answered, nothing if it failed; a request never sent is refunded whole."""
        if grant is None:
            return
        used = None
        if usage:
            total = usage.get("total_tokens")
            if not isinstance(total, int):
                parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
                total = sum(p for p in parts if isinstance(p, int)) if any(
                    isinstance(p, int) for p in parts) else None
            used = total if isinstance(total, int) and total >= 0 else None
        if used is None and not answered:
            used = 0
        result = self.store.settle(grant, used, sent)
        if inspect.isawaitable(result):  # a shared store: settled in the background
            task = asyncio.ensure_future(result)
            self._settling.add(task)
            task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("limit store: settling a request failed: %s", task.exception())

    @staticmethod
    def refused(refusal: Refusal, extra: Mapping[str, str]) -> HTTPResponse:
        headers = {**extra, **refusal.headers, "Retry-After": str(refusal.retry_after_s)}
        return error_response(429, refusal.message, refusal.code, headers)

    # ------------------------------------------------------------------ readings

    def status(self) -> dict[str, Any]:
        """Per key: limits and what it uses now (names only; never a key)."""
        out: dict[str, Any] = {}
        tenants = {**self.keyring.tenants, **self._admin_tenants}
        if not self.keyring.enabled or self.keyring.allow_anonymous:
            tenants[ANONYMOUS] = self.keyring.anonymous
        for name, t in tenants.items():
            load = self.loads.get(name) or KeyLoad()
            left = self.store.tokens_left(t)
            out[name] = {"priority": t.band_name, "weight": t.weight,
                         "models": list(t.models) if t.models is not None else None,
                         "active": load.active, "in_flight": load.held,
                         "max_concurrent": t.max_concurrent, "max_queued": t.max_queued,
                         "rpm": t.rpm, "tpm": t.tpm,
                         "tpm_left": None if left is None else max(0, int(left)),
                         "tokens_per_day": t.tokens_per_day,
                         "tokens_today": self.store.used_today(t) if t.tokens_per_day else None}
        return out

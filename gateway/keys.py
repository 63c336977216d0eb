"""Who is calling: API keys to tenants, compared in constant time against digests.

A presented key is hashed once (SHA-256) and its digest compared with every configured
digest by ``hmac.compare_digest``, without stopping at a match, so neither the time
taken nor any early exit says how much of a wrong key was right. The key itself is
never kept, logged or echoed: only the tenant's ``name`` leaves this module.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.auth_config import Auth, KeyConfig

MAX_KEY_BYTES = 512  # longer credentials are refused unhashed
ANONYMOUS = "anonymous"


@dataclass(eq=False)
class Tenant:
    """One key's policy, as the request path reads it; rebuilt on every reload."""

    name: str
    band: int = 0  # index into the priority bands, 0 = highest
    band_name: str = "interactive"
    queue_share: float = 1.0
    weight: int = 1
    max_queued: int | None = None
    max_concurrent: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    models: tuple[str, ...] | None = None  # globs; None = all
    _allowed: dict[str, bool] = field(default_factory=dict, repr=False)

    def may_use(self, model: str) -> bool:
        """Whether this key may use ``model`` (a configured name; results cached)."""
        if self.models is None:
            return True
        allowed = self._allowed.get(model)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(model, g) for g in self.models)
            if len(self._allowed) < 10_000:
                self._allowed[model] = allowed
        return allowed

    @property
    def counts_tokens(self) -> bool:
        """Whether its limits need each answer's token usage."""
        return self.tpm is not None or self.tokens_per_day is not None


@dataclass(frozen=True)
class Identity:
    """The outcome of reading a request's credentials."""

    tenant: Tenant | None = None  # None: refused (see ``problem``)
    admin: str | None = None  # an admin key's name
    presented: bool = False  # whether any credential was sent
    problem: str = ""  # why it was refused, safe to show the client


class Keyring:
    """The configured keys: identify a request, or say why not."""

    def __init__(self, auth: Auth) -> None:
        self.enabled = auth.enabled
        self.allow_anonymous = auth.allow_anonymous or not auth.keys
        bands = {b.name: (i, b.queue_share) for i, b in enumerate(auth.priorities)}
        self.band_names = [b.name for b in auth.priorities]
        default = auth.default_band
        self.anonymous = Tenant(ANONYMOUS, band=bands[default][0], band_name=default,
                                queue_share=bands[default][1])
        self.tenants = {k.name: _tenant(k, bands, default) for k in auth.keys}
        # (digest bytes, tenant, admin name): every configured key, compared in one pass.
        self._digests = [(bytes.fromhex(k.sha256), self.tenants[k.name], None)
                         for k in auth.keys if k.sha256]
        self._digests += [(bytes.fromhex(k.sha256), None, k.name)
                          for k in auth.admin_keys if k.sha256]
        self._clients = any(t is not None for _, t, _ in self._digests)
        self._admins = any(a is not None for _, _, a in self._digests)
        self.protect = frozenset(auth.protect)

    @property
    def names(self) -> list[str]:
        """Every label a per-key metric may carry: bounded by config."""
        return [*self.tenants, ANONYMOUS]

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """The tenant for a request's credentials, anonymous if allowed, else a refusal."""
        if not self.enabled:  # no keys at all: whatever a client sends is not ours to read
            return Identity(self.anonymous)
        key, problem = presented_key(headers)
        if problem:
            if not self._clients:  # clients are open: the header is not ours to judge
                return Identity(self.anonymous, presented=True, problem=problem)
            return Identity(presented=True, problem=problem)
        if key is None:
            if self.allow_anonymous:
                return Identity(self.anonymous)
            return Identity(problem="no API key given: send Authorization: Bearer <key>")
        tenant, admin = self._match(key)
        if tenant is None and admin is None:
            if not self._clients:  # open (no client keys): whatever key a client sends
                return Identity(self.anonymous, presented=True)
            return Identity(presented=True, problem="the API key is not valid")
        return Identity(tenant, admin, presented=True)

    def _match(self, key: str) -> tuple[Tenant | None, str | None]:
        d = hashlib.sha256(key.encode()).digest()
        tenant = admin = None
        for stored, t, name in self._digests:  # every digest compared: no early exit
            if hmac.compare_digest(stored, d):
                tenant, admin = t or tenant, name or admin
        return tenant, admin


def presented_key(headers: Mapping[str, str]) -> tuple[str | None, str]:
    """The key a request carries (Authorization: Bearer, api-key, x-api-key), or a
    reason it is malformed. Never returns the key inside the reason."""
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "the Authorization header must be 'Bearer <key>'"
        key = token.strip()
    else:
        key = headers.get("api-key") or headers.get("x-api-key")
        if key is None:
            return None, ""
        key = key.strip()
    if not key:
        return None, "an empty API key was given"
    if len(key) > MAX_KEY_BYTES or not key.isascii() or not key.isprintable():
        return None, "the API key is not valid"
    return key, ""


def _tenant(k: KeyConfig, bands: dict[str, tuple[int, float]], default: str) -> Tenant:
    band_name = k.priority or default
    band, share = bands[band_name]
    return Tenant(k.name, band=band, band_name=band_name, queue_share=share, weight=k.weight,
                  max_queued=k.max_queued, max_concurrent=k.max_concurrent, rpm=k.rpm, tpm=k.tpm,
                  tokens_per_day=k.tokens_per_day,
                  models=tuple(k.models) if k.models is not None else None)

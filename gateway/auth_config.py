"""The ``auth:`` and ``cors:`` config sections, and turning their keys into digests.

Keys are validated like every other setting (one line per problem, naming the key).
What needs the environment or another file (``key_env``, ``keys_file``) is resolved
once in ``resolve_keys``, called by ``load_settings``, so nothing downstream ever sees
a key in plain text: only its SHA-256 digest.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger("vllm_gateway.config")
KeyName = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@+-]+$")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
DEFAULT_BANDS = [{"name": "interactive", "queue_share": 1.0},
                 {"name": "batch", "queue_share": 0.5}]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Secret(_Strict):
    """One way to give a key: its digest, the key itself, or an environment variable."""

    name: str = KeyName
    key_sha256: str | None = None
    key: str | None = Field(None, repr=False, min_length=8, max_length=512)
    key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    _digest: str = PrivateAttr("")

    @model_validator(mode="after")
    def _one_source(self) -> _Secret:
        given = [k for k in ("key_sha256", "key", "key_env") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"key {self.name!r}: give exactly one of key_sha256, key, key_env "
                             f"(got {', '.join(given) or 'none'})")
        if self.key_sha256 is not None:
            if not _HEX64.fullmatch(self.key_sha256):
                raise ValueError(f"key {self.name!r}: key_sha256 must be 64 hex digits "
                                 "(sha256sum of the key)")
            self._digest = self.key_sha256.lower()
        elif self.key is not None:
            self._digest = digest(self.key)
        return self

    @property
    def sha256(self) -> str:
        """The key's digest ('' until a ``key_env`` is resolved)."""
        return self._digest


class KeyConfig(_Secret):
    """A client key: which models, how fast, how much, and its place in the queue."""

    models: list[str] | None = None  # globs; None = every model
    rpm: int | None = Field(None, ge=1, le=10_000_000)
    tpm: int | None = Field(None, ge=1, le=10_000_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000)
    priority: str | None = None  # a band of auth.priorities; None = auth.default_priority
    tokens_per_day: int | None = Field(None, ge=1, le=10**13)
    weight: int = Field(1, ge=1, le=1000)
    max_queued: int | None = Field(None, ge=0, le=1_000_000)


class AdminKeyConfig(_Secret):
    pass


class PriorityBand(_Strict):
    """A priority band; ``queue_share`` of a model's max_queue is as deep as it may queue."""

    name: str = KeyName
    queue_share: float = Field(1.0, gt=0, le=1)


class Auth(_Strict):
    keys: list[KeyConfig] = []
    admin_keys: list[AdminKeyConfig] = []
    keys_file: str | None = None
    allow_anonymous: bool = False
    protect: list[Literal["status", "metrics", "models"]] = []  # read endpoints needing a key
    # Highest first. A key's ``priority`` names one; waiters of a higher band go first.
    priorities: list[PriorityBand] = Field(
        default_factory=lambda: [PriorityBand(**b) for b in DEFAULT_BANDS])
    default_priority: str | None = None  # None = the first band

    @model_validator(mode="after")
    def _check(self) -> Auth:
        bands = [b.name for b in self.priorities]
        if not bands:
            raise ValueError("priorities: must list at least one band")
        if len(set(bands)) != len(bands):
            raise ValueError("priorities: band names must be unique")
        if self.default_priority is not None and self.default_priority not in bands:
            raise ValueError(f"default_priority: {self.default_priority!r} is not a band "
                             f"({', '.join(bands)})")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (then admin routes need an admin key)."""
        return bool(self.keys or self.admin_keys)

    @property
    def default_band(self) -> str:
        return self.default_priority or self.priorities[0].name


class Cors(_Strict):
    """Browser access to the OpenAI routes; none unless an origin is listed."""

    allow_origins: list[str] = []  # exact origins, or "*"
    allow_headers: list[str] = ["authorization", "content-type", "api-key", "x-api-key",
                                "x-request-id", "openai-organization", "openai-project"]
    expose_headers: list[str] = ["x-request-id", "retry-after", "x-ratelimit-limit-requests",
                                 "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                 "x-ratelimit-reset-tokens"]
    max_age_s: int = Field(600, ge=0, le=86_400)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(f"{origin!r} must be \"*\" or scheme://host[:port] with no path")
        return v


def resolve_keys(settings: Any, source: str, environ: Mapping[str, str]) -> list[str]:
    """Read ``keys_file``, resolve ``key_env``, check names and the anonymous rule.

    Returns one line per problem; on success ``settings.auth.keys`` holds the file's keys
    too and every key has its digest."""
    auth: Auth = settings.auth
    problems: list[str] = []
    if auth.keys_file:
        file_keys, file_problems = _read_keys_file(auth.keys_file)
        problems += file_problems
        auth.keys = [*auth.keys, *file_keys]
    for section, entries in (("keys", auth.keys), ("admin_keys", auth.admin_keys)):
        for i, entry in enumerate(entries):
            if entry.key is not None:
                log.warning("%s: auth.%s[%s].key holds a key in plain text; prefer key_sha256 "
                            "or key_env", source, section, entry.name)
            if entry.key_env is not None:
                value = environ.get(entry.key_env)
                if not value:
                    problems.append(f"{source}: auth.{section}[{entry.name}].key_env: environment "
                                    f"variable {entry.key_env} is not set")
                else:
                    entry._digest = digest(value)
    seen: dict[str, str] = {}
    digests: dict[str, str] = {}
    bands = {b.name for b in auth.priorities}
    for section, entries in (("keys", auth.keys), ("admin_keys", auth.admin_keys)):
        for entry in entries:
            where = f"{source}: auth.{section}[{entry.name}]"
            if entry.name in seen:
                problems.append(f"{where}.name: {entry.name!r} is already the name of a key "
                                f"in auth.{seen[entry.name]}")
            seen.setdefault(entry.name, section)
            if entry.sha256 and entry.sha256 in digests:
                problems.append(f"{where}: the same key as {digests[entry.sha256]!r}")
            digests.setdefault(entry.sha256, entry.name)
            if isinstance(entry, KeyConfig) and entry.priority is not None \
                    and entry.priority not in bands:
                problems.append(f"{where}.priority: {entry.priority!r} is not a band of "
                                f"auth.priorities ({', '.join(sorted(bands))})")
    if auth.protect and not auth.enabled:
        log.warning("%s: auth.protect lists %s but no keys are configured: nothing is "
                    "protected", source, ", ".join(auth.protect))
    problem = exposure_problem(settings, source)
    return problems + ([problem] if problem else [])


def exposure_problem(settings: Any, source: str) -> str:
    """The one line refusing an open gateway on a non-loopback address, or ''."""
    host = settings.listen.host
    auth = settings.auth
    if auth.keys or auth.allow_anonymous or _loopback(host):
        return ""
    return (f"{source}: auth: no API keys configured and listen.host {host!r} is not loopback: "
            "anyone who can reach the port could use every model; add auth.keys or set "
            "auth.allow_anonymous: true")


def _read_keys_file(path: str) -> tuple[list[KeyConfig], list[str]]:
    where = f"auth.keys_file {path}"
    try:
        loaded = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        return [], [f"{where}: cannot read: {exc.strerror}"]
    except yaml.YAMLError as exc:
        return [], [f"{where}: not valid YAML: {str(exc).splitlines()[0]}"]
    if loaded is None:
        return [], []
    if isinstance(loaded, dict) and list(loaded) == ["keys"]:
        loaded = loaded["keys"]
    if not isinstance(loaded, list):
        return [], [f"{where}: must be a YAML list of keys shaped like auth.keys"]
    keys: list[KeyConfig] = []
    problems: list[str] = []
    for i, entry in enumerate(loaded):
        label = entry.get("name") if isinstance(entry, dict) and isinstance(
            entry.get("name"), str) else i
        try:
            keys.append(KeyConfig.model_validate(entry))
        except ValidationError as exc:
            for e in exc.errors():
                field = ".".join(str(p) for p in e["loc"])
                msg = str(e.get("ctx", {}).get("error") or e["msg"])
                problems.append(f"{where}: [{label}]{'.' + field if field else ''}: {msg}")
    return keys, problems


def _loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False

"""Configuration: YAML plus the seed deployment's environment variables, validated once.

Everything downstream trusts a ``Settings`` object; every problem is reported here as
one line naming the file (or environment variable), the key and the reason.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.auth_config import Auth, Cors, resolve_keys

# Absurd-value guards: generous, but they stop typos like an extra three zeros.
MAX_CONCURRENT_CAP = 10_000
MAX_QUEUE_CAP = 1_000_000
DAY_S = 86_400.0
# What a client may send as ``model``: a model's name or one of its aliases.
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")]
_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,200}")


class ConfigError(Exception):
    """Raised with every problem found; ``lines`` has one human-readable line each."""

    def __init__(self, lines: list[str], raw: dict[str, Any] | None = None):
        super().__init__("\n".join(lines))
        self.lines = lines
        self.raw = raw  # the config as parsed (overrides applied), when it was a mapping


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Connections the kernel queues before the gateway accepts them (capped by
    # net.core.somaxconn). Sanic's 100 overflows when hundreds of streams open in the
    # same moment on a busy core, and the overflow is reset, not queued.
    backlog: int = Field(1024, ge=1, le=65535)


class Limits(_Strict):
    max_concurrent: int = Field(50, ge=1, le=MAX_CONCURRENT_CAP)
    max_queue: int = Field(200, ge=0, le=MAX_QUEUE_CAP)
    queue_timeout_s: float = Field(0, ge=0, le=DAY_S)  # 0 = wait as long as needed
    max_request_bytes: int = Field(10_000_000, ge=1024, le=1_000_000_000)
    # Reading a request is bounded apart from answering it (whose timeout is lifted).
    header_timeout_s: float = Field(10, gt=0, le=3600)  # connection open to headers complete
    body_timeout_s: float = Field(60, gt=0, le=DAY_S)  # headers complete to body complete
    max_connections: int = Field(4096, ge=1, le=1_000_000)  # more get 503 and are closed
    # Request bodies held in memory at once, all requests together; a request whose body
    # would pass it waits (bounded by body_timeout_s). One body may always be held.
    max_body_buffer_bytes: int = Field(32_000_000, ge=1024, le=100_000_000_000)
    # Non-streamed upstream answers up to this size are buffered (usage counted); larger
    # ones are streamed through to the client as they arrive.
    max_buffered_response_bytes: int = Field(4_000_000, ge=1024, le=1_000_000_000)


class Upstream(_Strict):
    timeout_s: float = Field(300, gt=0, le=DAY_S)
    connect_timeout_s: float = Field(10, gt=0, le=3600)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0, le=600)
    backoff_multiplier: float = Field(1.5, ge=1, le=10)
    start_timeout_s: float = Field(900, gt=0, le=DAY_S)  # health wait for a cold start
    health_interval_s: float = Field(0.5, gt=0, le=60)
    # After a failed start the model is ``failed``: requests get 503 at once, without a
    # relaunch, for this long, doubling per consecutive failure up to the max.
    start_backoff_s: float = Field(10, ge=0, le=DAY_S)
    start_backoff_max_s: float = Field(600, ge=0, le=DAY_S)
    # Model-server API paths clients may reach besides the built-in allow-list
    # (gateway/paths.py); exact paths, no dot segments or percent-escapes.
    extra_paths: list[str] = []

    @field_validator("extra_paths")
    @classmethod
    def _plain_paths(cls, v: list[str]) -> list[str]:
        from gateway.paths import extra_path_problem

        for path in v:
            problem = extra_path_problem(path)
            if problem:
                raise ValueError(f"{path!r}: {problem}")
        return v

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Upstream:
        if self.start_backoff_max_s < self.start_backoff_s:
            raise ValueError(f"start_backoff_max_s ({self.start_backoff_max_s:g}) must be at "
                             f"least start_backoff_s ({self.start_backoff_s:g})")
        return self


class Gpu(_Strict):
    total_vram_mib: int | None = Field(None, ge=1, le=10_000_000)
    devices: list[int] | None = None
    footprints_file: str = "footprints.json"
    estimate_mib: int = Field(16_000, ge=1, le=10_000_000)  # first-start guess when nothing known
    release_timeout_s: float = Field(60, ge=0, le=3600)
    min_residency_s: float = Field(30, ge=0, le=DAY_S)
    load_timeout_s: float = Field(1800, gt=0, le=DAY_S)  # how long a request waits for room
    sleep_residual_mib: int = Field(1024, ge=0, le=1_000_000)  # held by a sleeping vLLM


class Docker(_Strict):
    image: str = "vllm/vllm-openai:latest"
    vllm_port: int = Field(8000, ge=1, le=65535)
    hf_cache: str = "~/.cache/huggingface"
    hf_token: str | None = Field(None, repr=False)
    stop_on_shutdown: bool = True
    label_prefix: str = "vllm-gateway"
    network: str = "host"


class ServerLogs(_Strict):
    """Where model servers' output goes: one file per server, size-capped, removed on stop."""

    dir: str = "logs"
    max_bytes: int = Field(10_000_000, ge=4096, le=100_000_000_000)


class Admin(_Strict):
    allow_remote: bool = False  # admin routes answer only loopback clients unless true


class Plugins(_Strict):
    disabled: list[str] = []
    load_entrypoints: bool = True
    modules: list[str] = []  # importable modules registered as plugins (after entry points)
    config: dict[str, dict[str, Any]] = {}


class Tracing(_Strict):
    otlp_endpoint: str | None = None
    service_name: str = "vllm-gateway"


class LogSettings(_Strict):
    """The gateway's own log lines: ``json`` is one object per line (gateway/logging_setup.py)."""

    format: Literal["text", "json"] = "text"
    access_log: bool = True  # one line per proxied request on logger vllm_gateway.access


class ModelConfig(_Strict):
    """One model clients can ask for. Backend-specific keys are checked by the driver."""

    name: ModelName
    backend: str = "process"
    served_model_name: str | None = None
    aliases: list[ModelName] = []  # other names clients may send; each listed in /v1/models
    # Models that serve this one's requests, first available first, when it cannot.
    fallbacks: list[str] = []
    fallback_on: list[Literal["unavailable", "queue_full"]] = ["unavailable"]
    # process backend
    command: list[str] | None = None
    env: dict[str, str] = {}
    # static backend
    url: str | None = None
    urls: list[str] | None = None
    # docker backend
    model: str | None = None
    image: str | None = None
    args: list[str] = []
    gpus: str | int | list[int] | None = "all"
    network: str | None = None
    volumes: list[str] = []
    gguf_file: str | None = None
    mem_limit: str | None = None
    cpus: float | None = Field(None, gt=0, le=1024)
    shm_size: str | None = None  # instead of ipc_mode host
    # placement
    vram_mib: int | None = Field(None, ge=1, le=10_000_000)
    pinned: bool = False  # the start-up value; POST /gateway/models/NAME/pin|unpin change it
    preload: bool = False  # started in the background when the gateway starts
    sleep_mode: bool = False  # vLLM --enable-sleep-mode: evict by sleeping, wake in seconds
    sleep_level: int = Field(1, ge=1, le=2)
    # Sent upstream as ``Authorization: Bearer`` (vLLM's --api-key); the client's own
    # credentials are never forwarded.
    upstream_api_key: str | None = Field(None, repr=False, min_length=1, max_length=512)
    upstream_api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("sleep_level")
    @classmethod
    def _wakeable_level(cls, v: int) -> int:
        if v == 2:
            raise ValueError("level 2 discards the weights and vLLM's /wake_up does not reload "
                             "them (the model would wake without weights); use 1, which "
                             "offloads them to CPU memory")
        return v
    # per-model overrides
    max_concurrent: int | None = Field(None, ge=1, le=MAX_CONCURRENT_CAP)
    max_queue: int | None = Field(None, ge=0, le=MAX_QUEUE_CAP)
    idle_timeout_s: float | None = Field(None, ge=0, le=365 * DAY_S)
    start_timeout_s: float | None = Field(None, gt=0, le=DAY_S)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one URL")
        bad = [u for u in v if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"must start with http:// or https:// (got {bad[0]!r})")
        return [u.rstrip("/") for u in v]


class Settings(_Strict):
    listen: Listen = Listen()
    limits: Limits = Limits()
    idle_timeout_s: float = Field(7200, ge=0, le=365 * DAY_S)
    max_models_running: int | None = Field(None, ge=1, le=1000)
    upstream: Upstream = Upstream()
    gpu: Gpu = Gpu()
    docker: Docker = Docker()
    plugins: Plugins = Plugins()
    tracing: Tracing = Tracing()
    server_logs: ServerLogs = ServerLogs()
    admin: Admin = Admin()
    logging: LogSettings = LogSettings()
    auth: Auth = Field(default_factory=Auth)
    cors: Cors = Cors()
    # On SIGTERM/SIGINT: queued requests get 503 at once, in-flight ones may finish
    # within this many seconds, then streams still open end with an SSE error event.
    shutdown_grace_s: float = Field(30, ge=0, le=3600)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                from pydantic_core import InitErrorDetails, PydanticCustomError

                raise ValidationError.from_exception_data("Settings", [InitErrorDetails(
                    type=PydanticCustomError("model_names", f"duplicate model name {m.name!r}"),
                    loc=("models",), input=[])])
            seen.add(m.name)
        return self

    @model_validator(mode="after")
    def _aliases_and_fallbacks(self) -> Settings:
        """Every name a client may send resolves to one model; fallbacks name other models.
        Problems carry their own key (``models.1.aliases``), one line each."""
        from pydantic_core import InitErrorDetails, PydanticCustomError

        names = {m.name for m in self.models}
        owner = {name: name for name in names}
        problems: list[tuple[int, str, str]] = []
        for i, m in enumerate(self.models):
            for alias in m.aliases:
                if alias in owner:
                    problems.append((i, "aliases", f"{alias!r} is already the name or alias of "
                                                   f"model {owner[alias]!r}"))
                owner.setdefault(alias, m.name)
        for i, m in enumerate(self.models):
            for j, fb in enumerate(m.fallbacks):
                if fb == m.name:
                    problems.append((i, "fallbacks", f"{fb!r}: a model cannot fall back to itself"))
                elif fb not in names:
                    hint = f" ({fb!r} is an alias of {owner[fb]!r})" if fb in owner else ""
                    problems.append((i, "fallbacks", f"{fb!r} is not a configured model name{hint}"))
                elif fb in m.fallbacks[:j]:
                    problems.append((i, "fallbacks", f"{fb!r} is listed twice"))
        if problems:
            raise ValidationError.from_exception_data("Settings", [
                InitErrorDetails(type=PydanticCustomError("model_names", msg),
                                 loc=("models", i, key), input=[]) for i, key, msg in problems])
        return self

    # Effective per-model values: the one place defaults and overrides meet.
    def max_concurrent(self, m: ModelConfig) -> int:
        return m.max_concurrent or self.limits.max_concurrent

    def max_queue(self, m: ModelConfig) -> int:
        return self.limits.max_queue if m.max_queue is None else m.max_queue

    def idle_timeout(self, m: ModelConfig) -> float:
        return self.idle_timeout_s if m.idle_timeout_s is None else m.idle_timeout_s

    def start_timeout(self, m: ModelConfig) -> float:
        return m.start_timeout_s or self.upstream.start_timeout_s

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


# Seed deployment variables: env name -> (dotted key, how to parse).
ENV_OVERRIDES: dict[str, str] = {
    "GATEWAY_MAX_QUEUE_SIZE": "limits.max_queue",
    "GATEWAY_MAX_CONCURRENT": "limits.max_concurrent",
    "GATEWAY_MAX_MODELS_CONCURRENT": "max_models_running",
    "VLLM_INACTIVITY_TIMEOUT": "idle_timeout_s",
    "VLLM_PORT": "docker.vllm_port",
    "VLLM_IMAGE": "docker.image",
    "HF_TOKEN": "docker.hf_token",
    "TOTAL_GPU_VRAM": "gpu.total_vram_mib",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "tracing.otlp_endpoint",
}


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[leaf] = value


def _models_from_allowed_json(text: str) -> list[dict[str, Any]]:
    """ALLOWED_MODELS_JSON: a list of HF ids, or of model objects, or {name: hf_id}."""
    data = json.loads(text)
    if isinstance(data, dict):
        return [{"name": k, "backend": "docker", "model": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError("must be a JSON list or object")
    out: list[dict[str, Any]] = []
    for item in data:
        if isinstance(item, str):
            out.append({"name": item, "backend": "docker", "model": item})
        elif isinstance(item, dict):
            out.append(dict(item))
        else:
            raise ValueError(f"entries must be strings or objects (got {item!r})")
    return out


def _model_class_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that holds the keys at ``loc`` (list indices skipped)."""
    cls: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        cls = _inner_model(field.annotation)
    return cls


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _model_label(raw: Mapping[str, Any] | None, index: int) -> str:
    """``models[NAME]`` for the index-th raw model entry; ``models[INDEX]`` when its name
    is missing, invalid or shared by another entry."""
    models = raw.get("models") if isinstance(raw, Mapping) else None
    if isinstance(models, list) and 0 <= index < len(models) and isinstance(models[index], dict):
        name = models[index].get("name")
        names = [m.get("name") for m in models if isinstance(m, dict)]
        if isinstance(name, str) and _NAME.fullmatch(name) and names.count(name) == 1:
            return f"models[{name}]"
    return f"models[{index}]"


def config_key(loc: tuple[Any, ...], raw: Mapping[str, Any] | None = None) -> str:
    """The key a problem is about, as the user wrote it: ``limits.max_queue``,
    ``models[chat-small].max_queue``, ``upstream.extra_paths.0``."""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        return ".".join([_model_label(raw, loc[1]), *(str(p) for p in loc[2:])])
    return ".".join(str(p) for p in loc)


def _format_errors(err: ValidationError, source: str, env_keys: Mapping[str, str],
                   raw: Mapping[str, Any] | None = None) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        key = config_key(loc, raw)
        where = source
        env_key = next((k for k in env_keys if dotted == k or dotted.startswith(k + ".")), None)
        if env_key is not None:
            where = f"environment {env_keys[env_key]}"
        msg = e["msg"]
        if e["type"] == "value_error" and e.get("ctx", {}).get("error") is not None:
            msg = str(e["ctx"]["error"])  # the validator's own words, without "Value error, "
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e:
            got = e["input"]
            if not isinstance(got, (dict, list)):
                if key.endswith(("hf_token", ".key", "upstream_api_key")):
                    got = "***"
                msg = f"{msg} (got {got!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _suggestion(loc)
        lines.append(f"{where}: {key or '(top level)'}: {msg}")
    return lines


def _suggestion(loc: tuple[Any, ...]) -> str:
    """`` (did you mean max_queue?)`` for a misspelled key, else ''."""
    owner = _model_class_at(loc[:-1])
    if owner is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _yaml_problem(source: str, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: not valid YAML: what (context)`` on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = getattr(exc, "problem", None) or str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        at = (f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
              if context_mark is not None else "")
        what = f"{what} ({context}{at})"
    return f"{where}: not valid YAML: {what}".replace("\n", " ")


def salvage(raw: Mapping[str, Any]) -> tuple[Settings | None, dict[str, set[str]]]:
    """What still validates of a config that does not, so later checks (backend drivers,
    plugins) can report their problems in the same pass: the top-level sections that
    validate on their own, and every model with its invalid keys left out. Returns those
    settings (None if even they fail) and, per model kept, the keys left out."""
    keep: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "models" or key not in Settings.model_fields:
            continue
        try:
            Settings.model_validate({key: value})
        except ValidationError:
            continue
        keep[key] = value
    models: list[dict[str, Any]] = []
    dropped: dict[str, set[str]] = {}
    for entry in raw.get("models") or []:
        if not isinstance(entry, dict):
            continue
        bad: set[str] = set()
        try:
            ModelConfig.model_validate(entry)
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            if not bad or bad & {"name", "backend"}:
                continue
            entry = {k: v for k, v in entry.items() if k not in bad}
            try:
                ModelConfig.model_validate(entry)
            except ValidationError:
                continue
        if entry["name"] in dropped:
            continue
        dropped[entry["name"]] = bad
        models.append(entry)
    try:
        return Settings.model_validate({**keep, "models": models}), dropped
    except ValidationError:
        return None, {}


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None,
                  raw: dict[str, Any] | None = None) -> Settings:
    """Read YAML (or ``raw``), apply environment overrides, validate; raise ConfigError."""
    environ = os.environ if environ is None else environ
    source = str(path) if path else "config"
    if raw is None:
        raw = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError([_yaml_problem(source, exc)]) from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError([f"{source}: (top level): must be a mapping of keys"])
            raw = loaded
    raw = json.loads(json.dumps(raw))  # private deep copy
    env_keys: dict[str, str] = {}
    problems: list[str] = []
    for env_name, dotted in ENV_OVERRIDES.items():
        value = environ.get(env_name)
        if value is None or value == "":
            continue
        _set_dotted(raw, dotted, value)
        env_keys[dotted] = env_name
    allowed = environ.get("ALLOWED_MODELS_JSON")
    if allowed:
        try:
            raw["models"] = _models_from_allowed_json(allowed)
            env_keys["models"] = "ALLOWED_MODELS_JSON"
        except ValueError as exc:
            problems.append(f"environment ALLOWED_MODELS_JSON: models: {exc}")
    # An explicit empty list is a mistake (a gateway without models answers only 404s);
    # leaving ``models`` out is allowed, for files that only set plugins or defaults.
    if raw.get("models") == []:
        where = "environment ALLOWED_MODELS_JSON" if "models" in env_keys else source
        problems.append(f"{where}: models: must list at least one model")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems + _format_errors(exc, source, env_keys, raw), raw) from None
    problems += resolve_keys(settings, source, environ)
    for m in settings.models:
        if m.upstream_api_key_env:
            value = environ.get(m.upstream_api_key_env)
            if not value:
                problems.append(f"{source}: models[{m.name}].upstream_api_key_env: environment "
                                f"variable {m.upstream_api_key_env} is not set")
            elif m.upstream_api_key is None:
                m.upstream_api_key = value
    if problems:
        raise ConfigError(problems, raw)
    return settings


def demo_settings() -> dict[str, Any]:
    """The built-in demo: two simulated models, started on demand by the process backend."""
    sim = ["vllm-gateway", "simulate", "--port", "{port}", "--served-model-name", "{name}"]
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "idle_timeout_s": 600,
        "models": [
            {"name": "chat-small", "backend": "process", "max_concurrent": 4, "max_queue": 8,
             "command": sim + ["--ttft-ms", "50", "--itl-ms", "10", "--startup-s", "1"]},
            {"name": "chat-large", "backend": "process", "max_concurrent": 8, "max_queue": 32,
             "command": sim + ["--ttft-ms", "150", "--itl-ms", "25", "--startup-s", "3"]},
        ],
    }



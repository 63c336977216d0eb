"""Configuration: YAML plus the seed deployment's environment variables, validated once.

Everything downstream trusts a ``Settings`` object; every problem is reported here as
one line naming the file (or environment variable), the key and the reason.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Absurd-value guards: generous, but they stop typos like an extra three zeros.
MAX_CONCURRENT_CAP = 10_000
MAX_QUEUE_CAP = 1_000_000
DAY_S = 86_400.0


class ConfigError(Exception):
    """Raised with every problem found; ``lines`` has one human-readable line each."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)


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


class Plugins(_Strict):
    disabled: list[str] = []
    load_entrypoints: bool = True
    modules: list[str] = []  # importable modules registered as plugins (after entry points)
    config: dict[str, dict[str, Any]] = {}


class Tracing(_Strict):
    otlp_endpoint: str | None = None
    service_name: str = "vllm-gateway"


class ModelConfig(_Strict):
    """One model clients can ask for. Backend-specific keys are checked by the driver."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")
    backend: str = "process"
    served_model_name: str | None = None
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
    pinned: bool = False
    sleep_mode: bool = False  # vLLM --enable-sleep-mode: evict by sleeping, wake in seconds
    sleep_level: int = Field(1, ge=1, le=2)

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
    # On SIGTERM/SIGINT: queued requests get 503 at once, in-flight ones may finish
    # within this many seconds, then streams still open end with an SSE error event.
    shutdown_grace_s: float = Field(30, ge=0, le=3600)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"models: duplicate model name {m.name!r}")
            seen.add(m.name)
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


def _format_errors(err: ValidationError, source: str, env_keys: Mapping[str, str]) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = source
        env_key = next((k for k in env_keys if key == k or key.startswith(k + ".")), None)
        if env_key is not None:
            where = f"environment {env_keys[env_key]}"
        msg = e["msg"]
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e:
            got = e["input"]
            if not isinstance(got, (dict, list)):
                if key.endswith("hf_token"):
                    got = "***"
                msg = f"{msg} (got {got!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {key or '(top level)'}: {msg}")
    return lines


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
                raise ConfigError([f"{source}: not valid YAML: {exc}".replace("\n", " ")]) from None
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
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems + _format_errors(exc, source, env_keys)) from None
    if problems:
        raise ConfigError(problems)
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



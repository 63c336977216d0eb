"""Pure helpers for the ``docker`` backend: validation and the container spec.

Nothing here talks to Docker, so all of it is unit-tested without a daemon. The
driver (``docker_backend``) resolves what needs the daemon (the network name, the
GGUF file) and hands the results in.

A model's container:

- image: ``image`` of the model, else ``docker.image`` (``VLLM_IMAGE``);
- command: the model's ``command`` with ``{port}``, ``{name}`` and ``{model}`` filled in,
  else vLLM's ``--model M --served-model-name N --port P --host H`` plus ``args``, where
  H is 127.0.0.1 with host networking (vLLM must not listen beside the gateway on
  every interface) and 0.0.0.0 otherwise (the port is published on loopback only, or
  reachable on the named network only);
- ``VLLM_API_KEY``: a key of the gateway's (``api_key``), so that nothing but the
  gateway can use the server's API; the gateway sends it as ``Authorization: Bearer``;
- the Hugging Face cache (``docker.hf_cache``) at /root/.cache/huggingface, ``HF_TOKEN``
  passed through (redacted in every repr), ``env`` and ``volumes`` of the model;
- GPUs from ``gpus``: ``all``, ``none``, a count, or a list of device indices;
- ``ipc_mode: host`` (vLLM's recommendation), or ``shm_size`` when the model sets it;
- ``mem_limit`` and ``cpus``;
- labels ``<prefix>.managed=true``, ``<prefix>.model``, ``<prefix>.port`` and
  ``<prefix>.config`` (a hash of the config, so a changed config is not adopted);
- name ``<prefix>-<model name made safe>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CONTAINER_HF_CACHE = "/root/.cache/huggingface"
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", re.IGNORECASE)
MEM_LIMIT = re.compile(r"^[0-9]+(\.[0-9]+)?\s*[bkmgBKMG]?[bB]?$")
# Flags the gateway sets itself when it builds vLLM's command line.
RESERVED_ARGS = ("--port", "--host", "--served-model-name", "--model")
NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")
DEFAULT_STOP_GRACE_S = 10

API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own variable for --api-key

# Network modes
HOST = "host"      # network_mode host: the gateway-chosen port on 127.0.0.1
BRIDGE = "bridge"  # default bridge, port published on 127.0.0.1:<gateway-chosen port>
NAMED = "named"    # a user-defined network shared with the gateway: <container name>:<vllm_port>


GPUS_HELP = "must be all, none, a count or a list of device indices"


class GpuSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Gpus:
    """Parsed ``gpus``: ``count`` (-1 = all) or ``device_ids``; neither = no GPU."""

    count: int | None = None
    device_ids: tuple[str, ...] = ()

    @property
    def none(self) -> bool:
        return not self.device_ids and not self.count

    def device_request(self) -> dict[str, Any] | None:
        """The ``DeviceRequest`` fields (docker-py), or None for no GPU."""
        if self.device_ids:
            return {"Driver": "", "Count": 0, "DeviceIDs": list(self.device_ids),
                    "Capabilities": [["gpu"]], "Options": {}}
        if self.count:
            return {"Driver": "", "Count": self.count, "DeviceIDs": [],
                    "Capabilities": [["gpu"]], "Options": {}}
        return None


def parse_gpus(value: Any) -> Gpus:
    """``all`` -> every GPU; ``none``/None/0 -> no GPU; n -> n GPUs; [0, 2] -> those devices.

    Strings of digits count as numbers, and "0,2" as a list, since environment
    variables and JSON give strings.
    """
    if value is None:
        return Gpus()
    if isinstance(value, bool):
        raise GpuSpecError(f"{GPUS_HELP} (got {value!r})")
    if isinstance(value, int):
        if value < 0:
            raise GpuSpecError(f"a GPU count must be >= 0 (got {value})")
        return Gpus(count=value) if value else Gpus()
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return Gpus(count=-1)
        if text in ("none", ""):
            return Gpus()
        if text.isdigit():
            return parse_gpus(int(text))
        if "," in text:
            return parse_gpus([p.strip() for p in text.split(",") if p.strip()])
        raise GpuSpecError(f"{GPUS_HELP} (got {value!r})")
    if isinstance(value, (list, tuple)):
        ids = []
        for item in value:
            if isinstance(item, bool) or not (isinstance(item, int) or
                                              (isinstance(item, str) and item.isdigit())):
                raise GpuSpecError(f"device indices must be integers >= 0 (got {item!r})")
            if int(item) < 0:
                raise GpuSpecError(f"device indices must be integers >= 0 (got {item!r})")
            ids.append(str(int(item)))
        if not ids:
            raise GpuSpecError("an empty list selects no GPU: write none instead")
        if len(set(ids)) != len(ids):
            raise GpuSpecError(f"device indices repeat (got {list(value)!r})")
        return Gpus(device_ids=tuple(ids))
    raise GpuSpecError(f"must be all, none, a count or a list of device indices (got {value!r})")


def parse_volume(entry: str) -> tuple[str, str, str]:
    """``host:container[:ro|rw]`` -> (host, container, mode); ValueError names the problem."""
    if not isinstance(entry, str):
        raise ValueError(f"must be a string host:container[:ro|rw] (got {entry!r})")
    parts = entry.split(":")
    if len(parts) == 2:
        host, container, mode = parts[0], parts[1], "rw"
    elif len(parts) == 3:
        host, container, mode = parts
    else:
        raise ValueError(f"must be host:container[:ro|rw] (got {entry!r})")
    if not host:
        raise ValueError(f"host path or volume name is empty (got {entry!r})")
    if not container.startswith("/"):
        raise ValueError(f"container path must be absolute (got {entry!r})")
    if mode not in ("ro", "rw"):
        raise ValueError(f"mode must be ro or rw (got {entry!r})")
    return host, container, mode


def safe_name(name: str) -> str:
    """A Docker-safe form of a model name; a short hash keeps distinct names distinct."""
    cleaned = NAME_OK.sub("_", name).strip("._-") or "model"
    if cleaned != name:
        cleaned = f"{cleaned[:50]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return cleaned[:63]


def container_name(label_prefix: str, model_name: str) -> str:
    return f"{label_prefix}-{safe_name(model_name)}"


def network_choice(model: Any, docker: Any) -> str:
    """The network the model's container uses: the model's ``network``, else ``docker.network``."""
    return (model.network or docker.network or HOST).strip()


def network_mode(choice: str) -> str:
    if choice == HOST:
        return HOST
    if choice in (BRIDGE, "default"):
        return BRIDGE
    return NAMED


def resolve_network_name(wanted: str, existing: Sequence[str]) -> str:
    """Find ``wanted`` among Docker's networks; compose prefixes names with ``<project>_``.

    Raises LookupError with a clear message when there is no match or the match is
    ambiguous.
    """
    if wanted in existing:
        return wanted
    suffixed = sorted(n for n in existing if n.endswith("_" + wanted))
    if len(suffixed) == 1:
        return suffixed[0]
    if not suffixed:
        raise LookupError(f"Docker network {wanted!r} not found (nor a compose network "
                          f"'<project>_{wanted}'); create it or set network: host")
    raise LookupError(f"Docker network {wanted!r} is ambiguous: {', '.join(suffixed)}; "
                      "name one of them exactly")


def expand_host_path(path: str) -> str:
    """Expand ``~`` in a host path; named volumes (no slash) stay as they are."""
    return os.path.expanduser(path) if path.startswith(("~", "/", ".")) else path


def hf_cache_is_path(hf_cache: str) -> bool:
    return hf_cache.startswith(("~", "/", "."))


def container_path_for(host_file: str, hf_cache: str) -> str:
    """Map a file under the host HF cache to its path inside the container."""
    root = os.path.abspath(expand_host_path(hf_cache))
    full = os.path.abspath(host_file)
    rel = os.path.relpath(full, root)
    if rel.startswith(".."):
        raise ValueError(f"{host_file} is not under the HF cache {root}")
    return CONTAINER_HF_CACHE + "/" + rel.replace(os.sep, "/")


def validate_model(model: Any) -> list[str]:
    """One ``key: reason`` line per problem with a ``backend: docker`` model."""
    problems: list[str] = []
    if not model.model and not model.command:
        problems.append("model: required for backend docker (a Hugging Face id or a path "
                        "inside the container), unless command is given")
    if model.command is not None:
        if not model.command:
            problems.append("command: must not be empty")
        elif not any("{port}" in str(part) for part in model.command):
            problems.append("command: must contain {port} so the gateway knows where the "
                            "server listens")
        if model.args:
            problems.append("args: not used when command is given (put them in command)")
    for flag in RESERVED_ARGS:
        if any(a == flag or str(a).startswith(flag + "=") for a in model.args):
            problems.append(f"args: must not set {flag} (the gateway sets it)")
    try:
        parse_gpus(model.gpus)
    except GpuSpecError as exc:
        problems.append(f"gpus: {exc}")
    for i, entry in enumerate(model.volumes):
        try:
            parse_volume(entry)
        except ValueError as exc:
            problems.append(f"volumes.{i}: {exc}")
    for key in model.env:
        if not key or "=" in key:
            problems.append(f"env: invalid variable name {key!r}")
    if model.network is not None and not model.network.strip():
        problems.append("network: must not be empty (host, bridge or a Docker network name)")
    if model.image is not None and not model.image.strip():
        problems.append("image: must not be empty")
    if model.mem_limit is not None and not MEM_LIMIT.match(model.mem_limit):
        problems.append(f"mem_limit: must be a size like 32g or 512m (got {model.mem_limit!r})")
    if model.gguf_file is not None:
        if not model.model:
            problems.append("gguf_file: needs model (the Hugging Face repository holding the file)")
        if not model.gguf_file.strip() or model.gguf_file.startswith("/"):
            problems.append("gguf_file: must be a file name inside the repository "
                            f"(got {model.gguf_file!r})")
    if model.url or model.urls:
        problems.append("url: not used by backend docker (did you mean backend: static?)")
    shm = getattr(model, "shm_size", None)
    if shm is not None and not MEM_LIMIT.match(str(shm)):
        problems.append(f"shm_size: must be a size like 16g (got {shm!r})")
    return problems


@dataclass(frozen=True)
class ContainerSpec:
    """Everything ``containers.run`` gets. Secrets in ``environment`` never show in repr."""

    name: str
    image: str
    command: tuple[str, ...]
    labels: dict[str, str]
    environment: dict[str, str] = field(repr=False)
    volumes: tuple[str, ...] = ()
    network_mode: str | None = None
    network: str | None = None
    ports: dict[str, tuple[str, int]] | None = None
    device_requests: tuple[dict[str, Any], ...] = ()
    ipc_mode: str | None = None
    shm_size: str | None = None
    mem_limit: str | None = None
    nano_cpus: int | None = None
    url: str = ""

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "environment"}
        fields["environment"] = redact_env(self.environment)
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"ContainerSpec({inner})"

    __str__ = __repr__

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for docker-py's ``client.containers.run``."""
        from docker.types import DeviceRequest

        kwargs: dict[str, Any] = {
            "image": self.image, "command": list(self.command), "name": self.name,
            "labels": dict(self.labels), "environment": dict(self.environment),
            "volumes": list(self.volumes), "detach": True, "init": True,
        }
        if self.network_mode:
            kwargs["network_mode"] = self.network_mode
        if self.network:
            kwargs["network"] = self.network
        if self.ports:
            kwargs["ports"] = dict(self.ports)
        if self.device_requests:
            kwargs["device_requests"] = [
                DeviceRequest(driver=r["Driver"], count=r["Count"], device_ids=r["DeviceIDs"],
                              capabilities=r["Capabilities"], options=r["Options"])
                for r in self.device_requests]
        for key in ("ipc_mode", "shm_size", "mem_limit", "nano_cpus"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        return kwargs


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if SECRET_ENV.search(k) and v else v) for k, v in env.items()}


def config_hash(model: Any, docker: Any) -> str:
    """What the container was built from, minus the port and secrets: a changed config
    is not adopted."""
    keys = ("name", "model", "image", "args", "command", "gpus", "network", "volumes", "env",
            "gguf_file", "mem_limit", "cpus", "served_model_name", "shm_size", "sleep_mode")
    data = {k: getattr(model, k, None) for k in keys}
    data["_docker"] = {"image": docker.image, "vllm_port": docker.vllm_port,
                       "hf_cache": docker.hf_cache, "network": docker.network}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def labels_for(prefix: str, model_name: str, port: int, cfg_hash: str) -> dict[str, str]:
    """The gateway's own labels, plus the conventional ``prometheus.io/*`` ones so a
    Prometheus ``docker_sd_configs`` job can find vLLM's /metrics without the gateway."""
    return {f"{prefix}.managed": "true", f"{prefix}.model": model_name,
            f"{prefix}.port": str(port), f"{prefix}.config": cfg_hash,
            "prometheus.io/scrape": "true", "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics"}


def url_for(mode: str, name: str, port: int) -> str:
    host = name if mode == NAMED else "127.0.0.1"
    return f"http://{host}:{port}"


def build_spec(model: Any, docker: Any, port: int, *, network: str | None = None,
               model_path: str | None = None, api_key: str | None = None) -> ContainerSpec:
    """The container for ``model``.

    ``port`` is the gateway-chosen port (host and bridge networking); on a named
    network the server listens on ``docker.vllm_port`` and ``network`` is the resolved
    network name. ``model_path`` replaces ``model`` (a downloaded GGUF file's path
    inside the container).
    """
    choice = network_choice(model, docker)
    mode = network_mode(choice)
    listen_port = docker.vllm_port if mode == NAMED else port
    name = container_name(docker.label_prefix, model.name)
    served = model.served_model_name or model.name
    model_ref = model_path or model.model or ""
    if model.command:
        command = tuple(str(part).replace("{port}", str(listen_port)).replace("{name}", served)
                        .replace("{model}", model_ref) for part in model.command)
    else:
        host = "127.0.0.1" if mode == HOST else "0.0.0.0"
        command = ("--model", model_ref, "--served-model-name", served,
                   "--port", str(listen_port), "--host", host, *map(str, model.args))
        if getattr(model, "sleep_mode", False) and "--enable-sleep-mode" not in command:
            command += ("--enable-sleep-mode",)
    env = dict(model.env)
    if getattr(model, "sleep_mode", False):
        env.setdefault("VLLM_SERVER_DEV_MODE", "1")  # vLLM serves /sleep and /wake_up only then
    if docker.hf_token:
        env.setdefault("HF_TOKEN", docker.hf_token)
    if api_key:
        env.setdefault(API_KEY_ENV, api_key)
    volumes = []
    if docker.hf_cache:
        volumes.append(f"{expand_host_path(docker.hf_cache)}:{CONTAINER_HF_CACHE}:rw")
    for entry in model.volumes:
        host, container, vmode = parse_volume(entry)
        volumes.append(f"{expand_host_path(host)}:{container}:{vmode}")
    gpus = parse_gpus(model.gpus)
    request = gpus.device_request()
    shm = getattr(model, "shm_size", None)
    spec: dict[str, Any] = {}
    if mode == HOST:
        spec["network_mode"] = "host"
    elif mode == BRIDGE:
        spec["ports"] = {f"{listen_port}/tcp": ("127.0.0.1", port)}
    else:
        spec["network"] = network or choice
    return ContainerSpec(
        name=name, image=model.image or docker.image, command=command,
        labels=labels_for(docker.label_prefix, model.name, port if mode != NAMED else listen_port,
                          config_hash(model, docker)),
        environment=env, volumes=tuple(volumes),
        device_requests=(request,) if request else (),
        ipc_mode=None if shm else "host", shm_size=str(shm) if shm else None,
        mem_limit=model.mem_limit,
        nano_cpus=int(model.cpus * 1_000_000_000) if model.cpus else None,
        url=url_for(mode, name, port if mode != NAMED else listen_port), **spec)


def api_key_from_env(env: Sequence[str] | None) -> str | None:
    """The API key a container was started with (its ``KEY=value`` environment list)."""
    for entry in env or ():
        name, _, value = entry.partition("=")
        if name == API_KEY_ENV and value:
            return value
    return None

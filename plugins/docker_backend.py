"""Built-in ``docker`` backend: one container per model, usually ``vllm/vllm-openai``.

The container spec is built by ``docker_spec.build_spec`` (pure, unit-tested). This
module does the talking: docker-py is synchronous, so every call runs in a small
thread pool under a time limit, and a slow or dead daemon never blocks the event
loop. Failures raise ``DockerBackendError`` with a message that says what to fix
("Docker daemon not reachable at ...", "image ... not found locally and could not be
pulled"); the fleet turns it into a 503 for the request and ``last_error`` in
``/gateway/status``.

Containers carry labels (``<docker.label_prefix>.managed/model/port/config``), so a
restarted gateway adopts a running container for a model instead of starting a
second one, and removes exited ones; at start-up it also removes the containers of
models that are no longer configured (``reap_orphans``). With
``docker.stop_on_shutdown: false`` the gateway leaves its containers running when it
stops, for the next one to adopt.

Settings reach the driver through ``configure(settings)``, which the gateway calls
before it validates models and starts anything.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from vllm_gateway_plugins import docker_spec as spec_mod

from gateway.hookspecs import hookimpl
from gateway.redact import redact, secrets_of
from gateway.types import RunningServer

log = logging.getLogger("vllm_gateway.docker")

API_TIMEOUT_S = 30.0       # one ordinary API call (inspect, list, create)
CONNECT_TIMEOUT_S = 10.0   # reaching the daemon at all
RECONNECT_AFTER_S = 2.0    # how long a failed connection attempt is remembered
STOP_GRACE_S = 10          # SIGTERM -> SIGKILL inside the container
LOG_TAIL_LINES = 20
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


class DockerBackendError(RuntimeError):
    """A container could not be started or managed; the message is for operators."""


class DockerUnavailable(DockerBackendError):
    """The daemon cannot be reached (or does not answer in time)."""


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def hf_download(**kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(**kwargs)


class DockerDriver:
    manages_lifecycle = True

    def __init__(self, client_factory: Callable[[], Any] | None = None,
                 download: Callable[..., str] = hf_download) -> None:
        from gateway.config import Docker, Settings

        self.settings: Settings = Settings()
        self.docker: Docker = self.settings.docker
        self._client_factory = client_factory or self._default_client
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._connect_error: tuple[float, DockerBackendError | None] = (0.0, None)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="docker-api")
        self._download = download
        self._gguf_locks: dict[str, asyncio.Lock] = {}
        self._gguf_paths: dict[str, str] = {}
        self._pull_locks: dict[str, asyncio.Lock] = {}

    # --- settings -----------------------------------------------------------------------

    def configure(self, settings: Any) -> None:
        """Called by the gateway (before validation and start-up) with its Settings."""
        self.settings = settings
        self.docker = settings.docker

    @property
    def stop_on_shutdown(self) -> bool:
        return bool(self.docker.stop_on_shutdown)

    # --- docker plumbing ----------------------------------------------------------------

    @staticmethod
    def _default_client() -> Any:
        import docker
        return docker.from_env(timeout=int(API_TIMEOUT_S))

    async def _run(self, what: str, fn: Callable[..., Any], *args: Any,
                   timeout: float = API_TIMEOUT_S, **kwargs: Any) -> Any:
        """Run a blocking docker-py call in the pool, bounded by ``timeout``."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise DockerUnavailable(f"Docker daemon at {docker_host()} did not answer within "
                                    f"{timeout:g}s ({what})") from None
        except Exception as exc:
            raise self._translate(exc, what) from None

    @staticmethod
    def _translate(exc: Exception, what: str) -> Exception:
        import docker.errors
        import requests

        if isinstance(exc, DockerBackendError):
            return exc
        if isinstance(exc, docker.errors.NotFound):
            return exc  # callers decide what a missing object means
        if isinstance(exc, docker.errors.APIError):
            detail = exc.explanation or str(exc)
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            return DockerBackendError(f"Docker API error while trying to {what}: {detail}")
        if isinstance(exc, (requests.exceptions.ConnectionError, docker.errors.DockerException,
                            requests.exceptions.Timeout, OSError)):
            return DockerUnavailable(f"Docker daemon not reachable at {docker_host()}: "
                                     f"{_short(exc)}")
        return DockerBackendError(f"Docker: {what} failed: {type(exc).__name__}: {exc}")

    async def client(self) -> Any:
        """The docker client, connected on first use. A failure to connect is remembered
        for ``RECONNECT_AFTER_S`` so that N models do not each wait on a hung daemon."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                failed_at, error = self._connect_error
                if error is not None and time.monotonic() - failed_at < RECONNECT_AFTER_S:
                    raise error
                try:
                    client = await self._run("connect", self._client_factory,
                                             timeout=CONNECT_TIMEOUT_S)
                    await self._run("ping", client.ping, timeout=CONNECT_TIMEOUT_S)
                except DockerBackendError as exc:
                    self._connect_error = (time.monotonic(), exc)
                    raise
                self._client = client
                self._connect_error = (0.0, None)
        return self._client

    async def _container(self, ident: str) -> Any | None:
        import docker.errors

        client = await self.client()
        try:
            return await self._run("inspect a container", client.containers.get, ident)
        except docker.errors.NotFound:
            return None

    async def _labelled(self, model_name: str | None = None) -> list[Any]:
        prefix = self.docker.label_prefix
        labels = [f"{prefix}.managed=true"]
        if model_name is not None:
            labels.append(f"{prefix}.model={model_name}")
        client = await self.client()
        return await self._run("list containers", client.containers.list, all=True,
                               filters={"label": labels}, ignore_removed=True)

    async def _remove(self, container: Any, grace: int = STOP_GRACE_S) -> None:
        """Stop (SIGTERM, then SIGKILL after ``grace``) and remove; gone already is fine."""
        import docker.errors

        try:
            await self._run("reload a container", container.reload)
            if container.status in ("running", "restarting", "paused"):
                await self._run(f"stop container {container.name}",
                                lambda: container.stop(timeout=grace),
                                timeout=API_TIMEOUT_S + grace)
            await self._run("remove a container", container.remove, force=True)
        except docker.errors.NotFound:
            return

    # --- images, networks, files ----------------------------------------------------------

    async def _ensure_image(self, image: str, timeout: float) -> None:
        import docker.errors
        from docker.utils import parse_repository_tag

        client = await self.client()
        lock = self._pull_locks.setdefault(image, asyncio.Lock())
        async with lock:
            try:
                await self._run("inspect an image", client.images.get, image)
                return
            except docker.errors.NotFound:
                pass
            repo, tag = parse_repository_tag(image)
            log.info("image %s not present locally; pulling it", image)
            try:
                await self._run(f"pull {image}", client.images.pull, repo, tag=tag or "latest",
                                timeout=timeout)
            except DockerUnavailable as exc:
                if "not reachable" in str(exc):
                    raise
                raise DockerBackendError(f"image {image} not found locally and could not be "
                                         f"pulled: {exc}") from None
            except (docker.errors.NotFound, DockerBackendError) as exc:
                detail = getattr(exc, "explanation", None) or str(exc)
                raise DockerBackendError(f"image {image} not found locally and could not be "
                                         f"pulled: {detail}") from None

    async def _resolve_network(self, wanted: str) -> str:
        client = await self.client()
        networks = await self._run("list networks", client.networks.list)
        try:
            return spec_mod.resolve_network_name(wanted, [n.name for n in networks])
        except LookupError as exc:
            raise DockerBackendError(str(exc)) from None

    async def gguf_path(self, model: Any) -> str:
        """Download ``gguf_file`` once (concurrent starts wait for the same download) and
        return its host path under the HF cache."""
        lock = self._gguf_locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            cached = self._gguf_paths.get(model.name)
            if cached and os.path.exists(cached):
                return cached
            hf_cache = self.docker.hf_cache
            if not spec_mod.hf_cache_is_path(hf_cache):
                raise DockerBackendError(f"model {model.name!r}: gguf_file needs docker.hf_cache "
                                         f"to be a directory (got volume name {hf_cache!r})")
            cache_dir = os.path.join(spec_mod.expand_host_path(hf_cache), "hub")
            log.info("downloading %s from %s into %s", model.gguf_file, model.model, cache_dir)
            try:
                path = await asyncio.to_thread(
                    self._download, repo_id=model.model, filename=model.gguf_file,
                    cache_dir=cache_dir, token=self.docker.hf_token or None)
            except Exception as exc:
                raise DockerBackendError(f"model {model.name!r}: cannot download "
                                         f"{model.gguf_file} from {model.model}: "
                                         f"{type(exc).__name__}: {_short(exc)}") from None
            self._gguf_paths[model.name] = str(path)
            return str(path)

    # --- the driver protocol ------------------------------------------------------------

    def validate(self, model: Any) -> list[str]:
        return spec_mod.validate_model(model)

    def build_spec(self, model: Any, port: int, network: str | None = None,
                   model_path: str | None = None,
                   api_key: str | None = None) -> spec_mod.ContainerSpec:
        return spec_mod.build_spec(model, self.docker, port, network=network,
                                   model_path=model_path, api_key=api_key)

    async def start(self, model: Any, port: int) -> RunningServer:
        timeout = self.settings.start_timeout(model)
        choice = spec_mod.network_choice(model, self.docker)
        mode = spec_mod.network_mode(choice)
        network = await self._resolve_network(choice) if mode == spec_mod.NAMED else None
        model_path = None
        if model.gguf_file:
            host_file = await self.gguf_path(model)
            model_path = spec_mod.container_path_for(host_file, self.docker.hf_cache)
        api_key = model.env.get(spec_mod.API_KEY_ENV) or secrets.token_urlsafe(24)
        spec = self.build_spec(model, port, network=network, model_path=model_path,
                               api_key=api_key)
        await self._ensure_image(spec.image, timeout)
        await self._remove_stale(model, spec.name)
        client = await self.client()
        log.info("starting container %s for model %s: %r", spec.name, model.name, spec)
        try:
            container = await self._run(f"start container {spec.name}", client.containers.run,
                                        **spec.run_kwargs())
        except DockerBackendError:
            # run = create + start: a failed start leaves a created container behind
            await asyncio.shield(self._cleanup_named(spec.name))
            raise
        return RunningServer(url=spec.url, ident=container.id,
                             extra={"container": spec.name, "image": spec.image,
                                    "api_key": api_key})

    async def _remove_stale(self, model: Any, name: str) -> None:
        """A container with our name left behind (crashed, killed, config changed) goes."""
        prefix = self.docker.label_prefix
        stale = await self._container(name)
        if stale is None:
            return
        if stale.labels.get(f"{prefix}.managed") != "true":
            raise DockerBackendError(f"a container named {name} exists and was not started by "
                                     f"this gateway ({prefix}.managed label missing); remove it "
                                     "or change docker.label_prefix")
        log.info("removing stale container %s (%s) of model %s", name, stale.status, model.name)
        await self._remove(stale)

    async def _cleanup_named(self, name: str) -> None:
        try:
            container = await self._container(name)
            if container is not None:
                await self._remove(container)
        except Exception as exc:
            log.warning("cannot remove container %s after a failed start: %s", name, exc)

    async def stop(self, model: Any, server: RunningServer) -> None:
        container = await self._container(server.ident)
        if container is None:
            return
        tail = await self._tail(container, LOG_TAIL_LINES, model)
        if tail:
            log.info("container %s (model %s) last log lines:\n%s", container.name, model.name,
                     tail)
        await self._remove(container)

    async def is_running(self, model: Any, server: RunningServer) -> bool:
        try:
            container = await self._container(server.ident)
        except DockerBackendError as exc:
            # An unreachable daemon does not mean a dead container: say "running" so a
            # daemon hiccup does not restart every model; requests will tell otherwise.
            log.warning("cannot check container of %s: %s", model.name, exc)
            return True
        return container is not None and container.status == "running"

    async def adopt(self, model: Any) -> RunningServer | None:
        """A running container this gateway (or its predecessor) started for ``model``
        with the same config; exited, dead or out-of-date ones are removed."""
        prefix = self.docker.label_prefix
        want_hash = spec_mod.config_hash(model, self.docker)
        mode = spec_mod.network_mode(spec_mod.network_choice(model, self.docker))
        found: RunningServer | None = None
        for container in await self._labelled(model.name):
            labels = container.labels or {}
            port = labels.get(f"{prefix}.port", "")
            usable = (found is None and container.status == "running" and port.isdigit()
                      and labels.get(f"{prefix}.config") == want_hash)
            if usable:
                env = ((getattr(container, "attrs", None) or {}).get("Config") or {}).get("Env")
                found = RunningServer(url=spec_mod.url_for(mode, container.name, int(port)),
                                      ident=container.id,
                                      extra={"container": container.name, "adopted": True,
                                             "api_key": spec_mod.api_key_from_env(env)})
                continue
            why = container.status if container.status != "running" else "config changed"
            log.info("removing container %s of model %s (%s)", container.name, model.name, why)
            await self._remove(container)
        return found

    async def logs_tail(self, model: Any, server: RunningServer, lines: int = 20) -> str:
        try:
            container = await self._container(server.ident)
        except DockerBackendError:
            return ""
        return await self._tail(container, lines, model) if container is not None else ""

    async def _tail(self, container: Any, lines: int, model: Any = None) -> str:
        try:
            raw = await self._run("read container logs", container.logs, tail=lines)
        except Exception:
            return ""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return redact(text, secrets_of(model, self.settings)).rstrip()

    async def reap_orphans(self, models: list[Any]) -> None:
        """At start-up: stop and remove containers with this gateway's labels whose model
        is no longer configured (for this backend). Containers of configured models are
        left to ``adopt``. An unreachable daemon is logged, not raised: the gateway starts
        anyway."""
        prefix = self.docker.label_prefix
        configured = {m.name for m in models}
        try:
            containers = await self._labelled()
        except DockerBackendError as exc:
            log.warning("cannot look for containers of unconfigured models: %s", exc)
            return

        async def remove(container: Any, model_name: str | None) -> None:
            log.warning("removing container %s of model %s, which is no longer configured",
                        container.name, model_name or "(unlabelled)")
            try:
                await self._remove(container)
            except DockerBackendError as exc:
                log.warning("cannot remove container %s: %s", container.name, exc)

        stale = [(c, (c.labels or {}).get(f"{prefix}.model")) for c in containers]
        await asyncio.gather(*(remove(c, name) for c, name in stale if name not in configured))

    # --- for tests and operators ----------------------------------------------------------

    async def managed_containers(self) -> list[Any]:
        return await self._labelled()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


@hookimpl(trylast=True)
def register_backends(register):
    register("docker", DockerDriver())

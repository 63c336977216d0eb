"""Config reload: SIGHUP and ``POST /gateway/reload`` re-read the file the gateway started with.

A reload is all or nothing. The file is read exactly as at start (``load_settings``: the
same environment overrides, then the same ``--host``/``--port``) and every model is
checked by its backend driver. If anything is wrong the gateway keeps the config it
has, logs one line per problem and answers 400 with them. Otherwise the difference is
applied without a restart:

- added models get a runtime and their metrics series, and are served at once;
- removed models leave the fleet at once (new requests get 404 ``model_not_found``);
  requests they hold or queue finish, then their servers stop (``Fleet.reconfigure``);
- limits (``max_concurrent``, ``max_queue``, ``queue_timeout_s``, the ``limits:``
  section, timeouts, retries) apply now: admission is resized in place, and a running
  model's connection pool is replaced by one of the new size (the old one closes once
  the attempts under way on it are done; a stopped model's comes with its next start);
- what a model's server runs (command, image, args, env, ...) applies at its next start:
  a running server keeps running as started;
- what cannot change under a running server or listener is reported in
  ``restart_required`` and keeps its running value: ``RESTART_KEYS`` and the URLs of a
  model without a lifecycle (``static``), or a model's ``backend``.

The swap itself (``_install``) is one synchronous function, so no request, hook or
background task sees half of the old config and half of the new. It also refreshes the
objects that copy values out of the settings when they are built.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sanic import Sanic

from gateway.config import ConfigError, ModelConfig, Settings, salvage
from gateway.cors import CorsPolicy
from gateway.drivers import check_models, configure_drivers
from gateway.types import RetrySettings

log = logging.getLogger("vllm_gateway.reload")
# Settings that only a restart can change: the listener, what is loaded and wired at
# build time (plugins, tracing, the logging set-up, extra routes, the footprints file),
# and what running servers' bookkeeping depends on (log files, container labels).
RESTART_KEYS = ("listen", "plugins", "tracing", "logging", "upstream.extra_paths",
                "gpu.footprints_file", "server_logs", "docker.label_prefix")
FIXED_SERVER_KEYS = ("url", "urls")  # a model without a lifecycle is "started" only once


@dataclass
class Plan:
    """What a valid new config changes, and the settings to install for it."""

    settings: Settings
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """A reload's result: ``result`` is the metric label, ``status`` the HTTP status."""

    result: str  # success | invalid | error
    status: int
    message: str
    code: str = ""
    problems: list[str] = field(default_factory=list)
    plan: Plan | None = None

    def body(self) -> dict[str, Any]:
        if self.plan is not None:
            p = self.plan
            return {"result": "success", "added": p.added, "removed": p.removed,
                    "changed": p.changed, "restart_required": p.restart_required}
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body: dict[str, Any] = {"error": {"message": self.message, "type": kind, "param": None,
                                          "code": self.code}}
        if self.result == "invalid":
            body["problems"] = self.problems
        return body


def plan_reload(old: Settings, new: Settings, fixed_server: Callable[[str], bool]) -> Plan:
    """Compare the running settings with a valid new ``Settings``; ``fixed_server(name)``
    says whether that model's server was started once and for all (no lifecycle)."""
    restart: list[str] = []
    for key in RESTART_KEYS:
        keys = _changed_keys(_get(old, key), _get(new, key), key)
        if keys:
            restart.extend(keys)
            new = _with(new, key, _get(old, key))
    before = {m.name: m for m in old.models}
    plan = Plan(new)
    models: list[ModelConfig] = []
    for m in new.models:
        was = before.get(m.name)
        if was is None:
            plan.added.append(m.name)
            models.append(m)
            continue
        if m.backend != was.backend:
            restart.append(f"models[{m.name}].backend")
            m = was  # another driver would mean another runtime: kept as it runs
        elif fixed_server(m.name):
            kept = {k: getattr(was, k) for k in FIXED_SERVER_KEYS if getattr(m, k) != getattr(was, k)}
            restart.extend(f"models[{m.name}].{k}" for k in kept)
            m = m.model_copy(update=kept) if kept else m
        if m.model_dump() != was.model_dump() or _limits(old, was) != _limits(new, m):
            plan.changed.append(m.name)
        models.append(m)
    names = {m.name for m in new.models}
    plan.removed = [name for name in before if name not in names]
    plan.restart_required = restart
    plan.settings = new.model_copy(update={"models": models})
    return plan


def _limits(settings: Settings, m: ModelConfig) -> tuple[Any, ...]:
    return (settings.max_concurrent(m), settings.max_queue(m), settings.limits.queue_timeout_s,
            settings.idle_timeout(m), settings.start_timeout(m))


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _with(model: BaseModel, dotted: str, value: Any) -> Any:
    """A copy of ``model`` with the value at ``dotted`` replaced (fields set are kept)."""
    head, _, rest = dotted.partition(".")
    return model.model_copy(update={head: _with(getattr(model, head), rest, value) if rest
                                    else value})


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys of the leaves that differ (lists compare whole)."""
    a = old.model_dump() if isinstance(old, BaseModel) else old
    b = new.model_dump() if isinstance(new, BaseModel) else new
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _changed_keys(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]


def backend_problems(settings: Settings, running: Settings, drivers: dict[str, Any],
                     source: str, dropped: dict[str, set[str]] | None = None) -> list[str]:
    """Every model's problems as its driver sees them (``validate``), the drivers briefly
    configured with ``settings`` and then given ``running`` back. Problems with keys that
    already failed validation (``dropped``, from ``salvage``) are not repeated."""
    configure_drivers(settings, drivers)
    try:
        check_models(settings, drivers, source)
    except ConfigError as exc:
        return [line for line in exc.lines if not about_dropped(line, dropped or {}, source)]
    finally:
        configure_drivers(running, drivers)
    return []


def about_dropped(line: str, dropped: dict[str, set[str]], source: str) -> bool:
    """Whether a driver's problem line is about a key ``salvage`` left out of its model."""
    for name, keys in dropped.items():
        head = f"{source}: models[{name}]."
        if line.startswith(head) and line[len(head):].split(":", 1)[0].split(".")[0] in keys:
            return True
    return False


def _install(app: Sanic, gw: Any, settings: Settings, added: dict[str, Any]) -> None:
    """The swap: every holder of the settings, and of values copied out of them, gets
    the new ones in this one synchronous step (no ``await``: nothing runs in between)."""
    fleet = gw.fleet
    configure_drivers(settings, fleet.drivers)
    gw.settings = settings
    forwarder = gw.forwarder
    forwarder.settings = settings
    up = settings.upstream
    forwarder.retry_settings = RetrySettings(up.retries, up.backoff_s, up.backoff_multiplier)
    forwarder.buffer_cap = settings.limits.max_buffered_response_bytes
    reader = gw.reader
    reader.limits = settings.limits
    reader.budget.cap = settings.limits.max_body_buffer_bytes
    reader.budget.give(0)  # re-runs its hand-out: a larger budget admits waiting bodies now
    app.config.REQUEST_TIMEOUT = settings.limits.header_timeout_s  # read per new connection
    app.config.REQUEST_MAX_SIZE = settings.limits.max_request_bytes
    app.ctx.max_connections = settings.limits.max_connections
    fleet.reconfigure(settings, added)
    for name in added:
        gw.metrics.init_model(name)
    gw.tenancy.reconfigure(settings.auth)  # keys re-read (keys_file too); usage kept by name
    gw.metrics.init_keys(gw.tenancy.names)
    gw.cors = CorsPolicy(settings.cors)


class Reloader:
    """Runs reloads one at a time for one app; ``load()`` reads the config as ``serve``
    did (None: the gateway was started without a file)."""

    def __init__(self, app: Sanic, load: Callable[[], Settings] | None, source: str) -> None:
        self.app = app
        self.gw = app.ctx.gateway
        self._load = load
        self.source = source
        self._lock = asyncio.Lock()

    async def reload(self, trigger: str) -> Outcome:
        async with self._lock:
            try:
                outcome = await self._reload()
            except Exception as exc:  # a driver or a bug: logged, counted, answered 500
                outcome = Outcome("error", 500, f"config reload failed: {type(exc).__name__}: "
                                  f"{exc}", "reload_failed")
        self.gw.metrics.config_reloads.labels(outcome.result).inc()
        self._log(trigger, outcome)
        return outcome

    async def _reload(self) -> Outcome:
        if self._load is None:
            return Outcome("error", 400, "no config file to reload: the gateway was started "
                           "without --config (the built-in demo)", "no_config_file")
        fleet = self.gw.fleet
        if self.gw.draining or fleet.closing:
            return Outcome("error", 503, "the gateway is shutting down; config not reloaded",
                           "shutting_down")
        running: Settings = self.gw.settings
        try:
            new = self._load()
        except ConfigError as exc:
            return self._invalid(exc, running)
        plan = plan_reload(running, new, lambda name: name in fleet.runtimes
                           and not fleet.runtimes[name].manages_lifecycle)
        problems = backend_problems(plan.settings, running, fleet.drivers, self.source)
        if problems:
            return Outcome("invalid", 400, _invalid_message(len(problems)), "invalid_config",
                           problems)
        added = await self._prepare(plan)
        if self.gw.draining or fleet.closing:
            for rt in added.values():
                await fleet.discard_runtime(rt)
            return Outcome("error", 503, "the gateway began shutting down; config not "
                           "reloaded", "shutting_down")
        _install(self.app, self.gw, plan.settings, added)
        for name in plan.added:
            if plan.settings.model(name).preload and name in added:
                fleet.start_soon(fleet.runtimes[name], "preload")
        return Outcome("success", 200, "config reloaded", plan=plan)

    def _invalid(self, exc: ConfigError, running: Settings) -> Outcome:
        """Schema problems, plus the drivers' problems with whatever still validates."""
        lines = list(exc.lines)
        if exc.raw is not None:
            partial, dropped = salvage(exc.raw)
            if partial is not None:
                lines += backend_problems(partial, running, self.gw.fleet.drivers, self.source,
                                          dropped)
        return Outcome("invalid", 400, _invalid_message(len(lines)), "invalid_config", lines)

    async def _prepare(self, plan: Plan) -> dict[str, Any]:
        """Runtimes for the models added (a removed one still retiring is taken back
        instead, if its backend is the same)."""
        fleet = self.gw.fleet
        added: dict[str, Any] = {}
        try:
            for name in plan.added:
                cfg = plan.settings.model(name)
                back = fleet.retiring(name)
                if back is not None and back.cfg.backend == cfg.backend:
                    continue
                added[name] = await fleet.prepare_runtime(cfg, plan.settings)
        except BaseException:
            for rt in added.values():
                await fleet.discard_runtime(rt)
            raise
        return added

    def _log(self, trigger: str, outcome: Outcome) -> None:
        if outcome.plan is not None:
            p = outcome.plan
            log.info("config reloaded from %s (%s): added %s, removed %s, changed %s%s",
                     self.source, trigger, p.added or "none", p.removed or "none",
                     p.changed or "none", f"; restart required to apply {p.restart_required}"
                     if p.restart_required else "")
            return
        if outcome.result == "invalid":
            log.error("config reload (%s): %d problem(s) in the new config; still running on "
                      "the previous config", trigger, len(outcome.problems))
            for line in outcome.problems:
                log.error("%s", line)
            return
        log.error("config reload (%s): %s", trigger, outcome.message)


def _invalid_message(count: int) -> str:
    return (f"the new config has {count} problem{'s' if count != 1 else ''} (listed in "
            "problems); still running on the previous config")


def reloader(app: Sanic) -> Reloader:
    """The app's one Reloader, made on first use from what ``serve`` left on ``app.ctx``
    (``config_loader``, ``config_source``; absent for the built-in demo and for apps
    built in tests, whose reloads answer 400 ``no_config_file``)."""
    found = getattr(app.ctx, "reloader", None)
    if found is None:
        found = app.ctx.reloader = Reloader(app, getattr(app.ctx, "config_loader", None),
                                            getattr(app.ctx, "config_source", "config"))
    return found

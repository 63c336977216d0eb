"""Building the plugin manager: built-ins first, then entry points, then checks.

Built-in plugins come from an explicit list (as llm, datasette and pytest do) and are
``trylast`` defaults; third-party plugins load from the ``vllm_gateway`` entry-point
group and answer first. Config (``plugins.disabled``) or the environment variable
VLLM_GATEWAY_LOAD_PLUGINS (a comma-separated allow-list of entry-point names) limit
what loads.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from gateway import hookspecs
from gateway.hookspecs import ASYNC_CAPABLE_HOOKS, PROJECT, SYNC_ONLY_HOOKS

log = logging.getLogger("vllm_gateway.plugins")
ENTRY_POINT_GROUP = "vllm_gateway"
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("process_backend", "vllm_gateway_plugins.process_backend"),
    ("static_backend", "vllm_gateway_plugins.static_backend"),
    ("docker_backend", "vllm_gateway_plugins.docker_backend"),
    ("least_busy_selection", "vllm_gateway_plugins.least_busy"),
    ("lru_eviction", "vllm_gateway_plugins.lru_eviction"),
    ("backoff_retry", "vllm_gateway_plugins.backoff_retry"),
    ("nvml_vram", "vllm_gateway_plugins.nvml_vram"),
)


class PluginError(Exception):
    """A plugin breaks the contract; the message names the plugin and the hook."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    origin: str  # "builtin" or "distribution <name> <version>"
    hooks: tuple[str, ...]


def build_plugin_manager(disabled: Iterable[str] = (), load_entrypoints: bool = True,
                         extra: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    """Create a fresh manager; ``extra`` registers (name, plugin) pairs, e.g. from tests."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    for name, module in DEFAULT_PLUGINS:
        if not pm.is_blocked(name):
            try:
                plugin = importlib.import_module(module)
            except ImportError as exc:
                raise PluginError(f"built-in plugin {name}: cannot import: {exc}") from exc
            _register(pm, plugin, name)
    extra = list(extra)
    installed = _entry_points() if load_entrypoints else []
    if load_entrypoints:
        _load_entrypoints(pm, installed)
    for name, plugin in extra:
        if not pm.is_blocked(name):
            _register(pm, plugin, name)
    check_contract(pm)
    known = ({n for n, _ in DEFAULT_PLUGINS} | {n for n, _ in extra}
             | {ep.name for ep, _ in (installed if load_entrypoints else _entry_points())})
    for name in disabled:
        if name not in known:
            log.warning("plugins.disabled: no plugin is named %r%s; nothing disabled by it",
                        name, _did_you_mean(name, known))
    return pm


def import_plugin_modules(names: Iterable[str], source: str = "config") -> list[tuple[str, object]]:
    """Import ``plugins.modules``: (name, module) each; PluginError with one line per
    module that cannot be imported, naming it."""
    out, lines = [], []
    for name in names:
        try:
            out.append((name, importlib.import_module(name)))
        except Exception as exc:  # not found, or the module raised while importing
            lines.append(f"{source}: plugins.modules: cannot import {name!r}: "
                         f"{type(exc).__name__}: {exc}{_where(exc)}")
    if lines:
        raise PluginError("\n".join(lines))
    return out


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _where(exc: BaseException) -> str:
    """`` (at file.py:12)``: the innermost frame of the plugin's own code, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and f"{os.sep}importlib{os.sep}" not in f.filename
              and f"{os.sep}pluggy{os.sep}" not in f.filename
              and os.path.dirname(f.filename) != os.path.dirname(__file__)]
    if not frames:
        return ""
    return f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})"


def _one_line(exc: BaseException) -> str:
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """pm.register, with pluggy's signature errors (an argument the hookspec lacks)
    turned into PluginError naming the plugin."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name}: {_one_line(exc)}") from None


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, importlib.metadata.Distribution]]:
    """Every installed entry point of the group, with its distribution, in the order
    pluggy loads them."""
    return [(ep, dist) for dist in importlib.metadata.distributions()
            for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]


def _load_entrypoints(pm: pluggy.PluginManager, installed: list) -> None:
    """Load entry-point plugins one by one (VLLM_GATEWAY_LOAD_PLUGINS: only those named),
    so a broken one is reported with its entry point and distribution."""
    allow_text = os.environ.get("VLLM_GATEWAY_LOAD_PLUGINS")
    allow = None if allow_text is None else {
        n for n in (n.strip() for n in allow_text.split(",")) if n}
    names = {ep.name for ep, _ in installed}
    builtin = {n for n, _ in DEFAULT_PLUGINS}
    for name in sorted(allow or ()):
        if name in builtin:
            log.warning("VLLM_GATEWAY_LOAD_PLUGINS: %r is a built-in plugin, always loaded "
                        "(the list names entry-point plugins; disable built-ins with "
                        "plugins.disabled)", name)
        elif name not in names:
            log.warning("VLLM_GATEWAY_LOAD_PLUGINS: no entry-point plugin named %r is "
                        "installed%s (installed: %s)", name, _did_you_mean(name, names),
                        ", ".join(sorted(names)) or "none")
    for ep, dist in installed:
        if allow is not None and ep.name not in allow:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        origin = f"distribution {dist.metadata['name']} {dist.version}"
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except pluggy.PluginValidationError as exc:  # a hook's signature breaks the spec
            raise PluginError(f"entry-point plugin {ep.name} ({origin}): {_one_line(exc)}"
                              ) from None
        except Exception as exc:  # the plugin's module failed to import
            raise PluginError(f"cannot load plugins from entry-point group {ENTRY_POINT_GROUP!r}: "
                              f"entry point {ep.name} = {ep.value} ({origin}): "
                              f"{type(exc).__name__}: {_one_line(exc)}{_where(exc)}"
                              ) from None


def check_contract(pm: pluggy.PluginManager) -> None:
    """Refuse misspelled hooks and async implementations of sync-only hooks."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)}: {exc}") from None
    for hook_name in SYNC_ONLY_HOOKS + ASYNC_CAPABLE_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            fn = impl.function
            if hook_name in SYNC_ONLY_HOOKS and (inspect.iscoroutinefunction(fn)
                                                 or inspect.isasyncgenfunction(fn)):
                raise PluginError(
                    f"plugin {impl.plugin_name}: hook {hook_name} must be a plain (sync) function; "
                    "an async implementation would always win a first-result call")
            # HookRunner calls every implementation itself, so a wrapper would run as a
            # plain implementation: refuse it for every hook, not only the sync ones.
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"plugin {impl.plugin_name}: hook {hook_name} does not "
                                  "support wrappers (the core times each implementation)")


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    builtin = {name for name, _ in DEFAULT_PLUGINS}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        dist = dists.get(id(plugin))
        if dist is not None:
            origin = f"distribution {dist.project_name} {dist.version}"
        elif name in builtin:
            origin = "builtin"
        else:
            origin = "registered"
        out.append(PluginInfo(name, origin, hooks))
    return out


Observer = Callable[[str, str, float, BaseException | None], None]


def _log_failure(plugin: str, hook: str, exc: BaseException) -> None:
    """One line naming the plugin, for a hook that raised where the caller turns it into an
    answer (500 ``plugin_error``) or a failed start-up rather than logging it itself."""
    log.error("plugin %s: hook %s raised %s: %s%s", plugin, hook, type(exc).__name__,
              _one_line(exc), _where(exc))


class HookRunner:
    """Calls hooks implementation by implementation, timing and isolating each.

    pluggy wrappers cannot await, so this is where per-plugin time is measured
    (``observe(hook, plugin, seconds, error)``). Call order matches pluggy's:
    tryfirst, then the most recently registered, then trylast.
    """

    def __init__(self, pm: pluggy.PluginManager, observe: Observer | None = None) -> None:
        self.pm = pm
        self._observe = observe or (lambda *a: None)
        self._impls = {name: list(reversed(getattr(pm.hook, name).get_hookimpls()))
                       for name in SYNC_ONLY_HOOKS + ASYNC_CAPABLE_HOOKS}

    def _call(self, hook: str, impl: Any, kwargs: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            result = impl.function(*(kwargs[a] for a in impl.argnames))
        except BaseException as exc:
            self._observe(hook, impl.plugin_name, time.perf_counter() - started, exc)
            _log_failure(impl.plugin_name, hook, exc)
            raise PluginError(f"plugin {impl.plugin_name}: hook {hook} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        self._observe(hook, impl.plugin_name, time.perf_counter() - started, None)
        return result

    def first(self, hook: str, **kwargs: Any) -> Any:
        """First non-None answer of a sync decision hook; PluginError if one raises."""
        return self.first_with_name(hook, **kwargs)[0]

    def first_with_name(self, hook: str, **kwargs: Any) -> tuple[Any, str | None]:
        """``first``, plus the name of the plugin that answered."""
        for impl in self._impls[hook]:
            result = self._call(hook, impl, kwargs)
            if inspect.isawaitable(result):  # a plain def returning a coroutine slipped past
                getattr(result, "close", lambda: None)()
                raise PluginError(f"plugin {impl.plugin_name}: hook {hook} returned an awaitable; "
                                  "decision hooks must answer synchronously")
            if result is not None:
                return result, impl.plugin_name
        return None, None

    def implementations(self) -> list[tuple[str, str]]:
        """(hook, plugin) for every implementation, in call order."""
        return [(hook, impl.plugin_name) for hook, impls in self._impls.items() for impl in impls]

    def has_impls(self, hook: str) -> bool:
        return bool(self._impls[hook])

    async def each(self, hook: str, *, isolate: bool = False, **kwargs: Any) -> list[Any]:
        """Collect-all: call every implementation, awaiting awaitable results.

        With ``isolate`` an error is observed and skipped (observers fail open);
        otherwise it propagates as PluginError (start-up fails closed).
        """
        results = []
        for impl in self._impls[hook]:
            started = time.perf_counter()
            error: Exception | None = None
            try:
                result = impl.function(*(kwargs[a] for a in impl.argnames))
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                error = exc
            finally:
                self._observe(hook, impl.plugin_name, time.perf_counter() - started, error)
            if error is not None:
                if isolate:  # the hookspec promises the error is logged, not swallowed
                    log.error("plugin %s: hook %s raised %s: %s", impl.plugin_name, hook,
                              type(error).__name__, error, exc_info=error)
                    continue
                _log_failure(impl.plugin_name, hook, error)
                raise PluginError(f"plugin {impl.plugin_name}: hook {hook} raised "
                                  f"{type(error).__name__}: {error}") from error
            results.append(result)
        return results

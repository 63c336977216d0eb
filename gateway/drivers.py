"""Backend drivers: collected from the ``register_backends`` hook and checked
against every model's config, so a bad model entry fails at start-up, not on the
first request."""
from __future__ import annotations

from gateway.config import ConfigError, Settings
from gateway.plugins import DEFAULT_PLUGINS, PluginError
from gateway.types import BackendDriver


def collect_drivers(pm) -> dict[str, BackendDriver]:
    """Call every ``register_backends``; a plugin may replace a built-in's backend, but
    two plugins claiming one backend name is a PluginError naming both."""
    drivers: dict[str, BackendDriver] = {}
    owners: dict[str, str] = {}
    builtin = {name for name, _ in DEFAULT_PLUGINS}

    # get_hookimpls() lists trylast built-ins first, so third-party drivers register later
    for impl in pm.hook.register_backends.get_hookimpls():
        plugin = impl.plugin_name

        def register(name: str, driver: BackendDriver, plugin: str = plugin) -> None:
            owner = owners.get(name)
            if owner is not None and owner not in builtin:
                if plugin in builtin:
                    return  # a (trylast) third-party driver keeps its name against a built-in
                raise PluginError(f"plugin {plugin}: backend {name!r} is already registered "
                                  f"by plugin {owner}")
            drivers[name] = driver  # later (third-party) registrations override built-ins
            owners[name] = plugin

        try:
            impl.function(register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin}: hook register_backends raised "
                              f"{type(exc).__name__}: {exc}") from exc
    return drivers


def configure_drivers(settings: Settings, drivers: dict[str, BackendDriver]) -> None:
    """Hand the Settings to every driver that has the optional ``configure`` method."""
    for driver in drivers.values():
        configure = getattr(driver, "configure", None)
        if callable(configure):
            configure(settings)


def check_models(settings: Settings, drivers: dict[str, BackendDriver], source: str) -> None:
    """Raise ConfigError with one line per model problem (drivers already configured)."""
    lines = []
    for model in settings.models:
        where = f"{source}: models[{model.name}]"  # names are unique once validated
        driver = drivers.get(model.backend)
        if driver is None:
            known = ", ".join(sorted(drivers)) or "none"
            lines.append(f"{where}.backend: unknown backend {model.backend!r} (known: {known})")
            continue
        lines.extend(f"{where}.{problem}" for problem in driver.validate(model))
    if lines:
        raise ConfigError(lines)

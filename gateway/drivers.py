"""Backend drivers: collected from the ``register_backends`` hook and checked
against every model's config, so a bad model entry fails at start-up, not on the
first request."""
from __future__ import annotations

from gateway.config import ConfigError, Settings
from gateway.types import BackendDriver


def collect_drivers(pm) -> dict[str, BackendDriver]:
    drivers: dict[str, BackendDriver] = {}

    def register(name: str, driver: BackendDriver) -> None:
        drivers[name] = driver  # later (third-party) registrations override built-ins

    # get_hookimpls() lists trylast built-ins first, so third-party drivers register later
    for impl in pm.hook.register_backends.get_hookimpls():
        impl.function(register)
    return drivers


def check_models(settings: Settings, drivers: dict[str, BackendDriver], source: str) -> None:
    """Raise ConfigError with one line per model problem."""
    lines = []
    for i, model in enumerate(settings.models):
        where = f"{source}: models.{i} ({model.name})"
        driver = drivers.get(model.backend)
        if driver is None:
            known = ", ".join(sorted(drivers)) or "none"
            lines.append(f"{where}.backend: unknown backend {model.backend!r} (known: {known})")
            continue
        lines.extend(f"{where}.{problem}" for problem in driver.validate(model))
    if lines:
        raise ConfigError(lines)

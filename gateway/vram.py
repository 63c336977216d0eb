"""GPU memory: what is there, and how much each model needs.

A model's footprint is its configured ``vram_mib``, else what was learned on its last
start (NVML used memory before and after it became healthy), else a first-start
estimate. Learned values persist atomically in a JSON file across restarts; a corrupt
file is reported and ignored, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.plugins import PluginError

if TYPE_CHECKING:
    from gateway.config import ModelConfig, Settings
    from gateway.plugins import HookRunner
    from gateway.types import EvictionRequest, VramReading

log = logging.getLogger("vllm_gateway.vram")


class FootprintStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._learned: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("footprints file %s is unreadable (%s); ignoring it", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("footprints file %s is not a JSON object; ignoring it", self.path)
            return {}
        return {str(k): int(v) for k, v in data.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 10_000_000}

    def get(self, model: str) -> int | None:
        return self._learned.get(model)

    def learn(self, model: str, mib: int) -> None:
        if mib <= 0:
            return
        self._learned[model] = int(mib)
        self._save()

    def _save(self) -> None:
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".footprints-")
            with os.fdopen(fd, "w") as fh:
                json.dump(self._learned, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            log.warning("cannot save footprints to %s: %s", self.path, exc)
        finally:
            if tmp is not None:  # a failed write leaves the old file and no temp file
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def as_dict(self) -> dict[str, int]:
        return dict(self._learned)


class GpuBudget:
    """What the GPU has and what each model needs: the numbers placement decides by.

    Readings come from the ``read_vram`` hook (NVML built in) and fail open: a broken
    probe means "unknown", logged, never a 500 on /metrics or a wedged start.
    """

    def __init__(self, settings: Settings, hooks: HookRunner) -> None:
        self.settings = settings
        self.hooks = hooks
        self.footprints = FootprintStore(settings.gpu.footprints_file)
        self._explained: set[str] = set()  # models whose estimate was logged

    def _reading(self) -> VramReading | None:
        try:
            return self.hooks.first("read_vram")
        except PluginError as exc:
            log.warning("%s; treating GPU memory as unknown", exc)
            return None

    def total_mib(self) -> int | None:
        if self.settings.gpu.total_vram_mib:
            return self.settings.gpu.total_vram_mib
        reading = self._reading()
        return reading.total_mib if reading else None

    def used_mib(self) -> int | None:
        reading = self._reading()
        return reading.used_mib if reading else None

    def footprint(self, cfg: ModelConfig) -> int:
        """Configured, else learned, else estimated; 0 when there is no GPU budget at all."""
        if cfg.vram_mib:
            return cfg.vram_mib
        total = self.total_mib()
        if total is None:
            return 0
        return self.footprints.get(cfg.name) or self.estimate(cfg, total)

    def estimate(self, cfg: ModelConfig, total_mib: int) -> int:
        """A first-start guess from what is knowable without a measurement.

        vLLM preallocates ``--gpu-memory-utilization`` of the GPU, so a vLLM server given
        that flag takes that fraction of the budget. Otherwise ``gpu.estimate_mib`` when
        it is set, else vLLM's default fraction (0.9) for a vLLM server, else the default
        ``gpu.estimate_mib``. Capped at the budget, so a model with no ``vram_mib`` can
        always start on an empty GPU (without NVML nothing is learned, and a bigger guess
        would keep it from ever starting).
        """
        util, explicit = gpu_memory_utilization(cfg)
        if util is not None and not explicit and "estimate_mib" in self.settings.gpu.model_fields_set:
            util = None
        guess = int(util * total_mib) if util is not None else self.settings.gpu.estimate_mib
        guess = max(1, min(guess, total_mib))
        if cfg.name not in self._explained:
            self._explained.add(cfg.name)
            how = (f"--gpu-memory-utilization {util:g} of {total_mib} MiB" if util is not None
                   else "gpu.estimate_mib")
            log.info("model %s: footprint estimated as %d MiB (%s) until one is learned; set "
                     "vram_mib to override", cfg.name, guess, how)
        return guess

    def learn(self, cfg: ModelConfig, used_before: int | None) -> int | None:
        """Record what a start took (used memory after it became healthy minus before)
        and return it; None when the footprint is configured or nothing was measured."""
        if cfg.vram_mib or used_before is None:
            return None
        used_after = self.used_mib()
        if used_after is None or used_after <= used_before:
            return None
        self.footprints.learn(cfg.name, used_after - used_before)
        return used_after - used_before


VLLM_DEFAULT_UTILIZATION = 0.9


def gpu_memory_utilization(cfg: ModelConfig) -> tuple[float | None, bool]:
    """The fraction of GPU memory a vLLM server will take, and whether it was given:
    its --gpu-memory-utilization, else vLLM's default for a vLLM server, else None."""
    argv = list(cfg.args) if cfg.backend == "docker" else list(cfg.command or [])
    for i, arg in enumerate(argv):
        value = None
        if arg == "--gpu-memory-utilization" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--gpu-memory-utilization="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                util = float(value)
            except ValueError:
                return None, False
            return (util, True) if 0 < util <= 1 else (None, False)
    is_vllm = cfg.backend == "docker" or any(
        part.rsplit("/", 1)[-1] == "vllm" or part.startswith("vllm.entrypoints") for part in argv)
    return (VLLM_DEFAULT_UTILIZATION, False) if is_vllm else (None, False)


def shortfall(req: EvictionRequest) -> str | None:
    """Why the target does not fit now ("vram" / "max_models"), or None if it does.
    The running cap counts servers at work, so sleeping models are left out of it."""
    if req.total_vram_mib and req.reserved_vram_mib + req.target.vram_mib > req.total_vram_mib:
        return "vram"
    awake = sum(1 for m in req.loaded if m.state != "sleeping")
    if req.max_models_running is not None and awake + 1 > req.max_models_running:
        return "max_models"
    return None

"""Built-in VRAM probe: NVML through ``pynvml`` (the nvidia-ml-py distribution).

Sums total and used memory over the devices in ``CUDA_VISIBLE_DEVICES``-style
``VLLM_GATEWAY_GPU_DEVICES`` (default: all). With no driver it logs one clear line
and answers None, so the configured ``gpu.total_vram_mib`` is used instead.
"""
from __future__ import annotations

import logging
import os

from gateway.hookspecs import hookimpl
from gateway.types import VramReading

log = logging.getLogger("vllm_gateway.nvml")
_state: dict[str, object] = {"init": None}


def _init() -> bool:
    if _state["init"] is None:
        try:
            import pynvml
            pynvml.nvmlInit()
            _state["init"] = True
        except Exception as exc:  # no library, no driver, no GPU: all the same here
            log.info("NVML unavailable (%s); using gpu.total_vram_mib / TOTAL_GPU_VRAM", exc)
            _state["init"] = False
    return bool(_state["init"])


def _devices(count: int) -> list[int]:
    chosen = os.environ.get("VLLM_GATEWAY_GPU_DEVICES", "")
    if not chosen.strip():
        return list(range(count))
    return [int(d) for d in chosen.split(",") if d.strip().isdigit() and int(d) < count]


def probe() -> VramReading | None:
    if not _init():
        return None
    import pynvml
    try:
        total = used = 0
        for idx in _devices(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(idx))
            total += info.total
            used += info.used
    except Exception as exc:
        log.warning("NVML read failed: %s", exc)
        return None
    return VramReading(total_mib=total // (1024 * 1024), used_mib=used // (1024 * 1024))


@hookimpl(trylast=True)
def read_vram():
    return probe()

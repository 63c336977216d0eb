"""A stand-in GPU for hosts without one, supplied the only sanctioned way: the
``read_vram`` hook. Total and used memory come from FAKE_GPU_TOTAL_MIB and
FAKE_GPU_USED_MIB (MiB)."""
from __future__ import annotations

import os

from gateway import hookimpl
from gateway.types import VramReading


@hookimpl
def read_vram():
    return VramReading(total_mib=int(os.environ.get("FAKE_GPU_TOTAL_MIB", "80000")),
                       used_mib=int(os.environ.get("FAKE_GPU_USED_MIB", "1200")))

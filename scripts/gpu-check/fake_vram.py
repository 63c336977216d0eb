"""read_vram plugin for check.py --dry-run (no GPU): a pretend GPU.

Every hold_gpu.py started with ``--fake-vram-dir DIR`` writes ``DIR/<pid>`` with the MiB
it pretends to hold; used memory is ``BASE_MIB`` plus what live processes hold. The
total is ``GPU_CHECK_FAKE_TOTAL_MIB``. check.py reads the same numbers through ``read``.
"""
from __future__ import annotations

import os

from gateway.hookspecs import hookimpl
from gateway.types import VramReading

BASE_MIB = 1234  # what a driver shows used on an idle GPU
CONTEXT_MIB = 480  # what hold_gpu.py adds per process, like a CUDA context


def read(fake_dir: str, total_mib: int) -> tuple[int, int]:
    used = BASE_MIB
    for name in os.listdir(fake_dir):
        if not name.isdigit():
            continue
        try:
            os.kill(int(name), 0)
            with open(os.path.join(fake_dir, name)) as fh:
                used += int(fh.read() or 0) + CONTEXT_MIB
        except (OSError, ValueError):  # gone (killed before it could clean up) or half-written
            continue
    return total_mib, used


@hookimpl
def read_vram():
    fake_dir = os.environ.get("GPU_CHECK_FAKE_VRAM_DIR")
    if not fake_dir:
        return None
    total, used = read(fake_dir, int(os.environ["GPU_CHECK_FAKE_TOTAL_MIB"]))
    return VramReading(total_mib=total, used_mib=used)

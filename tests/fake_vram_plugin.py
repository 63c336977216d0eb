"""Test plugin: a fake GPU through the ``read_vram`` hook, for the docker backend tests.

Listed in a test config's ``plugins.modules`` (with tests/ on PYTHONPATH). Used memory
follows the running containers: each running container labelled
``<GWTEST_LABEL_PREFIX>.managed=true`` adds the MiB that ``GWTEST_FAKE_MIB`` (a JSON
object ``{model: MiB}``) gives its model. ``GWTEST_FAKE_TOTAL_MIB`` is the total.
"""
from __future__ import annotations

import json
import os

import docker

from gateway.hookspecs import hookimpl
from gateway.types import VramReading

_client = None


def _running_models(prefix: str) -> list[str]:
    global _client
    if _client is None:
        _client = docker.from_env(timeout=10)
    containers = _client.containers.list(filters={"label": [f"{prefix}.managed=true"],
                                                  "status": "running"}, sparse=True,
                                         ignore_removed=True)
    return [(c.attrs.get("Labels") or {}).get(f"{prefix}.model", "") for c in containers]


@hookimpl
def read_vram():
    prefix = os.environ["GWTEST_LABEL_PREFIX"]
    per_model = json.loads(os.environ.get("GWTEST_FAKE_MIB", "{}"))
    used = 500 + sum(int(per_model.get(m, 0)) for m in _running_models(prefix))
    return VramReading(total_mib=int(os.environ.get("GWTEST_FAKE_TOTAL_MIB", "24000")),
                       used_mib=used)

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

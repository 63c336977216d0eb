"""Built-in eviction policy: least-recently-used idle models first.

Pure: it reads the snapshot and names victims; the core carries them out. A model is a
candidate only when idle (nothing queued or in flight), not pinned, ready or asleep,
and loaded for at least ``min_residency_s`` (so two models alternating on a small GPU
don't thrash). Among candidates the oldest ``last_used`` goes first; on equal age the
one that reloads fastest (``reload_cost_s``) goes first. A ``sleep_mode`` model is put
to sleep rather than stopped, since it wakes in seconds, unless stopping outright
would make room with fewer victims. Returns [] when the
target can't be made to fit now, so the core waits instead of evicting pointlessly.
"""
from __future__ import annotations

from gateway.hookspecs import hookimpl
from gateway.types import Eviction


def _fits(req, reserved: int, awake: int) -> bool:
    vram_ok = req.total_vram_mib <= 0 or reserved + req.target.vram_mib <= req.total_vram_mib
    count_ok = req.max_models_running is None or awake + 1 <= req.max_models_running
    return vram_ok and count_ok


def _plan(req, candidates, prefer_sleep: bool) -> list[str | Eviction]:
    reserved = req.reserved_vram_mib
    awake = sum(1 for m in req.loaded if m.state != "sleeping")
    plan: list[str | Eviction] = []
    for m in candidates:
        if prefer_sleep and m.sleep_mode and m.state == "ready":
            plan.append(Eviction(m.name, "sleep"))
            reserved -= m.held_mib - min(m.held_mib, req.sleep_residual_mib)
        else:
            plan.append(m.name)  # a plain name means stop
            reserved -= m.held_mib
        if m.state != "sleeping":
            awake -= 1
        if _fits(req, reserved, awake):
            return plan
    return []


@hookimpl(trylast=True)
def select_evictions(request):
    awake = sum(1 for m in request.loaded if m.state != "sleeping")
    if _fits(request, request.reserved_vram_mib, awake):
        return []
    candidates = [m for m in request.loaded
                  if m.state in ("ready", "sleeping") and not m.busy and not m.pinned
                  and request.now - m.loaded_since >= request.min_residency_s]
    candidates.sort(key=lambda m: (m.last_used, m.reload_cost_s))
    sleepy = _plan(request, candidates, prefer_sleep=True)
    stops = _plan(request, candidates, prefer_sleep=False)
    if not sleepy or (stops and len(stops) < len(sleepy)):
        return stops  # evicting fewer models beats sleeping more of them
    return sleepy

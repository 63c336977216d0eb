"""Built-in eviction policy: least-recently-used idle models first.

Pure: it reads the snapshot and names victims; the core stops them. A model is a
candidate only when idle (nothing queued or in flight), not pinned, ready, and loaded
for at least ``min_residency_s`` (so two models alternating on a small GPU don't
thrash). Among candidates the oldest ``last_used`` goes first; on equal age the one
that reloads fastest (``reload_cost_s``) goes first. Returns [] when the target can't
be made to fit now, so the core waits instead of evicting pointlessly.
"""
from __future__ import annotations

from gateway.hookspecs import hookimpl


def _fits(req, reserved: int, running: int) -> bool:
    vram_ok = req.total_vram_mib <= 0 or reserved + req.target.vram_mib <= req.total_vram_mib
    count_ok = req.max_models_running is None or running + 1 <= req.max_models_running
    return vram_ok and count_ok


@hookimpl(trylast=True)
def select_evictions(request):
    reserved = request.reserved_vram_mib
    running = len(request.loaded)
    if _fits(request, reserved, running):
        return []
    candidates = [m for m in request.loaded
                  if m.state == "ready" and not m.busy and not m.pinned
                  and request.now - m.loaded_since >= request.min_residency_s]
    candidates.sort(key=lambda m: (m.last_used, m.reload_cost_s))
    victims: list[str] = []
    for m in candidates:
        victims.append(m.name)
        reserved -= m.vram_mib
        running -= 1
        if _fits(request, reserved, running):
            return victims
    return []

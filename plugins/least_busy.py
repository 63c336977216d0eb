"""Built-in backend selection: the candidate URL with the fewest requests in flight."""
from __future__ import annotations

from gateway.hookspecs import hookimpl


@hookimpl(trylast=True)
def select_backend(request, model, candidates, in_flight):
    if not candidates:
        return None
    return min(candidates, key=lambda url: in_flight.get(url, 0))

"""CORS for the OpenAI routes: browsers on listed origins may call them.

Only the OpenAI routes (``/v1/*`` and the root model endpoints) answer cross-origin;
admin routes never do (gateway/routes/guard.py refuses cross-site calls). Nothing is
added unless the request's ``Origin`` is allowed, so a request without one pays a dict
lookup.
"""
from __future__ import annotations

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.auth_config import Cors


class CorsPolicy:
    def __init__(self, cors: Cors) -> None:
        self.any = "*" in cors.allow_origins
        self.origins = frozenset(o.rstrip("/") for o in cors.allow_origins if o != "*")
        self.enabled = bool(cors.allow_origins)
        self._expose = ", ".join(cors.expose_headers)
        self._preflight = {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join(cors.allow_headers),
            "Access-Control-Max-Age": str(cors.max_age_s),
        }

    def _allowed(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        if not origin or not self.enabled:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def headers(self, request: Request) -> dict[str, str]:
        """The CORS headers an answer to ``request`` carries ({} for most requests)."""
        if not self.enabled:
            return {}
        origin = self._allowed(request)
        if origin is None:
            return {}
        out = {"Access-Control-Allow-Origin": origin,
               "Access-Control-Expose-Headers": self._expose}
        if origin != "*":
            out["Vary"] = "Origin"
        return out

    def preflight(self, request: Request) -> HTTPResponse:
        """The answer to an OPTIONS preflight: 204, with permission only for an allowed
        origin (the browser then refuses the real request on its own)."""
        headers = self.headers(request)
        if headers:
            headers.update(self._preflight)
        return HTTPResponse(status=204, headers=headers)

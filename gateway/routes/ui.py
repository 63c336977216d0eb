"""The operators' web console: ``GET /ui`` and its two assets under ``/ui/``.

Static files from ``gateway/ui/`` (no build step, nothing from the internet). The page
reads ``/gateway/status`` and ``/gateway/events`` and calls the admin routes from the
browser; it holds no state of its own on the server. Every answer carries
``Cache-Control: no-cache`` (revalidated by ETag, so an upgrade is seen at once) and a
Content-Security-Policy that allows only same-origin scripts, styles and connections,
so nothing inline runs even if data from a model server ever reached the DOM.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sanic import Blueprint
from sanic.exceptions import NotFound
from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.logging_setup import tag_request_id

ui = Blueprint("ui")
ui.on_response(tag_request_id)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# The only files served: a fixed map, so no request path ever reaches the file system.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_cache: dict[str, tuple[tuple[int, int], bytes, str]] = {}


def _load(name: str) -> tuple[bytes, str]:
    """The file's bytes and ETag, re-read only when its size or mtime changed."""
    path = UI_DIR / name
    try:
        st = os.stat(path)
    except OSError:
        raise NotFound(f"console asset {name} is not installed") from None
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(name)
    if hit is None or hit[0] != key:
        body = path.read_bytes()
        hit = (key, body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
        _cache[name] = hit
    return hit[1], hit[2]


def _serve(request: Request, name: str) -> HTTPResponse:
    body, etag = _load(name)
    headers = dict(HEADERS, ETag=etag)
    if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        return HTTPResponse(status=304, headers=headers)
    return HTTPResponse(body, headers=headers, content_type=ASSETS[name])


@ui.get("/ui")
async def console_page(request: Request) -> HTTPResponse:
    return _serve(request, "index.html")


@ui.get("/ui/<asset:str>")
async def console_asset(request: Request, asset: str) -> HTTPResponse:
    if asset not in ASSETS or asset == "index.html":
        raise NotFound(f"no console asset {asset!r}")
    return _serve(request, asset)

"""Who may call the admin routes: until API keys exist (the tenancy work), only clients
on loopback, unless ``admin.allow_remote: true``. One function, so an admin key can
gate every admin route later in one place."""
from __future__ import annotations

import ipaddress

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.errors import error_response


def admin_refusal(request: Request) -> HTTPResponse | None:
    """None when the caller may use admin routes, else the 403 to send.

    Loopback is not enough on its own: any web page in an operator's browser could send
    a cross-site POST to 127.0.0.1. Browsers say where a request comes from (Origin,
    Sec-Fetch-Site); a state-changing call from another site is refused. Non-browser
    clients (the CLI, curl) send neither and are unaffected.
    """
    cross = _cross_site(request)
    if cross:
        return error_response(403, f"cross-site admin request refused ({cross})",
                              "admin_forbidden")
    settings = request.app.ctx.gateway.settings
    if settings.admin.allow_remote:
        return None
    try:
        if ipaddress.ip_address((request.ip or "").split("%", 1)[0]).is_loopback:
            return None
    except ValueError:
        pass
    return error_response(403, "admin routes answer only clients on loopback "
                          "(set admin.allow_remote: true to change that)", "admin_forbidden")


def _cross_site(request: Request) -> str:
    """Why a state-changing browser request comes from another site, or ''."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return ""
    fetch_site = request.headers.get("sec-fetch-site", "")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("origin")
    if origin and origin != "null":
        own = f"{request.scheme}://{request.host}"
        if origin.rstrip("/") != own:
            return f"Origin {origin} is not {own}"
    elif origin == "null":
        return "Origin: null"
    return ""

"""Who may call the admin routes, in one place.

Once any API key is configured (``auth.keys`` or ``auth.admin_keys``), an admin key is
required, from anywhere. Without keys, only clients on loopback, unless
``admin.allow_remote: true``. Either way a browser's cross-site call is refused."""
from __future__ import annotations

import ipaddress

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.errors import error_response
from gateway.keys import Identity


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
    gw = request.app.ctx.gateway
    if gw.tenancy.enabled:
        identity = gw.tenancy.identify(request.headers)
        if identity.admin is not None:
            return None
        if not identity.presented or identity.tenant is None or \
                identity.tenant is gw.tenancy.keyring.anonymous:
            return gw.tenancy.unauthorized(identity) if gw.settings.auth.admin_keys else \
                error_response(403, "admin routes need an admin key and none is configured "
                               "(auth.admin_keys)", "admin_forbidden")
        return error_response(403, f"key {identity.tenant.name!r} is not an admin key",
                              "admin_forbidden")
    settings = gw.settings
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


def read_refusal(request: Request, what: str,
                 identity: Identity | None = None) -> HTTPResponse | None:
    """None when ``what`` (a read endpoint named in ``auth.protect``) may be read: any
    valid key, client or admin, when it is protected; anyone otherwise. ``identity``:
    the caller's, when the route has read it already."""
    tenancy = request.app.ctx.gateway.tenancy
    if what not in tenancy.keyring.protect or not tenancy.enabled:
        return None
    identity = identity or tenancy.identify(request.headers)
    if identity.presented and (identity.tenant is not None or identity.admin is not None):
        return None
    return tenancy.unauthorized(identity)


def is_admin(request: Request, identity: Identity | None = None) -> bool:
    """Whether the caller may see internals (upstream URLs, errors): an admin key, or,
    with no keys configured, whoever may call the admin routes."""
    tenancy = request.app.ctx.gateway.tenancy
    if tenancy.enabled:
        return (identity or tenancy.identify(request.headers)).admin is not None
    return admin_refusal(request) is None

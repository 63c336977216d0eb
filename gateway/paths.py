"""Which model-server paths a client may reach, checked on the raw request path.

vLLM serves private endpoints beside its API (``/sleep``, ``/wake_up``,
``/collective_rpc``, ``/reset_prefix_cache`` in dev mode). A client must reach only
the API, so the gateway forwards an explicit allow-list of exact paths and nothing
else. The check runs on the path as the client sent it, before any decoding: a path
with dot segments, percent-escapes, backslashes or empty segments is refused with
400, whatever it would decode to. The upstream URL is then built from the allow-listed
constant itself, so no HTTP client can re-normalise it into something else.
"""
from __future__ import annotations

import re

# POST paths vLLM's OpenAI-compatible server answers with a ``model`` in the JSON body.
API_PATHS: frozenset[str] = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/score", "/v1/rerank", "/v1/classify", "/v1/pooling",
    "/tokenize", "/detokenize", "/score", "/rerank", "/pooling", "/classify",
})
# Never forwarded, even if configured: the model server's control plane.
PRIVATE_PATHS: frozenset[str] = frozenset({
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
    "/reset_mm_cache", "/health", "/ping", "/metrics", "/load", "/version", "/server_info",
    "/start_profile", "/stop_profile", "/update_weights", "/init_weights", "/pause",
    "/resume", "/scale_elastic_ep", "/is_scaling_elastic_ep",
})
_PLAIN = re.compile(r"^(/[A-Za-z0-9_\-]+)+$")


def extra_path_problem(path: str) -> str | None:
    """Why a configured ``upstream.extra_paths`` entry is unusable, or None."""
    if not _PLAIN.match(path):
        return ("must be an exact path like /v1/foo: letters, digits, '_' and '-' "
                "between single slashes (no dots, escapes or query)")
    if path in PRIVATE_PATHS or path.startswith(("/gateway", "/ui")):
        return "is a model-server control endpoint or a gateway route; it cannot be proxied"
    return None


def unsafe_path_reason(raw_path: str) -> str | None:
    """Why a raw request path is refused outright (400), or None if it is plain."""
    lowered = raw_path.lower()
    if "%" in raw_path:
        return "percent-escapes are not allowed in API paths"
    if "\\" in raw_path or "\x00" in raw_path:
        return "backslashes and NUL are not allowed in API paths"
    segments = lowered.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return "dot segments are not allowed in API paths"
    if "" in segments[:-1] or not raw_path.startswith("/"):
        return "empty path segments are not allowed"
    if ";" in raw_path:
        return "path parameters are not allowed in API paths"
    return None


class PathPolicy:
    """The allow-list for one gateway: the built-in API paths plus configured ones."""

    def __init__(self, extra: list[str] | tuple[str, ...] = ()) -> None:
        self.allowed = API_PATHS | frozenset(extra)

    def check(self, raw_path: str) -> tuple[str | None, int, str]:
        """(canonical path, 0, "") when allowed, else (None, status, message)."""
        if raw_path in self.allowed:
            return raw_path, 0, ""
        reason = unsafe_path_reason(raw_path)
        if reason is not None:
            return None, 400, f"invalid path: {reason}"
        return None, 404, (f"no model-server API at {raw_path}; the gateway forwards only "
                           "the OpenAI/vLLM API paths (and upstream.extra_paths)")

"""OpenAI-style error bodies: ``{"error": {"message", "type", "code"}}``."""
from __future__ import annotations

import json

from sanic.response import HTTPResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         408: "invalid_request_error", 431: "invalid_request_error",
         500: "server_error", 502: "upstream_error", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, code: str) -> bytes:
    default = "invalid_request_error" if status < 500 else "server_error"
    err = {"message": message, "type": TYPES.get(status, default), "param": None, "code": code}
    return json.dumps({"error": err}).encode()


def error_response(status: int, message: str, code: str,
                   headers: dict[str, str] | None = None) -> HTTPResponse:
    return HTTPResponse(error_body(status, message, code), status=status, headers=headers,
                        content_type="application/json")


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """The event that ends a stream which broke after its first byte."""
    return b"data: " + error_body(status, message, code) + b"\n\n"

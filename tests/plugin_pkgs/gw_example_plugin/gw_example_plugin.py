"""A third-party vllm-gateway plugin, loaded through the ``vllm_gateway`` entry point.

Refuses (403) any request whose JSON body says ``"user": "blocked"``.
"""
from __future__ import annotations

from gateway import hookimpl
from gateway.types import Rejection


@hookimpl
def admit_request(request, model):
    if request.body.get("user") == "blocked":
        return Rejection(status=403, message=f"user 'blocked' may not use {model.name}",
                         code="user_blocked", reason="auth", retry_after_s=None)
    return None

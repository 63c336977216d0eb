"""Shared helpers for tests that need external command-line tools.

A missing tool skips the test with the reason, so a developer machine without it
still gets a green run; CI sets ``VLLM_GATEWAY_REQUIRE_TOOLS=1`` so a missing tool
fails instead of silently skipping.
"""
from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "VLLM_GATEWAY_REQUIRE_TOOLS"


def require_tool(name: str, why: str) -> str:
    """Return the path of executable ``name``; skip (or fail in CI) when absent.

    ``why`` says where the tool comes from, e.g. "Debian package prometheus".
    """
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not installed ({why})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; required because {REQUIRE_ENV}=1")
    pytest.skip(message)

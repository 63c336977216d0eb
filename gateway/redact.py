"""Masking secrets in text the gateway shows: model-server log tails, error messages.

``redact(text, secrets)`` replaces known secret values (the configured HF token, a
model's ``*TOKEN*``/``*KEY*`` environment values) and anything shaped like a
credential with ``***``. It errs on the side of masking: a log line loses a value
now and then, a token never leaks.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words and digits
_SECRET_ENV_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")

# Shapes of credentials, masked wherever they appear.
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{8,}")
_OPENAI_KEY = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+")
# ``Authorization: <anything>`` up to the end of the line, or the quoted value in a dump
# of headers ({'authorization': 'Basic ...'}).
_AUTH_HEADER = re.compile(r"""(?i)\b(authorization["']?\s*[:=]\s*)(?:(["'])[^\r\n]*?\2|[^\r\n]*)""")
# ``token=...``, ``api_key: ...``, ``HF_TOKEN=...``, ``"password": "..."``.
_KEY_VALUE = re.compile(
    r"""(?i)((?:token|key|secret|password|passwd|api[_-]?key)["']?\s*[=:]\s*)(?!\*\*\*)\S+""")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret value and credential-shaped string replaced by ``***``."""
    if not text:
        return text
    values = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    for value in values:  # longest first: a secret containing another is masked whole
        text = text.replace(value, MASK)
    text = _HF_TOKEN.sub(MASK, text)
    text = _OPENAI_KEY.sub(MASK, text)
    text = _AUTH_HEADER.sub(_auth_mask, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _KEY_VALUE.sub(lambda m: m.group(1) + MASK, text)


def _auth_mask(m: re.Match[str]) -> str:
    quote = m.group(2) or ""
    return f"{m.group(1)}{quote}{MASK}{quote}"


def secrets_of(model_cfg: Any, settings: Any = None) -> list[str]:
    """The secret values a model's server may print: ``docker.hf_token`` and every
    ``model.env`` value whose key contains TOKEN, KEY, SECRET or PASSWORD."""
    out: list[str] = []
    docker = getattr(settings, "docker", None)
    token = getattr(docker, "hf_token", None)
    if token:
        out.append(token)
    env = getattr(model_cfg, "env", None) or {}
    for key, value in env.items():
        if value and any(word in key.upper() for word in _SECRET_ENV_WORDS):
            out.append(value)
    return out

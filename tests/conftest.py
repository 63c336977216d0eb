"""Set-up shared by the whole suite.

Entry-point plugins someone installed into the environment (``pip install`` into .venv)
must not change what the suite sees: gateways built in this process load none, because
the allow-list is empty here, and the subprocess harnesses set it the same way
(``helpers.gateway_env``, ``fixtures/gwtest_process.gateway_env``). Tests of entry-point
loading set or remove the variable themselves (``monkeypatch``, ``env=``).
"""
from __future__ import annotations

import os

os.environ["VLLM_GATEWAY_LOAD_PLUGINS"] = ""

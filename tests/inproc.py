"""Run a gateway inside the test's event loop, on a real loopback socket.

For tests that need the app object itself (an in-memory span exporter, a plugin
object registered directly); everything else runs the gateway as a subprocess.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from gateway.app import create_app
from gateway.config import load_settings

try:
    from tests.helpers import free_port
except ImportError:  # tests/ on sys.path directly
    from helpers import free_port


@contextlib.asynccontextmanager
async def running_gateway(raw_config: dict[str, Any], extra_plugins: Iterable[tuple[str, object]] = (),
                          span_exporter: Any = None) -> AsyncIterator[tuple[str, Any]]:
    """Yield (base_url, app) for a gateway served in this loop; stops it on exit."""
    raw = {"plugins": {"load_entrypoints": False}, **raw_config}
    settings = load_settings(raw=raw, environ={})
    app = create_app(settings, extra_plugins=extra_plugins, span_exporter=span_exporter)
    app.config.TOUCHUP = False  # touch-up rewrites shared classes once per process only
    port = free_port()
    server = await app.create_server(host="127.0.0.1", port=port, return_asyncio_server=True,
                                     access_log=False)
    await server.startup()
    await server.before_start()
    await server.after_start()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await server.before_stop()
        server.close()
        await server.wait_closed()
        await server.after_stop()

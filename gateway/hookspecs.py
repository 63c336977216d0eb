"""The plugin contract: every seam of the gateway, one function each.

pluggy calls hooks synchronously. So decision hooks (``select_backend``,
``select_evictions``, ``decide_retry``, ``read_vram``) are sync, pure over the
snapshot they get, and ``firstresult``: the first non-None answer wins and built-in
defaults are ``trylast``. Hooks that may do I/O (``admit_request``, ``startup``,
``shutdown``) are collect-all and the core awaits every awaitable result. The plugin
manager refuses an ``async def`` implementation of a sync-only hook at start-up.
"""
from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gateway.types import (
        Eviction,
        EvictionRequest,
        ModelView,
        Register,
        Rejection,
        RequestInfo,
        RetryDecision,
        RetrySettings,
        UpstreamOutcome,
        VramReading,
    )

PROJECT = "vllm_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Registration: once, while the gateway is built. Sync, collect-all. ---

@hookspec
def register_backends(register: Register) -> None:
    """Register backend drivers: ``register("docker", DockerDriver())``.

    A model's ``backend:`` key names one of them. A plugin's driver replaces a
    built-in driver of the same name; two plugins registering one name is an error
    (PluginError at start-up). Collect-all; sync only.
    """


# --- Lifecycle: may return an awaitable; the core awaits each. ---

@hookspec
def startup(gateway: Any) -> Awaitable[None] | None:
    """Called once the gateway's models and pools exist, before it serves traffic.

    Raise to abort start-up. Collect-all; may return an awaitable.
    """


@hookspec
def shutdown(gateway: Any) -> Awaitable[None] | None:
    """Called when the gateway stops, before model servers are stopped.

    Errors are logged and never stop other plugins. Collect-all; may return an awaitable.
    """


# --- Admission: may return an awaitable. ---

@hookspec
def admit_request(request: RequestInfo, model: ModelView) -> Rejection | None | Awaitable[Rejection | None]:
    """Accept (return None) or refuse (return a Rejection) a request before it queues.

    Runs after the key's own checks; ``request.key`` names the API key (never the key
    itself: credentials are not in ``request.headers``). Every implementation runs; the
    first Rejection in call order is used.
    Collect-all; may return an awaitable.
    """


# --- Decisions: sync only, pure over their arguments, no I/O. ---

@hookspec(firstresult=True)
def select_backend(request: RequestInfo, model: ModelView, candidates: Sequence[str],
                   in_flight: dict[str, int]) -> str | None:
    """Pick which of a model's server URLs serves this request.

    ``in_flight`` maps each candidate URL to its current requests. Return one of
    ``candidates`` (anything else is ignored) or None for no opinion. Built-in
    (trylast): least in-flight, first on ties. Stops at first non-None; sync only.
    """


@hookspec(firstresult=True)
def select_evictions(request: EvictionRequest) -> Sequence[str | Eviction] | None:
    """Name the loaded models to evict so ``request.target`` fits.

    Return model names or ``Eviction(model, action)`` items: a name means stop; action
    ``sleep`` puts a ``sleep_mode`` model's vLLM to sleep (it keeps
    ``request.sleep_residual_mib``). The core carries them out and never touches a busy
    or pinned model even if named. An empty list means "nothing can be evicted now:
    wait"; None means no opinion. Built-in (trylast): least-recently-used idle models
    past their minimum residency, sleeping those that can, cheapest reload first among
    equally old ones. Stops at first non-None; sync only.
    """


@hookspec(firstresult=True)
def decide_retry(outcome: UpstreamOutcome, settings: RetrySettings) -> RetryDecision | None:
    """Whether and after how long to retry a failed upstream attempt.

    Only called before the first byte reached the client; the core caps attempts at
    ``settings.retries + 1``. ``outcome.kind`` is the gateway's own classification;
    ``outcome.sent`` is False only when the request provably never reached the server;
    for a 5xx or 429 answer ``outcome.status`` is set (kind ``http_5xx``/``http_429``).
    Built-in (trylast): exponential backoff when not sent; never retries anything that
    may have reached vLLM, nor an HTTP answer. Stops at first non-None; sync only.
    """


@hookspec(firstresult=True)
def read_vram() -> VramReading | None:
    """Report GPU memory (total and used, MiB) summed over the gateway's devices.

    Built-in (trylast): NVML, or None when no driver is present (the configured
    ``gpu.total_vram_mib`` is then used). Tests and GPU-less hosts supply it here.
    Stops at first non-None; sync only, must be fast.
    """


@hookspec(firstresult=True)
def limit_store(settings: Any) -> Any:
    """Where per-key limiter state lives: return an object with ``LimitStore``'s methods
    (gateway/ratelimit.py: ``acquire``, ``settle``, ``used_today``, ``tokens_left``,
    ``forget_except``); ``acquire`` and ``settle`` may return awaitables, so a store
    shared by several gateways (Redis, one Lua script per call) fits here.

    Called once while the gateway is built. Built-in (None from every plugin): the
    in-process store. Stops at first non-None; sync only.
    """


SYNC_ONLY_HOOKS = ("register_backends", "select_backend", "select_evictions", "decide_retry",
                   "read_vram", "limit_store")
ASYNC_CAPABLE_HOOKS = ("startup", "shutdown", "admit_request")

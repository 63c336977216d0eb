"""One model's runtime: its admission queue, its server, its pool, its state.

``ModelRuntime`` owns everything about one model. State changes happen only here
(``mark_*``) and only in synchronous code. Transitions (start, stop, sleep, wake) are
the fleet's: it owns placement, runs at most one transition per model, and every
request that needs the model awaits that same transition (``Fleet.ensure_ready``).
Every state change is reported to ``on_state`` (the fleet publishes it as an event).

A failed start leaves the model ``failed`` with an exponential backoff
(``upstream.start_backoff_s`` doubling up to ``start_backoff_max_s``): until it has
passed, requests are refused at once rather than relaunching a server that just
failed; a successful start resets it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.admission import ModelAdmission
from gateway.config import ModelConfig, Settings
from gateway.metrics import ModelGauges
from gateway.redact import redact, secrets_of
from gateway.retry_after import DrainRate, retry_after_s
from gateway.types import BackendDriver, ModelState, ModelView, RunningServer
from gateway.upstream import UpstreamPool

log = logging.getLogger("vllm_gateway.lifecycle")
LOG_LINES_LOGGED = 20
MAX_TAIL_CHARS = 600


class StartFailed(Exception):
    """A model could not be made ready; the message is safe to show clients."""


class StartBackoff(StartFailed):
    """Refused without a start: the model's last start failed and its backoff runs."""


StateListener = Callable[["ModelRuntime", str], None]  # (runtime, reason) after a change


class ModelRuntime:
    def __init__(self, cfg: ModelConfig, settings: Settings, driver: BackendDriver,
                 on_state: StateListener | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.settings = settings
        self.driver = driver
        self.admission = ModelAdmission(cfg.name, settings.max_concurrent(cfg),
                                        settings.max_queue(cfg), settings.limits.queue_timeout_s)
        self.state: ModelState = "stopped"
        self.server: RunningServer | None = None
        self.pool: UpstreamPool | None = None
        self.urls: tuple[str, ...] = ()
        self.url_in_flight: dict[str, int] = {}
        self.auth: dict[str, str] = {}  # the server's own API key (docker: VLLM_API_KEY)
        self.loaded_since = 0.0
        self.reload_cost_s = 0.0
        self.vram_mib = 0
        self.last_error = ""
        self.transition: asyncio.Task[None] | None = None
        self.served_model_name = cfg.served_model_name
        self.pinned = cfg.pinned  # eviction's one source; the admin API may change it
        self.failures = 0  # consecutive failed starts
        self.backoff_until = 0.0  # monotonic; no automatic start before it while failed
        self.starting_since = 0.0
        self.drain = DrainRate()
        self._on_state = on_state

    def _set_state(self, state: ModelState, reason: str = "") -> None:
        changed = state != self.state
        self.state = state
        if changed and self._on_state is not None:
            self._on_state(self, reason)

    def auth_headers(self, server: RunningServer | None) -> dict[str, str]:
        """What the gateway sends the model server as its own credentials: the model's
        ``upstream_api_key``, else the key its driver gave the server (docker's
        VLLM_API_KEY); never a client's."""
        key = self.cfg.upstream_api_key or (server.extra.get("api_key") if server else None)
        return {"authorization": f"Bearer {key}"} if key else {}

    @property
    def manages_lifecycle(self) -> bool:
        return bool(getattr(self.driver, "manages_lifecycle", True))

    def mark_starting(self, reason: str = "") -> None:
        self.starting_since = time.monotonic()
        self.last_error = ""
        self._set_state("starting", reason)

    def mark_ready(self, server: RunningServer, start_seconds: float, reason: str = "") -> None:
        self.server = server
        self.urls = tuple(server.extra.get("urls") or [server.url])
        self.auth = self.auth_headers(server)
        self.url_in_flight = {u: 0 for u in self.urls}
        up = self.settings.upstream
        self.pool = UpstreamPool(self.admission.max_concurrent, up.connect_timeout_s, up.timeout_s)
        self.loaded_since = time.monotonic()
        self.reload_cost_s = start_seconds
        self.failures = 0
        self.backoff_until = 0.0
        self._set_state("ready", reason)

    def mark_stopping(self, reason: str = "") -> UpstreamPool | None:
        """Enter ``stopping``; returns the pool for the caller to close."""
        pool, self.pool = self.pool, None
        self._set_state("stopping", reason)
        return pool

    def mark_sleeping(self, reason: str = "") -> UpstreamPool | None:
        """vLLM is asleep: its server stays, its GPU memory (all but a residual) is free.
        Returns the pool for the caller to close; waking builds a fresh one."""
        pool, self.pool = self.pool, None
        self._set_state("sleeping", reason)
        return pool

    def reserved_mib(self) -> int:
        """GPU memory this model holds now, as placement counts it."""
        if self.state in ("stopped", "failed"):
            return 0
        if self.state == "sleeping":
            return min(self.vram_mib, self.settings.gpu.sleep_residual_mib)
        return self.vram_mib

    def mark_stopped(self, error: str = "", reason: str = "") -> None:
        self.server = None
        self.urls = ()
        self.url_in_flight = {}
        self.loaded_since = 0.0
        if error:
            self.last_error = error
        self._set_state("stopped", reason)

    def mark_failed(self, error: str) -> None:
        """A start failed: nothing runs; the next automatic start waits out a backoff that
        doubles with each consecutive failure."""
        up = self.settings.upstream
        self.failures += 1
        delay = min(up.start_backoff_s * 2 ** min(self.failures - 1, 32), up.start_backoff_max_s)
        self.backoff_until = time.monotonic() + delay
        self.server = None
        self.urls = ()
        self.url_in_flight = {}
        self.loaded_since = 0.0
        self.last_error = error
        self._set_state("failed", error)

    def backoff_left(self, now: float | None = None) -> float:
        """Seconds before a request may start this failed model again (0 when it may)."""
        if self.state != "failed":
            return 0.0
        return max(0.0, self.backoff_until - (time.monotonic() if now is None else now))

    def retry_after_s(self) -> int:
        """What ``Retry-After`` should say to a client refused now (gateway/retry_after.py)."""
        now = time.monotonic()
        a = self.admission
        self.drain.sample(now, a.finished_total, a.busy)
        starting_for = now - self.starting_since if self.state == "starting" else 0.0
        return retry_after_s(ready=self.state == "ready" and self.transition is None,
                             waiting=a.waiting, max_concurrent=a.max_concurrent,
                             drain_per_s=self.drain.per_s, backoff_left_s=self.backoff_left(now),
                             expected_start_s=self.reload_cost_s, starting_for_s=starting_for)

    async def wait_healthy(self, server: RunningServer, timeout_s: float, interval_s: float,
                           client: httpx.AsyncClient) -> None:
        """Poll GET /health, then GET /v1/models, until both answer 200."""
        deadline = time.monotonic() + timeout_s
        base = server.url.rstrip("/")
        path = "/health"
        auth = self.auth_headers(server)
        while True:
            if not await self.driver.is_running(self.cfg, server):
                code = await self.exit_code(server)
                raise StartFailed(f"model {self.name!r}: server exited during start-up"
                                  f"{'' if code is None else f' (exit code {code})'}"
                                  f"{await self.last_log_lines(server)}")
            try:
                resp = await client.get(base + path, timeout=min(5.0, interval_s * 4 + 1),
                                        headers=auth)
                if resp.status_code == 200:
                    if path == "/v1/models":
                        return
                    path = "/v1/models"
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise StartFailed(f"model {self.name!r}: not healthy after {timeout_s:g}s "
                                  f"(start_timeout_s){await self.last_log_lines(server)}")
            await asyncio.sleep(interval_s)

    async def exit_code(self, server: RunningServer) -> int | None:
        """The exited server's status, if its driver can tell (optional ``exit_code``)."""
        read = getattr(self.driver, "exit_code", None)
        if read is None:
            return None
        try:
            code = await read(self.cfg, server)
        except Exception:
            return None
        return code if isinstance(code, int) else None

    async def log_lines(self, lines: int) -> list[str]:
        """The running server's last ``lines`` lines, secrets masked; [] without a server."""
        server = self.server
        if server is None:
            return []
        try:
            tail = await self.driver.logs_tail(self.cfg, server, lines)
        except Exception as exc:
            log.warning("model %s: reading server logs failed: %s", self.name, exc)
            return []
        return redact(tail or "", secrets_of(self.cfg, self.settings)).splitlines()[-lines:]

    async def last_log_lines(self, server: RunningServer, lines: int = 3) -> str:
        """The server's last log lines, secrets masked, as one line for an error message
        (clients see it in the 503, operators in /gateway/status last_error)."""
        try:
            tail = await self.driver.logs_tail(self.cfg, server, LOG_LINES_LOGGED)
        except Exception:
            return ""
        tail = redact(tail, secrets_of(self.cfg, self.settings)).strip()
        if not tail:
            return ""
        log.error("model %s: last server log lines:\n%s", self.name, tail)
        last = [ln.strip() for ln in tail.splitlines() if ln.strip()][-lines:]
        return "; last log lines: " + " | ".join(last)[-MAX_TAIL_CHARS:]

    def view(self) -> ModelView:
        a = self.admission
        return ModelView(name=self.name, backend=self.cfg.backend, state=self.state,
                         waiting=a.waiting, in_flight=a.in_flight,
                         max_concurrent=a.max_concurrent, max_queue=a.max_queue,
                         last_used=a.last_used, loaded_since=self.loaded_since,
                         vram_mib=self.vram_mib, pinned=self.pinned,
                         reserved_mib=self.reserved_mib(), sleep_mode=self.cfg.sleep_mode,
                         reload_cost_s=self.reload_cost_s, urls=self.urls)

    def gauges(self) -> ModelGauges:
        a = self.admission
        pool = self.pool
        return ModelGauges(model=self.name, backend=self.cfg.backend, state=self.state,
                           waiting=a.waiting, in_flight=a.in_flight,
                           max_concurrent=a.max_concurrent, max_queue=a.max_queue,
                           admitted_total=a.admitted_total, finished_total=a.finished_total,
                           anomalies_total=a.anomalies_total,
                           pool_size=pool.size if pool else 0,
                           pool_in_use=pool.connections_in_use if pool else 0,
                           vram_reserved_mib=self.reserved_mib(),
                           stalled_seconds=a.stalled_seconds())

    def status(self) -> dict[str, Any]:
        a = self.admission
        last_used = (time.time() - (time.monotonic() - a.last_used)) if a.last_used else None
        return {"state": self.state, "backend": self.cfg.backend, "queue_depth": a.waiting,
                "in_flight": a.in_flight, "max_concurrent": a.max_concurrent,
                "max_queue": a.max_queue, "last_used": last_used,
                "idle_timeout_s": self.settings.idle_timeout(self.cfg),
                "urls": list(self.urls), "vram_mib": self.reserved_mib(),
                "pinned": self.pinned, "last_error": self.last_error or None,
                "retry_in_s": round(self.backoff_left(), 1) if self.state == "failed" else None,
                "admitted_total": a.admitted_total, "finished_total": a.finished_total,
                "rejected_total": a.rejected_total, "drift": a.drift()}

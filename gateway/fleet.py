"""The fleet: every model runtime, and the one place that starts and stops servers.

It owns placement (what fits in GPU memory, what to evict, how many models run),
the idle/crash sweeper, and shutdown. Policies are hooks; the fleet applies them
and enforces the invariants: never stop a busy or pinned model, one transition per
model at a time, a failed start leaves no server behind. Operators' requests (load,
unload, sleep, pin: gateway/routes/models.py) are transitions too, run here. Every
transition is published on ``events`` (gateway/events.py) as it happens.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Iterable

import httpx

from gateway.config import Settings
from gateway.events import EventBus
from gateway.fleet_operations import OperatorRequests
from gateway.fleet_placement import Placement
from gateway.fleet_reload import Reconfiguration
from gateway.lifecycle import ModelRuntime, StartBackoff, StartFailed
from gateway.metrics import GatewayMetrics, ModelGauges
from gateway.plugins import HookRunner
from gateway.types import BackendDriver
from gateway.vram import GpuBudget

log = logging.getLogger("vllm_gateway.fleet")
SWEEP_INTERVAL_S = 1.0
CRASH_CHECK_EVERY = 2  # sweeps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet(Placement, OperatorRequests, Reconfiguration):
    """All runtimes and every transition; placement, operators' requests and config
    reload live in the mixins it is made of (gateway/fleet_*.py), by concern."""

    def __init__(self, settings: Settings, hooks: HookRunner, drivers: dict[str, BackendDriver],
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.hooks = hooks
        self.metrics = metrics
        self.events = EventBus()
        self.runtimes = {m.name: ModelRuntime(m, settings, drivers[m.backend],
                                              self._state_changed)
                         for m in settings.models}
        self._background: set[asyncio.Task[None]] = set()  # preloads, loads not awaited
        self.aliases = {a: rt for rt in self.runtimes.values() for a in rt.cfg.aliases}
        self.drivers = drivers  # a config reload builds runtimes for the models it adds
        # Models a reload removed, finishing their requests before their server stops.
        self._retiring: dict[str, tuple[ModelRuntime, asyncio.Task[None]]] = {}
        self.gpu = GpuBudget(settings, hooks)
        self._placement = asyncio.Lock()
        self._health_client: httpx.AsyncClient | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self.closing = False  # draining: nothing new starts
        self._launching = 0  # launches between driver.start and healthy
        self.gpu_changes = 0  # bumped whenever a launch begins or ends or a server stops

    # --- start-up and shutdown -------------------------------------------------------

    async def startup(self) -> None:
        self._health_client = httpx.AsyncClient(timeout=5.0)
        await self._reap_orphans()
        for rt in self.runtimes.values():
            if not rt.manages_lifecycle:
                server = await rt.driver.start(rt.cfg, 0)
                rt.mark_ready(server, 0.0, "static")
                continue
            await self._adopt(rt)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fleet-sweeper")
        for rt in self.runtimes.values():
            if rt.cfg.preload and rt.state == "stopped":
                self.start_soon(rt, "preload")

    def start_soon(self, rt: ModelRuntime, reason: str) -> None:
        """Start the model in the background (``preload: true``, a load not waited for);
        a failure is logged and recorded by ``start`` like any other."""
        async def run() -> None:
            try:
                await self.ensure_ready(rt, reason, ignore_backoff=True)
            except StartFailed:
                pass

        task = asyncio.create_task(run(), name=f"{reason}:{rt.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _state_changed(self, rt: ModelRuntime, reason: str) -> None:
        self.events.publish("state", rt.name, reason, rt.state)

    async def _reap_orphans(self) -> None:
        """Let each driver stop servers an earlier, dead gateway left without an owner
        (optional driver method ``reap_orphans(models)``); failures are logged, not fatal."""
        by_driver: dict[int, tuple[BackendDriver, list]] = {}
        for rt in self.runtimes.values():
            by_driver.setdefault(id(rt.driver), (rt.driver, []))[1].append(rt.cfg)
        for driver, models in by_driver.values():
            reap = getattr(driver, "reap_orphans", None)
            if reap is None:
                continue
            try:
                await reap(models)
            except Exception as exc:
                log.warning("reaping orphaned servers failed: %s: %s", type(exc).__name__, exc)

    async def _adopt(self, rt: ModelRuntime) -> None:
        """Take over a server an earlier gateway left running, if it answers /health.

        A driver that cannot look (Docker daemon down) must not stop the gateway from
        starting: the error is logged and shown as the model's last_error.
        """
        try:
            adopted = await rt.driver.adopt(rt.cfg)
        except Exception as exc:
            rt.last_error = f"model {rt.name!r}: adopt failed: {type(exc).__name__}: {exc}"
            log.warning("%s", rt.last_error)
            return
        if adopted is None:
            return
        if not await self._answers_health(adopted):
            log.warning("model %s: server at %s does not answer /health; stopping it instead "
                        "of adopting it", rt.name, adopted.url)
            await self._stop_server(rt, adopted)
            return
        rt.vram_mib = self.gpu.footprint(rt.cfg)
        rt.mark_ready(adopted, 0.0, "adopted")
        # A sleeping vLLM answers /health 200 and holds generation until woken: ask it.
        if rt.cfg.sleep_mode and await self._is_sleeping(rt, adopted) is True:
            pool = rt.mark_sleeping("adopted")
            if pool is not None:
                await pool.aclose()
        # The idle clock starts at adoption; last_used 0 would make it idle at once.
        rt.admission.last_used = time.monotonic()
        self.metrics.backend_starts.labels(rt.name, "adopted").inc()
        self.events.publish("start", rt.name, "adopted", rt.state)
        log.info("adopted running server for %s at %s (%s)", rt.name, adopted.url, rt.state)

    async def _answers_health(self, server) -> bool:
        assert self._health_client is not None
        try:
            resp = await self._health_client.get(server.url.rstrip("/") + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def shutdown(self) -> None:
        """Stop the sweeper, pending starts and every server; idempotent (a second call
        waits for the first to finish)."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._shutdown_once(), name="fleet-shutdown")
        await asyncio.shield(self._shutdown)

    def stop_starting(self) -> None:
        """Draining: starts in progress are cancelled (their servers stopped by
        ``start``'s own cleanup) and no new start begins."""
        self.closing = True
        self.events.close()  # event streams end, so they do not hold up the drain
        for rt, _ in self._retiring.values():  # the gateway's drain closes only the fleet's
            rt.admission.close()
        for rt in [*self.runtimes.values(), *(rt for rt, _ in self._retiring.values())]:
            if rt.transition is not None and rt.state in ("starting", "stopped", "failed"):
                rt.transition.cancel()

    async def _shutdown_once(self) -> None:
        self.closing = True
        self.events.close()
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        everyone = [*self.runtimes.values(), *await self._end_retiring()]
        for rt in everyone:
            if rt.transition is not None:
                rt.transition.cancel()
                await asyncio.gather(rt.transition, return_exceptions=True)
        stops = [self.stop_model(rt, "shutdown") for rt in everyone
                 if rt.state not in ("stopped", "failed") and self._stops_on_shutdown(rt)]
        await asyncio.gather(*stops, return_exceptions=True)
        if self._health_client:
            await self._health_client.aclose()

    @staticmethod
    def _stops_on_shutdown(rt: ModelRuntime) -> bool:
        return bool(getattr(rt.driver, "stop_on_shutdown", True)) or not rt.manages_lifecycle

    # --- snapshots --------------------------------------------------------------------

    def get(self, name: str) -> ModelRuntime | None:
        """The runtime a client's ``model`` names: a configured name or one of its aliases."""
        return self.runtimes.get(name) or self.aliases.get(name)

    def gauges(self) -> Iterable[ModelGauges]:
        return [rt.gauges() for rt in self.runtimes.values()]

    def loaded(self, exclude: ModelRuntime | None = None) -> list[ModelRuntime]:
        return [rt for rt in [*self.runtimes.values(), *(rt for rt, _ in self._retiring.values())]
                if rt is not exclude and rt.manages_lifecycle
                and rt.state in ("starting", "ready", "stopping", "sleeping")]  # all hold memory

    # --- starting ---------------------------------------------------------------------

    async def ensure_ready(self, rt: ModelRuntime, reason: str = "request",
                           ignore_backoff: bool = False) -> None:
        """Return once the model serves; start it (once, shared) if needed.

        A pending transition is awaited even while the state still reads "ready": a stop
        task created this loop iteration has not run yet, and its pool is about to close.
        A ``failed`` model in its backoff is refused at once (StartBackoff) unless
        ``ignore_backoff`` (an operator's explicit load).
        """
        while rt.state != "ready" or rt.transition is not None:
            if self.closing:
                raise StartFailed(f"model {rt.name!r}: not started, the gateway is shutting down")
            if rt.transition is None:
                wait = 0.0 if ignore_backoff else rt.backoff_left()
                if wait > 0:
                    raise StartBackoff(f"{rt.last_error}; next start attempt in "
                                       f"{math.ceil(wait)}s (upstream.start_backoff_s)")
                rt.transition = asyncio.create_task(self.start(rt, reason),
                                                    name=f"start:{rt.name}")
            transition = rt.transition
            try:
                # shield: a client that gives up must not cancel the start others wait on
                await asyncio.shield(transition)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this request itself was cancelled
                raise StartFailed(f"model {rt.name!r}: start cancelled, the gateway is "
                                  "shutting down") from None

    async def start(self, rt: ModelRuntime, reason: str = "request") -> None:
        """The start transition: reserve room (under the placement lock, briefly), then
        launch and wait healthy, or wake a sleeping vLLM, with the lock released: a slow
        or hung start never holds up another model's. A start that fails once launched
        (or waking) leaves the model ``failed``; one that found no room, ``stopped``."""
        started = time.monotonic()
        asleep = rt.server if rt.state == "sleeping" else None
        server = asleep
        try:
            await self._reserve(rt, reason)
            if asleep is not None:
                await self._post(rt, asleep, "/wake_up")
                if await self._is_sleeping(rt, asleep) is True:
                    raise StartFailed(f"model {rt.name!r}: still asleep after POST /wake_up")
            else:
                server = await self._launch(rt)
            took = time.monotonic() - started
            rt.mark_ready(server, rt.reload_cost_s if asleep else took,
                          "woken" if asleep else reason)
            # The idle clock starts now: a preloaded or operator-loaded model has no use yet.
            rt.admission.last_used = max(rt.admission.last_used, time.monotonic())
            self.metrics.backend_starts.labels(rt.name, "woken" if asleep else "success").inc()
            self.events.publish("start", rt.name, "woken" if asleep else reason, rt.state)
            if asleep is None:
                self.metrics.start_duration.labels(rt.name).observe(took)
            log.info("model %s %s in %.1fs at %s", rt.name, "woken" if asleep else "ready", took,
                     server.url)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, StartFailed) else (
                f"model {rt.name!r}: start failed: {type(exc).__name__}: {exc}")
            server = server or rt.server
            launched = rt.state == "starting"
            if server is not None:
                await asyncio.shield(self._stop_server(rt, server))
                self.metrics.stops.labels(rt.name, "failed_start").inc()
            if launched and not isinstance(exc, asyncio.CancelledError):
                rt.mark_failed(message)
            else:
                rt.mark_stopped(message, "failed_start")
            self.metrics.backend_starts.labels(rt.name, "failure").inc()
            self.events.publish("failure", rt.name, message, rt.state)
            log.error("%s", message)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise StartFailed(message) from None
        finally:
            rt.transition = None

    async def _launch(self, rt: ModelRuntime):
        """Start the server and wait until healthy. Its footprint is learned only when no
        other start or stop overlapped the measurement: NVML sees the whole GPU."""
        self._launching += 1
        self.gpu_changes += 1
        alone, mine = self._launching == 1, self.gpu_changes
        try:
            used_before = self.gpu.used_mib()
            cfg = rt.cfg  # what this server runs, even if a config reload swaps rt.cfg
            server = await rt.driver.start(cfg, free_port())
            rt.server = server  # so a failure below stops it
            rt.served_model_name = cfg.served_model_name
            assert self._health_client is not None
            await rt.wait_healthy(server, self.settings.start_timeout(rt.cfg),
                                  self.settings.upstream.health_interval_s, self._health_client)
            if alone and self.gpu_changes == mine:
                learned = self.gpu.learn(rt.cfg, used_before)
                if learned is not None:
                    rt.vram_mib = learned
            else:
                log.info("model %s: footprint not learned this start (another start or stop "
                         "overlapped the measurement)", rt.name)
            return server
        finally:
            self._launching -= 1
            self.gpu_changes += 1

    async def _is_sleeping(self, rt: ModelRuntime, server) -> bool | None:
        """vLLM's own answer (GET /is_sleeping); None when it cannot be had."""
        assert self._health_client is not None
        try:
            resp = await self._health_client.get(server.url.rstrip("/") + "/is_sleeping",
                                                 timeout=10, headers=rt.auth_headers(server))
            value = resp.json().get("is_sleeping") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    async def _post(self, rt: ModelRuntime, server, path: str) -> None:
        """vLLM's sleep-mode endpoints (served with VLLM_SERVER_DEV_MODE=1)."""
        assert self._health_client is not None
        try:
            resp = await self._health_client.post(server.url.rstrip("/") + path, timeout=120,
                                                  headers=rt.auth_headers(server))
        except httpx.HTTPError as exc:
            raise StartFailed(f"model {rt.name!r}: POST {path} failed: {exc}") from None
        if resp.status_code >= 400:
            raise StartFailed(f"model {rt.name!r}: POST {path} answered {resp.status_code}")

    # --- stopping ---------------------------------------------------------------------

    async def _stop_now(self, rt: ModelRuntime, reason: str) -> None:
        """The stop transition; callers have checked the model may stop."""
        server = rt.server
        pool = rt.mark_stopping(reason)
        try:
            if pool is not None:
                await pool.aclose()
            if server is not None and rt.manages_lifecycle:
                await self._stop_server(rt, server)
        finally:
            rt.mark_stopped(reason=reason)
            self.gpu_changes += 1
            self.metrics.stops.labels(rt.name, reason).inc()
            self.events.publish("stop", rt.name, reason, rt.state)
            log.info("model %s stopped (%s)", rt.name, reason)

    async def _stop_server(self, rt: ModelRuntime, server) -> None:
        try:
            await rt.driver.stop(rt.cfg, server)
        except Exception as exc:  # a stop that fails must not wedge the fleet
            log.error("stopping %s failed: %s", rt.name, exc)

    async def stop_model(self, rt: ModelRuntime, reason: str) -> None:
        """Run a stop as the model's transition, so requests arriving meanwhile wait for
        it and then start the model afresh instead of racing it."""
        if rt.transition is not None or rt.state in ("stopped", "failed"):
            return

        async def transition() -> None:
            try:
                await self._stop_now(rt, reason)
            finally:
                rt.transition = None

        rt.transition = asyncio.create_task(transition(), name=f"stop:{rt.name}")
        await asyncio.shield(rt.transition)

    def may_stop(self, rt: ModelRuntime) -> bool:
        return (rt.state in ("ready", "sleeping") and rt.manages_lifecycle
                and not rt.admission.busy and rt.transition is None)

    async def sleep_model(self, rt: ModelRuntime, reason: str = "eviction") -> None:
        """Put vLLM to sleep as the model's transition; if it won't sleep, stop it. An
        operator's sleep (any other ``reason``) first lets requests in flight finish."""
        server = rt.server

        async def transition() -> None:
            try:
                if reason != "eviction":
                    await self._drained(rt)
                await self._post(rt, server, f"/sleep?level={rt.cfg.sleep_level}")
                if await self._is_sleeping(rt, server) is False:
                    raise StartFailed(f"model {rt.name!r}: not asleep after POST /sleep")
                pool = rt.mark_sleeping(reason)
                self.gpu_changes += 1
                if pool is not None:
                    await pool.aclose()
                log.info("model %s asleep (level %d)", rt.name, rt.cfg.sleep_level)
            except StartFailed as exc:
                log.warning("%s; stopping it instead", exc)
                await self._stop_now(rt, "eviction" if reason == "eviction" else "unload")
            finally:
                rt.transition = None

        if server is None or rt.transition is not None:
            return
        rt.transition = asyncio.create_task(transition(), name=f"sleep:{rt.name}")
        await asyncio.shield(rt.transition)

    async def mark_crashed(self, rt: ModelRuntime) -> None:
        """A ready model's server is gone: drop it so the next request restarts it."""
        if rt.state not in ("ready", "sleeping") or rt.transition is not None:
            return
        server = rt.server
        tail = await rt.last_log_lines(server) if server else ""
        if rt.server is server and rt.state in ("ready", "sleeping") and rt.transition is None:
            log.warning("model %s: server is no longer running", rt.name)
            rt.last_error = f"server exited unexpectedly{tail}"
            self.events.publish("failure", rt.name, rt.last_error, rt.state)
            await self.stop_model(rt, "crash")

    async def _sweep_forever(self) -> None:
        sweeps = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            sweeps += 1
            try:
                await self._sweep(check_crashes=sweeps % CRASH_CHECK_EVERY == 0)
            except Exception:  # keep sweeping; one bad model must not stop idle stops
                log.exception("sweeper error")

    async def _sweep(self, check_crashes: bool) -> None:
        now = time.monotonic()
        for rt in list(self.runtimes.values()):
            rt.drain.sample(now, rt.admission.finished_total, rt.admission.busy)
            if rt.state not in ("ready", "sleeping") or not rt.manages_lifecycle:
                continue
            idle_s = self.settings.idle_timeout(rt.cfg)
            if idle_s > 0 and self.may_stop(rt) and now - rt.admission.last_used >= idle_s:
                await self.stop_model(rt, "idle")
            elif check_crashes and rt.server and not await rt.driver.is_running(rt.cfg, rt.server):
                await self.mark_crashed(rt)

"""The fleet: every model runtime, and the one place that starts and stops servers.

It owns placement (what fits in GPU memory, what to evict, how many models run),
the idle/crash sweeper, and shutdown. Policies are hooks; the fleet applies them
and enforces the invariants: never stop a busy or pinned model, one transition per
model at a time, a failed start leaves no server behind.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable

import httpx

from gateway.config import Settings
from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.metrics import GatewayMetrics, ModelGauges
from gateway.plugins import HookRunner
from gateway.types import BackendDriver, Eviction, EvictionRequest
from gateway.vram import GpuBudget, shortfall

log = logging.getLogger("vllm_gateway.fleet")
SWEEP_INTERVAL_S = 1.0
CRASH_CHECK_EVERY = 2  # sweeps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self, settings: Settings, hooks: HookRunner, drivers: dict[str, BackendDriver],
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.hooks = hooks
        self.metrics = metrics
        self.runtimes = {m.name: ModelRuntime(m, settings, drivers[m.backend])
                         for m in settings.models}
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
                rt.mark_ready(server, 0.0)
                continue
            await self._adopt(rt)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fleet-sweeper")

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
        rt.mark_ready(adopted, 0.0)
        # A sleeping vLLM answers /health 200 and holds generation until woken: ask it.
        if rt.cfg.sleep_mode and await self._is_sleeping(rt, adopted) is True:
            pool = rt.mark_sleeping()
            if pool is not None:
                await pool.aclose()
        # The idle clock starts at adoption; last_used 0 would make it idle at once.
        rt.admission.last_used = time.monotonic()
        self.metrics.backend_starts.labels(rt.name, "adopted").inc()
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
        for rt in self.runtimes.values():
            if rt.transition is not None and rt.state in ("starting", "stopped"):
                rt.transition.cancel()

    async def _shutdown_once(self) -> None:
        self.closing = True
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for rt in self.runtimes.values():
            if rt.transition is not None:
                rt.transition.cancel()
                await asyncio.gather(rt.transition, return_exceptions=True)
        stops = [self.stop_model(rt, "shutdown") for rt in self.runtimes.values()
                 if rt.state != "stopped" and self._stops_on_shutdown(rt)]
        await asyncio.gather(*stops, return_exceptions=True)
        if self._health_client:
            await self._health_client.aclose()

    @staticmethod
    def _stops_on_shutdown(rt: ModelRuntime) -> bool:
        return bool(getattr(rt.driver, "stop_on_shutdown", True)) or not rt.manages_lifecycle

    # --- snapshots --------------------------------------------------------------------

    def get(self, name: str) -> ModelRuntime | None:
        return self.runtimes.get(name)

    def gauges(self) -> Iterable[ModelGauges]:
        return [rt.gauges() for rt in self.runtimes.values()]

    def loaded(self, exclude: ModelRuntime | None = None) -> list[ModelRuntime]:
        return [rt for rt in self.runtimes.values()
                if rt is not exclude and rt.manages_lifecycle
                and rt.state in ("starting", "ready", "stopping", "sleeping")]  # all hold memory

    # --- starting ---------------------------------------------------------------------

    async def ensure_ready(self, rt: ModelRuntime) -> None:
        """Return once the model serves; start it (once, shared) if needed.

        A pending transition is awaited even while the state still reads "ready": a stop
        task created this loop iteration has not run yet, and its pool is about to close.
        """
        while rt.state != "ready" or rt.transition is not None:
            if self.closing:
                raise StartFailed(f"model {rt.name!r}: not started, the gateway is shutting down")
            if rt.transition is None:
                rt.transition = asyncio.create_task(self.start(rt), name=f"start:{rt.name}")
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

    async def start(self, rt: ModelRuntime) -> None:
        """The start transition: reserve room (under the placement lock, briefly), then
        launch and wait healthy, or wake a sleeping vLLM, with the lock released: a slow
        or hung start never holds up another model's."""
        started = time.monotonic()
        asleep = rt.server if rt.state == "sleeping" else None
        server = asleep
        try:
            await self._reserve(rt)
            if asleep is not None:
                await self._post(rt, asleep, "/wake_up")
                if await self._is_sleeping(rt, asleep) is True:
                    raise StartFailed(f"model {rt.name!r}: still asleep after POST /wake_up")
            else:
                server = await self._launch(rt)
            took = time.monotonic() - started
            rt.mark_ready(server, rt.reload_cost_s if asleep else took)
            self.metrics.backend_starts.labels(rt.name, "woken" if asleep else "success").inc()
            if asleep is None:
                self.metrics.start_duration.labels(rt.name).observe(took)
            log.info("model %s %s in %.1fs at %s", rt.name, "woken" if asleep else "ready", took,
                     server.url)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, StartFailed) else (
                f"model {rt.name!r}: start failed: {type(exc).__name__}: {exc}")
            server = server or rt.server
            if server is not None:
                await asyncio.shield(self._stop_server(rt, server))
                self.metrics.stops.labels(rt.name, "failed_start").inc()
            rt.mark_stopped(message)
            self.metrics.backend_starts.labels(rt.name, "failure").inc()
            log.error("%s", message)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise StartFailed(message) from None
        finally:
            rt.transition = None

    async def _reserve(self, rt: ModelRuntime) -> None:
        """Make room and mark the model ``starting`` (which reserves its footprint), all
        under the placement lock; wait for room (bounded) with the lock released."""
        deadline = time.monotonic() + self.settings.gpu.load_timeout_s
        while True:
            async with self._placement:
                rt.vram_mib = self.gpu.footprint(rt.cfg)
                total = self.gpu.total_mib()
                if total and rt.vram_mib > total:
                    raise StartFailed(f"model {rt.name!r} needs {rt.vram_mib} MiB but the GPU "
                                      f"budget is {total} MiB (gpu.total_vram_mib / vram_mib)")
                req = self._eviction_request(rt)
                reason = shortfall(req)
                if reason is None:
                    rt.mark_starting()  # from here its footprint counts as held
                    return
                victims = self._valid_victims(self.hooks.first("select_evictions", request=req)
                                              or ())
                if victims:
                    await self._evict(victims, reason)
                    continue
            if time.monotonic() >= deadline:
                raise StartFailed(f"model {rt.name!r}: no room after "
                                  f"{self.settings.gpu.load_timeout_s:g}s ({reason}); loaded "
                                  "models are busy or pinned")
            await asyncio.sleep(0.2)

    async def _launch(self, rt: ModelRuntime):
        """Start the server and wait until healthy. Its footprint is learned only when no
        other start or stop overlapped the measurement: NVML sees the whole GPU."""
        self._launching += 1
        self.gpu_changes += 1
        alone, mine = self._launching == 1, self.gpu_changes
        try:
            used_before = self.gpu.used_mib()
            server = await rt.driver.start(rt.cfg, free_port())
            rt.server = server  # so a failure below stops it
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
                                                 timeout=10, headers=_auth(server))
            value = resp.json().get("is_sleeping") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    async def _post(self, rt: ModelRuntime, server, path: str) -> None:
        """vLLM's sleep-mode endpoints (served with VLLM_SERVER_DEV_MODE=1)."""
        assert self._health_client is not None
        try:
            resp = await self._health_client.post(server.url.rstrip("/") + path, timeout=120,
                                                  headers=_auth(server))
        except httpx.HTTPError as exc:
            raise StartFailed(f"model {rt.name!r}: POST {path} failed: {exc}") from None
        if resp.status_code >= 400:
            raise StartFailed(f"model {rt.name!r}: POST {path} answered {resp.status_code}")

    def _eviction_request(self, rt: ModelRuntime) -> EvictionRequest:
        loaded = self.loaded(exclude=rt)
        return EvictionRequest(
            target=rt.view(), loaded=tuple(m.view() for m in loaded),
            total_vram_mib=self.gpu.total_mib() or 0,
            reserved_vram_mib=sum(m.reserved_mib() for m in loaded),
            max_models_running=self.settings.max_models_running,
            min_residency_s=self.settings.gpu.min_residency_s, now=time.monotonic(),
            sleep_residual_mib=self.settings.gpu.sleep_residual_mib)

    def _valid_victims(self, answer: Iterable[str | Eviction]) -> list[tuple[ModelRuntime, str]]:
        """The core's guard on any policy: only idle, unpinned, loaded models are evicted,
        and only an awake ``sleep_mode`` model is put to sleep."""
        out = []
        for item in answer:
            name, action = (item, "stop") if isinstance(item, str) else (item.model, item.action)
            rt = self.runtimes.get(name)
            if rt is None or rt.cfg.pinned or not self.may_stop(rt):
                continue
            if action == "sleep" and not (rt.cfg.sleep_mode and rt.state == "ready"):
                continue
            out.append((rt, "sleep" if action == "sleep" else "stop"))
        return out

    async def _evict(self, victims: list[tuple[ModelRuntime, str]], reason: str) -> None:
        used_before = self.gpu.used_mib()
        freed = 0
        for victim, action in victims:
            if not self.may_stop(victim):  # busy again while an earlier victim stopped
                continue
            before = victim.reserved_mib()
            self.metrics.evictions.labels(victim.name, reason).inc()
            if action == "sleep":
                await self.sleep_model(victim)
            else:
                await self.stop_model(victim, "eviction")
            freed += before - victim.reserved_mib()
        await self._wait_released(used_before, freed)

    async def _wait_released(self, used_before: int | None, freed_mib: int) -> None:
        """Drivers lag: wait until NVML shows the victims' memory gone (bounded)."""
        if used_before is None or freed_mib <= 0:
            return
        deadline = time.monotonic() + self.settings.gpu.release_timeout_s
        target = used_before - int(freed_mib * 0.9)
        while time.monotonic() < deadline:
            used = self.gpu.used_mib()
            if used is None or used <= target:
                return
            await asyncio.sleep(0.25)
        log.warning("GPU memory not released after %.0fs (used %s MiB, expected <= %s)",
                    self.settings.gpu.release_timeout_s, self.gpu.used_mib(), target)

    # --- stopping ---------------------------------------------------------------------

    async def _stop_now(self, rt: ModelRuntime, reason: str) -> None:
        """The stop transition; callers have checked the model may stop."""
        server = rt.server
        pool = rt.mark_stopping()
        try:
            if pool is not None:
                await pool.aclose()
            if server is not None and rt.manages_lifecycle:
                await self._stop_server(rt, server)
        finally:
            rt.mark_stopped()
            self.gpu_changes += 1
            self.metrics.stops.labels(rt.name, reason).inc()
            log.info("model %s stopped (%s)", rt.name, reason)

    async def _stop_server(self, rt: ModelRuntime, server) -> None:
        try:
            await rt.driver.stop(rt.cfg, server)
        except Exception as exc:  # a stop that fails must not wedge the fleet
            log.error("stopping %s failed: %s", rt.name, exc)

    async def stop_model(self, rt: ModelRuntime, reason: str) -> None:
        """Run a stop as the model's transition, so requests arriving meanwhile wait for
        it and then start the model afresh instead of racing it."""
        if rt.transition is not None or rt.state == "stopped":
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

    async def sleep_model(self, rt: ModelRuntime) -> None:
        """Put vLLM to sleep as the model's transition; if it won't sleep, stop it."""
        server = rt.server

        async def transition() -> None:
            try:
                await self._post(rt, server, f"/sleep?level={rt.cfg.sleep_level}")
                if await self._is_sleeping(rt, server) is False:
                    raise StartFailed(f"model {rt.name!r}: not asleep after POST /sleep")
                pool = rt.mark_sleeping()
                self.gpu_changes += 1
                if pool is not None:
                    await pool.aclose()
                log.info("model %s asleep (level %d)", rt.name, rt.cfg.sleep_level)
            except StartFailed as exc:
                log.warning("%s; stopping it instead", exc)
                await self._stop_now(rt, "eviction")
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
            if rt.state not in ("ready", "sleeping") or not rt.manages_lifecycle:
                continue
            idle_s = self.settings.idle_timeout(rt.cfg)
            if idle_s > 0 and self.may_stop(rt) and now - rt.admission.last_used >= idle_s:
                await self.stop_model(rt, "idle")
            elif check_crashes and rt.server and not await rt.driver.is_running(rt.cfg, rt.server):
                await self.mark_crashed(rt)


def _auth(server) -> dict[str, str]:
    key = server.extra.get("api_key") if server is not None else None
    return {"authorization": f"Bearer {key}"} if key else {}

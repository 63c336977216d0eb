"""Plain values that cross the plugin boundary.

Hooks receive frozen snapshots, never live objects, so a plugin cannot corrupt the
gateway's state by accident: the one owner of each count stays the one writer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# ``failed``: the last start failed; nothing runs, and until its backoff has passed
# requests get 503 at once instead of relaunching it (gateway/lifecycle.py).
ModelState = Literal["stopped", "starting", "ready", "stopping", "sleeping", "failed"]
# How an upstream attempt failed, as the gateway itself classified it (gateway/upstream.py).
# Not sent (safe to retry): connect (refused/unreachable), dns, connect_timeout,
# pool_timeout. Sent or maybe sent: read_timeout, disconnected (closed or reset after the
# request was written), truncated (body cut short), protocol (not HTTP, oversize headers),
# http_5xx / http_429 (the server answered; ``status`` says what).
ErrorKind = Literal["connect", "dns", "connect_timeout", "pool_timeout", "read_timeout",
                    "disconnected", "truncated", "protocol", "http_5xx", "http_429"]


@dataclass(frozen=True)
class ModelView:
    """A read-only snapshot of one configured model, as hooks see it."""

    name: str
    backend: str
    state: ModelState
    waiting: int
    in_flight: int
    max_concurrent: int
    max_queue: int
    last_used: float  # time.monotonic() of the last request start or finish; 0 if never
    loaded_since: float  # time.monotonic() when it became ready; 0 if not loaded
    vram_mib: int  # its footprint when awake (configured, learned or estimated)
    pinned: bool = False
    reload_cost_s: float = 0.0  # how long its last start took; eviction prefers cheap reloads
    urls: tuple[str, ...] = ()
    reserved_mib: int | None = None  # held now (the residual when asleep); None = vram_mib
    sleep_mode: bool = False  # vLLM sleep mode: can be put to sleep instead of stopped

    @property
    def held_mib(self) -> int:
        """GPU memory it holds now, as placement counts it."""
        return self.vram_mib if self.reserved_mib is None else self.reserved_mib

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.in_flight > 0


class ReadOnlyJSON(Mapping[str, Any]):
    """A read-only view of a decoded JSON object; nested objects and lists come back as
    read-only views too (lists as tuples), so a hook cannot change what is forwarded."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return _read_only(self._data[key])

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyJSON({self._data!r})"


def _read_only(value: Any) -> Any:
    if isinstance(value, dict):
        return ReadOnlyJSON(value)
    if isinstance(value, list):
        return tuple(_read_only(v) for v in value)
    return value


@dataclass(frozen=True)
class RequestInfo:
    """What admission and selection hooks know about an incoming request: read-only
    copies (headers with lower-cased names, repeats joined) and views, never live objects."""

    model: str
    path: str
    method: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    client_ip: str = ""
    stream: bool = False
    key: str = ""  # the API key's name (auth.keys[].name; "anonymous" without keys)
    priority: str = ""  # the key's priority band


@dataclass(frozen=True)
class Rejection:
    """Returned by ``admit_request`` to refuse a request before it queues."""

    status: int = 429
    message: str = "request rejected"
    code: str = "rejected"
    reason: str = "rate_limit"  # bounded label for gateway_rejections_total
    retry_after_s: int | None = 1


@dataclass(frozen=True)
class UpstreamOutcome:
    """One failed upstream attempt, as the retry hook sees it."""

    model: str
    attempt: int  # 1-based
    kind: ErrorKind
    status: int | None = None  # the HTTP status when the server answered (http_5xx, http_429)
    error: str = ""
    sent: bool = True  # False only when the request provably never reached the server


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0


@dataclass(frozen=True)
class RetrySettings:
    retries: int
    backoff_s: float
    backoff_multiplier: float


@dataclass(frozen=True)
class Eviction:
    """One eviction decision: ``stop`` the server, or put vLLM to ``sleep`` (weights
    offloaded, GPU memory freed but for a residual; wakes in seconds, not minutes)."""

    model: str
    action: Literal["stop", "sleep"] = "stop"


@dataclass(frozen=True)
class EvictionRequest:
    """Everything the eviction policy needs: pure data, no handles."""

    target: ModelView
    loaded: Sequence[ModelView]  # models currently ready or starting, target excluded
    total_vram_mib: int
    reserved_vram_mib: int  # sum of footprints of loaded models
    max_models_running: int | None
    min_residency_s: float
    now: float  # time.monotonic()
    sleep_residual_mib: int = 0  # what a sleeping vLLM still holds


@dataclass(frozen=True)
class VramReading:
    total_mib: int
    used_mib: int


@dataclass
class RunningServer:
    """A backend driver's handle on one started model server."""

    url: str
    ident: str = ""  # pid, container id, ...
    extra: dict[str, Any] = field(default_factory=dict)


class BackendDriver(Protocol):
    """How a backend type starts and stops model servers.

    Drivers are registered with the ``register_backends`` hook. All methods are
    async; drivers that call blocking libraries (the docker SDK) must run them off the
    event loop.
    """

    #: False for backends that never start anything (static): the gateway then skips
    #: health-waiting, idle stop and eviction for them.
    manages_lifecycle: bool

    # Optional members (looked up with getattr, so drivers may leave them out):
    #
    # ``stop_on_shutdown: bool`` (default True): False leaves this driver's servers
    # running when the gateway stops, for the next gateway to ``adopt``.
    #
    # ``configure(settings: gateway.config.Settings) -> None``: the gateway calls it
    # once per gateway it builds, before ``validate`` and before any start or adopt,
    # with the validated Settings (``register_backends`` only gets ``register``). It
    # must not do I/O; a driver reads what it needs (e.g. ``settings.docker``) lazily.

    def validate(self, model: Any) -> list[str]:
        """Return one message per problem with this model's config (key: reason)."""
        ...

    async def start(self, model: Any, port: int) -> RunningServer: ...

    async def stop(self, model: Any, server: RunningServer) -> None: ...

    async def is_running(self, model: Any, server: RunningServer) -> bool: ...

    async def adopt(self, model: Any) -> RunningServer | None:
        """Return a server this gateway started earlier and left running, if any."""
        ...

    async def logs_tail(self, model: Any, server: RunningServer, lines: int = 20) -> str: ...

    # ``async exit_code(model, server) -> int | None`` (optional): the exit status of a
    # server that has exited, when the driver knows it; shown in start errors.


class Register(Protocol):
    def __call__(self, name: str, driver: BackendDriver) -> None: ...

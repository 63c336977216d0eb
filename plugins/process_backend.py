"""Built-in ``process`` backend: runs a model server as a child process.

``command`` is any server that speaks OpenAI's API and answers GET /health: the
simulator, ``vllm serve``, llama.cpp's server. ``{port}`` and ``{name}`` are filled
in.

Servers never outlive the gateway. Each one runs under a small guard process
(``process_guard``, run as ``python -m <package>.process_guard``) that leads a process
group of its own, gets SIGTERM from the kernel when the gateway dies (even by SIGKILL),
and then stops the whole group (the server and whatever it spawned, such as vLLM's
engine core): SIGTERM, a grace period, SIGKILL. Every process of it carries two
environment variables, ``VLLM_GATEWAY_OWNER=<gateway pid>:<gateway start time>`` and
``VLLM_GATEWAY_MODEL=<model>``, so a gateway starting up can find and stop what a dead
gateway left (``reap_orphans``) should a guard ever fail to.

The guard copies the server's output into ``<server_logs.dir>/<model>-<guard pid>.log``,
moved to ``.log.1`` whenever it would pass ``server_logs.max_bytes``; the driver
removes both files when the server stops.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.hookspecs import hookimpl
from gateway.redact import redact, secrets_of
from gateway.types import RunningServer

from . import process_guard

log = logging.getLogger("vllm_gateway.process")

STOP_GRACE_S = 10.0     # SIGTERM -> SIGKILL, for the guard and for the driver
STOP_MARGIN_S = 2.0     # the driver's SIGKILL comes this long after the guard's own
REAP_GRACE_S = 3.0      # orphans of a dead gateway: SIGTERM -> SIGKILL
TAIL_READ_BYTES = 256 * 1024  # logs_tail reads no more than this of each file
OWNER_ENV = "VLLM_GATEWAY_OWNER"
MODEL_ENV = "VLLM_GATEWAY_MODEL"
GUARD_MODULE = process_guard.__name__  # vllm_gateway_plugins.process_guard when installed
_LOG_NAME = re.compile(r"^(?P<name>.+)-(?P<pid>\d+)\.log(?:\.1)?$")


def resolve_executable(cmd0: str) -> str:
    """Find ``cmd0`` on PATH, else beside this interpreter (a venv's bin/ not on PATH)."""
    found = shutil.which(cmd0)
    if found:
        return found
    sibling = Path(sys.executable).parent / cmd0
    return str(sibling) if sibling.exists() else cmd0


# --- processes, as /proc shows them ------------------------------------------------------------

def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat: clock ticks after boot);
    None for a process that is gone or a zombie."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def owner_marker(pid: int | None = None) -> str:
    """``<pid>:<start time>`` naming this gateway process (or ``pid``) unambiguously."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_ticks(pid) or 0}"


def owner_alive(marker: str) -> bool:
    """Whether the gateway a marker names still runs: same pid, same start time."""
    pid_s, _, ticks_s = marker.partition(":")
    try:
        pid, ticks = int(pid_s), int(ticks_s)
    except ValueError:
        return False  # garbled: nobody can claim it
    return pid > 0 and start_ticks(pid) == ticks


def _markers(pid: int) -> tuple[str | None, str | None]:
    """(owner, model) markers in the process's environment; (None, None) without them.
    Raises PermissionError when the environment cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None, None
    owner = model = None
    if OWNER_ENV.encode() in raw:
        for item in raw.split(b"\0"):
            if item.startswith(b"VLLM_GATEWAY_OWNER="):
                owner = item.split(b"=", 1)[1].decode(errors="replace")
            elif item.startswith(b"VLLM_GATEWAY_MODEL="):
                model = item.split(b"=", 1)[1].decode(errors="replace")
    return owner, model


def _owner_of(pid: int) -> str | None:
    try:
        return _markers(pid)[0]
    except OSError:
        return None


@dataclass(frozen=True)
class Orphan:
    pid: int
    owner: str  # the dead gateway's marker
    model: str


def find_orphans() -> list[Orphan]:
    """Processes whose owner marker names a gateway that no longer runs. Entries that
    cannot be read (another user's, gone meanwhile) are skipped."""
    me = os.getpid()
    alive: dict[str, bool] = {}
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            owner, model = _markers(int(name))
        except OSError:
            continue
        if owner is None:
            continue
        if owner not in alive:
            alive[owner] = owner_alive(owner)
        if not alive[owner]:
            out.append(Orphan(int(name), owner, model or "?"))
    return out


def _signal_orphans(orphans: list[Orphan], sig: int) -> None:
    """Signal each orphan's process group when an orphan leads it (a guard does), else
    the process alone: never a group that a live process merely shares with one."""
    pids = {o.pid for o in orphans}
    own_group = os.getpgrp()
    for o in orphans:
        if _owner_of(o.pid) != o.owner:
            continue  # gone, or the pid now belongs to someone else
        try:
            pgid = os.getpgid(o.pid)
        except OSError:
            continue
        try:
            if pgid in pids and pgid != own_group:
                os.killpg(pgid, sig)
            else:
                os.kill(o.pid, sig)
        except OSError:
            pass


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after wall-clock time ``when`` (so a file last
    written at ``when`` cannot be its)."""
    ticks, boot = start_ticks(pid), _boot_time()
    if ticks is None or boot is None:
        return False
    return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _unlink(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _last_lines(path: str, limit: int = TAIL_READ_BYTES) -> list[str]:
    """The lines in the last ``limit`` bytes of a file (a cut first line dropped)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines(keepends=True)
    return lines[1:] if size > limit and lines else lines


def _check_runnable(argv0: str, shown: str) -> None:
    """Refuse at once a program that cannot be executed (the guard would only log it)."""
    code = 0
    if os.sep not in argv0:
        code = 0 if shutil.which(argv0) else errno.ENOENT
    elif not os.path.exists(argv0):
        code = errno.ENOENT
    elif os.path.isdir(argv0) or not os.access(argv0, os.X_OK):
        code = errno.EACCES
    if code:
        raise RuntimeError(f"cannot run {shown!r}: {os.strerror(code)}")


# --- the driver --------------------------------------------------------------------------------

class ProcessDriver:
    manages_lifecycle = True

    def __init__(self) -> None:
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tailed: set[str] = set()  # servers whose log tail someone has read
        self.settings: Any = None
        self._log_dir: Path | None = None
        self._max_bytes = process_guard.DEFAULT_MAX_BYTES

    def configure(self, settings: Any) -> None:
        """Called by the gateway with its Settings; a relative ``server_logs.dir`` is
        taken relative to the current directory now."""
        self.settings = settings
        logs = settings.server_logs
        self._log_dir = Path(os.path.abspath(os.path.expanduser(logs.dir)))
        self._max_bytes = logs.max_bytes

    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            from gateway.config import ServerLogs

            self._log_dir = Path(os.path.abspath(ServerLogs().dir))
        return self._log_dir

    def validate(self, model: Any) -> list[str]:
        if not model.command:
            return ["command: required for backend process (a list: [program, arg, ...])"]
        if not any("{port}" in part for part in model.command):
            return ["command: must contain {port} so the gateway can choose the server's port"]
        if model.sleep_mode and "--enable-sleep-mode" not in model.command:
            return ["sleep_mode: the command must pass --enable-sleep-mode"]
        return []

    async def start(self, model: Any, port: int) -> RunningServer:
        argv = [part.replace("{port}", str(port)).replace("{name}", model.name)
                for part in model.command]
        shown = argv[0]
        argv[0] = resolve_executable(argv[0])
        _check_runnable(argv[0], shown)
        log_dir = self.log_dir
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"cannot create server_logs.dir {str(log_dir)!r}: "
                               f"{exc.strerror}") from None
        env = {**os.environ, **model.env}
        if model.sleep_mode:  # vLLM serves /sleep and /wake_up only in dev mode
            env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        env[OWNER_ENV] = owner_marker()
        env[MODEL_ENV] = model.name
        name = _safe(model.name)
        guard = [sys.executable, "-m", GUARD_MODULE, "--owner", str(os.getpid()),
                 "--grace", f"{STOP_GRACE_S:g}", "--log-dir", str(log_dir), "--log-name", name,
                 "--max-bytes", str(self._max_bytes), "--", *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *guard, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                env=env, start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"cannot run the process guard ({sys.executable}): "
                               f"{exc.strerror}") from None
        ident = str(proc.pid)
        self._procs[ident] = proc
        log_file = process_guard.log_path(str(log_dir), name, proc.pid)
        return RunningServer(url=f"http://127.0.0.1:{port}", ident=ident,
                             extra={"log": log_file, "pid": proc.pid})

    async def stop(self, model: Any, server: RunningServer) -> None:
        proc = self._procs.pop(server.ident, None)
        if proc is None:
            return
        if proc.returncode is None:
            # The guard passes SIGTERM on to its whole group (so each process gets it once),
            # waits STOP_GRACE_S, then SIGKILLs what is left; the SIGKILL below is a backstop.
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S + STOP_MARGIN_S)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        else:
            _signal_group(proc.pid, signal.SIGKILL)  # strays, should the guard have missed any
            if server.ident not in self._tailed:  # it died by itself: say how, once
                tail = await self.logs_tail(model, server)
                log.warning("model %s: server exited with status %s; last log lines:\n%s",
                            model.name, proc.returncode, tail.rstrip() or "(none)")
        self._tailed.discard(server.ident)
        log_file = server.extra.get("log", "")
        if log_file:
            _unlink(log_file)
            _unlink(log_file + ".1")

    async def is_running(self, model: Any, server: RunningServer) -> bool:
        """The server's state: the guard exits as soon as its server does."""
        proc = self._procs.get(server.ident)
        return proc is not None and proc.returncode is None

    async def exit_code(self, model: Any, server: RunningServer) -> int | None:
        """The server's exit status once it has exited (the guard exits with it)."""
        proc = self._procs.get(server.ident)
        return proc.returncode if proc is not None else None

    async def adopt(self, model: Any) -> RunningServer | None:
        """Nothing to adopt: a process server never outlives its gateway (its guard stops
        it when the gateway dies), and ``reap_orphans`` stops any that a dead gateway
        left behind regardless."""
        return None

    async def logs_tail(self, model: Any, server: RunningServer, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's output (the current file, and the
        backup when the current one is short), with secrets masked."""
        path = server.extra.get("log", "")
        if not path:
            return ""
        self._tailed.add(server.ident)
        tail: deque[str] = deque(maxlen=lines)
        for part in (path + ".1", path):
            tail.extend(_last_lines(part))
        return redact("".join(tail), secrets_of(model, self.settings))

    async def reap_orphans(self, models: list[Any]) -> None:
        """Stop processes a dead gateway left running (found by their owner marker),
        then remove dead servers' files from the log directory. Called at start-up."""
        orphans = await asyncio.to_thread(find_orphans)
        if orphans:
            _signal_orphans(orphans, signal.SIGTERM)
            deadline = time.monotonic() + REAP_GRACE_S
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if not any(_owner_of(o.pid) == o.owner for o in orphans):
                    break
            survivors = [o for o in orphans if _owner_of(o.pid) == o.owner]
            if survivors:
                _signal_orphans(survivors, signal.SIGKILL)
            by_model: dict[str, list[Orphan]] = {}
            for o in orphans:
                by_model.setdefault(o.model, []).append(o)
            for model, procs in sorted(by_model.items()):
                owners = ", ".join(sorted({o.owner.partition(":")[0] for o in procs}))
                log.warning("model %s: stopped %d process(es) left running by gateway pid %s, "
                            "which is gone (%d needed SIGKILL)", model, len(procs), owners,
                            sum(o in survivors for o in procs))
        await asyncio.to_thread(self._remove_stale_logs)

    def _remove_stale_logs(self) -> None:
        """Log files whose guard is gone (or whose pid now names a process started after
        the file was last written) go; a live guard's file stays."""
        try:
            entries = list(os.scandir(self.log_dir))
        except OSError:
            return
        mine = set(self._procs)
        for entry in entries:
            m = _LOG_NAME.match(entry.name)
            if m is None or m.group("pid") in mine or not entry.is_file(follow_symlinks=False):
                continue
            pid = int(m.group("pid"))
            try:
                owner, _ = _markers(pid)
            except OSError:
                continue  # another user's process: not ours to judge
            if owner is not None and owner_alive(owner):
                continue
            if start_ticks(pid) is not None and owner is None:
                try:
                    written = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if not _started_after(pid, written):
                    continue  # a live process that may well be writing it
            _unlink(entry.path)


@hookimpl(trylast=True)
def register_backends(register):
    register("process", ProcessDriver())

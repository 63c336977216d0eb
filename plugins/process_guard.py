"""The guard between the gateway and one model server (the ``process`` backend).

    python -m vllm_gateway_plugins.process_guard --owner PID [--grace S]
        [--log-dir DIR --log-name NAME --max-bytes N] -- PROGRAM [ARG ...]

The gateway starts each model server through this small process so that the server
never outlives the gateway, even when the gateway is SIGKILLed or OOM-killed:

- it asks the kernel for SIGTERM when its parent (the gateway) dies
  (``PR_SET_PDEATHSIG``), then checks that its parent still is ``--owner`` (the gateway
  may have died before that request), and also polls its parent while it runs;
- it leads a session and process group of its own and starts the server in it, with
  SIGTERM/SIGINT/SIGHUP at their defaults and unblocked whatever the gateway had;
  the server gets SIGKILL should the guard itself be killed;
- it copies the server's stdout and stderr into ``DIR/NAME-<guard pid>.log``, moving
  the file to ``.log.1`` (one backup) whenever it would pass ``--max-bytes``;
- on SIGTERM, SIGINT or SIGHUP (the gateway's stop, or the gateway's death) it sends
  SIGTERM to its whole group, waits ``--grace`` seconds for the server, then SIGKILLs
  what is left; when the server exits by itself it SIGKILLs the server's leftovers.
  Either way it exits with the server's exit status (128 + N for a signal N).

Standard library only, and importable as a plain script, so it starts in a few
milliseconds from an installed package or from the repository.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

DEFAULT_GRACE_S = 10.0
DEFAULT_MAX_BYTES = 10_000_000
LINE_SLACK = 16_384  # a line crossing --max-bytes is finished in the same file, up to this
PARENT_POLL_S = 0.5
PR_SET_PDEATHSIG = 1
EXIT_USAGE = 2
EXIT_ORPHANED = 125  # the gateway was gone before the server could start
EXIT_CANNOT_RUN = 127
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


_libc = None


def set_parent_death_signal(sig: int) -> bool:
    """Linux: deliver ``sig`` to this process when its parent thread exits."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class RotatingLog:
    """Append-only file of at most ~``max_bytes`` (plus the end of one line), with one
    ``.1`` backup. Writes go straight to the file descriptor, so readers see them at once."""

    def __init__(self, path: str | None, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max(1, max_bytes)
        self.fd = -1
        self.size = 0
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.size = 0

    def _rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.path, self.path + ".1")
        except OSError:
            pass
        self._open()

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        try:
            while data:
                room = self.max_bytes - self.size
                if room <= 0:
                    self._rotate()
                    continue
                if len(data) <= room:
                    self._put(data)
                    return
                # finish the line that crosses the limit here, then start a fresh file
                nl = data.find(b"\n", room - 1, room + LINE_SLACK)
                cut = nl + 1 if nl >= 0 else room
                self._put(data[:cut])
                self._rotate()
                data = data[cut:]
        except OSError:
            pass  # a full disk must not kill the server: its output is dropped instead

    def note(self, text: str) -> None:
        self.write(f"[process_guard] {text}\n".encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pgrp_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` other than this one (from /proc)."""
    me = os.getpid()
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def _kill_leftovers(pgid: int) -> None:
    """SIGKILL every other member of the group (the guard itself survives to report)."""
    for _ in range(5):
        members = _pgrp_members(pgid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _parse(argv: list[str]) -> dict:
    opts = {"owner": 0, "grace": DEFAULT_GRACE_S, "log_dir": "", "log_name": "server",
            "max_bytes": DEFAULT_MAX_BYTES}
    convert = {"--owner": ("owner", int), "--grace": ("grace", float),
               "--log-dir": ("log_dir", str), "--log-name": ("log_name", str),
               "--max-bytes": ("max_bytes", int)}
    i = 0
    while i < len(argv) and argv[i] != "--":
        key, conv = convert.get(argv[i], (None, None))
        if key is None or i + 1 >= len(argv):
            raise ValueError(f"unknown or incomplete option {argv[i]!r}")
        opts[key] = conv(argv[i + 1])
        i += 2
    opts["command"] = argv[i + 1:]
    if not opts["command"]:
        raise ValueError("no command after --")
    return opts


def log_path(log_dir: str, log_name: str, pid: int) -> str:
    """Where the guard with ``pid`` writes (the driver computes the same name)."""
    return os.path.join(log_dir, f"{log_name}-{pid}.log")


def main(argv: list[str] | None = None) -> int:
    stop: list[int] = []

    def on_stop(signum, frame):
        stop.append(signum)

    # Handlers first: the gateway may have these ignored, and that would be inherited.
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        opts = _parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"process_guard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    owner = opts["owner"]
    set_parent_death_signal(signal.SIGTERM)
    if owner and os.getppid() != owner:
        return EXIT_ORPHANED  # the gateway died before the request above was in place
    if os.getpgrp() != os.getpid():
        try:
            os.setsid()
        except OSError:
            pass
    pgid = os.getpgrp()

    try:
        log = RotatingLog(log_path(opts["log_dir"], opts["log_name"], os.getpid())
                          if opts["log_dir"] else None, opts["max_bytes"])
    except OSError as exc:
        print(f"process_guard: cannot write the server's log: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    out_r, out_w = os.pipe()
    try:
        proc = subprocess.Popen(opts["command"], stdin=subprocess.DEVNULL, stdout=out_w,
                                stderr=out_w, close_fds=True,
                                preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        log.note(f"cannot run {opts['command'][0]!r}: {reason}")
        log.close()
        return EXIT_CANNOT_RUN
    finally:
        os.close(out_w)
    os.set_blocking(out_r, False)

    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    pipe_open = True
    kill_at: float | None = None
    next_parent_check = time.monotonic() + PARENT_POLL_S

    def drain() -> bool:
        """Copy what the pipe holds now; False at end of file."""
        while True:
            try:
                data = os.read(out_r, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            log.write(data)

    while True:
        for key, _ in sel.select(timeout=0.2 if kill_at is None else 0.05):
            if key.fd == wake_r:
                try:
                    os.read(wake_r, 512)
                except OSError:
                    pass
            elif pipe_open and not drain():
                sel.unregister(out_r)
                pipe_open = False
        now = time.monotonic()
        if kill_at is None and owner and now >= next_parent_check:
            next_parent_check = now + PARENT_POLL_S
            if os.getppid() != owner:
                stop.append(signal.SIGTERM)  # no PR_SET_PDEATHSIG here, or it was lost
        if stop and kill_at is None:
            log.note(f"signal {stop[0]}: stopping the server (SIGTERM to its group)")
            kill_at = now + opts["grace"]
            try:
                os.killpg(pgid, signal.SIGTERM)  # the guard's own copy is just noted
            except OSError:
                pass
        if proc.poll() is not None:
            break
        if kill_at is not None and now >= kill_at:
            log.note(f"server still running {opts['grace']:g}s after SIGTERM: SIGKILL")
            proc.kill()
            proc.wait()
            break

    if pipe_open:
        drain()
    _kill_leftovers(pgid)
    if pipe_open:
        drain()
    log.close()
    return _exit_status(proc.returncode)


if __name__ == "__main__":
    sys.exit(main())

"""``vllm-gateway ps | load | unload | logs | reload``: operate a running gateway.

Each command is one call to the admin API (gateway/routes/models.py, /gateway/status,
/gateway/reload). ``--url`` names the gateway (default: the ``listen`` address of
``--config``, else http://127.0.0.1:8080); ``--json`` prints the answer as it came. A
gateway that cannot be reached, or an error answer, is one line on stderr and exit 1.

Once the gateway has API keys, these calls need an admin key (``auth.admin_keys``): set
``VLLM_GATEWAY_ADMIN_KEY`` (``--admin-key`` also works, but a flag shows in ``ps`` and in
shell history). It is sent as ``Authorization: Bearer <key>`` and never printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT_S = 5.0
ADMIN_KEY_ENV = "VLLM_GATEWAY_ADMIN_KEY"
MAX_KEY_CHARS = 512  # what the gateway accepts (gateway/keys.py)


class CtlError(Exception):
    """One line for stderr; the command exits 1."""


def add_commands(sub: Any) -> None:
    """Register the subcommands on ``vllm-gateway``'s subparsers."""
    specs = (("ps", "list models: state, queue, in flight, VRAM, idle time, last error", cmd_ps),
             ("load", "start a model and wait until it is ready", cmd_load),
             ("unload", "drain a model and stop it", cmd_unload),
             ("logs", "print a model server's last log lines (secrets masked)", cmd_logs),
             ("reload", "ask the gateway to reload its config file", cmd_reload))
    for name, help_text, func in specs:
        p = sub.add_parser(name, help=help_text)
        if name in ("load", "unload", "logs"):
            p.add_argument("name", help="model name")
        if name == "unload":
            p.add_argument("--force", action="store_true",
                           help="end requests in flight (503 model_unloaded) instead of waiting")
        if name == "logs":
            p.add_argument("-n", "--lines", type=int, default=100, help="lines (1-5000)")
        p.add_argument("--url", help=f"gateway URL (default: --config's listen, else {DEFAULT_URL})")
        p.add_argument("--config", help="config file whose listen address to use")
        p.add_argument("--json", action="store_true", help="print the raw JSON answer")
        p.add_argument("--admin-key", metavar="KEY",
                       help=f"admin key for a gateway with API keys (default: ${ADMIN_KEY_ENV}; "
                            "prefer the variable: a flag shows in ps)")
        p.set_defaults(func=_guarded(func))


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CtlError as exc:
            print(f"vllm-gateway {args.command}: {exc}", file=sys.stderr)
            return 1
    return run


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    if args.config:
        from gateway.config import ConfigError, Listen, load_settings

        try:
            listen = load_settings(args.config).listen
        except ConfigError as exc:
            # Only the listen address matters here: a problem elsewhere (say, a key_env
            # variable set for the server but not in this shell) does not stop the command.
            section = exc.raw.get("listen", {}) if isinstance(exc.raw, dict) else None
            try:
                if not isinstance(section, dict):
                    raise ValueError
                listen = Listen.model_validate(section)
            except ValueError:  # pydantic's ValidationError too
                about = [line for line in exc.lines if f"{args.config}: listen" in line]
                raise CtlError((about or exc.lines)[0]) from None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{listen.port}"
    return DEFAULT_URL


def admin_key(args: argparse.Namespace) -> tuple[str | None, str]:
    """The admin key to send and where it came from; CtlError (not naming it) if malformed."""
    key, source = getattr(args, "admin_key", None), "--admin-key"
    if not key:
        key, source = os.environ.get(ADMIN_KEY_ENV), ADMIN_KEY_ENV
    if not key:
        return None, ""
    key = key.strip()
    if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable() \
            or " " in key:
        raise CtlError(f"the admin key in {source} is not a valid API key (1-{MAX_KEY_CHARS} "
                       "printable ASCII characters, no spaces)")
    return key, source


def _refusal(resp: httpx.Response, code: str | None, message: str | None, source: str) -> str:
    """The one line for a 401/403 from an admin route."""
    if resp.status_code == 401:
        if not source:
            return (f"the gateway refused: admin key required (set {ADMIN_KEY_ENV} or "
                    "--admin-key)")
        return f"the gateway refused the admin key from {source}: " + (
            message or "the API key is not valid")
    detail = message or f"HTTP {resp.status_code}"
    if code == "admin_forbidden" and source:
        return f"the gateway refused: {detail} (the key in {source} must be one of auth.admin_keys)"
    return f"the gateway refused: {detail}"


def call(args: argparse.Namespace, method: str, path: str, read_timeout: float | None = 30.0,
         **params: Any) -> Any:
    """One admin API call; the decoded JSON answer, or CtlError with the error's message."""
    url = base_url(args) + path
    key, source = admin_key(args)
    headers = {"authorization": f"Bearer {key}"} if key else None
    timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)
    try:
        resp = httpx.request(method, url, params=params or None, headers=headers,
                             timeout=timeout, trust_env=False)
    except httpx.ConnectError:
        raise CtlError(f"cannot connect to the gateway at {base_url(args)} (is it running? "
                       "see --url)") from None
    except httpx.HTTPError as exc:
        raise CtlError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        if not isinstance(message, str):
            message = None
        if resp.status_code in (401, 403):
            code = err.get("code") if isinstance(err, dict) else None
            line = _refusal(resp, code, message and message.splitlines()[0], source)
            raise CtlError(line.replace(key, "***") if key else line)
        problems = body.get("problems") if isinstance(body, dict) else None
        if message and isinstance(problems, list):  # a rejected reload: one line each
            message = "\n".join([message, *(f"  {p}" for p in problems)])
        raise CtlError(message or f"HTTP {resp.status_code} from {method} {path}")
    return body


def _model_path(name: str, action: str) -> str:
    return f"/gateway/models/{quote(name, safe='/:@+')}/{action}"


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


# --- commands ----------------------------------------------------------------------------------

COLUMNS = ("MODEL", "STATE", "QUEUE", "IN FLIGHT", "VRAM", "IDLE FOR", "LAST ERROR")
ERROR_WIDTH = 60


def cmd_ps(args: argparse.Namespace) -> int:
    body = call(args, "GET", "/gateway/status")
    if args.json:
        _print_json(body)
        return 0
    now = time.time()
    rows = [COLUMNS]
    for name, m in body.get("models", {}).items():
        error = (m.get("last_error") or "-").replace("\n", " ")
        rows.append((name, m["state"], str(m["queue_depth"]), str(m["in_flight"]),
                     _mib(m.get("vram_mib") or 0),
                     _duration(now - m["last_used"]) if m.get("last_used") else "-",
                     error if len(error) <= ERROR_WIDTH else error[:ERROR_WIDTH - 3] + "..."))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """POST .../load waits for the start; meanwhile stderr shows the seconds going by."""
    result: dict[str, Any] = {}

    def request() -> None:
        try:
            result["body"] = call(args, "POST", _model_path(args.name, "load"), read_timeout=None)
        except CtlError as exc:
            result["error"] = exc

    worker = threading.Thread(target=request, daemon=True)
    started = time.monotonic()
    worker.start()
    tty = sys.stderr.isatty()
    while worker.is_alive():
        worker.join(1.0)
        if worker.is_alive():
            elapsed = time.monotonic() - started
            sys.stderr.write(f"\rloading {args.name}: {elapsed:.0f}s" if tty else ".")
            sys.stderr.flush()
    if time.monotonic() - started >= 1.0:
        sys.stderr.write("\n")
    if "error" in result:
        raise result["error"]
    body = result["body"]
    if args.json:
        _print_json(body)
    else:
        print(f"{args.name}: {body['state']} ({time.monotonic() - started:.1f}s)")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    params = {"force": "true"} if args.force else {}
    body = call(args, "POST", _model_path(args.name, "unload"), read_timeout=None, **params)
    if args.json:
        _print_json(body)
    else:
        print(f"{args.name}: {body['state']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    body = call(args, "GET", _model_path(args.name, "logs"), lines=args.lines)
    if args.json:
        _print_json(body)
    else:
        for line in body.get("lines", []):
            print(line)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    body = call(args, "POST", "/gateway/reload", read_timeout=120.0)
    if args.json or not isinstance(body, dict):
        _print_json(body)
        return 0
    changes = [f"{key.replace('_', ' ')}: {', '.join(map(str, value))}"
               for key in ("added", "removed", "changed", "restart_required")
               if isinstance(value := body.get(key), list) and value]
    print("config reloaded" + ("; " + "; ".join(changes) if changes else ": no changes"))
    return 0


def _mib(mib: int) -> str:
    if not mib:
        return "-"
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib} MiB"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

"""``vllm-gateway``: serve, check-config, plugins, simulate; ps, load, unload, logs,
reload (gateway/ctl.py)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from gateway.auth_config import exposure_problem
from gateway.config import ConfigError, Settings, demo_settings, load_settings
from gateway.plugins import PluginError


def _load(path: str | None) -> tuple[Settings, str]:
    if path is None:
        return load_settings(raw=demo_settings()), "demo config"
    return load_settings(path), path


def _serve_settings(path: str | None, host: str | None, port: int | None) -> Settings:
    """The config as ``serve`` reads it: the file (or the demo), its environment overrides,
    then ``--host``/``--port``. A config reload reads it the same way."""
    settings, _ = _load(path)
    if host or port:
        listen = settings.listen.model_copy(update={k: v for k, v in
                                                    (("host", host), ("port", port)) if v})
        settings = settings.model_copy(update={"listen": listen})
        problem = exposure_problem(settings, "--host")
        if problem:
            raise ConfigError([problem])
    return settings


def config_problems(path: str) -> tuple[Settings | None, list[str]]:
    """Every problem with a config file in one pass, one line each: the file's own (YAML,
    keys, values, environment overrides), then the plugins' and every backend driver's
    (``validate``) with whatever still validates. ``(settings, [])`` when there is none."""
    from gateway.app import build_gateway
    from gateway.config import Plugins, salvage
    from gateway.reload import about_dropped

    lines: list[str] = []
    settings: Settings | None = None
    dropped: dict[str, set[str]] = {}
    try:
        settings = target = load_settings(path)
    except ConfigError as exc:
        lines += exc.lines
        target, dropped = salvage(exc.raw) if exc.raw is not None else (None, {})
    fallback = False  # after a plugin problem: the built-in plugins only
    while target is not None:
        try:
            build_gateway(target, source=path)
        except ConfigError as exc:
            lines += [line for line in exc.lines if not about_dropped(line, dropped, path)
                      and not (fallback and "unknown backend" in line)]
        except PluginError as exc:
            lines += str(exc).splitlines()
            if not fallback:  # the drivers' checks still run, without the broken plugins
                fallback = True
                target = target.model_copy(update={"plugins": Plugins(load_entrypoints=False)})
                continue
        break
    return (settings if not lines else None), lines


def cmd_serve(args: argparse.Namespace) -> int:
    import functools

    from sanic.server.socket import bind_socket

    from gateway.app import GatewayProtocol, create_app
    from gateway.logging_setup import configure_logging

    source = args.config or "demo config"
    try:
        settings = _serve_settings(args.config, args.host, args.port)
        configure_logging(settings.logging.format)  # before build: its lines are formatted too
        app = create_app(settings, source=source)
        configure_logging(settings.logging.format)  # again: Sanic() adds handlers of its own
    except (ConfigError, PluginError) as exc:
        lines = config_problems(args.config)[1] if args.config else []
        print("\n".join(lines or str(exc).splitlines()), file=sys.stderr)
        return 2
    host, port = settings.listen.host, settings.listen.port
    try:
        # Bound here, so a taken port is one line, not a traceback.
        sock = bind_socket(host, port, backlog=settings.listen.backlog)
    except OSError as exc:
        print(f"{source}: listen: cannot listen on {host}:{port}: {exc.strerror or exc} "
              "(set listen.port or --port)", file=sys.stderr)
        return 2
    if args.config:  # what a reload (SIGHUP, POST /gateway/reload) re-reads
        app.ctx.config_loader = functools.partial(_serve_settings, args.config, args.host,
                                                  args.port)
        app.ctx.config_source = args.config

    @app.after_server_start
    async def _serving(app) -> None:  # only once the socket is bound and the fleet is up
        logging.getLogger("vllm_gateway").info("serving %d model(s) from %s on http://%s:%d",
                                               len(app.ctx.gateway.fleet.runtimes), source,
                                               host, port)

    _tune_gc(app)
    app.ctx.handle_signals = True
    # The backlog again: serving calls listen() on the socket once more, with this value.
    app.run(sock=sock, backlog=settings.listen.backlog, single_process=True, access_log=False,
            motd=False, register_sys_signals=False, protocol=GatewayProtocol)
    return 0


def _tune_gc(app) -> None:
    """Server-only GC tuning (measured in bench/README.md: about +7% req/s).

    After start-up everything long-lived (modules, app, plugins, config) is frozen out
    of the collector's view, and young-generation collections run less often: a proxy
    allocates many short-lived objects and almost no cycles.
    """
    import gc

    @app.after_server_start
    async def _freeze(app) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings, lines = config_problems(args.file)
    if settings is None:
        print("\n".join(lines), file=sys.stderr)
        return 1
    effective = settings.model_dump(mode="json")
    if effective["docker"].get("hf_token"):
        effective["docker"]["hf_token"] = "***"
    print(json.dumps(effective, indent=2))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from gateway.app import build_gateway
    from gateway.plugins import list_plugins

    try:
        settings, source = _load(args.config)
        pm = build_gateway(settings, source=source).hooks.pm  # exactly what serve would load
    except (ConfigError, PluginError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    rows = list_plugins(pm)
    if args.json:
        print(json.dumps([{"name": r.name, "origin": r.origin, "hooks": list(r.hooks)} for r in rows],
                         indent=2))
        return 0
    for r in rows:
        print(f"{r.name:24} {r.origin:32} {', '.join(r.hooks)}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import vllm_simulator.server as simulator

    simulator.main_from_args(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (the built-in demo without --config)")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    plug = sub.add_parser("plugins", help="list loaded plugins and the hooks they implement")
    plug.add_argument("--config")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)
    sim = sub.add_parser("simulate", help="run a vLLM simulator")
    import vllm_simulator.server as simulator
    simulator.add_arguments(sim)
    sim.set_defaults(func=cmd_simulate)
    from gateway import ctl
    ctl.add_commands(sub)  # ps, load, unload, logs, reload: against a running gateway
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer (got {text!r})") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535 (got {value})")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

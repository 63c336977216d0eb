"""``vllm-gateway``: serve, check-config, plugins, simulate."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from gateway.config import ConfigError, Settings, demo_settings, load_settings
from gateway.plugins import PluginError


def _load(path: str | None) -> tuple[Settings, str]:
    if path is None:
        return load_settings(raw=demo_settings()), "demo config"
    return load_settings(path), path


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import GatewayProtocol, create_app

    try:
        settings, source = _load(args.config)
        if args.host or args.port:
            listen = settings.listen.model_copy(update={k: v for k, v in
                                                        (("host", args.host), ("port", args.port)) if v})
            settings = settings.model_copy(update={"listen": listen})
        app = create_app(settings, source=source)
    except (ConfigError, PluginError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logging.getLogger("vllm_gateway").info("serving %d model(s) from %s on http://%s:%d",
                                           len(settings.models), source, settings.listen.host,
                                           settings.listen.port)
    _tune_gc(app)
    app.ctx.handle_signals = True
    app.run(host=settings.listen.host, port=settings.listen.port, single_process=True,
            access_log=False, motd=False, register_sys_signals=False, protocol=GatewayProtocol)
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
    from gateway.app import build_gateway

    try:
        settings = load_settings(args.file)
        build_gateway(settings, source=args.file)
    except (ConfigError, PluginError) as exc:
        print(str(exc), file=sys.stderr)
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

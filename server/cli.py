"""The `adaptserve` command: serve, prepare-base, and the trainer's subcommands.

`serve` flags are generated from Settings, so every setting is a flag, an environment
variable (ADAPTSERVE_*) and a Kubernetes ConfigMap key with one name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import logging
import signal
import sys
import time
from typing import Any, get_args, get_origin

from pydantic import SecretStr, ValidationError

from server.config import Settings

logger = logging.getLogger("adaptserve")
STARTUP_FAILURE = 3  # uvicorn's exit code for a listener that never started


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if get_origin(annotation) is list:
            parser.add_argument(flag, action="append", metavar="VALUE", **options)
            continue
        choices = get_args(annotation) if "Literal" in str(annotation) else None
        parser.add_argument(flag, choices=choices, metavar=None if choices else "VALUE", **options)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "::1"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse a non-loopback listener without an admin token, unless --insecure."""
    exposed = [h for h in (settings.host, settings.admin_host) if not _is_loopback(h)]
    has_token = settings.admin_token is not None or settings.admin_token_file is not None
    if exposed and not has_token:
        if not settings.insecure:
            raise SystemExit(
                f"refusing to listen on {', '.join(exposed)} without an admin token: set "
                "ADAPTSERVE_ADMIN_TOKEN(_FILE), bind 127.0.0.1, or pass --insecure"
            )
        logger.warning("!!! INSECURE: listening on %s with NO admin token: anyone who can reach it can "
                       "upload and delete adapters !!!", ", ".join(exposed))
    elif settings.insecure and not has_token:
        logger.warning("!!! INSECURE: adapter management is OPEN on loopback: any local process, and any web "
                       "page open in a browser here (cross-site POST), can upload and delete adapters !!!")


async def _serve(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app

    class DrainingServer(uvicorn.Server):
        """Signals are adaptserve's (drain, then exit); uvicorn's own would stop serving at once."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    app = create_app(settings, surface="public" if settings.admin_port is not None else "all")
    services = app.state.services
    servers = [DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port,
                                             log_level=settings.log_level, lifespan="on"))]
    if settings.admin_port is not None:
        admin = create_app(settings, services=services, surface="admin")
        servers.append(DrainingServer(uvicorn.Config(admin, host=settings.admin_host, port=settings.admin_port,
                                                     log_level=settings.log_level, lifespan="on")))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def drain_then_exit() -> None:
        await stop.wait()
        services.draining = True  # /readyz -> 503, new requests -> 503 at once
        deadline = time.monotonic() + settings.drain_timeout_s
        logger.warning("SIGTERM: draining %d running requests (up to %.0f s)",
                       services.scheduler.in_flight if services.scheduler else 0, settings.drain_timeout_s)
        while time.monotonic() < deadline and services.scheduler is not None and services.scheduler.in_flight:
            await asyncio.sleep(0.1)
        for server in servers:
            server.should_exit = True

    async def exit_on_failed_boot() -> None:
        # /healthz keeps answering while the base loads, so a start that failed must end the
        # process itself: Kubernetes then restarts it (CrashLoopBackOff) with the reason logged.
        await services.boot_failed.wait()
        print(f"adaptserve: start-up failed: {services.boot_error}", file=sys.stderr, flush=True)
        for server in servers:
            server.should_exit = True

    watchers = [asyncio.create_task(drain_then_exit()), asyncio.create_task(exit_on_failed_boot())]
    await asyncio.gather(*(server.serve() for server in servers))
    for watcher in watchers:
        watcher.cancel()
    if services.boot_failed.is_set():
        return 1
    if not all(server.started for server in servers):
        return STARTUP_FAILURE  # uvicorn logged why (a lifespan error); uvicorn.run exits with the same code
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    if "api_keys" in given:
        given["api_keys"] = [SecretStr(k) for k in given["api_keys"]]
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        print("adaptserve: invalid settings:", *_setting_problems(exc), sep="\n  ", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_exposure(settings)
    return asyncio.run(_serve(settings))


def _setting_problems(exc: ValidationError) -> list[str]:
    """One line per problem, naming the flag and the environment variable."""
    lines = []
    for error in exc.errors():
        field, *item = [str(part) for part in error["loc"]] or ["settings"]
        known = Settings.model_fields.get(field)
        where = f"--{field.replace('_', '-')} / ADAPTSERVE_{field.upper()}" if known else field
        if item:
            where += f" (item {'.'.join(item)})"
        # A secret's value (or a misspelt secret's) never reaches the terminal or the pod log.
        shown = f": {error['input']!r}" if known and "SecretStr" not in str(known.annotation) else ""
        lines.append(f"{where}: {error['msg']}{shown}")
    return lines


def cmd_prepare_base(args: argparse.Namespace) -> int:
    """Resolve (and for the GGUF default, convert) the base into the cache, then exit."""
    from adapters.bases import resolve_base

    settings = Settings(**{k: v for k, v in vars(args).items() if k in ("base_model", "cache_dir")})
    resolved = resolve_base(settings.base_model, settings.cache_dir / "bases")
    print(f"{settings.base_model}: {resolved.path} ({resolved.canonical_id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{serve,prepare-base,train,eval,compare,push,bench,soak}")
    serve = sub.add_parser("serve", help="serve the base model and the adapters in the store")
    _add_settings_flags(serve)
    serve.set_defaults(handler=cmd_serve)
    prepare = sub.add_parser("prepare-base", help="convert/cache the base model and exit (for image builds)")
    prepare.add_argument("--base-model", dest="base_model", default=argparse.SUPPRESS)
    prepare.add_argument("--cache-dir", dest="cache_dir", default=argparse.SUPPRESS)
    prepare.set_defaults(handler=cmd_prepare_base)
    return parser


# Subcommands owned by other packages; imported only when used (the trainer never imports
# the server, and serving never pays for the trainer's imports).
DELEGATED = {
    "train": ("trainer.cli", "main", True),
    "eval": ("trainer.cli", "main", True),
    "compare": ("trainer.cli", "main", True),
    "push": ("trainer.cli", "main", True),
    "bench": ("bench.run", "main", False),
    "soak": ("bench.soak", "main", False),
    "export": ("adapters.export", "main", False),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module_name, function, keeps_command = DELEGATED[argv[0]]
        module = importlib.import_module(module_name)
        return getattr(module, function)(argv if keeps_command else argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

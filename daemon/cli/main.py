"""The `vigil` command: argv -> config -> logging -> one task group on uvloop.

Only this module maps exceptions to exit codes: 0 success, 1 failure, 2 usage,
69 daemon unreachable (EX_UNAVAILABLE), 78 invalid config (EX_CONFIG, so systemd
does not restart-loop on it)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from daemon import __version__
from daemon.cli import bench, client_commands, debug, demo, logs, top
from daemon.config import Config, ConfigError, SimulateConfig, load_config
from daemon.control.client import DaemonUnavailable, RemoteError
from daemon.errors import StartupError

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78
DEFAULT_CONFIG = "/etc/vigil/vigil.toml"


def config_path(args: argparse.Namespace) -> str | None:
    """--config, then $VIGIL_CONFIG, then /etc/vigil/vigil.toml if it exists."""
    path: str | None = getattr(args, "config", None) or os.environ.get("VIGIL_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return path


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, then $VIGIL_SOCKET, then the config's socket, then the defaults."""
    explicit = args.socket or os.environ.get("VIGIL_SOCKET")
    if explicit:
        return Path(explicit)
    return load_config(config_path(args)).socket_path


def run_async(func: Callable[[], Awaitable[int]]) -> int:
    """Run on uvloop; a task group's lone failure comes out as itself, so the exit
    code mapping in main() sees the real error."""
    try:
        return anyio.run(func, backend="asyncio", backend_options={"use_uvloop": True})
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.app import block_signals, run_daemon

    block_signals()
    from daemon.observe.logs import configure_logging
    from daemon.observe.ring import LogRing

    path = config_path(args)
    config = load_config(path)
    ring = LogRing(config.log.ring_size)
    writer = configure_logging(
        config.log.level, config.log.format, secrets=_secrets(config), ring=ring
    )
    try:
        return run_async(
            lambda: run_daemon(config, config_path=path, log_ring=ring, log_writer=writer)
        )
    finally:
        writer.flush()  # the lines of the loop's last iteration


def _secrets(config: Config) -> list[str]:
    names = [p.api_key_env for p in config.providers.values() if p.api_key_env]
    names.append(config.http.token_env)
    return [os.environ[n] for n in names if n and os.environ.get(n)]


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or config_path(args)
    config = load_config(path)
    print(
        f"{path or '(defaults)'}: ok — {len(config.providers)} provider(s), "
        f"{len(config.analyzers)} analyzer(s); state in {config.state_dir}, "
        f"socket {config.socket_path}"
    )
    missing = [
        f"{name}: ${p.api_key_env} is not set"
        for name, p in config.providers.items()
        if p.api_key_env and not os.environ.get(p.api_key_env)
    ]
    for line in missing:
        print(f"warning: provider {line}", file=sys.stderr)
    return EX_OK


def cmd_simulate_api(args: argparse.Namespace) -> int:
    from daemon.providers.simulated import run_standalone

    settings = SimulateConfig(
        latency_ms=args.latency_ms,
        latency_sigma=args.latency_sigma,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        error_rate=args.error_rate,
        hang_rate=args.hang_rate,
        seed=args.seed,
    )

    async def serve() -> int:
        import signal

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_standalone, settings, args.host, args.port)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
        return EX_OK

    return run_async(serve)


def add_common(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--config and --socket, accepted before or after the command name."""
    parser.add_argument("--config", default=default, help="config file ($VIGIL_CONFIG)")
    parser.add_argument("--socket", default=default, help="control socket ($VIGIL_SOCKET)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vigil", description="Run AI analysis jobs continuously and safely."
    )
    parser.add_argument("--version", action="version", version=f"vigil {__version__}")
    add_common(parser, argparse.SUPPRESS)
    parser.set_defaults(config=None, socket=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    add_common(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    add_common(check)
    check.add_argument("file", nargs="?")
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate-api", help="serve the simulated OpenAI-compatible API")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8471)
    sim.add_argument("--latency-ms", type=float, default=200.0)
    sim.add_argument("--latency-sigma", type=float, default=0.5)
    sim.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    sim.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--hang-rate", type=float, default=0.0)
    sim.add_argument("--seed", type=int)
    sim.set_defaults(func=cmd_simulate_api)

    demo.add_parser(sub)
    bench.add_parser(sub)
    logs.add_parser(sub)
    top.add_parser(sub)
    client_commands.add_parsers(sub)
    debug.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"vigil: invalid config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DaemonUnavailable as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except RemoteError as exc:
        print(f"vigil: {exc.code}: {exc.message}", file=sys.stderr)
        _print_details(exc.details)
        return EX_FAIL
    except client_commands.UsageError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_USAGE
    except StartupError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130


def _print_details(details: Any) -> None:
    if isinstance(details, list):
        for item in details[:20]:
            if isinstance(item, dict) and "field" in item:
                where = f"job {item['index']}: " if item.get("index") is not None else ""
                print(f"  {where}{item['field']}: {item['message']}", file=sys.stderr)

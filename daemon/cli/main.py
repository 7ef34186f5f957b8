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
from typing import Annotated, Any, get_type_hints

import anyio
import msgspec

from daemon import __version__
from daemon.cli import bench, client_commands, debug, demo, logs, results, top, webhooks
from daemon.config import Config, ConfigError, PositiveInt, SimulateConfig, load_config
from daemon.control.client import DaemonUnavailable, RemoteError
from daemon.errors import StartupError

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78
DEFAULT_CONFIG = "/etc/vigil/vigil.toml"
MAX_FIELD_ERRORS = 20
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


def constrained(kind: Any) -> Callable[[str], Any]:
    """An argparse `type=` for `kind` and its msgspec constraints (`Annotated[...,
    Meta(...)]`): a value out of range is a usage error naming the flag, caught in the
    client by the same rules the config file uses."""

    def convert(text: str) -> Any:
        try:
            return msgspec.convert(text, type=kind, strict=False)
        except msgspec.ValidationError as exc:
            expected = str(exc).removesuffix(", got `str`")
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None

    return convert


positive_int = constrained(PositiveInt)


def config_path(args: argparse.Namespace) -> str | None:
    """--config, then $VIGIL_CONFIG, then /etc/vigil/vigil.toml if it exists."""
    path: str | None = getattr(args, "config", None) or os.environ.get("VIGIL_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return path


class ConfigNotUsable(ConfigError):
    """No config to run on, or one the daemon would do nothing with (exit 78). Not
    "invalid": the message says what is missing."""


def required_config_path(args: argparse.Namespace, given: str | None = None) -> str:
    """The config file `run` and `check-config` use; none found is an error naming
    every place looked at, so a missing file never means a daemon on defaults."""
    path = given or config_path(args)
    if path is not None:
        return path
    env = "set but empty" if os.environ.get("VIGIL_CONFIG") == "" else "not set"
    raise ConfigNotUsable(
        f"no config file found; tried --config (not given), $VIGIL_CONFIG ({env}), "
        f"{DEFAULT_CONFIG} (does not exist). Name one with --config FILE"
    )


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

    path = required_config_path(args)
    config = load_config(path)
    _check_secrets(path, config)
    if not config.analyzers and not args.allow_empty:
        raise ConfigNotUsable(
            f"{path} configures no analyzers, so no job could run: refusing to start. "
            "Add an [analyzers.NAME] table, or pass --allow-empty to start anyway"
        )
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
    from daemon.webhooks.secrets import secret_values

    names = [p.api_key_env for p in config.providers.values() if p.api_key_env]
    names += [config.http.token_env, config.store.password_env, "PGPASSWORD"]
    return [os.environ[n] for n in names if n and os.environ.get(n)] + secret_values(config)


def _check_secrets(path: str, config: Config) -> None:
    """The webhooks' signing keys are set (a ConfigError naming each variable that is
    not: exit 78), as `vigil run` needs them to start."""
    from daemon.webhooks.secrets import read_secrets

    try:
        read_secrets(config.webhooks)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config as `vigil run` would. That imports the handler modules of
    `handler = "module:function"` analyzers, so their import-time code runs here too."""
    from daemon.analyzers import build_analyzers

    path = required_config_path(args, args.file)
    config = load_config(path)
    _check_secrets(path, config)
    analyzers = build_analyzers(config)
    print(
        f"{path}: ok — {len(config.providers)} provider(s), "
        f"{len(config.analyzers)} analyzer(s), {len(config.webhooks)} webhook(s); "
        f"state in {config.state_dir}, "
        f"socket {config.socket_path}"
    )
    if analyzers:
        print("analyzers and the input fields their prompts need:")
        width = max(len(name) for name in analyzers)
        for name, analyzer in analyzers.items():
            needs = "any (handler)" if analyzer.handler else ", ".join(analyzer.fields) or "none"
            print(f"  {name.ljust(width)}  {needs}")
    else:
        print(
            "warning: no analyzers: `vigil run` refuses to start without --allow-empty",
            file=sys.stderr,
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
    from daemon.simulated.server import run_standalone

    # The token budgets are each dialect's own (as the config file's checks say).
    if args.dialect == "anthropic" and args.tpm:
        raise client_commands.UsageError(
            "--tpm is the openai dialect's; the anthropic dialect limits --itpm and --otpm"
        )
    if args.dialect == "openai" and (args.itpm or args.otpm):
        raise client_commands.UsageError(
            "--itpm and --otpm are the anthropic dialect's; the openai dialect limits --tpm"
        )
    settings = SimulateConfig(
        dialect=args.dialect,
        latency_ms=args.latency_ms,
        latency_sigma=args.latency_sigma,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        input_tokens_per_minute=args.itpm,
        output_tokens_per_minute=args.otpm,
        slice_s=args.slice_s,
        error_rate=args.error_rate,
        hang_rate=args.hang_rate,
        overload_rate=args.overload_rate,
        seed=args.seed,
    )

    async def listen() -> None:
        try:
            await run_standalone(settings, args.host, args.port)
        except OSError as exc:
            host = f"[{args.host}]" if ":" in args.host else args.host
            raise StartupError(f"cannot listen on {host}:{args.port}: {_reason(exc)}") from None

    async def serve() -> int:
        import signal

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
        return EX_OK

    return run_async(serve)


def _reason(exc: OSError) -> str:
    """The system's short reason: uvloop and asyncio put a long sentence in strerror,
    and getaddrinfo errors have negative numbers os.strerror does not know."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def add_common(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--config and --socket, accepted before or after the command name."""
    parser.add_argument("--config", default=default, help="config file ($VIGIL_CONFIG)")
    parser.add_argument("--socket", default=default, help="control socket ($VIGIL_SOCKET)")


SIMULATE_LIMIT_FLAGS: tuple[tuple[str, str, float, str], ...] = (
    ("--rpm", "requests_per_minute", 0, "requests per minute (0: no limit)"),
    (
        "--tpm",
        "tokens_per_minute",
        0,
        "openai: tokens per minute, prompt + max_tokens (0: no limit)",
    ),
    (
        "--itpm",
        "input_tokens_per_minute",
        0,
        "anthropic: input tokens per minute, cache reads free",
    ),
    ("--otpm", "output_tokens_per_minute", 0, "anthropic: output tokens per minute (0: no limit)"),
    ("--slice-s", "slice_s", 1.0, "limits are enforced in slices this long (60: a minute's burst)"),
    (
        "--overload-rate",
        "overload_rate",
        0.0,
        "share answered overloaded (anthropic 529, openai 503)",
    ),
)
"""`vigil simulate-api`'s limit and fault flags: (flag, SimulateConfig field, default, help)."""


def add_simulate_parser(sub: Any) -> None:
    """`vigil simulate-api`: each flag is checked by SimulateConfig's own constraint for
    its field, so the command line takes exactly what the config file takes."""
    field = {
        name: constrained(kind)
        for name, kind in get_type_hints(SimulateConfig, include_extras=True).items()
    }
    sim = sub.add_parser(
        "simulate-api", help="serve the simulated AI API (OpenAI's or Anthropic's dialect)"
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=constrained(Port), default=8471)
    sim.add_argument(
        "--dialect",
        type=field["dialect"],
        default="openai",
        metavar="{openai,anthropic}",
        help="the API spoken: openai (/v1/chat/completions) or anthropic (/v1/messages)",
    )
    sim.add_argument("--latency-ms", type=field["latency_ms"], default=200.0)
    sim.add_argument("--latency-sigma", type=field["latency_sigma"], default=0.5)
    for flag, key, default, text in SIMULATE_LIMIT_FLAGS:
        sim.add_argument(flag, type=field[key], default=default, help=text)
    sim.add_argument("--error-rate", type=field["error_rate"], default=0.0)
    sim.add_argument("--hang-rate", type=field["hang_rate"], default=0.0)
    sim.add_argument("--seed", type=field["seed"])
    sim.set_defaults(func=cmd_simulate_api)


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
    run.add_argument(
        "--allow-empty",
        action="store_true",
        help="start even when the config has no analyzers (a reload may add some)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    add_common(check)
    check.add_argument("file", nargs="?")
    check.set_defaults(func=cmd_check_config)

    add_simulate_parser(sub)

    demo.add_parser(sub)
    bench.add_parser(sub)
    logs.add_parser(sub)
    results.add_parsers(sub)
    top.add_parser(sub)
    client_commands.add_parsers(sub)
    debug.add_parser(sub)
    webhooks.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a reader that has gone (`| head`) shows up here, not at exit
        return code
    except BrokenPipeError:
        # Python docs, "Note on SIGPIPE": point stdout at devnull so the flush at exit
        # does not fail again, and stop quietly, with Python's exit code for EPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_FAIL
    except ConfigNotUsable as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as exc:
        print(f"vigil: invalid config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DaemonUnavailable as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except RemoteError as exc:
        _print_remote(exc)
        return EX_FAIL
    except client_commands.UsageError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return EX_USAGE
    except StartupError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _print_remote(exc: RemoteError) -> None:
    """The daemon's message sums up its first field error, which its details list
    again (with a job's place in the whole submit): print each field error once."""
    details = exc.details if isinstance(exc.details, list) else []
    fields = [_field_line(d) for d in details if isinstance(d, dict) and "field" in d]
    if len(fields) == 1:
        print(f"vigil: {exc.code}: {fields[0]}", file=sys.stderr)
        return
    if not fields:
        print(f"vigil: {exc.code}: {exc.message}", file=sys.stderr)
        return
    print(f"vigil: {exc.code}: {len(fields)} errors:", file=sys.stderr)
    for line in fields[:MAX_FIELD_ERRORS]:
        print(f"  {line}", file=sys.stderr)
    if len(fields) > MAX_FIELD_ERRORS:
        print(f"  ... and {len(fields) - MAX_FIELD_ERRORS} more", file=sys.stderr)


def _field_line(item: dict[str, Any]) -> str:
    where = f"job {item['index']}: " if item.get("index") is not None else ""
    return f"{where}{item['field']}: {item['message']}"

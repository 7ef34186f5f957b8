"""Vigil's configuration: one frozen msgspec Struct tree decoded from TOML.

Parsing is pure and cheap (no files opened but the config itself, no sockets), so
SIGHUP can re-run it and hand components the new values. Every error names the key
path (`$.analyzers.summarize.max_tokens`) and the reason.
"""

from __future__ import annotations

import os
import re
import socket
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from daemon.config_errors import explain

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Rate = Annotated[float, Meta(ge=0, le=1)]
SliceSeconds = Annotated[float, Meta(ge=0.05, le=60)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=64)]

DEFAULT_HTTP_LISTEN = "127.0.0.1:8470"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path and why."""


class Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Shared base: immutable, and an unknown key (a typo) is an error."""


class DaemonConfig(Base, frozen=True):
    state_dir: str = ""
    socket: str = ""
    socket_group: str = ""
    shutdown_grace_s: NonNegFloat = 30.0
    # FULL: a committed job survives power loss; NORMAL: only a process crash.
    synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "FULL"
    # Below this much free space under the database, intake refuses (0 = off): what is
    # left is kept for running attempts to record their results.
    min_free_mb: NonNegInt = 64


class HttpConfig(Base, frozen=True):
    listen: str = DEFAULT_HTTP_LISTEN
    token_env: str = "VIGIL_HTTP_TOKEN"
    # A request body beyond this is refused with 413 (a submit is at most 10,000 jobs).
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024


class QueueConfig(Base, frozen=True):
    max_concurrency: PositiveInt = 64
    max_backlog: PositiveInt = 1_000_000
    max_input_bytes: PositiveInt = 1_048_576
    backoff_base_s: NonNegFloat = 1.0
    backoff_max_s: NonNegFloat = 300.0
    retain_finished_s: NonNegFloat = 0.0  # finished jobs older than this are deleted; 0 = keep


class RetentionConfig(Base, frozen=True):
    """How long finished jobs are kept, by how they ended (days; 0 keeps them forever).
    With `queue.retain_finished_s` also set, the shorter of the two applies."""

    succeeded_days: NonNegFloat = 7.0
    failed_days: NonNegFloat = 30.0
    canceled_days: NonNegFloat = 7.0


class LogConfig(Base, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    ring_size: Annotated[int, Meta(ge=100, le=1_000_000)] = 10_000  # events `vigil logs` sees


class WatchdogConfig(Base, frozen=True):
    """The in-process watchdog (daemon/watchdog/); `enabled = false` keeps only the
    systemd watchdog pings."""

    enabled: bool = True
    block_threshold_ms: PositiveInt = 250
    # Fallback for stalls the side thread cannot see (C code holding the GIL):
    # faulthandler dumps every thread's stack when the loop has not ticked this long.
    stall_dump_s: PositiveFloat = 10.0
    max_rss_mb: NonNegInt = 0  # 0 = off; above it: drain and exit 75 for a restart
    sample_s: PositiveFloat = 10.0  # RSS, fds, threads, tasks
    warmup_s: NonNegFloat = 60.0  # baselines are taken after this
    memory_growth_mb: PositiveFloat = 200.0  # sustained RSS growth that starts tracemalloc
    memory_trace_s: PositiveFloat = 60.0  # how long tracemalloc stays on
    task_growth_limit: PositiveInt = 10_000
    fd_growth_limit: PositiveInt = 500
    thread_growth_limit: PositiveInt = 100
    stuck_margin_s: NonNegFloat = 10.0  # past an analyzer's timeout_s: abandon the attempt


class SimulateConfig(Base, frozen=True):
    """How the built-in simulated API behaves (kind = "simulated"): which dialect it
    speaks, and the limits and faults dialled in."""

    dialect: Literal["openai", "anthropic"] = "openai"
    latency_ms: NonNegFloat = 200.0
    latency_sigma: NonNegFloat = 0.5
    requests_per_minute: NonNegInt = 0
    tokens_per_minute: NonNegInt = 0  # openai: prompt + max_tokens, as OpenAI counts
    input_tokens_per_minute: NonNegInt = 0  # anthropic: its ITPM
    output_tokens_per_minute: NonNegInt = 0  # anthropic: its OTPM, charged from the answer
    # Limits are enforced in slices of this length, as real APIs do (60 a minute is
    # one a second); 60 gives the whole minute's burst at once.
    slice_s: SliceSeconds = 1.0
    error_rate: Rate = 0.0
    hang_rate: Rate = 0.0
    # An overloaded API (anthropic: 529 overloaded_error; openai: 503), nobody's limit.
    overload_rate: Rate = 0.0
    seed: int | None = None


class PriceConfig(Base, frozen=True):
    """USD per million tokens, so usage can carry a cost. Cached input (OpenAI's
    cached_tokens, Anthropic's cache reads) and Anthropic's cache writes have prices of
    their own; unset, they cost what other input costs."""

    prompt_per_mtok: NonNegFloat = 0.0
    completion_per_mtok: NonNegFloat = 0.0
    cached_prompt_per_mtok: NonNegFloat | None = None
    cache_write_per_mtok: NonNegFloat | None = None


class BudgetConfig(Base, frozen=True):
    """Spend limits in USD over UTC calendar windows (README "Budgets and usage"): a
    call whose worst-case cost would pass one is not made."""

    daily_usd: PositiveFloat | None = None
    monthly_usd: PositiveFloat | None = None


Dialect = Literal["auto", "openai", "azure", "groq"]


class ProviderConfig(Base, frozen=True):
    kind: Literal["openai", "anthropic", "simulated"]
    base_url: str = ""
    api_key_env: str = ""
    # kind = "openai": Azure OpenAI and Groq deviate where others do not (README
    # "Providers"); "auto" tells them from the base URL's host.
    dialect: Dialect = "auto"
    # Azure OpenAI's `api-version` query; Anthropic's `anthropic-version` header.
    api_version: str = ""
    max_concurrency: PositiveInt = 16
    requests_per_minute: NonNegInt = 0
    tokens_per_minute: NonNegInt = 0  # input + max_tokens per request, as OpenAI counts
    input_tokens_per_minute: NonNegInt = 0  # Anthropic's ITPM
    output_tokens_per_minute: NonNegInt = 0  # Anthropic's OTPM
    timeout_s: PositiveFloat = 60.0
    max_connections: PositiveInt = 100
    # Throttling (README "Throttling"): budget refill held back against network jitter;
    # whether the server's x-ratelimit-*/anthropic-ratelimit-* headers correct the budgets.
    budget_margin_ms: Annotated[float, Meta(ge=0, le=10_000)] = 100.0
    # A budget holds at most this much of its per-minute limit (the server's slice).
    budget_slice_s: SliceSeconds = 1.0
    sync_rate_limit_headers: bool = True
    # Circuit breaker: open after this many failures in a row (0 = off), for this long.
    breaker_failures: NonNegInt = 5
    breaker_open_s: PositiveFloat = 30.0
    # AIMD: halve the concurrency on a 429/timeout, +1 per this many successes.
    adaptive_concurrency: bool = False
    adaptive_successes_per_step: PositiveInt = 20
    prices: PriceConfig | None = None
    budget: BudgetConfig | None = None
    simulate: SimulateConfig = SimulateConfig()


class AnalyzerConfig(Base, frozen=True):
    provider: str = ""
    model: str = ""
    system: str = ""
    prompt: str = ""
    max_tokens: PositiveInt = 512
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.0
    output: Literal["text", "json"] = "text"
    required_keys: list[str] = []
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 5
    # 429s do not spend attempts (the request was not processed); at this many for one
    # job it fails all the same, so a job cannot wait on a rate limit forever.
    max_rate_limited: Annotated[int, Meta(ge=1, le=100_000)] = 100
    timeout_s: PositiveFloat = 120.0
    handler: str = ""
    # Anthropic: mark the system prompt as a cacheable prefix (cache_control).
    cache_system: bool = False
    budget: BudgetConfig | None = None  # its calls' spend, handler calls included


class SpoolConfig(Base, frozen=True):
    dir: str
    analyzer: str
    glob: str = "*.txt"
    field: str = "text"  # the input field the file's text goes into (plus "filename")
    poll_s: PositiveFloat = 1.0
    # A file is taken once unchanged (size, mtime) for this long, or last written
    # this long ago (written elsewhere and renamed in); 0 takes it at first sight.
    settle_s: NonNegFloat = 1.0
    max_file_bytes: PositiveInt = 524_288
    max_in_flight: PositiveInt = 1000


class IntakeConfig(Base, frozen=True):
    spool: SpoolConfig | None = None


class StoreConfig(Base, frozen=True):
    """Where jobs wait: SQLite in state_dir (url empty, the default) or a PostgreSQL
    database several daemons share (README "Cluster")."""

    url: str = ""  # postgresql://user@host:port/db; libpq's PG* variables also apply
    password_env: str = ""  # the variable holding the password (never the file)
    node_name: str = ""  # unique per daemon; default: the host name
    lease_s: Annotated[float, Meta(ge=3, le=3600)] = 30.0  # silent this long: dead
    poll_only: bool = False  # no LISTEN/NOTIFY (PgBouncer in transaction mode)

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()


EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


class WebhookConfig(Base, frozen=True):
    """Job ends POSTed to `url`, signed with the key in $`secret_env` (README
    "Webhooks"); `analyzers` [] means all. A failed delivery is retried with backoff
    and jitter (`backoff_base_s` doubling up to `backoff_max_s`) up to `max_attempts`,
    then dead-lettered until `vigil webhooks retry NAME`."""

    url: str
    secret_env: EnvName
    events: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["job.succeeded", "job.failed", "job.canceled"]
    )
    analyzers: list[str] = []
    timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 20
    max_concurrency: Annotated[int, Meta(ge=1, le=256)] = 8
    backoff_base_s: Annotated[float, Meta(ge=0.01, le=3600)] = 2.0
    backoff_max_s: Annotated[float, Meta(ge=0.01, le=86_400)] = 3600.0


class Config(Base, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    store: StoreConfig = StoreConfig()
    http: HttpConfig = HttpConfig()
    queue: QueueConfig = QueueConfig()
    retention: RetentionConfig = RetentionConfig()
    log: LogConfig = LogConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    providers: dict[Name, ProviderConfig] = {}
    analyzers: dict[Name, AnalyzerConfig] = {}
    intake: IntakeConfig = IntakeConfig()
    webhooks: dict[Name, WebhookConfig] = {}

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "vigil.db"

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket)


HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def template_fields(template: str) -> list[str]:
    """The `{field}` names a prompt template needs, in order, without repeats.

    Only plain names: a format spec or `{a.b}` would reach into the input's values,
    which come from clients."""
    names: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            written = (
                field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            )
            raise ValueError(f"placeholder {{{written}}} must be a plain {{name}}")
        if field not in names:
            names.append(field)
    return names


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 in brackets); raises ValueError naming the problem."""
    match = _LISTEN_RE.match(listen)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return match.group(1).strip("[]"), int(match.group(2))


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """Fill defaults from the environment ($STATE_DIRECTORY, $RUNTIME_DIRECTORY)."""
    state_dir = config.daemon.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    state = Path(state_dir) if state_dir else Path("vigil-data")
    if not state.is_absolute():
        state = (base_dir / state) if config.daemon.state_dir else Path.cwd() / state
    socket = config.daemon.socket
    if not socket:
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        socket = str(Path(runtime) / "vigil.sock") if runtime else str(state / "vigil.sock")
    elif not Path(socket).is_absolute():
        socket = str(base_dir / socket)
    daemon = msgspec.structs.replace(config.daemon, state_dir=str(state), socket=socket)
    spool = config.intake.spool
    if spool is not None and not Path(spool.dir).is_absolute():
        spool = msgspec.structs.replace(spool, dir=str(base_dir / spool.dir))
        intake = msgspec.structs.replace(config.intake, spool=spool)
        config = msgspec.structs.replace(config, intake=intake)
    return msgspec.structs.replace(config, daemon=daemon)


def parse_config(text: str | bytes, *, base_dir: Path | None = None) -> Config:
    """Decode and validate TOML text; relative paths resolve against `base_dir`."""
    try:
        raw = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(raw, exc, Config)) from None
    from daemon.config_rules import config_problems  # the rules import this module's types

    problems = config_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    return _resolve_paths(config, base_dir or Path.cwd())


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and parse a config file; None means an empty config (all defaults)."""
    if path is None:
        return parse_config(b"")
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    try:
        return parse_config(data, base_dir=file.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def redacted(config: Config) -> dict[str, Any]:
    """The config as plain data for the start log line and the reload summary; it
    holds no secrets by design (keys live in the environment: only the variable names
    show), and a webhook URL's query, which may carry a token, shows as `?[redacted]`."""
    from daemon.webhooks.urls import display_url

    data: dict[str, Any] = msgspec.to_builtins(config)
    for hook in data.get("webhooks", {}).values():
        hook["url"] = display_url(hook["url"])
    return data

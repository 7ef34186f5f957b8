"""The daemon as a real subprocess, the configs it runs with, and the CLI run the way a
user runs it."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

START_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0


def daemon_config(
    sections: str,
    *,
    max_concurrency: int = 32,
    max_backlog: int = 1_000_000,
    grace_s: float = 10.0,
    http_listen: str = "",
    backoff_base_s: float = 0.05,
    backoff_max_s: float = 0.5,
    daemon_extra: str = "",
    extra: str = "",
) -> str:
    """A whole daemon config around provider and analyzer sections."""
    return f"""
[daemon]
shutdown_grace_s = {grace_s}
{daemon_extra}

[http]
listen = "{http_listen}"

[queue]
max_concurrency = {max_concurrency}
max_backlog = {max_backlog}
backoff_base_s = {backoff_base_s}
backoff_max_s = {backoff_max_s}

[log]
format = "json"
{sections}
{extra}
"""


def sim_config(
    *,
    error_rate: float = 0.0,
    latency_ms: float = 5.0,
    hang_rate: float = 0.0,
    api_rpm: int = 0,
    max_attempts: int = 5,
    timeout_s: float = 10.0,
    max_concurrency: int = 32,
    grace_s: float = 10.0,
    max_backlog: int = 1_000_000,
    http_listen: str = "",
    extra: str = "",
) -> str:
    """A daemon config against the built-in simulated API, with two analyzers:
    `summarize` (text) and `classify` (JSON)."""
    sections = f"""
[providers.sim]
kind = "simulated"
max_concurrency = 16
timeout_s = {timeout_s}

[providers.sim.simulate]
latency_ms = {latency_ms}
latency_sigma = 0.2
error_rate = {error_rate}
hang_rate = {hang_rate}
requests_per_minute = {api_rpm}
seed = 1

[analyzers.summarize]
provider = "sim"
model = "sim-small"
system = "You summarize."
prompt = "Summarize:\\n\\n{{text}}"
max_tokens = 50
max_attempts = {max_attempts}
timeout_s = {timeout_s}

[analyzers.classify]
provider = "sim"
model = "sim-small"
prompt = "Classify {{text}} for {{audience}}"
max_tokens = 100
output = "json"
required_keys = ["sentiment"]
max_attempts = {max_attempts}
"""
    return daemon_config(
        sections,
        max_concurrency=max_concurrency,
        max_backlog=max_backlog,
        grace_s=grace_s,
        http_listen=http_listen,
        extra=extra,
    )


def with_socket_group(group: str) -> str:
    """`sim_config()` whose control socket belongs to `group` (daemon.socket_group)."""
    return sim_config().replace("[daemon]\n", f'[daemon]\nsocket_group = "{group}"\n')


def run_cli(
    *args: str,
    socket_path: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon ARGS` as a user would; never hangs past CLI_TIMEOUT_S."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("VIGIL_CONFIG", None)
    if socket_path is not None:
        full_env["VIGIL_SOCKET"] = str(socket_path)
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=CLI_TIMEOUT_S,
    )


@dataclass
class DaemonProcess:
    state_dir: Path
    config_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    python: str = sys.executable
    uid: int | None = None  # run as this user (gid = uid, no supplementary groups)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "vigil.sock"

    @classmethod
    def start(
        cls,
        state_dir: Path,
        config: str,
        *,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        uid: int | None = None,
        ready: bool = True,
    ) -> DaemonProcess:
        """Write the config and start the daemon; with `ready`, wait until it answers."""
        state_dir.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(state_dir, uid, uid)
        config_path = state_dir / "vigil.toml"
        config_path.write_text(config)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "RUNTIME_"))}
        full_env.update(env or {})
        full_env["STATE_DIRECTORY"] = str(state_dir)
        log_path = state_dir / "daemon.log"
        daemon = cls(state_dir, config_path, None, log_path, full_env, python, uid)  # type: ignore[arg-type]
        daemon.restart() if ready else daemon.spawn()
        return daemon

    def spawn(self) -> None:
        """Start the process on the same state directory; returns at once."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "daemon", "run", "--config", str(self.config_path)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self.uid,
                group=self.uid,
                extra_groups=None if self.uid is None else [],
            )

    def restart(self) -> None:
        """Start (again) on the same state directory and wait until it answers."""
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.call("ping")
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()  # not left behind: the caller never got hold of it
        self.proc.wait(10)
        raise TimeoutError(f"daemon not ready in {START_TIMEOUT_S} s:\n{self.log()}")

    def http_url(self) -> str:
        """The HTTP API's base URL as the daemon publishes it in `status` (so port 0
        works); waits for it, as the control socket answers before HTTP is bound."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while "http" not in (status := self.call("status")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no http section in status:\n{self.log()}")
            time.sleep(0.02)
        url: str = status["http"]["url"]
        return url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed (non-JSON lines skipped)."""
        out = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                value = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out

    def send_raw(self, data: bytes, *, timeout_s: float = 10.0) -> bytes:
        """Send raw bytes on the control socket and read the first reply line."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.socket_path))
            sock.sendall(data)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        line = msgspec.json.encode({"id": 1, "cmd": cmd, "args": args}) + b"\n"
        reply: dict[str, Any] = msgspec.json.decode(self.send_raw(line))
        return reply

    def call(self, cmd: str, **args: Any) -> Any:
        reply = self.request(cmd, **args)
        if not reply["ok"]:
            raise AssertionError(f"{cmd} failed: {reply['error']}")
        return reply["data"]

    async def acall(self, cmd: str, **args: Any) -> Any:
        """`call` from async code: on a worker thread, off the event loop."""
        return await anyio.to_thread.run_sync(functools.partial(self.call, cmd, **args))

    async def wait_for_status(self, check: Callable[[Any], bool], timeout_s: float = 30.0) -> Any:
        """Poll the socket's status until `check` holds (bounded); returns that status."""
        with anyio.fail_after(timeout_s):
            while True:
                status = await self.acall("status")
                if check(status):
                    return status
                await anyio.sleep(0.05)

    def wait_all_terminal(self, timeout_s: float = 120.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            jobs: dict[str, int] = self.call("status")["jobs"]
            if jobs["queued"] == 0 and jobs["running"] == 0:
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished in {timeout_s} s: {jobs}")
            time.sleep(0.1)

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """Poll `predicate` (bounded); fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        time.sleep(0.05)


def db_rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows straight from the daemon's database (a second connection; WAL lets it read)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        return db.execute(sql, params).fetchall()

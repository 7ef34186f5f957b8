"""`vigil demo`: the daemon against the built-in simulated API, fed the sample
documents shipped with the package, with a live progress line, the status page on a
free port, and a summary. Its temporary state directory goes at the end (`--keep`
leaves the daemon running in it).

The daemon runs as a real subprocess and the demo talks to it over the control
socket like any other client, so what it shows is what a user gets."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import anyio

from daemon.cli import render
from daemon.cli.client_commands import TERMINAL, poll_counts
from daemon.config import ConfigError, load_config
from daemon.control.client import ControlClient, DaemonUnavailable

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 40.0
HTTP_TIMEOUT_S = 10.0
ROUNDS = 3  # enough requests to run past the simulated API's per-minute budget


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the daemon on sample documents against a simulated API"
    )
    parser.add_argument("--dir", help="state directory (default: a new temporary one)")
    parser.add_argument(
        "--keep", action="store_true", help="leave the daemon running to explore afterwards"
    )
    parser.set_defaults(func=run_demo)


def demo_config() -> Path:
    return Path(str(resources.files("daemon.data") / "demo.toml"))


def samples() -> list[tuple[str, str]]:
    folder = resources.files("daemon.data") / "samples"
    return sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".txt")
    )


def run_demo(args: argparse.Namespace) -> int:
    temporary = not args.dir  # ours to remove; a --dir is the user's and stays
    state_dir = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="vigil-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "VIGIL_SOCKET")}
    env["STATE_DIRECTORY"] = str(state_dir)
    config_file = demo_config()
    os.environ["STATE_DIRECTORY"] = str(state_dir)
    try:
        config = load_config(config_file)  # fails here, with exit 78, if the file is broken
    except ConfigError:
        if temporary:
            state_dir.rmdir()
        raise
    log_path = state_dir / "vigil.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    where = " (temporary: removed at the end unless --keep)" if temporary else ""
    print(f"vigil demo: state in {state_dir}{where}", file=sys.stderr)
    with log_path.open("ab") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config_file)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    from daemon.cli.main import run_async

    demo = Demo(config.socket_path, daemon, log_path, http=bool(config.http.listen))
    try:
        code = run_async(lambda: demo.drive(files_stay=args.keep or not temporary))
    except BaseException as exc:
        daemon.kill()
        daemon.wait()
        if isinstance(exc, KeyboardInterrupt) and temporary and not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)  # interrupted: nothing to look at
        else:
            _files_stay(state_dir, log_path)  # a failure: its log says why
        raise
    if args.keep and code == 0:
        _keep_hint(demo, state_dir, temporary)
        return 0
    code = _stop(daemon) or code
    if code != 0:
        _files_stay(state_dir, log_path)
    elif temporary:
        shutil.rmtree(state_dir, ignore_errors=True)
        print(
            "\nThe daemon has stopped and its temporary directory is removed.\n"
            "`vigil demo --keep` leaves it running to explore."
        )
    else:
        print(f"\nThe daemon has stopped; its database and log stay in {state_dir}.")
    return code


def _files_stay(state_dir: Path, log_path: Path) -> None:
    """After a failure the directory is kept, whatever it is, for its log."""
    print(f"vigil demo: its files stay in {state_dir} (log: {log_path})", file=sys.stderr)


def _keep_hint(demo: Demo, state_dir: Path, temporary: bool) -> None:
    """What --keep left behind: the running daemon, how to reach it, how to stop it."""
    pid = demo.daemon.pid
    page = f"  status page: {demo.url}\n" if demo.url else ""
    cleanup = f" && rm -r {shlex.quote(str(state_dir))}" if temporary else ""
    print(
        f"\nThe daemon keeps running (pid {pid}), its files in {state_dir}.\n{page}"
        f"Try:\n  export VIGIL_SOCKET={demo.socket}\n"
        f"  vigil status\n  vigil top\n  vigil jobs --state failed\n  vigil show <ID>\n"
        f"Stop it with: kill {pid}{cleanup}"
    )


def _stop(daemon: subprocess.Popen[bytes]) -> int:
    daemon.send_signal(signal.SIGTERM)
    try:
        rc = daemon.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        print("vigil demo: the daemon did not stop in time; killed", file=sys.stderr)
        return 1
    if rc != 0:
        print(f"vigil demo: the daemon exited with {rc}", file=sys.stderr)
    return rc


async def wait_ready(path: Path, daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    """Ready means the socket answers: the daemon creates it only once the store is up."""
    with anyio.fail_after(START_TIMEOUT_S):
        while True:
            if daemon.poll() is not None:
                raise DaemonUnavailable(
                    f"the daemon exited with {daemon.returncode} before it was ready; "
                    f"see {log_path}"
                )
            try:
                async with ControlClient(path) as client:
                    await client.call("ping")
                    return
            except DaemonUnavailable:
                await anyio.sleep(0.1)


class Demo:
    """The running demo: the daemon, its socket, and its status page once bound."""

    def __init__(
        self, socket: Path, daemon: subprocess.Popen[bytes], log_path: Path, *, http: bool
    ) -> None:
        self.socket, self.daemon, self.log_path, self.http = socket, daemon, log_path, http
        self.url: str | None = None

    async def status_page(self, client: ControlClient) -> str | None:
        """The HTTP address the daemon bound (port 0: a free one), from `status`; HTTP
        comes up just after the socket, so wait for it a little."""
        with anyio.move_on_after(HTTP_TIMEOUT_S):
            while self.http:
                url = ((await client.call("status")).get("http") or {}).get("url")
                if url:
                    return f"{url}/"
                await anyio.sleep(0.05)
        return None

    async def drive(self, *, files_stay: bool) -> int:
        await wait_ready(self.socket, self.daemon, self.log_path)
        docs = await anyio.to_thread.run_sync(samples)
        analyzers = ("summarize", "classify", "keywords")
        jobs = [
            {"analyzer": a, "input": {"text": text, "filename": name, "round": r}}
            for r in range(ROUNDS)
            for a in analyzers
            for name, text in docs
        ]
        started = time.monotonic()
        async with ControlClient(self.socket) as client:
            self.url = await self.status_page(client)
            if self.url:
                print(f"status page: {self.url}", file=sys.stderr)
            submitted = await client.call("submit", jobs=jobs)
            ids: list[str] = submitted["ids"]
            print(
                f"submitted {len(ids)} jobs ({len(docs)} documents x {len(analyzers)} "
                f"analyzers x {ROUNDS} rounds)",
                file=sys.stderr,
            )
            line = render.ProgressLine()
            try:
                async for counts in poll_counts(client, ids, interval_s=0.25):
                    status = await client.call("status")
                    elapsed = time.monotonic() - started
                    line.update(_progress(counts, status, len(ids), elapsed))
            finally:
                line.close()
            status = await client.call("status")
        wall_s = time.monotonic() - started
        _summary(counts, status, len(ids), wall_s)
        if files_stay:
            print(
                f"\ndatabase: {status['store']['path']}\nsocket:   {self.socket}\n"
                f"log:      {self.log_path}"
            )
        return 0


def _progress(counts: dict[str, int], status: dict[str, Any], total: int, elapsed: float) -> str:
    done = sum(counts.get(s, 0) for s in TERMINAL)
    providers = status["providers"].values()
    limited = sum(p.get("rate_limited", 0) for p in providers)
    overloaded = sum(p.get("overloaded", 0) for p in providers)
    rate = done / elapsed if elapsed > 0 else 0.0
    return (
        f"{render.bar(done, total, 24)} {done}/{total}  failed {counts.get('failed', 0)}  "
        f"retries {status['attempts'].get('retried', 0)}  429s {limited}  "
        f"529s {overloaded}  {rate:.1f} jobs/s"
    )


def _summary(counts: dict[str, int], status: dict[str, Any], total: int, wall_s: float) -> None:
    print()
    render.table(
        ["jobs", *TERMINAL, "wall time"],
        [[total, *(counts.get(s, 0) for s in TERMINAL), f"{wall_s:.1f} s"]],
    )
    print()
    render.table(
        ["provider", "dialect", "requests", "by status", "429s", "avg ms", "tokens in/out"],
        [
            [
                name,
                p["dialect"],
                p["requests"],
                " ".join(f"{k}:{v}" for k, v in sorted(p["by_status"].items())),
                p["rate_limited"],
                p["avg_latency_ms"],
                f"{p['tokens_in']}/{p['tokens_out']}",
            ]
            for name, p in status["providers"].items()
        ],
    )

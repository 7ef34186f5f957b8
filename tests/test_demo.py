"""`vigil demo` as a user runs it (status page on a free port, its temporary directory
removed unless --keep, a hint that fits), and the progress line it and `submit --wait`
share: live on a terminal, a line every few seconds elsewhere."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.cli.render import ProgressLine

DEMO_TIMEOUT_S = 90  # the demo promises about a minute


class Terminal(io.StringIO):
    """A StringIO that says it is a TTY."""

    def isatty(self) -> bool:
        """A terminal, as far as ProgressLine can tell."""
        return True


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The time now."""
        return self.now


def test_progress_off_a_terminal_prints_every_few_seconds_and_the_last() -> None:
    """Into a pipe or a file: the first line, then at most one every `every_s`, and the
    final one on close, not a line a tick."""
    out, clock = io.StringIO(), Clock()
    line = ProgressLine(out, every_s=5.0, clock=clock)
    for tick in range(41):  # 10 s of updates every 0.25 s
        clock.now = 100.0 + tick * 0.25
        line.update(f"{tick}/40")
    line.close()
    assert out.getvalue().splitlines() == ["0/40", "20/40", "40/40"]


def test_progress_off_a_terminal_does_not_repeat_the_last_line() -> None:
    """A last update that was printed is not printed again by close()."""
    out, clock = io.StringIO(), Clock()
    line = ProgressLine(out, every_s=5.0, clock=clock)
    line.update("1/2")
    clock.now += 1
    line.update("2/2")
    clock.now += 5
    line.update("2/2 done")
    line.close()
    assert out.getvalue().splitlines() == ["1/2", "2/2 done"]


def test_progress_on_a_terminal_stays_one_live_line() -> None:
    """On a TTY every update rewrites the line in place; close ends it with a newline."""
    out = Terminal()
    line = ProgressLine(out, every_s=5.0, clock=Clock())
    for tick in range(3):
        line.update(f"{tick}/2")
    line.close()
    assert out.getvalue() == "\r\x1b[2K0/2\r\x1b[2K1/2\r\x1b[2K2/2\n"


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `vigil demo ARGS` with its temporary directory under `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "RUNTIME_"))}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "daemon", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEMO_TIMEOUT_S,
    )


def test_demo_shows_its_status_page_and_cleans_up(tmp_path: Path) -> None:
    """The demo exits 0 within about a minute, prints its status page's URL (a free
    port), a progress line every few seconds into a pipe, a summary, and removes its
    temporary directory, saying so."""
    started = time.monotonic()
    result = _demo(tmp_path)
    wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert re.search(r"^status page: http://127\.0\.0\.1:\d+/$", result.stderr, re.MULTILINE)
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert 2 <= len(progress) <= wall_s / 5 + 3, progress
    assert "/144" in progress[-1] and progress[-1].startswith("[" + "#" * 24 + "]")
    assert "SUCCEEDED" in result.stdout
    assert "temporary directory is removed" in result.stdout
    assert "kill" not in result.stdout and "database:" not in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the normal suite keeps its twin (see README "Tests")
def test_demo_keep_leaves_the_daemon_running_and_says_how_to_stop_it(tmp_path: Path) -> None:
    """With --keep the daemon runs on in its directory; the hint names its pid, socket,
    status page and the command that stops it and removes the directory."""
    result = _demo(tmp_path, "--keep")
    assert result.returncode == 0, result.stderr
    pid = int(re.findall(r"The daemon keeps running \(pid (\d+)\)", result.stdout)[0])
    try:
        (state_dir,) = tmp_path.iterdir()
        assert f"export VIGIL_SOCKET={state_dir / 'vigil.sock'}" in result.stdout
        assert re.search(r"status page: http://127\.0\.0\.1:\d+/", result.stdout)
        assert f"Stop it with: kill {pid} && rm -r {state_dir}" in result.stdout
        assert (state_dir / "vigil.sock").exists()
        assert _alive(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether the process still runs (the demo's daemon is not our child: once it
    exits, it may stay a zombie until whoever adopted it reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

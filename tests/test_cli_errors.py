"""The CLI's user-facing errors: a clear message and the right exit code, never a
traceback. Each runs `python -m daemon` in a subprocess, as a user runs `vigil`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.cli.client_commands import SUBMIT_BATCH
from tests.daemon_proc import (
    CLI_TIMEOUT_S,
    START_TIMEOUT_S,
    DaemonProcess,
    run_cli,
    sim_config,
    wait_until,
)
from tests.spool_files import spool_toml

StartDaemon = Callable[..., DaemonProcess]
EX_USAGE, EX_CONFIG = 2, 78


def _usage_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    """Exit 2, `text` in the message, and no traceback."""
    assert result.returncode == EX_USAGE, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_jsonl_that_cannot_be_read_is_a_usage_error(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """--jsonl naming a missing file, a directory or non-UTF-8 text exits 2 with
    `vigil: cannot read FILE: reason`, as a file argument does."""
    daemon = start_daemon(sim_config())
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "caf\xe9"}\n')
    cases = {
        tmp_path / "missing.jsonl": "No such file or directory",
        tmp_path: "Is a directory",
        latin1: "not UTF-8 text",
    }
    for path, reason in cases.items():
        for how in (("--jsonl", str(path)), (str(path),)):
            result = run_cli("submit", "-a", "summarize", *how, socket_path=daemon.socket_path)
            _usage_error(result, f"vigil: cannot read {path}: {reason}")


def test_bad_jsonl_line_after_a_committed_batch_says_how_many_were_accepted(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A bad line after a batch went in names the jobs already accepted, so the user
    does not resubmit them."""
    daemon = start_daemon(sim_config())
    path = tmp_path / "jobs.jsonl"
    good = "".join(f'{{"text": "doc {i}"}}\n' for i in range(SUBMIT_BATCH + 100))
    path.write_text(good + "{bad\n")
    result = run_cli(
        "submit", "-a", "summarize", "--jsonl", str(path), socket_path=daemon.socket_path
    )
    _usage_error(result, f"{path}:{SUBMIT_BATCH + 101}: not valid JSON")
    assert f"vigil: {SUBMIT_BATCH} jobs were accepted before this error" in result.stderr
    assert sum(daemon.call("status")["jobs"].values()) == SUBMIT_BATCH


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jsonl", "-", "--priority", "5"], "apply only with -a ANALYZER"),
        (["--jsonl", "-", "--idempotency-key", "k"], "apply only with -a ANALYZER"),
        (["-a", "summarize", "--input", "{}", "F1", "--idempotency-key", "k"], "a single job"),
        (["-a", "summarize", "F1", "F2", "--idempotency-key", "k"], "a single job"),
        (["-a", "summarize", "--jsonl", "-", "--idempotency-key", "k"], "a single job"),
    ],
)
def test_submit_job_flags_that_would_be_ignored_are_usage_errors(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """--priority and --idempotency-key without -a, or one key for several jobs (all but
    the first silently dropped), are refused before any daemon is asked."""
    for name in ("F1", "F2"):
        (tmp_path / name).write_text("some text")
    paths = [str(tmp_path / a) if a in ("F1", "F2") else a for a in args]
    result = run_cli("submit", *paths, input="", socket_path=tmp_path / "no-daemon.sock")
    _usage_error(result, message)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["jobs", "--limit", "0"], "--limit"),
        (["logs", "-n", "-1"], "-n"),
        (["purge", "--older-than", "-5"], "--older-than"),
        (["debug", "tasks", "--limit", "0"], "--limit"),
        (["debug", "memory", "--seconds", "0"], "--seconds"),
        (["bench", "throttle", "--scenario", "smoke", "--jobs", "0"], "--jobs"),
        (["bench", "throttle", "--scenario", "smoke", "--jobs", "-5"], "--jobs"),
        (["bench", "overhead", "--smoke", "--jobs", "0"], "--jobs"),
        (["simulate-api", "--error-rate", "5"], "--error-rate"),
        (["simulate-api", "--rpm", "-1"], "--rpm"),
        (["simulate-api", "--latency-ms", "-3"], "--latency-ms"),
        (["simulate-api", "--port", "99999"], "--port"),
    ],
)
def test_out_of_range_flags_are_usage_errors(args: list[str], flag: str, tmp_path: Path) -> None:
    """A flag out of its range is refused by the client, naming the flag: never sent,
    silently ignored, or wrapped around (a port past 65535)."""
    result = run_cli(*args, socket_path=tmp_path / "no-daemon.sock")
    _usage_error(result, f"argument {flag}: Expected")


def test_simulate_api_bind_failure_is_one_line() -> None:
    """A port already in use: one line naming the address and why, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("simulate-api", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"vigil: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    ("module", "source", "reason"),
    [
        ("vigil_test_absent", None, "ModuleNotFoundError: No module named 'vigil_test_absent'"),
        ("vigil_test_syntax", "def handle(:\n", "SyntaxError: "),
        ("vigil_test_raises", "raise RuntimeError('boom')\n", "RuntimeError: boom"),
        ("vigil_test_no_attr", "other = 1\n", "AttributeError: "),
    ],
)
def test_handler_that_cannot_be_loaded_is_a_config_error(
    module: str, source: str | None, reason: str, tmp_path: Path
) -> None:
    """`vigil run` and `vigil check-config` exit 78 (EX_CONFIG: systemd does not restart
    it) naming the analyzer's handler key, whatever the import raises; no traceback."""
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    config = tmp_path / "vigil.toml"
    config.write_text(sim_config(extra=f'[analyzers.custom]\nhandler = "{module}:handle"\n'))
    env = {"PYTHONPATH": str(tmp_path), "STATE_DIRECTORY": str(tmp_path / "state")}
    expected = f"vigil: invalid config: $.analyzers.custom.handler: cannot load '{module}:handle': "
    for args in (("run", "--config", str(config)), ("check-config", str(config))):
        result = run_cli(*args, env=env)
        assert result.returncode == EX_CONFIG, result.stderr
        assert result.stderr.startswith(expected), result.stderr
        assert reason in result.stderr
        assert "Traceback" not in result.stderr


def test_output_into_a_closed_pipe_ends_quietly(start_daemon: StartDaemon) -> None:
    """`vigil debug stacks | head -3`: a reader that has gone ends the command without a
    BrokenPipeError traceback (exit 1, as Python's docs advise)."""
    daemon = start_daemon(sim_config())
    env = {**os.environ, "VIGIL_SOCKET": str(daemon.socket_path)}
    for args in (("debug", "stacks"), ("jobs", "--limit", "100")):
        read_end, write_end = os.pipe()
        os.close(read_end)
        with os.fdopen(write_end, "wb") as gone:
            result = subprocess.run(
                [sys.executable, "-m", "daemon", *args],
                stdout=gone,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=CLI_TIMEOUT_S,
            )
        assert (result.returncode, result.stderr) == (1, ""), args


def test_daemon_field_errors_are_printed_once(start_daemon: StartDaemon) -> None:
    """A refused submit names each field error once, not in a summary and again below;
    a JSONL job by its 1-based line (`<stdin>:2`), not its 0-based index."""
    daemon = start_daemon(sim_config())
    one = run_cli(
        "submit", "-a", "classify", "--input", '{"text": "a"}', socket_path=daemon.socket_path
    )
    assert one.returncode == 1
    assert one.stderr.count("input.audience") == 1, one.stderr
    several = run_cli(
        "submit", "-a", "classify", "--jsonl", "-", input='{"text": "a"}\n[1]\n',
        socket_path=daemon.socket_path,
    )  # fmt: skip
    assert several.returncode == 1
    assert several.stderr.count("<stdin>:1: input.audience") == 1, several.stderr
    assert several.stderr.count("<stdin>:2: input") == 1, several.stderr
    assert "job 0" not in several.stderr and "job 1" not in several.stderr


def test_status_sections_show_no_python_reprs(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Human `vigil status` shows "-" for nothing and yes/no for flags, not None/True/False."""
    config = sim_config(http_listen="127.0.0.1:0", extra=spool_toml(tmp_path / "inbox"))
    daemon = start_daemon(config)
    daemon.http_url()  # the http section is there once HTTP is bound
    result = run_cli("status", socket_path=daemon.socket_path)
    assert result.returncode == 0, result.stderr
    assert "held -" in result.stdout
    assert "auth no" in result.stdout
    for repr_ in ("None", "True", "False"):
        assert repr_ not in result.stdout


def test_run_without_analyzers_refuses_to_start_unless_allowed(tmp_path: Path) -> None:
    """A config with no analyzers could run no job: `vigil run` exits 78 saying so and
    naming --allow-empty; with --allow-empty it starts (and stops on SIGTERM)."""
    config = tmp_path / "empty.toml"
    config.write_text('[http]\nlisten = ""\n')
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    refused = run_cli("run", "--config", str(config), env=env)
    assert refused.returncode == EX_CONFIG, refused.stderr
    assert refused.stderr == (
        f"vigil: {config} configures no analyzers, so no job could run: refusing to start. "
        "Add an [analyzers.NAME] table, or pass --allow-empty to start anyway\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}, **env}
    state = Path(env["STATE_DIRECTORY"])
    state.mkdir()
    with (state / "daemon.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--allow-empty", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = DaemonProcess(state, config, proc, state / "daemon.log", env)
    try:
        wait_until(lambda: _answers(daemon), START_TIMEOUT_S, "a ping")
        assert daemon.call("status")["jobs"]["queued"] == 0
        assert daemon.terminate() == 0
    finally:
        daemon.kill()


def _answers(daemon: DaemonProcess) -> bool:
    """Whether the daemon answers a ping yet."""
    try:
        daemon.call("ping")
    except OSError:
        return False
    return True

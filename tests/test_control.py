"""The control socket and CLI against bad input: clear errors, and the daemon serves on."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.control.protocol import MAX_LINE_BYTES
from tests.daemon_proc import DaemonProcess, run_cli, sim_config, with_socket_group
from tests.spool_files import spool_toml

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> Iterator[DaemonProcess]:
    """One daemon for a test, paused so submitted jobs stay put."""
    proc = start_daemon(sim_config())
    proc.call("pause")
    yield proc


def _error(reply: dict[str, object]) -> dict[str, object]:
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error, dict)
    return error


def test_unknown_analyzer_is_named(daemon: DaemonProcess) -> None:
    """An unknown analyzer is refused with its name and the known ones."""
    error = _error(daemon.request("submit", jobs={"analyzer": "nope", "input": {}}))
    assert error["code"] == "invalid_job"
    assert "nope" in str(error["message"]) and "summarize" in str(error["message"])


def test_missing_template_field_is_named(daemon: DaemonProcess) -> None:
    """Input missing a field the prompt needs names that field."""
    error = _error(daemon.request("submit", jobs={"analyzer": "classify", "input": {"text": "x"}}))
    assert "input.audience" in str(error["message"])


def test_non_object_input_is_refused(daemon: DaemonProcess) -> None:
    """Input that is not an object is refused, naming `input`."""
    error = _error(daemon.request("submit", jobs={"analyzer": "summarize", "input": [1, 2]}))
    assert "input" in str(error["message"]) and "object" in str(error["message"])


def test_a_bad_job_in_a_list_rejects_the_whole_list(daemon: DaemonProcess) -> None:
    """Nothing is half written: one bad job refuses the batch, by its index."""
    jobs = [{"analyzer": "summarize", "input": {"text": "ok"}}, {"analyzer": "summarize"}]
    error = _error(daemon.request("submit", jobs=jobs))
    assert "job 1" in str(error["message"])
    assert error["details"] == [{"index": 1, "field": "input", "message": "required"}]
    assert daemon.call("status")["jobs"]["queued"] == 0


def test_oversize_input_names_the_limit(daemon: DaemonProcess) -> None:
    """Input larger than queue.max_input_bytes is refused, naming the setting."""
    big = {"analyzer": "summarize", "input": {"text": "x" * 1_100_000}}
    error = _error(daemon.request("submit", jobs=big))
    assert "queue.max_input_bytes" in str(error["message"])


def test_malformed_json_line_gets_an_error_and_the_connection_serves_on(
    daemon: DaemonProcess,
) -> None:
    """Bad JSON gets a bad_request reply; the next request on the same socket works."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket_path))
        sock.sendall(b'{"id": 7, "cmd": \n{"id": 8, "cmd": "ping"}\n')
        reader = sock.makefile("rb")
        first = msgspec.json.decode(reader.readline())
        second = msgspec.json.decode(reader.readline())
    assert first["ok"] is False and first["error"]["code"] == "bad_request"
    assert second == {"id": 8, "ok": True, "data": {"pong": True, "pid": daemon.proc.pid}}


def test_unknown_command_and_bad_args(daemon: DaemonProcess) -> None:
    """Unknown commands and wrongly typed args get named errors."""
    error = _error(daemon.request("frobnicate"))
    assert error["code"] == "unknown_command" and "frobnicate" in str(error["message"])
    error = _error(daemon.request("jobs", limit="many"))
    assert error["code"] == "bad_args" and "limit" in str(error["message"])
    wrong_type = msgspec.json.decode(daemon.send_raw(b'{"id": 1, "cmd": 5}\n'))
    assert wrong_type["ok"] is False and wrong_type["id"] == 1


def test_bad_args_name_the_field(daemon: DaemonProcess) -> None:
    """A refused argument is named in the message and in field details, like a bad job."""
    error = _error(daemon.request("jobs", limit=0))
    assert error["code"] == "bad_args" and "limit" in str(error["message"])
    assert error["details"] == [{"index": None, "field": "limit", "message": "Expected `int` >= 1"}]
    error = _error(daemon.request("show"))
    assert error["details"] == [{"index": None, "field": "id", "message": "required"}]


def test_jobs_pages_with_a_cursor_that_ends(daemon: DaemonProcess) -> None:
    """The socket's `jobs` gives the same `next_before` as HTTP: null on a full last page."""
    ids = daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "x"}}] * 3)["ids"]
    newest = sorted(ids, reverse=True)
    first = daemon.call("jobs", limit=2)
    assert ([j["id"] for j in first["jobs"]], first["next_before"]) == (newest[:2], newest[1])
    last = daemon.call("jobs", limit=1, before=newest[1])
    assert ([j["id"] for j in last["jobs"]], last["next_before"]) == (newest[2:], None)


def test_passing_health_checks_carry_no_reason(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """`vigil status --json`: a passing check's reason is empty, a failing one keeps its own."""
    proc = start_daemon(sim_config(extra=spool_toml(tmp_path / "inbox")))

    def checks() -> dict[str, dict[str, object]]:
        out = run_cli("status", "--json", socket_path=proc.socket_path)
        assert out.returncode == 0, out.stderr
        return {c["name"]: c for c in msgspec.json.decode(out.stdout)["health"]["checks"]}

    healthy = checks()
    assert {"store", "backlog", "provider.sim", "loop", "spool"} <= set(healthy)
    assert [c for c in healthy.values() if c["ok"] and c["reason"]] == []
    proc.call("drain")
    draining = checks()
    assert draining["intake"]["ok"] is False and "draining" in str(draining["intake"]["reason"])
    assert [c for c in draining.values() if c["ok"] and c["reason"]] == []


def test_oversize_line_gets_an_error(daemon: DaemonProcess) -> None:
    """A line over the limit is answered with line_too_long; the daemon serves on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket_path))
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent <= MAX_LINE_BYTES:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = sock.makefile("rb").readline()
    assert msgspec.json.decode(reply)["error"]["code"] == "line_too_long"
    assert daemon.call("ping")["pong"] is True


def test_socket_is_private(daemon: DaemonProcess) -> None:
    """The control socket is mode 0600."""
    mode = stat.S_IMODE(os.stat(daemon.socket_path).st_mode)
    assert mode == 0o600


def test_mutating_commands_are_logged_with_the_peer(daemon: DaemonProcess) -> None:
    """A command that changes something is logged with the peer's uid and pid as the
    kernel reports them; a read-only one is not."""

    def logged() -> list[dict[str, Any]]:
        return [e for e in daemon.events() if e.get("event") == "control.command"]

    before = len(logged())  # the fixture paused the daemon
    daemon.call("status")
    daemon.call("resume")
    daemon.call("pause")
    new = logged()[before:]
    assert [e["cmd"] for e in new] == ["resume", "pause"], new
    assert all(e["peer_uid"] == os.getuid() for e in new), new
    assert all(isinstance(e["peer_pid"], int) and e["peer_pid"] > 0 for e in new), new


def test_cli_without_daemon_exits_69_naming_the_socket(tmp_path: Path) -> None:
    """No daemon: exit 69 (EX_UNAVAILABLE) and the socket path tried."""
    path = tmp_path / "nothing.sock"
    out = run_cli("status", socket_path=path)
    assert out.returncode == 69
    assert str(path) in out.stderr


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    """Usage errors exit 2."""
    assert run_cli("frobnicate").returncode == 2
    out = run_cli("submit", "--input", "{}", socket_path=tmp_path / "x.sock")
    assert out.returncode == 2 and "--analyzer" in out.stderr


def test_cli_reports_field_errors(daemon: DaemonProcess) -> None:
    """The CLI prints the daemon's error and exits 1."""
    out = run_cli(
        "submit", "-a", "classify", "--input", '{"text": "x"}', socket_path=daemon.socket_path
    )
    assert out.returncode == 1
    assert "input.audience" in out.stderr


def test_socket_group_makes_the_socket_group_usable(start_daemon: StartDaemon) -> None:
    """With daemon.socket_group set, the socket is mode 0660 owned by that group."""
    import grp

    daemon = start_daemon(with_socket_group(grp.getgrgid(os.getgid()).gr_name))
    info = os.stat(daemon.socket_path)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == os.getgid()
    assert daemon.call("ping")["pong"] is True


# -- bulk actions, conflicts, listings (issue 17) ---------------------------------------


def _queue(daemon: DaemonProcess, analyzer: str, n: int) -> list[str]:
    """Submit `n` jobs of an analyzer to a paused daemon; their ids."""
    inputs = {"summarize": {"text": "t"}, "classify": {"text": "t", "audience": "a"}}
    ids: list[str] = daemon.call(
        "submit", jobs=[{"analyzer": analyzer, "input": inputs[analyzer]}] * n
    )["ids"]
    return ids


def test_bulk_cancel_over_the_socket_by_filter(daemon: DaemonProcess) -> None:
    """cancel with a filter cancels exactly the matching jobs and says how many, by
    state; a dry run first changes nothing and samples ids."""
    classify = _queue(daemon, "classify", 12)
    _queue(daemon, "summarize", 3)
    dry = daemon.call("cancel", analyzer="classify", dry_run=True)
    assert (dry["matched"], dry["changed"], dry["sample"]) == (12, 0, classify[:10])
    assert daemon.call("status")["jobs"]["queued"] == 15
    done = daemon.call("cancel", analyzer="classify")
    assert (done["matched"], done["changed"]) == (12, 12)
    assert done["by_state"] == {"queued": 12, "running": 0}
    jobs = daemon.call("status")["jobs"]
    assert (jobs["queued"], jobs["canceled"]) == (3, 12)


def test_destructive_bulk_without_a_filter_needs_all(daemon: DaemonProcess) -> None:
    """purge and cancel with no filter are refused, naming what they would touch; with
    all they run. A state the command never touches is a bad argument naming it."""
    _queue(daemon, "summarize", 4)
    error = _error(daemon.request("cancel"))
    assert error["code"] == "filter_required"
    assert "4 job(s)" in str(error["message"]) and "all" in str(error["message"])
    assert daemon.call("status")["jobs"]["queued"] == 4
    daemon.call("cancel", all=True)
    assert _error(daemon.request("purge"))["code"] == "filter_required"
    assert daemon.call("purge", all=True)["by_state"]["canceled"] == 4
    bad = _error(daemon.request("purge", state="queued"))
    assert bad["code"] == "bad_args" and "state" in str(bad["message"])
    assert _error(daemon.request("cancel", id="x", state="queued"))["code"] == "bad_args"
    assert daemon.call("status")["jobs"] == dict.fromkeys(
        ("queued", "running", "succeeded", "failed", "canceled"), 0
    )


def test_idempotency_conflict_over_the_socket(daemon: DaemonProcess) -> None:
    """The same key with a different input is `idempotency_conflict` naming the key and
    the first job; nothing of that submit is written; the same job returns the first."""
    job = {"analyzer": "summarize", "input": {"text": "a"}, "idempotency_key": "k-1"}
    first = daemon.call("submit", jobs=job)["ids"][0]
    assert daemon.call("submit", jobs=job) == {"ids": [first], "created": 0, "existing": 1}
    other = {**job, "input": {"text": "b"}}
    fresh = {"analyzer": "summarize", "input": {"text": "c"}}
    error = _error(daemon.request("submit", jobs=[fresh, other]))
    assert error["code"] == "idempotency_conflict"
    assert error["details"] == {"key": "k-1", "id": first}
    assert "k-1" in str(error["message"]) and first in str(error["message"])
    assert daemon.call("status")["jobs"]["queued"] == 1


def test_cli_bulk_refusal_dry_run_and_old_forms(daemon: DaemonProcess) -> None:
    """`vigil purge` alone exits 2 saying what it would delete and asking for --all;
    --dry-run prints how many and ids; cancel ID and retry --failed still work."""
    sock = daemon.socket_path
    ids = _queue(daemon, "summarize", 3)
    refused = run_cli("cancel", socket_path=sock)
    assert refused.returncode == 2, refused.stderr
    assert "3 job(s)" in refused.stderr and "--all" in refused.stderr
    assert "Traceback" not in refused.stderr
    dry = run_cli("cancel", "--analyzer", "summarize", "--dry-run", socket_path=sock)
    assert dry.returncode == 0, dry.stderr
    assert "would cancel 3 job(s): queued 3" in dry.stdout and ids[0] in dry.stdout
    one = run_cli("cancel", ids[0], socket_path=sock)
    assert one.returncode == 0 and "was queued" in one.stdout
    both = run_cli("cancel", ids[1], "--state", "queued", socket_path=sock)
    assert both.returncode == 2 and "not both" in both.stderr
    done = run_cli("cancel", "--since", "1h", "--state", "queued", socket_path=sock)
    assert done.returncode == 0 and "canceled 2 job(s): queued 2" in done.stdout
    again = run_cli("retry", "--failed", socket_path=sock)
    assert again.returncode == 0 and "requeued 0 job(s)" in again.stdout
    purge = run_cli("purge", "--yes", socket_path=sock)
    assert purge.returncode == 0 and "deleted 3 job(s): canceled 3" in purge.stdout


def test_jobs_names_the_total_and_the_next_page(daemon: DaemonProcess) -> None:
    """`vigil jobs` prints how many of how many matched and the --before ID for the
    next page; the socket's answer carries `total`."""
    ids = _queue(daemon, "summarize", 5)
    assert daemon.call("jobs", limit=2)["total"] == 5
    result = run_cli("jobs", "--limit", "2", socket_path=daemon.socket_path)
    assert result.returncode == 0, result.stderr
    assert "2 job(s) shown of 5 matching" in result.stderr
    assert f"vigil jobs --limit 2 --before {ids[3]}" in result.stderr
    last = run_cli("jobs", "--before", ids[1], socket_path=daemon.socket_path)
    assert "1 job(s) shown of 5 matching" in last.stderr and "more:" not in last.stderr


def test_jsonl_errors_name_the_file_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A refused JSONL job is named by its file and 1-based line, blank lines counted."""
    path = tmp_path / "batch.jsonl"
    path.write_text('{"text": "a", "audience": "b"}\n\n{"text": "a"}\n')
    result = run_cli(
        "submit", "-a", "classify", "--jsonl", str(path), socket_path=daemon.socket_path
    )
    assert result.returncode == 1
    assert f"{path}:3: input.audience: missing" in result.stderr, result.stderr


def test_submit_wait_prints_the_ids_and_shows_results(start_daemon: StartDaemon) -> None:
    """`submit --wait --show` prints each job id, then each result once done."""
    daemon = start_daemon(sim_config())
    result = run_cli(
        "submit", "-a", "summarize", "--input", '{"text": "x"}', "--wait", "--show",
        socket_path=daemon.socket_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    assert daemon.call("show", id=job_id)["job"]["state"] == "succeeded"
    assert f"{job_id} succeeded" in result.stdout
    shown = daemon.call("show", id=job_id)["job"]["result"]
    assert str(shown).splitlines()[0] in result.stdout
    no_wait = run_cli(
        "submit", "-a", "summarize", "--input", "{}", "--show", socket_path=daemon.socket_path
    )
    assert no_wait.returncode == 2 and "--wait" in no_wait.stderr

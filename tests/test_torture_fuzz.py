"""Fuzzing the daemon's surfaces with hypothesis: the control socket (random bytes,
truncated lines, deep nesting, huge numbers, wrong types, unknown commands, floods of
connections) and the HTTP API (bodies, headers, query strings, methods, paths).

Every case gets a well-formed answer (one reply line per request line; an HTTP status
line, never a 500, errors in the shared JSON shape), nothing hangs, nothing gets past
the token, and the same daemon process serves normally afterwards. Examples are
derandomized (the same cases every run) and nothing is saved between runs. The normal
suite runs a few hundred cases per surface; `-m slow` runs over 10,000."""

from __future__ import annotations

import os
import select
import socket
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.control.commands import COMMANDS
from daemon.control.server import MAX_CONNECTIONS
from tests.daemon_proc import DaemonProcess, sim_config
from tests.spool_files import drop, spool_toml
from tests.torture_helpers import (
    RawResponse,
    host_port,
    http_request,
    need_root,
    raw_http,
    reachable,
    start_as,
)

TOKEN = "fuzz-token-5b2e91c4"
AUTH = f"Bearer {TOKEN}"
SHORT_EXAMPLES = 200
LONG_EXAMPLES = 6000
REPLY_TIMEOUT_S = 20.0
CASES: dict[str, int] = {"socket": 0, "http": 0, "long": 0}  # long: long runs begun
LONG_RUNS_MIN_CASES = 10_000


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module (HTTP on, token set); killed at the end."""
    config = sim_config(http_listen="127.0.0.1:0", max_backlog=100_000, latency_ms=1)
    proc = DaemonProcess.start(
        tmp_path_factory.mktemp("fuzz") / "d", config, env={"VIGIL_HTTP_TOKEN": TOKEN}
    )
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def http_addr(daemon: DaemonProcess) -> tuple[str, int]:
    return host_port(daemon.http_url())


def assert_serving(daemon: DaemonProcess, http_addr: tuple[str, int] | None = None) -> None:
    """The same process answers the socket (and HTTP) and still takes a job."""
    assert daemon.proc.poll() is None, daemon.log()
    assert daemon.call("ping")["pid"] == daemon.proc.pid
    ids = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "ok"}})["ids"]
    assert len(ids) == 1
    if http_addr is not None:
        answer = raw_http(*http_addr, http_request("GET", "/healthz"))
        assert answer.status == 200, answer


# -- the control socket -------------------------------------------------------------------


def exchange(daemon: DaemonProcess, payload: bytes) -> list[bytes]:
    """Send, close our side, read every reply line until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT_S)
        sock.connect(str(daemon.socket_path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    assert buf == b"" or buf.endswith(b"\n"), buf[-200:]
    return buf.splitlines()


def expected_replies(payload: bytes) -> int:
    """One reply per complete line that is not blank (a trailing partial line is
    dropped when the client closes)."""
    lines = payload.split(b"\n")[:-1]
    return sum(1 for line in lines if line.strip())


def check_reply(line: bytes) -> dict[str, Any]:
    """A reply is {"id", "ok", "data"} or {"id", "ok": false, "error": {code, message}}."""
    reply = msgspec.json.decode(line)
    assert isinstance(reply, dict) and "id" in reply and isinstance(reply["ok"], bool), reply
    if not reply["ok"]:
        error = reply["error"]
        assert isinstance(error["code"], str) and error["code"], reply
        assert isinstance(error["message"], str) and error["message"], reply
    return reply


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def nested(depth: int, kind: str) -> bytes:
    opening, closing = {"list": (b"[", b"]"), "dict": (b'{"a":', b"}")}[kind]
    return opening * depth + b"1" + closing * depth


# Commands a fuzz case may call with generated args: not the ones that wait on purpose
# (`logs` may follow forever, `watch` and `export` stream, `debug_memory` traces for
# seconds) or close intake.
FUZZ_COMMANDS = sorted(set(COMMANDS) - {"logs", "watch", "export", "debug_memory", "drain"})
job_objects = st.fixed_dictionaries(
    {"analyzer": st.sampled_from(["summarize", "classify", "nope"]) | st.text(max_size=5)},
    optional={
        "input": st.dictionaries(st.sampled_from(["text", "audience", "x"]), json_values)
        | json_values,
        "priority": st.integers(min_value=-(2**66), max_value=2**66) | json_values,
        "idempotency_key": st.text(max_size=10) | json_values,
        "extra": json_values,
    },
)
requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from(FUZZ_COMMANDS) | st.text(max_size=12) | json_values},
    optional={
        "id": st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=10) | json_values,
        "args": st.dictionaries(
            st.sampled_from(["jobs", "id", "limit", "state", "ids", "failed", "n", "x"]),
            job_objects | st.lists(job_objects, max_size=3) | json_values,
            max_size=3,
        )
        | json_values,
        "junk": json_values,
    },
)
request_lines = requests.map(lambda r: msgspec.json.encode(r) + b"\n")
huge_numbers = st.sampled_from(
    [b"1" * 5000, b"-" + b"9" * 400, b"1e999999", b"-1e-999999", b"0." + b"0" * 5000 + b"1"]
).map(lambda n: b'{"id": ' + n + b', "cmd": "ping", "args": {"n": ' + n + b"}}\n")
deep_lines = st.builds(
    lambda depth, kind, wrap: (
        (b'{"id":1,"cmd":"ping","args":{"a":' if wrap else b"")
        + nested(depth, kind)
        + (b"}}" if wrap else b"")
        + b"\n"
    ),
    st.integers(min_value=100, max_value=100_000),
    st.sampled_from(["list", "dict"]),
    st.booleans(),
)
socket_payloads = st.one_of(
    request_lines,
    st.lists(request_lines, min_size=2, max_size=5).map(b"".join),
    request_lines.flatmap(lambda line: st.integers(0, len(line) - 1).map(lambda cut: line[:cut])),
    st.binary(max_size=2000),
    st.binary(max_size=500).map(lambda b: b + b"\n"),
    json_values.map(lambda v: msgspec.json.encode(v) + b"\n"),
    huge_numbers,
    deep_lines,
    st.text(alphabet=" \t\r\n\x0b\x0c", max_size=20).map(str.encode),
)


def fuzz_socket(daemon: DaemonProcess, payload: bytes) -> None:
    CASES["socket"] += 1
    replies = exchange(daemon, payload)
    assert len(replies) == expected_replies(payload), (payload[:200], replies[:3])
    for line in replies:
        check_reply(line)


@given(payload=socket_payloads)
@fuzz_settings(SHORT_EXAMPLES)
def test_socket_fuzz(daemon: DaemonProcess, payload: bytes) -> None:
    """Generated socket input: one well-formed reply per line; the daemon survives."""
    fuzz_socket(daemon, payload)


@pytest.mark.slow
@given(payload=socket_payloads)
@fuzz_settings(LONG_EXAMPLES)
def test_socket_fuzz_long(daemon: DaemonProcess, payload: bytes) -> None:
    """The long run of the socket fuzzer (with the HTTP one, over 10,000 cases)."""
    CASES["long"] += 1
    fuzz_socket(daemon, payload)


def test_socket_serves_after_fuzzing(daemon: DaemonProcess) -> None:
    """After every generated case, the same process serves: ping, status, submit."""
    assert_serving(daemon)
    print("fuzz cases so far:", CASES)


@pytest.mark.parametrize(
    "line",
    [
        b'{"id":1,"cmd":"ping","args":{"a":' + nested(5000, "list") + b"}}\n",
        nested(100_000, "list") + b"\n",
        b'{"id": 2, "cmd": "status", "args": {"a": ' + nested(3000, "dict") + b"}}\n",
        b'{"id": 7, "cmd": "submit", "args": {"jobs": ' + nested(2000, "list") + b"}}\n",
    ],
    ids=["deep-args", "deep-list", "deep-dict", "deep-jobs"],
)
def test_deep_nesting_gets_bad_request(daemon: DaemonProcess, line: bytes) -> None:
    """A line nested past the decoder's depth is a bad_request, not a dead daemon
    (found by this fuzzer: it used to kill the process)."""
    (reply,) = exchange(daemon, line)
    error = check_reply(reply)["error"]
    assert error["code"] == "bad_request", error
    if line.startswith(b'{"id'):  # a bare list is refused before any depth is reached
        assert "nested too deeply" in error["message"], error
    assert_serving(daemon)


def _deep_input(depth: int) -> dict[str, Any]:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return {"text": value}


@pytest.mark.parametrize("depth", [70, 900])
def test_deeply_nested_input_is_refused_naming_it(daemon: DaemonProcess, depth: int) -> None:
    """An input nested deeper than the limit is refused at submit, naming `input`:
    near the decoder's own depth it could never be listed or shown again."""
    reply = daemon.request("submit", jobs={"analyzer": "summarize", "input": _deep_input(depth)})
    error = check_reply(msgspec.json.encode(reply))["error"]
    assert error["code"] == "invalid_job", error
    assert error["details"][0]["field"] == "input" and "deep" in error["message"], error
    assert_serving(daemon)


def test_input_at_the_depth_limit_is_kept_and_listed(daemon: DaemonProcess) -> None:
    """An input just inside the limit is accepted and can be shown and listed."""
    job = {"analyzer": "summarize", "input": _deep_input(60)}
    (job_id,) = daemon.call("submit", jobs=job)["ids"]
    assert daemon.call("show", id=job_id)["job"]["input"] == job["input"]
    assert any(j["id"] == job_id for j in daemon.call("jobs", limit=100)["jobs"])


@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, 2**70])
def test_priority_beyond_64_bits_is_a_field_error(daemon: DaemonProcess, priority: int) -> None:
    """A priority SQLite cannot store is refused naming `priority`, not an internal
    error (found by this fuzzer)."""
    job = {"analyzer": "summarize", "input": {"text": "x"}, "priority": priority}
    error = check_reply(msgspec.json.encode(daemon.request("submit", jobs=job)))["error"]
    assert error["code"] == "invalid_job", error
    assert error["details"][0]["field"] == "priority", error


def test_connection_flood(daemon: DaemonProcess) -> None:
    """Far more connections than the daemon serves at once: each one past the limit is
    told `busy` at once; once they close, the daemon serves as before."""
    held: list[socket.socket] = []
    extra = 60
    try:
        for _ in range(MAX_CONNECTIONS + extra):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket_path))
            held.append(sock)
        told: list[socket.socket] = []
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while len(told) < extra and time.monotonic() < deadline:
            readable, _, _ = select.select([s for s in held if s not in told], [], [], 0.5)
            told += readable
        assert len(told) >= extra, len(told)  # (one more if an earlier close lags)
        for sock in told:  # the refusal came unasked, before any request
            sock.settimeout(REPLY_TIMEOUT_S)
            reply = check_reply(sock.makefile("rb").readline())
            assert reply["error"]["code"] == "busy", reply
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while daemon.request("ping").get("ok") is not True:  # the slots free as they close
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_serving(daemon)


# -- HTTP -------------------------------------------------------------------------------

PUBLIC = ["/", "/healthz", "/readyz", "/status", "/metrics"]
PROTECTED = ["/v1/jobs", "/v1/jobs/01a20000-0000-7000-8000-000000000000", "/v1", "/v1/nope"]
header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=40
)
header_names = st.sampled_from(
    ["Content-Type", "Accept", "Transfer-Encoding", "Expect", "X-Forwarded-For", "Cookie"]
) | st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20)
query_parts = st.lists(
    st.tuples(
        st.sampled_from(["state", "analyzer", "limit", "before", "x"]) | header_text,
        st.sampled_from(["queued", "failed", "1", "0", "-1", "99999999999999999999", ""])
        | header_text,
    ),
    max_size=4,
)
bodies = st.one_of(
    job_objects.map(msgspec.json.encode),
    st.lists(job_objects, max_size=4).map(msgspec.json.encode),
    json_values.map(msgspec.json.encode),
    st.binary(max_size=1000),
    deep_lines,
    huge_numbers,
)


def _query(parts: list[tuple[str, str]]) -> str:
    if not parts:
        return ""
    return "?" + "&".join(f"{k}={v}" for k, v in parts).replace(" ", "%20").replace("#", "%23")


http_cases = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
        | st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=8),
        "path": st.sampled_from(PUBLIC + PROTECTED)
        | st.text(alphabet=string.ascii_letters + string.digits + "/.-%_~", max_size=30).map(
            lambda p: "/" + p
        ),
        "query": query_parts.map(_query),
        "auth": st.sampled_from([None, AUTH, "Bearer wrong", "Basic x", f"bearer  {TOKEN}x", ""]),
        "headers": st.dictionaries(header_names, header_text, max_size=4),
        "body": bodies | st.just(b""),
    }
)
raw_http_cases = st.one_of(
    st.binary(max_size=500).map(lambda b: b + b"\r\n\r\n"),  # ended: judged at once
    st.binary(max_size=200).map(lambda b: b"GET /" + b + b" HTTP/1.1\r\n\r\n"),
    header_text.map(lambda v: f"GET /status HTTP/1.1\r\nHost: x\r\nX: {v}\r\n\r\n".encode()),
    st.sampled_from(
        [
            b"GET /status HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",  # obsolete folding
            b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET /status HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
        ]
    ),
)


def check_http(answer: RawResponse, *, authed: bool, path: str, method: str) -> None:
    assert answer.status is not None, ("no status line", answer.head[:200])
    assert answer.status != 500, answer.body[:500]
    json_body = answer.headers.get("content-type", "").startswith("application/json")
    if answer.status >= 400 and json_body and method != "HEAD":  # HEAD: headers only
        body = answer.json()
        assert list(body) == ["error"], body
        assert body["error"]["code"] and body["error"]["message"], body
    if not authed and 200 <= answer.status < 300:
        # Nothing of /v1 without the token: no job list, job, submit or cancel answer.
        for marker in (b'"next_before":', b'"job":{', b'"ids":[', b'"was":'):
            assert marker not in answer.body, (method, path, answer.body[:300])
    route = path.split("?")[0]
    if not authed and (route == "/v1" or route.startswith("/v1/")) and answer.status < 500:
        # 401, or refused by the HTTP layer before any route (bad syntax, too large,
        # `Expect:` not met, headers too big).
        assert answer.status in (400, 401, 413, 417, 431), (method, path, answer.status)


def fuzz_http(http_addr: tuple[str, int], case: dict[str, Any]) -> None:
    CASES["http"] += 1
    headers = dict(case["headers"])
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "host")}
    headers.pop("Authorization", None)
    if case["auth"] is not None:
        headers["Authorization"] = case["auth"]
    path = case["path"] + case["query"]
    data = http_request(case["method"], path, headers=headers, body=case["body"])
    answer = raw_http(*http_addr, data, timeout_s=REPLY_TIMEOUT_S)
    check_http(answer, authed=case["auth"] == AUTH, path=path, method=case["method"])


def fuzz_raw_http(http_addr: tuple[str, int], data: bytes) -> None:
    CASES["http"] += 1
    answer = raw_http(*http_addr, data, timeout_s=REPLY_TIMEOUT_S, half_close_after_s=0.5)
    if answer.status is None:  # nothing parseable was sent: a close is a fine answer
        assert answer.head == b"", answer.head[:200]
        return
    assert answer.status != 500, answer.body[:300]
    assert answer.status < 300 or answer.status >= 400 or data.startswith(b"GET /"), answer


@given(case=http_cases)
@fuzz_settings(SHORT_EXAMPLES)
def test_http_fuzz(daemon: DaemonProcess, http_addr: tuple[str, int], case: dict[str, Any]) -> None:
    """Generated HTTP requests: a status line, never a 500, the shared error shape,
    and nothing under /v1 without the token."""
    fuzz_http(http_addr, case)


@given(data=raw_http_cases)
@fuzz_settings(SHORT_EXAMPLES // 3)
def test_http_fuzz_raw(daemon: DaemonProcess, http_addr: tuple[str, int], data: bytes) -> None:
    """Bytes that are barely (or not) HTTP: a 4xx or a closed connection, never a 500."""
    fuzz_raw_http(http_addr, data)


@pytest.mark.slow
@given(case=http_cases)
@fuzz_settings(LONG_EXAMPLES)
def test_http_fuzz_long(
    daemon: DaemonProcess, http_addr: tuple[str, int], case: dict[str, Any]
) -> None:
    """The long run of the HTTP fuzzer."""
    fuzz_http(http_addr, case)


@pytest.mark.slow
@given(data=raw_http_cases)
@fuzz_settings(LONG_EXAMPLES // 3)
def test_http_fuzz_raw_long(daemon: DaemonProcess, http_addr: tuple[str, int], data: bytes) -> None:
    """The long run of the raw-bytes HTTP fuzzer."""
    fuzz_raw_http(http_addr, data)


def test_http_connection_flood(daemon: DaemonProcess, http_addr: tuple[str, int]) -> None:
    """Hundreds of connections that send half a request and stall (slowloris): probes,
    status and the socket stay responsive meanwhile, and all is well after."""
    held: list[socket.socket] = []
    try:
        for i in range(400):
            sock = socket.create_connection(http_addr, timeout=REPLY_TIMEOUT_S)
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            if i % 2:
                sock.sendall(b"\r\n{")  # headers done, the body never comes
            held.append(sock)
        answer = raw_http(*http_addr, http_request("GET", "/readyz"))
        assert answer.status == 200, answer
        assert daemon.call("status")["state"] in ("running", "paused")  # the fuzz pauses
    finally:
        for sock in held:
            sock.close()
    assert_serving(daemon, http_addr)


def test_http_serves_after_fuzzing(daemon: DaemonProcess, http_addr: tuple[str, int]) -> None:
    """After every generated case, the same process serves over HTTP and the socket."""
    assert_serving(daemon, http_addr)
    answer = raw_http(
        *http_addr,
        http_request(
            "POST",
            "/v1/jobs",
            headers={"Authorization": AUTH, "Content-Type": "application/json"},
            body=b'{"analyzer": "summarize", "input": {"text": "after"}}',
        ),
    )
    assert answer.status == 202, answer
    print("fuzz cases:", CASES, "pid", os.getpid())
    if CASES["long"]:  # the long runs took place: they promise their number of cases
        assert CASES["socket"] + CASES["http"] >= LONG_RUNS_MIN_CASES, CASES


# -- the spool directory ---------------------------------------------------------------

SECRET = "TOP-SECRET-9a7c1e"


def test_spool_survives_hostile_entries(tmp_path: Path) -> None:
    """Binary, huge (sparse, never read), unreadable, empty files, symlinks (to a
    secret, dangling, looping, to /dev/zero, to a directory), a FIFO, a directory, and
    names with newlines, control characters, undecodable bytes and 255 bytes: each bad
    entry fails with a reason, each good one runs once, nothing hangs, nothing is read
    through a link, and the daemon (running as an unprivileged user) serves on."""
    need_root("running the daemon as uid 65534, so that file modes bind it,")
    nobody = 65534
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.chown(inbox, nobody, nobody)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    good: dict[bytes, str] = {
        b"new\nline.txt": "a newline in the name",
        b"tab\tand\rcr.txt": "control characters",
        b"bytes\xff\xfe.txt": "undecodable name",
        b"-leading-dash.txt": "looks like an option",
        "emoji-\U0001f600-\u202eltr.txt".encode(): "emoji and an RTL override",
        b"q'uo\"te\\back.txt": "quotes and a backslash",
        b"x" * 251 + b".txt": "a 255-byte name",
    }
    for raw_name, text in good.items():
        drop(inbox, raw_name, text.encode())
    bad: dict[str, str] = {}
    drop(inbox, "nul.txt", b"text\x00with a NUL")
    bad["nul.txt"] = "binary"
    drop(inbox, "latin1.txt", bytes(range(0x80, 0x100)))
    bad["latin1.txt"] = "binary"
    drop(inbox, "empty.txt", b"")
    bad["empty.txt"] = "empty"
    with (inbox.parent / "staging" / "huge").open("wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB, sparse: read, it would take a while
    os.rename(inbox.parent / "staging" / "huge", inbox / "huge.txt")
    bad["huge.txt"] = "too large"
    drop(inbox, "locked.txt", b"nobody may read this")
    (inbox / "locked.txt").chmod(0)
    bad["locked.txt"] = "unreadable: Permission denied"
    for name, target in {
        "secret-link.txt": str(secret),
        "dangling.txt": str(tmp_path / "nowhere"),
        "loop-a.txt": "loop-b.txt",
        "loop-b.txt": "loop-a.txt",
        "zero.txt": "/dev/zero",
        "dir-link.txt": str(tmp_path),
    }.items():
        os.symlink(target, inbox / name)
        bad[name] = "symbolic link"
    os.mkfifo(inbox / "fifo.txt")
    bad["fifo.txt"] = "not a regular file"
    (inbox / "folder.txt").mkdir()
    os.chown(inbox / "folder.txt", nobody, nobody)  # moving a directory needs its write bit
    bad["folder.txt"] = "not a regular file"

    config = sim_config(extra=spool_toml(inbox, "max_file_bytes = 4096\n"))
    with reachable(inbox):
        daemon = start_as(nobody, tmp_path / "d", config)
        try:
            deadline = time.monotonic() + 60
            while True:
                spool = daemon.call("status")["spool"]
                if spool["done"] == len(good) and spool["failed"] == len(bad):
                    break
                assert time.monotonic() < deadline, spool
                time.sleep(0.1)
            assert spool["error"] is None and spool["in_flight"] == 0, spool
            assert_serving(daemon)
            jobs = daemon.call("jobs", limit=100)["jobs"]
        finally:
            daemon.kill()
    failed = inbox / "failed"
    for name, why in bad.items():
        reason = (failed / f"{name}.reason").read_text()
        assert reason.startswith(why), (name, reason)
        assert os.path.lexists(failed / name), name
    done = {os.fsencode(n) for n in os.listdir(inbox / "done")}
    assert done == set(good)
    spool_jobs = [j for j in jobs if j["source"] == "spool"]
    assert sorted(j["input"]["text"] for j in spool_jobs) == sorted(good.values())
    left = sorted(n for n in os.listdir(inbox) if not n.startswith("."))
    assert left == ["done", "failed", "out", "processing"], left
    assert os.listdir(inbox / "processing") == []
    everything = (
        b"".join(p.read_bytes() for p in (inbox / "out").iterdir() if p.is_file())
        + daemon.log_path.read_bytes()
    )
    everything += (daemon.state_dir / "vigil.db").read_bytes()
    assert SECRET.encode() not in everything, "a file was read through a link"

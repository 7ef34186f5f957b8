"""Nobody gets in, nothing leaks: the control socket against other users (a child
process that drops to uid 65534 before connecting), HTTP on loopback with its bearer
token, canary secrets hunted through every output, size limits, and prompt templates
that cannot reach into Python objects."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio.from_thread
import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency
import pytest
from aiohttp import web

from daemon.config import DEFAULT_HTTP_LISTEN, ConfigError, parse_config
from tests.daemon_proc import (
    DaemonProcess,
    daemon_config,
    run_cli,
    sim_config,
    wait_until,
    with_socket_group,
)
from tests.torture_helpers import (
    analyzer,
    host_port,
    http_request,
    need_root,
    openai_provider,
    raw_http,
    reachable,
    start_as,
    threaded_api,
)

StartDaemon = Callable[..., DaemonProcess]
NOBODY = 65534
CANARY_KEY = "sk-canary-KEY-7f3a9c2e41d8b6a0e5f1c3d7b9a2e4f6"
CANARY_TOKEN = "canary-TOKEN-91d0c4e7a3b5f8e2d6c1a9b7e3f5d2c8"


def as_user(
    uid: int, gid: int, action: Callable[[], bytes], groups: tuple[int, ...] = ()
) -> tuple[int, bytes]:
    """Fork; the child drops to uid/gid (with only `groups` as supplementary groups)
    and runs `action`; returns its exit code and what it wrote back (or the error it
    met)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls from here, then _exit
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out = action()
        except BaseException as exc:
            out, code = f"{type(exc).__name__}: {exc}".encode(), 1
        os.write(write_end, out[:60000])
        os._exit(code)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + 30
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                data += chunk
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)  # stuck in `action`: not waited on forever
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data


def connect_and_ask(path: Path, line: bytes) -> Callable[[], bytes]:
    def action() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)  # the daemon answers, then sees EOF and closes
            buf = b""
            while chunk := sock.recv(65536):
                buf += chunk
            return buf

    return action


# -- the control socket -----------------------------------------------------------------


def test_socket_is_private_to_its_owner(start_daemon: StartDaemon) -> None:
    """Mode 0600, owned by the daemon's user: another uid cannot even connect."""
    need_root("dropping to another uid")
    daemon = start_daemon(sim_config())
    st = os.stat(daemon.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    with reachable(daemon.socket_path):
        ping = connect_and_ask(daemon.socket_path, b'{"cmd":"ping"}\n')
        code, out = as_user(NOBODY, NOBODY, ping)
    assert code == 1 and out.startswith(b"PermissionError"), out


def test_peer_credentials_refuse_other_uids(start_daemon: StartDaemon) -> None:
    """Even with the file opened up (a careless chmod), the daemon checks the peer's
    uid (SO_PEERCRED): another user is told `forbidden` and its command never runs."""
    need_root("dropping to another uid")
    daemon = start_daemon(sim_config())
    os.chmod(daemon.socket_path, 0o666)
    line = b'{"id": 1, "cmd": "pause"}\n'
    with reachable(daemon.socket_path):
        code, out = as_user(NOBODY, NOBODY, connect_and_ask(daemon.socket_path, line))
    assert code == 0, out
    reply = msgspec.json.decode(out)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden", reply
    assert daemon.call("status")["state"] == "running", "the refused command ran"
    refused = [e for e in daemon.events() if e.get("event") == "control.refused"]
    assert refused and refused[-1]["peer_uid"] == NOBODY


def test_socket_group_members_get_in(start_daemon: StartDaemon) -> None:
    """With daemon.socket_group, a process of that group gets in, as its primary or as
    a supplementary group (an operator added to the group); another uid outside it does
    not (by the file mode, and by the peer check if the mode is opened up)."""
    need_root("dropping to another uid")
    daemon = start_daemon(with_socket_group("nogroup"))
    ping = connect_and_ask(daemon.socket_path, b'{"id": 1, "cmd": "ping"}\n')
    with reachable(daemon.socket_path):
        code, out = as_user(NOBODY, NOBODY, ping)  # nobody:nogroup
        assert code == 0 and msgspec.json.decode(out)["ok"] is True, out
        operator = (NOBODY - 2, NOBODY - 2)  # its own primary group, nogroup besides
        code, out = as_user(*operator, ping, groups=(NOBODY,))
        assert code == 0 and msgspec.json.decode(out)["ok"] is True, out
        code, out = as_user(NOBODY - 1, 1, ping)  # another uid, group daemon
        assert code == 1 and out.startswith(b"PermissionError"), out
        os.chmod(daemon.socket_path, 0o666)
        code, out = as_user(NOBODY - 1, 1, ping)
    assert msgspec.json.decode(out)["error"]["code"] == "forbidden", out


def test_a_socket_group_that_cannot_be_used_stops_the_daemon_for_good(tmp_path: Path) -> None:
    """A socket group that does not exist is a config error (check-config names it);
    one the daemon may not give its socket to (not a member; under systemd, a seccomp
    filter without @chown) ends the start with exit 78, which systemd does not
    restart, and a message naming the setting and the fix."""
    need_root("dropping to another uid")
    missing = tmp_path / "missing.toml"
    missing.write_text(with_socket_group("no-such-grp"))
    out = run_cli("check-config", str(missing))
    assert out.returncode == 78 and "$.daemon.socket_group: no group named" in out.stderr, out
    with reachable(tmp_path / "d"):
        daemon = start_as(NOBODY, tmp_path / "d", with_socket_group("daemon"), ready=False)
        try:
            assert daemon.proc.wait(60) == 78, daemon.log()
        finally:
            daemon.kill()
    assert "(daemon.socket_group): Operation not permitted" in daemon.log(), daemon.log()
    assert "Traceback" not in daemon.log()


# -- HTTP -------------------------------------------------------------------------------


def test_http_listens_on_loopback_by_default(start_daemon: StartDaemon) -> None:
    """With no [http] section the API binds 127.0.0.1:8470, and every socket the daemon
    listens on (its built-in simulated API too) is on loopback."""
    assert DEFAULT_HTTP_LISTEN.startswith("127.0.0.1:")
    host, port = DEFAULT_HTTP_LISTEN.rsplit(":", 1)
    with socket.socket() as probe:
        if probe.connect_ex((host, int(port))) == 0:
            pytest.skip(f"{DEFAULT_HTTP_LISTEN} is taken on this machine")
    config = sim_config().replace('[http]\nlisten = ""\n', "")
    assert "[http]" not in config
    daemon = start_daemon(config)
    assert daemon.http_url() == f"http://{DEFAULT_HTTP_LISTEN}"
    listening = [
        c.laddr
        for c in psutil.Process(daemon.proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert len(listening) >= 2, listening  # the API and the built-in simulated API
    assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening


def test_v1_refuses_missing_and_wrong_tokens(start_daemon: StartDaemon) -> None:
    """Every way of not quite giving the token gets 401 on every /v1 route; only the
    exact bearer token passes."""
    daemon = start_daemon(
        sim_config(http_listen="127.0.0.1:0"), env={"VIGIL_HTTP_TOKEN": CANARY_TOKEN}
    )
    addr = host_port(daemon.http_url())
    wrong: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {CANARY_TOKEN}"},
        {"Authorization": f"Bearer {CANARY_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {CANARY_TOKEN}x"},
        {"Authorization": f"Bearer x{CANARY_TOKEN}"},
        {"Authorization": f"Token {CANARY_TOKEN}"},
        {"X-Api-Key": CANARY_TOKEN},
        {"Cookie": f"token={CANARY_TOKEN}"},
    ]
    routes = [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("DELETE", "/v1/jobs/x"),
        ("GET", f"/v1/jobs?token={CANARY_TOKEN}"),
        ("GET", "/v1/"),
        ("PUT", "/v1/jobs"),
    ]
    body = b'{"analyzer": "summarize", "input": {"text": "x"}}'
    for headers in wrong:
        for method, path in routes:
            answer = raw_http(*addr, http_request(method, path, headers=headers, body=body))
            assert answer.status == 401, (headers, method, path, answer.status)
            assert CANARY_TOKEN.encode() not in answer.body + answer.head
    assert daemon.call("status")["jobs"]["queued"] == 0, "a job got in without the token"
    right = {"Authorization": f"Bearer {CANARY_TOKEN}"}
    assert raw_http(*addr, http_request("GET", "/v1/jobs", headers=right)).status == 200


def test_request_body_limit_holds_for_chunked_bodies(start_daemon: StartDaemon) -> None:
    """http.max_body_bytes holds whether the size is declared or not (chunked), and a
    declared size over the limit is refused before the body is read."""
    config = sim_config(http_listen="127.0.0.1:0").replace(
        "[http]\n", "[http]\nmax_body_bytes = 4096\n", 1
    )
    daemon = start_daemon(config)
    addr = host_port(daemon.http_url())
    piece = b"x" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(10)) + b"0\r\n\r\n"
    chunked = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n\r\n" + chunks
    )
    answer = raw_http(*addr, chunked)
    assert answer.status == 413, answer
    declared = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 999999999\r\n\r\n{"
    )
    answer = raw_http(*addr, declared, half_close_after_s=5)
    assert answer.status == 413, answer
    assert daemon.call("status")["jobs"]["queued"] == 0


def test_socket_line_limit_holds(start_daemon: StartDaemon) -> None:
    """A control line over the limit is refused with line_too_long and the connection
    closed; the daemon's memory does not keep it."""
    from daemon.control.protocol import MAX_LINE_BYTES

    daemon = start_daemon(sim_config())
    rss_before = psutil.Process(daemon.proc.pid).memory_info().rss
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket_path))
        block = b"[" * (1 << 20)
        try:
            for _ in range(MAX_LINE_BYTES // len(block) + 2):
                sock.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = sock.makefile("rb").readline()
    assert msgspec.json.decode(reply)["error"]["code"] == "line_too_long"
    assert daemon.call("ping")["pong"] is True
    growth_mb = (psutil.Process(daemon.proc.pid).memory_info().rss - rss_before) / 2**20
    assert growth_mb < 3 * MAX_LINE_BYTES / 2**20, growth_mb


# -- prompt templates -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "{text.__class__}",
        "{text.__class__.__mro__[1].__subclasses__}",
        "{text[0]}",
        "{0}",
        "{}",
        "{text!r}",
        "{text:>{width}}",
        "{text.upper}",
    ],
)
def test_templates_cannot_reach_into_objects(prompt: str) -> None:
    """A prompt may only name plain fields: attribute access, indexing, positional
    fields, conversions and format specs are config errors naming the prompt."""
    config = sim_config().replace('prompt = "Summarize:\\n\\n{text}"', f'prompt = "{prompt}"')
    assert prompt in config
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert "$.analyzers.summarize.prompt" in str(caught.value)


def test_input_values_are_never_templates(start_daemon: StartDaemon) -> None:
    """Input values go into the prompt as text, once: braces in them are not filled in,
    not looked up, not called."""
    nasty = [
        "{text.__class__.__mro__}",
        "{__import__}",
        "{0.__globals__}",
        "{text}{text}",
        "}{",
        "{",
    ]
    with threaded_api() as api:
        config = daemon_config(
            openai_provider("api", api.url) + analyzer("summarize", "api", max_attempts=1)
        )
        daemon = start_daemon(config)
        ids = daemon.call(
            "submit", jobs=[{"analyzer": "summarize", "input": {"text": t}} for t in nasty]
        )["ids"]
        final = daemon.wait_all_terminal()
        seen = sorted(s.text for s in api.seen())
    assert final["succeeded"] == len(ids)
    assert seen == sorted(f"Analyse:\n\n{t}" for t in nasty)


# -- canary secrets ---------------------------------------------------------------------


@dataclass
class EchoingApi:
    """An OpenAI-compatible API that echoes the caller's key back in its errors (as
    some do), to see that the daemon never passes it on."""

    url: str


async def _echo(request: web.Request) -> web.Response:
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    text = str((await request.json())["messages"][-1]["content"])
    for status in (400, 401, 429, 500):
        if f"echo-{status}" in text:
            body = {"error": {"message": f"Incorrect API key provided: {key}", "code": None}}
            return web.json_response(body, status=status)
    if "echo-long" in text:  # the key straddles where error messages are cut
        message = "x" * 480 + key + " trailing"
        return web.json_response({"error": {"message": message}}, status=400)
    if "echo-html" in text:
        return web.Response(status=502, text=f"<html>bad gateway for {key}</html>")
    answer = {"choices": [{"message": {"role": "assistant", "content": "fine"}}]}
    return web.json_response(answer)


@contextmanager
def echoing_api() -> Iterator[EchoingApi]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _echo)

    @contextmanager
    def serving(portal: anyio.from_thread.BlockingPortal) -> Iterator[str]:
        runner = web.AppRunner(app, access_log=None)
        portal.call(runner.setup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        portal.call(site.start)
        try:
            host, port = runner.addresses[0][:2]
            yield f"http://{host}:{port}/v1"
        finally:
            portal.call(runner.cleanup)

    with anyio.from_thread.start_blocking_portal() as portal, serving(portal) as url:
        yield EchoingApi(url)


def _windows(secret: str, size: int = 12) -> list[bytes]:
    """Every `size`-character piece of the secret: a cut-off secret is still a leak."""
    return [secret[i : i + size].encode() for i in range(len(secret) - size + 1)]


def _leaks(text: bytes, where: str) -> list[str]:
    found = []
    for name, secret in (("API key", CANARY_KEY), ("HTTP token", CANARY_TOKEN)):
        for piece in _windows(secret):
            if piece in text:
                found.append(f"{name} in {where}: ...{piece.decode()}...")
                break
    return found


def test_canary_secrets_appear_nowhere(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A canary API key (echoed back by the API in its errors) and a canary HTTP token
    (sent right and wrong) appear in no log line, status, HTTP answer, job error, CLI
    output, stack dump, start-up failure or database page."""
    with echoing_api() as api:
        config = daemon_config(
            openai_provider("api", api.url, api_key_env="CANARY_API_KEY", breaker_failures=0)
            # Three 429s end the echo-429 job (each waits out a one-second cool-down).
            + analyzer("summarize", "api", max_attempts=2, max_rate_limited=3),
            http_listen="127.0.0.1:0",
        ).replace('format = "json"', 'format = "json"\nlevel = "debug"')
        env = {"CANARY_API_KEY": CANARY_KEY, "VIGIL_HTTP_TOKEN": CANARY_TOKEN}
        daemon = start_daemon(config, env=env)
        addr = host_port(daemon.http_url())
        texts = ["echo-400", "echo-429", "echo-500", "echo-long", "echo-html", "fine"]
        jobs = [{"analyzer": "summarize", "input": {"text": t}} for t in texts]
        daemon.call("submit", jobs=jobs)
        wait_until(lambda: daemon.call("status")["jobs"]["queued"] == 0, what="first round")
        daemon.wait_all_terminal()
        daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "echo-401"}})
        wait_until(lambda: daemon.call("status")["providers"]["api"]["paused"] is not None)
        daemon.call("resume")
        # The token, right and wrong, in every place a client can put it.
        for given in (f"Bearer {CANARY_TOKEN}", f"Bearer {CANARY_TOKEN[:-3]}", CANARY_TOKEN):
            for url in ("/v1/jobs", f"/v1/jobs/{CANARY_TOKEN}", f"/v1/jobs?x={CANARY_TOKEN}"):
                raw_http(*addr, http_request("GET", url, headers={"Authorization": given}))
        daemon.proc.send_signal(signal.SIGUSR1)  # every stack to the log
        wait_until(lambda: b'"stacks.tasks"' in daemon.log_path.read_bytes(), what="stacks")

        outputs: dict[str, bytes] = {}
        for path in ("/status", "/metrics", "/", "/healthz", "/readyz"):
            outputs[f"GET {path}"] = raw_http(*addr, http_request("GET", path)).body
        auth = {"Authorization": f"Bearer {CANARY_TOKEN}"}
        listing = raw_http(*addr, http_request("GET", "/v1/jobs?limit=100", headers=auth))
        outputs["GET /v1/jobs"] = listing.body
        for job in listing.json()["jobs"]:
            shown = raw_http(*addr, http_request("GET", f"/v1/jobs/{job['id']}", headers=auth))
            outputs[f"job {job['input']['text']}"] = shown.body
        for args in (["status"], ["status", "--json"], ["logs", "-n", "5000", "--json"]):
            out = run_cli(*args, socket_path=daemon.socket_path, env=env)
            outputs[f"vigil {' '.join(args)}"] = (out.stdout + out.stderr).encode()
        for cmd in ("debug_stacks", "debug_tasks"):
            outputs[cmd] = msgspec.json.encode(daemon.call(cmd))
        errors = [
            msgspec.json.decode(body)["job"]["error"]
            for name, body in outputs.items()
            if name.startswith("job echo")
        ]
        assert daemon.terminate() == 0
    # A start that fails (config error) and one that crashes (address in use) print
    # their reasons with the secrets in the environment.
    bad = tmp_path / "bad.toml"
    bad.write_text(config.replace('kind = "openai"', 'kind = "nope"'))
    out = run_cli("run", "--config", str(bad), env=env)
    outputs["failed start (config)"] = (out.stdout + out.stderr).encode()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = config.replace("127.0.0.1:0", f"127.0.0.1:{taken.getsockname()[1]}")
        (tmp_path / "busy.toml").write_text(busy)
        out = run_cli("run", "--config", str(tmp_path / "busy.toml"), env=env)
        assert out.returncode == 1
    outputs["failed start (listen)"] = (out.stdout + out.stderr).encode()
    outputs["daemon log"] = daemon.log_path.read_bytes()
    for suffix in ("", "-wal"):
        db_file = daemon.state_dir / f"vigil.db{suffix}"
        if db_file.exists():
            outputs[f"database file vigil.db{suffix}"] = db_file.read_bytes()

    assert all(e is not None for e in errors) and len(errors) >= 5, errors
    leaks = [leak for where, text in outputs.items() for leak in _leaks(text, where)]
    assert not leaks, leaks
    assert b"[redacted]" in b"".join(outputs.values()), "the echoed key was never met"
    assert b"stacks.thread" in outputs["daemon log"], "SIGUSR1 wrote no stacks"


def test_crash_output_carries_no_secrets(tmp_path: Path) -> None:
    """A daemon that dies of an unexpected error (here: its state directory is a file)
    prints why, and the secrets in its environment stay out of it."""
    state = tmp_path / "not-a-dir"
    state.write_text("")
    config = tmp_path / "vigil.toml"
    config.write_text(sim_config().replace("[daemon]\n", f'[daemon]\nstate_dir = "{state}"\n'))
    env = {**os.environ, "VIGIL_HTTP_TOKEN": CANARY_TOKEN, "OPENAI_API_KEY": CANARY_KEY}
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert out.stderr, "a failed start says why"
    assert not _leaks(out.stdout + out.stderr, "crash output"), out.stderr[-2000:]

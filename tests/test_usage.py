"""The spend report (issue #14): `vigil usage`, the socket's `usage` and GET /v1/usage
against a daemon subprocess that called the simulated API through two priced providers
and one without prices, checked against the calls and attempts in its database."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import SimulateConfig
from daemon.spend.report import WHEN_FORMS, parse_when, total_of
from daemon.store.calls import UsageRow
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli
from tests.torture_helpers import openai_provider, threaded_api

TOKEN = "usage-token-5b2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GROUPS = ("day", "analyzer", "provider", "model")
FIELDS = (
    "jobs",
    "attempts",
    "calls",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
)
NOW = 1_795_456_800.0  # 2026-11-23T18:00:00Z
SYSTEM = "You read reports closely and answer briefly. " * 120  # long: a cached prefix
TEXT = "The quarterly figures came in above plan and the team is pleased. "


def provider(name: str, url: str, prices: tuple[float, float, float] | None) -> str:
    section = openai_provider(name, url, max_concurrency=8)
    if prices is not None:
        prompt, completion, cached = prices
        section += f"""
[providers.{name}.prices]
prompt_per_mtok = {prompt}
completion_per_mtok = {completion}
cached_prompt_per_mtok = {cached}
"""
    return section


def analyzer_section(name: str, provider_name: str, model: str, output: str) -> str:
    required = 'required_keys = ["sentiment"]\n' if output == "json" else ""
    return f"""
[analyzers.{name}]
provider = "{provider_name}"
model = "{model}"
system = "{SYSTEM}"
prompt = "Analyse:\\n\\n{{text}}"
max_tokens = 60
output = "{output}"
{required}max_attempts = 5
"""


def config(url: str, a_provider: str) -> str:
    """Providers `cheap` and `dear` (priced differently) and `free` (no prices);
    analyzer `a` on `a_provider` (model small) and `b` on `dear` (model large, JSON)."""
    sections = (
        provider("cheap", url, (1.0, 2.0, 0.5))
        + provider("dear", url, (3.0, 15.0, 0.3))
        + provider("free", url, None)
        + analyzer_section("a", a_provider, "sim-small", "text")
        + analyzer_section("b", "dear", "sim-large", "json")
    )
    return daemon_config(sections, max_concurrency=16, http_listen="127.0.0.1:0")


def batch(analyzer: str, tag: str, n: int) -> list[dict[str, Any]]:
    return [{"analyzer": analyzer, "input": {"text": f"{tag} {i}: {TEXT}"}} for i in range(n)]


@dataclass
class Ran:
    daemon: DaemonProcess
    url: str  # the HTTP API
    middle: float  # unix time between the two rounds of jobs


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    """One daemon, two rounds: `a` on cheap then (after a reload) on free, `b` on dear
    throughout; some API errors so that jobs take more than one attempt."""
    settings = SimulateConfig(latency_ms=2.0, latency_sigma=0.1, error_rate=0.15, seed=7)
    with threaded_api(settings) as api:
        state_dir = tmp_path_factory.mktemp("usage")
        daemon = DaemonProcess.start(
            state_dir, config(api.url, "cheap"), env={"VIGIL_HTTP_TOKEN": TOKEN}
        )
        try:
            daemon.call("submit", jobs=batch("a", "one", 12) + batch("b", "one", 8))
            daemon.wait_all_terminal(timeout_s=60)
            time.sleep(0.05)
            middle = time.time()
            time.sleep(0.05)
            daemon.config_path.write_text(config(api.url, "free"))
            assert "analyzers" in daemon.call("reload")["applied"]
            daemon.call("submit", jobs=batch("a", "two", 10) + batch("b", "two", 5))
            daemon.wait_all_terminal(timeout_s=60)
            yield Ran(daemon, daemon.http_url(), middle)
        finally:
            daemon.kill()


def db_path(ran: Ran) -> Path:
    return ran.daemon.state_dir / "vigil.db"


def expected(ran: Ran, by: str, since: float = 0.0, until: float = 1e12) -> dict[str, Any]:
    """The report computed here, in Python, from every stored call in [since, until)."""
    calls = db_rows(
        db_path(ran),
        "SELECT at, job_id, attempt, analyzer, provider, model, prompt_tokens, "
        "cached_tokens, cache_write_tokens, completion_tokens, cost FROM calls",
    )
    groups: dict[str, list[Any]] = {}
    for call in calls:
        if since <= call[0] < until:
            day = dt.datetime.fromtimestamp(call[0], dt.UTC).strftime("%Y-%m-%d")
            key = {"day": day, "analyzer": call[3], "provider": call[4], "model": call[5]}[by]
            groups.setdefault(key, []).append(call)
    rows = []
    for key, group in sorted(groups.items()):
        costs = [c[10] for c in group if c[10] is not None]
        rows.append(
            {
                "key": key,
                "jobs": len({c[1] for c in group}),
                "attempts": len({(c[1], c[2]) for c in group}),
                "calls": len(group),
                "input_tokens": sum(c[6] for c in group),
                "cached_tokens": sum(c[7] for c in group),
                "cache_write_tokens": sum(c[8] for c in group),
                "output_tokens": sum(c[9] for c in group),
                "cost_usd": sum(costs) if costs else None,
            }
        )
    return {"rows": rows, "total": total_of([UsageRow(**r) for r in rows])}


def assert_report(report: dict[str, Any], want: dict[str, Any]) -> None:
    """Same rows and total: counts exactly, costs to float rounding."""
    got_rows = [*report["rows"], report["total"]]
    want_rows = [*want["rows"], _builtins(want["total"])]
    assert [r["key"] for r in got_rows] == [r["key"] for r in want_rows]
    for got, exp in zip(got_rows, want_rows, strict=True):
        assert {f: got[f] for f in FIELDS} == {f: exp[f] for f in FIELDS}, got["key"]
        if exp["cost_usd"] is None:
            assert got["cost_usd"] is None, got
        else:
            assert got["cost_usd"] == pytest.approx(exp["cost_usd"], rel=1e-9, abs=1e-12)


def _builtins(row: UsageRow) -> dict[str, Any]:
    return {f: getattr(row, f) for f in ("key", *FIELDS, "cost_usd")}


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET a JSON answer: status and body, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def cli_usage(ran: Ran, *args: str) -> Any:
    done = run_cli("usage", *args, "--json", socket_path=ran.daemon.socket_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- the report against the database -------------------------------------------------


@pytest.mark.parametrize("by", GROUPS)
def test_every_surface_reports_the_stored_calls(ran: Ran, by: str) -> None:
    """By each grouping, the socket, `vigil usage --json` and GET /v1/usage give the
    rows and total summed here from the calls table."""
    want = expected(ran, by)
    socket = ran.daemon.call("usage", by=by)
    cli = cli_usage(ran, "--by", by)
    status, http = get(f"{ran.url}/v1/usage?by={by}", AUTH)
    assert status == 200, http
    for report in (socket, cli, http):
        assert set(report) == {"since", "until", "by", "rows", "total"}
        assert report["by"] == by
        assert report["until"] - report["since"] == pytest.approx(7 * 86_400)
        assert_report(report, want)


def test_the_data_covers_what_the_report_must_tell_apart(ran: Ran) -> None:
    """The run has retries, cached input, both analyzers on more than one provider's
    bill, priced and unpriced calls: the groupings differ and nothing is trivially 0."""
    by_provider = {r["key"]: r for r in ran.daemon.call("usage", by="provider")["rows"]}
    by_analyzer = {r["key"]: r for r in ran.daemon.call("usage", by="analyzer")["rows"]}
    assert set(by_provider) == {"cheap", "dear", "free"}
    assert set(by_analyzer) == {"a", "b"}
    assert by_provider["free"]["cost_usd"] is None
    assert by_provider["cheap"]["cost_usd"] > 0 and by_provider["dear"]["cost_usd"] > 0
    total = ran.daemon.call("usage")["total"]
    assert total["jobs"] == 12 + 8 + 10 + 5
    [(attempts,)] = db_rows(db_path(ran), "SELECT count(*) FROM attempts")
    assert attempts > total["jobs"], "some attempts failed and were retried"
    assert total["cached_tokens"] > 0
    assert {r["key"] for r in ran.daemon.call("usage", by="model")["rows"]} == {
        "sim-small",
        "sim-large",
    }


def test_the_total_matches_the_attempts_stored_usage(ran: Ran) -> None:
    """Tokens and cost in the total equal the sums over the attempts' own usage."""
    [(prompt, cached, written, completion, cost)] = db_rows(
        db_path(ran),
        "SELECT sum(prompt_tokens), sum(cached_tokens), sum(cache_write_tokens), "
        "sum(completion_tokens), sum(cost) FROM attempts",
    )
    total = ran.daemon.call("usage", by="provider")["total"]
    assert (prompt, cached, written or 0, completion) == (
        total["input_tokens"],
        total["cached_tokens"],
        total["cache_write_tokens"],
        total["output_tokens"],
    )
    assert total["cost_usd"] == pytest.approx(cost, rel=1e-9)


def test_since_and_until_cut_the_window(ran: Ran) -> None:
    """A window from between the rounds holds only the second round's calls, whether
    given as a unix time (socket) or ISO 8601 (HTTP, CLI); until cuts the other side."""
    middle = ran.middle
    stamp = dt.datetime.fromtimestamp(middle, dt.UTC).isoformat()
    later = expected(ran, "provider", since=middle)
    assert later["rows"] and later["total"].jobs == 10 + 5
    assert_report(ran.daemon.call("usage", by="provider", since=middle), later)
    query = urllib.parse.urlencode({"by": "provider", "since": stamp})
    status, http = get(f"{ran.url}/v1/usage?{query}", AUTH)
    assert status == 200, http
    assert_report(http, later)
    assert_report(cli_usage(ran, "--by", "provider", "--since", stamp), later)
    earlier = expected(ran, "analyzer", until=middle)
    assert earlier["total"].jobs == 12 + 8
    assert_report(ran.daemon.call("usage", by="analyzer", since=0, until=middle), earlier)
    assert_report(cli_usage(ran, "--by", "analyzer", "--since", "1d", "--until", stamp), earlier)


def test_a_window_that_excludes_everything_is_empty_with_a_zero_total(ran: Ran) -> None:
    """A window before the run: no rows, every total figure 0 (cost 0.0, not null)."""
    zero = {"key": "total", **dict.fromkeys(FIELDS, 0), "cost_usd": 0.0}
    socket = ran.daemon.call("usage", since=1_000_000.0, until=2_000_000.0)
    cli = cli_usage(ran, "--since", "2020-01-01", "--until", "2020-01-02T00:00:00Z")
    status, http = get(f"{ran.url}/v1/usage?since=2020-01-01&until=2020-01-02", AUTH)
    assert status == 200
    for report in (socket, cli, http):
        assert (report["rows"], report["total"]) == ([], zero)
    assert cli["since"] == dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp()


def test_the_human_table(ran: Ran) -> None:
    """One row per provider and a total, costs as $0.000000 and `-` when unpriced."""
    done = run_cli("usage", "--by", "provider", socket_path=ran.daemon.socket_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("UTC, by provider")
    assert lines[1].split() == [
        "PROVIDER",
        "JOBS",
        "ATTEMPTS",
        "CALLS",
        "INPUT",
        "CACHED",
        "CACHE",
        "WRITE",
        "OUTPUT",
        "COST",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["cheap", "dear", "free", "total"]
    assert rows["free"][-1] == "-"
    for key in ("cheap", "dear", "total"):
        assert rows[key][-1].startswith("$") and len(rows[key][-1].split(".")[1]) == 6


# -- HTTP: the token and the query ----------------------------------------------------


def test_v1_usage_needs_the_bearer_token(ran: Ran) -> None:
    """Without the token or with a wrong one, 401 in the shared error shape; with it, 200."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, body = get(f"{ran.url}/v1/usage", headers)
        assert status == 401, body
        assert body["error"]["code"] == "unauthorized"
    assert get(f"{ran.url}/v1/usage", AUTH)[0] == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=7", "until"),
        ("since=2026-13-01", "since"),
        ("since=-3d", "since"),
        ("by=week", "by"),
        ("group=day", "group"),
        ("since=1d&since=2d", "since"),
        ("since=2d&until=3d", "since"),
    ],
)
def test_v1_usage_refuses_bad_values_naming_the_field(ran: Ran, query: str, field: str) -> None:
    """A bad or unknown parameter is 400 `bad_args` with that field's error."""
    status, body = get(f"{ran.url}/v1/usage?{query}", AUTH)
    assert status == 400, body
    error = body["error"]
    assert error["code"] == "bad_args" and field in error["message"]
    assert [(d["index"], d["field"]) for d in error["details"]] == [(None, field)]
    if field in ("since", "until") and "=" in query and "&" not in query:
        assert "7d" in error["message"]  # the accepted forms


def test_the_socket_refuses_bad_arguments(ran: Ran) -> None:
    """Unknown fields, a bad grouping, negative times and since after until: bad_args."""
    for args in ({"by": "week"}, {"since": -1.0}, {"since": 10.0, "until": 5.0}, {"x": 1}):
        reply = ran.daemon.request("usage", **args)
        assert not reply["ok"] and reply["error"]["code"] == "bad_args", (args, reply)


# -- the shared parser and the CLI's usage errors ------------------------------------


@pytest.mark.parametrize(
    ("text", "stamp"),
    [
        ("7d", NOW - 7 * 86_400),
        ("24h", NOW - 86_400),
        ("30m", NOW - 1_800),
        ("90s", NOW - 90),
        ("2w", NOW - 14 * 86_400),
        ("1.5h", NOW - 5_400),
        ("0d", NOW),
        (" 7d ", NOW - 7 * 86_400),
        ("2026-11-23", NOW - 18 * 3_600),
        ("2026-11-23T18:00:00Z", NOW),
        ("2026-11-23T18:00", NOW),
        ("2026-11-23 18:00:00.5", NOW + 0.5),
        ("2026-11-23T20:00:00+02:00", NOW),
        ("2026-11-23T13:00-05:00", NOW),
    ],
)
def test_parse_when_accepts(text: str, stamp: float) -> None:
    """Durations count back from now; dates are UTC midnight; naive times are UTC."""
    assert parse_when(text, NOW) == stamp


@pytest.mark.parametrize(
    "text",
    ["", "7", "1700000000", "7x", "d", "-3d", "7 d", "yesterday", "2026-13-01", "2026-11-23T25:00"],
)
def test_parse_when_refuses_naming_the_forms(text: str) -> None:
    """Anything else is a ValueError whose message lists the accepted forms."""
    with pytest.raises(ValueError, match="expected a duration back from now") as caught:
        parse_when(text, NOW)
    assert WHEN_FORMS in str(caught.value)


def test_parse_when_refuses_before_1970() -> None:
    """A bound before unix time 0 is refused, saying so."""
    with pytest.raises(ValueError, match="before 1970"):
        parse_when("1969-12-31", NOW)
    with pytest.raises(ValueError, match="before 1970"):
        parse_when("100000w", NOW)


def test_total_of_sums_and_keeps_unpriced_apart() -> None:
    """The total sums every figure; its cost is null only when no row has a price."""
    row = UsageRow(
        key="x",
        jobs=1,
        attempts=2,
        calls=3,
        input_tokens=4,
        cached_tokens=5,
        cache_write_tokens=6,
        output_tokens=7,
        cost_usd=None,
    )
    assert total_of([row, row]).cost_usd is None
    priced = total_of([row, UsageRow(**{**_builtins(row), "cost_usd": 0.25})])
    assert (priced.key, priced.jobs, priced.output_tokens, priced.cost_usd) == (
        "total",
        2,
        14,
        0.25,
    )
    assert total_of([]) == UsageRow(key="total", **dict.fromkeys(FIELDS, 0), cost_usd=0.0)


@pytest.mark.parametrize(
    ("args", "named", "forms"),
    [
        (["--since", "yesterday"], "--since", True),
        (["--until", "3x"], "--until", True),
        (["--since", "2026-02-30"], "--since", True),
        (["--by", "week"], "--by", False),
        (["--since", "1d", "--until", "2d"], "--since", False),
        (["--since", "2999-01-01"], "--since", False),
    ],
)
def test_cli_bad_values_are_usage_errors(
    tmp_path: Path, args: list[str], named: str, forms: bool
) -> None:
    """Exit 2 naming the flag (and for a bad time, the accepted forms), before any
    connection: no daemon listens on the socket given."""
    done = run_cli("usage", *args, socket_path=tmp_path / "none.sock")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert named in done.stderr
    assert ("7d" in done.stderr and "YYYY-MM-DD" in done.stderr) == forms, done.stderr

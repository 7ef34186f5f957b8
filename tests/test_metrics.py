"""GET /metrics from a real daemon, read back with prometheus_client's own text
parser; the watchdog and circuit readers against the shapes they may meet; and the
alert rules: well-formed, and naming only series and labels the daemon exposes."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from daemon.observe.metrics import circuit_state, count_tasks
from daemon.observe.section_metrics import budget_metrics, lag_histogram, watchdog_metrics
from daemon.watchdog.tasks import TaskRegistry
from tests.daemon_proc import DaemonProcess, sim_config

StartDaemon = Callable[..., DaemonProcess]
ALERTS = Path(__file__).parent.parent / "config" / "alerts.yml"
JOB = {"analyzer": "summarize", "input": {"text": "a good day"}}
CLASSIFY = {"analyzer": "classify", "input": {"text": "a good day", "audience": "ops"}}
# The sim provider priced (input only, so a budget holds no job before its first call)
# with roomy budgets, and summarize's day too small for any of its calls.
PRICED_BUDGETS = """
[providers.sim.prices]
prompt_per_mtok = 1000.0

[providers.sim.budget]
daily_usd = 100.0
monthly_usd = 1000.0

[analyzers.summarize.budget]
daily_usd = 0.01
"""
# A webhook nobody listens on: its series (pending, dead, ...) are exposed all the same.
WEBHOOK = """
[webhooks.hook]
url = "http://127.0.0.1:9/hook"
secret_env = "VIGIL_WEBHOOK_SECRET"
"""
BUDGET_ROW = {
    "scope": "provider",
    "name": "sim",
    "window": "day",
    "limit_usd": 5.0,
    "spent_usd": 3.5,
    "reserved_usd": 0.25,
    "remaining_usd": 1.25,
    "resets_at": 1_800_000_000.0,
    "held": True,
    "held_jobs": 7,
}
BUDGET_SERIES = {
    "limit_usd": "vigil_budget_limit_usd",
    "spent_usd": "vigil_budget_spent_usd",
    "reserved_usd": "vigil_budget_reserved_usd",
    "held": "vigil_budget_held",
    "held_jobs": "vigil_budget_held_jobs",
}
FULL_WATCHDOG = {
    "loop": {
        "lag_ms": {"p50": 1.0, "p99": 20.0, "max": 300.0, "window_s": 60},
        "blocked_count": 2,
        "blocked_seconds": 1.5,
    },
    "memory": {"rss_mb": 80.0, "growth_events": 1},
}


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


class Families:
    """Parsed exposition: sample values looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def value(self, name: str, /, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def names(self) -> set[str]:
        """Every series name a family stands for (`x_total`, `x_bucket`...), samples or not."""
        return {
            family.name + suffix
            for family in self.families.values()
            for suffix in _SUFFIXES.get(family.type, ("",))
        }

    def labels(self, name: str) -> set[str] | None:
        """The label names the samples of series `name` carry; None if it has none."""
        found = [dict(labels) for (sample, labels) in self.samples if sample == name]
        return set().union(*found) - {"le", "quantile"} if found else None


class _Fixed:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> Families:
    return Families(generate_latest(_Fixed(families)).decode())


async def scrape(daemon: DaemonProcess) -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    url = await anyio.to_thread.run_sync(daemon.http_url)
    async with aiohttp.ClientSession(url) as session, session.get("/metrics") as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


@pytest.mark.anyio
async def test_metrics_carry_the_expected_series(start_daemon: StartDaemon) -> None:
    """After three jobs ran over HTTP, the text parses and holds the job, API, store,
    process and HTTP series with the right values."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0"), env={"VIGIL_HTTP_TOKEN": ""})
    url = await anyio.to_thread.run_sync(proc.http_url)
    async with aiohttp.ClientSession(url) as session:
        async with session.post("/v1/jobs", json=[JOB] * 3) as r:
            assert r.status == 202
        async with session.request("PROPFIND", "/status") as r:  # a method not in the set
            assert r.status == 405
    await proc.wait_for_status(lambda s: s["queue"]["finished"] >= 3)  # after the hooks ran
    content_type, text = await scrape(proc)
    assert content_type.startswith("text/plain; version=0.0.4")
    m = Families(text)

    assert {m.value("vigil_jobs", state=s) for s in ("queued", "running", "failed")} == {0}
    assert m.value("vigil_jobs", state="succeeded") == 3
    assert m.value("vigil_jobs", state="canceled") == 0
    assert m.value("vigil_jobs_submitted_total", analyzer="summarize") == 3
    assert m.value("vigil_jobs_submitted_total", analyzer="classify") == 0  # configured: 0
    assert m.value("vigil_jobs_finished_total", analyzer="summarize", outcome="succeeded") == 3
    assert m.value("vigil_attempts_total", analyzer="summarize", outcome="succeeded") == 3
    assert m.value("vigil_job_duration_seconds_count", analyzer="summarize") == 3
    assert m.value("vigil_job_duration_seconds_sum", analyzer="summarize") > 0
    assert m.value("vigil_job_queue_wait_seconds_count", analyzer="summarize") == 3
    assert m.value("vigil_job_queue_wait_seconds_bucket", analyzer="summarize", le="+Inf") == 3

    assert m.value("vigil_api_requests_total", provider="sim", status="200") == 3
    assert m.value("vigil_api_request_duration_seconds_count", provider="sim") == 3
    assert m.value("vigil_api_request_duration_seconds_sum", provider="sim") > 0
    assert m.value("vigil_api_tokens_total", provider="sim", kind="prompt") > 0
    assert m.value("vigil_api_tokens_total", provider="sim", kind="completion") > 0
    assert m.value("vigil_api_rate_limited_total", provider="sim") == 0
    assert m.value("vigil_api_in_flight", provider="sim") == 0
    assert m.value("vigil_api_paused", provider="sim") == 0

    assert m.value("vigil_db_commit_duration_seconds_count") > 0
    assert m.value("vigil_db_commit_errors_total") == 0
    assert m.value("vigil_db_writable") == 1
    assert m.value("vigil_process_rss_bytes") > 10_000_000
    assert m.value("vigil_process_open_fds") > 3
    assert m.value("vigil_tasks") > 1
    assert (m.value("vigil_live"), m.value("vigil_ready")) == (1, 1)
    assert m.value("vigil_log_lines_dropped_total") == 0
    assert m.value("vigil_log_write_errors_total") == 0
    assert (await proc.acall("status"))["logs"] == {"failed_writes": 0, "dropped_lines": 0}
    assert m.value("vigil_queue_max_backlog") == 1_000_000
    assert m.value("vigil_http_requests_total", route="/v1/jobs", method="POST", status="202") == 1
    assert (
        m.value("vigil_http_requests_total", route="unmatched", method="other", status="405") == 1
    )
    assert "PROPFIND" not in text  # labels come from bounded sets, not from the client
    if "circuit" in (await proc.acall("status"))["providers"]["sim"]:
        assert m.value("vigil_api_circuit_state", provider="sim", state="closed") == 1
        assert m.value("vigil_api_circuit_open", provider="sim") == 0
    if "watchdog" in await proc.acall("status"):  # the watchdog's own figures, when it runs
        assert m.value("vigil_loop_blocked_total") >= 0
        assert m.families["vigil_loop_lag_seconds"].type == "histogram"


@pytest.mark.anyio
async def test_metrics_follow_backpressure_and_pause(start_daemon: StartDaemon) -> None:
    """A paused daemon with a full backlog shows it: paused, not ready, backlog check down."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0", max_backlog=2))
    await proc.acall("pause")
    await proc.acall("submit", jobs=[JOB, JOB])
    m = Families((await scrape(proc))[1])
    assert m.value("vigil_queue_paused") == 1
    assert m.value("vigil_jobs", state="queued") == 2
    assert m.value("vigil_ready") == 0 and m.value("vigil_live") == 1
    assert m.value("vigil_health_check", check="backlog") == 0
    assert m.value("vigil_health_check", check="store") == 1


@pytest.mark.anyio
async def test_cancels_count_as_finished_and_a_running_one_as_an_attempt(
    start_daemon: StartDaemon,
) -> None:
    """A canceled job is a final state in the finished totals; canceling a running job
    also ends its attempt as `canceled`."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0", latency_ms=3000))
    running = await proc.acall("submit", jobs=[JOB])
    await proc.wait_for_status(lambda s: s["queue"]["active"] == 1)
    await proc.acall("pause")
    queued = await proc.acall("submit", jobs=[CLASSIFY])
    for job_id in (*running["ids"], *queued["ids"]):
        await proc.acall("cancel", id=job_id)
    await proc.wait_for_status(lambda s: s["jobs"]["canceled"] == 2)
    m = Families((await scrape(proc))[1])
    assert m.value("vigil_jobs_finished_total", analyzer="summarize", outcome="canceled") == 1
    assert m.value("vigil_jobs_finished_total", analyzer="classify", outcome="canceled") == 1
    assert m.value("vigil_attempts_total", analyzer="summarize", outcome="canceled") == 1
    assert m.value("vigil_jobs", state="canceled") == 2


@pytest.mark.anyio
async def test_submitted_totals_count_every_intake_by_analyzer(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Jobs committed through the socket, HTTP and the spool are counted by analyzer;
    a repeated idempotency key and a refused batch are not."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spool = (
        f'[intake.spool]\ndir = "{inbox}"\nanalyzer = "summarize"\npoll_s = 0.05\nsettle_s = 0\n'
    )
    proc = start_daemon(
        sim_config(http_listen="127.0.0.1:0", extra=spool), env={"VIGIL_HTTP_TOKEN": ""}
    )
    keyed = {**JOB, "idempotency_key": "once"}
    await proc.acall("submit", jobs=[JOB, CLASSIFY, keyed])
    await proc.acall("submit", jobs=[keyed])
    refused = await anyio.to_thread.run_sync(
        lambda: proc.request("submit", jobs=[JOB, {"analyzer": "nope", "input": {}}])
    )
    assert not refused["ok"]
    url = await anyio.to_thread.run_sync(proc.http_url)
    async with (
        aiohttp.ClientSession(url) as session,
        session.post("/v1/jobs", json=[CLASSIFY, CLASSIFY]) as r,
    ):
        assert r.status == 202
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("a.txt", "b.txt"):
        (staging / name).write_text("a spooled day")
        os.rename(staging / name, inbox / name)  # whole files only, as a producer should
    await proc.wait_for_status(lambda s: s["queue"]["accepted"] >= 7)
    m = Families((await scrape(proc))[1])
    assert m.value("vigil_jobs_submitted_total", analyzer="summarize") == 4
    assert m.value("vigil_jobs_submitted_total", analyzer="classify") == 3
    assert sum((await proc.acall("status"))["jobs"].values()) == 7  # what the store holds


@pytest.mark.anyio
async def test_task_gauge_follows_running_attempts(start_daemon: StartDaemon) -> None:
    """vigil_tasks counts the tasks made after start-up: twenty attempts waiting on a
    slow API add at least twenty."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0", latency_ms=3000))
    before = Families((await scrape(proc))[1]).value("vigil_tasks")
    await proc.acall("submit", jobs=[JOB] * 20)
    await proc.wait_for_status(lambda s: s["queue"]["active"] == 20)
    assert Families((await scrape(proc))[1]).value("vigil_tasks") >= before + 20


def _no_walk(*_: Any) -> Any:
    raise AssertionError("asyncio.all_tasks() walked on a scrape")


@pytest.mark.anyio
async def test_task_count_reads_the_watchdog_registry() -> None:
    """While the watchdog's registry is the loop's task factory, the count is its size
    and no task is walked; otherwise every task is."""
    registry = TaskRegistry()
    assert count_tasks(registry) == count_tasks(None) == len(asyncio.all_tasks())
    with registry.installed(asyncio.get_running_loop()):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(anyio.sleep_forever)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(asyncio, "all_tasks", _no_walk)
                counted = count_tasks(registry)
            assert counted == registry.alive >= len(asyncio.all_tasks()) >= 6
            tg.cancel_scope.cancel()


# -- alert rules -------------------------------------------------------------------------

RULE_KEYS = ("expr", "for", "labels", "annotations")
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_PLAIN_START = set("-?:,[]{}#&*!|>'\"%@`")  # indicators a plain YAML scalar cannot start with


@dataclass
class Rule:
    alert: str
    fields: dict[str, str] = field(default_factory=dict)  # expr, for
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def yaml_scalar(text: str, where: str) -> str:
    """A double-quoted or plain scalar, as YAML reads it (escapes beyond JSON's are
    refused: the file needs none)."""
    if text.startswith('"'):
        value = json.loads(text)
        assert isinstance(value, str), where
        return value
    assert text[0] not in _PLAIN_START and ": " not in text and " #" not in text, where
    return text


def flow_mapping(text: str, where: str) -> dict[str, str]:
    """`{key: value, ...}` of plain scalars."""
    inner = re.fullmatch(r"\{(.*)\}", text)
    assert inner, where
    pairs = [item.split(": ", 1) for item in inner[1].split(", ")]
    assert all(len(pair) == 2 for pair in pairs), where
    return {key: yaml_scalar(value, where) for key, value in pairs}


def block_scalar(lines: list[str]) -> str:
    """A `|` block scalar: indentation of its first line removed, one final newline."""
    while lines and not lines[-1].strip():
        lines.pop()
    indent = len(lines[0]) - len(lines[0].lstrip(" "))
    return "".join(line[indent:] + "\n" for line in lines)


def read_rules(text: str) -> tuple[list[str], list[Rule]]:
    """Group names and alerting rules from Prometheus rule YAML laid out as alerts.yml
    is (PyYAML is not a dependency). Strict: a line out of that layout, a tab, a
    repeated key or a scalar YAML would read otherwise fails."""
    groups: list[str] = []
    rules: list[Rule] = []
    seen_groups = in_rules = False
    section: dict[str, str] | None = None  # the rule's labels or annotations, being read
    block: tuple[str, list[str]] | None = None  # a `key: |` scalar, being read
    for number, line in enumerate([*text.splitlines(), "#"], 1):
        where = f"alerts.yml line {number}: {line!r}"
        assert "\t" not in line, where
        indent = len(line) - len(line.lstrip(" "))
        if block is not None:
            if not line.strip() or indent > 8:
                block[1].append(line)
                continue
            rules[-1].fields[block[0]] = block_scalar(block[1])
            block = None
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if (indent, line) == (0, "groups:") and not seen_groups:
            seen_groups = True
        elif indent == 2 and seen_groups and (m := re.fullmatch(r" *- name: (.+)", line)):
            groups.append(yaml_scalar(m[1], where))
            in_rules = False
        elif (indent, line.strip()) == (4, "rules:") and groups and not in_rules:
            in_rules = True
        elif indent == 6 and in_rules and (m := re.fullmatch(r" *- alert: (.+)", line)):
            rules.append(Rule(yaml_scalar(m[1], where)))
            section = None
        elif indent == 8 and rules and (m := re.fullmatch(r" *(\w+):(?: (.+))?", line)):
            key, value, rule = m[1], m[2], rules[-1]
            assert key in RULE_KEYS and key not in rule.fields, where
            section = None
            if key in ("labels", "annotations"):
                target = getattr(rule, key)
                assert not target, where
                if value is None:
                    section = target
                else:
                    target.update(flow_mapping(value, where))
            elif value == "|":
                block = (key, [])
            else:
                assert value is not None, where
                rule.fields[key] = yaml_scalar(value, where)
        elif indent == 10 and section is not None and (m := re.fullmatch(r" *(\w+): (.+)", line)):
            assert m[1] not in section, where
            section[m[1]] = yaml_scalar(m[2], where)
        else:
            raise AssertionError(f"unexpected: {where}")
    return groups, rules


def balanced(expr: str) -> bool:
    """Brackets pair up outside quoted strings."""
    stack: list[str] = []
    for char in QUOTED.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in ")]}" and (not stack or stack.pop() + char not in ("()", "[]", "{}")):
            return False
    return not stack and expr.count('"') % 2 == 0


def test_alert_rules_are_well_formed() -> None:
    """config/alerts.yml reads as Prometheus rule YAML: one group of uniquely named
    alerts, each with a balanced expr, valid durations, a severity, a summary and a
    description."""
    groups, rules = read_rules(ALERTS.read_text())
    assert groups == ["vigil"]
    names = [rule.alert for rule in rules]
    assert len(set(names)) == len(names), names
    for alert in ("VigilLoopBlocked", "VigilMemoryGrowth", "VigilBacklogNearFull"):
        assert alert in names
    for alert in ("VigilProviderPaused", "VigilProviderCircuitOpen", "VigilAttemptErrorRate"):
        assert alert in names
    for alert in ("VigilBudgetNearlySpent", "VigilBudgetExhausted"):
        assert alert in names
    for rule in rules:
        expr = rule.fields["expr"]
        assert balanced(expr), rule.alert
        durations = re.findall(r"\[([^\]]*)\]", QUOTED.sub('""', expr))
        for duration in [*durations, *([rule.fields["for"]] if "for" in rule.fields else [])]:
            assert DURATION.fullmatch(duration), (rule.alert, duration)
        assert rule.labels.get("severity") in ("warning", "critical"), rule.alert
        assert {"summary", "description"} <= rule.annotations.keys(), rule.alert
        for text in rule.annotations.values():
            assert text.count("{{") == text.count("}}"), rule.alert


def test_rule_reader_refuses_what_yaml_would_read_otherwise() -> None:
    """The reader is strict: a bad indent, an unknown key or an expr YAML would not
    read as written fails it."""
    good = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n"
    assert read_rules(good)[1][0].fields == {"expr": "up == 0"}
    for bad in (
        good.replace("        expr", "       expr"),
        good.replace("expr:", "exp:"),
        good.replace("up == 0", "{job: x}"),
        good.replace("up == 0", "up == 0 # comment"),
        good + "        expr: up\n",
        good.replace("  ", "\t", 1),
    ):
        with pytest.raises(AssertionError):
            read_rules(bad)


@pytest.mark.anyio
async def test_alert_rules_name_only_exposed_series(start_daemon: StartDaemon) -> None:
    """Every vigil_ series alerts.yml names is in a real scrape (after a job ran and with
    budgets configured, so the labelled ones have samples), and so is each label an expr
    matches or groups by: a rule on a misspelt series or label would never fire."""
    proc = start_daemon(
        sim_config(http_listen="127.0.0.1:0", extra=PRICED_BUDGETS + WEBHOOK),
        env={"VIGIL_WEBHOOK_SECRET": "metrics-test-secret-0123"},
    )
    await proc.acall("submit", jobs=[CLASSIFY])  # summarize's budget would hold a JOB
    await proc.wait_for_status(lambda s: s["queue"]["finished"] == 1)
    m = Families((await scrape(proc))[1])
    _, rules = read_rules(ALERTS.read_text())
    for rule in rules:
        expr = QUOTED.sub('""', rule.fields["expr"])
        named = " ".join([expr, *rule.annotations.values()])
        labels = {name: m.labels(name) for name in re.findall(r"\bvigil_[a-z0-9_]+", named)}
        missing = sorted(name for name, found in labels.items() if found is None)
        assert not missing, f"{rule.alert}: {missing} not in /metrics"
        for name, matchers in re.findall(r"\b(vigil_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in (labels[name] or ()), (rule.alert, name, label)
        in_expr = [found or set() for name, found in labels.items() if name in expr]
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in {x.strip() for x in grouping.split(",")} - {"instance", "job"}:
                assert all(label in found for found in in_expr), (rule.alert, label)


def test_watchdog_figures_are_read_defensively() -> None:
    """Figures the watchdog offers become series (ms to s); odd or missing ones do not,
    and never raise."""
    m = render(watchdog_metrics(FULL_WATCHDOG))
    assert m.value("vigil_loop_lag_p50_seconds") == pytest.approx(0.001)
    assert m.value("vigil_loop_lag_p99_seconds") == pytest.approx(0.02)
    assert m.value("vigil_loop_lag_max_seconds") == pytest.approx(0.3)
    assert m.value("vigil_loop_blocked_total") == 2
    assert m.value("vigil_loop_blocked_seconds_total") == 1.5
    assert m.value("vigil_memory_growth_events_total") == 1
    odd_shapes: list[Any] = [{}, None, [], "x", {"loop": "busy"}, {"loop": {"lag_ms": [1, 2]}}]
    for odd in odd_shapes:
        assert list(watchdog_metrics(odd)) == []


def test_circuit_state_is_read_defensively() -> None:
    """The breaker state is taken from a string or a {"state": ...} mapping, else None."""
    assert circuit_state({"circuit": "open"}) == "open"
    assert circuit_state({"circuit": {"state": "half-open", "failures": 3}}) == "half_open"
    assert circuit_state({"breaker": "closed"}) == "closed"
    assert circuit_state({}) is None
    assert circuit_state({"circuit": 5}) is None


def test_lag_histogram_is_cumulative_and_defensive() -> None:
    """Per-bucket lag counts become a cumulative histogram in seconds; a shape that
    does not fit the bounds gives none."""
    lag = SimpleNamespace(buckets=[3, 0, 2, 1], count=6, sum_ms=700.0)
    histogram = lag_histogram(lag, (1.0, 10.0, 100.0))
    assert histogram is not None
    m = render([histogram])
    assert [m.value("vigil_loop_lag_seconds_bucket", le=le) for le in ("0.001", "0.01", "0.1")] == [
        3,
        3,
        5,
    ]
    assert m.value("vigil_loop_lag_seconds_bucket", le="+Inf") == 6
    assert m.value("vigil_loop_lag_seconds_count") == 6
    assert m.value("vigil_loop_lag_seconds_sum") == pytest.approx(0.7)
    assert lag_histogram(lag, (1.0, 10.0)) is None
    assert lag_histogram(SimpleNamespace(buckets=[1, 2]), (1.0,)) is None
    assert lag_histogram(None, (1.0,)) is None


@pytest.mark.anyio
async def test_budget_series_follow_the_spend_guard(start_daemon: StartDaemon) -> None:
    """Each budget's figures are gauges labelled scope/name/window, as status reports them."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0", extra=PRICED_BUDGETS))
    await proc.acall("submit", jobs=[CLASSIFY, JOB])
    status = await proc.wait_for_status(
        lambda s: (
            s["jobs"]["succeeded"] == 1
            and any(b["name"] == "summarize" and b["held_jobs"] == 1 for b in s["budgets"])
        )
    )
    m = Families((await scrape(proc))[1])
    rows = {(b["scope"], b["name"], b["window"]): b for b in status["budgets"]}
    assert set(rows) == {
        ("provider", "sim", "day"),
        ("provider", "sim", "month"),
        ("analyzer", "summarize", "day"),
    }
    for (scope, name, window), row in rows.items():
        labels = {"scope": scope, "name": name, "window": window}
        for key, series in BUDGET_SERIES.items():
            assert m.value(series, **labels) == pytest.approx(float(row[key])), (series, labels)
    summarize = {"scope": "analyzer", "name": "summarize", "window": "day"}
    assert m.value("vigil_budget_limit_usd", **summarize) == 0.01
    assert m.value("vigil_budget_held", **summarize) == 1
    assert m.value("vigil_budget_held_jobs", **summarize) == 1
    assert m.value("vigil_budget_held", scope="provider", name="sim", window="day") == 0
    assert m.value("vigil_budget_spent_usd", scope="provider", name="sim", window="month") > 0
    assert m.value("vigil_budget_refused_calls_total") >= 1
    for series in BUDGET_SERIES.values():
        assert m.families[series].type == "gauge"
        assert m.labels(series) == {"scope", "name", "window"}


@pytest.mark.anyio
async def test_no_budget_series_without_budgets(start_daemon: StartDaemon) -> None:
    """A daemon with no budgets exposes no budget samples and a refused-calls total of 0."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0"))
    m = Families((await scrape(proc))[1])
    assert all(m.labels(series) is None for series in BUDGET_SERIES.values())
    assert m.value("vigil_budget_refused_calls_total") == 0


def test_budget_rows_are_read_defensively() -> None:
    """Budget rows become samples (held as 1/0); odd rows or figures give none, never raise."""
    m = render(budget_metrics([BUDGET_ROW], 4))
    labels = {"scope": "provider", "name": "sim", "window": "day"}
    values = [m.value(series, **labels) for series in BUDGET_SERIES.values()]
    assert values == [5.0, 3.5, 0.25, 1.0, 7.0]
    assert m.value("vigil_budget_refused_calls_total") == 4
    partial = {**BUDGET_ROW, "held": False, "spent_usd": None, "reserved_usd": "x"}
    m = render(budget_metrics([partial], None))
    assert m.value("vigil_budget_held", **labels) == 0
    assert m.labels("vigil_budget_spent_usd") is m.labels("vigil_budget_reserved_usd") is None
    assert "vigil_budget_refused_calls" not in m.families
    odd_rows: list[Any] = [None, {}, "x", [None, 3, {"scope": "provider", "name": 5}]]
    for odd in odd_rows:
        families = list(budget_metrics(odd, None))
        assert families and all(not family.samples for family in families)

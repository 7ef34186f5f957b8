"""What `vigil bench throttle`'s records mean: the figures of the throughput scenarios
(utilisation of the API's limit, 429 share; the limits learned where Vigil was told
none), of the learning scenario (429s before and after the daemon learned a lower limit
from the API's headers) and of the overloaded one (529s met, nobody held back), the
method text each result carries, and the tables printed at the end. Pure functions of
what run.py recorded; the outage scenario's figures live with its run
(outage.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.bench.outage import OUTAGE_METHOD, outage_table
from daemon.cli import render

if TYPE_CHECKING:
    from daemon.bench.run import ApiSample, Run
    from daemon.bench.scenarios import Scenario

METHOD = (
    "The simulated API enforces each per-minute limit in one-second slices: its bucket "
    "holds at most one second of the limit (3000 RPM: 50 requests) and starts full. The "
    "window opens once the bucket holds no more than one second of refill, which with "
    "one-second slices is the first sample, before any request (a longer slice would "
    "have the bench feed jobs first until its extra burst is spent); then --jobs are "
    "submitted, and the window closes when no job is left waiting. achieved = what the "
    "API admitted in that window (requests, or tokens charged: prompt + max_tokens, as "
    "OpenAI counts them) per minute of the API's own clock; utilisation = admitted / "
    "(limit x window + what the bucket held when the window opened), so the slice's "
    "starting burst never counts in our favour. 429 share = the API's 429 answers / all "
    "requests it got, over the whole run. In Anthropic's dialect the API counts requests "
    "and input tokens (the prompt, 4 chars a token) at admission and output tokens from "
    "the answer; a request is admitted only while every budget has room (the output one: "
    "is not spent already)."
)
LEARNED_METHOD = (
    "Vigil is told no limits; the API enforces requests, input tokens and output tokens "
    "per minute in one-second slices and reports them in its anthropic-ratelimit-* "
    "headers. Warm-up: jobs are fed until the daemon's status shows every one of the "
    "API's limits learned (budgets.*.server_limit) and no cool-down left; the first "
    "answers (a 429 storm: up to max_concurrency = 64 requests sent at once, before any "
    "limit was known) fall in it and are reported apart. Then the window opens (the API "
    "sampled just before that status), --jobs more are submitted, and it closes when no "
    "job is left waiting. achieved = the input tokens the API charged in the window "
    "per minute of its clock; utilisation = charged / (ITPM x window + what its input "
    "bucket held when the window opened). 429 share = the API's 429 answers / the "
    "requests it got from the window's opening to the end of the run (the retries of "
    "the warm-up's 429s included). Target: utilisation and 429 share as given, and "
    "every limit learned at the API's value."
)
LEARN_METHOD = (
    "Vigil is configured 10 times above the API's real limit, every job is submitted "
    "at once, and each job has max_attempts = 3 (a 429 that cost an attempt would show "
    "as failed jobs). The bench reads the daemon's log every 10 ms and, the moment the "
    "first provider.limit_learned line shows, samples the API's /stats: requests and "
    "429s the API had counted by then are 'before learning', the rest of the run's are "
    "'after learning' (the API's own counters, so a request counts by when it reached "
    "the API; one reaching it in the lag_ms between the event and the sample would "
    "count as before, so the lag is reported). Target: every job succeeds, and 429s "
    "after learning <= 1 % of the requests after learning. Cross-checks from the "
    "daemon's database: daemon_429_rows = its attempt rows with outcome rate_limited "
    "(all 429s it met), daemon_429_rows_started_after = those whose attempt began after "
    "the event (sent after learning for certain: a lower bound of the 429s after, as "
    "an attempt claimed earlier may wait for budget past it). steady = requests the "
    "API admitted from that sample to the first sample (every 0.2 s) at which every "
    "job's request had been admitted, per minute of the API's clock; utilisation = "
    "admitted / (limit x span + what the API's bucket held at the first sample)."
)

OVERLOADED_METHOD = (
    "No rate limits; the API answers a seeded share of requests 529 overloaded_error at "
    "once (before its latency), and every job is submitted at once. A 529 spends no "
    "attempt and holds no other caller: the job retries with the queue's backoff "
    "(base 0.5 s, max 10 s). overloaded = the API's 529 answers (its own count) and "
    "Vigil's; cooldowns and circuit opened = the provider's counters in the daemon's "
    "status when every job was done; wall = from the submission to the first poll "
    "(every 0.2 s) at which every job was done. Target: every job succeeds, no "
    "cool-down, the circuit never opened."
)
NO_WINDOW = "no warm-up and no window: whole-run figures only"
METHODS = {
    "throughput": METHOD,
    "learned": LEARNED_METHOD,
    "learn": LEARN_METHOD,
    "outage": OUTAGE_METHOD,
    "overloaded": OVERLOADED_METHOD,
    "no window": NO_WINDOW,
}


def method_key(s: Scenario) -> str:
    """Which of METHODS a scenario's result carries."""
    if s.kind != "throughput":
        return s.kind
    if s.bound is None:
        return "no window"
    return "learned" if s.warm_up == "learned" else "throughput"


def learned_summary(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's provider.limit_learned events (what header sync adopted)."""
    keys = ("budget", "server_limit", "per_minute", "was")
    return [{k: event.get(k) for k in keys} for event in events]


def window(s: Scenario, a: ApiSample, b: ApiSample) -> dict[str, Any] | None:
    span = b.uptime_s - a.uptime_s
    if span <= 0:
        return None
    used = b.used(s.bound) - a.used(s.bound)
    left = a.left(s.bound) or 0
    capacity = s.api_limit * span / 60 + left
    return {
        "seconds": round(span, 2),
        "requests": b.requests - a.requests,
        "admitted": b.admitted - a.admitted,
        "tokens_charged": b.tokens_charged - a.tokens_charged,
        "input_tokens_charged": b.input_tokens_charged - a.input_tokens_charged,
        "output_tokens_charged": b.output_tokens_charged - a.output_tokens_charged,
        "rate_limited": b.rate_limited - a.rate_limited,
        "left_at_start": left,
        "achieved_per_minute": round(used / span * 60, 1),
        "utilisation": round(used / capacity, 4),
    }


def _learning(s: Scenario, run: Run) -> dict[str, Any] | None:
    """429s before and after the first learned limit, by the API's counters at that
    moment (see LEARN_METHOD), and the steady rate from then on."""
    mark, last = run.learned, run.last
    if mark is None or last is None:
        return None
    before = mark.sample
    after_requests = last.requests - before.requests
    after_429 = last.rate_limited - before.rate_limited
    limited = [row for row in run.db_attempts if row.outcome == "rate_limited"]
    return {
        "first_learned": learned_summary([mark.event])[0],
        "at_api_s": round(before.uptime_s, 3),
        "lag_ms": round((mark.sampled_at - mark.at) * 1000, 1),
        "before": {"requests": before.requests, "rate_limited": before.rate_limited},
        "after": {
            "requests": after_requests,
            "rate_limited": after_429,
            "share": round(after_429 / after_requests, 5) if after_requests else 0.0,
        },
        "daemon_429_rows": len(limited),
        "daemon_429_rows_started_after": sum(row.started_at > mark.at for row in limited),
        "steady": window(s, before, run.all_admitted) if run.all_admitted else None,
    }


def _rate_limited(s: Scenario, run: Run) -> dict[str, Any]:
    """The 429s judged: over the whole run, or (a learned warm-up) from the window's
    opening to the end of the run, the warm-up's storm reported apart."""
    last, start = run.last, run.window_start
    counted = "whole run"
    requests = last.requests if last else 0
    limited = last.rate_limited if last else 0
    if s.warm_up == "learned" and last is not None and start is not None:
        counted = "after warm-up"
        requests -= start.requests
        limited -= start.rate_limited
    return {
        "counted": counted,
        "requests": requests,
        "rate_limited": limited,
        "share": round(limited / requests, 5) if requests else 0.0,
    }


def _learned_limits(s: Scenario, budgets: dict[str, Any]) -> dict[str, Any] | None:
    """The limits in force at the end for each budget the API enforces, where Vigil
    had to learn them (a learned warm-up)."""
    if s.warm_up != "learned":
        return None
    return {name: budgets.get(name, {}).get("per_minute") for name in s.api_limits}


def _all_succeeded(run: Run) -> bool:
    return run.jobs.get("succeeded") == run.submitted and not run.jobs.get("failed")


def _warm_up(start: ApiSample) -> dict[str, Any]:
    """What the API had seen when the window opened (its clock from its start)."""
    return {
        "at_api_s": round(start.uptime_s, 2),
        "requests": start.requests,
        "rate_limited": start.rate_limited,
    }


def summarize(
    s: Scenario, run: Run, learned: list[dict[str, Any]], host: dict[str, Any]
) -> dict[str, Any]:
    last, first = run.last, run.first
    win = None
    if run.window_start is not None and run.window_end is not None:
        win = window(s, run.window_start, run.window_end)
    limited = _rate_limited(s, run)
    share = limited["share"]
    p = run.provider
    budgets = p.get("budgets", {})
    limits = _learned_limits(s, budgets)
    met: bool | None = None
    target: dict[str, Any] = {"utilisation": s.target_utilisation, "max_429_share": s.max_429_share}
    learning = _learning(s, run) if s.kind == "learn" else None
    if s.kind == "learn":
        target = {"all_succeed": True, "max_429_share_after_learning": s.max_429_share}
        all_ok = _all_succeeded(run)
        met = (
            all_ok
            and learning is not None
            and learning["after"]["share"] <= (s.max_429_share or 0.0)
        )
    elif s.target_utilisation is not None and s.max_429_share is not None:
        met = win is not None and win["utilisation"] >= s.target_utilisation
        met = met and share <= s.max_429_share
        if limits is not None:
            target["learned"] = s.api_limits
            met = met and limits == s.api_limits
    span = last.uptime_s - first.uptime_s if last and first else 0.0
    start = run.window_start
    return {
        "scenario": s.name,
        "kind": s.kind,
        "about": s.about,
        "dialect": s.dialect,
        "bound": s.bound,
        "api_limit_per_minute": s.api_limit,
        "vigil_limit_per_minute": s.vigil_limit,
        "api_limits": s.api_limits,
        "vigil_limits": s.vigil_limits,
        "latency_ms": s.latency_ms,
        "jobs": {"submitted": run.submitted, **run.jobs},
        "warm_up": _warm_up(start) if start is not None else None,
        "window": win,
        "learning": learning,
        "learned_limits": limits,
        "rate_limited_share": share,
        "rate_limited_counted": limited,
        "target": target,
        "target_met": met,
        "whole_run": {
            "seconds": round(span, 2),
            "requests": last.requests if last else 0,
            "admitted": last.admitted if last else 0,
            "rate_limited": last.rate_limited if last else 0,
            "wall_s": round(run.wall_s, 2),
        },
        "vigil": {
            "rate_limited": p.get("rate_limited"),
            "cooldowns": p.get("cooldowns"),
            "p50_latency_ms": p.get("p50_latency_ms"),
            "p99_latency_ms": p.get("p99_latency_ms"),
            "budgets": {k: v.get("per_minute") for k, v in budgets.items()},
            "limit_learned": learned_summary(learned),
            "attempts": run.attempts,
            "retried": run.attempts.get("retried", 0),
        },
        "machine": host,
        "method": METHODS[method_key(s)],
    }


def summarize_overloaded(s: Scenario, run: Run, host: dict[str, Any]) -> dict[str, Any]:
    """A 529 storm (OVERLOADED_METHOD): every job succeeded, and nothing held the
    account back (no cool-down, no open circuit)."""
    last, first = run.last, run.first
    p = run.provider
    circuit = p.get("circuit", {})
    all_ok = _all_succeeded(run)
    cooldowns, opened = p.get("cooldowns"), circuit.get("opened")
    return {
        "scenario": s.name,
        "kind": s.kind,
        "about": s.about,
        "dialect": s.dialect,
        "overload_rate": s.overload_rate,
        "latency_ms": s.latency_ms,
        "jobs": {"submitted": run.submitted, **run.jobs},
        "api": {
            "requests": last.requests if last else 0,
            "overloaded": last.overloaded if last else 0,
            "by_status": last.by_status if last else {},
            "seconds": round(last.uptime_s - first.uptime_s, 2) if last and first else 0.0,
        },
        "vigil": {
            "overloaded": p.get("overloaded"),
            "rate_limited": p.get("rate_limited"),
            "cooldowns": cooldowns,
            "circuit_opened": opened,
            "circuit": circuit.get("state"),
            "concurrency_limit": p.get("concurrency_limit"),
            "attempts": run.attempts,
        },
        "wall_s": round(run.wall_s, 2),
        "target": {"all_succeed": True, "cooldowns": 0, "circuit_opened": 0},
        "target_met": all_ok and cooldowns == 0 and opened == 0,
        "machine": host,
        "method": OVERLOADED_METHOD,
    }


_MET = {True: "yes", False: "NO", None: "-"}


def _throughput_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        w = r["window"] or {}
        target, bound = r["target"], r["bound"]
        learned = (r.get("learned_limits") or {}).get(bound)
        vigil = f"none, learned {learned:,}" if learned else f"{r['vigil_limit_per_minute']:,}"
        limited = r["rate_limited_counted"]
        after = " after warm-up" if limited["counted"] == "after warm-up" else ""
        rows.append(
            [
                r["scenario"],
                bound.replace("_", " ") if bound else "-",
                f"{r['api_limit_per_minute']:,}" if r["api_limit_per_minute"] else "-",
                vigil if r["vigil_limit_per_minute"] or learned else "-",
                f"{w['seconds']:.1f}" if w else "-",
                f"{w['admitted']:,}" if w else "-",
                f"{w['achieved_per_minute']:,.0f}" if w else "-",
                f"{w['utilisation']:.2%}" if w else "-",
                f">= {target['utilisation']:.0%}" if target["utilisation"] else "-",
                f"{r['rate_limited_share']:.3%}",
                f"{limited['rate_limited']} of {limited['requests']:,}{after}",
                f"<= {target['max_429_share']:.1%}" if target["max_429_share"] else "-",
                _MET[r["target_met"]],
            ]
        )
    headers = ["scenario", "bound", "api limit/min", "vigil limit/min", "window s"]
    headers += ["admitted", "achieved/min", "utilisation", "target", "429 share", "429s"]
    headers += ["max", "met"]
    render.table(headers, rows)


def _learn_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        learning = r["learning"] or {}
        before, after = learning.get("before", {}), learning.get("after", {})
        steady = learning.get("steady") or {}
        jobs = r["jobs"]
        rows.append(
            [
                r["scenario"],
                f"{r['api_limit_per_minute']} / {r['vigil_limit_per_minute']}",
                f"{jobs.get('succeeded', 0)} / {jobs.get('failed', 0)} of {jobs['submitted']}",
                f"{before.get('rate_limited', '-')} of {before.get('requests', '-')}",
                f"{after.get('rate_limited', '-')} of {after.get('requests', '-')}",
                f"{after['share']:.2%}" if after else "-",
                f"<= {r['target']['max_429_share_after_learning']:.0%}",
                f"{steady['achieved_per_minute']:.1f}" if steady else "-",
                f"{steady['utilisation']:.2%}" if steady else "-",
                _MET[r["target_met"]],
            ]
        )
    headers = ["scenario", "api/vigil rpm", "ok / failed", "429 before learning"]
    headers += ["429 after", "share after", "max", "steady rpm", "utilisation", "met"]
    render.table(headers, rows)


def _overloaded_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        jobs, api, vigil = r["jobs"], r["api"], r["vigil"]
        rows.append(
            [
                r["scenario"],
                f"{r['overload_rate']:.0%}",
                f"{jobs.get('succeeded', 0)} / {jobs.get('failed', 0)} of {jobs['submitted']}",
                api["requests"],
                api["overloaded"],
                vigil["overloaded"],
                vigil["cooldowns"],
                vigil["circuit_opened"],
                f"{r['wall_s']:.1f}",
                _MET[r["target_met"]],
            ]
        )
    headers = ["scenario", "overload rate", "ok / failed", "api requests", "api 529s"]
    headers += ["vigil overloaded", "cool-downs", "circuit opened", "wall s", "met"]
    render.table(headers, rows)


def report(results: list[dict[str, Any]]) -> None:
    """One table per kind of scenario, in the order the kinds first ran."""
    tables = {
        "throughput": _throughput_table,
        "learn": _learn_table,
        "outage": outage_table,
        "overloaded": _overloaded_table,
    }
    kinds = dict.fromkeys(r["kind"] for r in results)
    for i, kind in enumerate(kinds):
        if i:
            print()
        tables[kind]([r for r in results if r["kind"] == kind])

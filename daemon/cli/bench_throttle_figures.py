"""What `vigil bench throttle`'s records mean: the figures of the throughput scenarios
(utilisation of the API's limit, 429 share) and of the learning scenario (429s before
and after the daemon learned a lower limit from the API's headers), the method text
each result carries, and the tables printed at the end. Pure functions of what
bench_run recorded; the outage scenario's figures live with its run (bench_outage.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.cli import render
from daemon.cli.bench_outage import OUTAGE_METHOD, outage_table

if TYPE_CHECKING:
    from daemon.cli.bench import Scenario
    from daemon.cli.bench_run import ApiSample, Run

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
    "requests it got, over the whole run."
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

METHODS = {"throughput": METHOD, "learn": LEARN_METHOD, "outage": OUTAGE_METHOD}


def learned_summary(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's provider.limit_learned events (what header sync adopted)."""
    keys = ("budget", "server_limit", "per_minute", "was")
    return [{k: event.get(k) for k in keys} for event in events]


def window(s: Scenario, a: ApiSample, b: ApiSample) -> dict[str, Any] | None:
    span = b.uptime_s - a.uptime_s
    if span <= 0:
        return None
    tokens = s.bound == "tokens"
    used = b.tokens_charged - a.tokens_charged if tokens else b.admitted - a.admitted
    left = (a.remaining_tokens if tokens else a.remaining_requests) or 0
    capacity = s.api_limit * span / 60 + left
    return {
        "seconds": round(span, 2),
        "requests": b.requests - a.requests,
        "admitted": b.admitted - a.admitted,
        "tokens_charged": b.tokens_charged - a.tokens_charged,
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


def summarize(
    s: Scenario, run: Run, learned: list[dict[str, Any]], host: dict[str, Any]
) -> dict[str, Any]:
    last, first = run.last, run.first
    win = None
    if run.window_start is not None and run.window_end is not None:
        win = window(s, run.window_start, run.window_end)
    requests = last.requests if last else 0
    share = (last.rate_limited / requests) if last and requests else 0.0
    met: bool | None = None
    target: dict[str, Any] = {"utilisation": s.target_utilisation, "max_429_share": s.max_429_share}
    learning = _learning(s, run) if s.kind == "learn" else None
    if s.kind == "learn":
        target = {"all_succeed": True, "max_429_share_after_learning": s.max_429_share}
        all_ok = run.jobs.get("succeeded") == run.submitted and not run.jobs.get("failed")
        met = (
            all_ok
            and learning is not None
            and learning["after"]["share"] <= (s.max_429_share or 0.0)
        )
    elif s.target_utilisation is not None and s.max_429_share is not None:
        met = win is not None and win["utilisation"] >= s.target_utilisation
        met = met and share <= s.max_429_share
    span = last.uptime_s - first.uptime_s if last and first else 0.0
    p = run.provider
    budgets = p.get("budgets", {})
    return {
        "scenario": s.name,
        "kind": s.kind,
        "about": s.about,
        "bound": s.bound,
        "api_limit_per_minute": s.api_limit,
        "vigil_limit_per_minute": s.vigil_limit,
        "latency_ms": s.latency_ms,
        "jobs": {"submitted": run.submitted, **run.jobs},
        "window": win,
        "learning": learning,
        "rate_limited_share": round(share, 5),
        "target": target,
        "target_met": met,
        "whole_run": {
            "seconds": round(span, 2),
            "requests": requests,
            "admitted": last.admitted if last else 0,
            "rate_limited": last.rate_limited if last else 0,
            "wall_s": round(run.wall_s, 2),
        },
        "vigil": {
            "rate_limited": p.get("rate_limited"),
            "p50_latency_ms": p.get("p50_latency_ms"),
            "p99_latency_ms": p.get("p99_latency_ms"),
            "budgets": {k: v.get("per_minute") for k, v in budgets.items()},
            "limit_learned": learned_summary(learned),
            "attempts": run.attempts,
            "retried": run.attempts.get("retried", 0),
        },
        "machine": host,
        "method": METHODS[s.kind] if s.bound or s.kind != "throughput" else _NO_WINDOW,
    }


_NO_WINDOW = "no warm-up and no window: whole-run figures only"
_MET = {True: "yes", False: "NO", None: "-"}


def _throughput_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        w = r["window"] or {}
        target = r["target"]
        rows.append(
            [
                r["scenario"],
                r["api_limit_per_minute"] or "-",
                r["vigil_limit_per_minute"] or "-",
                f"{w['seconds']:.1f}" if w else "-",
                w.get("admitted", "-"),
                f"{w['achieved_per_minute']:,.0f}" if w else "-",
                f"{w['utilisation']:.2%}" if w else "-",
                f">= {target['utilisation']:.0%}" if target["utilisation"] else "-",
                f"{r['rate_limited_share']:.3%}",
                f"<= {target['max_429_share']:.1%}" if target["max_429_share"] else "-",
                _MET[r["target_met"]],
            ]
        )
    headers = ["scenario", "api limit/min", "vigil limit/min", "window s", "admitted"]
    headers += ["achieved/min", "utilisation", "target", "429 share", "max", "met"]
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


def report(results: list[dict[str, Any]]) -> None:
    """One table per kind of scenario, in the order the kinds first ran."""
    tables = {"throughput": _throughput_table, "learn": _learn_table, "outage": outage_table}
    kinds = dict.fromkeys(r["kind"] for r in results)
    for i, kind in enumerate(kinds):
        if i:
            print()
        tables[kind]([r for r in results if r["kind"] == kind])

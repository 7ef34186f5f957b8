"""Metrics read from other components' parts of `status` (the watchdog's section,
the spend guard's budgets). Those parts are not this module's, so they are read
defensively: a figure that is missing or of an odd shape gives no sample, never an
error on a scrape."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Where the watchdog's status section keeps each figure. The section is another
# component's, so it is read defensively: a figure that is missing gives no series.
_LAG_PATHS = {q: ("loop", "lag_ms", q) for q in ("p50", "p99", "max")}
_BLOCKED_COUNT_PATH = ("loop", "blocked_count")
_BLOCKED_SECONDS_PATH = ("loop", "blocked_seconds")
_GROWTH_EVENTS_PATH = ("memory", "growth_events")


def number(value: Any) -> float | None:
    """A status figure as a float (a flag as 0 or 1); None if it is not a number."""
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def lookup(data: Any, path: tuple[str, ...]) -> float | None:
    """The number at `path` in nested mappings, if there is one."""
    for key in path:
        data = data.get(key) if isinstance(data, Mapping) else None
    return number(data)


def watchdog_metrics(data: Any) -> Iterator[Metric]:
    """Loop lag, blocked-loop and memory-growth figures from the watchdog's status
    section, those it offers (milliseconds there, seconds here)."""
    for which, path in _LAG_PATHS.items():
        lag_ms = lookup(data, path)
        if lag_ms is not None:
            yield GaugeMetricFamily(
                f"vigil_loop_lag_{which}_seconds",
                f"Event loop lag, {which} over the watchdog's recent window.",
                lag_ms / 1000,
            )
    blocked = lookup(data, _BLOCKED_COUNT_PATH)
    if blocked is not None:
        yield CounterMetricFamily(
            "vigil_loop_blocked", "Times the event loop was seen blocked.", blocked
        )
    blocked_s = lookup(data, _BLOCKED_SECONDS_PATH)
    if blocked_s is not None:
        yield CounterMetricFamily(
            "vigil_loop_blocked_seconds", "Total time the event loop was blocked.", blocked_s
        )
    growth = lookup(data, _GROWTH_EVENTS_PATH)
    if growth is not None:
        yield CounterMetricFamily(
            "vigil_memory_growth_events",
            "Times RSS grew past the watchdog's threshold (it then traces allocations).",
            growth,
        )


def lag_histogram(lag: Any, bounds_ms: Sequence[float]) -> Metric | None:
    """The watchdog's cumulative loop-lag histogram (`buckets`: a count per bound in
    `bounds_ms`, then one for beyond; `sum_ms`), if `lag` keeps one of that shape."""
    buckets = getattr(lag, "buckets", None)
    sum_ms = number(getattr(lag, "sum_ms", None))
    if (
        not isinstance(buckets, list)
        or len(buckets) != len(bounds_ms) + 1
        or not all(isinstance(n, int) for n in buckets)
        or sum_ms is None
    ):
        return None
    cumulative = list(itertools.accumulate(buckets))
    pairs = [
        (f"{bound / 1000:g}", float(n)) for bound, n in zip(bounds_ms, cumulative[:-1], strict=True)
    ]
    pairs.append(("+Inf", float(cumulative[-1])))
    return HistogramMetricFamily(
        "vigil_loop_lag_seconds",
        "Event loop lag since start (how late the watchdog's ticks ran).",
        buckets=pairs,
        sum_value=sum_ms / 1000,
    )


def lag_bounds_ms() -> Sequence[float] | None:
    """The watchdog's bucket bounds; looked up by name, as the watchdog may be absent."""
    try:
        module = importlib.import_module("daemon.watchdog.loop")
    except ImportError:
        return None
    bounds = getattr(module, "LAG_BUCKETS_MS", None)
    return bounds if isinstance(bounds, tuple) else None


# The spend guard's status rows (`status["budgets"]`): each figure's series.
BUDGET_LABELS = ("scope", "name", "window")
BUDGET_GAUGES = {
    "limit_usd": ("vigil_budget_limit_usd", "The budget: USD allowed in its window."),
    "spent_usd": ("vigil_budget_spent_usd", "USD spent in the window so far (all nodes)."),
    "reserved_usd": (
        "vigil_budget_reserved_usd",
        "USD reserved by calls in flight (their worst-case cost).",
    ),
    "held": (
        "vigil_budget_held",
        "1 while the budget is reached: its jobs' calls are refused until the window "
        "resets or a reload raises it.",
    ),
    "held_jobs": ("vigil_budget_held_jobs", "Queued jobs the reached budget holds."),
}


def budget_metrics(rows: Any, refused: Any) -> Iterator[Metric]:
    """One gauge sample per budget and figure from the budgets' status rows (scope,
    name and window as labels), and the count of calls the budgets refused."""
    families = {
        key: GaugeMetricFamily(name, text, labels=list(BUDGET_LABELS))
        for key, (name, text) in BUDGET_GAUGES.items()
    }
    for row in rows if isinstance(rows, list) else ():
        if not isinstance(row, Mapping):
            continue
        labels = [label for key in BUDGET_LABELS if isinstance(label := row.get(key), str)]
        if len(labels) < len(BUDGET_LABELS):
            continue
        for key, family in families.items():
            value = number(row.get(key))
            if value is not None:
                family.add_metric(labels, value)
    yield from families.values()
    total = number(refused)
    if total is not None:
        yield CounterMetricFamily(
            "vigil_budget_refused_calls",
            "Calls not made because their worst-case cost would pass a budget.",
            total,
        )


def retention_metrics(data: Any) -> Iterator[Metric]:
    """Jobs retention deleted, by the state they ended in (the `retention` section)."""
    deleted = data.get("deleted") if isinstance(data, Mapping) else None
    if not isinstance(deleted, Mapping):
        return
    family = CounterMetricFamily(
        "vigil_retention_deleted",
        "Finished jobs deleted by retention ([retention], queue.retain_finished_s), by state.",
        labels=["state"],
    )
    for state, n in deleted.items():
        value = number(n)
        if isinstance(state, str) and value is not None:
            family.add_metric([state], value)
    yield family


# The webhook sender's status rows (`status["webhooks"]`, by name): each gauge's figure.
WEBHOOK_GAUGES = {
    "pending": ("vigil_webhook_pending", "Deliveries waiting to go out (the store's, all nodes)."),
    "dead": (
        "vigil_webhook_dead",
        "Dead-lettered deliveries (`vigil webhooks retry NAME` sends them again).",
    ),
    "oldest_pending_age_s": (
        "vigil_webhook_oldest_pending_seconds",
        "Age of the oldest delivery still waiting to go out (0 when none waits).",
    ),
    "in_flight": ("vigil_webhook_in_flight", "Deliveries being POSTed now by this daemon."),
}


def webhook_metrics(data: Any) -> Iterator[Metric]:
    """Per webhook (label `webhook`): pending, dead, oldest pending age and in-flight
    gauges, delivery attempts by outcome and dead-letterings since start."""
    gauges = {
        key: GaugeMetricFamily(name, text, labels=["webhook"])
        for key, (name, text) in WEBHOOK_GAUGES.items()
    }
    attempts = CounterMetricFamily(
        "vigil_webhook_deliveries",
        "Delivery attempts by outcome: delivered (a 2xx) or failed (any other answer, a "
        "timeout, a refused connection).",
        labels=["webhook", "outcome"],
    )
    dead_lettered = CounterMetricFamily(
        "vigil_webhook_dead_lettered",
        "Deliveries dead-lettered after their last attempt failed.",
        labels=["webhook"],
    )
    rows = data if isinstance(data, Mapping) else {}
    for name, row in rows.items():
        if not isinstance(name, str) or not isinstance(row, Mapping):
            continue
        for key, family in gauges.items():
            value = 0.0 if key == "oldest_pending_age_s" and row.get(key) is None else row.get(key)
            if (figure := number(value)) is not None:
                family.add_metric([name], figure)
        for outcome in ("delivered", "failed"):
            if (figure := number(row.get(outcome))) is not None:
                attempts.add_metric([name, outcome], figure)
        if (figure := number(row.get("dead_lettered"))) is not None:
            dead_lettered.add_metric([name], figure)
    yield from gauges.values()
    yield from (attempts, dead_lettered)

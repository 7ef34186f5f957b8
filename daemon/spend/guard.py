"""The spend guard: a call whose worst-case cost would pass a budget is not made.

Before each call its worst-case cost (`pricing.worst_cost_usd`) is reserved against
every budget that applies (its provider's, its analyzer's; daily and monthly); after
the answer the reservation becomes the real cost. Reserving and checking happen with
no await between them, so concurrent calls cannot pass a budget together: settled plus
reserved never exceeds the limit.

Spend is kept by UTC day per provider and per analyzer (a month is the sum of its
days), in memory for the checks and in the store's `spend` table for restarts and
for the other nodes of a cluster: calls travel with their attempt's end and are
written in the transaction that records it. A cluster node reads the others' spend
every `REFRESH_S`."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.config import BudgetConfig, Config
from daemon.jobs import CallRecord
from daemon.providers.base import ProviderError
from daemon.spend.windows import WINDOWS, Window, period_of, resets_at
from daemon.store.base import (
    JobStore,
    StoreError,
)
from daemon.store.calls import (
    SpendDay,
)

log = structlog.get_logger("vigil.spend")
Scope = Literal["provider", "analyzer"]
REFRESH_S = 1.0
RECHECK_S = 2.0
"""A call refused by a budget is tried again after this long (or the window's reset)."""
Key = tuple[str, str, str]  # (scope, name, day "YYYY-MM-DD")
ADJECTIVE = {"day": "daily", "month": "monthly"}


@dataclass(frozen=True, slots=True)
class Limit:
    scope: Scope
    name: str
    window: Window
    usd: float


@dataclass(slots=True)
class Hold:
    """One call's reservation: the amount, held against each (scope, name)."""

    usd: float
    owners: tuple[tuple[str, str], ...]
    settled: bool = False


@dataclass
class SpendGuard:
    store: JobStore
    clock: Callable[[], float] = time.time
    _limits: dict[tuple[str, str], list[Limit]] = field(default_factory=dict)
    _db: defaultdict[Key, float] = field(default_factory=lambda: defaultdict(float))
    _local: defaultdict[Key, float] = field(default_factory=lambda: defaultdict(float))
    _reserved: defaultdict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float)
    )
    # Budgets reached: the period and the limit they were reached in.
    _held: dict[tuple[str, str, Window], tuple[str, float]] = field(default_factory=dict)
    refused: int = 0
    # Queued jobs of the analyzers each reached budget holds (refreshed by `run`).
    held_jobs: dict[tuple[str, str, Window], int] = field(default_factory=dict)
    _analyzer_providers: dict[str, str] = field(default_factory=dict)

    # --- the budgets ---------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take the budgets of a (re)loaded config: a raised one applies at once."""
        limits: dict[tuple[str, str], list[Limit]] = {}
        for name, provider in config.providers.items():
            if found := _limits("provider", name, provider.budget):
                limits[("provider", name)] = found
        for name, analyzer in config.analyzers.items():
            if found := _limits("analyzer", name, analyzer.budget):
                limits[("analyzer", name)] = found
        self._limits = limits
        self._analyzer_providers = {name: a.provider for name, a in config.analyzers.items()}

    @property
    def has_limits(self) -> bool:
        return bool(self._limits)

    def limits(self) -> list[Limit]:
        """Every configured budget."""
        return [limit for found in self._limits.values() for limit in found]

    def _limits_for(self, analyzer: str, provider: str) -> list[Limit]:
        if not self._limits:
            return []
        return [
            *self._limits.get(("provider", provider), ()),
            *self._limits.get(("analyzer", analyzer), ()),
        ]

    def spent(self, scope: str, name: str, window: Window, now: float) -> float:
        """Settled spend in the window holding `now`."""
        period = period_of(window, now)
        return sum(
            amount
            for book in (self._db, self._local)
            for (s, n, day), amount in book.items()
            if s == scope and n == name and day.startswith(period)
        )

    # --- a call -------------------------------------------------------------------

    def reserve(self, analyzer: str, provider: str, worst_usd: float) -> Hold | None:
        """Reserve `worst_usd` against every budget of this call (None: no budget
        applies), or raise a not-attempted ProviderError (`BudgetExhausted`) naming the
        budget it would pass. No await: the check and the reservation are one step."""
        limits = self._limits_for(analyzer, provider)
        if not limits:
            return None
        now = self.clock()
        owners = (("provider", provider), ("analyzer", analyzer))
        for limit in limits:
            used = self.spent(limit.scope, limit.name, limit.window, now)
            used += self._reserved[(limit.scope, limit.name)]
            if used + worst_usd > limit.usd:
                raise self._refuse(limit, used, worst_usd, now)
        for owner in owners:
            self._reserved[owner] += worst_usd
        return Hold(worst_usd, owners)

    def settle(self, hold: Hold | None, call: CallRecord | None) -> None:
        """The call ended: its reservation goes; what it cost (if it was answered)
        counts from now on, budget or not (a reload may add one later today)."""
        if hold is not None:
            if hold.settled:
                return
            hold.settled = True
            for owner in hold.owners:
                self._reserved[owner] -= hold.usd
        if call is not None and call.cost:
            day = period_of("day", call.at)
            self._local[("provider", call.provider, day)] += call.cost
            self._local[("analyzer", call.analyzer, day)] += call.cost

    def recorded(self, calls: Iterable[CallRecord]) -> None:
        """These calls' spend is in the store now: it moves from the local book to the
        stored one (the next refresh reads it from there)."""
        for call in calls:
            if call.cost:
                day = period_of("day", call.at)
                for key in (("provider", call.provider, day), ("analyzer", call.analyzer, day)):
                    moved = min(self._local[key], call.cost)
                    self._local[key] -= moved
                    self._db[key] += moved

    def _refuse(self, limit: Limit, used: float, worst: float, now: float) -> ProviderError:
        self.refused += 1
        self._reach(limit, used, now)
        wait_s = min(RECHECK_S, max(0.0, resets_at(limit.window, now) - now))
        return ProviderError(
            f"{limit.scope} {limit.name!r} {ADJECTIVE[limit.window]} budget of ${limit.usd:g} "
            f"would be passed (${used:.4f} used or reserved, this call up to ${worst:.4f}); "
            "the job waits for the window to reset or a reload to raise it",
            kind="BudgetExhausted",
            retry_after_s=wait_s,
        )

    def _reach(self, limit: Limit, used: float, now: float) -> None:
        """Mark a budget reached (its jobs wait) and say so once per window and limit."""
        key = (limit.scope, limit.name, limit.window)
        period = period_of(limit.window, now)
        if self._held.get(key) != (period, limit.usd):
            self._held[key] = (period, limit.usd)
            log.warning(
                "budget.reached",
                scope=limit.scope,
                name=limit.name,
                window=limit.window,
                limit_usd=limit.usd,
                used_usd=round(used, 6),
                resets_at=resets_at(limit.window, now),
            )

    def held(self, analyzer: str, provider: str, least_usd: float) -> bool:
        """Whether not even a call costing `least_usd` fits now (the dispatcher then
        leaves the analyzer's jobs queued, unclaimed: the budget counts as reached).
        Logs a budget reopening."""
        now = self.clock()
        self._note_reopened(now)
        held = False
        for limit in self._limits_for(analyzer, provider):
            used = self.spent(limit.scope, limit.name, limit.window, now)
            used += self._reserved[(limit.scope, limit.name)]
            if used + least_usd > limit.usd:
                held = True
                self._reach(limit, used, now)
        return held

    def _note_reopened(self, now: float) -> None:
        """Say once when a budget reached earlier opens again: a new window, or a
        reload that raised or removed it."""
        for key, (period, usd) in list(self._held.items()):
            scope, name, window = key
            limit = next(
                (lim for lim in self.limits() if (lim.scope, lim.name, lim.window) == key), None
            )
            if limit is None or limit.usd > usd or period != period_of(window, now):
                del self._held[key]
                log.info("budget.reopened", scope=scope, name=name, window=window)

    # --- the store ----------------------------------------------------------------

    async def load(self) -> None:
        """The stored spend of this month (all nodes): at start, then every REFRESH_S
        on a shared store."""
        now = self.clock()
        month = period_of("month", now)
        days: list[SpendDay] = await self.store.spend_since(month + "-01")
        fresh: defaultdict[Key, float] = defaultdict(float)
        for row in days:
            fresh[(row.scope, row.name, row.day)] += row.usd
        self._db = fresh

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the other nodes' spend fresh (a shared store), forget days before this
        month (the books stay a month long however long the daemon runs), and count
        the jobs each reached budget holds; a failed round is logged, not fatal."""
        task_status.started()
        while True:
            await anyio.sleep(REFRESH_S)
            self._forget_before(period_of("month", self.clock()))
            try:
                if self.store.cluster is not None:
                    await self.load()
                await self._count_held()
            except StoreError as exc:
                log.warning("spend.refresh_failed", error=str(exc))

    def _forget_before(self, month: str) -> None:
        """Drop the days before `month` ("YYYY-MM"): no window reaches back past it."""
        for book in (self._db, self._local):
            for key in [key for key in book if key[2] < month]:
                del book[key]

    def _held_analyzers(self, scope: str, name: str) -> list[str]:
        if scope == "analyzer":
            return [name]
        return [a for a, provider in self._analyzer_providers.items() if provider == name]

    async def _count_held(self) -> None:
        if not self._held:
            self.held_jobs = {}
            return
        wanted = {a for (scope, name, _) in self._held for a in self._held_analyzers(scope, name)}
        queued = await self.store.queued_of(sorted(wanted))
        self.held_jobs = {
            key: sum(queued.get(a, 0) for a in self._held_analyzers(key[0], key[1]))
            for key in self._held
        }

    def status(self) -> list[dict[str, Any]]:
        """Each budget for `vigil status`: limit, spent, reserved, remaining, reset."""
        now = self.clock()
        rows = []
        for limit in self.limits():
            spent = self.spent(limit.scope, limit.name, limit.window, now)
            reserved = self._reserved[(limit.scope, limit.name)]
            rows.append(
                {
                    "scope": limit.scope,
                    "name": limit.name,
                    "window": limit.window,
                    "limit_usd": limit.usd,
                    "spent_usd": round(spent, 6),
                    "reserved_usd": round(reserved, 6),
                    "remaining_usd": round(max(0.0, limit.usd - spent - reserved), 6),
                    "resets_at": resets_at(limit.window, now),
                    "held": (limit.scope, limit.name, limit.window) in self._held,
                    "held_jobs": self.held_jobs.get((limit.scope, limit.name, limit.window), 0),
                }
            )
        return rows


def _limits(scope: Scope, name: str, budget: BudgetConfig | None) -> list[Limit]:
    if budget is None:
        return []
    amounts = {"day": budget.daily_usd, "month": budget.monthly_usd}
    return [
        Limit(scope, name, window, amount)
        for window in WINDOWS
        if (amount := amounts[window]) is not None
    ]

"""Leaks of tasks, file descriptors and threads: counts against a baseline.

Counts are cheap (the task factory's size; one psutil read in a thread). Only when
tasks grew past their limit are the tasks walked, to say which kinds grew: their
coroutines' names compared with the walk made at the baseline. After a report the
baseline moves up, so a steady leak logs once per `*_growth_limit`, not every sample."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from daemon.config import WatchdogConfig
from daemon.watchdog.introspect import coroutine_name
from daemon.watchdog.memory import ProcessSample

log = structlog.get_logger("vigil.watchdog")

TOP_KINDS = 10


def task_kinds() -> Counter[str]:
    """Live tasks by coroutine name; walks every task: call rarely."""
    kinds: Counter[str] = Counter()
    for task in asyncio.all_tasks():
        kinds[coroutine_name(task.get_coro())] += 1
    return kinds


class LeakWatch:
    def __init__(
        self,
        config: WatchdogConfig,
        count_tasks: Callable[[], int],
        created: Callable[[], int] = lambda: 0,
    ) -> None:
        self._config = config
        self._count_tasks = count_tasks
        self._created = created
        self._warm_until = 0.0
        self.counts: dict[str, int] = {"tasks": 0, "fds": 0, "threads": 0}
        self.baseline: dict[str, int] | None = None
        self._baseline_kinds: Counter[str] = Counter()
        self.reports = 0

    def start(self, now: float) -> None:
        self._warm_until = now + self._config.warmup_s

    def observe(self, sample: ProcessSample, now: float) -> None:
        cfg = self._config
        self.counts = {"tasks": self._count_tasks(), "fds": sample.fds, "threads": sample.threads}
        if now < self._warm_until:
            return
        if self.baseline is None:
            self.baseline = dict(self.counts)
            self._baseline_kinds = task_kinds()
            return
        limits = {
            "tasks": cfg.task_growth_limit,
            "fds": cfg.fd_growth_limit,
            "threads": cfg.thread_growth_limit,
        }
        for kind, limit in limits.items():
            grown = self.counts[kind] - self.baseline[kind]
            if grown <= limit:
                continue
            self.reports += 1
            extra: dict[str, Any] = {}
            if kind == "tasks":
                kinds = task_kinds()
                extra["grown_kinds"] = dict((kinds - self._baseline_kinds).most_common(TOP_KINDS))
                self._baseline_kinds = kinds
            log.warning(
                f"{kind}.growth",
                count=self.counts[kind],
                baseline=self.baseline[kind],
                grew_by=grown,
                limit=limit,
                **extra,
            )
            self.baseline[kind] = self.counts[kind]

    def status(self) -> dict[str, Any]:
        return {
            **self.counts,
            "tasks_created": self._created(),
            "baseline": self.baseline,
            "growth_reports": self.reports,
        }

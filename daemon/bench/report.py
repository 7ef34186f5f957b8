"""How a performance scenario reports: its figures, its checks against the issue's
targets, one JSON line each, and one table for all."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from daemon.cli import render


class Check(msgspec.Struct, frozen=True):
    """One figure against its target; `met` is None when the run was too small to
    judge (a smoke run)."""

    figure: str
    value: float | None
    unit: str
    target: str
    met: bool | None


def at_least(figure: str, value: float | None, unit: str, target: float, judge: bool) -> Check:
    met = None if not judge or value is None else value >= target
    return Check(figure, value, unit, f">= {target:g}", met)


def info(figure: str, value: float | None, unit: str) -> Check:
    """A figure shown in the table with no target of its own."""
    return Check(figure, value, unit, "-", None)


def at_most(figure: str, value: float | None, unit: str, target: float, judge: bool) -> Check:
    met = None if not judge or value is None else value <= target
    return Check(figure, value, unit, f"<= {target:g}", met)


@dataclass
class Result:
    scenario: str
    about: str
    figures: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def target_met(self) -> bool | None:
        judged = [c.met for c in self.checks if c.met is not None]
        return all(judged) if judged else None

    def as_dict(self, machine: dict[str, Any], command: str) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "about": self.about,
            "target_met": self.target_met,
            "checks": msgspec.to_builtins(self.checks),
            "figures": self.figures,
            "notes": self.notes,
            "machine": machine,
            "command": command,
        }


def _value(check: Check) -> str:
    if check.value is None:
        return "-"
    text = f"{check.value:,.3f}".rstrip("0").rstrip(".")
    return f"{text} {check.unit}".strip()


def table(results: Sequence[Result]) -> None:
    rows: list[list[Any]] = []
    for result in results:
        for check in result.checks:
            met = {True: "yes", False: "NO", None: "-"}[check.met]
            rows.append([result.scenario, check.figure, _value(check), check.target, met])
    render.table(["scenario", "figure", "measured", "target", "met"], rows)
    for result in results:
        for note in result.notes:
            print(f"  {result.scenario}: {note}", file=sys.stdout)

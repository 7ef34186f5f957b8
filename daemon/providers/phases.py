"""Where one attempt's calls spent their time, added up as they go: the provider adds
each wait (its breaker, a concurrency slot, the budgets, a cool-down) and each API call
to the attempt's accumulator, and the worker turns the sums into the attempt's
`Phases` (daemon/jobs.py), whatever is left over being the record's."""

from __future__ import annotations


class PhaseTimes:
    """Seconds on the monotonic clock, summed over an attempt's calls (a handler's
    several `ctx.complete` included). Plain float attributes: measuring costs a few
    clock reads and additions per call, and nothing allocated per phase."""

    __slots__ = ("api_s", "budget_s", "cooldown_s", "slot_s")

    def __init__(self) -> None:
        self.slot_s = 0.0  # waiting for the provider's concurrency limiter
        self.budget_s = 0.0  # waiting for the request/token budgets (and in line for them)
        self.cooldown_s = 0.0  # a shared 429 cool-down, or the breaker's probe verdict
        self.api_s = 0.0  # the HTTP requests themselves, answered or not

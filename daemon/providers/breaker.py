"""A circuit breaker per provider: after `failures` consecutive failures (no answer,
a timeout, a 5xx) it opens and calls fail at once, without a request, for `open_s`;
then one probe goes through (half-open): an answer closes it, a failure opens it again.
Callers that arrive while the probe is under way wait for its verdict instead of
being turned away for a probe's length: when it closes the circuit they go at once.

An API that is down then costs one probe per `open_s` instead of a timeout per job,
and jobs are told when to come back instead of hammering it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio
import structlog

from daemon.providers.base import ProviderError

log = structlog.get_logger("vigil.provider")
VERDICT_MARGIN_S = 0.25  # kept of an attempt's deadline to turn the call away unsent

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """`failures` = 0 turns the breaker off (it never opens)."""

    def __init__(
        self,
        provider: str,
        *,
        failures: int,
        open_s: float,
        probe_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.provider = provider
        self.on_close = on_close  # the dispatcher's wake-up: held jobs can be claimed now
        self.failures_to_open = failures
        self.open_s = open_s
        self.probe_wait_s = probe_wait_s  # hint to callers turned away while a probe runs
        self._clock = clock
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False
        self._verdict: anyio.Event | None = None  # set when the probe under way ends
        self.consecutive_failures = 0
        self.opened = 0
        self.rejected = 0
        self.changes = 0  # opens and closes this node decided (to share in a cluster)
        self.last_failure: str | None = None

    def configure(self, *, failures: int, open_s: float, probe_wait_s: float) -> None:
        self.failures_to_open, self.open_s, self.probe_wait_s = failures, open_s, probe_wait_s
        if not failures and self._state != "closed":
            self._close()
            self._probe_ended()  # its waiters go now; its verdict, when it comes, is stale

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() >= self._opened_at + self.open_s:
            self._state = "half_open"
            log.info("provider.circuit_half_open", provider=self.provider)
        return self._state

    def accepting(self) -> bool:
        """Whether a new call would be tried now: closed, or half-open with no probe
        under way (the next call is the probe). The dispatcher claims no jobs of a
        provider that is not accepting."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probing)

    async def admit(self) -> bool:
        """Before a call: True if it is the half-open probe. A call that comes while
        the probe is under way waits for its verdict (at most `probe_wait_s`). Raises
        a retryable ProviderError (kind CircuitOpen) when the call must not be made."""
        waited = False
        while True:
            state = self.state
            if state == "closed":
                return False
            if state == "half_open" and not self._probing:
                self._probing = True
                self._verdict = anyio.Event()
                return True
            if state == "half_open" and not waited and self._verdict is not None:
                waited = True
                # Never past the attempt's own deadline (less a margin to say so): a
                # call turned away unsent spends no attempt, one timed out does.
                left = anyio.current_effective_deadline() - anyio.current_time() - VERDICT_MARGIN_S
                with anyio.move_on_after(min(self.probe_wait_s, left)):
                    await self._verdict.wait()
                continue
            break
        raise self._rejection(state)

    def recheck(self, probe: bool) -> None:
        """Right before sending: a call admitted while closed may have waited (for a
        slot, for budget) while the circuit opened (or went half-open: the probe alone
        goes then); it is turned away now instead of spending an attempt on an API
        known to be down."""
        state = self.state
        if not probe and state != "closed":
            raise self._rejection(state)

    def _rejection(self, state: State) -> ProviderError:
        self.rejected += 1
        wait_s = (
            self._opened_at + self.open_s - self._clock() if state == "open" else self.probe_wait_s
        )
        return ProviderError(
            f"provider {self.provider!r} is failing fast: {self.reason()}",
            kind="CircuitOpen",
            retryable=True,
            retry_after_s=max(0.0, wait_s),
        )

    def reason(self) -> str | None:
        """Why calls are held back, for status and errors; None while closed."""
        state = self.state
        last = f" ({self.last_failure})" if self.last_failure else ""
        if state == "open":
            left = max(0.0, self._opened_at + self.open_s - self._clock())
            return (
                f"circuit open after {self.consecutive_failures} failures{last}, "
                f"probe in {math.ceil(left)} s"
            )
        if state == "half_open":
            if self._probing:
                return f"circuit half-open, a probe request is under way (last failure{last})"
            return f"circuit half-open, the next request probes the API (last failure{last})"
        return None

    def _probe_ended(self) -> None:
        self._probing = False
        if self._verdict is not None:
            self._verdict.set()
            self._verdict = None

    def succeeded(self, probe: bool) -> None:
        """The server answered (any status below 500)."""
        if probe:
            self._close()
            self._probe_ended()
        elif self._state == "closed":
            self.consecutive_failures = 0

    def failed(self, reason: str, probe: bool) -> None:
        """No answer, a timeout or a 5xx."""
        self.last_failure = reason
        if probe:
            if not self._probing:
                return  # a stale probe: the breaker was closed (switched off) meanwhile
            self.consecutive_failures += 1
            self._open(reason)
            self._probe_ended()
            return
        if self._state != "closed":
            return  # a straggler sent before the circuit opened: already counted
        self.consecutive_failures += 1
        if self.failures_to_open and self.consecutive_failures >= self.failures_to_open:
            self._open(reason)

    def released(self, probe: bool) -> None:
        """The call ended without saying anything about the server (cancelled, refused
        before sending): a probe slot goes to the next caller."""
        if probe:
            self._probe_ended()

    def open_left_s(self) -> float:
        """Seconds until half-open while open; 0 otherwise."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.open_s - self._clock())

    def adopt(self, open_for_s: float, by: str) -> None:
        """Another node opened the circuit (for `open_for_s` more) or closed it (0):
        follow it. Not counted in `changes`: it is not ours to share again."""
        if open_for_s <= 0:
            if self._state != "closed":
                self._close(share=False)
                self._probe_ended()
            return
        if not self.failures_to_open:
            return  # the breaker is off on this node
        self.last_failure = f"opened by node {by}"
        self._state = "open"
        self._opened_at = self._clock() - max(0.0, self.open_s - open_for_s)
        self.opened += 1
        log.warning("provider.circuit_opened", provider=self.provider, by=by, open_s=open_for_s)

    def _open(self, reason: str) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self.opened += 1
        self.changes += 1
        log.warning(
            "provider.circuit_opened",
            provider=self.provider,
            failures=self.consecutive_failures,
            open_s=self.open_s,
            last_failure=reason,
        )

    def _close(self, *, share: bool = True) -> None:
        was = self._state
        self._state = "closed"
        self.consecutive_failures = 0
        if was != "closed":
            self.changes += share
            log.info("provider.circuit_closed", provider=self.provider)
            self.on_close()

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "state": state,
            "consecutive_failures": self.consecutive_failures,
            "failures_to_open": self.failures_to_open,
            "open_s": self.open_s,
            "half_open_in_s": round(max(0.0, self._opened_at + self.open_s - self._clock()), 3)
            if state == "open"
            else None,
            "opened": self.opened,
            "rejected": self.rejected,
            "last_failure": self.last_failure,
        }

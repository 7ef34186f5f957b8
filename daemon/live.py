"""The part of the daemon's state a reload replaces. Components keep a reference to
this one object and read it on each use, so new limits apply to the next request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from daemon.analyzers import Analyzer
from daemon.config import Config, PriceConfig
from daemon.wakeup import Wakeup


@dataclass
class Live:
    config: Config
    analyzers: dict[str, Analyzer]
    reloaded: Wakeup = field(default_factory=Wakeup)  # told after each applied reload

    def prices(self) -> Mapping[str, PriceConfig]:
        return {name: p.prices for name, p in self.config.providers.items() if p.prices is not None}

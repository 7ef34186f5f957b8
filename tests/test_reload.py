"""The reload plan: what a new config changes live, what waits for a restart, and
what is refused, decided from two parsed configs (no daemon needed)."""

from __future__ import annotations

import pytest

from daemon.config import Config, parse_config
from daemon.reload import ReloadError, _plan

OPENAI = """
[providers.p]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"
max_concurrency = 4
max_connections = 10
"""
SIMULATED = """
[providers.p]
kind = "simulated"
max_concurrency = 8
"""
ANALYZER = """
[analyzers.a]
provider = "p"
model = "m"
prompt = "Say {text}"
"""


def config(*sections: str) -> Config:
    return parse_config("".join(sections))


def test_a_new_kind_keeps_the_provider_whole() -> None:
    """openai -> simulated needs a restart: the running provider keeps all its old
    settings (a simulated provider's would leave an API with no base URL)."""
    old = config(OPENAI, ANALYZER)
    planned, changed, restart = _plan(old, config(SIMULATED, ANALYZER))
    assert planned.providers["p"] == old.providers["p"]
    assert "providers.p.kind" in restart and "providers" not in changed


def test_a_restart_only_key_leaves_the_other_settings_live() -> None:
    """A new pool size waits for a restart; a new concurrency applies now."""
    new = OPENAI.replace("max_concurrency = 4", "max_concurrency = 2").replace(
        "max_connections = 10", "max_connections = 20"
    )
    planned, changed, restart = _plan(config(OPENAI, ANALYZER), config(new, ANALYZER))
    assert (planned.providers["p"].max_concurrency, planned.providers["p"].max_connections) == (
        2,
        10,
    )
    assert restart == ["providers.p.max_connections"] and changed == ["providers"]


def test_an_analyzer_on_a_provider_not_running_is_refused() -> None:
    """Adding a provider needs a restart, so an analyzer that uses it cannot run yet:
    the reload is refused whole, naming it."""
    added = OPENAI.replace("[providers.p]", "[providers.q]")
    new = config(OPENAI, added, ANALYZER.replace('provider = "p"', 'provider = "q"'))
    with pytest.raises(ReloadError, match=r"\$\.analyzers\.a\.provider: no provider named 'q'"):
        _plan(config(OPENAI, ANALYZER), new)

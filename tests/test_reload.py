"""The reload plan: what a new config changes live, what waits for a restart, and
what is refused, decided from two parsed configs (no daemon needed); the changes it
names, key by key, and how `vigil reload` prints them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from daemon.cli import render
from daemon.config import Config, parse_config
from daemon.reload import ReloadError, _plan, describe
from tests.daemon_proc import DaemonProcess, sim_config

StartDaemon = Callable[..., DaemonProcess]

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


def _changes(old: Config, new: Config) -> list[dict[str, Any]]:
    """The reply's `changes` for reloading `old` into `new`, as the socket sends them."""
    planned, _, _ = _plan(old, new)
    found: list[dict[str, Any]] = msgspec.to_builtins(describe(old, new, planned))
    return found


def test_changes_name_each_key_from_and_to() -> None:
    """Leaf keys with dotted paths and their values as written; a change the daemon
    keeps for a restart says so; an unchanged key is not listed."""
    old = config(OPENAI.replace("max_concurrency = 4", "requests_per_minute = 500"), ANALYZER)
    new = config(
        OPENAI.replace("max_concurrency = 4", "requests_per_minute = 300"),
        ANALYZER,
        '[queue]\nmax_concurrency = 4\n[http]\nlisten = "127.0.0.1:9999"\n',
    )
    listen = {"key": "http.listen", "from": "127.0.0.1:8470", "to": "127.0.0.1:9999"}
    assert _changes(old, new) == [
        {**listen, "needs_restart": True},
        {"key": "queue.max_concurrency", "from": 64, "to": 4, "needs_restart": False},
        {"key": "providers.p.requests_per_minute", "from": 500, "to": 300, "needs_restart": False},
    ]


def test_changes_show_variable_names_never_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new key variable is named, needs a restart, and its value appears nowhere."""
    monkeypatch.setenv("P_KEY", "sk-old-secret")
    monkeypatch.setenv("Q_KEY", "sk-new-secret")
    new = config(OPENAI.replace("P_KEY", "Q_KEY"), ANALYZER)
    changes = _changes(config(OPENAI, ANALYZER), new)
    assert changes == [
        {"key": "providers.p.api_key_env", "from": "P_KEY", "to": "Q_KEY", "needs_restart": True}
    ]
    assert "secret" not in "\n".join(render.reload_lines({"changes": changes}))


def test_reload_lines_one_per_change() -> None:
    """`vigil reload` prints one line a change: from → to, what needs a restart, and a
    table added or removed as one line."""
    old = config(OPENAI, ANALYZER)
    new = config(
        OPENAI.replace("max_concurrency = 4", "max_concurrency = 2"),
        ANALYZER.replace("[analyzers.a]", "[analyzers.b]"),
        SIMULATED.replace("[providers.p]", "[providers.sim]"),
        '[queue]\nmax_concurrency = 4\n[http]\nlisten = ""\n[log]\nlevel = "debug"\n',
    )
    lines = render.reload_lines({"applied": [], "needs_restart": [], "changes": _changes(old, new)})
    assert lines == [
        "http.listen (needs a restart)",
        "queue.max_concurrency 64 → 4",
        'log.level "info" → "debug"',
        "providers.p.max_concurrency 4 → 2",
        "providers.sim (added; needs a restart)",
        "analyzers.a (removed)",
        "analyzers.b (added)",
    ]
    assert render.reload_lines({"applied": [], "needs_restart": [], "changes": []}) == [
        "reloaded: no changes"
    ]


def test_reload_lines_from_a_daemon_without_changes() -> None:
    """A reply without `changes` (an older daemon) prints its section lists."""
    data = {"applied": ["queue"], "needs_restart": ["http"]}
    assert render.reload_lines(data) == ["reloaded: queue", "needs a restart to apply: http"]


def test_a_live_reload_replies_with_its_changes(start_daemon: StartDaemon) -> None:
    """The socket's reload reply keeps `applied` and `needs_restart` and adds `changes`;
    the new concurrency runs at once, the new listen address waits."""
    daemon = start_daemon(sim_config(max_concurrency=16))
    text = daemon.config_path.read_text()
    new = text.replace("max_concurrency = 16\nmax_backlog", "max_concurrency = 4\nmax_backlog")
    daemon.config_path.write_text(new.replace('listen = ""', 'listen = "127.0.0.1:0"'))
    reply = daemon.call("reload")
    assert reply["applied"] == ["queue"] and reply["needs_restart"] == ["http"]
    assert reply["changes"] == [
        {"key": "http.listen", "from": "", "to": "127.0.0.1:0", "needs_restart": True},
        {"key": "queue.max_concurrency", "from": 16, "to": 4, "needs_restart": False},
    ]
    assert daemon.call("status")["queue"]["max_concurrency"] == 4

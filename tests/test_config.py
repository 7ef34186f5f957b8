"""Config parsing: errors name the key path, defaults come from the environment."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.analyzers import build_analyzers
from daemon.config import (
    DEFAULT_HTTP_LISTEN,
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_listen,
    template_fields,
)

REPO = Path(__file__).resolve().parent.parent
PROVIDER = '[providers.p]\nkind = "simulated"\n'


def analyzer(extra: str = "", *, prompt: str = "Summarize: {text}") -> str:
    """TOML for a valid prompt analyzer `x` on provider `p`, plus `extra` lines."""
    return (
        PROVIDER + f'[analyzers.x]\nprovider = "p"\nmodel = "m"\nprompt = """{prompt}"""\n' + extra
    )


def error_of(text: str) -> str:
    """The ConfigError message that parsing `text` must raise."""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No systemd directories from the outside, and a throwaway working directory."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)


# -- errors name the path ------------------------------------------------------------


def test_valid_minimal_config_parses() -> None:
    """The baseline used by the error tests is itself valid."""
    config = parse_config(analyzer())
    assert config.analyzers["x"].provider == "p"
    assert config.providers["p"].kind == "simulated"


def test_unknown_top_level_key() -> None:
    """A typo at the top level is an error naming the key."""
    message = error_of(analyzer("") + "\n[queu]\nmax_backlog = 5\n")
    assert "queu" in message
    assert message.startswith("$")


def test_unknown_key_in_a_section() -> None:
    """A typo inside a fixed section names the section path and the key."""
    message = error_of("[queue]\nmax_concurency = 5\n")
    assert "$.queue" in message
    assert "max_concurency" in message


def test_unknown_key_in_a_named_analyzer() -> None:
    """A typo inside `[analyzers.x]` names `$.analyzers.x` and the key."""
    message = error_of(analyzer("max_token = 5\n"))
    assert "$.analyzers.x" in message
    assert "max_token" in message


def test_unknown_key_in_a_named_provider() -> None:
    """A typo inside `[providers.p]` names `$.providers.p` and the key."""
    message = error_of(analyzer().replace('kind = "simulated"', 'kind = "simulated"\nrpm = 5'))
    assert "$.providers.p" in message
    assert "rpm" in message


def test_negative_max_tokens_names_the_path() -> None:
    """An out-of-range value names its full path."""
    message = error_of(analyzer("max_tokens = -1\n"))
    assert "$.analyzers.x.max_tokens" in message


def test_wrong_type_names_the_path() -> None:
    """A value of the wrong type names its full path and what was expected."""
    message = error_of('[queue]\nmax_concurrency = "many"\n')
    assert "$.queue.max_concurrency" in message
    assert "int" in message
    message = error_of(analyzer('temperature = "hot"\n'))
    assert "$.analyzers.x.temperature" in message


def test_nested_provider_value_names_the_path() -> None:
    """A bad value two levels inside a named entry is located too."""
    message = error_of(analyzer("") + "[providers.p.simulate]\nerror_rate = 2\n")
    assert "$.providers.p.simulate.error_rate" in message


def test_a_bad_table_name_is_named() -> None:
    """A provider or analyzer name outside the allowed characters is quoted in the error."""
    message = error_of(analyzer().replace("[analyzers.x]", '[analyzers."bad name"]'))
    assert message.startswith("$.analyzers: bad name 'bad name'"), message


def test_analyzer_with_unknown_provider() -> None:
    """An analyzer pointing at a provider that is not configured is refused."""
    message = error_of(analyzer().replace('provider = "p"', 'provider = "nope"'))
    assert "$.analyzers.x.provider" in message
    assert "nope" in message


def test_openai_provider_needs_base_url() -> None:
    """kind = "openai" without base_url is refused, naming the key."""
    message = error_of('[providers.main]\nkind = "openai"\n')
    assert "$.providers.main.base_url" in message


def test_base_url_must_be_http() -> None:
    """A base_url that is not http(s) is refused."""
    message = error_of('[providers.main]\nkind = "openai"\nbase_url = "ftp://x"\n')
    assert "$.providers.main.base_url" in message


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[providers.c]\nkind = "anthropic"\n', "$.providers.c.base_url"),
        (
            '[providers.a]\nkind = "openai"\ndialect = "azure"\nbase_url = "https://x"\n',
            "$.providers.a.api_version",
        ),
        (
            '[providers.a]\nkind = "openai"\nbase_url = "https://r.openai.azure.com"\n',
            "$.providers.a.api_version",
        ),
        (
            '[providers.c]\nkind = "anthropic"\nbase_url = "https://api.anthropic.com/v1"\n',
            "$.providers.c.base_url",
        ),
        (
            '[providers.c]\nkind = "anthropic"\nbase_url = "https://x"\ndialect = "groq"\n',
            "$.providers.c.dialect",
        ),
        (
            PROVIDER + '[providers.p.simulate]\ndialect = "anthropic"\ntokens_per_minute = 9\n',
            "$.providers.p.simulate.tokens_per_minute",
        ),
        (
            PROVIDER + "[providers.p.simulate]\ninput_tokens_per_minute = 9\n",
            "$.providers.p.simulate",
        ),
        (analyzer("cache_system = true\n"), "$.analyzers.x.cache_system"),
        (
            analyzer("temperature = 1.5\n") + '[providers.p.simulate]\ndialect = "anthropic"\n',
            "$.analyzers.x.temperature",
        ),
    ],
)
def test_provider_dialect_rules(text: str, path: str) -> None:
    """Each dialect's keys are checked where they apply, naming the key."""
    assert path in error_of(text)


def test_the_example_providers_parse() -> None:
    """config/vigil.toml's commented Anthropic and Azure examples are valid as written."""
    text = (REPO / "config" / "vigil.toml").read_text()
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("# Anthropic's")))
    block = itertools.takewhile(lambda line: line.startswith("#"), lines[start:])
    examples = [
        line.removeprefix("# ")
        for line in block
        if line.startswith("# [") or ("=" in line and not line.endswith(":"))
    ]
    config = parse_config(text + "\n".join(examples) + "\n")
    assert config.providers["claude"].kind == "anthropic"
    assert config.providers["claude"].prices is not None
    assert config.providers["azure"].dialect == "azure"


def test_required_keys_need_json_output() -> None:
    """required_keys with output = "text" is refused."""
    message = error_of(analyzer('required_keys = ["a"]\n'))
    assert "$.analyzers.x.required_keys" in message
    parse_config(analyzer('required_keys = ["a"]\noutput = "json"\n'))


def test_handler_and_prompt_both_set() -> None:
    """An analyzer is either a handler or a prompt, not both."""
    message = error_of(analyzer('handler = "pkg.mod:func"\n'))
    assert "$.analyzers.x" in message
    assert "handler" in message
    assert "prompt" in message


def test_handler_spec_must_look_like_module_colon_function() -> None:
    """A malformed handler spec is refused; a well-formed one parses without a prompt."""
    bad = error_of('[analyzers.h]\nhandler = "not a spec"\n')
    assert "$.analyzers.h.handler" in bad
    config = parse_config('[analyzers.h]\nhandler = "pkg.mod:func"\n')
    assert config.analyzers["h"].handler == "pkg.mod:func"


def test_prompt_analyzer_needs_prompt_and_model() -> None:
    """A prompt analyzer without prompt or model names both."""
    message = error_of(PROVIDER + '[analyzers.x]\nprovider = "p"\n')
    assert "$.analyzers.x.prompt" in message
    assert "$.analyzers.x.model" in message


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1", "127.0.0.1:99999", ":80", "a b:1"])
def test_bad_listen(listen: str) -> None:
    """A listen address that is not HOST:PORT is refused, naming $.http.listen."""
    message = error_of(f'[http]\nlisten = "{listen}"\n')
    assert "$.http.listen" in message


def test_listen_forms() -> None:
    """HOST:PORT, bracketed IPv6 and "" (HTTP off) are accepted."""
    assert parse_listen("127.0.0.1:8470") == ("127.0.0.1", 8470)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:80") == ("localhost", 80)
    assert parse_config('[http]\nlisten = ""\n').http.listen == ""
    assert parse_config("").http.listen == DEFAULT_HTTP_LISTEN


@pytest.mark.parametrize(
    "prompt", ["{a.b}", "{x!r}", "{x:>10}", "{a[0]}", "{}", "{0}", "unbalanced {"]
)
def test_template_placeholder_must_be_a_plain_name(prompt: str) -> None:
    """Attribute, item, conversion, format-spec and positional placeholders are refused."""
    message = error_of(analyzer(prompt=prompt))
    assert "$.analyzers.x.prompt" in message


def test_template_fields_lists_plain_names_once() -> None:
    """Plain placeholders are listed in order without repeats; `{{` is a literal."""
    assert template_fields("{title}: {text} ({title}) {{not_a_field}}") == ["title", "text"]


def test_spool_analyzer_must_exist() -> None:
    """The spool directory's analyzer must be configured."""
    message = error_of(analyzer() + '[intake.spool]\ndir = "in"\nanalyzer = "nope"\n')
    assert "$.intake.spool.analyzer" in message


def test_not_toml() -> None:
    """Text that is not TOML is a ConfigError, not a crash."""
    assert "TOML" in error_of("[[[")


def test_all_problems_are_reported_together() -> None:
    """Several cross-field problems come in one message, each with its path."""
    message = error_of('[http]\nlisten = "x"\n[providers.main]\nkind = "openai"\n')
    assert "$.http.listen" in message
    assert "$.providers.main.base_url" in message


# -- defaults ------------------------------------------------------------------------


def test_defaults_without_environment(tmp_path: Path) -> None:
    """No config, no systemd: state in ./vigil-data, socket inside it."""
    config = parse_config("")
    assert config.state_dir == tmp_path / "vigil-data"
    assert config.socket_path == tmp_path / "vigil-data" / "vigil.sock"
    assert config.db_path == tmp_path / "vigil-data" / "vigil.db"


def test_state_dir_from_state_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$STATE_DIRECTORY (first entry) is the default state dir; the socket follows it."""
    state = tmp_path / "state"
    monkeypatch.setenv("STATE_DIRECTORY", f"{state}:{tmp_path / 'other'}")
    config = parse_config("")
    assert config.state_dir == state
    assert config.socket_path == state / "vigil.sock"


def test_socket_from_runtime_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$RUNTIME_DIRECTORY holds the socket when the config names none."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    config = parse_config("")
    assert config.socket_path == tmp_path / "run" / "vigil.sock"
    assert config.state_dir == tmp_path / "state"


def test_config_values_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Explicit state_dir and socket win over $STATE_DIRECTORY and $RUNTIME_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "env-state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "env-run"))
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path / "s"}"\nsocket = "{tmp_path / "x.sock"}"\n'
    )
    assert config.state_dir == tmp_path / "s"
    assert config.socket_path == tmp_path / "x.sock"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    """Relative state_dir and socket in a file are relative to that file's folder."""
    folder = tmp_path / "etc"
    folder.mkdir()
    file = folder / "vigil.toml"
    file.write_text('[daemon]\nstate_dir = "data"\nsocket = "run/v.sock"\n')
    config = load_config(file)
    assert config.state_dir == folder / "data"
    assert config.socket_path == folder / "run" / "v.sock"


def test_section_defaults() -> None:
    """An empty config gets the documented defaults."""
    config = parse_config("")
    assert config.queue.max_concurrency == 64
    assert config.queue.max_backlog == 1_000_000
    assert config.daemon.shutdown_grace_s == 30
    assert config.log.level == "info"
    assert config.log.format == "auto"
    assert config.watchdog.block_threshold_ms == 250
    assert config.watchdog.max_rss_mb == 0
    assert config.providers == {}
    assert config.analyzers == {}


# -- files ---------------------------------------------------------------------------


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the file."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    """A bad file's error names the file and the key path."""
    file = tmp_path / "bad.toml"
    file.write_text("[queue]\nmax_backlog = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert str(file) in str(info.value)
    assert "$.queue.max_backlog" in str(info.value)


def test_load_config_none_is_all_defaults() -> None:
    """No file means an empty config."""
    assert load_config(None) == parse_config("")


@pytest.mark.parametrize("path", ["config/demo.toml", "daemon/data/demo.toml"])
def test_shipped_demo_config_parses(path: str) -> None:
    """The demo config that ships parses, and its analyzers can be built."""
    config = load_config(REPO / path)
    assert isinstance(config, Config)
    assert {"summarize", "classify", "keywords"} <= set(config.analyzers)
    for name, analyzer_config in config.analyzers.items():
        assert analyzer_config.provider in config.providers, name
    analyzers = build_analyzers(config)
    assert analyzers["summarize"].fields == ["text"]


# -- the CLI -------------------------------------------------------------------------


def _check_config(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon check-config PATH` in a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env["STATE_DIRECTORY"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_check_config_bad_file_exits_78(tmp_path: Path) -> None:
    """An invalid config exits 78 (EX_CONFIG) and names the file and key on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text(analyzer("max_tokens = -1\n"))
    proc = _check_config(bad, tmp_path)
    assert proc.returncode == 78, proc.stderr
    assert str(bad) in proc.stderr
    assert "$.analyzers.x.max_tokens" in proc.stderr


def test_cli_check_config_missing_file_exits_78(tmp_path: Path) -> None:
    """A config file that does not exist exits 78 naming the path."""
    missing = tmp_path / "missing.toml"
    proc = _check_config(missing, tmp_path)
    assert proc.returncode == 78, proc.stderr
    assert str(missing) in proc.stderr


def test_cli_check_config_good_file_exits_0(tmp_path: Path) -> None:
    """A valid config exits 0 and says ok."""
    proc = _check_config(REPO / "config" / "demo.toml", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_store_section_is_checked_and_a_url_password_refused() -> None:
    """[store]: a postgresql:// URL or nothing; a password in it is refused (it would
    reach the config's log line), naming password_env; the lease is bounded."""
    ok = parse_config(analyzer() + '[store]\nurl = "postgresql://vigil@db/vigil"\nlease_s = 10\n')
    assert ok.store.lease_s == 10 and ok.store.node  # the host name by default
    assert parse_config(analyzer()).store.url == ""  # SQLite, as before
    message = error_of(analyzer() + '[store]\nurl = "postgresql://vigil:s3cret@db/vigil"\n')
    assert "$.store.url" in message and "password_env" in message
    assert "s3cret" not in message
    assert "$.store.url" in error_of(analyzer() + '[store]\nurl = "mysql://db/vigil"\n')
    assert "$.store.lease_s" in error_of(analyzer() + "[store]\nlease_s = 1\n")
    assert "$.store.node_name" in error_of(analyzer() + '[store]\nnode_name = "a b"\n')

"""Config errors an operator can act on at once: the valid values of an enum, "required"
for a missing key, the closest valid key for a typo; and `vigil check-config` listing
what each analyzer's input needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.cli.main import DEFAULT_CONFIG
from daemon.config import ConfigError, parse_config
from tests.daemon_proc import run_cli

EX_CONFIG = 78
PROVIDER = '[providers.p]\nkind = "simulated"\n'
ANALYZER = '[analyzers.a]\nprovider = "p"\nmodel = "m"\nprompt = "Say {text}"\n'


def error_of(text: str) -> str:
    """The ConfigError message that parsing `text` must raise."""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "path", "valid", "got"),
    [
        ('[log]\nformat = "jsn"\n', "$.log.format", '"auto", "json", "console"', '"jsn"'),
        (
            '[daemon]\nsynchronous = "full"\n',
            "$.daemon.synchronous",
            '"NORMAL", "FULL", "EXTRA"',
            '"full"',
        ),
        (
            '[providers.x]\nkind = "simul"\n',
            "$.providers.x.kind",
            '"openai", "anthropic", "simulated"',
            '"simul"',
        ),
        (
            PROVIDER + '[providers.p.simulate]\ndialect = "x"\n',
            "$.providers.p.simulate.dialect",
            '"openai", "anthropic"',
            '"x"',
        ),
        (
            PROVIDER + ANALYZER + 'output = "yaml"\n',
            "$.analyzers.a.output",
            '"text", "json"',
            '"yaml"',
        ),
    ],
)
def test_an_enum_error_lists_the_valid_values(text: str, path: str, valid: str, got: str) -> None:
    """A value outside a fixed set names the path, every valid value (in the order the
    README gives them) and the value found."""
    assert error_of(text) == f"{path}: expected one of {valid}, got {got}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[providers.x]\nbase_url = "http://h"\n', "$.providers.x.kind: required"),
        ('[intake.spool]\nanalyzer = "a"\n', "$.intake.spool.dir: required"),
    ],
)
def test_a_missing_required_key_says_required(text: str, message: str) -> None:
    """A key that has no default and is not there is named with "required"."""
    assert error_of(text) == message


@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        (PROVIDER + ANALYZER + "max_token = 5\n", "$.analyzers.a.max_token", '"max_tokens"?'),
        ("[queu]\nmax_backlog = 5\n", "$.queu", '"queue"?'),
        ("[queue]\nmax_concurency = 5\n", "$.queue.max_concurency", '"max_concurrency"?'),
        (
            PROVIDER + "[providers.p.prices]\nprompt = 1\n",
            "$.providers.p.prices.prompt",
            '"prompt_per_mtok"?',
        ),
    ],
)
def test_an_unknown_key_suggests_the_closest_one(text: str, path: str, hint: str) -> None:
    """A typo names its path and the closest valid key of that table (difflib, or a key
    that begins with the typo)."""
    assert error_of(text) == f"{path}: unknown key; did you mean {hint}"


def test_an_unknown_key_with_nothing_close_lists_the_valid_keys() -> None:
    """With no key close to the typo, the error lists the table's keys."""
    message = error_of(PROVIDER + "rpm = 5\n")
    assert message.startswith("$.providers.p.rpm: unknown key; valid keys: kind, base_url, ")
    assert "requests_per_minute" in message


def test_check_config_lists_each_analyzers_input_fields(tmp_path: Path) -> None:
    """`vigil check-config` prints, per analyzer, the `{field}`s its prompt needs;
    a handler takes any input."""
    (tmp_path / "vigil_test_any.py").write_text("async def handle(input, ctx):\n    return 1\n")
    config = tmp_path / "vigil.toml"
    config.write_text(
        PROVIDER
        + ANALYZER.replace("Say {text}", "Compare {text} with {other}, then {text}")
        + '[analyzers.plain]\nprovider = "p"\nmodel = "m"\nprompt = "Hello"\n'
        + '[analyzers.custom]\nhandler = "vigil_test_any:handle"\n'
    )
    env = {"PYTHONPATH": str(tmp_path), "STATE_DIRECTORY": str(tmp_path / "state")}
    result = run_cli("check-config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.splitlines()[2:]]
    assert rows == [["a", "text, other"], ["plain", "none"], ["custom", "any (handler)"]]


def test_check_config_without_analyzers_warns(tmp_path: Path) -> None:
    """A config without analyzers is valid, but check-config says `run` will refuse it."""
    config = tmp_path / "vigil.toml"
    config.write_text(PROVIDER)
    result = run_cli("check-config", str(config), env={"STATE_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "no analyzers" in result.stderr and "--allow-empty" in result.stderr


@pytest.mark.skipif(os.path.exists(DEFAULT_CONFIG), reason=f"{DEFAULT_CONFIG} exists here")
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_no_config_file_found_names_the_paths_tried(command: str, tmp_path: Path) -> None:
    """With no --config, no $VIGIL_CONFIG and no default file, `check-config` and `run`
    exit 78 naming every place they looked, instead of running on defaults."""
    result = run_cli(command, env={"STATE_DIRECTORY": str(tmp_path)})
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == (
        "vigil: no config file found; tried --config (not given), $VIGIL_CONFIG (not set), "
        f"{DEFAULT_CONFIG} (does not exist). Name one with --config FILE\n"
    )
    assert not (tmp_path / "vigil.db").exists()

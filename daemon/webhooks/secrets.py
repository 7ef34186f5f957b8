"""Each webhook's signing key, read from the environment variable its `secret_env`
names, at start and on every reload. A missing, empty or short key is a config error
naming the variable (exit 78 at start; a refused reload), never showing a value."""

from __future__ import annotations

import os
from collections.abc import Mapping

from daemon.config import Config, ConfigError, WebhookConfig
from daemon.store.outbox import WebhookRoute

MIN_SECRET_CHARS = 16  # shorter keys are too easy to guess (and the log scrubber skips <6)


def read_secrets(webhooks: Mapping[str, WebhookConfig]) -> dict[str, bytes]:
    """{webhook: key}; ConfigError naming every variable that is unset or too short."""
    secrets: dict[str, bytes] = {}
    problems: list[str] = []
    for name, hook in webhooks.items():
        value = os.environ.get(hook.secret_env, "")
        where = f"$.webhooks.{name}.secret_env"
        if not value:
            problems.append(
                f"{where}: ${hook.secret_env} (the webhook's signing key) is not set or "
                "empty in the daemon's environment"
            )
        elif len(value) < MIN_SECRET_CHARS:
            problems.append(
                f"{where}: ${hook.secret_env} is shorter than {MIN_SECRET_CHARS} "
                "characters: too weak a signing key"
            )
        else:
            secrets[name] = value.encode()
    if problems:
        raise ConfigError("; ".join(problems))
    return secrets


def secret_values(config: Config) -> list[str]:
    """The keys that are set, for the log scrubber (no error for those missing)."""
    return [v for hook in config.webhooks.values() if (v := os.environ.get(hook.secret_env))]


def routes(config: Config) -> list[WebhookRoute]:
    """The webhooks, as the store matches job ends against them."""
    return [
        WebhookRoute(name, tuple(hook.events), tuple(hook.analyzers))
        for name, hook in sorted(config.webhooks.items())
    ]

"""The config's cross-field rules, which a Struct cannot express: each problem names
its key path. Kept apart from the Struct tree (config.py), which calls them once a
file decodes."""

from __future__ import annotations

import re

from daemon.config import (
    HANDLER_RE,
    Config,
    ProviderConfig,
    SpoolConfig,
    WebhookConfig,
    parse_listen,
    template_fields,
)


def speaks_anthropic(provider: ProviderConfig | None) -> bool:
    """Whether calls to `provider` go out in Anthropic's Messages dialect."""
    if provider is None:
        return False
    return provider.kind == "anthropic" or (
        provider.kind == "simulated" and provider.simulate.dialect == "anthropic"
    )


def config_problems(config: Config) -> list[str]:
    """Cross-field rules a Struct cannot express; each problem names its key path."""
    problems: list[str] = []
    if config.http.listen:
        try:
            parse_listen(config.http.listen)
        except ValueError as exc:
            problems.append(f"$.http.listen: {exc}")
    for name, provider in config.providers.items():
        path = f"$.providers.{name}"
        if provider.kind in ("openai", "anthropic") and not provider.base_url:
            problems.append(f'{path}.base_url: required for kind = "{provider.kind}"')
        if provider.dialect != "auto" and provider.kind != "openai":
            problems.append(f'{path}.dialect: only for kind = "openai"')
        if provider.kind == "openai" and not provider.api_version:
            from daemon.providers.openai import server_of  # config stays light to import

            if server_of(provider.dialect, provider.base_url) == "azure":
                problems.append(f"{path}.api_version: required for Azure OpenAI")
        if provider.kind == "anthropic" and provider.base_url.rstrip("/").endswith("/v1"):
            problems.append(
                f"{path}.base_url: the API root (https://api.anthropic.com): requests go to "
                "{base_url}/v1/messages"
            )
        if provider.budget is not None and provider.prices is None:
            problems.append(f"{path}.budget: needs [providers.{name}.prices] to price its calls")
        sim = provider.simulate
        if sim.dialect == "anthropic" and sim.tokens_per_minute:
            problems.append(
                f"{path}.simulate.tokens_per_minute: the anthropic dialect limits "
                "input_tokens_per_minute and output_tokens_per_minute"
            )
        if sim.dialect == "openai" and (
            sim.input_tokens_per_minute or sim.output_tokens_per_minute
        ):
            problems.append(
                f"{path}.simulate: input/output_tokens_per_minute are the anthropic "
                "dialect's; the openai dialect limits tokens_per_minute"
            )
        if provider.base_url and not provider.base_url.startswith(("http://", "https://")):
            problems.append(f"{path}.base_url: must start with http:// or https://")
    for name, analyzer in config.analyzers.items():
        path = f"$.analyzers.{name}"
        if analyzer.budget is not None:
            # A handler may call any provider: each must be priced.
            reach = [analyzer.provider] if not analyzer.handler else list(config.providers)
            for unpriced in [p for p in reach if p in config.providers]:
                if config.providers[unpriced].prices is None:
                    problems.append(
                        f"{path}.budget: provider {unpriced!r} has no prices to charge "
                        f"its calls (add [providers.{unpriced}.prices])"
                    )
        if analyzer.handler:
            if not HANDLER_RE.match(analyzer.handler):
                problems.append(f'{path}.handler: expected "package.module:function"')
            if analyzer.prompt:
                problems.append(f"{path}: set either `handler` or `prompt`, not both")
            if analyzer.provider and analyzer.provider not in config.providers:
                problems.append(f"{path}.provider: no provider named {analyzer.provider!r}")
            continue
        if not analyzer.prompt:
            problems.append(f"{path}.prompt: required (or set `handler`)")
        if not analyzer.model:
            problems.append(f"{path}.model: required for a prompt analyzer")
        if analyzer.provider not in config.providers:
            problems.append(f"{path}.provider: no provider named {analyzer.provider!r}")
        anthropic = speaks_anthropic(config.providers.get(analyzer.provider))
        if analyzer.cache_system and not anthropic:
            problems.append(f"{path}.cache_system: only for an Anthropic provider")
        if anthropic and analyzer.temperature > 1:
            problems.append(f"{path}.temperature: at most 1 for an Anthropic provider")
        if analyzer.required_keys and analyzer.output != "json":
            problems.append(f'{path}.required_keys: only valid with output = "json"')
        try:
            template_fields(analyzer.prompt)
        except ValueError as exc:
            problems.append(f"{path}.prompt: bad template: {exc}")
    url = config.store.url
    if url and not url.startswith(("postgresql://", "postgres://")):
        problems.append("$.store.url: a postgresql:// URL, or empty for SQLite in state_dir")
    if url and _url_password(url) is not None:
        problems.append(
            "$.store.url: holds a password; put it in the environment and name the "
            "variable in store.password_env"
        )
    if config.store.node_name and not re.fullmatch(r"[\w.@-]{1,64}", config.store.node_name):
        problems.append("$.store.node_name: letters, digits, '_', '.', '@', '-' (at most 64)")
    if config.daemon.socket_group and not _group_exists(config.daemon.socket_group):
        problems.append(f"$.daemon.socket_group: no group named {config.daemon.socket_group!r}")
    spool = config.intake.spool
    if spool is not None:
        problems.extend(_check_spool(config, spool))
    for name, hook in config.webhooks.items():
        problems.extend(_check_webhook(config, name, hook))
    return problems


def _check_webhook(config: Config, name: str, hook: WebhookConfig) -> list[str]:
    """A URL the sender can POST to; events Vigil emits; analyzers that exist."""
    from daemon.store.outbox import EVENT_KINDS
    from daemon.webhooks.urls import url_problem

    path = f"$.webhooks.{name}"
    problems: list[str] = []
    if (problem := url_problem(hook.url)) is not None:
        problems.append(f"{path}.url: {problem}")
    valid = ", ".join(f'"{kind}"' for kind in EVENT_KINDS)
    for event in hook.events:
        if event not in EVENT_KINDS:
            problems.append(f'{path}.events: unknown event "{event}"; expected some of {valid}')
    for seen in {e for e in hook.events if hook.events.count(e) > 1}:
        problems.append(f'{path}.events: "{seen}" is listed twice')
    for analyzer in hook.analyzers:
        if analyzer not in config.analyzers:
            known = ", ".join(sorted(config.analyzers)) or "none configured"
            problems.append(f"{path}.analyzers: no analyzer named {analyzer!r} (known: {known})")
    if hook.backoff_max_s < hook.backoff_base_s:
        problems.append(f"{path}.backoff_max_s: below backoff_base_s ({hook.backoff_base_s})")
    return problems


def _url_password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _check_spool(config: Config, spool: SpoolConfig) -> list[str]:
    """A spool job's input is {field: text, "filename": name}; anything else its
    analyzer's prompt needs would fail every file, so it is a config error."""
    problems: list[str] = []
    if not spool.dir:
        problems.append("$.intake.spool.dir: required")
    if "/" in spool.glob or not spool.glob:
        problems.append("$.intake.spool.glob: a file name pattern, without '/'")
    if not spool.field.isidentifier() or spool.field == "filename":
        problems.append('$.intake.spool.field: a plain name other than "filename"')
    analyzer = config.analyzers.get(spool.analyzer)
    if analyzer is None:
        problems.append(f"$.intake.spool.analyzer: no analyzer named {spool.analyzer!r}")
    elif not analyzer.handler:
        try:
            missing = set(template_fields(analyzer.prompt)) - {spool.field, "filename"}
        except ValueError:
            missing = set()  # reported with the analyzer
        if missing:
            problems.append(
                f"$.intake.spool.analyzer: {spool.analyzer!r} needs "
                f"{', '.join(sorted(missing))}, which spool files do not provide "
                f"(they give {spool.field} and filename)"
            )
    return problems

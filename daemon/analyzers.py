"""Analyzers: LLM prompt templates and Python handlers behind one interface.

Both kinds run through the same throttled provider callers, so a handler that makes
ten calls is rate limited exactly like a template that makes one."""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from daemon.config import AnalyzerConfig, Config, ConfigError, PriceConfig, template_fields
from daemon.jobs import CallRecord, Job, Usage
from daemon.spend.pricing import cost_usd, worst_cost_usd

if TYPE_CHECKING:
    from daemon.spend.guard import SpendGuard
from daemon.providers.base import (
    ChatRequest,
    Completion,
    Message,
    OutputInvalid,
    ProviderError,
)
from daemon.providers.phases import PhaseTimes

log = structlog.get_logger("vigil.spend")


class Provider(Protocol):
    name: str

    async def complete(
        self, request: ChatRequest, times: PhaseTimes | None = None
    ) -> Completion: ...

    def available(self) -> bool: ...


class AnalysisResult(msgspec.Struct, frozen=True, kw_only=True):
    result: Any
    usage: Usage
    http_status: int | None = None


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """Substitute `{field}`s; strings go in as they are, anything else as JSON."""
    return template.format_map(
        {
            name: value if isinstance(value, str) else msgspec.json.encode(value).decode()
            for name, value in values.items()
        }
    )


def parse_json_output(content: str, required_keys: list[str]) -> dict[str, Any]:
    """Models wrap JSON in prose or code fences; take the outermost object."""
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end < start:
        raise OutputInvalid("the answer holds no JSON object")
    try:
        value = msgspec.json.decode(content[start : end + 1])
    except msgspec.DecodeError as exc:
        raise OutputInvalid(f"the answer is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise OutputInvalid("the answer's JSON is not an object")
    missing = [key for key in required_keys if key not in value]
    if missing:
        raise OutputInvalid(f"the answer's JSON lacks required keys: {', '.join(missing)}")
    return value


class Calls:
    """The LLM calls of one attempt: sends them through the spend guard (when there
    is one), and adds up their usage and cost, keeping a record of each, and what
    they waited for and took (`times`, the attempt's phases)."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        prices: Mapping[str, PriceConfig],
        *,
        job: Job | None = None,
        guard: SpendGuard | None = None,
    ):
        self._providers = providers
        self._prices = prices
        self._job = job
        self._guard = guard
        self.records: list[CallRecord] = []
        self.usage = Usage()
        self.http_status: int | None = None
        self.answer: str | None = None  # the last answer's text, kept if the attempt fails
        self.stop_reason: str | None = None  # why the last answer ended
        self.times = PhaseTimes()

    async def complete(self, provider: str, request: ChatRequest) -> str:
        target = self._providers.get(provider)
        if target is None:
            raise ProviderError(
                f"no provider named {provider!r}", kind="NoProvider", retryable=False
            )
        price = self._prices.get(provider)
        job, guard = self._job, self._guard
        analyzer = job.analyzer if job is not None else ""
        worst = worst_cost_usd(request, price) if price is not None else 0.0
        hold = guard.reserve(analyzer, provider, worst) if guard is not None else None
        record = None
        try:
            completion = await target.complete(request, self.times)
            cost = None if price is None else cost_usd(completion, price)
            if price is not None and not (completion.prompt_tokens or completion.completion_tokens):
                # No usage reported: charged what it may have cost, never less.
                log.warning("spend.no_usage", provider=provider, charged_usd=round(worst, 6))
                cost = worst
            record = CallRecord(
                at=time.time(),
                job_id=job.id if job is not None else "",
                attempt=job.attempts if job is not None else 0,
                analyzer=analyzer,
                provider=provider,
                model=request.model,
                prompt_tokens=completion.prompt_tokens,
                cached_tokens=completion.cached_tokens,
                cache_write_tokens=completion.cache_write_tokens,
                completion_tokens=completion.completion_tokens,
                cost=cost,
            )
        finally:
            if guard is not None:
                guard.settle(hold, record)
        self.records.append(record)
        self.usage = self.usage + Usage(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cached_tokens=completion.cached_tokens,
            cache_write_tokens=completion.cache_write_tokens,
            cost=cost,
        )
        self.http_status = completion.http_status
        self.answer = completion.content
        self.stop_reason = completion.stop_reason
        return completion.content


class HandlerContext:
    """What a Python handler gets besides the input: its job, a logger bound to it,
    and `complete()`, whose calls go through the provider's limits."""

    def __init__(self, job: Job, config: AnalyzerConfig, calls: Calls) -> None:
        self.job = job
        self.log = structlog.get_logger("vigil.handler")
        self._config = config
        self._calls = calls

    async def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        json_mode: bool = False,
    ) -> str:
        cfg = self._config
        system = cfg.system if system is None else system
        messages = [Message("system", system)] if system else []
        messages.append(Message("user", prompt))
        request = ChatRequest(
            model=model or cfg.model,
            messages=messages,
            max_tokens=max_tokens or cfg.max_tokens,
            temperature=cfg.temperature if temperature is None else temperature,
            json_mode=json_mode,
            cache_system=cfg.cache_system,
        )
        return await self._calls.complete(provider or cfg.provider, request)


Handler = Callable[[dict[str, Any], HandlerContext], Awaitable[Any]]


class Analyzer:
    """One configured analyzer: validates inputs at submit time and runs attempts."""

    def __init__(self, name: str, config: AnalyzerConfig, handler: Handler | None = None):
        self.name = name
        self.config = config
        self.handler = handler
        self.fields = template_fields(config.prompt) if config.prompt else []

    def problems(self, input: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, reason) for each input field the prompt needs but does not get."""
        return [
            (f"input.{name}", f"missing: analyzer {self.name!r} needs it for its prompt")
            for name in self.fields
            if name not in input
        ]

    async def run(self, job: Job, calls: Calls) -> AnalysisResult:
        cfg = self.config
        result: Any
        if self.handler is not None:
            result = await self.handler(job.input, HandlerContext(job, cfg, calls))
        else:
            messages = [Message("system", cfg.system)] if cfg.system else []
            messages.append(Message("user", fill_template(cfg.prompt, job.input)))
            content = await calls.complete(
                cfg.provider,
                ChatRequest(
                    model=cfg.model,
                    messages=messages,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    json_mode=cfg.output == "json",
                    cache_system=cfg.cache_system,
                ),
            )
            result = content
            if cfg.output == "json":
                try:
                    result = parse_json_output(content, cfg.required_keys)
                except OutputInvalid:
                    if calls.stop_reason != "max_tokens":
                        raise
                    raise OutputInvalid(
                        f"the answer was cut at max_tokens ({cfg.max_tokens}) before its JSON "
                        f"ended: raise analyzers.{self.name}.max_tokens"
                    ) from None
        return AnalysisResult(result=result, usage=calls.usage, http_status=calls.http_status)


class HandlerImportError(ConfigError):
    """A handler that cannot be loaded is a config error: restarting will not fix it."""


def load_handler(analyzer: str, spec: str) -> Handler:
    """Import `package.module:function`; runs at start-up and reload, not per job.
    Whatever the import raises (a SyntaxError, a module that fails at import time)
    is reported against the analyzer's `handler` key."""
    module_name, _, attr = spec.partition(":")
    where = f"$.analyzers.{analyzer}.handler"
    try:
        module = importlib.import_module(module_name)
        handler: Handler = getattr(module, attr)
    except Exception as exc:
        raise HandlerImportError(
            f"{where}: cannot load {spec!r}: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(handler):
        raise HandlerImportError(f"{where}: {spec!r} is not callable")
    return handler


def build_analyzers(config: Config) -> dict[str, Analyzer]:
    return {
        name: Analyzer(name, cfg, load_handler(name, cfg.handler) if cfg.handler else None)
        for name, cfg in config.analyzers.items()
    }

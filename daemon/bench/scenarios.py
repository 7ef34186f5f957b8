"""The scenarios of `vigil bench throttle`: what the simulated API enforces, what Vigil
is told, which budget binds, and what counts as a target met; and what each scenario
makes of that: the API's command line, the daemon's config, the jobs it submits.

The OpenAI scenarios point a `kind = "openai"` provider at the API in OpenAI's dialect;
the Anthropic ones a `kind = "anthropic"` provider at the API root in Anthropic's
(three budgets: requests, input tokens, output tokens; no key needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["throughput", "learn", "outage", "overloaded"]
Bound = Literal["requests", "tokens", "input_tokens"]
WarmUp = Literal["burst", "learned"]
"""When the measuring window opens: once the API's initial burst is spent ("burst"),
or once the daemon has learned every limit the API enforces from its headers and its
cool-down is over ("learned": Vigil was told no limits)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    api_rpm: int
    api_tpm: int
    latency_ms: float
    vigil_rpm: int
    vigil_tpm: int
    bound: Bound | None  # None: no warm-up, no window
    jobs: int
    text_chars: int
    max_tokens: int
    target_utilisation: float | None = None
    max_429_share: float | None = None  # learn: of the requests after the limit was learned
    kind: Kind = "throughput"
    max_attempts: int = 10
    breaker_open_s: float = 30.0  # the daemon's default
    dialect: Literal["openai", "anthropic"] = "openai"
    api_itpm: int = 0  # anthropic: the API's input and output tokens per minute
    api_otpm: int = 0
    vigil_itpm: int = 0
    vigil_otpm: int = 0
    overload_rate: float = 0.0  # the API turns this share away overloaded (529)
    warm_up: WarmUp = "burst"

    @property
    def cost(self) -> int:
        """One request's charge against the bound budget, as the API counts it: OpenAI's
        tokens are prompt + max_tokens, Anthropic's input tokens the prompt's alone."""
        if self.bound == "tokens":
            return self.text_chars // 4 + self.max_tokens
        if self.bound == "input_tokens":
            return self.text_chars // 4
        return 1

    @property
    def api_limits(self) -> dict[str, int]:
        """The API's limits in force, by the daemon's budget names."""
        return _set(self.api_rpm, self.api_tpm, self.api_itpm, self.api_otpm)

    @property
    def vigil_limits(self) -> dict[str, int]:
        """The limits Vigil is configured with, by the same names."""
        return _set(self.vigil_rpm, self.vigil_tpm, self.vigil_itpm, self.vigil_otpm)

    @property
    def api_limit(self) -> int:
        return self.api_limits.get(self.bound or "requests", 0)

    @property
    def vigil_limit(self) -> int:
        return self.vigil_limits.get(self.bound or "requests", 0)


def _set(requests: int, tokens: int, input_tokens: int, output_tokens: int) -> dict[str, int]:
    limits = {
        "requests": requests,
        "tokens": tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    }
    return {name: limit for name, limit in limits.items() if limit}


SCENARIOS = {
    "request": Scenario(
        "request", "request-bound: API 3000 RPM, Vigil the same",
        api_rpm=3000, api_tpm=0, latency_ms=200, vigil_rpm=3000, vigil_tpm=0,
        bound="requests", jobs=2000, text_chars=400, max_tokens=50,
        target_utilisation=0.99, max_429_share=0.002,
    ),
    "misconfigured": Scenario(
        "misconfigured", "Vigil set 20 % above the API's real 3000 RPM",
        api_rpm=3000, api_tpm=0, latency_ms=200, vigil_rpm=3600, vigil_tpm=0,
        bound="requests", jobs=2000, text_chars=400, max_tokens=50,
        target_utilisation=0.97, max_429_share=0.01,
    ),
    "token": Scenario(
        "token", "token-bound: API 600,000 TPM, ~1,000-token requests",
        api_rpm=0, api_tpm=600_000, latency_ms=200, vigil_rpm=0, vigil_tpm=600_000,
        bound="tokens", jobs=600, text_chars=3000, max_tokens=250,
        target_utilisation=0.95, max_429_share=0.01,
    ),
    "misconfigured-small": Scenario(
        "misconfigured-small", "Vigil set x10 above the API's real 60 RPM (one a second)",
        api_rpm=60, api_tpm=0, latency_ms=200, vigil_rpm=600, vigil_tpm=0,
        bound=None, jobs=36, text_chars=400, max_tokens=50,
        max_429_share=0.01, kind="learn", max_attempts=3,
    ),
    "outage": Scenario(
        "outage", "API down when 300 jobs arrive, back on the same port later",
        api_rpm=0, api_tpm=0, latency_ms=200, vigil_rpm=0, vigil_tpm=0,
        bound=None, jobs=300, text_chars=400, max_tokens=50,
        kind="outage", breaker_open_s=5.0,
    ),
    "anthropic-request": Scenario(
        "anthropic-request",
        "Anthropic, request-bound: API 3000 RPM (ITPM, OTPM far above), Vigil the same",
        api_rpm=3000, api_tpm=0, latency_ms=200, vigil_rpm=3000, vigil_tpm=0,
        bound="requests", jobs=2000, text_chars=400, max_tokens=50,
        target_utilisation=0.99, max_429_share=0.002, dialect="anthropic",
        api_itpm=2_000_000, api_otpm=1_000_000, vigil_itpm=2_000_000, vigil_otpm=1_000_000,
    ),
    "anthropic-learned": Scenario(
        "anthropic-learned",
        "Anthropic, Vigil told no limits: API 4000 RPM, 400,000 ITPM, 200,000 OTPM, "
        "~1,000-token inputs",
        api_rpm=4000, api_tpm=0, latency_ms=200, vigil_rpm=0, vigil_tpm=0,
        bound="input_tokens", jobs=250, text_chars=4000, max_tokens=250,
        target_utilisation=0.95, max_429_share=0.01, dialect="anthropic",
        api_itpm=400_000, api_otpm=200_000, warm_up="learned",
    ),
    "anthropic-overloaded": Scenario(
        "anthropic-overloaded", "Anthropic, a 529 storm: 30 % of requests overloaded, no limits",
        api_rpm=0, api_tpm=0, latency_ms=200, vigil_rpm=0, vigil_tpm=0,
        bound=None, jobs=300, text_chars=400, max_tokens=50,
        kind="overloaded", dialect="anthropic", overload_rate=0.3,
    ),
    "smoke": Scenario(
        "smoke", "a quick self-check with high limits (no targets)",
        api_rpm=600_000, api_tpm=0, latency_ms=5, vigil_rpm=600_000, vigil_tpm=0,
        bound=None, jobs=30, text_chars=200, max_tokens=50,
    ),
}  # fmt: skip
ALL = (
    "request",
    "misconfigured",
    "token",
    "misconfigured-small",
    "outage",
    "anthropic-request",
    "anthropic-learned",
    "anthropic-overloaded",
)
API_SLICE_S = 1.0  # the simulated API enforces its per-minute limits in 1-second slices
BREAKER_FAILURES = 5  # the daemon's default
_FILLER = " ".join(
    ["the launch of the new service went well and the team is happy with the results"] * 80
)
_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def _provider(s: Scenario, url: str) -> str:
    """The provider's kind, address and limits: Anthropic's three budgets at the API
    root (the simulated API takes no key), or OpenAI's two at its /v1."""
    if s.dialect == "anthropic":
        return f"""kind = "anthropic"
base_url = "{url}"
requests_per_minute = {s.vigil_rpm}
input_tokens_per_minute = {s.vigil_itpm}
output_tokens_per_minute = {s.vigil_otpm}"""
    return f"""kind = "openai"
base_url = "{url}"
requests_per_minute = {s.vigil_rpm}
tokens_per_minute = {s.vigil_tpm}"""


def daemon_config(s: Scenario, url: str) -> str:
    return f"""
[http]
listen = ""

[queue]
max_concurrency = 96
backoff_base_s = 0.5
backoff_max_s = 10

[log]
format = "json"

[providers.api]
{_provider(s, url)}
max_concurrency = 64
timeout_s = 30
breaker_failures = {BREAKER_FAILURES}
breaker_open_s = {s.breaker_open_s}

[analyzers.bench]
provider = "api"
model = "{_MODELS[s.dialect]}"
prompt = "{{text}}"
max_tokens = {s.max_tokens}
max_attempts = {s.max_attempts}
timeout_s = 120
"""


def api_args(s: Scenario) -> list[str]:
    if s.dialect == "anthropic":
        limits = ["--dialect", "anthropic", "--rpm", str(s.api_rpm)]
        limits += ["--itpm", str(s.api_itpm), "--otpm", str(s.api_otpm)]
    else:
        limits = ["--rpm", str(s.api_rpm), "--tpm", str(s.api_tpm)]
    if s.overload_rate:
        limits += ["--overload-rate", str(s.overload_rate)]
    return [
        *limits,
        *("--slice-s", str(API_SLICE_S), "--latency-ms", str(s.latency_ms), "--seed", "1"),
    ]


def make_job(s: Scenario, i: int) -> dict[str, Any]:
    text = (f"Document {i}. " + _FILLER)[: s.text_chars]
    return {"analyzer": "bench", "input": {"text": text}}

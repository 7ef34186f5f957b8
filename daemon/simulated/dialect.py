"""The seam between the simulated API's core (counting, misbehaviour, faults, serving)
and the dialect it speaks (OpenAI's chat completions or Anthropic's Messages): the
core works on a dialect-neutral `Turn` and `Reply`, and each `Dialect` reads its own
requests into a Turn, writes a Reply in its own shape, and renders errors its way.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar, NamedTuple

import msgspec

from daemon.config import SimulateConfig
from daemon.simulated.cache import Breakpoint, CacheUse
from daemon.simulated.limits import Cost, RateLimits
from daemon.simulated.wire import ApiError


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the core sees it, whatever the dialect."""

    model: str
    text: str  # what the fake model reads: the last user message
    json_object: bool  # whether the answer must be a JSON object
    max_tokens: int
    prompt_tokens: int  # the whole prompt, 4 chars a token
    stop_sequences: tuple[str, ...] = ()
    breakpoints: tuple[Breakpoint, ...] = ()  # cacheable prefixes, shortest first


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """One answer as the core made it. `finish` is "stop", "length" or
    "stop_sequence"; `input_tokens` excludes what the prompt cache read or wrote."""

    content: str
    finish: str
    stop_sequence: str | None = None
    input_tokens: int
    output_tokens: int
    cache_read: int = 0
    cache_creation: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read + self.cache_creation


class Dialect(ABC):
    """What one API dialect says, and how; stateless (the budgets it builds are not)."""

    name: ClassVar[str]
    path: ClassVar[str]  # the chat endpoint, from the API root
    charges_output: ClassVar[bool]  # whether an answer's output tokens spend a budget

    @abstractmethod
    def base_url(self, root: str) -> str:
        """What a client of this dialect configures, given `http://HOST:PORT`."""

    @abstractmethod
    def parse(self, raw: bytes, headers: Mapping[str, str]) -> Turn:
        """Read a request, or raise its 400."""

    @abstractmethod
    def cost(self, turn: Turn, cache: CacheUse) -> Cost:
        """What `turn` costs its budgets at admission."""

    @abstractmethod
    def limits(self, settings: SimulateConfig, clock: Callable[[], float]) -> RateLimits:
        """Fresh, full budgets for `settings`."""

    @abstractmethod
    def render(self, turn: Turn, reply: Reply, ident: str) -> bytes:
        """The success body; `ident` makes its id unique."""

    @abstractmethod
    def empty(self, turn: Turn) -> bytes:
        """A 200 with valid JSON but no answer in it (the no-choices fault)."""

    @abstractmethod
    def error_body(self, error: ApiError) -> bytes:
        """`error` in this dialect's error shape."""

    @abstractmethod
    def not_found(self, method: str, path: str) -> ApiError:
        """The other dialect's endpoint, asked of this one."""

    @abstractmethod
    def server_error(self, headers: dict[str, str]) -> ApiError:
        """An `error_rate` failure."""

    @abstractmethod
    def overloaded(self, headers: dict[str, str]) -> ApiError:
        """An `overload_rate` rejection."""

    @abstractmethod
    def fault_error(self, fault: str) -> ApiError | None:
        """The error a named fault answers with; None for the faults that damage a
        good answer instead (or that look the same in every dialect)."""

    @abstractmethod
    def models(self) -> bytes:
        """The `GET /v1/models` body."""

    def answer_headers(self) -> dict[str, str]:
        """Headers every answer on the chat endpoint carries."""
        return {}


class Invalid(NamedTuple):
    """A request body that failed validation, as both dialects name it."""

    path: str  # the JSON path at fault, "" for the whole body: "messages[0].content"
    missing: str | None  # a required field missing at `path`
    reason: str


_AT_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def describe(exc: msgspec.DecodeError) -> Invalid | None:
    """What is wrong with a body msgspec refused; None if it is not even JSON."""
    if not isinstance(exc, msgspec.ValidationError):
        return None
    text = str(exc)
    at = _AT_RE.search(text)
    missing = _MISSING_RE.match(text)
    return Invalid(
        at["path"] if at else "",
        missing["field"] if missing else None,
        text[: at.start()] if at else text,
    )

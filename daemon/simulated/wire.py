"""The simulated API's OpenAI wire format (chat completions): the request it reads, the
completion and error bodies it answers with; and `ApiError`, the answer other than
success that either dialect renders in its own shape. Apart from the API so that its
model, rate limits and faults can speak it too.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

DEFAULT_MAX_TOKENS = 256
"""Completion budget when a request names none (also what it costs against the TPM)."""


class _Part(msgspec.Struct):
    type: str = "text"
    text: str = ""


class InMessage(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object"] = "text"


class ChatRequest(msgspec.Struct):
    """What we read of an OpenAI request; unknown fields are ignored, as OpenAI does."""

    messages: Annotated[list[InMessage], Meta(min_length=1)]
    model: str = "simulated"
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    response_format: _ResponseFormat | None = None
    stream: bool = False


class OutMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: OutMessage
    finish_reason: str


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts; the details appear only when part of the prompt came from cache."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


ENCODER = msgspec.json.Encoder()


class ApiError(Exception):
    """An answer other than success, carried out of the request pipeline; the dialect
    spoken renders it (`type_`, `param` and `code` are OpenAI's words: Anthropic's
    error type follows from the status)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

"""The simulated API's Anthropic wire format (the Messages API): the request it reads,
the message and error bodies it answers with. Unknown fields are ignored, as the real
API ignores those it does not use here (tools, thinking, top_k...).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_CACHE_BREAKPOINTS = 4
"""Anthropic refuses more blocks with cache_control than this."""


class CacheControl(msgspec.Struct, frozen=True):
    type: Literal["ephemeral"]


class TextBlock(msgspec.Struct, frozen=True):
    """A content block; only text is understood (others are a 400 naming them)."""

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class InMessage(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class Metadata(msgspec.Struct, frozen=True):
    user_id: str | None = None


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What we read of a `POST /v1/messages` body."""

    model: str
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)]
    messages: Annotated[list[InMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop_sequences: list[str] = []
    stream: bool = False
    metadata: Metadata | None = None


class TextOut(msgspec.Struct, frozen=True):
    type: str
    text: str


class MessageUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class Message(msgspec.Struct, frozen=True):
    id: str
    type: str
    role: str
    model: str
    content: list[TextOut]
    stop_reason: str | None
    stop_sequence: str | None
    usage: MessageUsage


class ErrorDetail(msgspec.Struct, frozen=True):
    type: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    type: str
    error: ErrorDetail


class ModelInfo(msgspec.Struct, frozen=True):
    type: str
    id: str
    display_name: str
    created_at: str


class ModelList(msgspec.Struct, frozen=True):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None

"""The control socket's wire format: newline-delimited JSON, one request, one reply.

`{"id", "cmd", "args"}` in; `{"id", "ok": true, "data"}` or
`{"id", "ok": false, "error": {"code", "message", "details"}}` out.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_LINE_BYTES = 16 * 1024 * 1024

RequestId = int | str | None


class Args(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A command's arguments: typed, and an unknown one (a typo) is an error."""


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cmd: str
    id: RequestId = None
    args: dict[str, Any] = {}


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    details: Any = None


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    id: RequestId
    ok: bool
    data: Any = None
    error: ErrorBody | None = None


class CommandError(Exception):
    """A command failed in a way the client should be told about, with a code."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)
encoder = msgspec.json.Encoder()


def encode_line(message: msgspec.Struct) -> bytes:
    return encoder.encode(message) + b"\n"

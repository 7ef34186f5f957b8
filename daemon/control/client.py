"""The client side of the control socket, for the CLI and the tests."""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from daemon.control.protocol import MAX_LINE_BYTES, Request, encode_line, reply_decoder


class DaemonUnavailable(Exception):
    """Nothing answers on the socket; the message names the path tried."""


class RemoteError(Exception):
    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ControlClient(anyio.AsyncContextManagerMixin):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._stream: SocketStream | None = None
        self._reader: BufferedByteReceiveStream | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        try:
            stream = await anyio.connect_unix(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailable(
                f"vigil daemon not reachable at {self.path}: {exc.strerror or exc}"
            ) from None
        except PermissionError as exc:
            raise DaemonUnavailable(
                f"no permission to use {self.path}: {exc.strerror or exc}"
            ) from None
        async with stream:
            self._stream, self._reader = stream, BufferedByteReceiveStream(stream)
            yield self

    async def call(self, cmd: str, **args: Any) -> Any:
        await self._send(cmd, args)
        return await self._receive()

    async def stream(self, cmd: str, **args: Any) -> AsyncIterator[Any]:
        """A streaming command (`logs` with follow): one item per reply line, until
        the daemon goes away (DaemonUnavailable) or the caller stops iterating."""
        await self._send(cmd, args)
        while True:
            yield await self._receive()

    async def _send(self, cmd: str, args: dict[str, Any]) -> None:
        assert self._stream is not None
        try:
            await self._stream.send(encode_line(Request(cmd, next(self._ids), args)))
        except (anyio.BrokenResourceError, OSError) as exc:
            raise self._gone(exc) from None

    async def _receive(self) -> Any:
        assert self._reader is not None
        try:
            line = await self._reader.receive_until(b"\n", MAX_LINE_BYTES)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError) as exc:
            raise self._gone(exc) from None
        reply = reply_decoder.decode(line)
        if not reply.ok:
            error = reply.error
            assert error is not None
            raise RemoteError(error.code, error.message, error.details)
        return reply.data

    def _gone(self, exc: BaseException) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"vigil daemon at {self.path} closed the connection ({type(exc).__name__})"
        )

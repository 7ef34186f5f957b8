"""The control socket: a Unix stream socket, mode 0600 (0660 with a socket group),
peers checked by uid and groups as the kernel reports them.

A client can send anything; the answer is always a well-formed reply or a closed
connection, and the daemon never dies of it."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from daemon.control.commands import MUTATING, execute
from daemon.control.protocol import (
    MAX_LINE_BYTES,
    CommandError,
    ErrorBody,
    Reply,
    RequestId,
    encode_line,
    request_decoder,
)
from daemon.errors import StartupError
from daemon.runtime import Runtime

log = structlog.get_logger("vigil.control")
MAX_CONNECTIONS = 256
REFUSED_DRAIN_S = 1.0
REFUSED_DRAIN_READS = 16  # of up to 64 KiB each
IDLE_TIMEOUT_S = 3600.0


class SocketInUse(StartupError):
    """Another process is serving the control socket."""


class SocketGroupRefused(StartupError):
    """The socket cannot be given to `daemon.socket_group`; a human must fix the setup."""

    exit_code = 78


def _peer(stream: SocketStream) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the connected process, from the kernel (SO_PEERCRED)."""
    sock = stream.extra(SocketAttribute.raw_socket)
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python may lack the name


# Python's getsockopt takes at most 1024 bytes: the first 256 groups (gid_t) of a peer.
MAX_PEER_GROUPS = 256


def _peer_groups(stream: SocketStream) -> tuple[int, ...]:
    """The connected process's supplementary groups, from the kernel (SO_PEERGROUPS):
    an operator is usually in the socket's group as a supplementary one. Read from the
    socket, not /proc, which the unit hides (ProtectProc=invisible). A peer in more
    than MAX_PEER_GROUPS groups, or an older kernel, leaves the primary group alone to
    decide (refused, and logged)."""
    sock = stream.extra(SocketAttribute.raw_socket)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError as exc:
        log.warning("control.peer_groups_unreadable", error=str(exc))
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


async def _prepare_path(path: Path) -> None:
    """Refuse to steal a live socket; remove a stale one left by a dead process."""
    apath = anyio.Path(path)
    await apath.parent.mkdir(parents=True, exist_ok=True)
    if not await apath.exists():
        return
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        await apath.unlink(missing_ok=True)
        return
    await stream.aclose()
    raise SocketInUse(f"another process is serving {path}")


class ControlServer:
    def __init__(self, runtime: Runtime, path: Path, group: str = "") -> None:
        self._rt = runtime
        self.path = path
        self._group = group
        self._connections = 0
        self._uid = os.getuid()
        self._gid: int | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await _prepare_path(self.path)
        mode = 0o660 if self._group else 0o600
        listener = await anyio.create_unix_listener(self.path, mode=mode)
        try:
            async with listener:
                if self._group:
                    self._gid = self._give_to_group()
                async with anyio.create_task_group() as tg:
                    task_status.started()
                    await listener.serve(self._handle, task_group=tg)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _give_to_group(self) -> int:
        import grp

        try:
            gid = grp.getgrnam(self._group).gr_gid
            os.chown(self.path, -1, gid)
        except (KeyError, OSError) as exc:
            reason = "no such group" if isinstance(exc, KeyError) else exc.strerror
            raise SocketGroupRefused(
                f"cannot give the control socket {self.path} to group {self._group!r} "
                f"(daemon.socket_group): {reason}. The daemon's user must be in that group "
                "(systemd: SupplementaryGroups=) and allowed to chown (SystemCallFilter=@chown, "
                "after the unit's other SystemCallFilter= lines)"
            ) from None
        return gid

    def _allowed(self, stream: SocketStream, peer: tuple[int, int, int] | None) -> bool:
        if peer is None:
            return True
        _, uid, gid = peer
        if uid in (0, self._uid):
            return True
        if self._gid is None:
            return False
        return gid == self._gid or self._gid in _peer_groups(stream)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            if self._connections >= MAX_CONNECTIONS:
                await self._refuse(stream, "busy", "too many control connections")
                return
            peer = _peer(stream)
            if not self._allowed(stream, peer):
                log.warning("control.refused", peer_pid=peer and peer[0], peer_uid=peer and peer[1])
                await self._refuse(stream, "forbidden", "peer not allowed")
                return
            self._connections += 1
            try:
                await self._serve(stream, peer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away mid-reply
            except Exception:  # whatever a client did, it costs its connection, not us
                log.exception("control.connection_failed", peer_pid=peer and peer[0])
            finally:
                self._connections -= 1

    async def _serve(self, stream: SocketStream, peer: tuple[int, int, int] | None) -> None:
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                with anyio.fail_after(IDLE_TIMEOUT_S):
                    line = await reader.receive_until(b"\n", MAX_LINE_BYTES)
            except (anyio.IncompleteRead, anyio.EndOfStream, TimeoutError):
                return
            except anyio.DelimiterNotFound:
                await self._send_error(
                    stream,
                    None,
                    "line_too_long",
                    f"request line longer than {MAX_LINE_BYTES} bytes",
                )
                return  # the rest of that line cannot be re-synchronised
            if not line.strip():
                continue
            reply = await self._reply(line, peer)
            if isinstance(reply, bytes):
                await stream.send(reply)
            else:
                await self._stream_replies(stream, reader, *reply)
                return

    async def _stream_replies(
        self,
        stream: SocketStream,
        reader: BufferedByteReceiveStream,
        rid: RequestId,
        items: AsyncIterator[Any],
    ) -> None:
        """Send one reply line per item until the client closes its side."""

        async def until_closed(scope: anyio.CancelScope) -> None:
            with contextlib.suppress(
                anyio.EndOfStream, anyio.IncompleteRead, OSError, anyio.BrokenResourceError
            ):
                while True:
                    await reader.receive()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_closed, tg.cancel_scope)
            async for item in items:
                await stream.send(encode_line(Reply(rid, True, data=item)))
            tg.cancel_scope.cancel()

    async def _reply(
        self, line: bytes, peer: tuple[int, int, int] | None
    ) -> bytes | tuple[RequestId, AsyncIterator[Any]]:
        try:
            request = request_decoder.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return encode_line(
                Reply(_guess_id(line), False, error=ErrorBody("bad_request", f"bad request: {why}"))
            )
        if request.cmd in MUTATING:
            log.info(
                "control.command",
                cmd=request.cmd,
                peer_pid=peer and peer[0],
                peer_uid=peer and peer[1],
            )
        try:
            data = await execute(self._rt, request.cmd, request.args)
        except CommandError as exc:
            return encode_line(
                Reply(request.id, False, error=ErrorBody(exc.code, exc.message, exc.details))
            )
        except Exception as exc:  # a bug in one command must not take the daemon down
            log.exception("control.command_failed", cmd=request.cmd)
            return encode_line(
                Reply(
                    request.id, False, error=ErrorBody("internal", f"{type(exc).__name__}: {exc}")
                )
            )
        if isinstance(data, AsyncIterator):
            return request.id, data
        try:
            return encode_line(Reply(request.id, True, data=data))
        except (RecursionError, TypeError, ValueError, msgspec.EncodeError) as exc:
            log.error("control.reply_unencodable", cmd=request.cmd, error=repr(exc))
            error = ErrorBody("internal", f"the reply could not be encoded ({type(exc).__name__})")
            return encode_line(Reply(request.id, False, error=error))

    @classmethod
    async def _refuse(cls, stream: SocketStream, code: str, message: str) -> None:
        """Say why, then take in (and drop) what the client already sent before closing:
        closing on unread data resets the connection, and the client would get the
        reset instead of the reason. Bounded in time and bytes; nothing is parsed."""
        await cls._send_error(stream, None, code, message)
        with (
            contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError),
            anyio.move_on_after(REFUSED_DRAIN_S),
        ):
            await stream.send_eof()
            for _ in range(REFUSED_DRAIN_READS):
                await stream.receive()

    @staticmethod
    async def _send_error(stream: SocketStream, rid: RequestId, code: str, message: str) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.send(encode_line(Reply(rid, False, error=ErrorBody(code, message))))


def _guess_id(line: bytes) -> RequestId:
    """Echo the id of a request whose other parts are wrong, when it can be read."""
    try:
        value = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(value, dict):
        rid = value.get("id")
        if isinstance(rid, str) or (isinstance(rid, int) and abs(rid) < 2**63):
            return rid
    return None

"""Group commit for a shared store's hottest write, the end of an attempt: ends that
arrive while one batch is being written go together in the next, one statement for
many, as SQLite's single writer does. Nothing waits for company: a lone end is written
at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from daemon.store.base import StoreError

T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 64
MAX_WAITING = 8192


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    done: anyio.Event = field(default_factory=anyio.Event)
    result: R | None = None
    error: BaseException | None = None


class Batcher(Generic[T, R]):
    """`write` gets a batch and returns, for each item in order, its result or the
    exception that item alone raised; an exception `write` raises fails them all."""

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]):
        self._write = write
        self._send: MemoryObjectSendStream[_Pending[T, R]] | None = None  # while running

    async def submit(self, item: T) -> R:
        pending: _Pending[T, R] = _Pending(item)
        if self._send is None:
            raise StoreError("the store is not open")
        try:
            await self._send.send(pending)
        except anyio.ClosedResourceError:
            raise StoreError("the store is closing") from None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[_Pending[T, R]](MAX_WAITING)
        self._send = send
        task_status.started()
        async with send, receive:
            async for first in receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                # A batch is written whole, or fails whole, even if shutdown cancels us.
                with anyio.CancelScope(shield=True):
                    await self._run(batch)

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        try:
            results = await self._write([p.item for p in batch])
        except Exception as exc:
            for pending in batch:
                pending.error = exc
        else:
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    pending.error = result
                else:
                    pending.result = result
        for pending in batch:
            pending.done.set()

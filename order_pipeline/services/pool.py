"""The courier pool: a bounded number of couriers shared by all orders."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Final, Protocol

import attrs
import trio

log = logging.getLogger(__name__)

MIN_SIZE: Final = 1
MAX_SIZE: Final = 128


def clamp_size(size: int) -> int:
    return max(MIN_SIZE, min(MAX_SIZE, size))


class PoolFull(Exception):
    """Every slot is taken and `queue_limit` orders already wait: shed, do not queue."""


class PoolObserver(Protocol):
    """Hears each order the pool sheds (metrics implement it).

    The figures that change on every order, `in_use` and `waiting`, are read by
    whoever needs them, when they need them: no call per change.
    """

    def pool_shed(self) -> None: ...


class _Unobserved:
    def pool_shed(self) -> None:
        pass


@attrs.define(eq=False)
class CourierPool:
    """A `trio.CapacityLimiter` whose size is clamped to 1..128, with a bounded queue.

    Waiting for a slot is a checkpoint like any other: a cancelled order stops
    waiting at once, and a slot taken is released on every path. When
    `queue_limit` orders already wait, `slot()` raises `PoolFull` at once
    instead of holding one more client until its deadline.
    """

    size: int = attrs.field(converter=clamp_size)
    queue_limit: int | None = None
    observer: PoolObserver = attrs.field(factory=_Unobserved)
    wait_span: Callable[[int], AbstractContextManager[None]] | None = attrs.field(
        default=None, kw_only=True
    )
    """Wraps each real wait for a slot, given how many wait already (tracing's `courier wait`
    span); an order that finds a slot free calls nothing."""
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.size)

    def slot(self) -> _Slot:
        """`async with pool.slot():` holds one courier for the body."""
        return _Slot(self)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if need be; raise `PoolFull` if the line is full."""
        limiter = self._limiter
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # Only an order that really has to wait counts against the queue limit.
            limiter.acquire_nowait()
        except trio.WouldBlock:
            if self.queue_limit is not None and self.waiting >= self.queue_limit:
                self.observer.pool_shed()
                raise PoolFull from None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("waiting for a courier slot (%d waiting already)", self.waiting)
            if self.wait_span is None:
                await limiter.acquire()
            else:
                with self.wait_span(self.waiting):
                    await limiter.acquire()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        self._limiter.release()

    @property
    def in_use(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting


@attrs.frozen
class _Slot:
    """One slot as an async context manager: a class, not a generator, on every order's path."""

    pool: CourierPool

    async def __aenter__(self) -> None:
        await self.pool.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.pool.release()

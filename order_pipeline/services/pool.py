"""The courier pool: a bounded number of couriers shared by all orders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

MIN_SIZE: Final = 1
MAX_SIZE: Final = 128


def clamp_size(size: int) -> int:
    return max(MIN_SIZE, min(MAX_SIZE, size))


@attrs.define(eq=False)
class CourierPool:
    """A `trio.CapacityLimiter` whose size is clamped to 1..128.

    Waiting for a slot is a checkpoint like any other: a cancelled order stops
    waiting at once, and a slot taken is released on every path.
    """

    size: int = attrs.field(converter=clamp_size)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.size)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._limiter:
            yield

    @property
    def in_use(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

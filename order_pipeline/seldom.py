"""A warning that repeats many times a second while something lasts, said about once a second.

A store outage fails every batch (each holding its records for the next commit) and
refuses every new order: a line each was 60 lines a second at 30 orders/s, the same line.
`Seldom` says the first at once, then at most one line a period, the latest, with how many
like it went unsaid since the line before (`more_like_it`): the lines count every one. Its
end (`ended`: the store commits again) is a line too, after the last one left unsaid.
Standard library only: the store, the desk and the process all use it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["Seldom", "SeldomWarning", "more_like_it"]

# At most one line a second while an outage lasts; the first at once.
EVERY_S: Final = 1.0


def more_like_it(unsaid: int) -> str:
    """What a line said seldom adds when others like it went unsaid before it."""
    return f" (and {unsaid} more like it since the last such line)" if unsaid else ""


class Seldom:
    """Times a repeated line: `due` says whether one is said now, and how many went unsaid.

    The first is due at once; after a line, the next is due `every` seconds later, and
    those before are counted. `clock` is injected where a test keeps the time.
    """

    def __init__(self, every: float = EVERY_S, clock: Callable[[], float] = time.monotonic):
        self._every, self._clock = every, clock
        self._next = float("-inf")
        self.unsaid = 0

    def ready(self) -> bool:
        """Whether a line said now is due (nothing counted)."""
        return self._clock() >= self._next

    def due(self) -> int | None:
        """None: too soon, this one is counted unsaid; else how many went unsaid before it."""
        now = self._clock()
        if now < self._next:
            self.unsaid += 1
            return None
        self._next = now + self._every
        unsaid, self.unsaid = self.unsaid, 0
        return unsaid

    def restart(self) -> None:
        """What repeated has ended: the count starts again, and the next line is due at once."""
        self._next = float("-inf")
        self.unsaid = 0


class SeldomWarning:
    """`message % args` logged at warning through a `Seldom`, while it lasts, and `ended` (with
    its count of the outage's occurrences) once it stops.

    A line left unsaid when it ends is said then, as the last of the outage, in the context
    it was logged in (its request ID). The end is said no sooner than a line would be due
    (so an outage that comes and goes is still a line a second): till then it is `ending`,
    and a later call of `ended` says it, unless a `warning` says the outage goes on; `close`
    says it at once when no call will come (the store closes, the process exits).
    """

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        ended: str,
        *,
        every: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._message, self._ended = logger, message, ended
        self._seldom = Seldom(every, clock)
        self._count = 0  # occurrences since the outage began; 0: none is lasting
        self._last: tuple[tuple[Any, ...], contextvars.Context] | None = None  # left unsaid
        self.ending = False

    def warning(self, *args: Any) -> None:
        self._count += 1
        self.ending = False
        unsaid = self._seldom.due()
        if unsaid is None:
            self._last = (args, contextvars.copy_context())
            return
        self._last = None
        self._say(args, unsaid)

    def ended(self) -> None:
        """What repeated has stopped (cheap when nothing lasts): say so, once a line is due."""
        if not self._count:
            return
        if not self._seldom.ready():
            self.ending = True
            return
        self._say_ended()

    def close(self) -> None:
        """No later call will come (its store closes, its process exits): say the line left
        unsaid, and the end held back (`ending`), now, so the lines count every occurrence."""
        if self.ending:
            self._say_ended()
        else:
            self.flush()

    def _say_ended(self) -> None:
        self.flush()
        self._logger.warning(self._ended, self._count, extra={"fields": {"count": self._count}})
        self._count, self._last, self.ending = 0, None, False
        self._seldom.restart()

    def flush(self) -> None:
        """Say the line left unsaid, if any, now (the store closes: no later line may say it)."""
        if self._last is not None:
            args, context = self._last
            context.run(self._say, args, self._seldom.unsaid - 1)  # - 1: this line is one
            self._last = None
            self._seldom.unsaid = 0

    def _say(self, args: tuple[Any, ...], unsaid: int) -> None:
        fields = {"more_like_it": unsaid} if unsaid else {}
        self._logger.warning(self._message + more_like_it(unsaid), *args, extra={"fields": fields})

"""The process entry point of `order-pipeline`: one server, or the supervisor of N workers.

Everything that concerns the process rather than the service lives here: the
command line and the supervisor's handoff are read once, logging is set up, the
garbage collector is tuned, and a draining process that outlives its hard
deadline is ended.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Sequence
from typing import Final

import trio

from .cli import parse_args
from .handoff import Handoff
from .logs import configure_logging
from .metrics import Metrics
from .server import Readiness, assemble, serve
from .settings import Settings
from .supervisor import supervise

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

# Young-generation collections per allocation: CPython's default (700) makes the
# collector run every few requests; see docs/performance.md for what this bought.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """Freeze what start-up built (modules, the app) out of the collector's way; collect less."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def exit_at_hard_deadline(readiness: Readiness, settings: Settings) -> None:
    """End the process if its drain has not finished `settings.hard_exit_delay` after it began."""
    await readiness.drain_started.wait()
    await trio.sleep(settings.hard_exit_delay)
    log.error("drain did not finish by its hard deadline: exiting")
    os._exit(1)


async def run(settings: Settings, handoff: Handoff | None = None) -> None:
    """Supervise workers, or serve here (as a worker if `handoff` is given)."""
    if settings.workers > 1:
        await supervise(settings)
        return
    metrics = Metrics(handoff.metrics_dir if handoff else None)
    assembly = assemble(settings, metrics=metrics)
    tune_garbage_collector()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_at_hard_deadline, assembly.readiness, settings)
        if handoff:
            nursery.start_soon(metrics.refresh_live_forever)
        await serve(assembly, settings, listen_fd=handoff.listen_fd if handoff else None)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    handoff = Handoff.from_environ(os.environ)
    configure_logging(settings.log_level, settings.log_format)
    # A second Ctrl-C while draining interrupts the drain: exit quietly.
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run, settings, handoff)

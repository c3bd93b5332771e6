"""The process entry point of `order-pipeline`: one server, or the supervisor of N workers.

Everything that concerns the process rather than the service lives here: the
command line and the supervisor's handoff are read once, logging is set up, the
store is opened (a store that cannot be opened exits 2 with one line), the
garbage collector is tuned, and a draining process that outlives its hard
deadline is ended.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final

import trio

from .cli import ListOrders, parse_command
from .handoff import Handoff
from .listing import list_orders
from .logs import configure_logging
from .metrics import Metrics
from .server import Readiness, assemble, serve
from .settings import Settings
from .store import StoreError, open_store
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
        async with open_store(settings.store):  # create or upgrade it once, before the workers
            pass
        await supervise(settings)
        return
    metrics = Metrics(handoff.metrics_dir if handoff else None)
    async with open_store(settings.store) as store:
        assembly = assemble(settings, store=store, metrics=metrics)
        tune_garbage_collector()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exit_at_hard_deadline, assembly.readiness, settings)
            if handoff:
                nursery.start_soon(metrics.refresh_live_forever)
            await nursery.start(assembly.desk.maintain)
            await serve(assembly, settings, listen_fd=handoff.listen_fd if handoff else None)
            nursery.cancel_scope.cancel()
        await assembly.desk.release()


async def show_orders(query: ListOrders) -> None:
    async with open_store(query.store) as store:
        await list_orders(
            store, needs_attention=query.needs_attention, as_json=query.json, write=print
        )


def main(argv: Sequence[str] | None = None) -> None:
    command = parse_command(argv)
    try:
        if isinstance(command, ListOrders):
            trio.run(show_orders, command)
            return
        handoff = Handoff.from_environ(os.environ)
        configure_logging(command.log_level, command.log_format)
        # A second Ctrl-C while draining interrupts the drain: exit quietly.
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run, command, handoff)
    except StoreError as exc:
        print(f"order-pipeline: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

"""What the `order-pipeline` command runs (`__main__.run` enters it): one server, or the
supervisor of N workers, or the orders' listing.

Everything that concerns the process rather than the service lives here: the
command line and the supervisor's handoff are read once, logging is set up, the
address is bound (`sockets.py`) and the store opened (either failing is one line on stderr,
not a traceback: status 1 for the address, 2 for the store), the garbage
collector is tuned, the first and last lines are logged ("Running on ..." with
what is in use; what the drain finished and the exit status), SIGTERM, SIGINT and SIGHUP
are received (the first starts the drain, a second cuts it short: exit 1; a worker's
are its supervisor's, `receive_signals`), and a
draining process that outlives its hard deadline is ended.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import attrs
import trio

from .cli import VERSION, ListOrders, misspelt_variables, parse_command
from .handoff import CUT_SHORT_SIGNAL, DRAIN_SIGNAL, Handoff, HandoffError, stop_signals
from .listing import list_orders
from .logs import (
    ANY_LEVEL,
    configure_logging,
    flush_logs,
    log_at_any_level,
    log_stray_reports,
    write_line,
)
from .metrics import Metrics
from .model import OrderResult
from .seldom import Seldom, more_like_it
from .server import Readiness, assemble, serve
from .services.pool import MAX_SIZE, MIN_SIZE, clamp_size
from .settings import Settings
from .sockets import CannotListen, listen, url_of
from .store import StoreError, StoreUnavailable, open_store, shown_url
from .supervisor import log as supervisor_log
from .supervisor import supervise
from .tracing import configure_tracing, flush_spans

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

# Young-generation collections per allocation: CPython's default (700) makes the
# collector run every few requests; see docs/performance.md for what this bought.
GC_THRESHOLDS: Final = (50_000, 20, 100)
# How often the accept loop's "out of descriptors" line may be said while it lasts.
ACCEPT_ERROR_EVERY_S: Final = 60.0
# Exit statuses: 1 for an address that cannot be listened on (as for a drain that
# overran); 2 for a bad setting or store, like any usage error.
CANNOT_LISTEN: Final = 1
BAD_SETTING: Final = 2
# A drain cut short by a second signal: its orders were cancelled (and undone) rather than
# finished, as when it overruns its hard deadline; a script or unit sees it was not clean.
INTERRUPTED_DRAIN: Final = 1


def warn_if_clamped(settings: Settings) -> None:
    """The pool size is clamped, not refused (a script may pass 0): but say so, once."""
    used = clamp_size(settings.courier_pool_size)
    if used != settings.courier_pool_size:
        log.warning(
            "courier pool size %d is outside %d..%d: using %d",
            settings.courier_pool_size, MIN_SIZE, MAX_SIZE, used,
        )  # fmt: skip # the message, then its arguments


def log_running(url: str, settings: Settings) -> None:
    """The one "Running on" line, logged once the server accepts (tools wait for it): with the
    version, the pid and the settings in use, so a report of a problem starts from them."""
    used = attrs.evolve(
        settings,
        port=int(url.rpartition(":")[2]),  # port 0 was a request for any
        courier_pool_size=clamp_size(settings.courier_pool_size),
    )
    shown = attrs.asdict(attrs.evolve(used, store=shown_url(used.store)))
    fields = {"version": VERSION, "settings": shown}
    if settings.workers == 1:
        log.info(
            "Running on %s (order-pipeline %s, pid %d)",
            url, VERSION, os.getpid(), extra={"fields": fields, **ANY_LEVEL},
        )  # fmt: skip # the message, then its arguments
        return
    log.info(
        "Running on %s with %d workers (order-pipeline %s, pid %d); per worker: courier pool "
        "%d, queue limit %d; in all: %d couriers, %d waiting orders",
        url, settings.workers, VERSION, os.getpid(), used.courier_pool_size,
        used.courier_queue_limit, settings.workers * used.courier_pool_size,
        settings.workers * used.courier_queue_limit, extra={"fields": fields, **ANY_LEVEL},
    )  # fmt: skip # the message, then its arguments


class DrainCount(Metrics):
    """The service's metrics, also counting the orders that end once the drain has begun:
    the last line says how many finished, how many the drain cancelled, and how many their
    clients cancelled (gone, or an HTTP/2 stream reset), which the drain did not give up on."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        super().__init__(multiprocess_dir)
        self.draining = False
        # Whether an order cancelled now was cancelled by the drain: `Readiness`'s, once known.
        self.cancelled_by_drain: Callable[[], bool] = lambda: True
        self.drained = 0
        self.canceled_in_drain = 0
        self.canceled_by_client = 0

    def observe_order(self, result: OrderResult, kind: str, http_status: int) -> None:
        super().observe_order(result, kind, http_status)
        # Another process's order undone by recovery (its lease lapsed) is no order of this
        # drain's: counted by the metrics, not by the last line.
        if not self.draining or result.recovered:
            return
        if not result.cancelled:
            self.drained += 1
        elif self.cancelled_by_drain():
            self.canceled_in_drain += 1
        else:
            self.canceled_by_client += 1

    def log_last_line(self, status: int) -> None:
        """At info whatever `status`: a drain that overran has had its error line."""
        drained, canceled, by_client = self.drained, self.canceled_in_drain, self.canceled_by_client
        fields = {
            "drained": drained,
            "canceled": canceled,
            "canceled_by_client": by_client,
            "exit_status": status,
        }
        log.info(
            "drained orders: %d, cancelled: %d, cancelled by their clients: %d; exit status %d",
            drained, canceled, by_client, status, extra={"fields": fields, **ANY_LEVEL},
        )  # fmt: skip # the message, then its arguments


def tune_garbage_collector() -> None:
    """Freeze what start-up built (modules, the app) out of the collector's way; collect less."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def exit_at_hard_deadline(
    readiness: Readiness, settings: Settings, count: DrainCount
) -> None:
    """From the drain on, count what ends; end the process if the drain has not finished
    `settings.hard_exit_delay` after it began."""
    await readiness.drain_started.wait()
    count.draining = True
    count.cancelled_by_drain = readiness.cancelled_by_drain
    await trio.sleep(settings.hard_exit_delay)
    log.error("drain did not finish by its hard deadline: exiting")
    count.log_last_line(1)
    flush_logs()  # os._exit skips logging.shutdown
    os._exit(1)


def start_hard_deadline(
    readiness: Readiness, settings: Settings, count: DrainCount
) -> trio.CancelScope:
    """Run `exit_at_hard_deadline` until the scope returned is cancelled: a system task, so
    that it outlives the serving code's nurseries, up to the store's close (a nursery
    around the store would wrap a StoreError opening it in an ExceptionGroup)."""
    scope = trio.CancelScope()

    async def watch() -> None:
        with scope:
            await exit_at_hard_deadline(readiness, settings, count)

    trio.lowlevel.spawn_system_task(watch)
    return scope


async def run(settings: Settings, listening: list[socket.socket] | Handoff) -> None:
    """Serve on `listening`: supervising workers (a socket each), or alone, or as a worker (a
    `Handoff`)."""
    if isinstance(listening, Handoff):
        await serve_here(settings, listening.listen_fd, listening)
        return
    warn_if_clamped(settings)
    if settings.workers == 1:
        (sock,) = listening
        await serve_here(settings, sock.detach())  # hypercorn's socket from now on
        return
    async with open_store(settings.store):  # create or upgrade it once, before the workers
        pass
    on_serving = functools.partial(log_running, url_of(listening[0]), settings)
    status = await supervise(settings, listening, on_serving)
    # At info: a worker given up on has had its error line.
    log.info(
        "workers drained (each worker logged its own counts); exit status %d", status,
        extra={"fields": {"exit_status": status}, **ANY_LEVEL},
    )  # fmt: skip # the message, then its arguments
    if status:
        raise SystemExit(status)


async def receive_signals(
    received: AsyncIterator[int],
    readiness: Readiness,
    serving: trio.CancelScope,
    *,
    supervised: bool = False,
    on_draining_alone: Callable[[], None] | None = None,
) -> None:
    """Start the drain at the first signal; at any later one, cancel `serving`, so the orders
    in flight are cancelled, undone and reported now (for an operator who cannot wait and
    should not have to kill the process and leave the undoing to recovery).

    A worker (`supervised`) hears its supervisor's `DRAIN_SIGNAL`, which never cuts the
    drain short, and `CUT_SHORT_SIGNAL`, which does; and SIGTERM, which cuts it short only
    when heard a second time. So a SIGTERM to the whole process group, which reaches the
    worker besides its supervisor's `DRAIN_SIGNAL`, counts once; a worker whose supervisor
    is gone is cut short by SIGTERM twice, as a lone server is: the first is taken for the one
    that started its drain (systemd's, say, to what is left of the unit), and said so. A
    SIGTERM that starts a worker's drain calls `on_draining_alone` (its supervisor may not
    have heard one: it then starts the worker's replacement)."""
    heard: set[int] = set()
    async for signum in received:
        name = signal.Signals(signum).name
        # Draining before any signal: only the lifeline starts a worker's drain so.
        orphaned = supervised and not heard and not readiness.is_ready()
        if supervised:
            again = signum in heard and signum != DRAIN_SIGNAL
            cut_short = signum == CUT_SHORT_SIGNAL or again
        else:
            cut_short = not readiness.is_ready()
        heard.add(signum)
        if cut_short:
            log.warning(  # at any level: why the last line says exit status 1
                "received %s while draining: cancelling the orders in flight", name,
                extra=ANY_LEVEL,
            )  # fmt: skip # the message, then its arguments
            readiness.start_draining()
            readiness.interrupt()
            serving.cancel()
        elif readiness.is_ready():
            log.info("received %s: draining", name, extra=ANY_LEVEL)
            readiness.start_draining()
            if signum == signal.SIGTERM and on_draining_alone is not None:
                on_draining_alone()
        elif orphaned and signum == signal.SIGTERM:
            log.info(  # not silence: the operator's signal would seem lost
                "received SIGTERM while draining (the supervisor is gone): the drain goes on; "
                "a second SIGTERM cancels the orders in flight",
                extra=ANY_LEVEL,
            )


async def drain_when_supervisor_ends(handoff: Handoff, readiness: Readiness) -> None:
    """A worker's: drain, as on SIGTERM, once its supervisor has ended (killed, it sends
    no signal)."""
    await handoff.wait_for_supervisor_to_end()
    log.warning("the supervisor is gone: draining", extra=ANY_LEVEL)
    readiness.start_draining()


async def serve_here(settings: Settings, listen_fd: int, handoff: Handoff | None = None) -> None:
    """Serve on `listen_fd` until SIGTERM, SIGINT or SIGHUP and the drain after it; exit 1 if a
    second signal cut the drain short.

    A worker (`handoff` given) tells its supervisor when it serves; a lone
    server says "Running on" itself.
    """
    metrics_dir = handoff.metrics_dir if handoff else None
    count = DrainCount(metrics_dir)
    # A worker is stopped by its supervisor's DRAIN_SIGNAL and CUT_SHORT_SIGNAL (handoff.py),
    # or by SIGTERMs of its own (`receive_signals`). It ignores SIGINT and SIGHUP: a
    # terminal's Ctrl+C or hang-up reaches every process of the foreground group, its
    # supervisor included, which tells it.
    if handoff:
        signals: tuple[int, ...] = (signal.SIGTERM, DRAIN_SIGNAL, CUT_SHORT_SIGNAL)
    else:
        signals = stop_signals()
    configure_tracing()  # once per serving process, before assemble: README, "Tracing"

    def exit_as_crashed(message: str) -> None:
        """The store process died: end this one too, as if the database code had crashed it
        (it did, in its own process); its orders in flight are recovered by lease."""
        log.error("%s: exiting, the orders in flight are recovered by lease", message)
        count.log_last_line(1)
        flush_logs()  # os._exit skips logging.shutdown
        os._exit(1)

    async with open_store(settings.store, on_store_process_lost=exit_as_crashed) as store:
        assembly = assemble(settings, store=store, metrics=count)
        hard_deadline = start_hard_deadline(assembly.readiness, settings, count)
        tune_garbage_collector()
        # Outside the nurseries below: a store that opened but cannot commit the lease is a
        # start-up failure of one line (StoreError), not an exception group.
        await assembly.desk.take_lease()
        # Received from here until the drain is over, so that no signal meets its default
        # action (death by SIGTERM, KeyboardInterrupt) while orders may run; one left unread
        # when the receiver closes is ignored, not redelivered to that action.
        for signum in (signal.SIGINT, signal.SIGHUP, *signals):
            signal.signal(signum, signal.SIG_IGN)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                if handoff:
                    nursery.start_soon(count.refresh_live_forever)
                    nursery.start_soon(drain_when_supervisor_ends, handoff, assembly.readiness)
                await nursery.start(assembly.desk.maintain)
                async with trio.open_nursery() as serving:
                    nursery.start_soon(
                        functools.partial(
                            receive_signals,
                            received,
                            assembly.readiness,
                            serving.cancel_scope,
                            supervised=handoff is not None,
                            on_draining_alone=handoff.say_draining_alone if handoff else None,
                        )
                    )
                    (url, *_) = await serving.start(
                        functools.partial(serve, assembly, settings, listen_fd=listen_fd)
                    )
                    if handoff:
                        handoff.say_serving()
                    else:
                        log_running(url, settings)
                nursery.cancel_scope.cancel()
            await assembly.desk.release()
    await flush_spans()
    hard_deadline.cancel()  # only now: the lease's release, the store's close, the flush may stall
    status = INTERRUPTED_DRAIN if assembly.readiness.interrupted else 0
    count.log_last_line(status)
    if status:
        raise SystemExit(status)


class _Unwritable(Exception):
    """Stdout did not take the listing (a full disk, an I/O error): not any other OSError of
    the read, which is not the listing's writing to name."""


def _write_listing(line: str | None = None) -> None:
    """`print(line)` (or, without one, the final flush), its OSError an `_Unwritable`;
    a reader that stopped early (BrokenPipeError) is left as it is."""
    try:
        if line is None:
            sys.stdout.flush()
        else:
            print(line)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _Unwritable(exc.strerror or str(exc)) from exc


async def show_orders(query: ListOrders) -> None:
    """An operator's read: a store that does not exist is refused, not created."""
    async with open_store(query.store, reader=True) as store:
        await list_orders(
            store, needs_attention=query.needs_attention, as_json=query.json, write=_write_listing
        )


def _not_hypercorns_running_line(record: logging.LogRecord) -> bool:
    """Hypercorn says "Running on" per process; ours is said once per server (`log_running`)."""
    return not record.getMessage().startswith("Running on ")


class _AcceptErrorsSeldom(logging.Filter):
    """trio's accept loop, out of descriptors (EMFILE: a low `ulimit -n`) or memory, logs it
    at error with its traceback every 0.1 s while it lasts: ten times a second the same.
    Said once a minute, with how many went unsaid, without the traceback (trio's own,
    always the same)."""

    def __init__(self) -> None:
        super().__init__()
        self._seldom = Seldom(ACCEPT_ERROR_EVERY_S)

    def filter(self, record: logging.LogRecord) -> bool:
        unsaid = self._seldom.due()
        if unsaid is None:
            return False
        record.exc_info = record.exc_text = None
        record.msg = f"{record.msg}{more_like_it(unsaid)}"
        return True


def main(argv: Sequence[str] | None = None) -> None:
    command = parse_command(argv)
    try:
        if isinstance(command, ListOrders):
            if sys.stdout is None:  # `>&-`: print would drop every line, and flush fail
                write_line("order-pipeline orders: cannot write the listing: stdout is closed")
                raise SystemExit(1)
            for warning in misspelt_variables(os.environ):
                write_line(f"order-pipeline orders: warning: {warning}")
            try:
                trio.run(show_orders, command)
                _write_listing()
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except _Unwritable as exc:  # `> file` on a full disk, an I/O error: one line, status 1
                # Nothing more to stdout: the interpreter's own flush at exit would fail again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                write_line(f"order-pipeline orders: cannot write the listing: {exc}")
                raise SystemExit(1) from None
            except StoreUnavailable as exc:  # opened, then a page could not be read: the
                # database gone, a lock past the wait. The lines written stand; status 1.
                write_line(f"order-pipeline orders: cannot read the store: {exc}")
                raise SystemExit(1) from None
            return
        handoff = Handoff.from_environ(os.environ)
        configure_logging(command.log_level, command.log_format)
        # `Running on`, the drain's start, the last line at any level: tools wait for the
        # first, which also says the port 0 picked; the last says how it ended.
        log_at_any_level(log, supervisor_log)
        log_stray_reports()
        logging.getLogger("hypercorn.error").addFilter(_not_hypercorns_running_line)
        logging.getLogger("trio.serve_listeners").addFilter(_AcceptErrorsSeldom())
        if handoff is None:  # a worker's environment is its supervisor's: said there
            for warning in misspelt_variables(os.environ):
                log.warning("%s", warning)
        listening = handoff or listen(command)
        # Once the store is open, serve_here() or supervise() receives SIGINT; one before
        # interrupts the start-up (KeyboardInterrupt: __main__.run ends the process quietly).
        trio.run(run, command, listening)
    except CannotListen as exc:
        write_line(f"order-pipeline: {exc}")
        raise SystemExit(CANNOT_LISTEN) from None
    except (StoreError, HandoffError) as exc:
        write_line(f"order-pipeline: {exc}")
        raise SystemExit(BAD_SETTING) from None
    finally:
        # Before a traceback, or the death by SIGINT of `__main__.run`, is written or happens.
        flush_logs()

"""`--workers N`: one parent process binds a socket per worker; N worker processes serve them.

Each socket has SO_REUSEPORT on the same address, so the kernel spreads new
connections evenly over them (by a hash of each connection's addresses); with one
shared socket, whichever worker woke first took most of a burst. Worker k always
serves socket k and inherits no other. The supervisor keeps every socket open, so
the connections the kernel queues on a dead worker's socket wait there until its
restart serves them; if the drain begins first, closing the socket resets them.

Hypercorn's own multi-process mode is not graceful (the first worker to exit
makes the parent terminate the others). On SIGTERM, SIGINT or SIGHUP (not one it was
started ignoring: `handoff.stop_signals`) this supervisor
tells every worker to drain (`DRAIN_SIGNAL`), lets each drain on its own (and end itself at
its hard deadline), kills one still running a little after that (`KILL_AFTER_DEADLINE_S`),
and restarts a worker that dies while serving. A second signal cuts every worker's drain
short (`CUT_SHORT_SIGNAL`; status 1). Signals of their own, not SIGTERM: a signal sent to
the whole process group (systemd's default KillMode, a terminal's Ctrl+C or hang-up) reaches
each worker too, and a worker that heard the same signal from both would take it for a second one; a
worker ignores SIGINT and SIGHUP, and a SIGTERM it hears besides its supervisor's word only
starts its drain (a second SIGTERM cuts it short).
A worker that keeps dying (`RESTART_LIMIT`
deaths within `RESTART_WINDOW_S`) is not restarted again: the supervisor drains
the others and exits with status 1. The workers share one prometheus-client
multiprocess directory, so `/metrics` sums all of them (an exited worker's counts too,
in one file of every exited worker's: `metrics.retire_worker`).

Each worker writes a byte to a pipe once it serves (`Handoff.say_serving`): the
supervisor says "Running on" only when all of them do, since tools take that
line to mean that the server answers. A worker whose drain a SIGTERM to it alone began
(an operator recycling it) says so on the same pipe (`Handoff.say_draining_alone`), and
the supervisor starts its replacement on its socket at once: the kernel goes on queueing
connections there, which would otherwise wait for the end of that drain.

A supervisor that is killed (SIGKILL, the out-of-memory killer) tells them nothing: its
workers then see a pipe whose only write end it held close
(`Handoff.wait_for_supervisor_to_end`), and drain and exit as on SIGTERM, rather than serve
on, orphaned, beside the next server started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import attrs
import trio

from .handoff import CUT_SHORT_SIGNAL, DRAIN_SIGNAL, Handoff, stop_signals
from .logs import ANY_LEVEL, EXIT_WAIT_S
from .settings import Settings

__all__ = ["supervise"]

# How a worker that drained in full ends: with 0, or, still starting (no handler yet, so no
# order taken), by the default action of a signal to its process group or of its drain.
DRAINED: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP, -DRAIN_SIGNAL})

log = logging.getLogger(__name__)

RESTART_PAUSE_S: Final = 1.0
# How a worker ends by a signal to its whole process group, which tells its supervisor to
# drain too: still starting, by the signal's default action; serving, by its own drain. Such an
# end is judged once the supervisor's own copy of the signal had a moment to be read.
ENDED_BY_STOP_SIGNAL: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})
STOP_SIGNAL_WAIT_S: Final = 0.1
# A worker still draining at the hard deadline ends itself there, with its error line and its
# last line (written within EXIT_WAIT_S), as a lone server does; killed at the same moment, it
# lost them. Only one that cannot end itself (stopped, say) is killed, this much later.
KILL_AFTER_DEADLINE_S: Final = EXIT_WAIT_S + 1.0
# A worker that dies this many times within this many seconds is given up on.
RESTART_LIMIT: Final = 5
RESTART_WINDOW_S: Final = 60.0
# A dead worker's metrics files are merged when no scrape reads them; tried for a second at
# most (a worker stopped in a scrape), then left: counted all the same, in files of their own.
RETIRE_TRIES: Final = 100
RETIRE_PAUSE_S: Final = 0.01


async def supervise(
    settings: Settings, sockets: Sequence[socket.socket], on_serving: Callable[[], None]
) -> int:
    """Serve `sockets` with `settings.workers` processes, one each, until a stop signal
    (`handoff.stop_signals`: SIGTERM, SIGINT or SIGHUP), then drain them.

    `on_serving` is called once every worker serves. Returns the exit status: 1 if a
    worker was given up on (once the others have drained), a second signal cut the drain
    short, or a worker did not end its drain with 0 (it failed, was killed, or outlived the
    hard deadline), else 0.
    """
    ready_read, ready_write = os.pipe()
    # Never written to, and its write end never passed on: it closes when this process ends.
    lifeline_read, lifeline_write = os.pipe()
    metrics_dir = tempfile.mkdtemp(prefix="order-pipeline-metrics-")
    environs = [
        Handoff(sock.fileno(), metrics_dir, ready_write, lifeline_read).environ(
            settings, os.environ
        )
        for sock in sockets
    ]
    supervisor = _Supervisor(settings, sockets, environs, (ready_write, lifeline_read), metrics_dir)
    try:
        async with trio.lowlevel.FdStream(ready_read) as ready:
            return await supervisor.run(ready, on_serving)
    finally:
        for sock in sockets:
            sock.close()
        os.close(ready_write)
        os.close(lifeline_read)
        os.close(lifeline_write)
        shutil.rmtree(metrics_dir, ignore_errors=True)


@attrs.define(eq=False)
class _Supervisor:
    """The workers' processes, restarted while serving, and how their drain went."""

    settings: Settings
    sockets: Sequence[socket.socket]
    environs: list[dict[str, str]]  # worker k's
    shared_fds: tuple[int, int]  # every worker's besides its socket: handoff.py's pipes
    metrics_dir: str
    running: dict[trio.Process, int] = attrs.field(factory=dict)  # each with its worker's number
    # Processes draining alone (a SIGTERM to them), their replacements started.
    replaced: set[int] = attrs.field(factory=set)
    # Each worker's latest deaths, kept across its replacements (`gives_up`).
    deaths: dict[int, deque[float]] = attrs.field(factory=dict)
    # Set as the drain begins (the sockets are closed, or about to be): it also ends a worker's
    # restart pause, and the wait of a worker's end by a stop signal.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    gave_up: bool = False  # on a worker that kept dying
    interrupted: bool = False  # a second signal cut the drain short
    drained_in_full: bool = True  # every worker has ended as DRAINED allows
    # Held while a worker is started and while the drain closes the sockets: a start
    # never passes a closed socket, and every process started before the drain gets
    # its DRAIN_SIGNAL (open_process lets other tasks run while it forks).
    spawning: trio.Lock = attrs.field(factory=trio.Lock)
    # The wait for a signal; a worker given up on cancels it to start the drain.
    waiting: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    async def run(self, ready: trio.lowlevel.FdStream, on_serving: Callable[[], None]) -> int:
        # Received until every worker has exited; one left unread then is ignored, not
        # redelivered to its default action (death by SIGTERM, KeyboardInterrupt): the drain
        # is over. (A worker started meanwhile inherits the default actions, not this.)
        stops = stop_signals()
        for stop in stops:
            signal.signal(stop, signal.SIG_IGN)
        with trio.open_signal_receiver(*stops) as signals:
            async with trio.open_nursery() as forwarding:
                async with trio.open_nursery() as nursery:
                    watching = await nursery.start(self.watch_workers, ready, on_serving, nursery)
                    for number in range(self.settings.workers):
                        nursery.start_soon(self.worker, number)
                    with self.waiting:
                        async for signum in signals:
                            name = signal.Signals(signum).name
                            log.info("received %s: draining the workers", name, extra=ANY_LEVEL)
                            break
                    self.stopping.set()
                    watching.cancel()
                    async with self.spawning:
                        for sock in self.sockets:
                            sock.close()
                    for process in self.running:
                        process.send_signal(DRAIN_SIGNAL)
                    forwarding.start_soon(self.forward_later_signals, signals)
                    deadline = (
                        trio.current_time() + self.settings.hard_exit_delay + KILL_AFTER_DEADLINE_S
                    )
                    nursery.cancel_scope.deadline = deadline
                forwarding.cancel_scope.cancel()
        return 0 if self.drained_in_full and not (self.gave_up or self.interrupted) else 1

    async def start(self, number: int) -> trio.Process | None:
        """A new process for worker `number`, or None once the drain has begun."""
        async with self.spawning:
            if self.stopping.is_set():  # the sockets are closed
                return None
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "order_pipeline", "serve"],
                env=self.environs[number],
                pass_fds=(self.sockets[number].fileno(), *self.shared_fds),
            )
            self.running[process] = number
        log.info("worker %d started (pid %d)", number, process.pid)
        return process

    async def worker(self, number: int) -> None:
        """Run worker `number`, restarting it while serving, until the drain or giving up."""
        from .metrics import retire_worker  # imports prometheus-client: only with workers

        deaths = self.deaths.setdefault(number, deque(maxlen=RESTART_LIMIT))
        while True:
            try:
                process = await self.start(number)
            except OSError as exc:
                # No process to be had (a limit on processes, memory or files; an executable an
                # upgrade removed): a death like any other, not a crash that kills the others.
                if self.gives_up(number, deaths, f"not started: {exc}"):
                    return
                log.error("worker %d could not be started (%s): restarting", number, exc)
                with trio.move_on_after(RESTART_PAUSE_S):
                    await self.stopping.wait()
                continue
            if process is None:  # the drain began during the restart pause
                return
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # the hard deadline passed
                    log.error("worker %d (pid %d) still draining: killing it", number, process.pid)
                    # Here, not below: the deadline's Cancelled leaves this task at this block.
                    self.drained_in_full = False
                    process.kill()
                    with trio.CancelScope(shield=True):
                        code = await process.wait()
                del self.running[process]
                for _ in range(RETIRE_TRIES):  # a scrape holds the lock for milliseconds
                    try:
                        if retire_worker(process.pid, self.metrics_dir):
                            break
                    except OSError as exc:  # a full disk: its files are counted all the same
                        log.warning("worker %d's metrics files are left: %s", number, exc)
                        break
                    with trio.CancelScope(shield=True):
                        await trio.sleep(RETIRE_PAUSE_S)
            if process.pid in self.replaced:  # it drained alone, its replacement started
                self.replaced.discard(process.pid)
                level = logging.INFO if code in DRAINED else logging.WARNING
                log.log(
                    level, "worker %d (pid %d) exited with %d (replaced)", number, process.pid, code
                )
                if code not in DRAINED and self.stopping.is_set():  # as below
                    self.drained_in_full = False
                return
            # The supervisor's copy of a stop signal may be unread yet; once the drain has begun,
            # no checkpoint here, where the kill deadline's cancellation would drop the line.
            if code in ENDED_BY_STOP_SIGNAL and not self.stopping.is_set():
                with trio.move_on_after(STOP_SIGNAL_WAIT_S):
                    await self.stopping.wait()
            if self.stopping.is_set():
                log.info("worker %d (pid %d) exited with %d", number, process.pid, code)
                if code not in DRAINED:
                    self.drained_in_full = False
                return
            if code in DRAINED:  # stopped alone (a SIGTERM to it), drained: no death
                log.warning(
                    "worker %d (pid %d) exited with %d: restarting", number, process.pid, code
                )
            elif self.gives_up(number, deaths, f"pid {process.pid}, with {code}"):
                return
            else:
                log.error("worker %d (pid %d) died with %d: restarting", number, process.pid, code)
            with trio.move_on_after(RESTART_PAUSE_S):
                await self.stopping.wait()

    def gives_up(self, number: int, deaths: deque[float], last: str) -> bool:
        """Count a death of worker `number` (`last` says which) in `deaths`; whether it is one
        too many, in which case the drain of the others begins."""
        deaths.append(trio.current_time())
        if len(deaths) < RESTART_LIMIT or deaths[-1] - deaths[0] > RESTART_WINDOW_S:
            return False
        log.error(
            "worker %d died %d times within %g s (the last, %s): giving up, draining the others",
            number, RESTART_LIMIT, RESTART_WINDOW_S, last,
        )  # fmt: skip # the message, then its arguments
        self.gave_up = True
        self.waiting.cancel()
        return True

    async def watch_workers(
        self,
        ready: trio.lowlevel.FdStream,
        on_serving: Callable[[], None],
        nursery: trio.Nursery,
        task_status: trio.TaskStatus[trio.CancelScope],
    ) -> None:
        """Read what the workers say until the drain: call `on_serving` once as many workers
        as were started have said they serve (`.`; a worker restarted before the others serve
        says so twice: in such a crash loop the line may come with one fewer serving), and
        `replace` each that says it drains alone (`d<pid>` and a newline)."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            said, unfinished = 0, b""
            async for data in ready:
                serving = data.count(b".")  # a `.` is in no other word
                said += serving
                if said - serving < self.settings.workers <= said:
                    on_serving()
                *words, unfinished = (unfinished + data.replace(b".", b"")).split(b"\n")
                for word in words:
                    if word[:1] == b"d" and word[1:].isdigit():  # else not this version's
                        nursery.start_soon(self.replace, int(word[1:]), nursery)

    async def replace(self, pid: int, nursery: trio.Nursery) -> None:
        """Start another process for the worker whose process `pid` drains alone (a SIGTERM to
        it, not to the supervisor), unless the supervisor's own drain begins meanwhile (a
        SIGTERM to the whole group reached that worker first) or it has ended (its task
        restarts it). Its own task then ends with it, not restarting it again."""
        with trio.move_on_after(STOP_SIGNAL_WAIT_S):
            await self.stopping.wait()
        # No checkpoint from here on: its task may not take its end for a death meanwhile. One
        # that has ended (its returncode polled) is its task's to restart.
        alive = (n for p, n in self.running.items() if p.pid == pid and p.returncode is None)
        number = next(alive, None)
        if self.stopping.is_set() or number is None or pid in self.replaced:
            return
        self.replaced.add(pid)
        log.warning(
            "worker %d (pid %d) drains alone (a SIGTERM to it): starting another", number, pid
        )
        nursery.start_soon(self.worker, number)

    async def forward_later_signals(self, signals: AsyncIterator[int]) -> None:
        """Each signal after the first cuts the workers' drains short: tell them."""
        async for signum in signals:
            name = signal.Signals(signum).name
            log.warning(  # at any level: why the last line says exit status 1
                "received %s while draining: cutting the workers' drains short", name,
                extra=ANY_LEVEL,
            )  # fmt: skip # the message, then its arguments
            self.interrupted = True
            for process in self.running:
                process.send_signal(CUT_SHORT_SIGNAL)

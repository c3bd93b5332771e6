"""What a worker inherits from its supervisor: its own listening socket, the metrics directory,
a pipe to say that it serves (and that it drains alone), a pipe that tells it when the
supervisor ends, and every setting, all through the environment; the two signals by which
the supervisor stops it; and the signals by which an operator stops a server, supervisor or
lone.

The supervisor writes it (`Handoff.environ`) and the worker's entry point reads
it, once (`Handoff.from_environ`); nothing else reads these variables. The
settings travel as their own `ORDER_PIPELINE_*` variables, which the worker's
command line parses like any other environment.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Mapping
from contextlib import suppress
from typing import Final

import attrs
import trio

from .settings import Settings

__all__ = [
    "CUT_SHORT_SIGNAL",
    "DRAIN_SIGNAL",
    "LIFELINE_FD_ENV",
    "LISTEN_FD_ENV",
    "MULTIPROC_ENV",
    "READY_FD_ENV",
    "Handoff",
    "HandoffError",
    "stop_signals",
]

# A worker serves the listening socket it inherited as this file descriptor.
LISTEN_FD_ENV: Final = "ORDER_PIPELINE_LISTEN_FD"
# The write end of the pipe on which a worker says, once, that it serves (`.`), and that a
# SIGTERM to it alone began its drain (`d<pid>` and a newline).
READY_FD_ENV: Final = "ORDER_PIPELINE_READY_FD"
# The read end of a pipe whose only write end the supervisor holds and never writes to: it
# reads as ended once the supervisor has ended, however it ended (SIGKILL too).
LIFELINE_FD_ENV: Final = "ORDER_PIPELINE_LIFELINE_FD"
# The supervisor's word to its workers: start the drain, then cut it short. Not SIGTERM: a
# signal sent to the whole process group (systemd's default KillMode, `kill -- -PGID`, a
# terminal's Ctrl+C) reaches each worker besides its supervisor, and a worker that heard the
# same signal twice, from both, would take it for a second one and cut its drain short.
DRAIN_SIGNAL: Final = signal.SIGUSR1
CUT_SHORT_SIGNAL: Final = signal.SIGUSR2
# prometheus-client reads this one itself, when it is imported: it must be in the
# worker's environment before then, not only handed to `Metrics`.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def stop_signals() -> tuple[int, ...]:
    """What starts a drain (and, heard again, cuts it short): an orchestrator's stop, a Ctrl+C,
    and a terminal or ssh session that hangs up (which would otherwise kill the server, its
    orders unanswered); but not a terminal's signal the process was started ignoring: SIGHUP
    (`nohup`: its operator means it to outlive the terminal) or SIGINT (a shell script's
    background job, `order-pipeline serve &`, which a Ctrl+C meant for the script does not
    stop; Python raises no KeyboardInterrupt for it while the modules load either). Read
    before the process sets any of them. A worker ignores the two a terminal sends its whole
    group, and hears its supervisor."""
    terminal = [s for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    return (signal.SIGTERM, *terminal)


class HandoffError(Exception):
    """The handoff's variables are set, but not as a supervisor sets them (by hand, say)."""


def _inherited(environ: Mapping[str, str], name: str) -> str:
    """`environ[name]`, which a supervisor sets beside the listening socket's."""
    if name not in environ:
        raise HandoffError(f"{LISTEN_FD_ENV} is set without {name}")
    return environ[name]


def _inherited_fd(environ: Mapping[str, str], name: str, *, socket: bool = False) -> int:
    """The open file descriptor (a socket if `socket`) that `environ[name]` names."""
    text = _inherited(environ, name)
    try:
        mode = os.fstat(int(text)).st_mode
    except (ValueError, OSError):
        raise HandoffError(f"{name}={text!r} is not an open file descriptor") from None
    if socket and not stat.S_ISSOCK(mode):
        raise HandoffError(f"{name}={text!r} is not a socket")
    return int(text)


@attrs.frozen
class Handoff:
    listen_fd: int
    metrics_dir: str
    ready_fd: int
    lifeline_fd: int | None  # None from a supervisor older than the lifeline

    def environ(self, settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
        """`base` plus every setting as its variable, for one worker serving `listen_fd`."""
        env = dict(base)
        for field in attrs.fields(Settings):
            value = getattr(settings, field.name)
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[Settings.env_name(field.name)] = text
        env[Settings.env_name("workers")] = "1"
        env[LISTEN_FD_ENV] = str(self.listen_fd)
        env[MULTIPROC_ENV] = self.metrics_dir
        env[READY_FD_ENV] = str(self.ready_fd)
        if self.lifeline_fd is not None:
            env[LIFELINE_FD_ENV] = str(self.lifeline_fd)
        return env

    def say_serving(self) -> None:
        """In the worker: tell the supervisor, once, that this process serves."""
        self._say(b".")

    def say_draining_alone(self) -> None:
        """In the worker: tell the supervisor that a SIGTERM to this process alone began its
        drain, so that it starts this worker's replacement now: the kernel keeps queueing
        connections on this worker's socket, which would wait for the drain's end."""
        self._say(b"d%d\n" % os.getpid())

    def _say(self, word: bytes) -> None:
        """Write `word` on the ready pipe (atomic: under PIPE_BUF). A supervisor that is gone
        hears nothing; the lifeline drains this worker."""
        with suppress(BrokenPipeError):
            os.write(self.ready_fd, word)

    async def wait_for_supervisor_to_end(self) -> None:
        """In the worker: return once the supervisor has ended. A supervisor that is killed
        cannot tell them to drain; without this its workers would serve on, orphaned. Never
        returns for a supervisor older than the lifeline (a worker restarted mid-upgrade)."""
        if self.lifeline_fd is None:
            await trio.sleep_forever()
        await trio.lowlevel.wait_readable(self.lifeline_fd)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Handoff | None:
        """What this process inherited, or None if no supervisor started it; HandoffError
        if its variables are not a supervisor's (set by hand: they are not settings)."""
        if LISTEN_FD_ENV not in environ:
            return None
        try:
            metrics_dir = _inherited(environ, MULTIPROC_ENV)
            return cls(
                _inherited_fd(environ, LISTEN_FD_ENV, socket=True),
                metrics_dir,
                _inherited_fd(environ, READY_FD_ENV),
                _inherited_fd(environ, LIFELINE_FD_ENV) if LIFELINE_FD_ENV in environ else None,
            )
        except HandoffError as exc:
            raise HandoffError(
                f"{exc}; only `serve --workers` sets {LISTEN_FD_ENV}, for its workers: unset it"
            ) from None

"""The `order-pipeline` command (and `python -m order_pipeline`).

A Ctrl+C before a server receives its signals itself (while the modules load, or the
store opens) or during `order-pipeline orders` ends the process quietly, by SIGINT's own
default action, as a shell and a supervisor expect of an interrupted command; not with a
traceback of whatever line it interrupted.

While the modules load, SIGINT is blocked, and a Ctrl+C then ends the command as soon as
they are loaded: its KeyboardInterrupt, raised in whatever Python code runs as the signal
comes, could be raised inside an extension's own initialisation, and orjson's then crashed
the process (SIGSEGV) instead of ending it.
"""

import os
import signal


def run() -> None:
    """The console script's entry: `main.main`, imported here so that its imports (about
    half a second) are interruptible quietly too, once they are done."""
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            from .main import main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl+C since raises here
        main()
    except BaseException as exc:
        if not _only_interrupted(exc):
            raise  # a bare SystemExit keeps its status, an error its traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # Unblocked, should the KeyboardInterrupt have come from the block itself (a Ctrl+C
        # just before it: the block is made, then the signal raised), where the `finally`
        # above never ran: blocked, this SIGINT waited, and the command exited 130.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(128 + signal.SIGINT) from None  # if the kill has not ended it yet


def _only_interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, alone or in a group (Trio raised it inside a nursery) of nothing
    else: anything besides it is not lost to a quiet exit."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[1] is None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    run()

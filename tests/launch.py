"""Start the server as a process and learn its URL from its log: the one copy of that.

Standard library only: the tests (`server_process.py`, under Trio), `noxfile.py`
(run by nox's own interpreter, which has nothing but nox) and
`benchmarks/loadtest.py` (run as a script) all import it.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

# Hypercorn's line, which the supervisor of `--workers N` imitates.
RUNNING: Final = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S: Final = 30.0
POLL_S: Final = 0.05


class NotStarted(Exception):
    """The server exited, or did not say where it listens in time; the message ends with its log."""


def serve_argv(python: str, *flags: str) -> list[str]:
    """`python -m order_pipeline serve` on 127.0.0.1, on a port the system picks, with `flags`."""
    return [python, "-m", "order_pipeline", "serve", "--port", "0", *flags]


def started_url(log_text: str, exit_code: int | None) -> str | None:
    """The URL the log says the server listens on, or None while it is still starting.

    `exit_code` is the process's (None while it runs), read after the log: a
    process that has exited without saying where it listens raises NotStarted.
    """
    if found := RUNNING.search(log_text):
        return found.group(1)
    if exit_code is not None:
        raise NotStarted(f"exited with {exit_code} before listening:\n{log_text}")
    return None


def start(
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `argv` with its output in `log`; return it and its URL once its log says it listens.

    If it exits first, or `timeout` seconds pass, it is killed and NotStarted raised.
    """
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, cwd=cwd)
    deadline = time.monotonic() + timeout
    try:
        while (url := started_url(log.read_text(errors="replace"), process.poll())) is None:
            if time.monotonic() > deadline:
                raise NotStarted(
                    f"not listening after {timeout:g} s:\n{log.read_text(errors='replace')}"
                )
            time.sleep(POLL_S)
    except NotStarted:
        process.kill()
        process.wait()
        raise
    return process, url

"""`--workers N`: one parent process binds the socket; N worker processes serve it.

Hypercorn's own multi-process mode is not graceful (the first worker to exit
makes the parent terminate the others). This supervisor forwards SIGTERM or
SIGINT to every worker, lets each drain on its own, waits for them with a hard
deadline, and restarts a worker that dies while serving. The workers share one
prometheus-client multiprocess directory, so `/metrics` sums all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Final

import attrs
import trio

from .metrics import MULTIPROC_ENV
from .settings import Settings

__all__ = ["supervise"]

log = logging.getLogger(__name__)

RESTART_PAUSE_S: Final = 1.0
# Connections the kernel may queue before they are accepted; hypercorn's default
# of 100 resets clients in a burst (2,000 at once did). The kernel caps it at somaxconn.
LISTEN_BACKLOG: Final = 4096
# A worker serves the listening socket it inherited as this file descriptor.
LISTEN_FD_ENV: Final = "ORDER_PIPELINE_LISTEN_FD"
# Past the drain, only a client that never reads its reply can hold a worker
# (hypercorn sends shielded); this much later the worker is ended anyway.
HARD_EXIT_MARGIN_S: Final = 5.0


def hard_deadline(settings: Settings) -> float:
    """Seconds from SIGTERM after which a process still draining is ended."""
    return settings.shutdown_grace + settings.compensation_timeout + HARD_EXIT_MARGIN_S


def _bind(settings: Settings) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(
        settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def _worker_env(settings: Settings, listen_fd: int, metrics_dir: str) -> dict[str, str]:
    """Every setting as its environment variable, so a worker needs no flags."""
    env = dict(os.environ)
    for field in attrs.fields(Settings):
        value = getattr(settings, field.name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[Settings.env_name(field.name)] = text
    env[Settings.env_name("workers")] = "1"
    env[LISTEN_FD_ENV] = str(listen_fd)
    env[MULTIPROC_ENV] = metrics_dir
    return env


async def supervise(settings: Settings) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    sock = _bind(settings)
    metrics_dir = tempfile.mkdtemp(prefix="order-pipeline-metrics-")
    env = _worker_env(settings, sock.fileno(), metrics_dir)
    argv = [sys.executable, "-m", "order_pipeline", "serve"]
    host, port = sock.getsockname()[:2]
    stopping = False
    running: set[trio.Process] = set()

    async def worker(number: int) -> None:
        while True:
            process = await trio.lowlevel.open_process(argv, env=env, pass_fds=(sock.fileno(),))
            running.add(process)
            log.info("worker %d started (pid %d)", number, process.pid)
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # the hard deadline passed
                    log.error("worker %d (pid %d) still draining: killing it", number, process.pid)
                    process.kill()
                    with trio.CancelScope(shield=True):
                        code = await process.wait()
                running.discard(process)
                mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
            if stopping:
                log.info("worker %d (pid %d) exited with %d", number, process.pid, code)
                return
            log.error("worker %d (pid %d) died with %d: restarting", number, process.pid, code)
            await trio.sleep(RESTART_PAUSE_S)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for number in range(settings.workers):
                    nursery.start_soon(worker, number)
                log.info("Running on http://%s:%d with %d workers", host, port, settings.workers)
                async for signum in signals:
                    log.info("received %s: draining the workers", signal.Signals(signum).name)
                    break
                stopping = True
                sock.close()
                for process in running:
                    process.send_signal(signal.SIGTERM)
                nursery.cancel_scope.deadline = trio.current_time() + hard_deadline(settings)
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)

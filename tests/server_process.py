"""The real server as a subprocess (`python -m order_pipeline serve`) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .launch import POLL_S, serve_argv, started_url
from .launch import RUNNING as RUNNING  # re-exported: tests/test_supervisor.py reads it here

START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 40
WAIT_S = 20  # for something a subprocess does
STEPS_IN_FLIGHT = re.compile(r"^order_pipeline_steps_in_flight (\S+)$", re.MULTILINE)


@attrs.define(eq=False)
class ServerProcess:
    """A running server: its process, its URL, and its log (JSON lines)."""

    process: trio.Process
    url: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    async def wait_for_lines(
        self, enough: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """The log's lines once `enough` holds of them. The server's log writer thread writes
        a line within 50 ms of its being logged (`logs.BufferedHandler`), so an order's reply
        can arrive before its line; at exit every line is written."""
        with trio.fail_after(WAIT_S):
            while not enough(lines := self.log_lines()):  # noqa: ASYNC110 # another process's file
                await trio.sleep(POLL_S)
        return lines

    def errors(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line["level"] in ("error", "critical")]

    async def stop(self) -> int:
        """SIGTERM, then wait for the process to exit by itself."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT_S):
            return await self.process.wait()


StartServer = Callable[..., Awaitable[ServerProcess]]


async def wait_for_url(process: trio.Process, log: trio.Path) -> str:
    """Read the log until the server says where it listens (the only signal a process gives)."""
    with trio.fail_after(START_TIMEOUT_S):
        while True:
            if url := started_url(await log.read_text(errors="replace"), process.poll()):
                return url
            await trio.sleep(POLL_S)


async def start_process(tmp_path: Path, *flags: str) -> ServerProcess:
    """The real server with extra flags, logging to a file in `tmp_path`, once it listens.

    Unless `flags` name a store, it keeps its orders in a new SQLite file in
    `tmp_path`. The caller stops it; one that never listens is killed here and
    the error raised.
    """
    fd, name = tempfile.mkstemp(dir=tmp_path, suffix=".log")
    if "--store" not in flags:
        flags = (*flags, "--store", f"sqlite:///{name.removesuffix('.log')}.db")
    try:
        process = await trio.lowlevel.open_process(
            serve_argv(sys.executable, *flags), stdout=fd, stderr=fd
        )
    finally:
        os.close(fd)
    try:
        url = await wait_for_url(process, trio.Path(name))
    except BaseException:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return ServerProcess(process, url, Path(name))


@asynccontextmanager
async def server_factory(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start servers with extra flags; at the end stop each, and fail on an unhandled error.

    A server whose exit status the test checks itself (or that it kills) is started
    with `check_exit=False`.
    """
    started: list[tuple[ServerProcess, bool, bool]] = []

    async def start(
        *flags: str, expect_errors: bool = False, check_exit: bool = True
    ) -> ServerProcess:
        server = await start_process(tmp_path, *flags)
        started.append((server, expect_errors, check_exit))
        return server

    try:
        yield start
    finally:
        for server, expect_errors, check_exit in started:
            code = await server.stop()
            if not check_exit:
                continue
            assert code == 0, server.log_path.read_text()[-3000:]
            if not expect_errors:
                assert server.errors() == [], server.errors()


async def wait_for_steps_in_flight(url: str, steps: int, *, within: float = WAIT_S) -> None:
    """Wait until the server's /metrics counts `steps` steps in flight: a subprocess's only sign
    that its orders have reached their steps (a scrape may wait in the queue of a worker still
    starting)."""
    async with httpx.AsyncClient(base_url=url, timeout=within) as scraper:
        with trio.fail_after(within):
            while True:
                found = STEPS_IN_FLIGHT.search((await scraper.get("/metrics")).text)
                if found and float(found[1]) == steps:
                    return
                await trio.sleep(0.05)


async def post(
    url: str, body: dict[str, Any], outcomes: list[int | str], *, within: float = WAIT_S
) -> None:
    """POST an order on a connection of its own; record its status, or the error that ended it."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=within) as client:
            outcomes.append((await client.post("/order", json=body)).status_code)
    except httpx.TransportError as exc:
        outcomes.append(type(exc).__name__)

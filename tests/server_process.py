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
import trio

RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 40


@attrs.define(eq=False)
class ServerProcess:
    """A running server: its process, its URL, and its log (JSON lines)."""

    process: trio.Process
    url: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def errors(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line["level"] in ("error", "critical")]

    async def stop(self) -> int:
        """SIGTERM, then wait for the process to exit by itself."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT_S):
            return await self.process.wait()


StartServer = Callable[..., Awaitable[ServerProcess]]


@asynccontextmanager
async def server_factory(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start servers with extra flags; at the end stop each, and fail on an unhandled error."""
    started: list[tuple[ServerProcess, bool]] = []

    async def start(*flags: str, expect_errors: bool = False) -> ServerProcess:
        fd, name = tempfile.mkstemp(dir=tmp_path, suffix=".log")
        log_path = trio.Path(name)
        argv = [sys.executable, "-m", "order_pipeline", "serve", "--port", "0", *flags]
        try:
            process = await trio.lowlevel.open_process(argv, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        server = ServerProcess(process, "", Path(name))
        started.append((server, expect_errors))
        # The log is the only signal a subprocess gives: read it until it says where it listens.
        with trio.fail_after(START_TIMEOUT_S):
            while not (found := RUNNING.search(await log_path.read_text(errors="replace"))):
                assert process.poll() is None, await log_path.read_text()
                await trio.sleep(0.02)
        server.url = found.group(1)
        return server

    try:
        yield start
    finally:
        for server, expect_errors in started:
            code = await server.stop()
            assert code == 0, server.log_path.read_text()[-3000:]
            if not expect_errors:
                assert server.errors() == [], server.errors()

"""Shared fixtures and helpers; hypothesis profiles (`fuzz` runs many more examples)."""

from __future__ import annotations

import functools
import inspect
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

from order_pipeline.model import OrderRequest
from order_pipeline.serialization import converter
from order_pipeline.server import Assembly, Settings, assemble, serve

from . import pg
from .server_process import StartServer, server_factory

# `nox -s fuzz` loads the fuzz profile: FUZZ_EXAMPLES (5,000) examples for every test
# marked `fuzz`, whatever number the test asks for in an ordinary run (`examples`).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
# A server keeps an inherited ignored SIGHUP ignored (nohup); the tests that send it need the
# servers they start to inherit its default, whatever this runner was started with.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
# Likewise SIGINT, ignored in a shell's background job: a command started with it ignored
# raises no KeyboardInterrupt while it loads (a CI run started so failed the Ctrl+C test of
# tests/test_startup.py). Python's own handler here; a command exec'd gets the default.
signal.signal(signal.SIGINT, signal.default_int_handler)

settings.register_profile("default", deadline=None)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=FUZZ_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile("default")


def examples(usual: int) -> int:
    """`usual` examples in an ordinary run; the fuzz profile's number under `nox -s fuzz`."""
    return FUZZ_EXAMPLES if settings().max_examples == FUZZ_EXAMPLES else usual


def make_order(order_id: str = "o-1", **fields: Any) -> OrderRequest:
    """An order built through the real converter, so tests obey the same rules."""
    return converter.structure({"order_id": order_id, **fields}, OrderRequest)


@pytest.fixture(name="order")
def _order() -> OrderRequest:
    """A valid order, o-1 for 100."""
    return make_order(amount=100)


@asynccontextmanager
async def serving(
    settings: Settings | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[Assembly, str]]:
    """The real server in a nursery of the caller's, on 127.0.0.1 port 0: its assembly and URL.

    Without `shutdown_trigger` the server is cancelled when the block ends; with
    one, the end of the block waits for the trigger and for the drain after it.
    """
    settings = attrs.evolve(settings or Settings(), port=0)
    assembly = assemble(settings)
    trigger = shutdown_trigger or trio.sleep_forever
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(
            functools.partial(serve, assembly, settings, shutdown_trigger=trigger)
        )
        yield assembly, url
        if shutdown_trigger is None:
            nursery.cancel_scope.cancel()


@pytest.fixture(name="start_server")
async def _start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start the real server (a subprocess on 127.0.0.1, port 0) with extra flags."""
    async with server_factory(tmp_path) as start:
        yield start


def _live_tasks() -> set[trio.lowlevel.Task]:
    found: set[trio.lowlevel.Task] = set()

    def walk(task: trio.lowlevel.Task) -> None:
        found.add(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return found


def _no_task_left_running(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail a Trio test that leaves a task running when it returns (say, in a fixture's nursery)."""

    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> None:
        before = _live_tasks()
        await test(*args, **kwargs)
        # Let tasks that are merely finishing (a server closing a connection) finish.
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        left = sorted(task.name for task in _live_tasks() - before)
        assert not left, f"tasks left running by the test: {left}"

    return checked


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        test = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(test) and not hasattr(test, "hypothesis"):
            item.obj = _no_task_left_running(test)  # type: ignore[attr-defined]  # Item has no obj; this one is a Function


@pytest.fixture(name="postgres")
def _postgres() -> None:
    """The test server is there (else skip, or fail under ORDER_PIPELINE_REQUIRE_POSTGRES=1).

    A sync fixture: a skip raised in a Trio test loses its reason (pytest-trio re-raises
    a bare skip), a skip here keeps it.
    """
    pg.need_postgres()


@pytest.fixture(name="schema")
def _schema() -> str:
    """A new schema of the test's own on the test server, dropped after the test."""
    return pg.new_schema()


@pytest.fixture(autouse=True)
def _drop_schemas() -> Iterator[None]:
    """Drop the schemas and databases the test made (after its stores closed: this fixture
    ends last)."""
    yield
    if pg.schemas or pg.databases:
        with pg.admin() as conn:
            while pg.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {pg.schemas.pop()} CASCADE")
            while pg.databases:
                conn.execute(f"DROP DATABASE IF EXISTS {pg.databases.pop()} WITH (FORCE)")

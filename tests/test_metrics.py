"""The metrics' shape: no `_created` series; the process metrics, alone or with workers."""

from __future__ import annotations

import httpx

from order_pipeline.server import assemble

from .server_process import StartServer

PROCESS_SERIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
)


def check_shape(text: str) -> None:
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    assert not [name for name in names if name.endswith("_created")]
    assert set(PROCESS_SERIES) <= names
    assert "order_pipeline_orders_total" in names


async def test_no_created_series_and_the_process_metrics() -> None:
    """One process: counters without `_created`, and CPU, memory, open files, start time."""
    client = assemble().app.test_client()
    await client.post("/order", json={"order_id": "m-1", "amount": 1})

    check_shape(await (await client.get("/metrics")).get_data(as_text=True))


async def test_with_workers_too(start_server: StartServer) -> None:
    """With --workers 2 the scrape has the same shape (process metrics of the worker answering)."""
    server = await start_server("--workers", "2", "--no-access-log")
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/order", json={"order_id": "m-2", "amount": 1})
        check_shape((await client.get("/metrics")).text)

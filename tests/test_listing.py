"""`order-pipeline orders`: what an operator reads of the store, and a store that is not one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from order_pipeline.server import Settings, assemble
from order_pipeline.store import SqliteStore


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`order-pipeline ARGS` as a process, its output captured."""
    argv = [sys.executable, "-m", "order_pipeline", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def orders_command(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("orders", *args)


async def fill(db: Path) -> None:
    """Three orders: one ok, one whose payment's refund failed, one refused by its payment."""
    async with SqliteStore(db) as store:
        client = assemble(Settings(), store=store).app.test_client()
        bodies = {
            "k-ok": {"order_id": "ok", "amount": 30},
            "k-stuck": {
                "order_id": "stuck", "amount": 40, "fail_step": "courier",
                "delay_ms": {"courier": 300}, "fail_compensation": "payment",
            },
            "k-declined": {"order_id": "declined", "amount": 0},
        }  # fmt: skip # one order a line
        for key, body in bodies.items():
            await client.post("/order", json=body, headers={"Idempotency-Key": key})


async def test_orders_lists_each_order_with_its_outcome_and_net_charge(tmp_path: Path) -> None:
    """--json: one object a line with key, status, kind, compensations and the ledger's net."""
    db = tmp_path / "orders.db"
    await fill(db)

    done = await trio.to_thread.run_sync(orders_command, "--store", f"sqlite:///{db}", "--json")

    assert done.returncode == 0, done.stderr
    lines = {line["key"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert {k: (v["status"], v["kind"], v["net_charge"]) for k, v in lines.items()} == {
        "k-ok": ("ok", "ok", 30),
        "k-stuck": ("error", "compensation_failed", 40),
        "k-declined": ("error", "payment_declined", 0),
    }
    assert lines["k-stuck"]["compensations"] == {"payment": "error", "vendor": "ok"}
    assert lines["k-stuck"]["needs_attention"] is True
    assert lines["k-ok"]["started"] <= lines["k-ok"]["finished"]


async def test_needs_attention_shows_only_those_as_text(tmp_path: Path) -> None:
    """--needs-attention: only the order whose compensation failed, one line of text."""
    db = tmp_path / "orders.db"
    await fill(db)

    done = await trio.to_thread.run_sync(
        orders_command, "--store", f"sqlite:///{db}", "--needs-attention"
    )

    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("k-stuck  order=stuck  error  kind=compensation_failed")
    assert "compensations=payment=error,vendor=ok" in line
    assert line.endswith("net_charge=40  NEEDS ATTENTION")


async def test_a_file_that_is_not_a_store_exits_2_and_stays_as_it_was(tmp_path: Path) -> None:
    """serve and orders both refuse a file that is not this store's database, in one line."""
    garbage = tmp_path / "notes.db"
    garbage.write_bytes(b"these are my notes, not a database\n")

    for argv in (["serve", "--port", "0"], ["orders"]):
        done = await trio.to_thread.run_sync(cli, *[*argv, "--store", f"sqlite:///{garbage}"])
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert "notes.db" in done.stderr
        assert "Traceback" not in done.stderr
    assert garbage.read_bytes() == b"these are my notes, not a database\n"

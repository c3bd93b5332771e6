"""`order-pipeline orders`: what an operator reads of the store, and a store that is not one."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio

from order_pipeline.cli import ListOrders, parse_command
from order_pipeline.listing import list_orders, order_summary
from order_pipeline.model import Compensation, OrderResult, StepResult, StepStatus
from order_pipeline.model import CompensationStatus as Undone
from order_pipeline.serialization import encode_result
from order_pipeline.server import Settings, assemble
from order_pipeline.store import (
    FINISHED,
    Begun,
    MemoryStore,
    SqliteStore,
    StepRecord,
    StoredOrder,
    open_store,
)

from .pg import postgres_url, table_locked


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


async def test_compensations_lost_with_their_records_are_read_from_the_reply(
    tmp_path: Path,
) -> None:
    """A store outage drops the step records of the batch it failed, while the order's final
    record is held and written later (the disk-full hunt: 2 orders of 300): the reply holds
    every compensation, and the operator's line must show the one that failed, not `-`."""
    result = OrderResult(
        "stuck",
        (
            StepResult("payment", StepStatus.OK, 150, compensation=Compensation(Undone.ERROR, 80)),
            StepResult("vendor", StepStatus.OK, 200, compensation=Compensation(Undone.OK, 50)),
            StepResult("courier", StepStatus.ERROR, 300, "no_courier"),
        ),
        "compensation_failed",
    )
    status, reply = encode_result(result)
    async with SqliteStore(tmp_path / "orders.db") as store:
        begun = await store.begin("k-stuck", "stuck", "h", b"{}", "w-1")
        assert isinstance(begun, Begun)
        await store.finish("k-stuck", begun.order.attempt_id, status, reply, result.kind)
        lines: list[str] = []
        await list_orders(store, needs_attention=True, as_json=False, write=lines.append)

    (line,) = lines
    assert "kind=compensation_failed" in line
    assert "compensations=payment=error,vendor=ok" in line


def test_compensations_are_listed_in_step_order() -> None:
    """Payment, vendor, courier, whichever step's record came first (the order in which the
    steps ended, which varies from run to run): an operator's lines compare as text."""
    order = StoredOrder(
        "k-1", "o-1", "h", b"{}", 1, "a-1", "w-1", FINISHED, 0.0, 1.0, 500, b"{}",
        "compensation_failed",
        steps=(
            StepRecord("courier", "error", "no_courier"),
            StepRecord("insurance", "ok", compensation="ok"),  # a newer version's step
            StepRecord("vendor", "ok", compensation="ok"),
            StepRecord("payment", "ok", compensation="error"),
        ),
    )  # fmt: skip # the record's fields in their order

    summary = order_summary(order, 40)

    assert list(summary["compensations"].items()) == [
        ("payment", "error"), ("vendor", "ok"), ("insurance", "ok")
    ]  # fmt: skip


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


def test_a_bad_store_in_the_environment_is_named_as_such() -> None:
    """`orders` names the variable that holds a bad store URL, not a flag that was not given."""
    argv = [sys.executable, "-m", "order_pipeline", "orders"]
    env = {**os.environ, "ORDER_PIPELINE_STORE": "bogus"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)

    assert done.returncode == 2
    assert "error: ORDER_PIPELINE_STORE: 'bogus': unsupported store URL" in done.stderr


def test_a_bad_store_in_the_environment_exits_2_even_under_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As for `serve`: the operator's environment is wrong either way, and the next command
    run without the flag, or a server started from it, would read it."""
    environ = {"ORDER_PIPELINE_STORE": "mysql://x"}
    with pytest.raises(SystemExit) as exited:
        parse_command(["orders", "--store", "sqlite:///orders.db"], environ=environ)

    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        "order-pipeline orders: error: ORDER_PIPELINE_STORE: 'mysql://x': unsupported store URL"
        " (use sqlite:///PATH or memory, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME)"
        " (--store overrides it, but the environment is wrong: fix or unset it)\n"
    )


def test_a_memory_store_in_the_environment_gives_way_to_the_flag() -> None:
    """`memory` is a good setting for a server, only not one `orders` can read: the flag's
    store is listed."""
    environ = {"ORDER_PIPELINE_STORE": "memory"}
    command = parse_command(["orders", "--store", "sqlite:///orders.db"], environ=environ)

    assert command == ListOrders("sqlite:///orders.db")


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["orders", "--store", "memory"], {}, "--store"),
        (["orders", "--json"], {"ORDER_PIPELINE_STORE": "memory"}, "ORDER_PIPELINE_STORE"),
    ],
)
def test_a_memory_store_is_refused_not_listed_as_empty(
    argv: list[str], environ: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A memory store is inside its server's process: `orders` would read a new, empty one of
    its own, and an operator (whose environment set `memory` for a server) read "no orders"."""
    with pytest.raises(SystemExit) as exited:
        parse_command(argv, environ=environ)

    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"order-pipeline orders: error: {named}: memory: a memory store is its server's own"
    )


async def test_a_store_that_does_not_exist_is_refused_not_created(tmp_path: Path) -> None:
    """An operator's read of a store path that holds nothing (a typo) exits 2 in one line
    and creates nothing there: it is not an empty store."""
    done = await trio.to_thread.run_sync(orders_command, "--store", f"sqlite:///{tmp_path}/typo.db")

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"order-pipeline: {tmp_path}/typo.db: no order store there")
    assert len(done.stderr.splitlines()) == 1
    assert not await trio.Path(tmp_path / "typo.db").exists()


async def test_a_database_that_holds_no_store_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    """A SQLite database with no order store in it (another program's, still empty) is not
    made one by an operator's read: exit 2 in one line, the file byte for byte the same."""
    db = tmp_path / "empty.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 7")
    before = db.read_bytes()

    done = await trio.to_thread.run_sync(orders_command, "--store", f"sqlite:///{db}")

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"order-pipeline: {db}: no order store there")
    assert db.read_bytes() == before
    assert not (tmp_path / "empty.db-wal").exists()


async def test_an_order_id_cannot_forge_a_line_of_the_listing(tmp_path: Path) -> None:
    """A client's order_id holding a newline is shown quoted, on its order's one line."""
    db = tmp_path / "orders.db"
    async with SqliteStore(db) as store:
        client = assemble(Settings(), store=store).app.test_client()
        forged = "x\nk-real  order=o-real  error  kind=compensation_failed"
        await client.post("/order", json={"order_id": forged, "amount": 1})

    done = await trio.to_thread.run_sync(orders_command, "--store", f"sqlite:///{db}")

    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert f"order={json.dumps(forged)}  ok" in line


async def test_an_order_id_cannot_forge_a_field_of_its_line(tmp_path: Path) -> None:
    """An order_id with spaces, or one that begins with a quote, is shown quoted too: unquoted,
    `x  NEEDS ATTENTION` read as that mark, a field of the line of an order that needs none,
    and the order_id `"a\\nb"`, quotes and backslash its own, was shown as the order_id `a`,
    newline, `b` is."""
    db = tmp_path / "orders.db"
    ids = {
        "k-marked": "gift  error  kind=compensation_failed  NEEDS ATTENTION",
        "k-quoted": '"a\\nb"',
        "k-newline": "a\nb",
    }
    async with SqliteStore(db) as store:
        client = assemble(Settings(), store=store).app.test_client()
        for key, order_id in ids.items():
            await client.post(
                "/order", json={"order_id": order_id, "amount": 1}, headers={"Idempotency-Key": key}
            )

    done = await trio.to_thread.run_sync(orders_command, "--store", f"sqlite:///{db}")

    assert done.returncode == 0, done.stderr
    lines = {line.split("  ", 1)[0]: line for line in done.stdout.splitlines()}
    assert not any(line.endswith("NEEDS ATTENTION") for line in lines.values())
    for key, order_id in ids.items():
        assert f"  order={json.dumps(order_id)}  ok  " in lines[key]
    shown = {line.split("  order=", 1)[1].split("  ok  ")[0] for line in lines.values()}
    assert len(shown) == len(ids)


def listing_to_a_closed_pipe(db: Path) -> tuple[int, str]:
    """`orders` whose stdout's reader has gone before it writes: its status and stderr."""
    argv = [sys.executable, "-m", "order_pipeline", "orders", "--store", f"sqlite:///{db}"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        process.stdout.close()  # before it writes: it takes a fraction of a second to start
        _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr.decode()


async def test_a_reader_that_stops_early_is_not_an_error(tmp_path: Path) -> None:
    """`orders | head -1`: the reader closes the pipe before the listing ends; the command
    ends quietly, status 0, with no traceback."""
    db = tmp_path / "orders.db"
    await fill(db)

    assert await trio.to_thread.run_sync(listing_to_a_closed_pipe, db) == (0, "")


def listing_to_a_full_disk(db: Path) -> tuple[int, str]:
    """`orders > /dev/full` (stdout on a full disk): its status and stderr."""
    argv = [sys.executable, "-m", "order_pipeline", "orders", "--store", f"sqlite:///{db}"]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, timeout=60, check=False)
    return done.returncode, done.stderr.decode()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_a_listing_that_cannot_be_written_says_so_in_one_line(tmp_path: Path) -> None:
    """Stdout on a full disk (`> /dev/full`): one line naming the cause and status 1, not a
    traceback (nor status 0: the operator's file lacks the orders)."""
    db = tmp_path / "orders.db"
    await fill(db)

    status, stderr = await trio.to_thread.run_sync(listing_to_a_full_disk, db)

    assert status == 1
    assert stderr == "order-pipeline orders: cannot write the listing: No space left on device\n"


def listing_to_a_closed_stdout(db: Path) -> tuple[int, str]:
    """`orders >&-` (stdout closed, as some supervisors and cron set-ups leave it): its status
    and stderr."""
    argv = [sys.executable, "-m", "order_pipeline", "orders", "--store", f"sqlite:///{db}"]
    shell = ["sh", "-c", 'exec "$@" >&-', "sh", *argv]
    done = subprocess.run(shell, capture_output=True, timeout=60, check=False)
    return done.returncode, done.stderr.decode()


async def test_a_listing_to_a_closed_stdout_says_so_in_one_line(tmp_path: Path) -> None:
    """With stdout closed Python has no `sys.stdout`: the listing went nowhere and the command
    ended in an AttributeError's traceback; it is one line and status 1."""
    db = tmp_path / "orders.db"
    await fill(db)

    status, stderr = await trio.to_thread.run_sync(listing_to_a_closed_stdout, db)

    assert status == 1
    assert stderr == "order-pipeline orders: cannot write the listing: stdout is closed\n"


async def test_the_listing_writes_its_first_line_before_it_has_read_every_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store is listed a page at a time, each page written before the next is read: the
    first line comes once one page is read, not every order (a day of a busy store is
    millions), and every order is written once, oldest start first."""
    store = MemoryStore()
    for n in range(2500):
        await store.begin(f"k-{n:04}", f"o-{n}", "hash", b"{}", "w-1")
    pages: list[int] = []  # the orders of each page the listing asked for
    real = store.list_orders

    async def counted(**query: Any) -> list[tuple[StoredOrder, int]]:
        page = await real(**query)
        pages.append(len(page))
        return page

    monkeypatch.setattr(store, "list_orders", counted)
    read_at_first_line: list[int] = []
    keys: list[str] = []

    def write(line: str) -> None:
        if not keys:
            read_at_first_line.append(sum(pages))
        keys.append(json.loads(line)["key"])

    count = await list_orders(store, needs_attention=False, as_json=True, write=write)

    assert count == 2500
    assert keys == [f"k-{n:04}" for n in range(2500)]
    assert len(pages) > 1
    assert read_at_first_line == [pages[0]]
    assert pages[0] < 2500


def test_an_oserror_of_the_read_is_not_called_a_listing_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError before any line is written (here EMFILE opening the store, as under `ulimit
    -n 7`) is not 'cannot write the listing: Too many open files': stdout took everything."""
    from order_pipeline import main

    def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(main, "open_store", no_descriptors)
    said: list[str] = []
    monkeypatch.setattr(main, "write_line", said.append)
    with pytest.raises(OSError, match="Too many open files"):
        main.main(["orders", "--store", f"sqlite:///{tmp_path / 'orders.db'}"])
    assert not [line for line in said if "cannot write the listing" in line]


@pytest.mark.postgres
async def test_a_store_that_cannot_be_read_meanwhile_ends_the_listing_in_one_line(
    schema: str,
) -> None:
    """The store opens, but a page cannot be read (here another transaction's lock on the
    orders table, held past the store's lock wait, as an operator's LOCK TABLE or a VACUUM
    FULL holds it; likewise a database gone meanwhile): one line naming why and status 1,
    not a traceback."""
    url = postgres_url(schema=schema)
    async with open_store(url) as store:
        await store.begin("k-1", "o-1", "hash", b"{}", "w-1")
    async with table_locked(schema, "orders", "ACCESS EXCLUSIVE"):
        done = await trio.to_thread.run_sync(orders_command, "--store", url)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]  # after the store's own warnings, if any
    assert last.startswith("order-pipeline orders: cannot read the store: postgresql://")
    assert "lock timeout" in last


async def test_each_line_says_how_its_order_stands_in_utc(tmp_path: Path) -> None:
    """The lines `orders` writes (`list_orders`, here in this process): ok, failed, needing
    attention, still running; times in UTC whatever the host's zone; an order_id that would
    break the line quoted; --needs-attention keeps only that one."""
    db = tmp_path / "orders.db"
    await fill(db)
    async with SqliteStore(db) as store:
        await store.renew_lease("w-1", 60.0)  # its process lives: it needs no attention
        await store.begin("k-running", "still\nrunning", "h", b"{}", "w-1")
        text: list[str] = []
        as_json: list[str] = []
        attention: list[str] = []
        count = await list_orders(store, needs_attention=False, as_json=False, write=text.append)
        await list_orders(store, needs_attention=False, as_json=True, write=as_json.append)
        await list_orders(store, needs_attention=True, as_json=False, write=attention.append)

    assert count == 4
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"
    assert [line.split()[0] for line in text] == ["k-ok", "k-stuck", "k-declined", "k-running"]
    expected = [
        rf"k-ok  order=ok  ok  kind=ok  attempt=1  started={stamp}  finished={stamp}"
        r"  compensations=-  net_charge=30",
        rf"k-stuck  order=stuck  error  kind=compensation_failed  attempt=1  started={stamp}"
        rf"  finished={stamp}  compensations=payment=error,vendor=ok  net_charge=40"
        r"  NEEDS ATTENTION",
        rf"k-declined  order=declined  error  kind=payment_declined  attempt=1  started={stamp}"
        rf"  finished={stamp}  compensations=\S+  net_charge=0",
        rf'k-running  order="still\\nrunning"  running  kind=-  attempt=1  started={stamp}'
        r"  finished=-  compensations=-  net_charge=0",
    ]
    for line, pattern in zip(text, expected, strict=True):
        assert re.fullmatch(pattern, line), line
    assert attention == [text[1]]
    running = json.loads(as_json[-1])
    assert re.fullmatch(stamp, running.pop("started"))
    assert running == {
        "key": "k-running", "order_id": "still\nrunning", "status": "running", "kind": None,
        "attempt": 1, "finished": None, "compensations": {}, "net_charge": 0,
        "needs_attention": False,
    }  # fmt: skip
    assert [json.loads(line)["net_charge"] for line in as_json] == [30, 40, 0, 0]

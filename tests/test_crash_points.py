"""An order whose process dies at any point Trio schedules while it runs is left correct.

A SIGKILL, the out-of-memory killer, a power loss: what survives is what the store had
committed at that moment, no more. Each test runs one order in process on a SQLite file,
under the autojump clock, with the desk's maintenance running (test_cancel_points.py's
run, uncancelled), and at every point Trio runs a task's step while the order's submit lives
(and once as it has ended) copies what the file has committed, with SQLite's backup API from
a connection of its own: a reader of a WAL database sees the committed transactions alone,
which is what a crash leaves (the store's own connection is not touched). The run goes on;
it is a dead process's future. Then, for each copy, a new process (a new `assemble`: a new
owner, a new lease) opens it, its maintenance runs for the lease timeout plus 2 s (the dead
owner's lease, live at the crash, expires meanwhile), and what README's Durability section
promises after a crash is checked: the key holds one order, finished; `interrupted` with
every charge refunded, or what it had ended as before the crash; nothing needing attention
unless a refund fails; and a retry with the key, over HTTP, runs it again (interrupted,
or never begun) or replays it byte for byte, the ledger agreeing.

A second crash, of the process recovering the order: for each first crash that left the
order running (one copy of each distinct state), the new process's recovery is copied in
turn at every point from the dead owner's lease's expiry to its final record's commit
(RecoverySnapshots), and a third process recovers each of those copies, under the same
promises: the order undone once, its refund written again changing nothing, an undoing
recorded done never taken back or skipped.

The store's clock (`time.time`) follows Trio's, and the new process starts at the moment
the old one died: its wall clock continues the dead one's, so the lease is waited out on it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path

import attrs
import pytest
import trio
import trio._core._run
import trio.testing
from werkzeug.datastructures import Headers

from order_pipeline.desk import Answer, canonical
from order_pipeline.kinds import COMPENSATION_FAILED, INTERRUPTED
from order_pipeline.model import STEP_NAMES, CompensationStatus, StepStatus
from order_pipeline.serialization import converter
from order_pipeline.server import Settings, assemble
from order_pipeline.store import FINISHED, RUNNING, OrderStore, StoredOrder

from .conftest import make_order
from .points import (
    AMOUNT,
    KEY,
    LEASE_S,
    VARIANTS,
    CancelAt,
    Run,
    Stores,
    Variant,
    VirtualSqlite,
    Wall,
    check,
    check_retry,
    run_once,
)
from .test_durability import post

# Within this of its start, a restarted server has recovered a dead one's orders (README).
RECOVERED_WITHIN_S = LEASE_S + 2
# test_cancel_points' steps end within 0.1 s, so that one commit carries their records (the
# lease's renewal, every 2/3 s). Apart, each record commits before the next step ends, and
# the courier's release before the refund: the committed states in between.
APART = {
    "delay_ms": {"payment": 100, "courier": 800, "vendor": 1500},
    "compensation_delay_ms": {"courier": 100, "payment": 400},
}


def timed(variant: str, timing: str) -> Variant:
    """The variant of test_cancel_points, its steps ending together or apart."""
    chosen = VARIANTS[variant]
    if timing == "together":
        return chosen
    return attrs.evolve(
        chosen, order=make_order(**{**converter.unstructure(chosen.order), **APART})
    )


@attrs.frozen
class Crash:
    """A copy of what the store's file had committed at point `at` (None: as the submit
    ended, its answer returned), the wall clock then, and the owner of the process that died
    (None: the copy's only lease's)."""

    at: int | None
    path: Path
    wall: float
    owner: str | None = None


def copy_committed(live: Path, path: Path) -> None:
    """What `live` has committed, copied to `path` with the backup API from a connection of
    its own: one read transaction, the last commit whole."""
    with closing(sqlite3.connect(live)) as src, closing(sqlite3.connect(path)) as dst:
        src.backup(dst)


def state_of(path: Path, column: str = "state") -> str | None:
    """The key's order's state in a copy, or another column (None: no order)."""
    with closing(sqlite3.connect(path)) as conn:
        row = conn.execute(f"SELECT {column} FROM orders WHERE key = ?", (KEY,)).fetchone()
    return None if row is None else str(row[0])


def content_of(path: Path) -> str:
    """A digest of a copy's orders, steps and ledger (not its leases): copies alike in it
    are one state of the order, whatever the leases' expiries."""
    digest = hashlib.sha256()
    with closing(sqlite3.connect(path)) as conn:
        for table in ("orders", "steps", "ledger"):
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2"):
                digest.update(repr((table, row)).encode())
    return digest.hexdigest()


class Snapshots(CancelAt):
    """test_cancel_points' counter (cancelling nothing here), which at each point, as that
    step is about to run, and as the submit has ended, copies the committed state of `live`."""

    def __init__(
        self,
        scope: trio.CancelScope,
        at: int | None,
        *,
        before: bool,
        live: Path,
        crashes: list[Crash],
    ) -> None:
        super().__init__(scope, at, before=before)
        self.live, self.crashes = live, crashes

    def _point(self, task: trio.lowlevel.Task) -> None:
        self._copy(self.points)
        super()._point(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task is self.submit:
            self._copy(None)
        super().task_exited(task)

    def _copy(self, at: int | None) -> None:
        path = self.live.with_name(f"crash-{len(self.crashes)}.db")
        copy_committed(self.live, path)
        self.crashes.append(Crash(at, path, time.time()))


class RecoverySnapshots(trio.abc.Instrument):
    """The second crash's copies, while a new process on a first crash's copy, `live`,
    recovers the order the first left running: from the first point at which the store's
    clock has reached `since`, the expiry of the lease of the order's owner (a claim may
    take the order from then on; before, the maintenance renews its own lease and looks,
    taking nothing, so that a crash there leaves the order, its steps and the ledger as
    the first crash did, which the first test recovers), until and including the first
    point at which `live` holds the order finished (its final record committed: the
    recovery is over). A point is, as for Snapshots, a step Trio is about to run of any
    task but the test's own (the maintenance's lease, looks and claim, the compensations,
    the store's wake-ups); at each, what `live` has committed is copied. `owner` is the
    recovering process's, whose crash the copies are."""

    def __init__(self, live: Path, since: float, owner: str, crashes: list[Crash]) -> None:
        self.live, self.since, self.owner, self.crashes = live, since, owner, crashes
        self.test = trio.lowlevel.current_task()
        self.points = 0  # counted from the maintenance's start
        self.over = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.test:
            return
        self.points += 1
        if time.time() < self.since:
            return
        path = self.live.with_name(f"{self.live.stem}-{len(self.crashes)}.db")
        copy_committed(self.live, path)
        self.crashes.append(Crash(self.points - 1, path, time.time(), self.owner))
        if state_of(path) == FINISHED:
            self.end()

    def end(self) -> None:
        if not self.over:
            self.over = True
            trio.lowlevel.remove_instrument(self)


@attrs.frozen
class Recovered:
    """A new process on a crash's copy: what the copy held (the key's order, its net charge,
    the leases, owner to expiry, and the dead process's); after its maintenance ran for
    RECOVERED_WITHIN_S, the key's order, every order listed, those needing attention and the
    net charge; the retry's answer (status, body, headers), and the key's order and net
    charge after it."""

    crash: Crash
    held: StoredOrder | None
    held_net: int
    leases: dict[str, float]
    dead_lease: float
    stored: StoredOrder | None
    listed: list[StoredOrder]
    attention: list[StoredOrder]
    net: int
    retry: tuple[int, bytes, Headers]
    retried: StoredOrder | None
    net_after: int

    def __str__(self) -> str:
        def state(o: StoredOrder | None) -> object:
            return None if o is None else (o.attempt, o.state, o.kind, o.http_status)

        at = "as the submit ended" if self.crash.at is None else f"at point {self.crash.at}"
        crashed = "crashed" if self.crash.owner is None else "its recovery crashed"
        return (
            f"{crashed} {at} ({self.crash.path.name}): held {state(self.held)}, net"
            f" {self.held_net}; recovered {state(self.stored)}, net {self.net},"
            f" {len(self.attention)} needing attention; retried {self.retry[0]}, net"
            f" {self.net_after}"
        )


def leases_of(path: Path) -> dict[str, float]:
    """The dead processes' leases in the copy (read before a process opens it): each owner's
    expiry. (The order a dead process left in a restart's key held none.)"""
    with closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT owner, expires_at FROM leases"))


async def restart_on(
    crash: Crash,
    variant: Variant,
    wall: Wall,
    clock: trio.testing.MockClock,
    instrument: Callable[[str], RecoverySnapshots] | None = None,
) -> Recovered:
    """A new process on the crash's copy, from the moment of the crash: its maintenance run
    for RECOVERED_WITHIN_S, then the key retried, over HTTP. `instrument`, given the new
    process's owner, is added once its maintenance has started, and ended before the retry
    at the latest."""
    trio._core._run._r.seed(0)  # as test_cancel_points' runs
    leases = leases_of(crash.path)
    if crash.owner is None:
        [dead] = leases
    else:
        dead = crash.owner
    wall.base = crash.wall - clock.current_time()
    async with VirtualSqlite(crash.path, clock) as store:
        held, held_net = await store.get(KEY), await store.net_charge(KEY)
        assembly = assemble(Settings(lease_timeout=LEASE_S), store=store)
        assert assembly.desk.owner not in leases
        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            snapshots = None if instrument is None else instrument(assembly.desk.owner)
            if snapshots is not None:
                trio.lowlevel.add_instrument(snapshots)
            await trio.sleep(RECOVERED_WITHIN_S)
            if snapshots is not None:
                snapshots.end()
            stored = await store.get(KEY)
            listed = [listed for listed, _ in await store.list_orders()]
            attention = [listed for listed, _ in await store.list_orders(needs_attention=True)]
            net = await store.net_charge(KEY)
            retry = await post(assembly, canonical(variant.order), KEY)
            retried = await store.get(KEY)
            net_after = await store.net_charge(KEY)
            nursery.cancel_scope.cancel()
    return Recovered(
        crash, held, held_net, leases, leases[dead], stored, listed, attention, net, retry,
        retried, net_after,
    )  # fmt: skip # Recovered's fields in their order


def check_undone(stored: StoredOrder, held: StoredOrder, variant: Variant, where: str) -> None:
    """`stored`, recovered from `held` (running, or recovered as the recovering process
    died): every step that succeeded or whose outcome was never recorded undone (a failed
    refund tried, and failed again), one recorded failed left alone, and an undoing recorded
    done still done; `interrupted`, or `compensation_failed` if the refund fails."""
    assert stored.kind == (COMPENSATION_FAILED if variant.refund_fails else INTERRUPTED), where
    steps = {record.step: record for record in stored.steps}
    assert steps.keys() == set(STEP_NAMES), where
    for record in held.steps:
        if record.compensation == CompensationStatus.OK:
            assert steps[record.step].compensation == CompensationStatus.OK, where
    for step in steps.values():
        failed = step.status in (StepStatus.ERROR, StepStatus.CANCELED)
        assert step.compensation in (
            (None,) if failed else (CompensationStatus.OK, CompensationStatus.ERROR)
        ), where
        assert variant.refund_fails or step.compensation != CompensationStatus.ERROR, where


def check_recovered(r: Recovered, variant: Variant, answer: Answer | None) -> None:
    """What README's Durability section promises after a crash; `answer` the dead process's,
    if its submit returned one."""
    held, stored, where = r.held, r.stored, str(r)
    if r.crash.at is None:  # it died as the submit returned its answer, which was sent
        assert held is not None, where
        assert held.state == FINISHED, where
    # The dead process held a live lease at the crash (renewed every third of it), and the
    # new one took nothing of it before it expired.
    assert r.crash.wall < r.dead_lease <= r.crash.wall + LEASE_S, where
    if held is None:  # it died before the order's begin committed
        assert (stored, r.listed, r.net, r.attention) == (None, [], 0, []), where
    else:
        # One order under the key, finished: recovered, or as it had ended.
        assert r.listed == [stored], where
        assert stored is not None, where
        assert stored.state == FINISHED, where
        assert stored.attempt_id == held.attempt_id, where
        recovery = r.crash.owner is not None  # the recovering process died, not the order's
        if held.state == RUNNING:
            # Undone, once its owner's lease had expired (the dead process's, or the one's
            # before it, whose claim had not committed): every charge refunded, unless the
            # refund fails (then as it was, for a person).
            assert stored.finished_at is not None, where
            assert stored.finished_at >= r.leases.get(held.owner, -math.inf), where
            assert r.net == (r.held_net if variant.refund_fails else 0), where
            check_undone(stored, held, variant, where)
        elif recovery:  # the recovery's final record had committed: untouched, its money back
            assert stored == held, where
            assert variant.refund_fails or r.net == 0, where
            check_undone(stored, held, variant, where)
        else:  # its final record had committed: untouched
            assert stored == held, where
            if r.crash.at is None:  # after its answer: recorded before it was sent, as sent
                assert answer is not None, where
                assert (answer.status, answer.body) == (held.http_status, held.reply), where
            if stored.kind == INTERRUPTED:  # only a restart's attempt 1, left by the dead
                assert variant.restarts, where
                assert stored.attempt == 1, where
                assert r.net == 0, where
            else:
                kept = stored.kind in (None, COMPENSATION_FAILED)
                assert r.net == (AMOUNT if kept else 0), where
        assert variant.refund_fails or stored.kind != COMPENSATION_FAILED, where
        assert r.attention == ([stored] if stored.kind == COMPENSATION_FAILED else []), where
    check_retry(r.retry, r.retried, stored, variant, r.net, r.net_after, where)


async def first_crashes(
    clock: trio.testing.MockClock, tmp_path: Path, variant: Variant
) -> tuple[Run, list[Crash]]:
    """The order run whole, and a copy of what its store had committed at each of its points
    (and as it answered)."""
    crashes: list[Crash] = []
    live = tmp_path / "live.db"

    @asynccontextmanager
    async def store(_: int) -> AsyncIterator[OrderStore]:
        async with VirtualSqlite(live, clock) as opened:
            yield opened

    def snapshots(scope: trio.CancelScope, at: int | None, *, before: bool) -> Snapshots:
        return Snapshots(scope, at, before=before, live=live, crashes=crashes)

    whole = await run_once(Stores(store, exact=False), 0, variant, None, True, snapshots)
    check(whole, variant)
    assert whole.answer is not None, str(whole)
    assert whole.answer.status == variant.status, str(whole)
    assert len(crashes) == whole.points + 1 > 4, str(whole)  # a copy at each point, and more
    return whole, crashes


TIMINGS = pytest.mark.parametrize(
    "timing", ["together", "apart"], ids=["steps together", "steps apart"]
)


@TIMINGS
@pytest.mark.parametrize("name", list(VARIANTS))
async def test_an_order_crashed_at_any_point_is_recovered_its_money_and_retry_agreeing(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    timing: str,
) -> None:
    """Killed at each of the N points of its run (and as it answered), the order's store
    as committed then is recovered by a new process within the lease timeout plus 2 s: its
    key holds one finished order, `interrupted` with its money back or what it had ended
    as, and a retry runs it again or replays it, the ledger agreeing."""
    wall = Wall(autojump_clock)
    monkeypatch.setattr(time, "time", wall)
    variant = timed(name, timing)
    whole, crashes = await first_crashes(autojump_clock, tmp_path, variant)
    for crash in crashes:
        recovered = await restart_on(crash, variant, wall, autojump_clock)
        check_recovered(recovered, variant, whole.answer)


@TIMINGS
@pytest.mark.parametrize("name", list(VARIANTS))
async def test_a_recovery_crashed_at_any_point_is_recovered_again_undoing_each_step_once(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    timing: str,
) -> None:
    """The process recovering a crashed order killed in turn, at each point of its recovery
    (RecoverySnapshots: from the dead owner's lease's expiry to the recovery's final record's
    commit; its looks and claim, the compensations, their records): a third process on
    what the store had committed then, from that moment, recovers the order within the lease
    timeout plus 2 s as README promises after any crash: one finished order under the key,
    `interrupted` with its charge refunded (the refund written twice changes nothing) and
    every step undone, an undoing that had committed still done, attention only if the
    refund fails, and a retry runs it again, the ledger agreeing. For each distinct state
    (orders, steps and ledger) a first crash left the order running in: its first copy."""
    wall = Wall(autojump_clock)
    monkeypatch.setattr(time, "time", wall)
    variant = timed(name, timing)
    whole, crashes = await first_crashes(autojump_clock, tmp_path, variant)
    running: dict[str, Crash] = {}
    for crash in crashes:
        if state_of(crash.path) == RUNNING:
            running.setdefault(content_of(crash.path), crash)
    assert running
    for first in running.values():
        seconds: list[Crash] = []
        held_by = state_of(first.path, "owner")
        assert held_by is not None
        since = leases_of(first.path)[held_by]
        snapshots = functools.partial(RecoverySnapshots, first.path, since, crashes=seconds)
        recovered = await restart_on(first, variant, wall, autojump_clock, snapshots)
        check_recovered(recovered, variant, whole.answer)
        assert seconds, str(recovered)
        assert state_of(seconds[-1].path) == FINISHED, str(recovered)
        for second in seconds:
            check_recovered(await restart_on(second, variant, wall, autojump_clock), variant, None)

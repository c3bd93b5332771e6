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

The store's clock (`time.time`) follows Trio's, and the new process starts at the moment
the old one died: its wall clock continues the dead one's, so the lease is waited out on it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
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
from .test_cancel_points import (
    AMOUNT,
    KEY,
    LEASE_S,
    VARIANTS,
    CancelAt,
    Stores,
    Variant,
    _Sqlite,
    check,
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


class Wall:
    """`time.time` for the store: Trio's clock, from `base`; each new process sets `base` so
    that it starts where the dead one's clock stopped."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.base = time.time()

    def __call__(self) -> float:
        return self.base + self.clock.current_time()


class _Store(_Sqlite):
    """test_cancel_points' SQLite (the clock still while Trio waits for its thread), whose
    monotonic clock is its wall clock (`ClockWatch`): both follow Trio's virtual time here,
    as both follow real time on a host, so the seconds the autojump skips are not a step of
    the wall clock (after which claims wait two real seconds for the owners to renew)."""

    def _now(self) -> float:
        now = time.time()
        self._clock.observe(now, now)
        return now


@attrs.frozen
class Crash:
    """A copy of what the store's file had committed at point `at` (None: as the submit
    ended, its answer returned), and the wall clock then."""

    at: int | None
    path: Path
    wall: float


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
        with closing(sqlite3.connect(self.live)) as src, closing(sqlite3.connect(path)) as dst:
            src.backup(dst)  # one read transaction: the last commit, whole
        self.crashes.append(Crash(at, path, time.time()))


@attrs.frozen
class Recovered:
    """A new process on a crash's copy: what the copy held (the key's order, its net charge,
    the dead owner's lease); after its maintenance ran for RECOVERED_WITHIN_S, the key's
    order, every order listed, those needing attention and the net charge; the retry's answer
    (status, body, headers), and the key's order and net charge after it."""

    crash: Crash
    held: StoredOrder | None
    held_net: int
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
        return (
            f"crashed {at} ({self.crash.path.name}): held {state(self.held)}, net"
            f" {self.held_net}; recovered {state(self.stored)}, net {self.net},"
            f" {len(self.attention)} needing attention; retried {self.retry[0]}, net"
            f" {self.net_after}"
        )


def dead_lease(path: Path) -> tuple[str, float]:
    """The dead process's lease in the copy, the only one (read before a process opens it):
    its owner and expiry. (The order a dead process left in a restart's key held none.)"""
    with closing(sqlite3.connect(path)) as conn:
        [(owner, expires_at)] = conn.execute("SELECT owner, expires_at FROM leases")
    return owner, expires_at


async def restart_on(
    crash: Crash, variant: Variant, wall: Wall, clock: trio.testing.MockClock
) -> Recovered:
    """A new process on the crash's copy, from the moment of the crash: its maintenance run
    for RECOVERED_WITHIN_S, then the key retried, over HTTP."""
    trio._core._run._r.seed(0)  # as test_cancel_points' runs
    owner, lease = dead_lease(crash.path)
    wall.base = crash.wall - clock.current_time()
    async with _Store(crash.path, clock) as store:
        held, held_net = await store.get(KEY), await store.net_charge(KEY)
        assembly = assemble(Settings(lease_timeout=LEASE_S), store=store)
        assert assembly.desk.owner != owner
        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            await trio.sleep(RECOVERED_WITHIN_S)
            stored = await store.get(KEY)
            listed = [listed for listed, _ in await store.list_orders()]
            attention = [listed for listed, _ in await store.list_orders(needs_attention=True)]
            net = await store.net_charge(KEY)
            retry = await post(assembly, canonical(variant.order), KEY)
            retried = await store.get(KEY)
            net_after = await store.net_charge(KEY)
            nursery.cancel_scope.cancel()
    return Recovered(
        crash, held, held_net, lease, stored, listed, attention, net, retry, retried, net_after
    )


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
        if held.state == RUNNING:
            # Undone, once its owner's lease had expired: every charge refunded, unless the
            # refund fails (then as it was, for a person).
            assert stored.finished_at is not None, where
            assert stored.finished_at >= r.dead_lease, where
            assert stored.kind == (COMPENSATION_FAILED if variant.refund_fails else INTERRUPTED)
            assert r.net == (r.held_net if variant.refund_fails else 0), where
            # Every step that succeeded or whose outcome was never recorded was undone (a
            # failed refund tried, and failed again); one recorded failed was left alone.
            steps = {record.step: record for record in stored.steps}
            assert steps.keys() == set(STEP_NAMES), where
            for step in steps.values():
                failed = step.status in (StepStatus.ERROR, StepStatus.CANCELED)
                assert step.compensation in (
                    (None,) if failed else (CompensationStatus.OK, CompensationStatus.ERROR)
                ), where
                assert variant.refund_fails or step.compensation != CompensationStatus.ERROR
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
                assert r.net == (AMOUNT if stored.kind in (None, COMPENSATION_FAILED) else 0)
        assert variant.refund_fails or stored.kind != COMPENSATION_FAILED, where
        assert r.attention == ([stored] if stored.kind == COMPENSATION_FAILED else []), where
    status, body, headers = r.retry
    if stored is None or stored.kind == INTERRUPTED:
        # Never begun, or interrupted: run again (a new attempt), as normal.
        assert "Idempotent-Replayed" not in headers, where
        assert status == variant.status, where
        kept = status == 200 or json.loads(body)["error"]["kind"] == COMPENSATION_FAILED
        assert r.net_after == (AMOUNT if kept else 0), where
    else:
        assert headers.get("Idempotent-Replayed") == "true", where
        assert (status, body) == (stored.http_status, stored.reply), where
        assert r.net_after == r.net, where
    retried = r.retried
    assert retried is not None, where
    assert (retried.state, retried.http_status, retried.reply) == (FINISHED, status, body), where


@pytest.mark.parametrize("timing", ["together", "apart"], ids=["steps together", "steps apart"])
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
    crashes: list[Crash] = []
    live = tmp_path / "live.db"

    @asynccontextmanager
    async def store(_: int) -> AsyncIterator[OrderStore]:
        async with _Store(live, autojump_clock) as opened:
            yield opened

    def snapshots(scope: trio.CancelScope, at: int | None, *, before: bool) -> Snapshots:
        return Snapshots(scope, at, before=before, live=live, crashes=crashes)

    variant = timed(name, timing)
    whole = await run_once(Stores(store, exact=False), 0, variant, None, True, snapshots)
    check(whole, variant)
    assert len(crashes) == whole.points + 1
    for crash in crashes:
        recovered = await restart_on(crash, variant, wall, autojump_clock)
        check_recovered(recovered, variant, whole.answer)

"""The order store in dicts: the same contract as SQLite's, nothing durable.

For benchmarks and tests that don't care about crashes. Each coroutine checkpoints first and
then changes the dicts without awaiting, so it is atomic under Trio and a cancellation means
it did nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection

import attrs
import trio

from ..kinds import COMPENSATION_FAILED, INTERRUPTED
from ..model import new_id
from .base import (
    FINISHED,
    LIST_PAGE,
    RUNNING,
    Begun,
    Existing,
    FinishedReply,
    StepRecord,
    StoredOrder,
    takes_undo_back,
)


@attrs.define
class _Charge:
    charge_id: str
    key: str
    amount: int
    refunded: bool = False


class MemoryStore:
    """Orders, steps, leases and the ledger in dicts of one process."""

    def __init__(self) -> None:
        self._orders: dict[str, StoredOrder] = {}  # steps kept apart, in _steps
        self._steps: dict[str, dict[str, StepRecord]] = {}  # attempt_id -> step -> record
        self._leases: dict[str, float] = {}
        self._ledger: dict[str, _Charge] = {}  # by charge id
        self._charges_of: dict[str, list[_Charge]] = {}  # by order key

    def _with_steps(self, order: StoredOrder) -> StoredOrder:
        steps = self._steps.get(order.attempt_id)
        return attrs.evolve(order, steps=tuple(steps.values())) if steps else order

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        await trio.lowlevel.checkpoint()
        if (found := self._orders.get(key)) is not None:
            return Existing(self._with_steps(found))
        order = StoredOrder(
            key, order_id, request_hash, body, 1, new_id(), owner, RUNNING, time.time()
        )
        self._orders[key] = order
        return Begun(order)

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        await trio.lowlevel.checkpoint()
        old = self._orders.get(key)
        if old is None or old.kind != INTERRUPTED or old.state != FINISHED:
            return None
        if old.attempt != expected_attempt:
            return None
        self._steps.pop(old.attempt_id, None)
        new = StoredOrder(
            key,
            old.order_id,
            old.request_hash,
            old.body,
            old.attempt + 1,
            new_id(),
            owner,
            RUNNING,
            time.time(),
        )
        self._orders[key] = new
        return new

    def record_step(
        self, key: str, attempt_id: str, record: StepRecord, *, owner: str | None = None
    ) -> None:
        order = self._orders.get(key)
        if order is None or order.attempt_id != attempt_id:
            return
        if owner is None or order.owner == owner:
            steps = self._steps.setdefault(attempt_id, {})
            stored = steps.get(record.step)
            if stored is None or not takes_undo_back(stored.compensation, record.compensation):
                steps[record.step] = record

    async def finish(
        self,
        key: str,
        attempt_id: str,
        http_status: int,
        reply: bytes,
        kind: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.finish_soon(key, attempt_id, http_status, reply, kind, owner=owner)

    def finish_soon(
        self,
        key: str,
        attempt_id: str,
        http_status: int,
        reply: bytes,
        kind: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        order = self._orders.get(key)
        if order is None or order.attempt_id != attempt_id or order.state != RUNNING:
            return
        if owner is not None and order.owner != owner:
            return
        self._orders[key] = attrs.evolve(
            order,
            state=FINISHED,
            finished_at=time.time(),
            http_status=http_status,
            reply=reply,
            kind=kind,
        )

    async def get(self, key: str) -> StoredOrder | None:
        await trio.lowlevel.checkpoint()
        order = self._orders.get(key)
        return None if order is None else self._with_steps(order)

    async def finished_reply(self, key: str, attempt_id: str) -> FinishedReply | None:
        await trio.lowlevel.checkpoint()
        o = self._orders.get(key)
        if o is None or o.attempt_id != attempt_id or o.state != FINISHED:
            return None
        assert o.http_status is not None
        assert o.reply is not None
        return FinishedReply(o.http_status, o.reply, o.kind)

    async def list_orders(
        self,
        *,
        needs_attention: bool = False,
        after: tuple[float, str] | None = None,
        limit: int = LIST_PAGE,
    ) -> list[tuple[StoredOrder, int]]:
        await trio.lowlevel.checkpoint()
        now = time.time()
        found = sorted(
            (o for o in self._orders.values() if after is None or (o.started_at, o.key) > after),
            key=lambda o: (o.started_at, o.key),
        )  # every order a page, as it is only the tests' and benchmarks' store
        page: list[tuple[StoredOrder, int]] = []
        for stored in found:
            if len(page) == limit:
                break
            order = attrs.evolve(
                self._with_steps(stored),
                abandoned=stored.state == RUNNING and self._lease_lapsed(stored.owner, now),
            )
            if order.needs_attention or not needs_attention:
                page.append((order, self._net_charge(order.key)))
        return page

    def _lease_lapsed(self, owner: str, now: float) -> bool:
        """`owner` holds no live lease (none, or expired by `now`)."""
        return self._leases.get(owner, now) <= now

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 (a lease's length)
        await trio.lowlevel.checkpoint()
        self._leases[owner] = time.time() + timeout

    async def release_lease(self, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        self._leases.pop(owner, None)

    async def claim_interrupted(
        self, owner: str, limit: int, *, busy: Collection[str] = ()
    ) -> list[StoredOrder]:
        await trio.lowlevel.checkpoint()
        now = time.time()
        claimed: list[StoredOrder] = []
        for key, order in self._orders.items():
            if len(claimed) >= limit:
                break
            if (
                order.state == RUNNING
                and order.owner != owner
                and key not in busy
                and self._lease_lapsed(order.owner, now)
            ):
                self._orders[key] = order = attrs.evolve(order, owner=owner)
                claimed.append(self._with_steps(order))
        return claimed

    async def running_of(self, owner: str, older_than: float) -> list[StoredOrder]:
        await trio.lowlevel.checkpoint()
        started_before = time.time() - older_than
        return [
            self._with_steps(o)
            for o in self._orders.values()
            if o.state == RUNNING and o.owner == owner and o.started_at < started_before
        ]

    async def charge(self, charge_id: str, key: str, amount: int) -> None:
        await trio.lowlevel.checkpoint()
        if charge_id not in self._ledger:
            self._ledger[charge_id] = charge = _Charge(charge_id, key, amount)
            self._charges_of.setdefault(key, []).append(charge)

    async def refund(self, charge_id: str, key: str) -> None:
        await trio.lowlevel.checkpoint()
        charge = self._ledger.get(charge_id)
        if charge is None:  # not (yet) made: a late charge is then void (see sqlite.py)
            self._ledger[charge_id] = void = _Charge(charge_id, key, 0, refunded=True)
            self._charges_of.setdefault(key, []).append(void)
        else:
            charge.refunded = True

    async def net_charge(self, key: str) -> int:
        await trio.lowlevel.checkpoint()
        return self._net_charge(key)

    def _net_charge(self, key: str) -> int:
        return sum(c.amount for c in self._charges_of.get(key, ()) if not c.refunded)

    async def purge(self, older_than: float, limit: int) -> int:
        await trio.lowlevel.checkpoint()
        finished_before = time.time() - older_than
        expired = (
            o
            for o in self._orders.values()
            if o.state == FINISHED
            and o.finished_at is not None
            and o.finished_at < finished_before
            and o.kind != COMPENSATION_FAILED
        )
        gone = list(itertools.islice(expired, limit))
        for order in gone:
            del self._orders[order.key]
            self._steps.pop(order.attempt_id, None)
            for charge in self._charges_of.pop(order.key, ()):
                del self._ledger[charge.charge_id]
        lapsed_before = min(finished_before, time.time())  # not a live lease
        for owner in [o for o, expires in self._leases.items() if expires < lapsed_before]:
            del self._leases[owner]
        return len(gone)

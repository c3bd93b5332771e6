"""The order desk: each order's idempotency key, its stored record, its run and its reply.

An order is committed to the store before any step starts, and its final reply
before the reply is sent; so a client that retries with the same key gets the
first reply (or 409 while it runs, 422 for a different order under the key),
and an order whose process died is found by another and undone. The anchors
are Stripe's idempotency keys, the IETF draft "The Idempotency-Key HTTP Header
Field", and the journals of Temporal and DBOS.

Each serving process holds a lease in the store (`maintain`). An order whose
owner's lease expired was interrupted: a live process claims it, undoes every
step that succeeded or whose outcome was never recorded (`unknown`; or whose
error said it may have taken effect, and whose undoing failed), and records it
`interrupted` (or `compensation_failed`). Sending that key again runs the
order again, as a new attempt.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

import attrs
import orjson
import trio

from .kinds import (
    COMPENSATION_FAILED,
    IDEMPOTENCY_KEY_REUSED,
    INTERRUPTED,
    NOT_FOUND,
    ORDER_IN_PROGRESS,
    STORE_UNAVAILABLE,
    lookup,
)
from .model import (
    STEP_NAMES,
    Attempt,
    Compensation,
    CompensationStatus,
    OrderRequest,
    OrderResult,
    Reply,
    StepResult,
    StepStatus,
    current_attempt,
    new_id,
)
from .orchestrator import Pipeline
from .seldom import SeldomWarning
from .serialization import compact, converter, dump_reply, encode_error, parse_order
from .store import (
    RUNNING,
    UNKNOWN_OUTCOME,
    Begun,
    Existing,
    FinishedReply,
    OrderStore,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
)

__all__ = ["Answer", "OnRefused", "OrderDesk", "canonical"]

log = logging.getLogger(__name__)

LEASE_RENEW_S: Final = 1.0
# Interrupted orders claimed at a time; claimed again at once while a batch comes back full.
RECOVERY_BATCH: Final = 1000
# Expired orders forgotten a transaction at a time: a backlog (a busy day, a long stop)
# must not hold the store's write lock, and every order's commit behind it, for long. A
# hundred hold a SQLite writer about 11 ms; a thousand, 80 to 95 ms (the orders' p99 40-59
# ms against 108-139 ms while a backlog of 960,000 was deleted, in 220 s against 170 s).
PURGE_BATCH: Final = 100
# A key that comes back interrupted is restarted by one caller; the others re-read it.
RESTART_TRIES: Final = 3
# `running_of`'s age for "of any age": started before ten years from now, so that an order
# begun just before the store's clock stepped back (its start then in the future) is in it.
ANY_AGE: Final = -10 * 365 * 86_400.0


OnRefused = Callable[[str, int, "str | None", str], None]
"""Hears an order answered without running: (kind, HTTP status, order_id if known, reason)."""


def _refusals_line() -> SeldomWarning:
    """Orders refused for an outage: one line a second or so (each also has its own line on
    the orders' logger), then one when the store begins orders again."""
    return SeldomWarning(
        log,
        "order %r refused: the store is unavailable (%s)",
        "the store begins orders again, after %d order(s) refused as unavailable",
        clock=trio.current_time,
    )


@attrs.frozen
class Answer:
    """A reply to an order, as the transport sends it."""

    status: int
    body: bytes
    key: str | None = None
    retry_after: bool = False
    replayed: bool = False
    refused: str | None = None
    """The kind, for an order answered without running."""
    reason: str = ""


def canonical(order: OrderRequest) -> bytes:
    """The order as it is stored and compared: parsed, so spacing and key order do not count."""
    return compact(orjson.dumps(converter.unstructure(order), option=orjson.OPT_SORT_KEYS))


def _error(
    kind: str, message: str | None = None, *, key: str | None = None, order_id: str | None = None
) -> Answer:
    entry = lookup(kind)
    reason = message or entry.message
    status, body = encode_error(kind, reason, order_id=order_id)
    return Answer(status, body, key, entry.retry_after, refused=kind, reason=reason)


def _recorded(record: StepRecord, compensation: Compensation | None = None) -> StepResult:
    """A step as its record tells it. An `unknown` step's record says "ok" in 0 ms, marked
    `UNKNOWN_OUTCOME`, for older versions to read (see `StepRecord`)."""
    status = StepStatus(record.status)
    if status is StepStatus.UNKNOWN or (
        status is StepStatus.OK and record.detail == UNKNOWN_OUTCOME
    ):
        return StepResult(record.step, StepStatus.UNKNOWN, None, None, compensation)
    return StepResult(record.step, status, record.duration_ms, record.detail, compensation)


def _known_steps(stored: StoredOrder) -> list[StepResult]:
    """What was recorded of each step, compensations included (`Pipeline.undo` tries again
    one that did not succeed); a step with no record may have run: its outcome is unknown."""
    records = {record.step: record for record in stored.steps}
    known = []
    for name in STEP_NAMES:
        record = records.get(name)
        if record is None:
            known.append(StepResult(name, StepStatus.UNKNOWN, None))
            continue
        compensation = (
            None
            if record.compensation is None
            else Compensation(CompensationStatus(record.compensation), record.compensation_ms or 0)
        )
        known.append(_recorded(record, compensation))
    return known


def _running_reply(stored: StoredOrder) -> bytes:
    records = {record.step: record for record in stored.steps}
    steps = tuple(
        _recorded(record) for name in STEP_NAMES if (record := records.get(name)) is not None
    )
    return dump_reply(Reply("running", stored.order_id, steps or None))


_K = TypeVar("_K", bound=Hashable)


class _Counting(Generic[_K]):
    """`key` counted in `keys` while the block runs (several may work on one key at once).
    A class, not a @contextmanager generator, which cost more per order (`_run` counts its
    key in its own body, not in a coroutine under the count, for the same reason)."""

    __slots__ = ("key", "keys")

    def __init__(self, keys: Counter[_K], key: _K) -> None:
        self.keys, self.key = keys, key

    def __enter__(self) -> None:
        self.keys[self.key] += 1

    def __exit__(self, *exc_info: object) -> None:
        keys, key = self.keys, self.key
        keys[key] -= 1
        if not keys[key]:
            del keys[key]


@attrs.define(eq=False)
class OrderDesk:
    """Runs each order once per key, durably, and recovers the orders of dead processes."""

    pipeline: Pipeline
    store: OrderStore
    lease_timeout: float = 5.0
    retention: float = 86_400.0
    on_refused: OnRefused = lambda kind, status, order_id, reason: None
    owner: str = attrs.field(factory=new_id)
    # The keys whose order this process runs or undoes now. An order of ours still running
    # that is not among them, nor begun by a submit still under way, was left by a call that
    # committed although we were told it failed (a lost COMMIT answer): nobody else recovers
    # it while we live (see `_left_running`). Never claimed back from another (our lease
    # lapsed, another claimed the order and died): our run ends them, taken over (see `_run`),
    # and a later round claims them; claimed under the run, its final record (ours again)
    # would land over the undoing. Not a submit that only reads the key (a retry answered
    # 409): its client retrying at once would keep the order unrecovered.
    _running: Counter[str] = attrs.field(factory=Counter, init=False)
    # The submits under way: each its key and the count of `_looks` when it began.
    _submitting: Counter[tuple[str, int]] = attrs.field(factory=Counter, init=False)
    # How many times `_left_running` has read our running orders.
    _looks: int = attrs.field(default=0, init=False)
    # The attempts it read at the last look, each with the count of `_looks` at the first
    # look that read it.
    _first_seen: dict[str, int] = attrs.field(factory=dict, init=False)
    # The attempts of such orders seen at the last look: recovered if seen again at the next,
    # by which time a final record on its way (held for the next commit) has landed.
    _suspects: set[str] = attrs.field(factory=set, init=False)
    # Orders that ran and whose final reply was not read back (answered 503 or 409, or their
    # submit cancelled: its client gone, the drain's grace over): their final record may be
    # held for the next commit (a row locked past the lock timeout may hold it for long).
    # Never recovered here while they run, for the record (ok, say) would land after the
    # undoing, and a retry replay it with the money back.
    _held_records: set[str] = attrs.field(factory=set, init=False)
    _refusals: SeldomWarning = attrs.field(factory=_refusals_line, init=False)

    async def submit(self, order: OrderRequest, key: str | None = None) -> Answer:
        """Run `order` under `key` (a fresh one if None), or answer from what the key holds.

        An order answered without running (409, 422, 503 store_unavailable) is
        reported to `on_refused`; a replay is not an order of its own.
        """
        key = key or new_id()
        with _Counting(self._submitting, (key, self._looks)):
            answer = await self._submit(order, key)
        if answer.refused is not None:
            self.on_refused(answer.refused, answer.status, order.order_id, answer.reason)
        return answer

    async def _submit(self, order: OrderRequest, key: str) -> Answer:
        body = canonical(order)
        request_hash = hashlib.sha256(body).hexdigest()
        try:
            begun = await self.store.begin(key, order.order_id, request_hash, body, self.owner)
            self._refusals.ended()
            for _ in range(RESTART_TRIES):
                if isinstance(begun, Begun):
                    return await self._run(order, key, begun.order)
                stored = begun.order
                if stored.request_hash != request_hash:
                    return _error(IDEMPOTENCY_KEY_REUSED, order_id=order.order_id)
                if stored.state == RUNNING:
                    return _error(ORDER_IN_PROGRESS, key=key, order_id=order.order_id)
                if stored.kind != INTERRUPTED:
                    assert stored.http_status is not None
                    assert stored.reply is not None
                    return Answer(stored.http_status, stored.reply, key, replayed=True)
                restarted = await self.store.restart(key, self.owner, stored.attempt)
                if restarted is not None:
                    return await self._run(order, key, restarted)
                again = await self.store.get(key)
                if again is None:  # purged meanwhile: a new key after all
                    begun = await self.store.begin(
                        key, order.order_id, request_hash, body, self.owner
                    )
                else:
                    begun = Existing(again)
            if isinstance(begun, Begun):  # the last try's begin: run it, never leave it unrun
                return await self._run(order, key, begun.order)
            return _error(ORDER_IN_PROGRESS, key=key, order_id=order.order_id)
        except StoreUnavailable as exc:
            self._refusals.warning(order.order_id, exc)
            return _error(STORE_UNAVAILABLE, order_id=order.order_id)

    async def _run(self, order: OrderRequest, key: str, stored: StoredOrder) -> Answer:
        """Run the order, its key in `_running` meanwhile (never claimed back under it)."""
        with _Counting(self._running, key):
            attempt = Attempt(key, stored.attempt_id, self.owner)
            current_attempt.set(attempt)
            try:
                # The reporter queues the final record as the pipeline reports the result
                # (cancelled orders included); reading its reply back waits for that commit,
                # and finds none if another process claimed the order meanwhile. If the commit
                # fails, the store keeps the record for its next commit (writer.py): a retry
                # finds it.
                result = await self.pipeline.process(order)
                # The order ran: the reporter gave it its line and count, so these are not
                # refusals.
                try:
                    final = await self.store.finished_reply(key, attempt.id)
                except StoreUnavailable:
                    return self._not_recorded_yet(order, key)
                if final is None or final.kind == INTERRUPTED:
                    ours = await self._holding(attempt)
                    if ours is not None and ours.owner == self.owner:
                        # Nobody claimed it: our final record failed alone (a row locked past
                        # the lock timeout) and is held for the next commit (writer.py), not
                        # lost; or it landed since, with the look that read the order (a claim
                        # makes the claimer its owner).
                        if ours.state == RUNNING:
                            return self._not_recorded_yet(order, key)
                        assert ours.http_status is not None
                        assert ours.reply is not None
                        final = FinishedReply(ours.http_status, ours.reply, ours.kind)
                    elif ours is not None:
                        # Our lease lapsed and another process claimed the order to undo it,
                        # while our run went on: a step of ours that took effect after its undo
                        # is ours to undo (compensations are idempotent). Not once a retry runs
                        # the key again: the vendor's and the courier's compensations act on
                        # the order, not the attempt.
                        log.warning(
                            "order %r was taken over by another process: undoing it",
                            order.order_id,
                        )
                        await self.pipeline.undo(order, result.steps, INTERRUPTED, report=False)
                if final is None:
                    self._held_records.add(key)  # if its record is ours, held: _left_running
                    return attrs.evolve(
                        _error(ORDER_IN_PROGRESS, key=key, order_id=order.order_id), refused=None
                    )
                return Answer(final.http_status, final.reply, key, lookup(final.kind).retry_after)
            except BaseException:
                # Cancelled (its client gone, the drain's grace over) or failed: its final
                # record, queued, was not read back and may be held. See _left_running.
                self._held_records.add(key)
                raise

    def _not_recorded_yet(self, order: OrderRequest, key: str) -> Answer:
        """503: the order ran, but its result is not stored yet (a retry replays it once it
        is); not a refusal, since the reporter gave the order its line and count."""
        log.warning("order %r: its result could not be recorded yet", order.order_id)
        self._held_records.add(key)
        return attrs.evolve(
            _error(STORE_UNAVAILABLE, key=key, order_id=order.order_id), refused=None
        )

    async def _holding(self, attempt: Attempt) -> StoredOrder | None:
        """The stored order if its key still holds `attempt`; None if not, or unreadable
        (then the held final record decides; see deploying.md)."""
        try:
            stored = await self.store.get(attempt.key)
        except StoreUnavailable:
            return None
        return stored if stored is not None and stored.attempt_id == attempt.id else None

    async def look_up(self, key: str) -> Answer:
        """What the key holds: the stored reply, or the steps recorded so far while it runs."""
        try:
            stored = await self.store.get(key)
        except StoreUnavailable:
            return _error(STORE_UNAVAILABLE)
        if stored is None:
            return _error(NOT_FOUND, "no order with this key")
        if stored.state == RUNNING:
            return Answer(200, _running_reply(stored), key)
        assert stored.reply is not None
        return Answer(200, stored.reply, key)

    async def maintain(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold this process's lease, recover interrupted orders, forget expired ones; forever.

        Started with `nursery.start`: it returns once the first lease is held, so no
        order of this process can be mistaken for an orphan.
        """
        async with trio.open_nursery() as nursery:
            await self.store.renew_lease(self.owner, self.lease_timeout)
            nursery.start_soon(self._keep_lease)
            nursery.start_soon(self._recover_forever)
            nursery.start_soon(self._purge_forever)
            task_status.started()

    async def take_lease(self) -> None:
        """Take this process's first lease, before it serves; StoreError (a start-up failure:
        one line, status 2) if the store cannot commit it, as if it could not be opened."""
        try:
            await self.store.renew_lease(self.owner, self.lease_timeout)
        except StoreUnavailable as exc:
            raise StoreError(f"cannot take this process's lease: {exc}") from None

    async def release(self) -> None:
        """Give up the lease at a clean exit, so nothing waits for it to expire; and say what
        the refusals' line left unsaid, which no later order will."""
        self._refusals.close()
        try:
            await self.store.release_lease(self.owner)
        except StoreUnavailable:
            log.warning("could not release the lease of %s", self.owner)

    async def _keep_lease(self) -> None:
        # Renewed well within its length, so a slow renewal cannot let it lapse.
        every = min(LEASE_RENEW_S, self.lease_timeout / 3)
        while True:
            await trio.sleep(every)
            try:
                await self.store.renew_lease(self.owner, self.lease_timeout)
            except StoreUnavailable as exc:
                log.warning("could not renew this process's lease: %s", exc)
            if self._refusals.ending:  # orders begin again: said once due, not at the next
                self._refusals.ended()

    async def _recover_forever(self) -> None:
        while True:
            try:
                claimed = await self.store.claim_interrupted(
                    self.owner, RECOVERY_BATCH, busy=list(self._running)
                )
            except StoreUnavailable as exc:
                log.warning("recovery paused: %s", exc)
                claimed = []
            if claimed:
                log.warning("recovering %d interrupted order(s)", len(claimed))
                await self._recover_all(claimed)
            try:
                left = await self._left_running()
            except StoreUnavailable:
                left = []  # an outage: the claim has said so
            if left:
                log.warning("recovering %d order(s) this process left running", len(left))
                await self._recover_all(left)
            if len(claimed) < RECOVERY_BATCH:
                await trio.sleep(LEASE_RENEW_S)

    async def _recover_all(self, orders: list[StoredOrder]) -> None:
        async with trio.open_nursery() as nursery:
            for stored in orders:
                nursery.start_soon(self._recover, stored)
        try:  # reading one back waits for the commit that carries every record
            await self.store.get(orders[-1].key)
        except StoreUnavailable:
            log.warning("recovered orders could not be recorded yet")

    async def _left_running(self) -> list[StoredOrder]:
        """Our orders running, older than a lease, that we do not work on: the same attempt
        seen at two looks in a row."""
        if self._held_records:  # those no longer running (of any age) have landed
            running = await self.store.running_of(self.owner, ANY_AGE)
            self._held_records &= {o.key for o in running}
        ours = await self.store.running_of(self.owner, self.lease_timeout)
        # An attempt was begun (or restarted) before the first look that read it ended. A
        # submit that began before then may be the one whose begin committed it and has not
        # answered yet: it runs the order once it does. One that began since only reads the
        # order (a retry answered 409, which its client may send again at once, so that one
        # is nearly always under way, and begun before the last look if its store answers
        # slower than the looks come): counted busy, it would keep the order unrecovered.
        self._first_seen = {
            o.attempt_id: self._first_seen.get(o.attempt_id, self._looks) for o in ours
        }
        self._looks += 1
        earliest: dict[str, int] = {}  # each key submitted now: the earliest look it began at
        for key, looks in self._submitting:
            earliest[key] = min(looks, earliest.get(key, looks))
        busy = self._running.keys() | self._held_records
        seen = {
            o.attempt_id
            for o in ours
            if o.key not in busy
            and earliest.get(o.key, self._looks) > self._first_seen[o.attempt_id]
        }
        twice = seen & self._suspects
        left = [o for o in ours if o.attempt_id in twice]
        self._suspects = seen
        return left

    async def _recover(self, stored: StoredOrder) -> None:
        """Undo an interrupted order; the reporter queues its final record."""
        with _Counting(self._running, stored.key):
            current_attempt.set(Attempt(stored.key, stored.attempt_id, self.owner))
            try:
                order, known = parse_order(stored.body), _known_steps(stored)
            except Exception as exc:  # a newer version's order, a damaged record, or a bug
                log.error(
                    "interrupted order %r cannot be undone by this process: %s",
                    stored.key,
                    exc,
                    exc_info=not isinstance(exc, ValueError),  # the traceback of the unforeseen
                )
                # Finished as needing an operator's attention, not retried for ever; a
                # recovered order as any other (not one this process served: its drain's count).
                self.pipeline.report(
                    OrderResult(stored.order_id, (), COMPENSATION_FAILED, recovered=True)
                )
                return
            await self.pipeline.undo(order, known, INTERRUPTED)

    async def forget_expired(self) -> int:
        """Delete the orders finished over the retention ago, a batch at a time; their count.

        Between two batches it waits as long as the last one took: a backlog (a retention
        shortened) leaves the store to the orders being served half the time (this
        process's purge; every worker and host runs one). Back to back, a backlog of
        960,000 held a SQLite store's writer for 90 to 130 s, and 20 orders a second got
        9 to 13 a second answered, their median 275 to 400 ms."""
        forgotten = 0
        try:
            while True:
                started = trio.current_time()
                purged = await self.store.purge(self.retention, PURGE_BATCH)
                forgotten += purged
                if purged < PURGE_BATCH:
                    break
                await trio.sleep(trio.current_time() - started)
        except StoreUnavailable as exc:
            log.warning("could not forget expired orders: %s", exc)
        if forgotten:
            log.info("forgot %d order(s) finished over %g s ago", forgotten, self.retention)
        return forgotten

    async def _purge_forever(self) -> None:
        # At least a second apart: a tiny retention must not keep the store busy.
        every = min(max(self.retention, 1.0), 60.0)
        while True:
            await self.forget_expired()
            await trio.sleep(every)

"""What every order store records and promises, whatever keeps it (SQLite, memory, ...).

An order is committed before its steps start, its steps' outcomes as they end, and its reply
before the reply is sent; so a retry with the same key replays, and an order whose process
died is found (its owner's lease expired) and compensated by a live process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Final, Protocol

import attrs

from ..kinds import COMPENSATION_FAILED, STORE_UNAVAILABLE
from ..model import CompensationStatus

RUNNING: Final = "running"
FINISHED: Final = "finished"
# A compensation that ended so needs a human: the money or goods may not be back.
FAILED_COMPENSATIONS: Final = (CompensationStatus.ERROR.value, CompensationStatus.TIMEOUT.value)
# The orders that may need attention (StoredOrder.needs_attention) by their own columns: the
# running (abandoned, or an undo failed while it runs) and the failed (compensation_failed,
# or an undo's record failed); an order that finished ok was never undone. In SQL, for the
# SQL backends' partial index, which a query uses only if it repeats this condition as is.
MAY_NEED_ATTENTION: Final = f"(state = '{RUNNING}' OR kind IS NOT NULL)"
# The detail of the record of a step of `unknown` outcome, written with status "ok": a version
# from before `unknown` reads it as a step that succeeded, undone (or undone again) as such,
# where a status it does not know made it give the order up undone (a charge held).
UNKNOWN_OUTCOME: Final = "unknown"


@attrs.frozen
class StepRecord:
    """One step's recorded outcome, and later its compensation's (which replaces it).

    `status` is a `StepStatus`'s value, as text. A step recovery undoes as `unknown` (its
    outcome was never recorded) is recorded "ok", with the detail `UNKNOWN_OUTCOME` and
    `duration_ms` 0, as the versions before `unknown` gave such a step: they can read it (the
    columns are NOT NULL, and a schema migration to let them hold none, or a status they do
    not know, would lock them out in a rolling upgrade).
    """

    step: str
    status: str
    detail: str | None = None
    duration_ms: int = 0
    compensation: str | None = None
    compensation_ms: int | None = None


def step_row(
    key: str, attempt_id: str, r: StepRecord, owner: str | None
) -> tuple[str | int | None, ...]:
    """A step record as the SQL backends write them together: the steps table's columns in
    order, attempt first, then the order's key (whose current attempt it must be) and the
    owner it must still have (None: any)."""
    return (
        attempt_id, r.step, r.status, r.detail, r.duration_ms, r.compensation,
        r.compensation_ms, key, owner,
    )  # fmt: skip # the table's columns in their order, then the key and the owner


def takes_undo_back(stored: str | None, record: str | None) -> bool:
    """Whether a step record whose compensation is `record` would take back the stored one's
    (`stored`): a step's compensation only goes forward, none, then failed (error, timeout),
    then ok. Such a record is older than the stored one, and not written: a process whose
    lease lapsed in an outage, its order claimed and undone by another that then died, claims
    the order back (its own name the owner's again), and a record of its from before held
    again past that claim (held records ride in front of the next batch, writer.py, but one
    that meets a lock alone on PostgreSQL is held on) lands after the other's undo. (Its run
    going on is not claimed back under it: `claim_interrupted`'s `busy`.) Once a
    compensation succeeded the step is undone (compensations are idempotent), whatever a
    record from before says."""
    return (stored is not None and record is None) or (
        stored == CompensationStatus.OK and record != CompensationStatus.OK
    )


# `takes_undo_back` as the SQL backends' upsert condition: the stored row `steps`, the record
# `excluded`; their upsert writes a record only if it takes no undo back.
NO_UNDO_TAKEN_BACK: Final = (
    f"(steps.compensation IS NULL OR excluded.compensation = '{CompensationStatus.OK.value}'"
    " OR (excluded.compensation IS NOT NULL"
    f" AND steps.compensation <> '{CompensationStatus.OK.value}'))"
)


@attrs.frozen
class StoredOrder:
    """An order as committed: enough to replay its reply or to run/compensate it again."""

    key: str
    order_id: str
    request_hash: str
    body: bytes
    attempt: int
    attempt_id: str
    owner: str
    state: str
    started_at: float
    finished_at: float | None = None
    http_status: int | None = None
    reply: bytes | None = None
    kind: str | None = None
    steps: tuple[StepRecord, ...] = ()
    # Running, but its owner holds no live lease: interrupted, and not yet recovered (no
    # server of this store runs, or none has looked yet). Set by list_orders only.
    abandoned: bool = False

    @property
    def needs_attention(self) -> bool:
        """Its compensation failed or never finished (abandoned), so an operator must look:
        money or goods may be held."""
        return (
            self.abandoned
            or self.kind == COMPENSATION_FAILED
            or any(s.compensation in FAILED_COMPENSATIONS for s in self.steps)
        )


@attrs.frozen
class Begun:
    """The key was new (or an interrupted order was restarted): the caller runs it."""

    order: StoredOrder


@attrs.frozen
class Existing:
    """The key is taken: the caller decides between replay, 409 and 422."""

    order: StoredOrder


@attrs.frozen
class FinishedReply:
    """What an attempt finished with: the reply to send (or replay) and its kind."""

    http_status: int
    reply: bytes
    kind: str | None


# Orders a page of `list_orders` holds unless told otherwise: a few MB of Python objects.
LIST_PAGE: Final = 1000


class StoreUnavailable(Exception):
    """The store could not commit (read-only file, disk full, locked, database down).

    Classified (model.Classified): a step that meets it (the payment's ledger) fails as
    `store_unavailable`, not as a bug of ours (`internal`). `may_have_taken_effect` is set
    when a write's outcome is unknown (a COMMIT whose answer was lost and could not be looked
    up): the step that wrote it is then compensated (`model.may_have_taken_effect`)."""

    kind = STORE_UNAVAILABLE
    may_have_taken_effect = False


# A jump of the store's clock (the one leases are measured on) against this process's
# monotonic clock larger than this is a step (NTP's, a resume from suspend), not a slew (at
# most 0.5 ms a second) or the noise of reading the two.
CLOCK_STEP_S: Final = 0.5
# After a step, no order is claimed until every live owner has renewed its lease on the
# stepped clock: at least this long (a lease is renewed every second or less), and the
# claimer's own lease length.
CLOCK_STEP_WAIT_S: Final = 2.0


@attrs.define
class ClockWatch:
    """Tells a claim whether the leases may be judged by the clock they were written with.

    Leases are measured on a wall clock (SQLite's: the host's; PostgreSQL's: the database's
    `now()`), which an NTP step or a resume from suspend moves at once. Stepped forward, every
    lease looks expired until its owner renews it: a claim then would take and undo the orders
    that live processes are running. Stepped back, a lease written before the step looks
    alive for as long again: a process that died then would keep its orders (and their money)
    until the clock caught up. So each claim first `observe`s the clock against this process's
    monotonic one; after a step, `owners_to_take` has it claim nothing until the owners have
    had time to renew, and then take as dead the owners whose lease has not changed since.
    Used by the writer thread only, but for `renewed`.
    """

    _lease: float = 0.0  # the longest lease this process renewed: how long owners may take
    _offset: float | None = None
    _error: float = 0.0  # how far the last offset may be off, either way
    _stepped: bool = False
    _seen: dict[str, float] | None = None  # the leases as they were after the step
    _seen_at: float = 0.0  # monotonic

    def observe(self, clock: float, monotonic: float, *, error: float = 0.0) -> None:
        """`clock` read at `monotonic`, give or take `error` (half a round trip to the
        database): a step is a change of their offset beyond both readings' errors."""
        offset = clock - monotonic
        if self._offset is not None and abs(offset - self._offset) > (
            CLOCK_STEP_S + error + self._error
        ):
            self._stepped, self._seen = True, None  # (again, for a second step)
        self._offset, self._error = offset, error

    def renewed(self, lease: float) -> None:
        """This process renewed a lease of `lease` seconds (from the Trio thread): after a
        step, the owners are given at least the longest such lease to renew theirs."""
        self._lease = max(self._lease, lease)

    def owners_to_take(
        self, read_leases: Callable[[], tuple[dict[str, float], float]]
    ) -> set[str] | None:
        """A claim's owners to take as dead although their lease looks alive: none unless the
        clock stepped (then `read_leases`, every owner's expiry and the clock's time, and
        `stale`); None: claim nothing yet."""
        if not self._stepped:
            return set()
        leases, now = read_leases()
        return self.stale(leases, now, time.monotonic(), self._lease)

    def stale(
        self, leases: dict[str, float], now: float, monotonic: float, wait: float
    ) -> set[str] | None:
        """After a step, the owners to take as dead although their lease looks alive (those
        renewed by nobody since the step), or None: claim nothing yet. `leases` are every
        owner's expiry and `now` the clock's time, as the claim reads them."""
        if not self._stepped:
            return set()
        if self._seen is None:
            self._seen, self._seen_at = dict(leases), monotonic
            return None
        if monotonic < self._seen_at + max(wait, CLOCK_STEP_WAIT_S):
            return None
        stale = {owner for owner, expires in leases.items() if self._seen.get(owner) == expires}
        if all(leases[owner] <= now for owner in stale):  # the clock alone judges them now
            self._stepped, self._seen = False, None
        return stale


class StoreError(Exception):
    """The store cannot be opened: bad URL, unopenable path, or not this store's database."""


def one_line(exc: BaseException) -> str:
    """An error's text on one line (libpq's span several), for a message that must keep to one."""
    return " ".join(str(exc).split()) or type(exc).__name__


class OrderStore(Protocol):
    """Durable orders, their steps, the owners' leases and the payment ledger.

    Every coroutine either did its work and returns, or raises before doing any: a
    cancellation that arrives while a write is in flight waits for it (see each backend).
    """

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        """Commit a new order RUNNING (attempt 1), or return the one holding the key."""
        ...

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        """Run an interrupted order again (attempt + 1); None if another caller did first."""
        ...

    def record_step(
        self, key: str, attempt_id: str, record: StepRecord, *, owner: str | None = None
    ) -> None:
        """Queue a step's outcome (upsert by attempt and step); the commit of the next call
        that waits for one carries it (see writer.py; at the latest, the store's close).
        Ignored, as `finish` is, for a stale attempt and for an order claimed by another; and
        where it would take the step's compensation back (`takes_undo_back`)."""
        ...

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
        """Commit the reply (and every record queued before); ignored for a stale attempt,
        and, if `owner` is given, for an order someone else has claimed."""
        ...

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
        """`finish`, queued as `record_step` is (a `get` or `finished_reply` after it waits
        for the commit that carries it); if that commit fails for an outage, it is queued
        again, until committed or the store closes (see writer.py)."""
        ...

    async def get(self, key: str) -> StoredOrder | None:
        """The order holding the key, with its current attempt's steps."""
        ...

    async def finished_reply(self, key: str, attempt_id: str) -> FinishedReply | None:
        """The reply the key's order finished with in attempt `attempt_id`; None while it runs
        or once another attempt has begun. Waits, as `get` does, for what was queued before."""
        ...

    async def list_orders(
        self,
        *,
        needs_attention: bool = False,
        after: tuple[float, str] | None = None,
        limit: int = LIST_PAGE,
    ) -> list[tuple[StoredOrder, int]]:
        """One page of the orders (or of those needing attention), oldest start first: up to
        `limit` of them, ordered by (started_at, key), keys compared by code point, strictly
        after `after` (the last one's (started_at, key) of the page before; None: from the
        first), each with the ledger's net charge of its key; a running order whose owner
        holds no live lease is marked `abandoned`. Each page is read on its own (a short
        transaction, an index's range): a listing holds one page at a time however many
        orders are stored. `every_order` reads them all."""
        ...

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 (a lease's length)
        """`owner` is alive for `timeout` more seconds."""
        ...

    async def release_lease(self, owner: str) -> None:
        """`owner` is gone (clean shutdown): its running orders may be claimed at once."""
        ...

    async def claim_interrupted(
        self, owner: str, limit: int, *, busy: Collection[str] = ()
    ) -> list[StoredOrder]:
        """Take up to `limit` running orders whose owner's lease is gone; one claimer each.

        Never `owner`'s own: a process whose lease lapsed still runs its orders. Nor those
        under the keys `busy`, which `owner` still runs (or recovers) itself although another
        claimed them meanwhile: claimed back, the order would be undone under its run, and
        the run's records, `owner`'s again, would land (its `ok`, say, after a refund)."""
        ...

    async def running_of(self, owner: str, older_than: float) -> list[StoredOrder]:
        """`owner`'s orders still running that started over `older_than` seconds ago (on the
        store's clock), with their steps: for a process to find those it no longer runs (a
        begin or a claim that committed although its caller was told it failed)."""
        ...

    async def charge(self, charge_id: str, key: str, amount: int) -> None:
        """Record a charge once, however often it is retried with the same id."""
        ...

    async def refund(self, charge_id: str, key: str) -> None:
        """Refund a charge once; refunding one that never happened takes no money back, and
        voids it: a charge that comes late (from a process whose order was recovered while it
        stalled) is then not taken. The void is kept under `key`, and purged with its order (a
        charge later than the retention would then be taken: a process stalled for a day)."""
        ...

    async def net_charge(self, key: str) -> int:
        """What the key's charges hold, less what was refunded."""
        ...

    async def purge(self, older_than: float, limit: int) -> int:
        """Forget up to `limit` orders finished over `older_than` seconds ago (on the store's
        clock), steps and ledger too; their count. At most `limit`, so that one transaction
        stays short however many expired. Not one that ended compensation_failed: its money
        may be held, an operator's to resolve (`order-pipeline orders --needs-attention`
        lists it until then). The leases that expired over `older_than` ago go too (never a
        live one): a process killed leaves its own, and one missing says what one expired
        does."""
        ...


async def every_order(
    store: OrderStore, *, needs_attention: bool = False, page: int = LIST_PAGE
) -> AsyncGenerator[tuple[StoredOrder, int]]:
    """Every order (or every one needing attention) as `list_orders` gives them, a page at a
    time until a short one: memory bounded by a page, however many are stored. Pages are
    read apart, so an order restarted meanwhile (its new attempt starts later) may come
    twice, and one begun meanwhile comes at the end or not at all."""
    after: tuple[float, str] | None = None
    while True:
        orders = await store.list_orders(needs_attention=needs_attention, after=after, limit=page)
        for listed in orders:
            yield listed
        if len(orders) < page:
            return
        last = orders[-1][0]
        after = (last.started_at, last.key)

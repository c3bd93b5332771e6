"""`order-pipeline orders`: the stored orders as an operator reads them, as text or JSON lines."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import orjson

from .kinds import label
from .model import STEP_NAMES
from .store import LIST_PAGE, RUNNING, OrderStore, StoredOrder, every_order

__all__ = ["list_orders", "order_summary"]


def _time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _step_order(step: str) -> int:
    return STEP_NAMES.index(step) if step in STEP_NAMES else len(STEP_NAMES)


def _undone_in(reply: bytes | None) -> dict[str, str]:
    """Each compensation a finished order's reply gives: step records can be lost where the
    final record is not (a store that closes while an outage holds them, a store of a version
    that dropped them in an outage), and the reply says which undo failed."""
    try:
        steps = orjson.loads(reply or b"{}").get("steps", ())
        return {
            step["name"]: step["compensation"]["status"] for step in steps if "compensation" in step
        }
    except (ValueError, TypeError, KeyError, AttributeError):  # not a reply of this shape
        return {}


def order_summary(order: StoredOrder, net_charge: int) -> dict[str, Any]:
    """One order's line: what it is, how it ended, what was undone, what the ledger holds."""
    finished = order.state != RUNNING
    status = ("ok" if order.kind is None else "error") if finished else RUNNING
    undone = {s.step: s.compensation for s in order.steps if s.compensation}
    if order.kind is not None:  # a failed order (only they are undone) that may have lost some
        undone = _undone_in(order.reply) | undone
    return {
        "key": order.key,
        "order_id": order.order_id,
        "status": status,
        "kind": label(order.kind) if finished else None,
        "attempt": order.attempt,
        "started": _time(order.started_at),
        "finished": _time(order.finished_at),
        # In step order (the records' own is the order in which the steps ended); a step
        # this version does not know (a newer one's record) after them, as recorded.
        "compensations": {step: undone[step] for step in sorted(undone, key=_step_order)},
        "net_charge": net_charge,
        "needs_attention": order.needs_attention,
    }


def _shown(text: str) -> str:
    """`text` as one field of its line: a client's order_id may hold a newline, which would
    forge a line, or spaces, which would forge fields (`x  NEEDS ATTENTION`); such a one is
    quoted (JSON), and so is one that begins with a quote, which would read as quoted."""
    plain = text.isprintable() and " " not in text and not text.startswith('"')
    return text if plain else orjson.dumps(text).decode()


def _text(line: dict[str, Any]) -> str:
    undone = ",".join(f"{step}={status}" for step, status in line["compensations"].items())
    return (
        f"{line['key']}  order={_shown(line['order_id'])}  {line['status']}"
        f"  kind={line['kind'] or '-'}  attempt={line['attempt']}"
        f"  started={line['started']}  finished={line['finished'] or '-'}"
        f"  compensations={undone or '-'}  net_charge={line['net_charge']}"
        + ("  NEEDS ATTENTION" if line["needs_attention"] else "")
    )


async def list_orders(
    store: OrderStore,
    *,
    needs_attention: bool,
    as_json: bool,
    write: Callable[[str], Any],
    page: int = LIST_PAGE,
) -> int:
    """Write one line per stored order (or per order needing attention), oldest start first;
    return the count. The store is read a page at a time, each page written before the next
    is read: memory holds one page, however many orders the store keeps (a day of them may
    be millions), and the first line comes at once (with `needs_attention`, once a page of
    them is found among the running and failed orders, which the SQL stores index apart:
    not by reading every order)."""
    count = 0
    async with aclosing(every_order(store, needs_attention=needs_attention, page=page)) as orders:
        async for order, net_charge in orders:
            line = order_summary(order, net_charge)
            write(orjson.dumps(line).decode() if as_json else _text(line))
            count += 1
    return count

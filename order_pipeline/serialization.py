"""The one cattrs converter: strict structuring of requests, compact replies.

Set up as `configure_converter` + `make_converter`, the shape of cattrs' own
preconfigured converters: cattrs' orjson converter, strict about unknown keys,
plus our hooks. The module-level instance is built from them at import; tests
build fresh ones too, so what `configure_converter` registers is tested where a
mutation tester can change it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import suppress
from typing import Any, Final, cast

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.preconf import orjson as orjson_preconf
from cattrs.preconf.orjson import OrjsonConverter

from .kinds import BAD_REQUEST, lookup
from .model import (
    INT64_MAX,
    INT64_MIN,
    MAX_DELAY_MS,
    ORDER_ID_MAX_CHARS,
    STEP_NAMES,
    DelayMs,
    ErrorInfo,
    Int64,
    OrderId,
    OrderRequest,
    OrderResult,
    Reply,
    StepName,
    StepResult,
)

__all__ = [
    "InvalidOrder",
    "compact",
    "configure_converter",
    "converter",
    "dump_document",
    "dump_reply",
    "encode_error",
    "encode_result",
    "make_converter",
    "parse_order",
    "result_reply",
]


# The longest message of a refusal, the 400's body and its order line's: a fault may name a
# key of 60 KiB (an unknown field's, a delay's, one given twice), or every unknown field of a
# body at once. Ten faults of an order's own fields take under 1,000 characters.
MAX_MESSAGE_CHARS: Final = 2000


class InvalidOrder(ValueError):
    """The body is not a valid order; `message` names the field and the fault (its first
    MAX_MESSAGE_CHARS characters)."""

    kind = BAD_REQUEST

    def __init__(self, message: str, order_id: str | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            cut = len(message) - MAX_MESSAGE_CHARS
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({cut} characters more)"
        super().__init__(message)
        self.message = message
        self.order_id = order_id


def _integer(value: Any, low: int, high: int) -> int:
    # bool is an int subclass, and cattrs' own int hook would take "12" or 1.5.
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"must be an integer from {low} to {high}")
    return value


def _order_id(value: Any, _: type) -> str:
    if type(value) is not str:
        raise TypeError("must be a string")
    if not value.strip():
        raise ValueError("must not be blank")
    if "\0" in value:  # PostgreSQL's text cannot hold it
        raise ValueError("must not contain NUL (\\u0000)")
    if len(value) > ORDER_ID_MAX_CHARS:
        raise ValueError(f"must be at most {ORDER_ID_MAX_CHARS} characters")
    return value


def _step_name(value: Any, _: type) -> StepName:
    if value not in STEP_NAMES:
        raise ValueError(f"must be one of {', '.join(STEP_NAMES)}")
    return cast(StepName, value)  # pragma: no mutate


def configure_converter(converter: cattrs.Converter) -> None:
    """Make `converter` strict on input and terse on output."""
    converter.register_structure_hook(OrderId, _order_id)
    converter.register_structure_hook(Int64, lambda v, _: _integer(v, INT64_MIN, INT64_MAX))
    converter.register_structure_hook(DelayMs, lambda v, _: _integer(v, 0, MAX_DELAY_MS))
    converter.register_structure_hook_func(lambda t: t == StepName, _step_name)
    delays_type = Mapping[StepName, DelayMs]  # delay_ms and compensation_delay_ms
    structure_delays = converter.get_structure_hook(delays_type)

    def _delays(value: Any, cls: type) -> Any:
        if type(value) is not dict:
            raise TypeError("must be an object")
        return structure_delays(value, cls)  # pragma: no mutate

    converter.register_structure_hook_func(lambda t: t == delays_type, _delays)
    for cls in (StepResult, Reply):
        omit: dict[str, Any] = {
            a.name: override(omit_if_default=True) for a in attrs.fields(cls) if a.default is None
        }
        converter.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, converter, **omit))


def make_converter() -> OrjsonConverter:
    converter = orjson_preconf.make_converter(forbid_extra_keys=True)
    configure_converter(converter)
    return converter


converter = make_converter()


def _describe(exc: BaseException, _: type | None) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown field(s): {', '.join(sorted(map(repr, exc.extra_fields)))}"
    if isinstance(exc, (TypeError, ValueError)) and exc.args:
        return str(exc.args[0])
    return "invalid value"


def _readable_order_id(document: dict[str, Any]) -> str | None:
    try:
        return _order_id(document.get("order_id"), str)  # pragma: no mutate
    except (TypeError, ValueError):
        return None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _refuse_duplicate_keys(body: bytes, document: dict[str, Any]) -> None:
    """Refuse an object with a key twice, which orjson (like most parsers) takes the last of.

    Two parsers that disagree on such a body are a known source of security bugs, so
    it is refused, not resolved: a second parse with the standard module, which can see
    the pairs (orjson has already refused everything else that is not JSON). A compact
    body that orjson writes back byte for byte has every key once (a repeated one would
    be missing from the copy): most clients send that, and it needs no second parse.
    """
    with suppress(orjson.JSONEncodeError):  # nested deeper than orjson writes: parse it
        if orjson.dumps(document) == body:
            return
    try:
        json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        key = exc.args[0]
        raise InvalidOrder(
            f"body has the key {key!r} more than once", _readable_order_id(document)
        ) from None
    except RecursionError:
        raise InvalidOrder("body is nested too deeply") from None


def _why_not_json(body: bytes, error: orjson.JSONDecodeError) -> str:
    """orjson's reason, but for bytes that are not UTF-8 (Latin-1, say, whatever the
    Content-Type's charset) the byte and where: orjson's speaks of a str, surrogates and
    char 0 wherever the byte is."""
    try:
        body.decode()  # UTF-8
    except UnicodeDecodeError as bad:
        return f"not UTF-8 (byte 0x{body[bad.start]:02x} at {bad.start}); JSON is UTF-8"
    return str(error)


# A JSON number (RFC 8259 §6).
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# How many numbers too large for a float are named by their field (each costs a parse of the
# body): as many as an order holds, its amount and six delays. Past them, the first is
# refused by its place.
_HUGE_NUMBERS_NAMED: Final = 7
# Faults named in a refusal, the rest counted: a body of 64 KiB can hold 9,000 bad delays,
# which made a 400 (and its log line) of 518 KB. A valid order has six fields and six delays.
# (One fault may be long still: MAX_MESSAGE_CHARS bounds the whole.)
MAX_FAULTS_NAMED: Final = 10


def _huge_number(error: orjson.JSONDecodeError) -> re.Match[str] | None:
    """The number where orjson stopped, if it stopped for one too large for a float (not for
    what the number stands in place of: a key, content after the document)."""
    if not error.msg.startswith("number is infinity"):
        return None
    return _NUMBER.match(error.doc, error.pos)


def _not_json(body: bytes, error: orjson.JSONDecodeError, using: cattrs.Converter) -> InvalidOrder:
    """Why orjson refused `body`.

    A number too large for a float (`1e400`; an integer past about 1.8e308) is JSON, but
    orjson cannot hold it and says only where it is. So the body is read again, by orjson,
    with each such number written as `1.5`, which no field takes: the refusal names the
    field as any bad field's does (`... @ $.amount`). Only refused bodies pay for this.
    """
    huge = _huge_number(error)
    if huge is None:
        return InvalidOrder(f"body is not valid JSON: {_why_not_json(body, error)}")
    where = f"line {error.lineno} column {error.colno} (char {error.pos})"
    text = error.doc
    for _ in range(_HUGE_NUMBERS_NAMED):
        # As long as the number, so that every place orjson names stays where it was (padded
        # on either side alike: rjust is an equivalent mutant, docs/testing.md).
        padded = "1.5".ljust(len(huge[0]))  # pragma: no mutate
        text = text[: huge.start()] + padded + text[huge.end() :]
        try:
            _order_of(text.encode(), orjson.loads(text), using)
        except InvalidOrder as named:
            return named
        except orjson.JSONDecodeError as again:
            huge = _huge_number(again)
            if huge is not None:
                continue  # the next such number
        break  # invalid JSON further on; or 1.5 taken (by a converter with a float field)
    return InvalidOrder(f"body has a number out of range at {where}")


def parse_order(body: bytes, using: cattrs.Converter = converter) -> OrderRequest:
    """Turn a request body into a valid order, or raise `InvalidOrder`.

    Exactly one JSON object is accepted, with no key twice. A `null` optional
    field counts as absent. `using` is the converter (tests pass a fresh one).
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _not_json(body, exc, using) from None
    return _order_of(body, document, using)


def _order_of(body: bytes, document: Any, using: cattrs.Converter) -> OrderRequest:
    """The order `document` (parsed from `body`) holds, or `InvalidOrder`."""
    if not isinstance(document, dict):
        raise InvalidOrder("body must be a JSON object")
    _refuse_duplicate_keys(body, document)
    present = {key: value for key, value in document.items() if value is not None}
    try:
        return using.structure(present, OrderRequest)
    except Exception as exc:  # cattrs raises a group, or a plain error for some hooks
        messages = cattrs.transform_error(exc, format_exception=_describe)
        if len(messages) > MAX_FAULTS_NAMED:
            left = len(messages) - MAX_FAULTS_NAMED
            messages = [*messages[:MAX_FAULTS_NAMED], f"and {left} more"]
        raise InvalidOrder("; ".join(messages), _readable_order_id(document)) from None


def compact(data: bytes) -> bytes:
    """`data` in a bytes object of its own size. orjson's output keeps the buffer it wrote
    into (about 4 KiB, whatever the length): a reply or an order body kept (the memory
    store's orders, the SQLite store's committed replies) would hold twenty times its size."""
    return bytes(memoryview(data))


def dump_reply(reply: Reply, using: OrjsonConverter = converter) -> bytes:
    return compact(using.dumps(reply))


def result_reply(result: OrderResult) -> tuple[int, dict[str, Any]]:
    """An order's reply as a JSON document, and its HTTP status: its `steps` are the order's
    log line's too, unstructured once for both."""
    if result.kind is None:
        return 200, converter.unstructure(Reply("ok", result.order_id, result.steps))
    status, reply = _error_reply(result.kind, None, result.order_id, result.steps)
    return status, converter.unstructure(reply)


def encode_result(result: OrderResult) -> tuple[int, bytes]:
    """An order's reply as it is sent and stored: HTTP status and body."""
    status, document = result_reply(result)
    return status, dump_document(document)


def dump_document(document: dict[str, Any]) -> bytes:
    """A reply made by `result_reply`, as `encode_result` sends and stores it."""
    return compact(orjson.dumps(document))


def encode_error(
    kind: str, message: str | None = None, *, order_id: str | None = None
) -> tuple[int, bytes]:
    """Every error reply but an order's (`encode_result`): of a refusal, of the transport. The
    kind's HTTP status and the one error shape, with the kind's message unless a more precise
    one is given."""
    status, reply = _error_reply(kind, message, order_id, None)
    return status, dump_reply(reply)


def _error_reply(
    kind: str, message: str | None, order_id: str | None, steps: tuple[StepResult, ...] | None
) -> tuple[int, Reply]:
    """The one error shape, for `encode_error` and `result_reply`."""
    entry = lookup(kind)
    return entry.status, Reply("error", order_id, steps, ErrorInfo(kind, message or entry.message))

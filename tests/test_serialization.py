"""The converter as `make_converter` builds it: strict on input, terse on output.

These tests build a fresh converter in the test itself (the service's is built
at import), so each hook `configure_converter` registers is exercised at run
time, where a mutation tester can switch it.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from order_pipeline import serialization
from order_pipeline.desk import canonical
from order_pipeline.model import (
    INT64_MAX,
    INT64_MIN,
    ORDER_ID_MAX_CHARS,
    Compensation,
    CompensationStatus,
    ErrorInfo,
    Int64,
    OrderId,
    OrderResult,
    Reply,
    StepResult,
    StepStatus,
)
from order_pipeline.serialization import (
    MAX_FAULTS_NAMED,
    MAX_MESSAGE_CHARS,
    InvalidOrder,
    dump_reply,
    encode_result,
    make_converter,
    parse_order,
)

from .test_http import BAD_BODIES


@pytest.mark.parametrize(("body", "order_id", "message"), BAD_BODIES)
def test_a_fresh_converter_refuses_each_bad_body(
    body: str | bytes, order_id: str | None, message: str
) -> None:
    """Every body the HTTP tests refuse is refused by a newly made converter, with its message."""
    raw = body.encode() if isinstance(body, str) else body

    with pytest.raises(InvalidOrder) as refused:
        parse_order(raw, make_converter())

    assert message in refused.value.message
    assert refused.value.order_id == order_id


@pytest.mark.parametrize(
    ("document", "fields"),
    [
        ({"order_id": "a"}, {"amount": 0, "fail_step": None, "delay_ms": {}}),
        (
            {
                "order_id": "b",
                "amount": -(2**63),
                "fail_step": "vendor",
                "delay_ms": {"courier": 0},
            },
            {"amount": -(2**63), "fail_step": "vendor", "delay_ms": {"courier": 0}},
        ),
        (
            {"order_id": "c", "amount": 2**63 - 1, "compensation_delay_ms": {"payment": 600_000}},
            {"amount": 2**63 - 1, "compensation_delay_ms": {"payment": 600_000}},
        ),
        ({"order_id": "d", "fail_compensation": "courier"}, {"fail_compensation": "courier"}),
    ],
)
def test_a_fresh_converter_accepts_valid_orders(
    document: dict[str, Any], fields: dict[str, Any]
) -> None:
    """Valid orders, limits included, are read field by field."""
    converter = make_converter()

    order = parse_order(converter.dumps(document), converter)

    assert order.order_id == document["order_id"]
    for name, value in fields.items():
        assert getattr(order, name) == value


def test_replies_omit_what_is_absent() -> None:
    """A reply leaves out absent fields and steps leave out an absent detail or compensation."""
    converter = make_converter()
    steps = (
        StepResult(
            "payment", StepStatus.OK, 5, compensation=Compensation(CompensationStatus.OK, 1)
        ),
        StepResult("vendor", StepStatus.ERROR, 7, "vendor_unavailable"),
        StepResult("courier", StepStatus.CANCELED, 7),
    )

    assert dump_reply(Reply("error", error=ErrorInfo("bad_request", "m")), converter) == (
        b'{"status":"error","error":{"kind":"bad_request","message":"m"}}'
    )
    assert converter.loads(dump_reply(Reply("ok", "o", steps), converter), dict) == {
        "status": "ok",
        "order_id": "o",
        "steps": [
            {
                "name": "payment",
                "status": "ok",
                "duration_ms": 5,
                "compensation": {"status": "ok", "duration_ms": 1},
            },
            {"name": "vendor", "status": "error", "duration_ms": 7, "detail": "vendor_unavailable"},
            {"name": "courier", "status": "canceled", "duration_ms": 7},
        ],
    }


def test_an_order_id_may_have_exactly_the_maximum_length() -> None:
    """An order id of exactly ORDER_ID_MAX_CHARS characters is accepted; one more is refused."""
    converter = make_converter()
    longest = "x" * ORDER_ID_MAX_CHARS

    assert parse_order(converter.dumps({"order_id": longest}), converter).order_id == longest
    with pytest.raises(InvalidOrder):
        parse_order(converter.dumps({"order_id": longest + "x"}), converter)


def test_order_id_rules_apply_to_order_ids_only() -> None:
    """The order id's rules (not blank, at most 128 characters) are not applied to every string."""
    converter = make_converter()

    assert converter.structure("", str) == ""
    assert converter.structure("x" * 200, str) == "x" * 200


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "body must be a JSON object"),
        ({"order_id": "o", "zz": 1, "aa": 2}, "unknown field(s): 'aa', 'zz' @ $"),
        (
            {"order_id": " ", "amount": "12"},
            "must not be blank @ $.order_id; "
            f"must be an integer from {INT64_MIN} to {INT64_MAX} @ $.amount",
        ),
    ],
)
def test_a_refusal_names_every_fault_exactly(document: object, message: str) -> None:
    """The message is exactly the faults found, each with its path, joined by "; "; it is the
    exception's text too."""
    converter = make_converter()

    with pytest.raises(InvalidOrder) as refused:
        parse_order(converter.dumps(document), converter)

    assert refused.value.message == message
    assert str(refused.value) == message


def test_a_refusal_names_the_first_faults_and_counts_the_rest() -> None:
    """A body of 64 KiB can hold 9,000 bad delays (`"ab":1,`, each a fault of 60 bytes): its
    400 and its order line were 518 KB each, eight times the body, and the log's queue of
    10,000 lines (about 6 MB of orders' lines) could hold gigabytes of them. The first
    faults are named, the rest counted."""
    converter = make_converter()
    delays = {f"k{n}": 1 for n in range(5000)}
    document = {"order_id": "o", "delay_ms": delays, "compensation_delay_ms": {"vendor": -1}}

    with pytest.raises(InvalidOrder) as refused:
        parse_order(converter.dumps(document), converter)

    faults = refused.value.message.split("; ")
    assert faults[0] == "must be one of payment, vendor, courier @ $.delay_ms['k0']"
    assert len(faults) == 11 == MAX_FAULTS_NAMED + 1
    assert faults[-1] == "and 4991 more"
    assert len(refused.value.message) < 1000
    assert refused.value.order_id == "o"
    # Ten faults are all named.
    ten = {"order_id": "o", "delay_ms": {f"k{n}": 1 for n in range(10)}}
    with pytest.raises(InvalidOrder) as refused:
        parse_order(converter.dumps(ten), converter)
    assert refused.value.message.count("must be one of") == 10
    assert "more" not in refused.value.message


@pytest.mark.parametrize(
    ("body", "begins"),
    [
        # Every unknown field is one fault, named at once: 57 KB from a body of 65 KB.
        (
            b'{"order_id": "o", "amount": 5, '
            + b", ".join(b'"%d": 0' % n for n in range(9000))
            + b"}",
            "unknown field(s): '0', '1', '10', '100', '1000', '1001',",
        ),
        # One key of 60,000 characters, in a delay's path.
        (
            b'{"order_id": "o", "delay_ms": {"' + b"k" * 60_000 + b'": 1}}',
            "must be one of payment, vendor, courier @ $.delay_ms['kkk",
        ),
        # The same long key twice.
        (
            b'{"order_id": "o", "' + b"k" * 60_000 + b'": 1, "' + b"k" * 60_000 + b'": 1}',
            "body has the key 'kkk",
        ),
    ],
)
def test_a_refusal_s_message_is_cut_at_its_longest(
    body: bytes, begins: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault may name a key of 60 KiB, or every unknown field of a body at once: its 400
    and its order line were as long as the body (57 to 120 KB), beyond the count of faults
    named. A message is cut after MAX_MESSAGE_CHARS characters, and says how many it left."""
    with monkeypatch.context() as uncut:
        uncut.setattr(serialization, "MAX_MESSAGE_CHARS", 10**9)
        with pytest.raises(InvalidOrder) as whole:
            parse_order(body, make_converter())
    full = whole.value.message
    assert len(full) > 57_000

    with pytest.raises(InvalidOrder) as refused:
        parse_order(body, make_converter())

    message = refused.value.message
    assert message.startswith(begins)
    more = len(full) - MAX_MESSAGE_CHARS
    assert message == f"{full[:MAX_MESSAGE_CHARS]}... ({more} characters more)"
    assert refused.value.order_id == "o"
    # A message at the limit is whole.
    at_limit = InvalidOrder("x" * MAX_MESSAGE_CHARS)
    assert at_limit.message == "x" * MAX_MESSAGE_CHARS


@pytest.mark.parametrize("error", [RuntimeError("secret internals"), ValueError()])
def test_an_unexpected_fault_reads_invalid_value(error: Exception) -> None:
    """A hook failing with an error that is not one of ours, or has no text, reads "invalid value"
    (its own text is kept from the client)."""
    converter = make_converter()

    def broken(_: object, __: type) -> str:
        raise error

    converter.register_structure_hook(OrderId, broken)

    with pytest.raises(InvalidOrder) as refused:
        parse_order(b'{"order_id": "o"}', converter)

    assert refused.value.message == "invalid value @ $.order_id"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"order_id": "o", "amount": 1, "amount": 2}',
            "body has the key 'amount' more than once",
        ),
        (
            b'{"order_id": "o", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "body is nested too deeply",
        ),
        # Compact, as orjson would write them: the written-back copy is no shortcut here.
        (b'{"order_id":"o","amount":1,"amount":2}', "body has the key 'amount' more than once"),
        (
            b'{"order_id":"o","delay_ms":{"payment":1,"payment":1}}',
            "body has the key 'payment' more than once",
        ),
        (b'{"order_id":"o","x":' + b"[" * 1000 + b"]" * 1000 + b"}", "body is nested too deeply"),
    ],
)
def test_a_body_the_standard_parser_refuses_is_named_exactly(body: bytes, message: str) -> None:
    """A key twice, or nesting only orjson takes, is refused with exactly its message."""
    with pytest.raises(InvalidOrder) as refused:
        parse_order(body, make_converter())

    assert refused.value.message == message


_AMOUNT = f"must be an integer from {INT64_MIN} to {INT64_MAX}"
_DELAY = "must be an integer from 0 to 600000"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"order_id": "o", "amount": 1e400}', f"{_AMOUNT} @ $.amount"),
        (b'{"order_id": "o", "amount": -1' + b"0" * 400 + b"}", f"{_AMOUNT} @ $.amount"),
        # Each such number, not the first alone.
        (
            b'{"order_id": "o", "delay_ms": {"payment": 1e400, "vendor": 2e999}}',
            f"{_DELAY} @ $.delay_ms['payment']; {_DELAY} @ $.delay_ms['vendor']",
        ),
        (
            b'{"order_id": "o", "x": [' + b", ".join([b"1e400"] * 7) + b"]}",
            "unknown field(s): 'x' @ $",
        ),
        # More than an order holds: the first's place.
        (
            b'{"order_id": "o", "x": [' + b", ".join([b"1e400"] * 8) + b"]}",
            "body has a number out of range at line 1 column 25 (char 24)",
        ),
        # Not JSON further on; the place in characters, as orjson counts it.
        (
            '{"order_id": "é", "amount": 1e400,}'.encode(),
            "body has a number out of range at line 1 column 29 (char 28)",
        ),
        # Not JSON where the number is: orjson's reason, not the number's.
        (
            b'{"order_id": "o"} 1e400',
            "body is not valid JSON: unexpected content after document: line 1 column 19 (char 18)",
        ),
        (
            b"{1e400: 1}",
            "body is not valid JSON: unexpected character, expected a string key: line 1 column 2"
            " (char 1)",
        ),
    ],
)
def test_a_number_too_large_for_a_float_is_refused_by_its_field(body: bytes, message: str) -> None:
    """orjson refuses such a number as not JSON, saying only where it is: the refusal names
    its field, as for any bad value, and says what and where when it cannot."""
    with pytest.raises(InvalidOrder) as refused:
        parse_order(body, make_converter())

    assert refused.value.message == message


def test_a_number_too_large_for_a_float_is_refused_where_a_field_would_take_it() -> None:
    """Read again with such a number as 1.5, a body is never taken: with a converter that
    takes a float, it is refused by the number's place."""
    converter = make_converter()
    converter.register_structure_hook(Int64, lambda value, _: value)

    with pytest.raises(InvalidOrder) as refused:
        parse_order(b'{"order_id": "o", "amount": 1e400}', converter)

    assert refused.value.message == "body has a number out of range at line 1 column 29 (char 28)"


def test_a_compact_body_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body as orjson writes it needs no second parse for a repeated key; any other does."""
    parsed_again: list[bytes] = []

    def second_parse(body: bytes, **_: Any) -> None:
        parsed_again.append(body)

    monkeypatch.setattr("order_pipeline.serialization.json.loads", second_parse)
    compact = b'{"order_id":"o","amount":1,"delay_ms":{"payment":0}}'
    spaced = b'{"order_id": "o", "amount": 1}'

    assert parse_order(compact, make_converter()).order_id == "o"
    assert parse_order(spaced, make_converter()).order_id == "o"
    assert parsed_again == [spaced]


def test_a_reply_and_an_order_body_hold_about_their_own_size() -> None:
    """Replies and canonical bodies are kept (RepliesWritten, the memory store's orders):
    each must hold about its length, not the 4 KiB buffer orjson wrote it into."""
    result = OrderResult(
        "o-1", tuple(StepResult(n, StepStatus.OK, 5) for n in ("payment", "vendor", "courier"))
    )
    order = parse_order(b'{"order_id": "o-1", "amount": 250}')
    makers: list[Callable[[], bytes]] = [lambda: encode_result(result)[1], lambda: canonical(order)]
    tracemalloc.start()
    try:
        for make in makers:
            before = tracemalloc.get_traced_memory()[0]
            kept = [make() for _ in range(200)]
            per_item = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
            assert per_item < 2 * len(kept[0]) + 200, per_item
    finally:
        tracemalloc.stop()

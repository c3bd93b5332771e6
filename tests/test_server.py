"""The composition root and CLI: a real server on 127.0.0.1, and argument parsing."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.trio import serve as hypercorn_serve

from order_pipeline.cli import misspelt_variables, parse_args, parse_command
from order_pipeline.connections import _OneConnection
from order_pipeline.server import Settings, hypercorn_config

from .conftest import serving
from .rawhttp import address, exchange
from .timings import NO_DELAY


async def test_serve_answers_over_a_real_socket_and_stops_on_trigger() -> None:
    """serve() binds port 0, reports the real address, answers, and stops when triggered."""
    stop = trio.Event()

    async with serving(shutdown_trigger=stop.wait) as (service, url):
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post(
                "/order", json={"order_id": "real", "amount": 1, "delay_ms": NO_DELAY}
            )
        stop.set()

    assert response.status_code == 200
    assert response.json()["order_id"] == "real"
    assert service.tracker.in_flight == 0


def test_hypercorn_limits() -> None:
    """Slow or idle clients are bounded; handlers are not; shutdown waits for the grace."""
    config = hypercorn_config(Settings(request_timeout=10, shutdown_grace=15))

    assert config.keep_alive_timeout == 3.0
    assert config.read_timeout is None
    assert config.graceful_timeout == 15
    assert config.backlog >= 2048
    assert config.bind == ["127.0.0.1:8080"]


def test_cli_defaults() -> None:
    """`order-pipeline serve` alone gives the documented defaults."""
    assert parse_args(["serve"], environ={}) == Settings()
    assert Settings() == Settings(
        host="127.0.0.1", port=8080, workers=1, request_timeout=10.0, compensation_timeout=5.0,
        courier_pool_size=5, courier_queue_limit=1000, payment_delay_ms=150,
        vendor_delay_ms=200, courier_delay_ms=100, header_timeout=3.0, shutdown_grace=15.0,
        log_level="info",
        log_format="json", access_log=True,
    )  # fmt: skip # a few settings a line, not one a line


FLAGS = [
    "--host", "0.0.0.0", "--port", "0", "--workers", "3", "--request-timeout", "2.5",
    "--compensation-timeout", "1", "--courier-pool-size", "9", "--courier-queue-limit", "7",
    "--payment-delay-ms", "1", "--vendor-delay-ms", "2", "--courier-delay-ms", "3",
    "--header-timeout", "4.5", "--shutdown-grace", "0", "--log-level", "WARNING",
    "--log-format", "text", "--no-access-log",
]  # fmt: skip # flags and their values in pairs, as on a command line
FROM_FLAGS = Settings(
    host="0.0.0.0", port=0, workers=3, request_timeout=2.5, compensation_timeout=1.0,
    courier_pool_size=9, courier_queue_limit=7, payment_delay_ms=1, vendor_delay_ms=2,
    courier_delay_ms=3, header_timeout=4.5, shutdown_grace=0.0, log_level="warning",
    log_format="text",
    access_log=False,
)  # fmt: skip # a few settings a line, as FLAGS has them


def test_every_flag_lands_in_the_settings() -> None:
    """Every setting has a flag."""
    assert parse_args(["serve", *FLAGS], environ={}) == FROM_FLAGS


def test_every_setting_has_an_environment_variable() -> None:
    """ORDER_PIPELINE_<NAME> sets each setting when no flag does."""
    environ = {
        Settings.env_name(f.name): str(getattr(FROM_FLAGS, f.name)).lower()
        for f in attrs.fields(Settings)
    }
    assert parse_args(["serve"], environ=environ) == FROM_FLAGS


def test_every_range_takes_both_its_ends() -> None:
    """The ranges `--help` and the errors state are inclusive, ten years of seconds too."""
    argv = [
        "serve", "--port", "65535", "--workers", "64", "--courier-queue-limit", "0",
        "--lease-timeout", "0.5", "--retention", "315360000", "--drain-delay", "0",
    ]  # fmt: skip # flags and their values in pairs, as on a command line
    settings = parse_args(argv, environ={})

    assert (settings.port, settings.workers, settings.courier_queue_limit) == (65535, 64, 0)
    assert (settings.lease_timeout, settings.retention) == (0.5, 315_360_000)
    assert parse_args(["serve", "--port", "0"], environ={}).port == 0


def test_flag_wins_over_environment() -> None:
    """A flag beats its environment variable, which beats the default."""
    environ = {"ORDER_PIPELINE_PORT": "9000", "ORDER_PIPELINE_COURIER_POOL_SIZE": "12"}
    settings = parse_args(["serve", "--port", "9001"], environ=environ)
    assert (settings.port, settings.courier_pool_size, settings.workers) == (9001, 12, 1)


def test_an_ipv6_host_may_be_written_in_brackets_as_in_a_url() -> None:
    """`--host [::1]`, as copied from `http://[::1]:8080`, is the address `::1`; listening
    on the bracketed text failed with its brackets doubled (`[[::1]]:8080`)."""
    assert parse_args(["serve", "--host", "[::1]"], environ={}).host == "::1"
    assert parse_args(["serve"], environ={"ORDER_PIPELINE_HOST": "[fe80::1]"}).host == "fe80::1"
    assert parse_args(["serve", "--host", "::1"], environ={}).host == "::1"
    assert parse_args(["serve", "--host", "[fe80::1%lo]"], environ={}).host == "fe80::1%lo"


def test_workers_auto_is_one_per_cpu_this_process_may_use() -> None:
    """--workers auto (or the variable, in any case) is the CPUs of the process's affinity,
    resolved as it is parsed: everything after sees a number."""
    cpus = min(len(os.sched_getaffinity(0)), 64)

    assert parse_args(["serve", "--workers", "auto"], environ={}).workers == cpus
    assert parse_args(["serve"], environ={"ORDER_PIPELINE_WORKERS": "Auto"}).workers == cpus


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (3, 3), (64, 64), (200, 64)])
def test_workers_auto_stays_within_1_to_64(
    cpus: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with more CPUs than --workers allows gets the most it allows."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert parse_args(["serve", "--workers", "auto"], environ={}).workers == workers


@pytest.mark.parametrize(("cpus", "workers"), [(3, 3), (None, 1)])
def test_workers_auto_counts_every_cpu_where_there_is_no_affinity(
    cpus: int | None, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without sched_getaffinity (macOS), `auto` is os.cpu_count(); one where that is unknown."""
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert parse_args(["serve", "--workers", "auto"], environ={}).workers == workers


@pytest.mark.parametrize(
    ("value", "on"),
    [(v, True) for v in ("true", "TRUE", "1", "yes", "Yes", "on", "ON")]
    + [(v, False) for v in ("false", "False", "0", "no", "NO", "off", "Off")],
)
def test_the_access_log_variable_takes_the_usual_spellings_in_any_case(
    value: str, on: bool
) -> None:
    """ORDER_PIPELINE_ACCESS_LOG: true/false (README), and 1/0, yes/no, on/off, in any case."""
    assert parse_args(["serve"], environ={"ORDER_PIPELINE_ACCESS_LOG": value}).access_log is on


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["serve", "--port", "70000"], {}, "--port: must be an integer from 0 to 65535"),
        (["serve", "--port", "x"], {}, "--port: must be an integer"),
        (["serve", "--workers", "0"], {}, "--workers: must be an integer from 1 to 64"),
        (
            ["serve", "--workers", "many"],
            {},
            "--workers: must be an integer from 1 to 64, or auto (one per CPU this process may "
            "use), not 'many'",
        ),
        (["serve"], {"ORDER_PIPELINE_WORKERS": "all"}, "ORDER_PIPELINE_WORKERS: must be an"),
        (["serve", "--request-timeout", "0"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "nan"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "inf"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "soon"], {}, "--request-timeout: must be a positive"),
        # PostgreSQL's timestamps overflow past that: a lease or retention so long crashed it.
        (
            ["serve", "--retention", "1e12"],
            {},
            "--retention: must be a positive number of seconds, at most 315360000",
        ),
        (["serve", "--lease-timeout", "4e8"], {}, "--lease-timeout: must be a number of"),
        # Renewed every third of it: so short a lease lapses under a slow commit.
        (
            ["serve", "--lease-timeout", "0.1"],
            {},
            "--lease-timeout: must be a number of seconds from 0.5 to 315360000 (ten years)",
        ),
        (["serve", "--host", " "], {}, "--host: must be a host name or address, not ' '"),
        # A YAML block scalar's newline: the error of listening on it took two lines.
        (["serve"], {"ORDER_PIPELINE_HOST": "0.0.0.0\n"}, "must be a host name or address, not"),
        (["serve", "--host", " 127.0.0.1"], {}, "--host: must be a host name or address, not"),
        (["serve", "--host", "[127.0.0.1]"], {}, "--host: must be a host name or address, not"),
        (["serve", "--host", "[localhost]"], {}, "--host: must be a host name or address, not"),
        # A URL's host and port, or a bracket left out: listening failed, brackets doubled.
        (["serve", "--host", "[::1]:8080"], {}, "--host: must be a host name or address, not"),
        (["serve", "--host", "[::1"], {}, "--host: must be a host name or address, not"),
        (["serve", "--host", "::1]"], {}, "--host: must be a host name or address, not"),
        # A host and port: no host name has a colon, so it was taken for an IPv6 address and
        # failed to listen (status 1) as `cannot listen on [127.0.0.1:8080]:8080`.
        (["serve", "--host", "127.0.0.1:8080"], {}, "--host: must be a host name or address"),
        (["serve"], {"ORDER_PIPELINE_HOST": "localhost:8080"}, "_HOST: must be a host name"),
        (["serve", "--host", "::1::2"], {}, "--host: must be a host name or address, not"),
        # An IPv4 address written as IPv6: accepted, then `cannot listen on
        # [::ffff:127.0.0.1]:8080: invalid argument` (status 1; an IPv6 socket takes none).
        (["serve", "--host", "::ffff:7f00:1"], {}, "as IPv6 cannot be listened on; give 127.0.0.1"),
        (["serve", "--host", "[::ffff:127.0.0.1]"], {}, "cannot be listened on; give 127.0.0.1"),
        # A control character in a bracketed address's scope id was taken.
        (["serve", "--host", "[::1%a\nb]"], {}, "--host: must be a host name or address, not"),
        (["serve", "--shutdown-grace", "-1"], {}, "--shutdown-grace: must be a non-negative"),
        (["serve", "--courier-pool-size", "many"], {}, "--courier-pool-size: must be an integer"),
        # An integer all the same: the message must say the range it is outside of.
        (
            ["serve", "--courier-pool-size", "2147483649"],
            {},
            "--courier-pool-size: must be an integer from -2147483648 to 2147483648; below 1 "
            "counts as 1, above 128 as 128, not '2147483649'",
        ),
        (["serve", "--payment-delay-ms", "600001"], {}, "--payment-delay-ms: must be an integer"),
        # Python's spellings, which the help does not promise and a shell would not read so.
        (["serve", "--port", "٣"], {}, "--port: must be an integer from 0 to 65535, not '٣'"),
        (["serve"], {"ORDER_PIPELINE_WORKERS": "\uff12"}, "ORDER_PIPELINE_WORKERS: must be an"),
        (["serve", "--courier-queue-limit", "1_000"], {}, "--courier-queue-limit: must be an"),
        (["serve", "--retention", "86_400"], {}, "--retention: must be a positive number"),
        (["serve"], {"ORDER_PIPELINE_LEASE_TIMEOUT": "\u0665"}, "LEASE_TIMEOUT: must be"),
        (["serve", "--log-format", "xml"], {}, "--log-format: must be one of json, text"),
        (["serve"], {"ORDER_PIPELINE_PORT": "eighty"}, "ORDER_PIPELINE_PORT: must be an integer"),
        (["serve"], {"ORDER_PIPELINE_ACCESS_LOG": "maybe"}, "ORDER_PIPELINE_ACCESS_LOG: must be"),
        (["serve"], {"ORDER_PIPELINE_LOG_LEVEL": "loud"}, "ORDER_PIPELINE_LOG_LEVEL: must be one"),
        (
            ["serve", "--port", "18501"],
            {"ORDER_PIPELINE_PORT": "eighty"},
            "ORDER_PIPELINE_PORT: must be an integer from 0 to 65535, not 'eighty' (--port "
            "overrides it, but the environment is wrong: fix or unset it)",
        ),
        (["serve", "--no-access-log"], {"ORDER_PIPELINE_ACCESS_LOG": "maybe"}, "ACCESS_LOG: must"),
        # Each worker would keep orders of its own: a key would run once per worker.
        (
            ["serve", "--store", "memory", "--workers", "2"],
            {},
            "--store: memory: each worker would keep orders of its own",
        ),
        # The variable's value, whichever source gave the workers: the message names it.
        (
            ["serve", "--workers", "2"],
            {"ORDER_PIPELINE_STORE": "memory"},
            "ORDER_PIPELINE_STORE: memory: each worker would keep orders of its own",
        ),
        (
            ["serve"],
            {"ORDER_PIPELINE_STORE": "memory", "ORDER_PIPELINE_WORKERS": "2"},
            "ORDER_PIPELINE_STORE: memory: each worker would keep orders of its own",
        ),
        # The flag's, over a variable that also says memory.
        (
            ["serve", "--store", "memory"],
            {"ORDER_PIPELINE_STORE": "memory", "ORDER_PIPELINE_WORKERS": "2"},
            "--store: memory: each worker would keep orders of its own",
        ),
        (
            ["serve"],
            {"ORDER_PIPELINE_STORE": "sqlite:///orders.db "},
            "ORDER_PIPELINE_STORE: 'sqlite:///orders.db ': a sqlite:/// URL names a file alone",
        ),
    ],
)
def test_bad_values_exit_2_naming_the_setting(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag or environment value exits with status 2 and a message naming it."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ=environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_only_a_variable_close_to_a_settings_name_is_taken_for_a_typo() -> None:
    """A misspelt setting is warned of, naming the one meant; a setting, or another name
    under the prefix (the tests', a supervisor's handoff), is not."""
    environ = {
        "ORDER_PIPELINE_PROT": "9000",
        "ORDER_PIPELINE_WORKER": "4",
        "ORDER_PIPELINE_PORT": "9001",
        "ORDER_PIPELINE_REQUIRE_POSTGRES": "1",
        "ORDER_PIPELINE_LISTEN_FD": "3",
        "ORDER_PIPELINE_LIFELINE_FD": "5",
        "PROT": "1",
        # Variables' names are case-sensitive: this one sets nothing.
        "order_pipeline_store": "sqlite:///elsewhere.db",
    }
    assert misspelt_variables(environ) == [
        "ORDER_PIPELINE_PROT is no setting: ignored (meant ORDER_PIPELINE_PORT?)",
        "ORDER_PIPELINE_WORKER is no setting: ignored (meant ORDER_PIPELINE_WORKERS?)",
        "order_pipeline_store is no setting: ignored (meant ORDER_PIPELINE_STORE?)",
    ]


def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    """`serve --help`, its whitespace made single spaces."""
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"], environ={})
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_every_setting_with_default_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --help` names every flag, its environment variable and its default."""
    text = serve_help(capsys)
    for field in attrs.fields(Settings):
        env = Settings.env_name(field.name)
        assert "--" + field.name.replace("_", "-") in text
        if isinstance(field.default, bool):  # the flag has its --no- form; the variable, words
            assert f"[env {env}: true or false; default {str(field.default).lower()}]" in text
        else:
            assert f"[env {env}; default {field.default}]" in text


@pytest.mark.parametrize(
    "phrase",
    [
        "--log-level LOG_LEVEL lowest level logged: one of debug, info, warning, error [",
        "--log-format LOG_FORMAT how log lines are written (json: one object a line): one of "
        "json, text [",
        "--workers WORKERS worker processes serving the port, each on a socket of its own: an "
        "integer from 1 to 64, or auto (one per CPU this process may use) [",
        "--port PORT port to listen on; 0 picks a free one: an integer from 0 to 65535 [",
        "[env ORDER_PIPELINE_ACCESS_LOG: true or false; default true]",
        "--shutdown-grace SHUTDOWN_GRACE on SIGTERM, SIGINT or SIGHUP, how long",
        "--courier-pool-size COURIER_POOL_SIZE couriers available at once, per worker process: "
        "an integer from -2147483648 to 2147483648; below 1 counts as 1, above 128 as 128 [",
    ],
)
def test_help_says_every_choice_and_range(phrase: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --help` gives each setting's choices or range, and booleans as true/false."""
    assert phrase in serve_help(capsys)


def test_help_shows_no_python_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    """No default reads as Python's True or False."""
    text = serve_help(capsys)
    assert "True" not in text
    assert "False" not in text


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`order-pipeline` alone: the whole help (commands and what they do) on stderr, status 2."""
    with pytest.raises(SystemExit) as exited:
        parse_command([], environ={})
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("usage: order-pipeline ")
    assert "serve" in err
    assert "run the HTTP server" in err
    assert "required" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["serve", "--port", "x"],
            "order-pipeline serve: error: --port: must be an integer from 0 to 65535, not 'x'\n"
            "Run 'order-pipeline serve --help' for every setting.\n",
        ),
        (
            ["serve", "--prot", "1"],
            "order-pipeline serve: error: unrecognized arguments: --prot 1\n"
            "Run 'order-pipeline serve --help' for every setting.\n",
        ),
        (
            ["orders", "--jsn"],
            "order-pipeline orders: error: unrecognized arguments: --jsn\n"
            "Run 'order-pipeline orders --help' for its flags.\n",
        ),
        (
            ["srve"],
            "order-pipeline: error: argument command: invalid choice: 'srve' (choose from "
            "'serve', 'orders')\nRun 'order-pipeline --help' for the commands.\n",
        ),
    ],
)
def test_a_usage_error_is_one_line_and_a_pointer_to_help(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value or an unknown flag: the command's own name, the error, where to read more;
    not the whole usage first."""
    with pytest.raises(SystemExit) as exited:
        parse_command(argv, environ={})
    assert (exited.value.code, capsys.readouterr().err) == (2, expected)


class _ProtocolStub:
    """Stands in for hypercorn's protocol: hears what the connection tells it."""

    async def handle(self, event: object) -> None:
        pass


async def test_a_close_racing_a_write_of_the_reply_is_no_busy_error() -> None:
    """Hypercorn closes a connection (its reader, on a body the client ended early; or the
    app's task, after a reply that left the body unread) with `send_eof`, which holds the
    stream across a checkpoint, without the lock its writes take: the other task's write of
    a reply then raised BusyResourceError ("Error in ASGI Framework", or the connection's
    handler failing). Which task runs first after the checkpoint is Trio's coin toss, so
    the two are raced 40 times: each time the write now ends as on a closed stream."""
    for _ in range(40):
        ours, theirs = trio.socket.socketpair()
        with theirs:
            server = _OneConnection(
                None,  # type: ignore[arg-type] # neither app, context nor state is used here
                Config(),
                None,  # type: ignore[arg-type]
                None,  # type: ignore[arg-type]
                trio.SocketStream(ours),  # type: ignore[arg-type]
            )
            server.protocol = _ProtocolStub()  # type: ignore[assignment]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.protocol_send, RawData(b"HTTP/1.1 413 \r\n\r\n"))
                nursery.start_soon(server.protocol_send, Closed())


async def half_a_reply(scope: Any, receive: Any, send: Any) -> bool:
    """An ASGI app's start: the lifespan served (False once it ends), or the first half of a
    10-byte reply sent (True), the reply then under way."""
    while scope["type"] == "lifespan":
        message = (await receive())["type"]
        await send({"type": f"{message}.complete"})
        if message == "lifespan.shutdown":
            return False
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"10")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"12345", "more_body": True})
    return True


async def test_a_reply_its_app_leaves_unfinished_still_closes_its_connection() -> None:
    """_H11Protocol holds hypercorn's close back while a reply is under way; a reply whose
    app ends before the reply does (here it raises) is not under way any more: the
    connection closes at once, and is not left open with the reply cut short."""

    async def cut_short(scope: Any, receive: Any, send: Any) -> None:
        if await half_a_reply(scope, receive, send):
            raise RuntimeError("the app failed mid-reply")

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = None  # the app's error, expected
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(partial(hypercorn_serve, cut_short, config, mode="asgi"))
        with trio.fail_after(5):
            answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n12345")  # and the connection closed


async def test_what_a_client_sends_after_its_error_waits_while_a_reply_is_held() -> None:
    """The close that a client's protocol error asks for waits for the reply under way; what
    the client sends meanwhile is not read (TCP holds it back), where it was kept in memory
    until the reply's end, or for ever if the client did not read the reply: 300 MB sent
    after a bad chunk grew the server by 300 MB. The reply then ends whole, and closes."""
    under_way, finish = trio.Event(), trio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        if not await half_a_reply(scope, receive, send):
            return
        under_way.set()
        await finish.wait()  # as a reply whose client does not read it
        await send({"type": "http.response.body", "body": b"67890"})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = None
    flood, chunk = 64 * 2**20, b"x" * 2**16
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(partial(hypercorn_serve, held, config, mode="asgi"))
        with trio.socket.socket() as client:
            await client.connect(address(url))
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            with trio.fail_after(5):
                await under_way.wait()
            await client.send(b"zz\r\n")  # not a chunk's size: h11's error mid-reply
            sent = 0
            while sent < flood:
                with trio.move_on_after(1):  # the server reads nothing more: the kernel's
                    sent += await client.send(chunk)  # buffers fill, and the sends stop
                    continue
                break
            finish.set()
            answer = b""
            with trio.fail_after(5):
                while data := await client.recv(2**16):
                    answer += data
        nursery.cancel_scope.cancel()
    assert sent < flood / 4
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n1234567890")  # whole, and then the connection closed

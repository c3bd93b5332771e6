"""The composition root and CLI: a real server on 127.0.0.1, and argument parsing."""

from __future__ import annotations

import attrs
import httpx
import pytest
import trio

from order_pipeline.cli import parse_args
from order_pipeline.server import Settings, hypercorn_config

from .conftest import serving
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


def test_flag_wins_over_environment() -> None:
    """A flag beats its environment variable, which beats the default."""
    environ = {"ORDER_PIPELINE_PORT": "9000", "ORDER_PIPELINE_COURIER_POOL_SIZE": "12"}
    settings = parse_args(["serve", "--port", "9001"], environ=environ)
    assert (settings.port, settings.courier_pool_size, settings.workers) == (9001, 12, 1)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "required"),
        (["serve", "--port", "70000"], {}, "--port: must be an integer from 0 to 65535"),
        (["serve", "--port", "x"], {}, "--port: must be an integer"),
        (["serve", "--workers", "0"], {}, "--workers: must be an integer from 1 to 64"),
        (["serve", "--request-timeout", "0"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "nan"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "inf"], {}, "--request-timeout: must be a positive"),
        (["serve", "--request-timeout", "soon"], {}, "--request-timeout: must be a positive"),
        (["serve", "--host", " "], {}, "--host: must not be empty"),
        (["serve", "--shutdown-grace", "-1"], {}, "--shutdown-grace: must be a non-negative"),
        (["serve", "--courier-pool-size", "many"], {}, "--courier-pool-size: must be an integer"),
        (["serve", "--payment-delay-ms", "600001"], {}, "--payment-delay-ms: must be an integer"),
        (["serve", "--log-format", "xml"], {}, "--log-format: must be one of json, text"),
        (["serve"], {"ORDER_PIPELINE_PORT": "eighty"}, "ORDER_PIPELINE_PORT: must be an integer"),
        (["serve"], {"ORDER_PIPELINE_ACCESS_LOG": "maybe"}, "ORDER_PIPELINE_ACCESS_LOG: must be"),
        (["serve"], {"ORDER_PIPELINE_LOG_LEVEL": "loud"}, "ORDER_PIPELINE_LOG_LEVEL: must be one"),
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


def test_help_lists_every_setting_with_default_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --help` names every flag, its environment variable and its default."""
    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    for field in attrs.fields(Settings):
        assert "--" + field.name.replace("_", "-") in text
        assert f"[env {Settings.env_name(field.name)}; default {field.default}]" in text

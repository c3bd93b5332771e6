"""The composition root and CLI: a real server on 127.0.0.1, and argument parsing."""

from __future__ import annotations

import httpx
import pytest
import trio

from order_pipeline.cli import parse_args
from order_pipeline.server import Settings, build_service, hypercorn_config, serve


async def test_serve_answers_over_a_real_socket_and_stops_on_trigger() -> None:
    """serve() binds port 0, reports the real address, answers, and stops when triggered."""
    settings = Settings(port=0)
    service = build_service(settings)
    stop = trio.Event()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(
                service, settings, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        (url,) = binds
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post(
                "/order",
                json={
                    "order_id": "real",
                    "amount": 1,
                    "delay_ms": {"payment": 0, "vendor": 0, "courier": 0},
                },
            )
        stop.set()

    assert response.status_code == 200
    assert response.json()["order_id"] == "real"
    assert service.tracker.in_flight == 0


def test_hypercorn_limits() -> None:
    """Slow or idle clients are bounded; handlers are not; shutdown waits for a full deadline."""
    config = hypercorn_config(Settings(request_timeout=10))

    assert config.keep_alive_timeout == 3.0
    assert config.read_timeout is None
    assert config.graceful_timeout > 10
    assert config.bind == ["127.0.0.1:8080"]


def test_cli_defaults() -> None:
    """`order-pipeline serve` alone gives the documented defaults."""
    assert parse_args(["serve"]) == Settings(
        host="127.0.0.1", port=8080, request_timeout=10.0, courier_pool_size=5
    )


def test_cli_flags() -> None:
    """Every flag lands in the settings."""
    settings = parse_args(
        [
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--request-timeout",
            "2.5",
            "--courier-pool-size",
            "9",
        ]
    )
    assert settings == Settings(host="0.0.0.0", port=0, request_timeout=2.5, courier_pool_size=9)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve", "--port", "70000"],
        ["serve", "--port", "x"],
        ["serve", "--request-timeout", "0"],
        ["serve", "--request-timeout", "nan"],
        ["serve", "--request-timeout", "inf"],
        ["serve", "--courier-pool-size", "many"],
    ],
)
def test_cli_rejects_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag exits with status 2 and a message naming it."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err

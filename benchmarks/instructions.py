"""Instructions per order, counted by valgrind: the one figure here a busy machine cannot move.

Usage: python benchmarks/instructions.py [--small 200] [--large 1200]

Runs each subject twice under `valgrind --tool=callgrind` (small and large
counts) and prints the difference divided by the extra orders as JSON, so
start-up and imports cancel out. Subjects:

- app_service / app_framework_floor / app_server_floor: one `POST /order` at a
  time straight into the ASGI app (the service's app, benchmarks/floors.py's
  Quart-Trio and bare apps), steps taking 0 ms, no sockets: the application's
  own instructions per request, without hypercorn;
- inflight_service / inflight_trio_floor: benchmarks/inflight.py's two subjects
  (orders in flight at once with 2 s steps).

Slow (valgrind runs Python about 50 times slower): a few minutes in all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent
BODY = b'{"order_id":"i-1","amount":1,"delay_ms":{"payment":0,"vendor":0,"courier":0}}'
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/order",
    "raw_path": b"/order",
    "query_string": b"",
    "root_path": "",
    "headers": [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8080),
    "extensions": {},
}


def app_of(subject: str) -> Any:
    """The app as its server runs it: the same wrapper, GC set-up and (for the service) logging."""
    sys.path.insert(0, str(ROOT))
    import floors

    from order_pipeline.http.asgi import finish_responses_shielded
    from order_pipeline.logs import configure_logging
    from order_pipeline.main import tune_garbage_collector
    from order_pipeline.server import assemble

    if subject == "app_service":
        # The log stream lives as long as the measured process: nothing to close.
        configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115
        app = assemble().app
        tune_garbage_collector()
        return app
    if subject == "app_framework_floor":
        return finish_responses_shielded(floors.quart_app())
    return floors.bare_app()


async def drive(app: Any, requests: int) -> None:
    """Send `requests` orders one after another; check each answer is a 200."""
    for _ in range(requests):
        sent: list[dict[str, Any]] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:  # the body was read: now only a disconnect could come
                await trio.sleep_forever()
            received = True
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        await app(dict(SCOPE), receive, send)
        assert sent[0]["status"] == 200, sent


def callgrind(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", *argv],
            capture_output=True, text=True, check=True,
        )  # fmt: skip # the valgrind command on one line, as it would be typed
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found, done.stderr  # callgrind always prints its total
    return int(found.group(1))


def per_order(subject: str, small: int, large: int) -> float:
    def argv(count: int) -> list[str]:
        if subject.startswith("inflight_"):
            what = "service" if subject == "inflight_service" else "trio-floor"
            return [sys.executable, str(ROOT / "inflight.py"), what, "--orders", str(count)]
        return [sys.executable, __file__, "--drive", subject, str(count)]

    return (callgrind(argv(large)) - callgrind(argv(small))) / (large - small)


SUBJECTS = (
    "app_server_floor",
    "app_framework_floor",
    "app_service",
    "inflight_trio_floor",
    "inflight_service",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1200)
    parser.add_argument("--drive", nargs=2, metavar=("SUBJECT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        subject, count = args.drive
        trio.run(drive, app_of(subject), int(count))
        return
    figures = {subject: per_order(subject, args.small, args.large) for subject in SUBJECTS}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

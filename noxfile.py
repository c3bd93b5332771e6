"""Every developer task: `nox` runs tests, lint and typecheck; `nox -l` lists the rest.

Sessions run on the Python that runs nox (3.11 or newer), so a fresh machine
needs no particular minor version installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement  # nox's own dependency

# nox does not put this file's directory on sys.path; tests/launch.py is shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tests import launch  # after the line above, which makes it importable

nox.options.sessions = ["tests", "lint", "typecheck"]
UNIT = "not bench and not stress and not chaos"
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [".[test,postgres]"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, without benchmarks and the heaviest load tests (see `stress`)."""
    session.install("-e", *TEST_DEPS)
    session.run("pytest", "-m", UNIT, *session.posargs)


# What pyproject.toml holds to the versions the tests below pass on (their internals are used;
# the comment there says which version failed what).
BOUNDED = ["hypercorn", "h2", "h11", "hyperframe", "priority", "prometheus-client"]
BOUNDED_TESTS = [
    "tests/test_hostile.py",
    "tests/test_connections.py",
    "tests/test_server.py",
    "tests/test_http.py",
    "tests/test_disconnects.py",
    "tests/test_metrics.py",
]


@nox.session
def newest(session: nox.Session) -> None:
    """The tests that hold the bounded libraries' versions, on their newest releases past the
    bounds: whether a bound can be raised (pip says which requirement each release breaks)."""
    session.install("-e", *TEST_DEPS)
    session.install("--upgrade", *BOUNDED)
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", "-m", UNIT, *BOUNDED_TESTS, *session.posargs)


def _lower_bounds() -> list[str]:
    """pyproject.toml's runtime requirements (the package's and the postgres extra's), each
    pinned to its lower bound: `h11>=0.16,<0.17` is `h11==0.16`, `psycopg[binary]>=3.2.1`
    `psycopg[binary]==3.2.1`."""
    project = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["project"]
    pins = []
    for line in [*project["dependencies"], *project["optional-dependencies"]["postgres"]]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lower) != 1:
            raise ValueError(f"pyproject.toml: {line!r} has no one lower bound (>=) to pin")
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        marker = f"; {requirement.marker}" if requirement.marker else ""
        pins.append(f"{requirement.name}{extras}=={lower[0]}{marker}")
    return pins


@nox.session
def oldest(session: nox.Session) -> None:
    """The `tests` suite with every runtime dependency at its lower bound in pyproject.toml
    (transitive ones and the test tools as pip resolves them around those): whether the bounds
    hold. One pip run, so that a test tool that needs a newer one (opentelemetry-sdk pins
    opentelemetry-api) comes down with it."""
    session.install("-e", *TEST_DEPS, *_lower_bounds())
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", "-m", UNIT, *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """The heaviest load tests: 20,000 requests, 20,000 orders in flight, 5,000 connections."""
    session.install("-e", *TEST_DEPS)
    session.run("pytest", "-m", "stress", "--durations=0", *session.posargs)


@nox.session
def postgres(session: nox.Session) -> None:
    """The store's tests on a real PostgreSQL server: the contract suite and what only it does.

    The server is ORDER_PIPELINE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test);
    each test works in a schema of its own. No server fails the session rather than skipping.
    The chaos tests on PostgreSQL are left to `chaos`, as every other session leaves them.
    """
    session.install("-e", *TEST_DEPS)
    session.run(
        "pytest", "-m", "postgres and not chaos", "--durations=10", *session.posargs,
        env={"ORDER_PIPELINE_REQUIRE_POSTGRES": "1"},
    )  # fmt: skip # the command, then what it needs


@nox.session
def chaos(session: nox.Session) -> None:
    """SIGKILL a real server at random while clients retry: no order lost, no money taken twice.

    A third of the strikes are drains (SIGTERM), some cut short by a SIGKILL.
    CHAOS_ORDERS (500) orders and CHAOS_KILLS (5) strikes; CHAOS_SEED repeats a run.
    """
    session.install("-e", *TEST_DEPS)
    session.run("pytest", "-m", "chaos", "-s", *session.posargs)


@nox.session
def race(session: nox.Session) -> None:
    """The whole suite under `python -X dev -W error` (cf. Go's -race), and its coverage.

    Unawaited coroutines, unclosed sockets and files and other ResourceWarnings
    become errors (a Trio test that leaves a task running fails in every session:
    tests/conftest.py). The same run is measured as `cover` measures `tests`, so
    CI has one pass over the suite for both.
    """
    _under_coverage(session, "not bench and not chaos", "-X", "dev", "-W", "error")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check (incl. flake8-async) and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the tests."""
    session.install("-e", *TEST_DEPS, "mypy>=1.13", "nox", "types-jsonschema")
    session.run("mypy", "order_pipeline", "tests", "noxfile.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The property tests marked `fuzz`, with FUZZ_EXAMPLES (5,000) examples each.

    The pool's state machine, orders against a model, compensations exactly once,
    the converter round trip, arbitrary bodies, the store's ledger against a model.
    """
    session.install("-e", *TEST_DEPS)
    session.run(
        "pytest",
        "-m",
        "fuzz",
        "--hypothesis-profile=fuzz",
        "--hypothesis-show-statistics",
        *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark: pool throughput by capacity, orchestrator overhead per order."""
    session.install("-e", *TEST_DEPS)
    session.run(
        "pytest", "-m", "bench", "--benchmark-only", "--benchmark-group-by=group", *session.posargs
    )


@nox.session
def cover(session: nox.Session) -> None:
    """Branch coverage of the `tests` suite, at least 95 %."""
    _under_coverage(session, UNIT)


def _under_coverage(session: nox.Session, marker: str, *python_flags: str) -> None:
    """pytest on `marker`'s tests under branch coverage of order_pipeline, the server
    subprocesses included; fails under 95 %, unless anything is passed after `--` (tests
    named, `-k`, `-x`: a part of the suite, whose coverage is only reported). HTML report
    in htmlcov/index.html."""
    session.install("-e", *TEST_DEPS)
    session.run("coverage", "erase")
    session.run(
        "python", *python_flags, "-m", "coverage", "run",
        "-m", "pytest", "-m", marker, *session.posargs,
    )  # fmt: skip # the interpreter's flags, coverage's, then pytest's
    session.run("coverage", "combine")
    session.run("coverage", "html")
    session.run("coverage", "report", *([] if session.posargs else ["--fail-under=95"]))


@nox.session
def mutate(session: nox.Session) -> None:
    """mutmut over the orchestrator, the pool, serialization and reporting: at least 90 % killed.

    [tool.mutmut] in pyproject.toml names the files and the in-process tests that
    run against them; docs/testing.md explains every surviving mutant. Each run
    starts afresh in mutants/ with MUTATE_JOBS (2) workers; mutant names narrow
    it, scored on those alone: `nox -s mutate -- "order_pipeline.reporting.*"`.
    """
    session.install("-e", *TEST_DEPS, "mutmut>=3.8,<4")
    # mutmut reuses the verdicts in mutants/ across runs, even after the tests change.
    shutil.rmtree("mutants", ignore_errors=True)
    jobs = os.environ.get("MUTATE_JOBS", "2")
    session.run("mutmut", "run", "--max-children", jobs, *session.posargs)
    session.run("mutmut", "results")  # the survivors, for docs/testing.md
    output = session.run("mutmut", "results", "--all", "true", silent=True)
    # Lines of "    order_pipeline.module.function__mutmut_N: status", one per mutant.
    counts: dict[str, dict[str, int]] = {}
    for line in str(output).splitlines():
        name, colon, status = line.strip().rpartition(": ")
        if colon and "__mutmut_" in name:
            of_module = counts.setdefault(name.rsplit(".", 1)[0], {})
            of_module[status] = of_module.get(status, 0) + 1
    rows = []
    for module, statuses in sorted(counts.items()):
        unchecked = statuses.pop("not checked", 0)  # outside the names given
        if unchecked and not session.posargs:
            session.error(f"{unchecked} mutants of {module} were not checked")
        # A timeout is a mutant the tests caught too (it made them hang).
        killed = statuses.get("killed", 0) + statuses.get("timeout", 0)
        rows.append((module, killed, sum(statuses.values())))
    rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    for module, killed, total in rows:
        if total:
            session.log(f"{module:30} {killed:4} / {total:4} killed  {100 * killed / total:5.1f} %")
    _, killed, total = rows[-1]
    if not total or killed < 0.9 * total:
        session.error(f"mutation score {killed} / {total}: under 90 % (docs/testing.md)")


def _start_server(session: nox.Session, *flags: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start `order-pipeline serve` from the session's venv on a free port; return its URL."""
    log = Path(tempfile.mkstemp(prefix="order-pipeline-", suffix=".log")[1])
    python = str(Path(session.bin) / "python")
    try:
        server, url = launch.start(launch.serve_argv(python, *flags), log)
    except launch.NotStarted as error:
        session.error(f"the server did not start: {error}")
    return server, url, log


def _stop_server(session: nox.Session, server: subprocess.Popen[bytes], log: Path) -> None:
    server.send_signal(signal.SIGTERM)
    if server.wait(timeout=60) != 0:
        session.error(f"the server exited with {server.returncode}:\n{log.read_text()}")


@nox.session
def api(session: nox.Session) -> None:
    """schemathesis against a live server: every response must fit its /openapi.json."""
    session.install("-e", ".", "schemathesis>=4")
    server, url, log = _start_server(
        session, "--request-timeout", "1", "--compensation-timeout", "0.5", "--no-access-log"
    )
    try:
        session.run(
            "schemathesis", "run", f"{url}/openapi.json",
            "--checks", "all",
            # Valid orders can be refused by design (payment_declined), and some
            # 5xx are documented outcomes; tests/schemathesis_hooks.py checks the rest.
            "--exclude-checks", "not_a_server_error,positive_data_acceptance",
            "--max-examples", session.posargs[0] if session.posargs else "200",
            env={"SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": "tests"},
        )  # fmt: skip # an option and its value per line, as on a command line
    finally:
        _stop_server(session, server, log)
    unhandled = [line for line in log.read_text().splitlines() if "unhandled error" in line]
    if unhandled:
        session.error("the server logged unhandled errors:\n" + "\n".join(unhandled))


@nox.session
def overload(session: nox.Session) -> None:
    """2,000 simultaneous orders, pool 5: counts and latencies of the shed and the served."""
    session.install("-e", ".", "httpx")
    server, url, log = _start_server(
        session, "--courier-pool-size", "5", "--courier-delay-ms", "100",
        "--courier-queue-limit", "1000", "--request-timeout", "30", "--no-access-log",
    )  # fmt: skip # flags and their values in pairs, as on a command line
    try:
        session.run("python", "benchmarks/overload.py", url, *session.posargs)
    finally:
        _stop_server(session, server, log)


def _ensure_os_package(session: nox.Session, program: str, elsewhere: str) -> None:
    """`program` comes from an OS package: install it where we can (root with apt), else say how."""
    if shutil.which(program):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", program, external=True)
        return
    session.error(f"{program} is not installed: `sudo apt-get install {program}`, {elsewhere}")


@nox.session
def loadtest(session: nox.Session) -> None:
    """wrk against the server floor, the framework floor and the service (docs/performance.md)."""
    _ensure_os_package(session, "wrk", "`brew install wrk`")
    # The PostgreSQL scenarios need the postgres extra; benchmarks/asyncio_service.py (the
    # asyncio rewrite) needs FastAPI and uvicorn: bench-only, not the package's.
    session.install("-e", ".[postgres]", "fastapi>=0.110", "uvicorn>=0.29")
    session.run("python", "benchmarks/loadtest.py", *session.posargs)


@nox.session
def instructions(session: nox.Session) -> None:
    """Instructions per order under valgrind: the figure a noisy machine cannot move."""
    _ensure_os_package(session, "valgrind", "or your system's valgrind package")
    session.install("-e", ".")
    session.run("python", "benchmarks/instructions.py", *session.posargs)

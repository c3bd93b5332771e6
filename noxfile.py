"""Every developer task: `nox` runs tests, lint and typecheck; `nox -l` lists the rest.

Sessions run on the Python that runs nox (3.11 or newer), so a fresh machine
needs no particular minor version installed.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [".[test]"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (no benchmarks)."""
    session.install("-e", *TEST_DEPS)
    session.run("pytest", "-m", "not bench", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check (incl. flake8-async) and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the tests."""
    session.install("-e", *TEST_DEPS, "mypy>=1.13", "nox")
    session.run("mypy", "order_pipeline", "tests", "noxfile.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The hypothesis tests with many more examples."""
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
    """Branch coverage of order_pipeline; HTML report in htmlcov/index.html."""
    session.install("-e", *TEST_DEPS)
    session.run("coverage", "run", "-m", "pytest", "-m", "not bench", *session.posargs)
    session.run("coverage", "report")
    session.run("coverage", "html")

"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``coverage`` and ``bench``.

By hand, each session builds its own venv (``tests`` one per Python version). CI (``.ci/run``)
runs the same sessions in the one venv it has already installed everything into:
``nox --no-venv --no-install --force-python X.Y``, so no session builds or installs anything.
"""

from __future__ import annotations

import tempfile

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = False

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite: the README's test command, ``python -m pytest``.

    Any exit status but 0 fails the session, and so CI: pytest's 5 too, when no test ran.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def coverage(session: nox.Session) -> None:
    """Run the test suite with branch coverage, and report the lines it missed."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "coverage", "run", "-m", "pytest", *session.posargs)
    session.run("python", "-m", "coverage", "report", "--show-missing", "--skip-covered")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check (with the ASYNC rules) and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict and pyright strict, over the package, the tests and this file.

    Then ``pyright --verifytypes``: the public API's type completeness must be 100%.
    """
    session.install("-e", ".[test,lint,bench]", "nox")
    session.run("mypy")
    session.run("pyright")
    # `pyright --verifytypes` sees only a regular (non-editable) install: put one in a fresh
    # temporary directory, first on the import path. It ignores --pythonpath and resolves the
    # dependencies (httpx's base classes included) through the `python` on PATH, this
    # session's. --ignoreexternal: httpx's own unannotated attributes are not ours to score.
    # It exits non-zero below 100% (warnings, such as a missing docstring, do not count).
    with tempfile.TemporaryDirectory() as tmp:
        session.run("python", "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, ".")
        session.run(
            "pyright",
            "--verifytypes",
            "trio_connpool",
            "--ignoreexternal",
            env={"PYTHONPATH": tmp},
        )


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (prints tables; not a pass/fail check)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/bench_pool.py", *session.posargs)

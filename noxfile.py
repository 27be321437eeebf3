"""Developer sessions. Each installs torch 2.13.0 (CPU) first: a bare `torch` requirement
would otherwise pull a multi-GB CUDA build."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"
DATA = os.environ.get("SKIMBENCH_DATA_DIR", "../shared/data")


def install(session):
    session.install(TORCH)
    session.install("-e", ".[test]")


@nox.session
def tests(session):
    """The whole suite: unit tests (tiny random models) and integration tests (real data)."""
    install(session)
    session.run("pytest", *session.posargs, env={"SKIMBENCH_DATA_DIR": DATA})


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "harness", "methods", "tests", "noxfile.py")


@nox.session
def bench(session):
    """Harness benchmarks (overhead, MACs speed, repeatability, latency floors); minutes."""
    install(session)
    session.run("python", "benchmarks/bench.py", *session.posargs)

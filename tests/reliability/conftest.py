"""Fixtures of the reliability suite: one tiny world (teacher, token stores, config, clean cache)
built once per session, and the `--chaos-kills N` option (`make chaos` raises it to 40)."""

from __future__ import annotations

import pytest

from tests.reliability.world import World, build_world


def pytest_addoption(parser):
    parser.addoption("--chaos-kills", type=int, default=10,
                     help="SIGKILLs in the kill-and-resume tests (default 10; make chaos: 40)")
    parser.addoption("--fault-matrix", choices=("covering", "full"), default="covering",
                     help="which cells of the fault matrix run (default covering; make chaos: "
                          "full)")


@pytest.fixture(scope="session")
def chaos_kills(request) -> int:
    # getoption with a default: plain `pytest` from the repo root does not load this conftest
    # early enough to register the option.
    return max(1, request.config.getoption("chaos_kills", default=10))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))

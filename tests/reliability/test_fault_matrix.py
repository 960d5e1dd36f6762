"""The fault matrix (tests/reliability/faults.py): stages x the paths they read or write x the
faults a filesystem can hand them, each case a real process checked against the invariant.

`make test` runs a covering part of it: every fault of every stage on one of its paths, and
every path with one fault. `make chaos` (`--fault-matrix=full`) runs every cell. The outcomes
are the generated record in docs/bad-inputs.md ("Faults"), which a test compares with the run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability.faults import (FAULTS_OF, STAGES, Bench, CannotMount, Case, Verdict,
                                      all_cases, build_bench, check_case, render_rows)
from tests.reliability.world import REPO

pytestmark = pytest.mark.timeout(5400)  # the first cell's test waits for the whole matrix

DOC = REPO / "docs" / "bad-inputs.md"
BEGIN, END = "<!-- fault matrix: begin -->", "<!-- fault matrix: end -->"
HEADER = ["| stage | path | fault | what the user sees |", "|---|---|---|---|"]


def covering_cases() -> list[Case]:
    """Every fault of every stage at its first path of that kind, and every path's first fault."""
    chosen = []
    for stage in STAGES:
        for kind, faults in FAULTS_OF.items():
            first = next((site for site in stage.sites if site.kind == kind), None)
            chosen += [Case(first, fault) for fault in faults] if first else []
        chosen += [Case(site, FAULTS_OF[site.kind][0]) for site in stage.sites]
    return list(dict.fromkeys(chosen))


def selected_cases(config) -> list[Case]:
    full = config.getoption("fault_matrix", default="covering") == "full"
    return all_cases() if full else covering_cases()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = selected_cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench(world, tmp_path_factory) -> Bench:
    return build_bench(world, tmp_path_factory.mktemp("fault-bench") / "bench")


@pytest.fixture(scope="session")
def outcomes(bench, request, tmp_path_factory) -> dict[Case, Verdict]:
    """Every selected case run once, two at a time."""
    cases = selected_cases(request.config)
    root = tmp_path_factory.mktemp("faults")

    def attempt(numbered: tuple[int, Case]) -> Verdict:
        number, case = numbered
        try:
            return check_case(bench, root / f"case{number}", case)
        except CannotMount as exc:
            return Verdict(f"skipped: this machine refuses a tmpfs mount ({exc})", "")
        except Exception as exc:  # noqa: BLE001 -- a hang or a harness failure is a failed cell
            return Verdict(f"{type(exc).__name__}: {exc}", "harness error")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(attempt, enumerate(cases))))


def test_every_cell_holds_the_invariant(outcomes, case):
    broken = outcomes[case].broken
    if broken and broken.startswith("skipped:"):
        pytest.skip(broken)
    assert broken is None, broken


def committed_rows() -> dict[str, str]:
    """The record's rows in docs/bad-inputs.md, by the row's first three cells."""
    text = DOC.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    return {row.rsplit(" | ", 1)[0]: row for row in rows}


def test_the_committed_record_is_this_run(outcomes, request):
    """docs/bad-inputs.md holds every cell of the matrix with what the user sees; the cells
    that ran here must show exactly that. `BABYLM_KD_WRITE_DOCS=1 make chaos` rewrites it."""
    rows = render_rows(outcomes)
    full = len(outcomes) == len(all_cases())
    if os.environ.get("BABYLM_KD_WRITE_DOCS") == "1" and full:
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + "\n".join(HEADER + rows) + "\n" + text[end:])
    committed = committed_rows()
    assert len(committed) == len(all_cases()), "the record does not hold every cell"
    changed = [row for row in rows if committed.get(row.rsplit(" | ", 1)[0]) != row]
    assert changed == [], (f"{len(changed)} cells differ from {DOC}: regenerate it with "
                           f"BABYLM_KD_WRITE_DOCS=1 make chaos; first: {changed[:3]}")


def test_the_matrix_covers_every_stage_path_and_fault():
    cases = all_cases()
    assert {c.site.stage for c in cases} == {s.name for s in STAGES}
    for stage in STAGES:
        for site in stage.sites:
            assert {c.fault for c in cases if c.site == site} == set(FAULTS_OF[site.kind])
    covering = covering_cases()
    assert {c.site for c in covering} == {c.site for c in cases}
    assert {(c.site.stage, c.fault) for c in covering} == {(c.site.stage, c.fault) for c in cases}

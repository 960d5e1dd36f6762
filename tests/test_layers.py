"""The packages' imports run one way, down the layers of docs/architecture.md:

    pipeline, bench          (top: the whole pipeline, the benchmarks)
    precompute | student     (the two stages; neither imports the other)
    training                 (what both stages share: loop, checkpoints, device, models, losses)
    storage                  (the on-disk formats)
    configs                  (bottom: settings and the command line)

Every import statement counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"configs": 0, "storage": 1, "training": 2, "precompute": 3, "student": 3,
         "pipeline": 4, "bench": 4}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project package in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: within the importing package
            continue
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names
                  if name.split(".")[0] in LAYER]
    return found


def upward_imports(package: str) -> list[str]:
    """'file:line imports X' for every import of a package at the same layer or above."""
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, imported in project_imports(path):
            if imported != package and LAYER[imported] >= LAYER[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    return bad


@pytest.mark.parametrize("package", sorted(LAYER))
def test_imports_only_run_down(package):
    assert upward_imports(package) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import configs\n\ndef f():\n    from student.train import train\n"
                      "    import precompute.logits as logits\n")
    assert project_imports(module) == [(1, "configs"), (4, "student"), (5, "precompute")]


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYER)

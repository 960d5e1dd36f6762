"""Benchmarks that print tables: each module exposes `run(...) -> list[dict]` (rows) and
`markdown(rows) -> str`, and runs alone as `python -m bench.<name>`. `python -m bench`
(`make bench`) runs the CPU ones together and writes bench/results.md."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

SHARED_DATA = Path(os.environ.get("BABYLM_KD_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))
"""The real public data (BabyLM, BLiMP) the benchmarks read in place; one setting, as in tests."""


def sibling_run(run_dir: Path, sibling: Path) -> Path:
    """`sibling`, a run directory sharing `run_dir`'s tokenizer, token stores and teacher
    (symlinks, kept when a rerun on the same root finds them), for a second cache of the same
    teacher."""
    for shared in ("tokenizer", "tokens", "teacher"):
        (sibling / shared).parent.mkdir(parents=True, exist_ok=True)
        if not (sibling / shared).is_symlink():
            (sibling / shared).symlink_to(run_dir / shared)
    return sibling


@contextlib.contextmanager
def work_dir(root: Path | None, name: str) -> Iterator[Path]:
    """Where a benchmark builds and trains: `root` as given (kept, and reused by a rerun), or a
    temporary folder `bench-<name>-*` removed afterwards."""
    if root is not None:
        yield Path(root)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Benchmarks that print tables: each module exposes `run(...) -> list[dict]` (rows) and
`markdown(rows) -> str`, and runs alone as `python -m bench.<name>`. `python -m bench`
(`make bench`) runs the CPU ones together and writes bench/results.md."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("BABYLM_KD_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))
"""The real public data (BabyLM, BLiMP) the benchmarks read in place; one setting, as in tests."""


def sibling_run(run_dir: Path, sibling: Path) -> Path:
    """`sibling`, a run directory sharing `run_dir`'s tokenizer, token stores and teacher
    (symlinks), for a second cache of the same teacher."""
    for shared in ("tokenizer", "tokens", "teacher"):
        (sibling / shared).parent.mkdir(parents=True, exist_ok=True)
        (sibling / shared).symlink_to(run_dir / shared)
    return sibling

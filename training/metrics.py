"""The metrics log of a training run, `metrics.jsonl`: one JSON object per optimizer step (step,
tokens, loss terms, lr, tokens/s; validation loss and perplexity on validation steps). One parser
reads it everywhere: a line torn by a kill mid-write, or a blank one, is skipped."""

from __future__ import annotations

import json
from pathlib import Path

from configs import writing
from storage.paths import write_atomic

METRICS_FILE = "metrics.jsonl"

TIMING_KEYS = ("tokens_per_s", "elapsed_s")
"""Metrics that depend on the machine, not the run (left out when comparing runs)."""


def append_metrics(path: Path, row: dict) -> None:
    with writing(path), path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (those steps are redone), and a
    line torn by a kill mid-write (its step is after the checkpoint, so it is redone too)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if (row := _parse_row(line)) is not None and row["step"] <= after_step]
    write_atomic(path, "".join(line + "\n" for line in lines))


def _parse_row(line: str) -> dict | None:
    """A metrics line as a dict; None for a blank or torn one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_metrics(path: Path) -> list[dict]:
    """Every row of a metrics file, in order (blank and torn lines skipped)."""
    return [row for line in Path(path).read_text(errors="replace").splitlines()
            if (row := _parse_row(line)) is not None]

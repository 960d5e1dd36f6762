"""The alpha x temperature (x k, x ensemble weights) grid on the logit caches: `python -m
student.sweep` (`make sweep`).

Every grid point is an ordinary `train(cfg.replace(...))` run with its own students/<name>/
directory; the caches are opened once, read-only, and shared. Finished runs are skipped and
unfinished ones resume, so rerunning the sweep continues it. At the end a table of the final
validation loss and perplexity of every run is printed and written to <run>/reports/sweep.md and
sweep.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from configs import Config, UserError
from configs.cli import run
from storage.cache import LogitCache
from storage.paths import make_folder, write_atomic
from student.train import as_cached, caches_at, open_caches, student_dir, train, weights_of
from training.checkpoint import is_finished
from training.loop import open_tokens
from training.metrics import METRICS_FILE, read_metrics


def grid(cfg: Config) -> list[Config]:
    """One config per (alpha, temperature, k, weights) point, distinct run names only (every
    alpha = 1 point is the same CE baseline)."""
    d = cfg.distill
    for key, values in (("sweep_alphas", d.sweep_alphas),
                        ("sweep_temperatures", d.sweep_temperatures)):
        if not values:
            raise UserError(f"distill.{key} is empty: the sweep would train nothing (give at "
                            "least one value)")
    runs: dict[str, Config] = {}
    weightings = d.sweep_weights or (tuple(m.weight for m in d.teachers),)
    for alpha, temperature, k, weights in itertools.product(
            d.sweep_alphas, d.sweep_temperatures, d.sweep_ks or (d.k,), weightings):
        members = [dataclasses.asdict(member) | {"weight": weight}
                   for member, weight in zip(d.teachers, weights)]
        point = cfg.replace(**{"distill.alpha": alpha, "distill.temperature": temperature,
                               "distill.k": k, "distill.run": "", "distill.teachers": members})
        runs.setdefault(student_dir(point).name, point)
    return list(runs.values())


def sweep(cfg: Config) -> list[dict]:
    """Train every grid point (skipping finished ones); returns the summary rows."""
    points = grid(as_cached(cfg))
    caches = shared_caches(cfg) if any(p.distill.alpha < 1 for p in points) else ()
    for point in points:  # counted draws hold some temperatures only: refuse before training
        if point.distill.alpha < 1:
            caches_at(caches, point.distill.temperature)
    rows = []
    for i, point in enumerate(points, 1):
        out = student_dir(point)
        status = "finished earlier" if is_finished(out) else "trained"
        if status == "trained":
            print(f"\n--- sweep {i}/{len(points)}: {out.name}", flush=True)
            train(point, caches=caches)
        rows.append(summary_row(point, out, status))
    write_summary(cfg.run_path / "reports", rows)
    return rows


def shared_caches(cfg: Config) -> tuple[LogitCache, ...]:
    """The train caches, opened once for every run (none in online mode: nothing to share)."""
    if cfg.distill.mode != "cached":
        return ()
    tokens, _ = open_tokens(cfg)
    try:
        return open_caches(cfg, tokens, vocab_size=tokens.vocab_size)
    except UserError:
        return ()  # train() says what to run


def summary_row(cfg: Config, out: Path, status: str) -> dict:
    """A run's grid point and final validation numbers (from its metrics log)."""
    rows = read_metrics(out / METRICS_FILE) if (out / METRICS_FILE).is_file() else []
    last_val = next((r for r in reversed(rows) if "val_loss" in r), {})
    weights = weights_of(cfg.distill.teachers) if cfg.distill.teachers else ()
    return {"run": out.name, "alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
            "k": None if len(weights) > 1 else cfg.distill.k or cfg.cache.k, "weights": [round(w, 4) for w in weights],
            "steps": rows[-1]["step"] if rows else 0,
            "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"),
            "status": status}


def table(rows: list[dict]) -> str:
    """The summary as a markdown table (best validation loss first)."""
    ordered = sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))
    lines = ["| run | alpha | T | k | steps | val loss | val ppl | |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in ordered:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        ppl = f"{r['val_ppl']:.2f}" if r["val_ppl"] is not None else "-"
        lines.append(f"| {r['run']} | {r['alpha']:g} | {r['temperature']:g} | {r['k'] or '-'} | "
                     f"{r['steps']} | {loss} | {ppl} | {r['status']} |")
    return "\n".join(lines) + "\n"


def write_summary(reports: Path, rows: list[dict]) -> None:
    """Print the table and write reports/sweep.md and sweep.json (each renamed into place)."""
    text = table(rows)
    print("\n" + text)
    make_folder(reports)
    for name, content in (("sweep.md", "# Sweep\n\n" + text),
                          ("sweep.json", json.dumps(rows, indent=2) + "\n")):
        write_atomic(reports / name, content)


def main(cfg: Config) -> None:
    sweep(cfg)


if __name__ == "__main__":
    run(main, "Train the alpha x temperature (x k, x weights) grid of students on the caches.")

"""The comparison report of a run: `reports/results.json`, `reports/report.md` and PNG curves.

`write_report(run_path, results)` takes the results of `student.evaluate.evaluate_run` and adds
  * the comparison table (model, params, val loss, perplexity, bits/byte, minimal-pair macro
    accuracy, change of perplexity against the CE baseline: the student trained with alpha = 1);
  * figures (`plot_curves`): validation loss against tokens seen for every student with the
    teacher's as a line, minimal-pair accuracy per field, and each run's training curves;
  * the logit cache's facts (k, value code, teacher, bytes/token) when `cache/train.zarr` exists.
`python -m student.report --config CONFIG` rebuilds report.md and the PNGs from an existing
results.json without evaluating again.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from configs import Config, UserError, writing  # noqa: E402
from storage.cache import cache_bytes, open_cache  # noqa: E402
from storage.location import Remote, locate  # noqa: E402
from storage.paths import make_folder, write_atomic  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

COLUMNS = ("model", "params", "val loss", "perplexity", "bits/byte", "pairs acc", "ppl vs CE")


# ----------------------------------------------------------------------------- table

def baseline_name(results: dict) -> str | None:
    """The CE baseline: the first student (by name) trained with alpha = 1."""
    for row in results["models"]:
        if row["kind"] == "student" and row.get("training", {}).get("alpha") == 1:
            return row["name"]
    return None


def table_rows(results: dict) -> list[dict]:
    """One dict per model with the table's numbers (None where not measured)."""
    base = baseline_name(results)
    base_ppl = next((r.get("lm", {}).get("perplexity") for r in results["models"]
                     if r["name"] == base), None)
    rows = []
    for row in results["models"]:
        lm, pairs = row.get("lm") or {}, first_suite(row).get("ours") or {}
        ppl = lm.get("perplexity")
        rows.append({
            "model": row["name"], "params": row.get("params"), "val_loss": lm.get("loss"),
            "perplexity": ppl, "bits_per_byte": lm.get("bits_per_byte"),
            "pairs_accuracy": pairs.get("macro_accuracy"),
            "ppl_change_vs_ce_pct": 100 * (ppl / base_ppl - 1) if ppl and base_ppl else None,
        })
    return rows


def _cells(row: dict) -> list[str]:
    def number(value, fmt):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else format(value, fmt)
    params = row["params"]
    return [row["model"],
            "-" if params is None else f"{params / 1e6:.1f}M" if params >= 1e6
            else f"{params / 1e3:.1f}K" if params >= 1e3 else str(params),
            number(row["val_loss"], ".4f"), number(row["perplexity"], ".2f"),
            number(row["bits_per_byte"], ".4f"),
            "-" if row["pairs_accuracy"] is None else f"{100 * row['pairs_accuracy']:.1f}%",
            number(row["ppl_change_vs_ce_pct"], "+.1f") + ("%" if row["ppl_change_vs_ce_pct"]
                                                          is not None else "")]


def first_suite(row: dict) -> dict:
    """{convention: result} of the model's first minimal-pair suite (empty when none was scored)."""
    suites = row.get("minimal_pairs") or {}
    return next(iter(suites.values()), {})


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- curves

def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(run_path: Path, out_dir: Path, results: dict) -> list[str]:
    """The report's figures; returns their file names, the answer first:
      * validation.png: validation loss against tokens seen for every student (the CE baseline
        among them) on one axis, zoomed to where they differ, each teacher's value as a line;
      * pairs.png: minimal-pair accuracy per field (our convention) for each model;
      * curves_<run>.png: each run's train loss (and CE) and validation loss."""
    runs = {}
    for path in [run_path / "teacher" / "metrics.jsonl",
                 *sorted((run_path / "teachers").glob("*/metrics.jsonl")),
                 *sorted((run_path / "students").glob("*/metrics.jsonl"))]:
        if path.is_file() and (rows := read_metrics(path)):
            runs[str(path.parent.relative_to(run_path))] = rows
    written = []
    students = {name: rows for name, rows in runs.items() if name.startswith("students/")}
    if any(_series(rows, "val_loss")[0] for rows in students.values()):
        plot_validation(students, results, out_dir / "validation.png")
        written.append("validation.png")
    if plot_pairs(results, out_dir / "pairs.png"):
        written.append("pairs.png")
    for name, rows in runs.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_series(rows, "loss"), label="train loss", linewidth=1)
        if any(r.get("ce") != r.get("loss") for r in rows):  # KD runs: CE is the comparable part
            ax.plot(*_series(rows, "ce"), label="train CE", linewidth=1, linestyle="--")
        ax.plot(*_series(rows, "val_loss"), "o-", label="val loss")
        _finish(fig, ax, name, out_dir / f"curves_{name.replace('/', '_')}.png")
        written.append(f"curves_{name.replace('/', '_')}.png")
    return written


def plot_validation(students: dict[str, list[dict]], results: dict, path: Path) -> None:
    """Validation loss against tokens seen, one line per student; the y axis spans the second
    half of training, where the runs differ, and each teacher's loss is a line on it (or, when
    far below, a legend entry)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    late = []
    for name, rows in students.items():
        tokens, losses = _series(rows, "val_loss")
        if tokens:
            ax.plot(tokens, losses, "o-", markersize=3, linewidth=1.2,
                    label=name.removeprefix("students/"))
            late += [v for t, v in zip(tokens, losses) if t >= tokens[-1] / 2]
    low, high = (min(late), max(late)) if late else (0.0, 1.0)
    margin = max(0.05 * (high - low), 1e-3)
    ax.set_ylim(low - margin, high + margin)
    teachers = [(r["name"], r["lm"]["loss"]) for r in results["models"]
                if r["kind"] == "teacher" and r.get("lm")]
    for (name, teacher), style in zip(teachers, itertools.cycle(("--", ":", "-."))):
        if low - margin <= teacher <= high + margin:
            ax.axhline(teacher, color="black", linestyle=style, linewidth=1, label=name)
        else:  # off the zoomed axis: said in the legend, not drawn
            where = "below" if teacher < low else "above"
            ax.plot([], [], color="black", linestyle=style, linewidth=1,
                    label=f"{name} {teacher:.3f} ({where} the axis)")
    ax.set_ylabel("validation loss (nats/token)")
    _finish(fig, ax, "validation loss while training", path)


def plot_pairs(results: dict, path: Path) -> bool:
    """Grouped bars: minimal-pair accuracy per field (per suite when a suite has no fields),
    our convention, one bar per model. False (nothing drawn) without minimal-pair scores."""
    scored = [r for r in results["models"] if r.get("minimal_pairs")]
    if not scored:
        return False
    suites = list(results["minimal_pairs_files"])
    groups = []  # (label, suite, field or None)
    for suite in suites:
        fields = sorted({f for r in scored
                         for f in ((r["minimal_pairs"].get(suite) or {}).get("ours") or {})
                         .get("fields", {})})
        prefix = f"{suite}: " if len(suites) > 1 else ""
        groups += [(prefix + field, suite, field) for field in fields] or [(suite, suite, None)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(scored)) / 3), 4.5))
    width = 0.8 / len(scored)
    for i, row in enumerate(scored):
        values = []
        for _, suite, field in groups:
            result = (row["minimal_pairs"].get(suite) or {}).get("ours") or {}
            value = result.get("fields", {}).get(field) if field else result.get("macro_accuracy")
            values.append(float("nan") if value is None else 100 * value)
        ax.bar([g + i * width - 0.4 + width / 2 for g in range(len(groups))], values, width,
               label=row["name"])
    ax.set_xticks(range(len(groups)), [label for label, _, _ in groups], rotation=20,
                  ha="right", fontsize=8)
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("minimal pairs per field (ours)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _finish(fig, ax, title: str, path: Path) -> None:
    ax.set_xlabel("tokens seen")
    if not ax.get_ylabel():
        ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- cache facts

def caches_facts(root: Path | Remote) -> list[dict]:
    """`cache_facts` of each train cache under `root` (run_dir, or `storage.caches`): `cache/`,
    then `caches/<name>/`."""
    if isinstance(root, Remote):
        named = [folder / "train.zarr" for folder in (root / "caches").folders()]
    else:
        named = sorted(root.glob("caches/*/train.zarr"))
    paths = [root / "cache" / "train.zarr", *named]
    return [cache_facts(path) for path in paths if path.exists()]


def caches_root(cfg: Config) -> Path | Remote:
    """Where the run's caches live: `storage.caches`, or run_dir."""
    return locate(cfg.storage.caches or cfg.run_path, cfg.storage.options)


def cache_facts(path: Path | Remote) -> dict:
    """k, value code, teacher and bytes/token of the cache at `path`.

    Bytes/token is the cache's size on disk over the positions it covers (N x L).
    """
    try:
        cache = open_cache(path, allow_incomplete=True)
        manifest, done = dict(cache.manifest), cache.done_shards()
        size = cache_bytes(path)
    except Exception as exc:  # noqa: BLE001  the report must not die on a cache it only describes
        return {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}
    teacher = manifest.get("teacher")
    if isinstance(teacher, dict):
        teacher = ", ".join(f"{key} {value}" for key, value in teacher.items()
                            if key != "fingerprint" and value not in ("", None, "none"))
    tokens = manifest["n_sequences"] * manifest["seq_len"]
    facts = {"path": str(path), "k": manifest["k"], "value_code": manifest["value_code"],
             "teacher": teacher, "temperatures": manifest.get("temperatures"),
             "shards_done": f"{int(done.sum())}/{done.size}", "bytes_on_disk": size,
             "tokens": tokens, "bytes_per_token": size / tokens}
    draws = (manifest.get("selection") or {}).get("draws")
    return {**facts, "draws": draws} if draws else facts  # counted draws: how many at each T


# ----------------------------------------------------------------------------- the report

def write_report(run_path: Path | str, results: dict, *,
                 caches_root: Path | Remote | None = None) -> Path:
    """Write results.json (with table, curves, the facts of the caches under `caches_root`,
    default run_path, added), report.md and PNGs.

    Returns the path of report.md. Files are replaced atomically.
    """
    run_path = Path(run_path)
    out = run_path / "reports"
    make_folder(out)
    results = {**results, "baseline": baseline_name(results), "table": table_rows(results),
               "curves": plot_curves(run_path, out, results),
               "caches": caches_facts(caches_root or run_path)}
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    report = out / "report.md"
    write_atomic(report, render_markdown(results))
    return report


def render_markdown(results: dict) -> str:
    table = markdown_table(list(COLUMNS), [_cells(r) for r in results["table"]])
    parts = [f"# Report: {results['run_dir']}", "", table, "",
             f"Perplexity change against the CE baseline (`{results['baseline']}`, alpha = 1)."
             if results["baseline"] else "No CE baseline (a student with alpha = 1) in this run.",
             "Val loss is the mean token loss (nats) on tokens/val.zarr; the first token of every "
             "row is not scored. Bits/byte uses the store's average bytes per token. Minimal-pair "
             "accuracy is the macro average over files; ties count as wrong."]
    parts += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]] \
        if results["notes"] else []
    trained = [r for r in results["models"] if r.get("training")]
    if trained:
        parts += ["", "## Training settings", "", markdown_table(
            ["model", "alpha", "temperature", "k"],
            [[r["name"], *(str(r["training"].get(key, "-")) for key in ("alpha", "temperature", "k"))]
             for r in trained])]
    parts += _pairs_sections(results)
    if results["caches"]:
        parts += ["", "## Logit caches" if len(results["caches"]) > 1 else "## Logit cache"]
    for cache in results["caches"]:
        parts.append("")
        if "error" in cache:
            parts.append(f"`{cache['path']}` could not be read: {cache['error']}")
        else:
            per_token = cache["bytes_per_token"]
            parts += [f"- path: `{cache['path']}`", f"- teacher: {cache['teacher']}",
                      f"- k: {cache['k']}, value code: {cache['value_code']}, "
                      f"temperatures: {cache['temperatures']}"
                      + (f", draws at each: {cache['draws']}" if cache.get("draws") else ""),
                      f"- {cache['bytes_on_disk'] / 1e6:.1f} MB on disk for {cache['tokens']:,} "
                      f"positions: {per_token:.1f} bytes/token; shards done {cache['shards_done']}"]
    if results["curves"]:
        parts += ["", "## Figures", ""] + [f"![{name}]({name})" for name in results["curves"]]
    return "\n".join(parts) + "\n"


def _pairs_sections(results: dict) -> list[str]:
    scored = [r for r in results["models"] if r.get("minimal_pairs")]
    if not scored:
        return []
    suites = results["minimal_pairs_files"]
    conventions = results.get("conventions") or ["ours"]
    parts = ["", "## Minimal pairs", "", f"Folder: `{results['minimal_pairs_dir']}`; "
             + "; ".join(f"{suite}: {sum(files.values())} pairs in {len(files)} files"
                         for suite, files in suites.items())
             + f"; {len(results['malformed_lines'])} malformed lines skipped.", "",
             "Macro accuracy over phenomena under each scorer's convention: `ours` (BOS, no "
             "leading space, ties wrong), `lm_eval` (lm-evaluation-harness: a leading space, ties "
             "right), `babylm2025` (the BabyLM 2025 pipeline: the tokenizer's own encoding, ties "
             "right).", "",
             markdown_table(["model", *(f"{suite} {c}" for suite in suites for c in conventions)],
                            [[r["name"], *(_percent(((r["minimal_pairs"].get(suite) or {})
                                                     .get(c) or {}).get("macro_accuracy"))
                                           for suite in suites for c in conventions)]
                             for r in scored])]
    for suite, files in suites.items():
        by_model = [(r["name"], (r["minimal_pairs"].get(suite) or {}).get("ours") or {})
                    for r in scored]
        parts += ["", f"### {suite} (ours)"]
        fields = sorted({f for _, result in by_model for f in result.get("fields", {})})
        if fields:
            parts += ["", markdown_table(["field", *(name for name, _ in by_model)], [
                [field, *(_percent(result.get("fields", {}).get(field)) for _, result in by_model)]
                for field in fields])]
        parts += ["", markdown_table(["phenomenon (ties)", *(name for name, _ in by_model)], [
            [name, *(_file_cell(result.get("files", {}).get(name)) for _, result in by_model)]
            for name in files])]
    return parts


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _file_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    return _percent(entry["accuracy"]) + (f" ({entry['ties']})" if entry["ties"] else "")


def print_summary(results: dict, report: Path) -> None:
    """The comparison table on the terminal, then where the report is."""
    rows = table_rows(results)
    print()
    print(text_table(list(COLUMNS), [_cells(r) for r in rows]))
    print(f"\nreport: {report}")


def main(cfg: Config) -> None:
    path = cfg.run_path / "reports" / "results.json"
    if not path.is_file():
        raise UserError(f"no {path}: run `make eval` first")
    results = json.loads(path.read_text())
    print_summary(results, write_report(cfg.run_path, results, caches_root=caches_root(cfg)))


if __name__ == "__main__":
    from configs.cli import run

    run(main, "Rebuild report.md and the curves of a run from its reports/results.json.")

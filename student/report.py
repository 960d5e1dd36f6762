"""The comparison report of a run: `reports/results.json`, `reports/report.md` and PNG curves.

`write_report(run_path, results)` takes the results of `student.evaluate.evaluate_run` and adds
  * the comparison table (model, params, val loss, perplexity, bits/byte, minimal-pair macro
    accuracy, change of perplexity against the CE baseline: the student trained with alpha = 1);
  * training curves from `students/*/metrics.jsonl` and `teacher/metrics.jsonl` (train loss and
    val loss against tokens seen), one PNG per run plus one PNG comparing all runs;
  * the logit cache's facts (k, value code, teacher, bytes/token) when `cache/train.zarr` exists.
`python -m student.report --config CONFIG` rebuilds report.md and the PNGs from an existing
results.json without evaluating again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from configs import Config, UserError, writing  # noqa: E402
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
        lm, pairs = row.get("lm") or {}, row.get("minimal_pairs") or {}
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


def plot_curves(run_path: Path, out_dir: Path) -> list[str]:
    """PNGs of train and val loss vs tokens for every run with metrics.jsonl; returns file names."""
    runs = {}
    for path in [run_path / "teacher" / "metrics.jsonl",
                 *sorted((run_path / "students").glob("*/metrics.jsonl"))]:
        if path.is_file() and (rows := read_metrics(path)):
            runs[str(path.parent.relative_to(run_path))] = rows
    written = []
    for name, rows in runs.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_series(rows, "loss"), label="train loss", linewidth=1)
        if any(r.get("ce") != r.get("loss") for r in rows):  # KD runs: CE is the comparable part
            ax.plot(*_series(rows, "ce"), label="train CE", linewidth=1, linestyle="--")
        ax.plot(*_series(rows, "val_loss"), "o-", label="val loss")
        _finish(fig, ax, name, out_dir / f"curves_{name.replace('/', '_')}.png")
        written.append(f"curves_{name.replace('/', '_')}.png")
    if len(runs) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in runs.items():
            line, = ax.plot(*_series(rows, "ce"), linewidth=1, alpha=0.6, label=f"{name} train CE")
            ax.plot(*_series(rows, "val_loss"), "o-", color=line.get_color(), label=f"{name} val")
        _finish(fig, ax, "all runs", out_dir / "curves_all.png")
        written.append("curves_all.png")
    return written


def _finish(fig, ax, title: str, path: Path) -> None:
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- cache facts

def cache_facts(run_path: Path) -> dict | None:
    """k, value code, teacher and bytes/token of `cache/train.zarr`; None when there is no cache.

    Bytes/token is the cache's size on disk over the positions it covers (N x L).
    """
    path = run_path / "cache" / "train.zarr"
    if not path.exists():
        return None
    try:
        from storage.cache import open_cache
        cache = open_cache(path, allow_incomplete=True)
        manifest, done = dict(cache.manifest), cache.done_shards()
    except Exception as exc:  # noqa: BLE001  the report must not die on a cache it only describes
        return {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}
    teacher = manifest.get("teacher")
    if isinstance(teacher, dict):
        teacher = ", ".join(f"{key} {value}" for key, value in teacher.items()
                            if key != "fingerprint" and value not in ("", None, "none"))
    tokens = manifest["n_sequences"] * manifest["seq_len"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"path": str(path), "k": manifest["k"], "value_code": manifest["value_code"],
            "teacher": teacher, "temperatures": manifest.get("temperatures"),
            "shards_done": f"{int(done.sum())}/{done.size}", "bytes_on_disk": size,
            "tokens": tokens, "bytes_per_token": size / tokens}


# ----------------------------------------------------------------------------- the report

def write_report(run_path: Path | str, results: dict) -> Path:
    """Write results.json (with table, curves, cache facts added), report.md and PNGs.

    Returns the path of report.md. Files are replaced atomically.
    """
    run_path = Path(run_path)
    out = run_path / "reports"
    make_folder(out)
    results = {**results, "baseline": baseline_name(results), "table": table_rows(results),
               "curves": plot_curves(run_path, out), "cache": cache_facts(run_path)}
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
    if results["cache"]:
        cache = results["cache"]
        parts += ["", "## Logit cache", ""]
        if "error" in cache:
            parts.append(f"`{cache['path']}` could not be read: {cache['error']}")
        else:
            per_token = cache["bytes_per_token"]
            parts += [f"- path: `{cache['path']}`", f"- teacher: {cache['teacher']}",
                      f"- k: {cache['k']}, value code: {cache['value_code']}, "
                      f"temperatures: {cache['temperatures']}",
                      f"- {cache['bytes_on_disk'] / 1e6:.1f} MB on disk for {cache['tokens']:,} "
                      f"positions: {per_token:.1f} bytes/token; shards done {cache['shards_done']}"]
    if results["curves"]:
        parts += ["", "## Training curves", ""] + [f"![{name}]({name})" for name in results["curves"]]
    return "\n".join(parts) + "\n"


def _pairs_sections(results: dict) -> list[str]:
    scored = [r for r in results["models"] if r.get("minimal_pairs")]
    if not scored:
        return []
    parts = ["", "## Minimal pairs", "", f"Folder: `{results['minimal_pairs_dir']}`; "
             f"{sum(results['minimal_pairs_files'].values())} pairs in "
             f"{len(results['minimal_pairs_files'])} files; "
             f"{len(results['malformed_lines'])} malformed lines skipped."]
    fields = sorted({f for r in scored for f in r["minimal_pairs"]["fields"]})
    if fields:
        parts += ["", markdown_table(["field", *(r["name"] for r in scored)], [
            [field, *(_percent(r["minimal_pairs"]["fields"].get(field)) for r in scored)]
            for field in fields])]
    files = list(results["minimal_pairs_files"])
    parts += ["", markdown_table(["phenomenon (ties)", *(r["name"] for r in scored)], [
        [name, *(_file_cell(r["minimal_pairs"]["files"].get(name)) for r in scored)]
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
    print_summary(results, write_report(cfg.run_path, results))


if __name__ == "__main__":
    from configs.cli import run

    run(main, "Rebuild report.md and the curves of a run from its reports/results.json.")

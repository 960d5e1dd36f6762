"""Counted draws (cache.selection=draws) against online KD: bytes per token on BabyLM text and
the students' validation perplexity at T = 1 and T = 2, on BabyLM text and the synthetic
language, the median of three student seeds; the training step's speed and memory against CE.

  BabyLM text  bench.real_text's data and teacher (4 x 128 GPT-2, one epoch, 2048-entry BPE) and
               its 2 x 64 student for half an epoch (online KD's students take most of the time)
  synthetic    bench.student's Markov language, teacher and 2 x 64 student (200 steps)
  cache        DRAWS[i] ids drawn at TEMPERATURES[i], each position's distinct ids and counts,
               no logits (one cache serves both temperatures)
  students     online KD and KD from the cache at each temperature, seeds SEEDS, alpha 0.5
  loop / RSS   bench.student's loop rows (CE and KD from the cache at T = 2 and T = 1,
               alternating in one process, in fresh processes, the median of their ratios) and
               bench.ensemble's peak RSS of a training process, on BabyLM text

`python -m bench.draws` prints the tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import real_text, sibling_run, work_dir
from bench import student as synthetic
from bench.ensemble import rss_rows
from bench.student import LOOP_PROCESSES, loop_rows_in_processes
from bench.tables import markdown_sections
from configs import CONFIG_DIR, load_config

TEMPERATURES, DRAWS, SEEDS = (1.0, 2.0), (16, 48), (0, 1, 2)
CACHE = ("cache.selection=draws", f"cache.temperatures=[{', '.join(map(str, TEMPERATURES))}]",
         f"cache.draws=[{', '.join(map(str, DRAWS))}]")
"""The cache measured: what configs/babylm-gpt2.yaml ships."""
NAME = f"counted draws ({' + '.join(f'{m} at T = {t:g}' for t, m in zip(TEMPERATURES, DRAWS))})"
LOOP_STEPS, RSS_REPEATS = 60, 3


def run(*, data_dir: Path = real_text.DATA_DIR, teacher_epochs: float = 1.0,
        student_epochs: float = 0.5, synthetic_steps: int = 200, teacher_steps: int = 400,
        seeds: tuple[int, ...] = SEEDS, loop_processes: int = LOOP_PROCESSES,
        rss_repeats: int = RSS_REPEATS, extra: tuple[str, ...] = (),
        root: Path | None = None) -> list[dict]:
    """Build and train everything in a temporary directory (or `root`, reusing what is there);
    rows of the tables. `extra` overrides go last on BabyLM text (the tests shrink it)."""
    with work_dir(root, "draws") as tmp:
        text_rows, text_runs = _real_text(tmp / "text", data_dir, teacher_epochs=teacher_epochs,
                                          student_epochs=student_epochs, seeds=seeds, extra=extra)
        rows = text_rows + _synthetic(tmp / "synthetic", steps=synthetic_steps,
                                      teacher_steps=teacher_steps, seeds=seeds)
        rows += loop_rows_in_processes(text_runs, steps=LOOP_STEPS, processes=loop_processes)
        rows += rss_rows(text_runs, repeats=rss_repeats)
        return rows


def _real_text(root: Path, data_dir: Path, *, teacher_epochs: float, student_epochs: float,
               seeds: tuple[int, ...], extra: tuple[str, ...]) -> tuple[list[dict], dict]:
    """BabyLM text: the cache's bytes and the students; and the loop rows' runs."""
    from precompute.corpus import prepare
    from precompute.logits import fill_caches
    from precompute.teacher import train_teacher
    from storage.cache import cache_bytes

    base = real_text.settings(root / "run", data_dir, teacher_epochs=teacher_epochs,
                              student_epochs=student_epochs, extra=extra)
    cfg = load_config(CONFIG_DIR / "demo.yaml", base)
    prepare(cfg)
    train_teacher(cfg)
    counted_dir = sibling_run(cfg.run_path, root / "run-draws")
    counted = [*base, f"run_dir={counted_dir}", *CACHE]
    fill_caches(load_config(CONFIG_DIR / "demo.yaml", counted))
    store_tokens = _tokens(cfg.run_path / "tokens" / "train.zarr")
    size = cache_bytes(counted_dir / "cache" / "train.zarr") / store_tokens
    rows = [{"section": "caches", "language": "BabyLM text", "cache": NAME,
             "bytes_per_token": round(size, 1)}]
    rows += _quality("BabyLM text", seeds, lambda mode, t, seed: [
        *(base if mode == "online" else counted), f"distill.temperature={t}",
        f"student.seed={seed}", *(["distill.mode=online"] if mode == "online" else []),
        f"distill.run=draws-{mode}-T{t:g}-seed{seed}"])
    at = {t: f"distill.temperature={t}" for t in TEMPERATURES}
    runs = {"CE baseline": ([*base, at[2.0], "distill.alpha=1"], False),
            f"KD from {NAME}, T=2": ([*counted, at[2.0]], False),
            f"KD from {NAME}, T=1": ([*counted, at[1.0]], False)}
    return rows, runs


def _synthetic(root: Path, *, steps: int, teacher_steps: int, seeds: tuple[int, ...]
               ) -> list[dict]:
    """The synthetic language: its teacher (bench.student.build), the cache, the students."""
    from transformers import AutoModelForCausalLM

    from precompute.logits import CountedDraws, write_cache
    from storage.tokens import open_token_store

    if not (root / "teacher" / "model.safetensors").exists():
        synthetic.build_language(root, teacher_steps=teacher_steps)
    counted_dir = sibling_run(root, synthetic.sibling(root, "draws"))
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    write_cache(teacher, store=open_token_store(root / "tokens" / "train.zarr"),
                cache_path=counted_dir / "cache" / "train.zarr", teacher={"name": "bench"},
                k=sum(DRAWS), temperatures=TEMPERATURES,
                sampling=CountedDraws(TEMPERATURES, DRAWS, 0), progress=False)
    return _quality("synthetic", seeds, lambda mode, t, seed: synthetic.overrides(
        root if mode == "online" else counted_dir, "distill.alpha=0.5", f"student.seed={seed}",
        f"distill.temperature={t}", f"student.max_steps={steps}", *CACHE,
        *(["distill.mode=online"] if mode == "online" else []),
        f"distill.run=draws-{mode}-T{t:g}-seed{seed}"))


def _quality(language: str, seeds: tuple[int, ...], settings) -> list[dict]:
    """One row per temperature: online and counted-draws KD's validation perplexity (median over
    `seeds`; `settings(mode, T, seed)` gives a run's demo.yaml overrides) and the gap."""
    from student.train import train
    from training.metrics import read_metrics

    rows = []
    for t in TEMPERATURES:
        ppl = {mode: [read_metrics(train(load_config(CONFIG_DIR / "demo.yaml", settings(
                   mode, t, seed))) / "metrics.jsonl")[-1]["val_ppl"] for seed in seeds]
               for mode in ("online", "draws")}
        online, counted = (statistics.median(ppl[mode]) for mode in ("online", "draws"))
        gaps = [100 * (c / o - 1) for c, o in zip(ppl["draws"], ppl["online"])]
        rows.append({"section": "quality", "language": language, "T": t,
                     "online_val_ppl": round(online, 3), "draws_val_ppl": round(counted, 3),
                     "vs_online_%": round(100 * (counted / online - 1), 2),
                     "per_seed_gap_%": " / ".join(f"{g:+.2f}" for g in gaps),
                     "seeds": len(seeds)})
    return rows


def _tokens(path: Path) -> int:
    from storage.tokens import open_token_store

    store = open_token_store(path)
    return store.n_sequences * store.seq_len


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per section."""
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    print(markdown(run()))

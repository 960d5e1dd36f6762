"""Cached vs online KD on real text: BabyLM 2023, a teacher trained here, its top-k cache.

bench.student measures quality on a synthetic language whose teacher is known to be better than
the student; this bench asks the same question of real child-directed text. It runs the project's
own stages in a temporary run directory, on configs/demo.yaml with every setting the rows depend
on pinned here:

  data      the 4 BabyLM 2023 sources in $BABYLM_KD_SHARED_DATA (default ../shared/data beside
            the repo): 1.47M words, a 2048-entry BPE, ~2.1M training tokens of 128
  teacher   4 x 128 GPT-2 trained from scratch for one epoch
  caches    its top-256 logits at T = 1 and 2 over the training split, and caches of 64, 16
            and 128 draws per position from its softmax at T = 2 (cache.selection=sample)
  students  the demo's 2 x 64 student, one epoch each, same seed: CE, online KD, top-k cached
            KD (k = 64, the figure judged) and KD from 64 draws at T = 1 and T = 2, then top-k
            cached KD at other k (reading the first k of the cached 256) and from 16 and 128
            draws at T = 2

and reports each student's validation perplexity against online KD at its temperature and against
CE, with the teacher's head mass (share of its tempered probability in the top k) that bounds
what a top-k cache can carry; then the students' training step (bench.student's loop rows: CE and
KD at T = 2 from the top-64, the 64 and the 128 draws, alternating in one process, 60 steps each,
in seven fresh processes). `python -m bench.real_text` prints the tables (timings of the stages:
docs/log.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import SHARED_DATA, sibling_run, work_dir
from bench.student import LOOP_PROCESSES, loop_rows_in_processes
from bench.tables import markdown_sections
from configs import CONFIG_DIR, load_config

DATA_DIR = SHARED_DATA / "babylm" / "2023" / "train_10M"
CACHE_K, K = 256, 64
SAMPLES, FEWER_SAMPLES, MORE_SAMPLES, SAMPLE_TEMPERATURE = 64, 16, 128, 2.0
TEMPERATURES = (1.0, 2.0)
VOCAB = 2048
CACHED_KD = f"cached KD (k={K}, T=2)"
SAMPLED_KD, MORE_SAMPLED_KD = (f"KD from {m} draws (T=2)" for m in (SAMPLES, MORE_SAMPLES))
"""The loop rows' names for KD from the top-K and from the sampled caches."""
LOOP_STEPS = 60
CURVE = ((16, 2.0), (256, 2.0), (256, 1.0))
"""(k, T) of the cached runs beside k = K: how far a larger cache closes the gap to online KD."""


def settings(root: Path, data_dir: Path, *, teacher_epochs: float, student_epochs: float,
             extra: tuple[str, ...] = ()) -> list[str]:
    """Every setting the rows depend on, pinned (demo.yaml is tuned for the demo corpus)."""
    return [f"run_dir={root}", f"data.dir={data_dir}", "data.seq_len=128",
            "tokenizer.kind=bpe", f"tokenizer.vocab_size={VOCAB}",
            "teacher.from_scratch=true", "teacher.n_layer=4", "teacher.n_embd=128",
            "teacher.n_head=4", f"teacher.epochs={teacher_epochs}", "teacher.device=cpu",
            f"cache.k={CACHE_K}", f"cache.temperatures=[{', '.join(map(str, TEMPERATURES))}]",
            "student.n_layer=2", "student.n_embd=64", "student.n_head=2", "student.dropout=0",
            "student.lr=2e-3", "student.batch_size=16", f"student.epochs={student_epochs}",
            "student.warmup_steps=50", "student.eval_every=0", "student.checkpoint_every=0",
            "student.save_at_words=[]",
            "student.device=cpu", "distill.alpha=0.5", *extra]


def run(*, data_dir: Path = DATA_DIR, teacher_epochs: float = 1.0, student_epochs: float = 1.0,
        curve: tuple[tuple[int, float], ...] = CURVE, extra: tuple[str, ...] = (),
        loop_processes: int = LOOP_PROCESSES, root: Path | None = None) -> list[dict]:
    """Build and train everything in a temporary directory (or `root`); rows of the tables.
    `extra` overrides go last (the tests shrink the models with them)."""
    from precompute.corpus import prepare
    from precompute.logits import fill_caches
    from precompute.teacher import train_teacher
    from storage.__main__ import teacher_stats
    from storage.cache import cache_bytes, open_cache
    from storage.tokens import open_token_store
    from student.train import train
    from training.metrics import read_metrics

    with work_dir(root, "real-text") as tmp:
        base = settings(tmp / "run", data_dir, teacher_epochs=teacher_epochs,
                        student_epochs=student_epochs, extra=extra)
        cfg = load_config(CONFIG_DIR / "demo.yaml", base)
        stores = prepare(cfg)
        train_teacher(cfg)
        fill_caches(cfg)
        # draws per position -> a run sharing the tokens and teacher, and its settings
        sampled_dirs = {m: sibling_run(cfg.run_path, tmp / f"run-sampled-{m}")
                        for m in (SAMPLES, FEWER_SAMPLES, MORE_SAMPLES)}
        sampled = {m: [*base, f"run_dir={run_dir}", "cache.selection=sample", f"cache.k={m}",
                       f"cache.sample_temperature={SAMPLE_TEMPERATURE}"]
                   for m, run_dir in sampled_dirs.items()}
        for settings_m in sampled.values():
            fill_caches(load_config(CONFIG_DIR / "demo.yaml", settings_m))
        cache = open_cache(cfg.run_path / "cache" / "train.zarr")
        stats = teacher_stats(cache, k=K)
        runs = [("CE baseline", base, ["distill.alpha=1"])]
        for t in TEMPERATURES:
            at_t = f"distill.temperature={t}"
            runs += [(f"online KD T={t:g}", base, ["distill.mode=online", at_t]),
                     (f"cached KD k={K} T={t:g}", base, [f"distill.k={K}", at_t]),
                     (f"sampled KD m={SAMPLES} T={t:g}", sampled[SAMPLES], [at_t])]
        runs += [(f"cached KD k={k} T={t:g}", base, [f"distill.k={k}", f"distill.temperature={t}"])
                 for k, t in curve]
        runs += [(f"sampled KD m={m} T=2", sampled[m], ["distill.temperature=2.0"])
                 for m in (FEWER_SAMPLES, MORE_SAMPLES)]
        ppl = {}
        for name, run_settings, overrides in runs:
            run_cfg = load_config(CONFIG_DIR / "demo.yaml", run_settings + overrides + [
                f"distill.run=bench-{name.replace(' ', '_').replace('=', '')}"])
            ppl[name] = read_metrics(train(run_cfg) / "metrics.jsonl")[-1]["val_ppl"]
        speed = loop_speed(base, sampled, processes=loop_processes)
        info = json.loads((cfg.run_path / "teacher" / "teacher.json").read_text())
        train_tokens = open_token_store(stores["train"])
        tokens = train_tokens.n_sequences * train_tokens.seq_len
        shape = f"{cfg.teacher.n_layer}x{cfg.teacher.n_embd}, {cfg.teacher.epochs:g} epoch(s)"
        rows = [{"section": "teacher", "teacher": shape,
                 "val_ppl": round(info["val"]["perplexity"], 3),
                 "train_tokens": tokens,
                 **{f"head_mass_T={t:g}": round(stats[f"T={t:g}"]["head_mass"], 4)
                    for t in TEMPERATURES}}]
        caches = {f"top-{CACHE_K} (k = {K} read)": cfg.run_path}
        caches.update({f"{m} draws at T = {SAMPLE_TEMPERATURE:g}": run_dir
                       for m, run_dir in sampled_dirs.items()})
        rows += [{"section": "caches", "cache": name,
                  "bytes_per_token": round(cache_bytes(run_dir / "cache" / "train.zarr") / tokens, 1)}
                 for name, run_dir in caches.items()]
        for name, value in ppl.items():
            t = name.split("T=")[1] if "T=" in name else None
            online = ppl.get(f"online KD T={t}") if not name.startswith(("CE", "online")) else None
            rows.append({"section": "quality", "run": name, "val_ppl": round(value, 3),
                         "vs_online_%": round(100 * (value / online - 1), 2) if online else None,
                         "vs_ce_%": round(100 * (value / ppl["CE baseline"] - 1), 2)})
        return rows + speed


def loop_speed(top_k: list[str], sampled: dict[int, list[str]], *, processes: int) -> list[dict]:
    """bench.student's loop rows on this text: the students' training step, CE and KD at T = 2
    from the top-K of the top-256 cache and from the 64 and the 128 draws, alternating in one
    process on one torch thread as there, in `processes` fresh processes (the median of their
    ratios)."""
    at_2 = "distill.temperature=2.0"
    return loop_rows_in_processes({"CE baseline": ([*top_k, at_2, "distill.alpha=1"], False),
                                   CACHED_KD: ([*top_k, at_2, f"distill.k={K}"], False),
                                   SAMPLED_KD: ([*sampled[SAMPLES], at_2], False),
                                   MORE_SAMPLED_KD: ([*sampled[MORE_SAMPLES], at_2], False)},
                                  steps=LOOP_STEPS, processes=processes)


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per section."""
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    print(markdown(run()))

"""Ensembles of cached teachers on real text: BabyLlama's recipe at the scale of bench.real_text.

Two teachers of different families trained here from scratch, each cached once, and LLaMA
students distilled from each alone, from the cached ensemble and from the online ensemble. It
runs the project's own stages on configs/demo.yaml in a temporary run directory, with every
setting the rows depend on pinned here:

  data      the 4 BabyLM 2023 sources in $BABYLM_KD_SHARED_DATA: 1.47M words, a 2048-entry BPE
  teachers  `gpt2` (4 x 128 GPT-2) and `llama` (4 x 128 LLaMA), one epoch each (`teachers:`)
  caches    64 draws per position at T = 2 from each (the sampled cache bench.real_text judged),
            and each one's top 64 (T = 1 and 2 stored), to measure what a top-k mixture misses
  students  2 x 64 LLaMA, half an epoch, same seed, T = 2, alpha = 0.5: CE; cached KD from each
            teacher; the cached ensemble at equal weights and at the sweep's other weights, and
            from the two top-64 caches; the online ensemble with both targets (probability
            mixture, BabyLlama's logit average)

Each student row gives its validation perplexity, against the online probability mixture and
against CE, and its BLiMP (filtered) accuracy (PAIRS_PER_FILE pairs per phenomenon, our
convention). The top-k section measures, on validation rows and the teachers' full
distributions, what a mixture of two top-64 caches cannot know: the mixture's mass on the union
of the heads that lies in one teacher's tail (the cached target leaves it in the tail bucket),
and the KL from the true mixture to the cached target over those buckets. Then the LLaMA
student's training step (bench.student's loop rows: CE, KD from one cache, KD from the
ensemble's two, alternating in one process, in fresh processes) and its peak RSS when training
(fresh processes, median of 3). `python -m bench.ensemble` prints the tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import SHARED_DATA, work_dir
from bench.real_text import DATA_DIR, VOCAB
from bench.student import _proc_status, _subprocess_call, loop_rows_in_processes
from bench.tables import markdown_sections
from configs import CONFIG_DIR, load_config

TEACHERS = {"gpt2": "gpt2", "llama": "llama"}
"""Teacher name -> architecture (both 4 x 128)."""
DRAWS, DRAW_TEMPERATURE = 64, 2.0
STUDENT_EPOCHS = 0.5
PAIRS_PER_FILE = 50
BLIMP = SHARED_DATA / "blimp" / "blimp_filtered"
SWEEP_WEIGHTS = ((0.25, 0.75), (0.75, 0.25))
LOOP_STEPS, LOOP_PROCESSES, RSS_STEPS, RSS_REPEATS = 40, 5, 60, 3
CE, SINGLE = "CE baseline", "cached KD, gpt2 (64 draws)"
ENSEMBLE = "cached KD, ensemble (2 x 64 draws)"
TOPK, TOPK_ENSEMBLE = 64, "cached KD, ensemble of the two top-64 caches"
TOPK_SEQUENCES = 64
"""Validation rows the top-k mixture's loss is measured on."""


def settings(root: Path, data_dir: Path = DATA_DIR, *extra: str) -> list[str]:
    """Every setting the rows depend on, pinned."""
    teachers = ", ".join(f"{name}: {{architecture: {family}}}" for name, family in TEACHERS.items())
    return [f"run_dir={root}", f"data.dir={data_dir}", "data.seq_len=128", "tokenizer.kind=bpe",
            f"tokenizer.vocab_size={VOCAB}", f"teachers={{{teachers}}}",
            "teacher.from_scratch=true", "teacher.n_layer=4", "teacher.n_embd=128",
            "teacher.n_head=4", "teacher.epochs=1", "teacher.device=cpu",
            "cache.selection=sample", f"cache.k={DRAWS}",
            f"cache.sample_temperature={DRAW_TEMPERATURE}",
            "student.architecture=llama", "student.n_layer=2", "student.n_embd=64",
            "student.n_head=2", "student.dropout=0", "student.lr=2e-3", "student.batch_size=16",
            f"student.epochs={STUDENT_EPOCHS}", "student.warmup_steps=50", "student.eval_every=0",
            "student.checkpoint_every=0", "student.save_at_words=[]", "student.device=cpu",
            "distill.alpha=0.5", "distill.temperature=2.0", f"eval.minimal_pairs={BLIMP}",
            f"eval.max_pairs_per_file={PAIRS_PER_FILE}", *extra]


def members(weights: tuple[float, float] = (1.0, 1.0)) -> str:
    return "distill.teachers=[" + ", ".join(
        f"{{teacher: {name}, weight: {w}}}" for name, w in zip(TEACHERS, weights)) + "]"


def students(topk: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """Row name -> overrides; `topk`: each teacher's top-k cache, for the top-k ensemble row."""
    rows = {CE: ["distill.alpha=1"]}
    rows.update({f"cached KD, {name} (64 draws)": [f"distill.teachers=[{name}]"]
                 for name in TEACHERS})
    rows[ENSEMBLE] = [members()]
    rows.update({f"cached ensemble, weights {w[0]:g} / {w[1]:g}": [members(w)]
                 for w in SWEEP_WEIGHTS})
    if topk:
        rows[TOPK_ENSEMBLE] = ["distill.teachers=[" + ", ".join(
            f"{{cache: {path}}}" for path in topk.values()) + "]", "distill.run=kd-topk-mix"]
    rows["online ensemble, probability mixture"] = [members(), "distill.mode=online"]
    rows["online ensemble, logit average"] = [members(), "distill.mode=online",
                                              "distill.ensemble=logits"]
    return rows


def run(*, data_dir: Path = DATA_DIR, extra: tuple[str, ...] = (), root: Path | None = None,
        loop_processes: int = LOOP_PROCESSES, rss_repeats: int = RSS_REPEATS) -> list[dict]:
    """Build and train everything in a temporary directory (or `root`); rows of the tables.
    `extra` overrides go last (the tests shrink everything with them)."""
    from precompute.corpus import prepare
    from precompute.logits import cache_split, fill_caches
    from precompute.teacher import train_teacher
    from storage.cache import cache_bytes
    from student.evaluate import read_suites, score_pairs
    from student.train import train
    from training.metrics import read_metrics
    from training.models import load_teacher
    from training.tokenizer import load_tokenizer

    with work_dir(root, "ensemble") as tmp:
        base = settings(tmp / "run", data_dir, *extra)
        cfg = load_config(CONFIG_DIR / "demo.yaml", base)
        stores = prepare(cfg)
        rows, topk = [], {}
        for view in cfg.each_teacher():
            info = train_teacher(view)
            fill_caches(view)
            topk[view.teacher.name] = topk_cache(view, stores["train"], cache_split)
            tokens = _tokens(stores["train"])
            rows.append({"section": "teachers", "teacher": view.teacher.name,
                         "architecture": view.teacher.architecture,
                         "val_ppl": round(_teacher_ppl(info), 3),
                         "cache_bytes_per_token": round(
                             cache_bytes(view.cache_dir / "train.zarr") / tokens, 1),
                         "topk_cache_bytes_per_token": round(
                             cache_bytes(topk[view.teacher.name]) / tokens, 1)})
        rows += topk_mixture_rows(cfg, stores["val"])
        suites = read_suites(cfg.eval.minimal_pairs, max_pairs_per_file=cfg.eval.max_pairs_per_file)
        tokenizer = load_tokenizer(cfg.run_path)
        ppl, blimp = {}, {}
        for name, overrides in students(topk).items():
            run_cfg = load_config(CONFIG_DIR / "demo.yaml", [*base, *overrides])
            out = train(run_cfg)
            ppl[name] = read_metrics(out / "metrics.jsonl")[-1]["val_ppl"]
            (files,) = suites.values()
            blimp[name] = score_pairs(load_teacher(str(out)), tokenizer, files,
                                      conventions=("ours",))["ours"]["macro_accuracy"]
        online = ppl["online ensemble, probability mixture"]
        for name, value in ppl.items():
            rows.append({"section": "students (2 x 64 LLaMA)", "run": name,
                         "val_ppl": round(value, 3),
                         "vs_online_mixture_%": round(100 * (value / online - 1), 2),
                         "vs_ce_%": round(100 * (value / ppl[CE] - 1), 2),
                         "blimp_%": round(100 * blimp[name], 2)})
        loop_runs = {CE: ([*base, "distill.alpha=1"], False),
                     SINGLE: ([*base, "distill.teachers=[gpt2]"], False),
                     ENSEMBLE: ([*base, members()], False)}
        rows += loop_rows_in_processes(loop_runs, steps=LOOP_STEPS, processes=loop_processes)
        rows += rss_rows(loop_runs, repeats=rss_repeats)
        return rows


def topk_cache(view, tokens_path: Path, cache_split) -> Path:
    """The teacher of `view`'s top-TOPK cache (T = 1 and 2 stored) beside its sampled one."""
    from training.models import load_teacher, resolve_teacher, teacher_manifest

    source = resolve_teacher(view)
    model = load_teacher(source.model, device="cpu")
    path = view.run_path / "topk" / view.teacher.name / "train.zarr"
    topk_cfg = view.replace(**{"cache.selection": "topk", "cache.k": TOPK,
                               "cache.temperatures": [1.0, 2.0]})
    cache_split(model, source=source, teacher=teacher_manifest(source, dtype="fp32",
                                                               quantization="none"),
                tokens_path=tokens_path, cache_path=path, cfg=topk_cfg, device="cpu")
    return path


def topk_mixture_rows(cfg, val_path: Path, *, weights: tuple[float, float] = (0.5, 0.5)
                      ) -> list[dict]:
    """What an equal-weight mixture of the teachers' top-TOPK caches misses, per position on
    TOPK_SEQUENCES validation rows, from the teachers' full distributions at T = 1 and 2.

    The true mixture p = sum_i w_i p_i; the cached target holds, for each id of the union U of
    the heads, sum_i w_i p_i over the heads holding it, and 1 minus that in the tail bucket.
    Rows: the mean share of p in U, the mean mass of p on U the cache puts in the bucket (what
    lay in another teacher's tail), and KL(p || cached) over the buckets (U's ids and the rest),
    beside a single teacher's head mass."""
    import torch

    from storage.tokens import open_token_store
    from training.models import load_teacher

    store = open_token_store(val_path)
    rows = store.read(0, min(TOPK_SEQUENCES, store.n_sequences))
    tokens = torch.from_numpy(rows.astype("int64"))
    teachers = [load_teacher(str(view.teacher_dir)) for view in cfg.each_teacher()]
    with torch.no_grad():
        logits = [torch.cat([t(input_ids=batch).logits.float() for batch in tokens.split(16)])
                  for t in teachers]
    out = []
    for temperature in (1.0, 2.0):
        probs = [torch.softmax(z / temperature, -1) for z in logits]
        heads = [torch.zeros_like(p).scatter_(-1, z.topk(TOPK, -1).indices, 1.0)
                 for p, z in zip(probs, logits)]
        union = torch.clamp(heads[0] + heads[1], max=1.0)
        mixture = sum(w * p for w, p in zip(weights, probs))
        cached = sum(w * p * head for w, p, head in zip(weights, probs, heads))
        true_union, cached_union = (mixture * union).sum(-1), cached.sum(-1)
        kl = ((mixture * union) * torch.log((mixture * union).clamp(min=1e-30)
                                            / cached.clamp(min=1e-30))).sum(-1) \
            + (1 - true_union) * torch.log((1 - true_union).clamp(min=1e-30)
                                           / (1 - cached_union).clamp(min=1e-30))
        out.append({"section": f"top-{TOPK} mixture: what the caches cannot know "
                               f"({TOPK_SEQUENCES} validation rows)", "T": temperature,
                    "head_mass_gpt2": round(float((probs[0] * heads[0]).sum(-1).mean()), 4),
                    "head_mass_llama": round(float((probs[1] * heads[1]).sum(-1).mean()), 4),
                    "union_ids": round(float(union.sum(-1).mean()), 1),
                    "mixture_mass_on_union": round(float(true_union.mean()), 4),
                    "mass_in_a_tail_%": round(100 * float((true_union - cached_union).mean()), 3),
                    "kl_nats_per_token": round(float(kl.mean()), 5)})
    return out


def _tokens(path: Path) -> int:
    from storage.tokens import open_token_store

    store = open_token_store(path)
    return store.n_sequences * store.seq_len


def _teacher_ppl(teacher_dir: Path) -> float:
    import json

    return json.loads((teacher_dir / "teacher.json").read_text())["val"]["perplexity"]


def rss_worker(settings: list[str], steps: int) -> None:
    """One training run of `steps` steps in this process on one torch thread; prints the peak
    RSS as a JSON line."""
    import json

    import torch

    from student.train import train

    torch.set_num_threads(1)
    cfg = load_config(CONFIG_DIR / "demo.yaml", [*settings, f"student.max_steps={steps}",
                                                 "student.eval_every=0"])
    cfg = cfg.replace(**{"distill.run": f"rss-{cfg.distill.alpha}-{len(cfg.distill.teachers)}-"
                                        f"{_proc_status('VmRSS')}"})
    train(cfg)
    print(json.dumps({"process_peak_rss_mb": _proc_status("VmHWM") / 1024}))


def rss_rows(runs: dict[str, tuple[list[str], bool]], *, repeats: int) -> list[dict]:
    """Peak RSS of a whole training process per run (fresh processes, interleaved; median),
    each against the first run's (the CE baseline)."""
    peaks = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run_settings, _) in runs.items():
            peaks[name].append(_subprocess_call("rss_worker", run_settings, RSS_STEPS,
                                                module="bench.ensemble")["process_peak_rss_mb"])
    median = {name: statistics.median(values) for name, values in peaks.items()}
    return [{"section": f"memory (peak RSS of a training process, median of {repeats})",
             "run": name, "process_peak_rss_mb": round(value, 1),
             "rss_vs_ce": round(value / median[next(iter(runs))], 3)}
            for name, value in median.items()]


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per section."""
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    print(markdown(run()))

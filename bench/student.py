"""Student trainer benchmark: speed, memory and quality of cached KD against CE and online KD.

Everything is built in a temporary run directory in a few minutes on a CPU: a synthetic language
(first-order Markov chain, V = 512, seq 64), a teacher (4 x 128, ~6x the student's parameters)
trained with the same loop, its top-64 logit caches (float16 and gap8, T = 1, 2, 4) and caches of
64 and 128 draws from its softmax at T = 2 (gap8), then the same 2 x 64 student trained by
`student.train.train` in every mode. The speed and memory rows' top-64 cache is the gap8 one
(the configs' value code: what `make teacher-logits` writes); the speed rows time the float16
one too.

  step     forward + backward + AdamW on one batch, the modes interleaved in one process
           (fastest of 30): the cost of the loss itself, without reading the cache.
  loop     the training loop's own step (`training.loop.train_step`: reading the batch, forward,
           loss, backward, clipping, AdamW), CE and KD from the top-64, the 64-draw and the
           128-draw caches alternating step by step in one process (median step), in seven
           fresh processes (the median of their ratios): the speed ratio that the machine's
           noise leaves alone.
  speed    tokens/s of the real training loop (median step, one thread, each mode in its own
           subprocess, run three times interleaved; the best), CE = 1; that subprocess's peak
           RSS (VmHWM, /proc; the median of the three), whole and as growth from just before
           training (VmHWM - VmRSS): the whole is what a machine must hold, the growth isolates
           what training adds.
  quality  final validation perplexity after the same steps and seed: cached KD over k and over
           the stored temperatures, gap8 vs float16, KD from 64 sampled entries (drawn at T = 2)
           at T = 1 and 2 and from 128 at T = 2, against online full-vocabulary KD and CE.

`python -m bench.student [--steps N]` prints the table; `run(...)` returns its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench import sibling_run, work_dir
from bench.tables import markdown_sections
from configs import CONFIG_DIR, Config, load_config
from storage.tokens import open_token_store, write_token_store

VOCAB, SEQ_LEN = 512, 64
STUDENT = dict(n_layer=2, n_embd=64, n_head=2)
SMALL_STUDENT = dict(n_layer=4, n_embd=256, n_head=4)
"""Speed rows only: a student whose step dwarfs reading the cache."""
TEACHER = dict(n_layer=4, n_embd=128, n_head=4)
TEMPERATURES = (1.0, 2.0, 4.0)
CACHE_K = 64
SAMPLES = (CACHE_K, 2 * CACHE_K)
"""Draws per position of the sampled caches: the second shows what twice the entries buy."""
CACHED_KD, FLOAT16_KD = "cached KD (k=64, T=2)", "cached KD (k=64, T=2), float16"
"""The speed rows' names for KD from the top-64 caches: gap8 (the configs' value code, what
`make teacher-logits` writes) and float16."""
SAMPLED_KD, MORE_SAMPLED_KD = (f"KD from {m} draws (T=2)" for m in SAMPLES)
"""The speed rows' names for KD from the sampled caches."""
MORE_DRAWS = (f"cache.k={SAMPLES[1]}", f"distill.k={SAMPLES[1]}")
"""Overrides that read all the draws of the larger sampled cache (the configs' k is 64)."""
LOOP_PROCESSES = 7
"""Fresh processes the loop rows run in, each row's ratio the median of theirs: one process's
ratios stray from the next's by a good part of the target's 5% margin (docs/log.md); the median
of seven strays less than one process."""


def markov_tokens(n: int, *, seed: int, vocab: int = VOCAB, seq_len: int = SEQ_LEN) -> np.ndarray:
    """(n, seq_len) sequences of a fixed random first-order Markov chain: each token has 8
    Zipf-weighted successors, plus 10% uniform noise. A tiny model learns it in a few hundred
    steps, a larger one trained longer learns it better: the teacher has something to teach."""
    successors = np.random.default_rng(1234).integers(0, vocab, (vocab, 8))
    weights = 1.0 / np.arange(1, 9)
    rng = np.random.default_rng(seed)
    rows = np.empty((n, seq_len), dtype=np.int64)
    rows[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, seq_len):
        pick = rng.choice(8, size=n, p=weights / weights.sum())
        rows[:, t] = successors[rows[:, t - 1], pick]
        noise = rng.random(n) < 0.1
        rows[noise, t] = rng.integers(0, vocab, int(noise.sum()))
    return rows


def overrides(root: Path, *extra: str) -> list[str]:
    """Every setting the rows depend on, pinned here: demo.yaml is tuned for the demo corpus and
    changes, and a row named "T=2" must run at T = 2 whatever demo.yaml's distill.temperature."""
    s, t = STUDENT, TEACHER
    return [f"run_dir={root}", f"data.seq_len={SEQ_LEN}", "student.device=cpu",
            "distill.mode=cached", "distill.alpha=0.5", "distill.temperature=2.0",
            f"student.n_layer={s['n_layer']}", f"student.n_embd={s['n_embd']}",
            f"student.n_head={s['n_head']}", "student.dropout=0", "student.batch_size=16",
            "student.lr=3e-3", "student.warmup_steps=20", "student.eval_every=0",
            "student.checkpoint_every=0", "student.save_at_words=[]", f"cache.k={CACHE_K}",
            f"cache.temperatures=[{', '.join(map(str, TEMPERATURES))}]",
            "teacher.from_scratch=false", f"teacher.model={root / 'teacher'}",
            f"teacher.n_layer={t['n_layer']}", f"teacher.n_embd={t['n_embd']}",
            f"teacher.n_head={t['n_head']}", "teacher.device=cpu", "teacher.batch_size=16",
            "teacher.grad_accum=1", "teacher.lr=3e-3", "teacher.warmup_steps=20",
            "teacher.eval_every=0", "teacher.checkpoint_every=0", *extra]


def sibling(root: Path, kind: str) -> Path:
    """The run directory `build` makes beside `root` for its `kind` ('gap8', 'sampled-64', ...)
    cache."""
    return root.with_name(f"{root.name}-{kind}")


def build(root: Path, *, teacher_steps: int) -> dict:
    """Token stores, a trained teacher and its float16 cache in `root`, and sibling runs sharing
    them: `root`-gap8 with a gap8 cache, `root`-sampled-<m> with caches of m draws per position
    at T = 2 (m in SAMPLES). Returns the teacher's val perplexity."""
    from transformers import AutoModelForCausalLM

    from precompute.logits import Sampling, write_cache
    from training.metrics import read_metrics

    build_language(root, teacher_steps=teacher_steps)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    store = open_token_store(root / "tokens" / "train.zarr")
    caches = [(root, "float16", CACHE_K, None),
              (sibling_run(root, sibling(root, "gap8")), "gap8", CACHE_K, None)]
    caches += [(sibling_run(root, sibling(root, f"sampled-{m}")), "gap8", m,
                Sampling(temperature=2.0, seed=0)) for m in SAMPLES]
    for run_dir, code, k, sampling in caches:
        write_cache(teacher, store=store, cache_path=run_dir / "cache" / "train.zarr",
                    teacher={"name": "bench"}, k=k, temperatures=TEMPERATURES,
                    sampling=sampling, value_code=code, progress=False)
    val_rows = [r for r in read_metrics(root / "teacher" / "metrics.jsonl") if "val_ppl" in r]
    return {"teacher_val_ppl": val_rows[-1]["val_ppl"],
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


def build_language(root: Path, *, teacher_steps: int) -> None:
    """The synthetic language's token stores and its teacher, trained, in `root`."""
    from training.loop import fit, open_tokens
    from training.models import new_model
    from training.tokenizer import fingerprint, synthetic_tokenizer

    tokenizer = synthetic_tokenizer(VOCAB)  # the ids stand for no text
    tokenizer.save_pretrained(str(root / "tokenizer"))
    manifest = {"tokenizer": {"fingerprint": fingerprint(tokenizer), "vocab_size": VOCAB,
                              "eos_id": 0}}
    for split, n, seed in (("train", 2048, 1), ("val", 128, 2)):
        write_token_store(root / "tokens" / f"{split}.zarr",
                          sequences=markov_tokens(n, seed=seed), manifest=manifest)
    cfg = load_config(CONFIG_DIR / "demo.yaml", overrides(root, f"teacher.max_steps={teacher_steps}"))
    tokens, val = open_tokens(cfg)
    model = new_model(vocab_size=VOCAB, n_positions=SEQ_LEN, seed=1, **TEACHER)
    fit(model, cfg=cfg, hp=cfg.teacher, out_dir=root / "teacher", tokens=tokens, val_tokens=val)


def worker(root: str, extra: list[str]) -> None:
    """One training run in this process; prints a JSON line: tokens/s (median step), the peak
    RSS and its growth from just before training."""
    torch.set_num_threads(1)
    from student.train import train
    from training.metrics import read_metrics

    cfg = load_config(CONFIG_DIR / "demo.yaml", overrides(Path(root), *extra))
    before = _proc_status("VmRSS")
    out = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    steady = [r["tokens_per_s"] for r in rows[5:] if "val_loss" not in r] or [rows[-1]["tokens_per_s"]]
    print(json.dumps({"tokens_per_s": statistics.median(steady),
                      "peak_rss_mb": (_proc_status("VmHWM") - before) / 1024,
                      "process_peak_rss_mb": _proc_status("VmHWM") / 1024,
                      "val_ppl": rows[-1].get("val_ppl")}))


def _proc_status(key: str) -> int:
    """A kB field of /proc/self/status (VmRSS now, VmHWM the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def loop_worker(runs: dict[str, tuple[list[str], bool]], steps: int) -> None:
    """loop_rows of `runs` (name -> (demo.yaml overrides, torch_ops)) in this process, on one
    torch thread; prints them as JSON."""
    torch.set_num_threads(1)
    resolved = {name: (load_config(CONFIG_DIR / "demo.yaml", settings), torch_ops)
                for name, (settings, torch_ops) in runs.items()}
    print(json.dumps(loop_rows(resolved, steps=steps)))


def _subprocess_call(function: str, *args, module: str = "bench.student"):
    """`module`'s `function`(*args) in a fresh process: what its last line of JSON says."""
    code = (f"import sys, json; from {module} import {function}; "
            f"{function}(*json.loads(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(*, steps: int = 200, speed_steps: int = 40, teacher_steps: int = 400,
        root: Path | None = None) -> list[dict]:
    """Build everything in a temporary directory (or `root`) and measure; rows of the table.
    Students train on one torch thread here as in the speed subprocesses (restored after)."""
    threads = torch.get_num_threads()
    with work_dir(root, "student") as tmp:
        try:
            base = tmp / "run"
            facts = build(base, teacher_steps=teacher_steps)
            torch.set_num_threads(1)
            rows = step_rows(base)
            rows += loop_rows_in_processes(loop_runs(base, STUDENT, sampled=True, torch_ops=True),
                                           steps=120)
            rows += loop_rows_in_processes(loop_runs(base, SMALL_STUDENT), steps=30)
            rows += speed_rows(base, speed_steps)
            rows += quality_rows(base, steps, facts)
            return rows
        finally:
            torch.set_num_threads(threads)


def step_rows(root: Path, repeats: int = 30) -> list[dict]:
    """The loss side alone: forward + backward + AdamW on one pre-read batch, the three modes
    interleaved in this process in rotating order (fastest of `repeats`), no data reading."""
    import time

    from storage.reader import stream_batches
    from student.train import distillation
    from training.loop import batch_losses, make_optimizer, open_tokens
    from training.models import new_model

    cfg = load_config(CONFIG_DIR / "demo.yaml", overrides(root))
    tokens, _ = open_tokens(cfg)
    gap8 = load_config(CONFIG_DIR / "demo.yaml", overrides(sibling(root, "gap8")))
    cached = distillation(gap8, tokens, vocab_size=VOCAB)
    online = distillation(cfg.replace(**{"distill.mode": "online"}), tokens, vocab_size=VOCAB)
    batch = next(stream_batches(tokens=tokens, caches=cached.caches, batch_size=16, seed=0, epoch=0))
    model = new_model(vocab_size=VOCAB, n_positions=SEQ_LEN, **STUDENT)
    optimizer = make_optimizer(model, cfg.student)
    modes = {"CE baseline": None, CACHED_KD: cached, "online KD (T=2)": online}
    seconds = {mode: [] for mode in modes}
    order = list(modes)
    for repeat in range(repeats):
        # rotated, so no mode always follows online KD, whose teacher forward cools the caches
        for mode in order[repeat % len(order):] + order[:repeat % len(order)]:
            distil = modes[mode]
            started = time.perf_counter()
            batch_losses(model, batch, distil, device=torch.device("cpu"), amp_dtype=None).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[mode].append(time.perf_counter() - started)
    n_tokens = batch.tokens.shape[0] * (batch.tokens.shape[1] - 1)
    fastest = {mode: min(times) for mode, times in seconds.items()}
    return [{"section": "step (one batch, no reading, interleaved)", "run": mode,
             "tokens_per_s": round(n_tokens / t), "vs_ce": round(fastest["CE baseline"] / t, 3)}
            for mode, t in fastest.items()]


def loop_rows(runs: dict[str, tuple[Config, bool]], *, steps: int, warmup: int = 5
              ) -> list[dict]:
    """The training step as the loop runs it, the runs alternating step by step in this process
    (median of `steps` steps each). Separate processes run at speeds of their own, so ratios of
    two subprocesses (speed_rows) are noisy; here every run shares one process, and one student
    and optimizer (the first run's), since even in one process two copies of the same model
    step at speeds apart by about what the loss costs (their memory's placement; docs/log.md).
    runs: name -> (its resolved config, whether the loss runs as torch ops instead of the C
    kernel: training.native); the first is the CE baseline every ratio is against."""
    import contextlib
    import time

    from student.train import distillation
    from training.loop import Cursor, make_optimizer, micro_batches, open_tokens, train_step
    from training.models import new_model_of
    from training.native import torch_ops_only

    cpu = torch.device("cpu")
    first = next(iter(runs.values()))[0]
    tokens, _ = open_tokens(first)
    hp = first.student
    model = new_model_of(hp, vocab_size=tokens.vocab_size, eos_token_id=0)
    optimizer = make_optimizer(model, hp)
    prepared = {}
    for name, (cfg, _) in runs.items():
        if cfg.student != hp:
            raise ValueError(f"loop_rows: {name} trains another student than {next(iter(runs))}")
        tokens, _ = open_tokens(cfg)
        distil = distillation(cfg, tokens, vocab_size=tokens.vocab_size)
        cursor = Cursor()
        data = micro_batches(tokens, distil, hp=hp, micro=hp.batch_size, cursor=cursor, rank=0,
                             world_size=1, prefetch=0)
        prepared[name] = (data, distil, cursor)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    tokens_per_s = {name: [] for name in runs}
    order = list(prepared)
    for step in range(warmup + steps):
        # rotated, so that no run always follows the same one (and inherits its cache state)
        for name in order[step % len(order):] + order[:step % len(order)]:
            data, distil, cursor = prepared[name]
            with torch_ops_only() if runs[name][1] else contextlib.nullcontext():
                started = time.perf_counter()
                row = train_step(model, optimizer, scaler, data, distil, hp=hp, cursor=cursor,
                                 device=cpu, amp_dtype=None, world_size=1)
                seconds = time.perf_counter() - started
            if step >= warmup:
                tokens_per_s[name].append(row["step_tokens"] / seconds)
    median = {name: statistics.median(values) for name, values in tokens_per_s.items()}
    baseline = median[next(iter(runs))]
    return [{"section": "loop (training step with reading, alternating in one process)",
             "student": shape_name(vars(runs[name][0].student)), "run": name,
             "tokens_per_s": round(value), "vs_ce": round(value / baseline, 3)}
            for name, value in median.items()]


def loop_rows_in_processes(runs: dict[str, tuple[list[str], bool]], *, steps: int,
                           processes: int = LOOP_PROCESSES) -> list[dict]:
    """loop_rows of `runs` (name -> (demo.yaml overrides, torch_ops)) in `processes` fresh
    processes one after another: each row's tokens/s and ratio to CE the median of theirs, with
    the ratios' range."""
    results = [_subprocess_call("loop_worker", runs, steps) for _ in range(processes)]
    rows = []
    for same_run in zip(*results):
        ratios = [row["vs_ce"] for row in same_run]
        rows.append({**same_run[0], "section": "loop (training step with reading, alternating in "
                                               f"one process; median of {processes} processes)",
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in same_run)),
                     "vs_ce": statistics.median(ratios),
                     "vs_ce_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
                     "processes": processes})
    return rows


def loop_runs(root: Path, student: dict, *, sampled: bool = False,
              torch_ops: bool = False) -> dict[str, tuple[list[str], bool]]:
    """loop_rows_in_processes's runs for `student`: CE and KD from the top-64 gap8 cache beside
    `root`; sampled: KD from the draws of its siblings; torch_ops: CE and top-k KD again with the
    loss as torch ops."""
    shape = [f"student.{key}={value}" for key, value in student.items()]

    def settings(run_dir: Path, *extra: str) -> list[str]:
        return overrides(run_dir, *shape, *extra)

    runs = {"CE baseline": (settings(root, "distill.alpha=1"), False),
            CACHED_KD: (settings(sibling(root, "gap8")), False)}
    if sampled:
        runs[SAMPLED_KD] = (settings(sibling(root, f"sampled-{SAMPLES[0]}")), False)
        runs[MORE_SAMPLED_KD] = (settings(sibling(root, f"sampled-{SAMPLES[1]}"), *MORE_DRAWS),
                                 False)
    if torch_ops:
        runs.update({"CE baseline, loss as torch ops": (settings(root, "distill.alpha=1"), True),
                     f"{CACHED_KD}, loss as torch ops": (settings(sibling(root, "gap8")), True)})
    return runs


def speed_rows(root: Path, steps: int) -> list[dict]:
    """The training loop's speed and memory, for the tiny student (from every cache and against
    online KD too: the teacher is ~6x its size) and for a small one, where the step outweighs
    reading the cache."""
    students = {shape_name(STUDENT): STUDENT, shape_name(SMALL_STUDENT): SMALL_STUDENT}
    modes = {"CE baseline": (root, ["distill.alpha=1"]), CACHED_KD: (sibling(root, "gap8"), []),
             FLOAT16_KD: (root, []), SAMPLED_KD: (sibling(root, f"sampled-{SAMPLES[0]}"), []),
             MORE_SAMPLED_KD: (sibling(root, f"sampled-{SAMPLES[1]}"), list(MORE_DRAWS)),
             "online KD (T=2)": (root, ["distill.mode=online"])}
    runs = [(shape, mode) for shape in students for mode in modes
            if shape == shape_name(STUDENT) or mode in ("CE baseline", CACHED_KD)]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for repeat in range(3):  # interleaved, so a load spike on the shared CPU hits all modes
        for i, (shape, mode) in enumerate(runs):
            student = [f"student.{key}={value}" for key, value in students[shape].items()]
            run_dir, extra = modes[mode]
            results[shape, mode].append(_subprocess_call(
                "worker", str(run_dir), [*extra, *student, f"student.max_steps={steps}",
                                         f"distill.run=speed-{repeat}-{i}"]))
    # speed: the fastest of the repeats (the least disturbed); memory: their median
    summary = {run: {key: (max if key == "tokens_per_s" else statistics.median)(r[key] for r in rs)
                     for key in ("tokens_per_s", "process_peak_rss_mb", "peak_rss_mb")}
               for run, rs in results.items()}
    rows = []
    for (shape, mode), result in summary.items():
        ce = summary[shape, "CE baseline"]
        rows.append({"section": "speed", "student": shape, "run": mode,
                     "tokens_per_s": round(result["tokens_per_s"]),
                     "vs_ce": round(result["tokens_per_s"] / ce["tokens_per_s"], 3),
                     "process_peak_rss_mb": round(result["process_peak_rss_mb"], 1),
                     "process_rss_vs_ce": round(result["process_peak_rss_mb"]
                                                / ce["process_peak_rss_mb"], 3),
                     "peak_rss_mb": round(result["peak_rss_mb"], 1),
                     "rss_vs_ce": round(result["peak_rss_mb"] / max(ce["peak_rss_mb"], 1e-9), 2)})
    tiny = shape_name(STUDENT)
    rows[1]["speedup_vs_online"] = round(summary[tiny, CACHED_KD]["tokens_per_s"]
                                         / summary[tiny, "online KD (T=2)"]["tokens_per_s"], 2)
    return rows


def shape_name(model: dict) -> str:
    """'2x64': layers x width."""
    return f"{model['n_layer']}x{model['n_embd']}"


def quality_rows(root: Path, steps: int, facts: dict) -> list[dict]:
    """Final val perplexity of the same student (same steps and seed) in every mode."""
    from student.train import train
    from training.metrics import read_metrics

    runs = [("CE baseline", root, [])]
    runs += [(f"online KD T={t:g}", root, ["distill.mode=online", f"distill.temperature={t}"])
             for t in (1.0, 2.0)]
    runs += [(f"cached KD k={k} T=2", root, [f"distill.k={k}"]) for k in (4, 8, 16, 32, 64)]
    runs += [(f"cached KD k=64 T={t:g}", root, [f"distill.temperature={t}"]) for t in (1.0, 4.0)]
    runs += [("cached KD k=64 T=2 gap8", sibling(root, "gap8"), [])]
    sampled, more = (sibling(root, f"sampled-{m}") for m in SAMPLES)
    runs += [(f"sampled KD m={SAMPLES[0]} T={t:g}", sampled, [f"distill.temperature={t}"])
             for t in (1.0, 2.0)]
    runs += [(f"sampled KD m={SAMPLES[1]} T=2", more, list(MORE_DRAWS))]
    ppl = {}
    for name, run_dir, extra in runs:
        alpha = 1 if name == "CE baseline" else 0.5
        cfg = load_config(CONFIG_DIR / "demo.yaml", overrides(
            run_dir, f"distill.alpha={alpha}", *extra, f"student.max_steps={steps}",
            f"distill.run=q-{name.replace(' ', '_')}"))
        out = train(cfg)
        ppl[name] = read_metrics(out / "metrics.jsonl")[-1]["val_ppl"]
    rows = [{"section": "quality", "run": "teacher (4x128, trained longer)",
             "val_ppl": round(facts["teacher_val_ppl"], 3)}]
    for name, value in ppl.items():
        reference = (ppl.get(f"online KD T={name.split('T=')[1].split()[0]}")
                     if name.startswith(("cached", "sampled")) else None)
        rows.append({"section": "quality", "run": name, "val_ppl": round(value, 3),
                     "vs_online_%": round(100 * (value / reference - 1), 2) if reference else None,
                     "vs_ce_%": round(100 * (value / ppl["CE baseline"] - 1), 2)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per section."""
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="student steps for quality rows")
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--teacher-steps", type=int, default=400)
    args = parser.parse_args()
    print(markdown(run(steps=args.steps, speed_steps=args.speed_steps,
                       teacher_steps=args.teacher_steps)))

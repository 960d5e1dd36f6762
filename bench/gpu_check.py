"""One-shot GPU check (H100/H200) of the paths that only a GPU exercises. Needs no network: the
teacher (GPT-2 Large shape, 36 x 1280, vocab 50257, random weights) and the token stores are
made in-process under a temporary folder. Finishes in a few minutes.

Sections, each reported as table rows (a failing one becomes a FAILED row and the rest go on):
  * teacher-logits job (`precompute.logits.cache_split`, the path `make teacher-logits` runs)
    with the fp16 teacher (top-k, sampled entries and counted draws at vocab 50257, with their
    bytes/token) and the 4-bit NF4 teacher: tokens/s of the bare forward, of forward +
    selection (+ logsumexp), and of the job; then the cache checked against a direct forward.
  * teacher fine-tuning (`precompute.teacher.train_teacher`) by QLoRA and LoRA for a few steps
    under bf16 autocast: tokens/s and max_memory_allocated; then the logits job on the result
    (the NF4 base plus the adapter; the merged LoRA model), checked the same way.
  * students of GPT-2 Small's shape (12 x 768) trained the same steps from the same seed under
    bf16 autocast: the CE baseline, cached KD from the top-k, the sampled and the counted-draws
    cache, and online KD with the fp16 teacher resident: tokens/s and max_memory_allocated, and
    the ratios the student issue asks for (cached over CE, cached over online).

    python -m bench.gpu_check            # on the GPU machine; table also to $OUT/gpu_check.md
    python -m bench.gpu_check --quick    # only the fp16 jobs, the fused loss and the students
    python -m bench.gpu_check --loss     # only the fused loss
    python -m bench.gpu_check --tiny     # tiny shapes on the CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.tables import markdown_table
from configs import CONFIG_DIR, load_config


@dataclass(frozen=True)
class Shapes:
    teacher: tuple[int, int, int]  # layers, width, heads
    student: tuple[int, int, int]
    vocab: int
    seq_len: int
    sequences: int
    batch: int
    k: int
    student_steps: int
    student_batch: int
    student_rounds: int
    finetune_steps: int


FULL = Shapes(teacher=(36, 1280, 20), student=(12, 768, 12), vocab=50257, seq_len=128,
              sequences=2048, batch=64, k=64, student_steps=60, student_batch=32,
              student_rounds=4, finetune_steps=20)
TINY = Shapes(teacher=(2, 64, 2), student=(2, 64, 2), vocab=320, seq_len=32, sequences=64,
              batch=16, k=8, student_steps=8, student_batch=8, student_rounds=2,
              finetune_steps=3)
SAMPLE_TEMPERATURE = 2.0
COUNTED_DRAWS = ("cache.selection=draws", "cache.temperatures=[1.0, 2.0]", "cache.draws=[16, 48]")
"""The counted-draws cache configs/babylm-gpt2.yaml ships (bench.draws measures it on CPUs)."""
STUDENT_MODES = {  # name -> config overrides; the student's T is the sampled cache's
    "CE baseline": ("distill.alpha=1",),
    "cached KD, top-k": ("distill.alpha=0.5",),
    "cached KD, sampled": ("distill.alpha=0.5",),
    "cached KD, counted draws": ("distill.alpha=0.5",),
    "online KD": ("distill.alpha=0.5", "distill.mode=online"),
    "CE baseline, eager loss": ("distill.alpha=1",),
    "cached KD, top-k, eager loss": ("distill.alpha=0.5",),
}
EAGER = ", eager loss"
"""Modes named with it run the fused loss's torch ops eagerly (BABYLM_KD_COMPILE=0), the others
through torch.compile; each is compared with the CE baseline that runs its loss the same way."""


def run(*, tiny: bool = False, quick: bool = False, loss: bool = False) -> list[dict]:
    """Rows {check, value, unit, note}; a failing section becomes a row saying why. `quick`:
    only the fp16 jobs, the fused loss and the students; `loss`: only the fused loss."""
    shapes = TINY if tiny else FULL
    device = "cpu" if tiny else "cuda"
    rows = [{"check": "device", "value": _device_name(device), "unit": "",
             "note": f"torch {torch.__version__}, transformers {_version('transformers')}, "
                     f"bitsandbytes {_version('bitsandbytes')}, peft {_version('peft')}"}]
    if loss:
        return rows + _section("fused loss", lambda: loss_rows(shapes, device))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        teacher_dir = make_teacher(root / "teacher", shapes, device)
        rows.append({"check": "setup: random teacher saved (fp16)", "value":
                     round(time.perf_counter() - started, 1), "unit": "s", "note": str(shapes.teacher)})
        jobs = {"fp16": ("fp16", "none", ()),
                "fp16 sampled": ("fp16", "none", ("cache.selection=sample",
                                                  f"cache.sample_temperature={SAMPLE_TEMPERATURE}")),
                "fp16 counted draws": ("fp16", "none", COUNTED_DRAWS),
                "nf4": ("fp16", "4bit", ())}
        if quick:
            del jobs["nf4"]
        for name, (dtype, quantization, extra) in jobs.items():
            rows += _section(f"teacher {name}", lambda: teacher_rows(
                root / name, teacher_dir, shapes, device, name=name, dtype=dtype,
                quantization=quantization, extra=extra))
        for method, quantization in () if quick else (("qlora", "4bit"), ("lora", "none")):
            rows += _section(f"{method} fine-tune", lambda: finetune_rows(
                root / method, teacher_dir, shapes, device, method=method) + teacher_rows(
                root / method, teacher_dir, shapes, device, name=f"{method}-tuned",
                dtype="fp16", quantization=quantization))
        rows += _section("fused loss", lambda: loss_rows(shapes, device))
        rows += _section("students", lambda: student_rows(root, teacher_dir, shapes, device))
    return rows


def _section(name: str, body) -> list[dict]:
    """body()'s rows, printed as they come (a run cut short still shows them)."""
    try:
        rows = body()
    except Exception as exc:  # noqa: BLE001 -- report and go on with the other sections
        traceback.print_exc()
        rows = [{"check": f"{name}: FAILED", "value": "", "unit": "",
                 "note": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}]
    print(markdown(rows), flush=True)
    return rows


def make_teacher(folder: Path, shapes: Shapes, device: str) -> Path:
    """A GPT-2 of the teacher's shape with random weights (initialised on the device: fast),
    saved in fp16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = shapes.teacher
    config = GPT2Config(vocab_size=shapes.vocab, n_positions=shapes.seq_len, n_embd=width,
                        n_layer=layers, n_head=heads, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model.half().save_pretrained(folder)
    model = None  # the teacher leaves GPU memory before the next section
    _free(device)
    return folder


def make_run(run: Path, shapes: Shapes) -> None:
    """Random token stores (train, val) and their tokenizer in `run`, unless it has them."""
    from storage.tokens import write_token_store
    from training.tokenizer import fingerprint, synthetic_tokenizer

    if (run / "tokens" / "train.zarr").exists():
        return
    tokenizer = synthetic_tokenizer(shapes.vocab)  # the ids stand for no text
    tokenizer.save_pretrained(str(run / "tokenizer"))
    rng = np.random.default_rng(0)
    for split, n in (("train", shapes.sequences), ("val", max(shapes.student_batch, 64))):
        write_token_store(run / "tokens" / f"{split}.zarr",
                          sequences=rng.integers(0, shapes.vocab, (n, shapes.seq_len)),
                          manifest={"tokenizer": {"fingerprint": fingerprint(tokenizer),
                                                  "eos_id": 0, "vocab_size": shapes.vocab}})


def config(run: Path, teacher_dir: Path, shapes: Shapes, *extra: str):
    return load_config(CONFIG_DIR / "demo.yaml", [
        f"run_dir={run}", f"data.seq_len={shapes.seq_len}", "teacher.from_scratch=false",
        f"teacher.model={teacher_dir}", f"cache.k={shapes.k}", f"cache.batch_size={shapes.batch}",
        "cache.chunk_sequences=32", "cache.shard_chunks=8", "student.save_at_words=[]",
        *extra])


def teacher_rows(run: Path, teacher_dir: Path, shapes: Shapes, device: str, *, name: str,
                 dtype: str, quantization: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """The logits job with the teacher `resolve_teacher` finds for `run` (a fine-tuned one when
    `run` has it), timed against the forward alone, and its cache checked."""
    from precompute.logits import CountedDraws, cache_split, sampling_of, teacher_topk
    from storage.cache import open_cache
    from storage.tokens import open_token_store
    from training.models import load_teacher, resolve_teacher, teacher_manifest

    make_run(run, shapes)
    cfg = config(run, teacher_dir, shapes, f"teacher.dtype={dtype}",
                 f"teacher.quantization={quantization}", f"teacher.device={device}", *extra)
    c = cfg.cache
    sampling = sampling_of(c)
    started = time.perf_counter()
    source = resolve_teacher(cfg)
    model = load_teacher(source.model, adapter=source.adapter, dtype=dtype,
                         quantization=quantization, device=device)
    load_s = time.perf_counter() - started
    store = open_token_store(run / "tokens" / "train.zarr")
    rows_ids = torch.from_numpy(store.read(0, store.n_sequences).astype(np.int64))
    temperatures = tuple(cfg.cache.temperatures)

    def rate(fn, batches: int) -> float:
        batch_list = [rows_ids[i * shapes.batch:(i + 1) * shapes.batch].to(device)
                      for i in range(batches)]
        with torch.inference_mode():
            fn(batch_list[0])
            _sync(device)
            begin = time.perf_counter()
            for batch in batch_list:
                fn(batch)
            _sync(device)
        return batches * shapes.batch * shapes.seq_len / (time.perf_counter() - begin)

    n_timed = min(8, shapes.sequences // shapes.batch)
    forward = rate(lambda b: model(input_ids=b, use_cache=False).logits, n_timed)
    select = rate(lambda b: teacher_topk(model, b, k=shapes.k, temperatures=temperatures,
                                         sampling=sampling), n_timed)
    teacher = teacher_manifest(source, dtype=dtype, quantization=quantization)
    _reset_peak(device)
    summary = cache_split(model, source=source, teacher=teacher, tokens_path=store.path,
                          cache_path=run / "cache" / "train.zarr", cfg=cfg,
                          device=torch.device(device))
    job = summary["tokens"] / summary["seconds"]
    peak = _peak_gb(device)

    cache = open_cache(run / "cache" / "train.zarr", token_store=store)
    with torch.inference_mode():
        logits = model(input_ids=rows_ids[:shapes.batch].to(device),
                       attention_mask=torch.ones_like(rows_ids[:shapes.batch]).to(device)
                       ).logits.float().cpu()
    model = None  # the teacher leaves GPU memory before the next section
    _free(device)
    if isinstance(sampling, CountedDraws):
        ok, check = check_counted(cache, logits, batch=shapes.batch)
    else:
        ok, check = (check_sampled if sampling else check_topk)(
            cache.read(0, shapes.batch), logits, k=shapes.k, temperatures=temperatures)
    what = {"topk": "top-k+lse", "sample": "draws+lse", "draws": "counted draws"}[c.selection]
    return [
        {"check": f"teacher {name}: load", "value": round(load_s, 1), "unit": "s",
         "note": f"{'x'.join(map(str, shapes.teacher[:2]))}, vocab {shapes.vocab}"
                 + (", + LoRA adapter" if source.adapter else "")},
        {"check": f"teacher {name}: forward", "value": round(forward), "unit": "tok/s",
         "note": f"batch {shapes.batch} x seq {shapes.seq_len}"},
        {"check": f"teacher {name}: forward+{what}", "value": round(select), "unit": "tok/s",
         "note": f"k {shapes.k}, T {list(temperatures)}"},
        {"check": f"teacher {name}: logits job", "value": round(job), "unit": "tok/s",
         "note": f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s; "
                 f"{job / select:.2f} x fwd+{what}, {job / forward:.2f} x forward; "
                 f"{summary['bytes'] / summary['total_tokens']:.0f} bytes/token; peak {peak}"},
        {"check": f"teacher {name}: cache vs direct forward", "value": "PASS" if ok else "FAIL",
         "unit": "", "note": check},
    ]


def _log_prob_error(block, logits: torch.Tensor, temperatures) -> float:
    """Largest |log p_T| difference at the cached ids between the cache's decoding
    (logits / T - lse_T) and a direct log_softmax(logits / T): both caches store ids, logits and
    lse so that this holds up to the value code's rounding (gap8: 1/64 nat / T)."""
    ids = torch.from_numpy(block.ids)
    worst = 0.0
    for i, t in enumerate(temperatures):
        direct = torch.log_softmax(logits / t, -1).gather(-1, ids)
        cached = torch.from_numpy(block.logits / t - block.lse[..., i:i + 1])
        worst = max(worst, float((cached - direct).abs().max()))
    return worst


def check_topk(block, logits: torch.Tensor, *, k: int, temperatures) -> tuple[bool, str]:
    values, ids = torch.topk(logits, k, dim=-1)
    ids_match = float((torch.from_numpy(block.ids) == ids).float().mean())
    # Half-precision logits of a random teacher tie often, and tied entries may come out of top-k
    # in either order; the cached ids are right when the direct logits at those ids are the top-k.
    id_value_err = float((logits.gather(-1, torch.from_numpy(block.ids)) - values).abs().max())
    log_p_err = _log_prob_error(block, logits, temperatures)
    return (id_value_err < 1e-6 and log_p_err < 1 / 64 + 1e-3,
            f"top-k ids equal {ids_match:.4f} (ties), max |logit at cached id - direct top-k| "
            f"{id_value_err:.1e}, max |log p error| {log_p_err:.1e} nat")


def check_sampled(block, logits: torch.Tensor, *, k: int, temperatures) -> tuple[bool, str]:
    """The draws' log p are right, and the draws look like samples from softmax(z / T_s): the
    mean log p_Ts of the draws is near the distribution's -entropy (within 5 standard errors)."""
    log_p_err = _log_prob_error(block, logits, temperatures)
    z = _draws_look_sampled(torch.log_softmax(logits / SAMPLE_TEMPERATURE, -1),
                            torch.from_numpy(block.ids))
    order_ok = bool((np.diff(block.logits, axis=-1) <= 0).all())
    return (log_p_err < 1 / 64 + 1e-3 and abs(z) < 5 and order_ok,
            f"max |log p error| {log_p_err:.1e} nat; mean log p of draws vs -entropy {z:+.1f} "
            f"standard errors; sorted by logit: {order_ok}")


def _draws_look_sampled(log_p: torch.Tensor, ids: torch.Tensor) -> float:
    """How many standard errors the mean log p of the drawn `ids` lies from -entropy of p: near
    0 for ids drawn from p."""
    drawn = log_p.gather(-1, ids)
    neg_entropy = (log_p.exp() * log_p).sum(-1, keepdim=True)
    spread = ((log_p.exp() * (log_p - neg_entropy) ** 2).sum(-1)).mean().sqrt()
    return float((drawn - neg_entropy).mean() / (spread / drawn.numel() ** 0.5))


def check_counted(cache, logits: torch.Tensor, *, batch: int) -> tuple[bool, str]:
    """At each temperature the draws read back look like samples from softmax(z / T) and come
    sorted by id (repeats adjacent)."""
    notes, ok = [], True
    for t in cache.temperatures:
        ids = cache.at_temperature(t).read(0, batch).ids
        z = _draws_look_sampled(torch.log_softmax(logits / t, -1), torch.from_numpy(ids))
        ordered = bool((np.diff(ids, axis=-1) >= 0).all())
        ok &= abs(z) < 5 and ordered
        notes.append(f"T = {t:g}: {ids.shape[-1]} draws, mean log p vs -entropy {z:+.1f} "
                     f"standard errors, sorted by id: {ordered}")
    return ok, "; ".join(notes)


def finetune_rows(run: Path, teacher_dir: Path, shapes: Shapes, device: str, *,
                  method: str) -> list[dict]:
    """A few steps of `make teacher` with QLoRA or LoRA under bf16 autocast."""
    from precompute.teacher import train_teacher
    from training.metrics import read_metrics

    make_run(run, shapes)
    cfg = config(run, teacher_dir, shapes, f"teacher.use_{method}=true",
                 "teacher.precision=bf16", f"teacher.device={device}",
                 f"teacher.max_steps={shapes.finetune_steps}", "teacher.warmup_steps=2",
                 "teacher.batch_size=16", "teacher.grad_accum=1", "teacher.eval_every=0",
                 "teacher.checkpoint_every=0", "teacher.lr=1e-4")
    _reset_peak(device)
    started = time.perf_counter()
    train_teacher(cfg)
    seconds = time.perf_counter() - started
    metrics = read_metrics(run / "teacher" / "metrics.jsonl")
    steps = [row for row in metrics if "tokens_per_s" in row]
    return [
        {"check": f"{method} fine-tune: tokens/s (median, steps 6+)",
         "value": round(_steady_tokens_per_s(steps)), "unit": "tok/s",
         "note": f"batch 16 x seq {shapes.seq_len}, bf16 autocast"},
        {"check": f"{method} fine-tune: max_memory_allocated", "value": _peak_gb(device),
         "unit": "", "note": f"{len(steps)} steps in {seconds:.0f} s incl. load, merge/save and "
                             f"evaluation; loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"},
    ]


def loss_rows(shapes: Shapes, device: str, repeats: int = 20) -> list[dict]:
    """The fused loss alone (forward + backward) on a student batch's logits, CE and cached KD
    from a top-k teacher, its torch ops compiled and eager: time (median of `repeats`) and how
    far the two ways' values and gradients lie apart."""
    from training.losses import ce_and_cached_kl, teacher_buckets

    b, length, vocab, t = shapes.student_batch, shapes.seq_len, shapes.vocab, SAMPLE_TEMPERATURE
    generator = torch.Generator(device).manual_seed(0)
    student = torch.randn(b, length, vocab, device=device, generator=generator) * 3
    teacher = torch.randn(b, length, vocab, device=device, generator=generator) * 2
    labels = torch.randint(0, vocab, (b, length), device=device, generator=generator)
    values, ids = teacher.topk(shapes.k, -1)
    log_p, p_tail = teacher_buckets(values, torch.logsumexp(teacher / t, -1, keepdim=True),
                                    temperature=t, temperatures=(t,), vocab_size=vocab)
    teachers = {"CE": {}, "KD": dict(head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                                     temperature=t)}

    def step(teacher_kwargs):
        logits = student.clone().requires_grad_()
        ce, kl = ce_and_cached_kl(logits, labels, **teacher_kwargs)
        (ce.sum() + (0 if kl is None else kl.sum())).backward()
        return ce.detach(), None if kl is None else kl.detach(), logits.grad

    times, results, peaks = {}, {}, {}
    for compiled in (True, False):
        with _loss_compiled(compiled):
            for name, teacher_kwargs in teachers.items():
                results[compiled, name] = step(teacher_kwargs)  # compiles on the first call
                _sync(device)
                _reset_peak(device)
                held = torch.cuda.memory_allocated() if device == "cuda" else 0
                step(teacher_kwargs)
                peaks[compiled, name] = _peak_bytes(device) - held
                seconds = []
                for _ in range(repeats):
                    _sync(device)
                    began = time.perf_counter()
                    step(teacher_kwargs)
                    _sync(device)
                    seconds.append(time.perf_counter() - began)
                times[compiled, name] = statistics.median(seconds)
    gap = max(float((ours - theirs).abs().max())
              for name in teachers for ours, theirs in zip(results[True, name],
                                                           results[False, name])
              if ours is not None)
    shape = f"({b} x {length}, {vocab}) logits, k {shapes.k}, T {t:g}"
    logits_bytes = student.numel() * student.element_size()
    rows = [{"check": f"fused loss fwd+bwd, {name}, {'compiled' if compiled else 'eager'}",
             "value": round(seconds * 1e3, 2), "unit": "ms",
             "note": f"{times[compiled, 'CE'] / seconds:.3f} x CE's speed; " + (
                 f"peak {_gib(peaks[compiled, name], device)} above the inputs "
                 f"({peaks[compiled, name] / logits_bytes:.2f} x the logits); "
                 if device == "cuda" else "") + shape}
            for (compiled, name), seconds in times.items()]
    rows.append({"check": "fused loss: compiled vs eager", "value": f"{gap:.1e}", "unit": "",
                 "note": "largest |difference| of ce, kl and the logits' gradient"})
    return rows


def student_rows(root: Path, teacher_dir: Path, shapes: Shapes, device: str) -> list[dict]:
    """The same student, steps and seed in each mode; cached modes read the fp16 jobs' caches.

    Each of `student_rounds` rounds trains every mode once, starting one mode further on (so
    no mode always pays for going first), and a mode's speed is compared with CE's in the same
    round: a run's tokens/s moves from one round to the next, its step being partly bound by
    launching kernels from Python (docs/log.md).
    """
    from student.train import train
    from training.metrics import read_metrics

    layers, width, heads = shapes.student
    modes = list(STUDENT_MODES)
    runs = {"cached KD, sampled": root / "fp16 sampled",
            "cached KD, counted draws": root / "fp16 counted draws"}
    speeds = {mode: [] for mode in modes}
    peaks, notes = {}, {}
    for round_ in range(shapes.student_rounds):
        for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
            name = f"gpu-check-{mode.replace(' ', '').replace(',', '-')}-{round_}"
            cfg = config(runs.get(mode, root / "fp16"), teacher_dir, shapes,
                         f"student.n_layer={layers}", f"student.n_embd={width}",
                         f"student.n_head={heads}", "student.dropout=0.1",
                         f"student.batch_size={shapes.student_batch}", "student.grad_accum=1",
                         f"student.max_steps={shapes.student_steps}", "student.warmup_steps=5",
                         "student.eval_every=0", "student.checkpoint_every=0",
                         "student.precision=bf16", f"student.device={device}",
                         "teacher.dtype=fp16", f"distill.temperature={SAMPLE_TEMPERATURE}",
                         f"distill.run={name}", *STUDENT_MODES[mode])
            _reset_peak(device)
            started = time.perf_counter()
            with _loss_compiled(not mode.endswith(EAGER)):
                out = train(cfg)
            seconds = time.perf_counter() - started
            metrics = read_metrics(out / "metrics.jsonl")
            speeds[mode].append(_steady_tokens_per_s(metrics))
            peaks[mode] = max(peaks.get(mode, 0), _peak_bytes(device))
            notes[mode] = (f"{len(metrics)} steps in {seconds:.0f} s incl. setup and save; loss "
                           f"{metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}")
            shutil.rmtree(out)
            _free(device)

    def ratios(mode: str, over: str) -> list[float]:
        return sorted(a / b for a, b in zip(speeds[mode], speeds[over]))

    def baseline(mode: str) -> str:
        return "CE baseline" + (EAGER if mode.endswith(EAGER) else "")

    rows = []
    for mode in modes:
        vs_ce = ratios(mode, baseline(mode))
        rows.append({"check": f"student {mode}: tokens/s", "value": round(statistics.median(
                     speeds[mode])), "unit": "tok/s", "note": f"{statistics.median(vs_ce):.3f} x CE "
                     f"(rounds {vs_ce[0]:.3f}-{vs_ce[-1]:.3f}); "
                     f"{'x'.join(map(str, shapes.student[:2]))}, batch {shapes.student_batch} x seq "
                     f"{shapes.seq_len}, k {shapes.k}, T {SAMPLE_TEMPERATURE:g}; median of steps 6+, "
                     f"median of {shapes.student_rounds} rounds"})
        rows.append({"check": f"student {mode}: max_memory_allocated",
                     "value": _gib(peaks[mode], device),
                     "unit": "", "note": (f"{peaks[mode] / peaks[baseline(mode)]:.3f} x CE; "
                                          if peaks[baseline(mode)] else "") + notes[mode]})
    for mode in ("cached KD, top-k", "cached KD, sampled", "cached KD, counted draws"):
        vs_online = ratios(mode, "online KD")
        rows.append({"check": f"student {mode}: speed-up over online KD",
                     "value": round(statistics.median(vs_online), 2), "unit": "x",
                     "note": f"rounds {vs_online[0]:.2f}-{vs_online[-1]:.2f}; teacher "
                             f"{'x'.join(map(str, shapes.teacher[:2]))} resident in online KD"})
    return rows


@contextlib.contextmanager
def _loss_compiled(compiled: bool):
    """Within it the fused loss's torch ops run compiled or eagerly (BABYLM_KD_COMPILE), as
    asked; the variable is as before afterwards."""
    before = os.environ.get("BABYLM_KD_COMPILE")
    os.environ["BABYLM_KD_COMPILE"] = "1" if compiled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BABYLM_KD_COMPILE")
        else:
            os.environ["BABYLM_KD_COMPILE"] = before


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)"


def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def _peak_gb(device: str) -> str:
    return _gib(_peak_bytes(device), device)


def _gib(n_bytes: int, device: str) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if device == "cuda" else "n/a (cpu)"


def _steady_tokens_per_s(metrics: list[dict]) -> float:
    """Median tokens/s of a run's steps after the first five (start-up and warm-up)."""
    return statistics.median(row["tokens_per_s"] for row in metrics[min(5, len(metrics) - 1):])


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, columns=("check", "value", "unit", "note"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a dry run)")
    parser.add_argument("--quick", action="store_true",
                        help="only the fp16 teacher's jobs, the fused loss and the students")
    parser.add_argument("--loss", action="store_true", help="only the fused loss")
    args = parser.parse_args()
    began = time.perf_counter()
    result = run(tiny=args.tiny, quick=args.quick, loss=args.loss)
    text = markdown(result) + f"\n\ntotal {time.perf_counter() - began:.0f} s\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text)

"""One-shot GPU check (H100/H200): the teacher-logits job with an fp16 and a 4-bit NF4 teacher,
and a few bf16-autocast student steps from the cache just written. Needs no network: the
teacher (GPT-2 Large shape, 36 x 1280, vocab 50257, random weights) and the token stores are
made in-process under a temporary folder. Finishes in a few minutes.

For each teacher: tokens/s of the bare forward, of forward + top-k + logsumexp, and of the job
(`precompute.logits.cache_split`, the path `make teacher-logits` runs: batches, background shard
writer, claims, fsync), then the cache checked against a direct forward of the same model
(top-k ids, logits within fp16 rounding, lse). Then `student.train.fit` trains a GPT-2 Small
shape (12 x 768) with cached KD (alpha 0.5, T 2) under bf16 autocast: tokens/s and
torch.cuda.max_memory_allocated.

    python -m bench.gpu_check            # on the GPU machine; table also to $OUT/gpu_check.md
    python -m bench.gpu_check --tiny     # tiny shapes on the CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import os
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


FULL = Shapes(teacher=(36, 1280, 20), student=(12, 768, 12), vocab=50257, seq_len=128,
              sequences=2048, batch=64, k=64, student_steps=30, student_batch=32)
TINY = Shapes(teacher=(2, 64, 2), student=(2, 64, 2), vocab=320, seq_len=32, sequences=64,
              batch=16, k=8, student_steps=3, student_batch=8)


def run(*, tiny: bool = False) -> list[dict]:
    """Rows {check, value, unit, note}; a failing section becomes a row saying why."""
    shapes = TINY if tiny else FULL
    device = "cpu" if tiny else "cuda"
    rows = [{"check": "device", "value": _device_name(device), "unit": "",
             "note": f"torch {torch.__version__}, bitsandbytes {_version('bitsandbytes')}"}]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        teacher_dir = make_teacher(root / "teacher", shapes, device)
        rows.append({"check": "setup: random teacher saved (fp16)", "value":
                     round(time.perf_counter() - started, 1), "unit": "s", "note": str(shapes.teacher)})
        for name, dtype, quantization in (("fp16", "fp16", "none"), ("nf4", "fp16", "4bit")):
            rows += _section(f"teacher {name}", lambda: teacher_rows(
                root / name, teacher_dir, shapes, device, dtype=dtype, quantization=quantization))
        rows += _section("student bf16", lambda: student_rows(root / "fp16", shapes, device))
    return rows


def _section(name: str, body) -> list[dict]:
    try:
        return body()
    except Exception as exc:  # noqa: BLE001 -- report and go on with the other sections
        traceback.print_exc()
        return [{"check": f"{name}: FAILED", "value": "", "unit": "",
                 "note": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}]


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
    del model
    _free(device)
    return folder


def make_run(run: Path, shapes: Shapes) -> None:
    from storage.tokens import write_token_store

    rng = np.random.default_rng(0)
    for split, n in (("train", shapes.sequences), ("val", max(shapes.student_batch, 64))):
        write_token_store(run / "tokens" / f"{split}.zarr",
                          sequences=rng.integers(0, shapes.vocab, (n, shapes.seq_len)),
                          manifest={"tokenizer": {"fingerprint": "gpu-check", "eos_id": 0,
                                                  "vocab_size": shapes.vocab}})


def config(run: Path, teacher_dir: Path, shapes: Shapes, *extra: str):
    return load_config(CONFIG_DIR / "demo.yaml", [
        f"run_dir={run}", f"data.seq_len={shapes.seq_len}", "teacher.from_scratch=false",
        f"teacher.model={teacher_dir}", f"cache.k={shapes.k}", f"cache.batch_size={shapes.batch}",
        "cache.chunk_sequences=32", "cache.shard_chunks=8",
        *extra])


def teacher_rows(run: Path, teacher_dir: Path, shapes: Shapes, device: str, *, dtype: str,
                 quantization: str) -> list[dict]:
    from precompute.logits import cache_split, teacher_topk
    from precompute.models import load_teacher, resolve_teacher, teacher_manifest
    from storage.cache import open_cache
    from storage.tokens import open_token_store

    name = "nf4" if quantization == "4bit" else dtype
    make_run(run, shapes)
    cfg = config(run, teacher_dir, shapes, f"teacher.dtype={dtype}",
                 f"teacher.quantization={quantization}", f"teacher.device={device}")
    started = time.perf_counter()
    source = resolve_teacher(cfg)
    model = load_teacher(source.model, dtype=dtype, quantization=quantization, device=device)
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
    topk = rate(lambda b: teacher_topk(model, b, k=shapes.k, temperatures=temperatures), n_timed)
    teacher = teacher_manifest(source, dtype=dtype, quantization=quantization)
    _reset_peak(device)
    summary = cache_split(model, source=source, teacher=teacher, tokens_path=store.path,
                          cache_path=run / "cache" / "train.zarr", cfg=cfg,
                          device=torch.device(device))
    job = summary["tokens"] / summary["seconds"]
    peak = _peak_gb(device)

    cache = open_cache(run / "cache" / "train.zarr", token_store=store)
    block = cache.read(0, shapes.batch)
    with torch.inference_mode():
        logits = model(input_ids=rows_ids[:shapes.batch].to(device)).logits.float().cpu()
    values, ids = torch.topk(logits, shapes.k, dim=-1)
    ids_match = float((torch.from_numpy(block.ids) == ids).float().mean())
    top1_match = float((torch.from_numpy(block.ids[..., 0]) == ids[..., 0]).float().mean())
    shifted = (values - values[..., :1]).numpy()
    value_err = float(np.max(np.abs(block.logits - shifted) / (np.abs(shifted) + 1)))
    lse = torch.stack([torch.logsumexp(logits / t, -1) - values[..., 0] / t
                       for t in temperatures], -1).numpy()
    lse_err = float(np.abs(block.lse - lse).max())
    # Half-precision logits of a random teacher tie often, and tied entries may come out of top-k
    # in either order; the cached ids are right when the direct logits at those ids are the top-k.
    at_cached_ids = logits.gather(-1, torch.from_numpy(block.ids))
    id_value_err = float((at_cached_ids - values).abs().max())
    ok = id_value_err < 1e-6 and value_err < 2e-3 and lse_err < 1e-3
    del model
    _free(device)
    shape = "x".join(map(str, shapes.teacher[:2]))
    return [
        {"check": f"teacher {name}: load", "value": round(load_s, 1), "unit": "s",
         "note": f"{shape}, vocab {shapes.vocab}"},
        {"check": f"teacher {name}: forward", "value": round(forward), "unit": "tok/s",
         "note": f"batch {shapes.batch} x seq {shapes.seq_len}"},
        {"check": f"teacher {name}: forward+topk+lse", "value": round(topk), "unit": "tok/s",
         "note": f"k {shapes.k}, T {list(temperatures)}"},
        {"check": f"teacher {name}: logits job", "value": round(job), "unit": "tok/s",
         "note": f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s; "
                 f"{job / topk:.2f} x fwd+topk+lse, {job / forward:.2f} x forward; "
                 f"{summary['bytes'] / summary['total_tokens']:.0f} bytes/token; peak {peak}"},
        {"check": f"teacher {name}: cache vs direct forward", "value": "PASS" if ok else "FAIL",
         "unit": "", "note": f"top-1 ids equal {top1_match:.4f}, top-k ids equal {ids_match:.4f} (ties), "
                             f"max |logit at cached id - direct top-k| {id_value_err:.1e}, "
                             f"max rel logit err {value_err:.1e}, max lse err {lse_err:.1e}"},
    ]


def student_rows(run: Path, shapes: Shapes, device: str) -> list[dict]:
    """A few cached-KD steps of a GPT-2 Small shape from the fp16 teacher's cache, bf16 autocast."""
    from student.train import read_metrics, train

    layers, width, heads = shapes.student
    cfg = config(run, run / "unused", shapes, f"student.n_layer={layers}",
                 f"student.n_embd={width}", f"student.n_head={heads}", "student.dropout=0.1",
                 f"student.batch_size={shapes.student_batch}", "student.grad_accum=1",
                 f"student.max_steps={shapes.student_steps}", "student.warmup_steps=5",
                 "student.eval_every=0", "student.checkpoint_every=0",
                 "student.precision=bf16", f"student.device={device}",
                 "distill.alpha=0.5", "distill.temperature=2.0", "distill.run=gpu-check")
    _reset_peak(device)
    started = time.perf_counter()
    out = train(cfg)
    seconds = time.perf_counter() - started
    metrics = read_metrics(out / "metrics.jsonl")
    steady = [row["tokens_per_s"] for row in metrics[min(5, len(metrics) - 1):]]
    losses = [row["loss"] for row in metrics]
    return [
        {"check": "student bf16 KD: tokens/s (median, steps 6+)", "value":
         round(statistics.median(steady)), "unit": "tok/s",
         "note": f"{'x'.join(map(str, shapes.student[:2]))}, batch {shapes.student_batch} x seq "
                 f"{shapes.seq_len}, k {shapes.k}, alpha 0.5, T 2"},
        {"check": "student bf16 KD: max_memory_allocated", "value": _peak_gb(device), "unit": "",
         "note": f"{len(metrics)} steps in {seconds:.0f} s incl. setup and final save; loss "
                 f"{losses[0]:.3f} -> {losses[-1]:.3f}"},
    ]


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


def _peak_gb(device: str) -> str:
    if device != "cuda":
        return "n/a (cpu)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, columns=("check", "value", "unit", "note"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a dry run)")
    args = parser.parse_args()
    began = time.perf_counter()
    result = run(tiny=args.tiny)
    text = markdown(result) + f"\n\ntotal {time.perf_counter() - began:.0f} s\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text)

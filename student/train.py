"""Train a student: `python -m student.train` (`make distill`, `make baseline`).

The student's modes, all through the one loop of training/loop.py: the CE baseline
(distill.alpha = 1, no cache opened), cached KD (the teacher's entries from the logit cache; no
teacher in memory) and online KD (the teacher resident, full-vocabulary KL: the reference the
cached mode is measured against).

Output, `<run>/students/<name>/`: the final model, config.yaml, metrics.jsonl and checkpoint/
(see training/loop.py). Rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs import Config, UserError
from configs.cli import run
from storage.cache import LogitCache, open_cache
from storage.tokens import TokenStore
from training.checkpoint import is_finished
from training.device import resolve_device
from training.loop import Distillation, fit, open_tokens
from training.losses import same_temperature
from training.models import load_teacher, new_gpt2, resolve_teacher


def run_name(cfg: Config) -> str:
    """distill.run, or derived: 'baseline' (alpha = 1), 'kd-a0.5-T2-k32', 'online-a0.5-T2'."""
    d = cfg.distill
    if d.run:
        return d.run
    if d.alpha == 1:
        return "baseline"
    if d.mode == "online":
        return f"online-a{d.alpha:g}-T{d.temperature:g}"
    return f"kd-a{d.alpha:g}-T{d.temperature:g}-k{d.k or cfg.cache.k}"


def student_dir(cfg: Config) -> Path:
    return cfg.run_path / "students" / run_name(cfg)


def train(cfg: Config, *, cache: LogitCache | None = None) -> Path:
    """Train (or resume, or find finished) the student of `cfg`; returns its directory.

    `cache`: an already opened logit cache to share (the sweep opens it once).
    """
    out = student_dir(cfg)
    if is_finished(out):
        print(f"{out} is already trained (delete it to train again)")
        return out
    train_tokens, val_tokens = open_tokens(cfg)
    vocab_size = train_tokens.vocab_size
    distil = distillation(cfg, train_tokens, vocab_size=vocab_size, cache=cache)
    s = cfg.student
    model = new_gpt2(vocab_size=vocab_size, seq_len=train_tokens.seq_len, n_layer=s.n_layer,
                     n_embd=s.n_embd, n_head=s.n_head, dropout=s.dropout, seed=s.seed,
                     eos_token_id=train_tokens.manifest["tokenizer"].get("eos_id", 0))
    return fit(model, cfg=cfg, hp=s, out_dir=out, tokens=train_tokens, val_tokens=val_tokens,
               distil=distil)


def distillation(cfg: Config, tokens: TokenStore, *, vocab_size: int,
                 cache: LogitCache | None = None) -> Distillation | None:
    """The teacher signal of `cfg.distill`: None for the CE baseline (nothing opened)."""
    d = cfg.distill
    if d.alpha == 1:
        return None
    if d.mode == "online":
        return Distillation(alpha=d.alpha, temperature=d.temperature,
                            teacher=load_online_teacher(cfg, vocab_size=vocab_size))
    if cache is None:  # else the caller (the sweep) opened it against the same token store
        path = cfg.run_path / "cache" / "train.zarr"
        if not (path / "zarr.json").is_file():
            raise UserError(f"no logit cache at {path}: run `make teacher-logits` first "
                            "(or distill.alpha=1 for the CE baseline)")
        cache = open_cache(path, token_store=tokens, vocab_size=vocab_size)
    k = d.k or cache.k
    if k > cache.k:
        raise UserError(f"distill.k = {k} is larger than the cached k = {cache.k} of {cache.path}")
    skip = bad_shards(cache) if d.skip_bad_shards else ()
    if cache.sample_temperature is not None:
        if k != cache.k:  # the first k of draws sorted by logit are not a sample
            raise UserError(f"distill.k = {k}: {cache.path} holds {cache.k} sampled entries per "
                            f"position, which are used together (distill.k=0 or {cache.k})")
    elif not any(same_temperature(t, d.temperature) for t in cache.temperatures):
        near = min(cache.temperatures, key=lambda t: abs(t - d.temperature))
        print(f"note: distill.temperature = {d.temperature:g} is not stored in the cache "
              f"(stored: {', '.join(f'{t:g}' for t in cache.temperatures)}); approximating the "
              f"teacher's tail from T = {near:g} (see training/losses.py: teacher_buckets)")
    return Distillation(alpha=d.alpha, temperature=d.temperature, cache=cache, k=k,
                        vocab_size=vocab_size, skip_shards=skip)


def bad_shards(cache: LogitCache) -> tuple[int, ...]:
    """Verify every shard; return the bad ones and say how many tokens skipping them costs."""
    problems = cache.verify(progress=True)
    if whole := [problem for problem in problems if problem.shard is None]:
        raise UserError(f"logit cache {cache.path} cannot be used: {whole[0]}")
    shards = {problem.shard for problem in problems}
    if shards:
        rows = sum(min(cache.shard_rows(s)[1], cache.n_sequences) - cache.shard_rows(s)[0]
                   for s in shards)
        print(f"skipping {len(shards)} bad cache shard(s) {sorted(shards)[:10]}: {rows} sequences, "
              f"{rows * cache.seq_len:,} tokens left out of training")
    return tuple(sorted(shards))


def load_online_teacher(cfg: Config, *, vocab_size: int) -> torch.nn.Module:
    """The run's teacher, resident for online KD (as the logits job loads it)."""
    device = resolve_device(cfg.student.device, "student.device")
    source = resolve_teacher(cfg)
    teacher = load_teacher(source.model, adapter=source.adapter, device=device,
                           dtype=cfg.teacher.dtype if device.type == "cuda" else "fp32",
                           quantization=cfg.teacher.quantization)
    if teacher.config.vocab_size != vocab_size:
        raise UserError(f"teacher {source.model} has vocabulary {teacher.config.vocab_size}, the "
                        f"student {vocab_size}: they must share the tokenizer")
    teacher.requires_grad_(False)
    return teacher


def main(cfg: Config) -> None:
    train(cfg)


if __name__ == "__main__":
    run(main, "Train a student: CE baseline (distill.alpha=1), cached KD, or online KD.")

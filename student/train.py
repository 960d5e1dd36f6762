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
from storage.cache import LogitCache, open_cache, read_manifest
from storage.tokens import TokenStore
from training.checkpoint import is_finished
from training.device import resolve_device
from training.loop import Distillation, fit, open_tokens
from training.losses import same_temperature
from training.models import load_teacher, new_gpt2, resolve_teacher


def run_name(cfg: Config) -> str:
    """distill.run, or derived: 'baseline' (alpha = 1), 'kd-a0.5-T2-k32' (top-32),
    'kd-a0.5-T2-s64' (64 draws), 'online-a0.5-T2'. Give it a config `as_cached` resolved, so the
    name says what the cache holds rather than what the config asked for."""
    d = cfg.distill
    if d.run:
        return d.run
    if d.alpha == 1:
        return "baseline"
    if d.mode == "online":
        return f"online-a{d.alpha:g}-T{d.temperature:g}"
    letter = "s" if cfg.cache.selection == "sample" else "k"
    return f"kd-a{d.alpha:g}-T{d.temperature:g}-{letter}{d.k or cfg.cache.k}"


def cache_path(cfg: Config) -> Path:
    return cfg.run_path / "cache" / "train.zarr"


def as_cached(cfg: Config) -> Config:
    """`cfg` with its cache section as the run's cache records it (k, selection, draws' temperature
    and seed, value code, stored temperatures) when the student distils from that cache: its name,
    config.yaml and model card then say what it read. Unchanged for the CE baseline, online KD,
    or before the cache exists (training then says to make it)."""
    path = cache_path(cfg)
    if cfg.distill.alpha == 1 or cfg.distill.mode != "cached" or not (path / "zarr.json").is_file():
        return cfg
    manifest = read_manifest(path)
    if cfg.distill.k > manifest["k"]:
        raise UserError(f"distill.k = {cfg.distill.k} is larger than the cached k = "
                        f"{manifest['k']} of {path}")
    selection = manifest.get("selection") or {"kind": "topk"}
    recorded = {"cache.k": manifest["k"], "cache.selection": selection["kind"],
                "cache.value_code": manifest["value_code"],
                "cache.temperatures": list(manifest["temperatures"])}
    if selection["kind"] == "sample":
        recorded.update({"cache.sample_temperature": selection["temperature"],
                         "cache.sample_seed": selection["seed"]})
    return cfg.replace(**recorded)


def student_dir(cfg: Config) -> Path:
    return cfg.run_path / "students" / run_name(cfg)


def train(cfg: Config, *, cache: LogitCache | None = None) -> Path:
    """Train (or resume, or find finished) the student of `cfg`; returns its directory.

    `cache`: an already opened logit cache to share (the sweep opens it once).
    """
    cfg = as_cached(cfg)
    out = student_dir(cfg)
    if is_finished(out):
        print(f"{out} is already trained (delete it to train again)")
        return out
    train_tokens, val_tokens = open_tokens(cfg)
    vocab_size = train_tokens.vocab_size
    distil = distillation(cfg, train_tokens, vocab_size=vocab_size, cache=cache)
    s = cfg.student
    model = new_gpt2(vocab_size=vocab_size, n_positions=s.n_positions, n_layer=s.n_layer,
                     n_embd=s.n_embd, n_head=s.n_head, dropout=s.dropout, seed=s.seed,
                     eos_token_id=train_tokens.manifest["tokenizer"].get("eos_id", 0))
    return fit(model, cfg=cfg, hp=s, out_dir=out, tokens=train_tokens, val_tokens=val_tokens,
               distil=distil, card=card(cfg, train_tokens, distil))


def card(cfg: Config, tokens: TokenStore, distil: Distillation | None) -> dict:
    """How the student is made, for its model card: the teacher and the cache it read (from the
    cache's manifest), or the online teacher; alpha and T; the token store."""
    d = cfg.distill
    facts = {"kind": "student", "mode": "ce-baseline" if distil is None else d.mode}
    if distil is not None and distil.cache is not None:
        cache, teacher = distil.cache, distil.cache.manifest.get("teacher") or {}
        selection = cache.selection
        facts.update({
            "teacher": teacher.get("name") if isinstance(teacher, dict) else str(teacher),
            "teacher_fingerprint": teacher.get("fingerprint") if isinstance(teacher, dict)
            else None,
            "cache": str(cache.path), "cache_fingerprint": cache.fingerprint,
            "selection": "topk" if selection["kind"] == "topk" else
            f"sample ({cache.k} draws at T = {selection['temperature']:g})",
            "k": distil.k, "value_code": cache.value_code})
    elif distil is not None:
        source = resolve_teacher(cfg)
        facts["teacher"] = source.model + (f" + adapter {source.adapter}" if source.adapter else "")
    if distil is not None:
        facts.update({"alpha": d.alpha, "temperature": d.temperature})
    return {**facts, "token_store": tokens.fingerprint[:16], "seq_len": tokens.seq_len}


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
        path = cache_path(cfg)
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

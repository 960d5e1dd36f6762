"""Train a student: `python -m student.train` (`make distill`, `make baseline`).

One loop for every mode (nanoGPT style): the CE baseline (distill.alpha = 1, no cache opened),
cached KD (the teacher's top-k from the logit cache; no teacher in memory) and online KD (the
teacher resident, full-vocabulary KL: the reference the cached mode is measured against).
`fit` is the loop itself and trains any causal LM, so teacher fine-tuning (a LoRA-wrapped or
4-bit model, CE only) goes through it too.

Output, `<run>/students/<name>/`: the final model (save_pretrained: config.json +
model.safetensors), config.yaml (the resolved config), metrics.jsonl (one line per optimizer
step, validation loss/perplexity every `eval_every` steps) and checkpoint/ (model, config and
trainer state: optimizer, scheduler, RNG states, data cursor). Checkpoints are written into a
temporary directory and renamed into place; a rerun resumes from the last one and ends with the
same weights as an uninterrupted run (CPU, same seed). Ctrl-C stops after writing a checkpoint.
Under `torchrun` each rank trains on its disjoint share of every batch (DDP, gloo on the CPU,
nccl on GPUs) and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from configs import Config, StudentConfig, TeacherConfig, UserError
from configs.cli import run
from storage.cache import LogitCache, open_cache
from storage.errors import CorruptData
from storage.reader import Batch, batches_per_epoch, stream_batches
from storage.tokens import TokenStore, open_token_store
from student.losses import (LossTerms, ce_and_cached_kl, combine, full_kl, same_temperature,
                            sampled_targets, shift_labels, teacher_buckets)
from student.model import new_gpt2, resolve_device

Hyper = StudentConfig | TeacherConfig
"""The loop's settings: the student's section, or the teacher's when fine-tuning it."""

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "elapsed_s")
"""Metrics that depend on the machine, not the run (left out when comparing runs)."""


@dataclass
class Distillation:
    """What the teacher contributes to the loss. cache XOR teacher (cached vs online mode)."""

    alpha: float
    temperature: float
    cache: LogitCache | None = None
    k: int | None = None
    vocab_size: int = 0
    teacher: torch.nn.Module | None = None
    skip_shards: tuple[int, ...] = ()

    @property
    def reads_values(self) -> bool:
        """Whether the loss needs the cache's logits and lse: not for draws at their own
        temperature, whose frequencies are the targets (`sampled_targets`)."""
        drawn_at = self.cache.sample_temperature
        return drawn_at is None or not same_temperature(drawn_at, self.temperature)


@dataclass
class Cursor:
    """Where training stands: optimizer steps done, and the next micro-batch (epoch, batch)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0


# --------------------------------------------------------------------------------- entry point

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


def open_tokens(cfg: Config) -> tuple[TokenStore, TokenStore]:
    """The run's train and validation token stores (a missing one says to run `make data`)."""
    return tuple(open_token_store(cfg.run_path / "tokens" / f"{split}.zarr")
                 for split in ("train", "val"))


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
              f"teacher's tail from T = {near:g} (see student/losses.py: teacher_buckets)")
    return Distillation(alpha=d.alpha, temperature=d.temperature, cache=cache, k=k,
                        vocab_size=vocab_size, skip_shards=skip)


def bad_shards(cache: LogitCache) -> tuple[int, ...]:
    """Verify every shard; return the bad ones and say how many tokens skipping them costs."""
    problems = cache.verify(progress=True)
    shards, other = set(), []
    for line in problems:
        match = re.match(r"shard (\d+):", line)
        shards.add(int(match.group(1))) if match else other.append(line)
    if other:
        raise UserError(f"logit cache {cache.path} cannot be used: {other[0]}")
    if shards:
        rows = sum(min(cache.shard_rows(s)[1], cache.n_sequences) - cache.shard_rows(s)[0]
                   for s in shards)
        print(f"skipping {len(shards)} bad cache shard(s) {sorted(shards)[:10]}: {rows} sequences, "
              f"{rows * cache.seq_len:,} tokens left out of training")
    return tuple(sorted(shards))


def load_online_teacher(cfg: Config, *, vocab_size: int) -> torch.nn.Module:
    """The run's teacher, resident for online KD (as the logits job loads it)."""
    from precompute.models import load_teacher, resolve_teacher

    device = resolve_device(cfg.student.device)
    source = resolve_teacher(cfg)
    teacher = load_teacher(source.model, adapter=source.adapter, device=device,
                           dtype=cfg.teacher.dtype if device.type == "cuda" else "fp32",
                           quantization=cfg.teacher.quantization)
    if teacher.config.vocab_size != vocab_size:
        raise UserError(f"teacher {source.model} has vocabulary {teacher.config.vocab_size}, the "
                        f"student {vocab_size}: they must share the tokenizer")
    teacher.requires_grad_(False)
    return teacher


def is_finished(out: Path) -> bool:
    """A final model was saved (config.json is moved into place last)."""
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------ the loop

def fit(model: torch.nn.Module, *, cfg: Config, hp: Hyper, out_dir: Path, tokens: TokenStore,
        val_tokens: TokenStore | None, distil: Distillation | None = None) -> Path:
    """Train `model` on `tokens` with the settings `hp`; write `out_dir` (see module doc).

    `model`: any causal LM returning `.logits` (B, L, V); only parameters that require grad
    are optimised (a PEFT adapter trains just its LoRA weights). distil None: cross-entropy only.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint drowns ours
    rank, world_size, device = setup_distributed(hp.device)
    is_writer = rank == 0
    out_dir = Path(out_dir)
    micro = micro_batch_size(hp, world_size)
    skip = distil.skip_shards if distil else ()
    shard_sequences = distil.cache.shard_sequences if distil and distil.cache else 0
    per_epoch = batches_per_epoch(n_sequences=tokens.n_sequences, batch_size=micro,
                                  world_size=world_size, shard_sequences=shard_sequences,
                                  skip_shards=skip) // hp.grad_accum
    if per_epoch == 0:
        raise UserError(f"{tokens.path} has {tokens.n_sequences} sequences, fewer than one batch "
                        f"of {hp.batch_size}: lower the batch size")
    total_steps = hp.max_steps or max(1, round(hp.epochs * per_epoch))
    amp_dtype = autocast_dtype(hp.precision, device)

    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(device)
    optimizer = make_optimizer(model, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=hp.warmup_steps, total=total_steps,
                                          schedule=hp.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    torch.manual_seed(hp.seed + rank)  # dropout; the init came from the model's own seed
    cursor = Cursor()
    checkpoint = out_dir / "checkpoint"
    if (state := find_checkpoint(checkpoint)) is not None:
        cursor = restore(state, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, device=device)
        if is_writer:
            print(f"resuming {out_dir} from step {cursor.step} of {total_steps}")
    elif is_writer:
        check_fresh_start(out_dir)
    if is_writer:
        cfg.save(out_dir)
        truncate_metrics(out_dir / METRICS_FILE, after_step=cursor.step)
    trained = wrap_ddp(model, device) if world_size > 1 else model

    stop = StopFlag()
    data = micro_batches(tokens, distil, hp=hp, micro=micro, cursor=cursor, rank=rank,
                         world_size=world_size, prefetch=prefetch_depth(device))
    bar = tqdm(total=total_steps, initial=cursor.step, unit="step", disable=not is_writer,
               desc=out_dir.name, dynamic_ncols=True)
    started = time.perf_counter()
    row = {}
    with stop, contextlib.closing(data), bar:
        while cursor.step < total_steps:
            step_start = time.perf_counter()
            row = train_step(trained, optimizer, scaler, data, distil, hp=hp, cursor=cursor,
                             device=device, amp_dtype=amp_dtype, world_size=world_size)
            scheduler.step()
            cursor.step += 1
            row.update(step=cursor.step, epoch=round(cursor.epoch + cursor.batch / (
                per_epoch * hp.grad_accum), 4), lr=scheduler.get_last_lr()[0])
            last = cursor.step == total_steps
            if val_tokens is not None and (last or (hp.eval_every and cursor.step % hp.eval_every == 0)):
                row["val_loss"] = validate(model, val_tokens, micro=micro, device=device,
                                           amp_dtype=amp_dtype, rank=rank, world_size=world_size)
                row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            elapsed = time.perf_counter() - step_start
            row.update(tokens_per_s=round(row.pop("step_tokens") / elapsed, 1),
                       elapsed_s=round(time.perf_counter() - started, 3))
            stopping = stop.agreed(device, world_size)
            if is_writer:
                append_metrics(out_dir / METRICS_FILE, row)
            if last or stopping or (hp.checkpoint_every and cursor.step % hp.checkpoint_every == 0):
                save_checkpoint(checkpoint, model=model, cfg=cfg, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, cursor=cursor,
                                is_writer=is_writer, world_size=world_size)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                            **({"val_ppl": f"{row['val_ppl']:.2f}"} if "val_ppl" in row else {}))
            bar.update(1)
            if stopping and not last:
                raise KeyboardInterrupt
    if is_writer:
        save_final(model, out_dir)
        print(f"{out_dir}: {cursor.step} steps, {cursor.tokens:,} tokens"
              + (f", val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}" if "val_loss" in row else ""))
    barrier(world_size)
    return out_dir


def train_step(model, optimizer, scaler, data: Iterator[tuple[int, int, Batch]],
               distil: Distillation | None, *, hp: Hyper, cursor: Cursor, device: torch.device,
               amp_dtype: torch.dtype | None, world_size: int) -> dict:
    """One optimizer step over `hp.grad_accum` micro-batches; returns the step's metrics.

    Each micro-batch's loss is its token sum over the step's token count, so the gradient is the
    mean over every token of the step whatever the split (ranks hold equal token counts: packed
    sequences, equal batches).
    """
    batches = []
    for _ in range(hp.grad_accum):
        epoch, index, batch = next(data)
        batches.append(batch)
        cursor.epoch, cursor.batch = epoch, index + 1
    step_tokens = sum(int(b.tokens.shape[0] * (b.tokens.shape[1] - 1)) for b in batches)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, kl, tokens
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or world_size == 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            terms = batch_losses(model, batch, distil, device=device, amp_dtype=amp_dtype)
            scaler.scale(terms.loss * (terms.n_tokens / step_tokens)).backward()
        sums += torch.tensor([float(terms.loss.detach()) * terms.n_tokens,
                              float(terms.ce) * terms.n_tokens, float(terms.kl) * terms.n_tokens,
                              terms.n_tokens], dtype=torch.float64)
    scaler.unscale_(optimizer)
    if hp.grad_clip:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], hp.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if world_size > 1:
        dist.all_reduce(sums)
    cursor.tokens += int(sums[3])
    loss, ce, kl = (float(v / sums[3]) for v in sums[:3])
    return {"tokens": cursor.tokens, "loss": loss, "ce": ce, "kl": kl,
            "step_tokens": int(sums[3])}


def batch_losses(model, batch: Batch, distil: Distillation | None, *, device: torch.device,
                 amp_dtype: torch.dtype | None) -> LossTerms:
    """Forward one micro-batch and return its loss terms (means over its non-ignored tokens)."""
    tokens = torch.from_numpy(batch.tokens).to(device, non_blocking=True)
    labels = shift_labels(tokens)
    if distil is not None and distil.cache is not None:
        # Copied before the forward and without blocking: a blocking copy after it waits for the
        # forward's kernels, and the GPU then idles while the loss and backward are launched.
        ids, cached_logits, lse = (None if array is None
                                   else torch.from_numpy(array).to(device, non_blocking=True)
                                   for array in (batch.ids, batch.logits, batch.lse))
    # Packed rows hold <|endoftext|>, the pad id: an explicit mask says they are not padded
    # (without one transformers warns on every run).
    unpadded = torch.ones_like(tokens)
    with autocast(device, amp_dtype):
        logits = model(input_ids=tokens, attention_mask=unpadded).logits
    logits = logits.float()
    if distil is None:
        ce, _ = ce_and_cached_kl(logits, labels)
        return combine(ce, None, labels, alpha=1.0, temperature=1.0)
    t = distil.temperature
    if distil.teacher is not None:
        with torch.no_grad(), autocast(device, amp_dtype):
            teacher_logits = distil.teacher(input_ids=tokens, attention_mask=unpadded).logits
        ce, _ = ce_and_cached_kl(logits, labels)
        kl = full_kl(logits, teacher_logits, temperature=t, labels=labels)
    else:
        if distil.cache.sample_temperature is not None:
            log_p, p_tail = sampled_targets(ids, cached_logits, temperature=t,
                                            sample_temperature=distil.cache.sample_temperature)
        else:
            log_p, p_tail = teacher_buckets(
                cached_logits, lse, temperature=t, temperatures=distil.cache.temperatures,
                vocab_size=distil.vocab_size)
        ce, kl = ce_and_cached_kl(logits, labels, head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                                  temperature=t)
    return combine(ce, kl, labels, alpha=distil.alpha, temperature=t)


@torch.no_grad()
def validate(model, val_tokens: TokenStore, *, micro: int, device: torch.device,
             amp_dtype: torch.dtype | None, rank: int, world_size: int) -> float:
    """Mean next-token CE over the validation store (in order; each rank scores its share)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    batch_size = max(1, min(micro, val_tokens.n_sequences // world_size))
    for batch in stream_batches(tokens=val_tokens, batch_size=batch_size, seed=0, epoch=0,
                                rank=rank, world_size=world_size, shuffle=False):
        terms = batch_losses(model, batch, None, device=device, amp_dtype=amp_dtype)
        sums += torch.tensor([float(terms.ce) * terms.n_tokens, terms.n_tokens], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / max(sums[1], 1))


def prefetch_depth(device: torch.device) -> int:
    """Batches the reader prepares ahead in a background thread: on an accelerator, 4, so reading
    hides behind the device's step. On the CPU, none: the batch is read in the training loop. There
    the thread hid nothing, its step and the reader's share the same cores and the GIL, and its
    malloc arena held more memory (bench/student.py's 2x64 student, six interleaved triples with
    CE: cached KD tokens/s 0.877 x CE with the thread, 0.913 without; peak RSS growth 1.17 x CE
    with, 1.15 without). Training on one torch thread, with the second core idle for the reader,
    did not change that: 0.929 and 0.917 x CE with the thread, 0.937 and 0.929 without (two runs,
    200 steps rotating in one process)."""
    return 0 if device.type == "cpu" else 4


def micro_batches(tokens: TokenStore, distil: Distillation | None, *, hp: Hyper, micro: int,
                  cursor: Cursor, rank: int, world_size: int,
                  prefetch: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batch index, Batch) from the cursor on, epoch after epoch (whole steps only)."""
    cache = distil.cache if distil else None
    skip = distil.skip_shards if distil else ()
    shard_sequences = cache.shard_sequences if cache else 0
    usable = batches_per_epoch(n_sequences=tokens.n_sequences, batch_size=micro,
                               world_size=world_size, shard_sequences=shard_sequences,
                               skip_shards=skip) // hp.grad_accum * hp.grad_accum
    epoch, start = cursor.epoch, cursor.batch
    while True:
        if start < usable:
            batches = stream_batches(tokens=tokens, cache=cache, batch_size=micro, seed=hp.seed,
                                     epoch=epoch, start_batch=start, rank=rank,
                                     world_size=world_size, k=distil.k if cache else None,
                                     values=distil.reads_values if cache else True,
                                     shuffle_buffer=getattr(hp, "shuffle_buffer", 256),
                                     skip_shards=skip, prefetch=prefetch)
            with contextlib.closing(batches):
                try:
                    for index, batch in enumerate(batches, start):
                        if index >= usable:
                            break
                        yield epoch, index, batch
                except CorruptData as exc:
                    raise CorruptData(f"{exc}; distill.skip_bad_shards=true trains without "
                                      "the damaged shards") from None
        epoch, start = epoch + 1, 0


# ---------------------------------------------------------------------------------- small parts

def micro_batch_size(hp: Hyper, world_size: int) -> int:
    """Sequences per rank per forward: batch_size = micro x grad_accum x world_size."""
    if hp.batch_size % (hp.grad_accum * world_size):
        raise UserError(f"batch_size {hp.batch_size} is not divisible by grad_accum "
                        f"{hp.grad_accum} x {world_size} ranks")
    return hp.batch_size // (hp.grad_accum * world_size)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, hp: Hyper) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and LayerNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=(0.9, 0.95))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """fp16/bf16 autocast on CUDA only; the CPU always runs fp32 (CPU bf16 is 10-30x slower)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when run under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag; the loop checkpoints and stops at the step's end.
    All ranks agree on stopping, so no rank waits for a collective the others left."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (checkpointing); Ctrl-C again to stop at once", flush=True)

    def agreed(self, device: torch.device, world_size: int) -> bool:
        if world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# -------------------------------------------------------------------------- checkpoints and logs

def save_checkpoint(folder: Path, *, model, cfg: Config, optimizer, scheduler, scaler,
                    cursor: Cursor, is_writer: bool, world_size: int) -> None:
    """Model (save_pretrained), config.yaml and trainer state into `folder`, atomically: written
    beside it, then swapped in by renames. Only rank 0 writes; every rank waits for it."""
    if is_writer:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp)
        cfg.save(tmp)
        torch.save({"cursor": vars(cursor), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_states()}, tmp / STATE_FILE)
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier(world_size)


def find_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint (`.old` if a crash came between the two renames)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def restore(folder: Path, *, model, optimizer, scheduler, scaler, device) -> Cursor:
    """Load weights and trainer state from a checkpoint folder; returns the cursor."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if weights.is_file():
        unwrap(model).load_state_dict(load_file(weights, device=str(device)), strict=False)
    else:  # a PEFT model saves only its adapter
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(unwrap(model), load_file(folder / "adapter_model.safetensors"))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return Cursor(**state["cursor"])


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_fresh_start(out_dir: Path) -> None:
    """A directory with metrics but no checkpoint holds a run that cannot be resumed."""
    metrics = out_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        print(f"note: {out_dir} has no checkpoint; starting over")
        metrics.unlink()


def save_final(model, out_dir: Path) -> None:
    """save_pretrained into a temporary folder, then move the files in, config.json last
    (its presence with the weights marks the student as finished)."""
    tmp = out_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for file in files:
        file.replace(out_dir / file.name)
    tmp.rmdir()


def unwrap(model):
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def append_metrics(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (those steps are redone), and a
    line torn by a kill mid-write (its step is after the checkpoint, so it is redone too)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if (row := _parse_row(line)) is not None and row["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def _parse_row(line: str) -> dict | None:
    """A metrics line as a dict; None for a blank or torn one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(cfg: Config) -> None:
    train(cfg)


if __name__ == "__main__":
    run(main, "Train a student: CE baseline (distill.alpha=1), cached KD, or online KD.")

"""The training loop: one loop for every model this project trains (nanoGPT style).

`fit` trains any causal LM on a token store: a student in each mode (the CE baseline, KD from
the logit cache with no teacher in memory, online KD with the teacher resident and the
full-vocabulary KL as the reference), and the teacher when it is fine-tuned or trained from
scratch (a LoRA-wrapped or 4-bit model, CE only). `Distillation` says what the teacher
contributes; None trains on cross-entropy alone.

A run's folder gets the final model as a complete model folder (weights, config.json,
generation_config.json, the run's tokenizer and a model card: training/checkpoint.py), config.yaml
(the resolved config), metrics.jsonl (training/metrics.py), checkpoint/ and, at the words seen
in `save_at_words`, complete model folders `checkpoints/chck_<N>M/` (the BabyLM milestones). A rerun resumes from the last checkpoint and ends with the same
weights as an uninterrupted run (CPU, same seed). Ctrl-C or SIGTERM stops after writing a
checkpoint. Under `torchrun` each rank trains on its disjoint share of every batch (DDP) and
only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
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
from storage.cache import LogitCache
from storage.errors import CorruptData, ManifestMismatch
from storage.location import Remote, download_folder, locate
from storage.reader import Batch, batches_per_epoch, stream_batches
from storage.tokens import TokenStore, check_one_generation, open_token_store
from training.checkpoint import (MILESTONES_DIR, changed_settings, check_resumable,
                                 find_checkpoint, restore, run_lock, save_checkpoint, save_final,
                                 save_milestone, saved_step, unwrap)
from training.device import (autocast, autocast_dtype, barrier, is_writer as is_writer_process,
                             setup_distributed, wrap_ddp)
from training.losses import (LossTerms, ce_and_cached_kl, combine, ensemble_log_probs, full_kl,
                             mixture_targets, same_temperature, sampled_targets, shift_labels,
                             teacher_buckets)
from training.metrics import METRICS_FILE, append_metrics, read_metrics, truncate_metrics
from training.model_card import render_card
from training.tokenizer import fingerprint, load_tokenizer, tokenizer_dir


Hyper = StudentConfig | TeacherConfig
"""The loop's settings: the student's section, or the teacher's when fine-tuning it."""


@dataclass
class Distillation:
    """What the teachers contribute to the loss: their logit caches (cached mode) or the
    teachers themselves (online mode), one or several, mixed with `weights` (summing to 1) into
    the `ensemble` target ('probability' or, online only, 'logits': training/losses.py)."""

    alpha: float
    temperature: float
    caches: tuple[LogitCache, ...] = ()
    teachers: tuple[torch.nn.Module, ...] = ()
    weights: tuple[float, ...] = (1.0,)
    ensemble: str = "probability"
    k: int | None = None
    vocab_size: int = 0
    skip_shards: tuple[int, ...] = ()

    @property
    def reads_values(self) -> tuple[bool, ...]:
        """Per cache, whether the loss needs its logits and lse: not for draws at their own
        temperature, whose frequencies are the targets (`sampled_targets`)."""
        return tuple(cache.sample_temperature is None
                     or not same_temperature(cache.sample_temperature, self.temperature)
                     for cache in self.caches)


@dataclass
class Cursor:
    """Where training stands: optimizer steps done, and the next micro-batch (epoch, batch)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0
    words: int = 0
    """Words seen: the words starting in every row trained on, every rank's, repeats counted."""


def open_tokens(cfg: Config) -> tuple[TokenStore, TokenStore]:
    """The run's train and validation token stores (a missing one says to run `make data`),
    refused unless one `make data` run wrote both."""
    stores = tuple(open_token_store(locate(cfg.token_store_at(split), cfg.storage.options))
                   for split in ("train", "val"))
    check_one_generation(list(stores))
    return stores


def fit(model: torch.nn.Module, *, cfg: Config, hp: Hyper, out_dir: Path, tokens: TokenStore,
        val_tokens: TokenStore | None, distil: Distillation | None = None,
        card: dict | None = None) -> Path:
    """Train `model` on `tokens` with the settings `hp`; write `out_dir` (see module doc).

    `model`: any causal LM returning `.logits` (B, L, V); only parameters that require grad
    are optimised (a PEFT adapter trains just its LoRA weights). distil None: cross-entropy only.
    `card`: how the model was made, for the model card of every folder written (tokens and
    words seen, steps and validation perplexity are added here).
    One process trains into `out_dir` at a time (checkpoint.run_lock); another is refused.
    """
    out_dir = Path(out_dir)
    with run_lock(out_dir) if is_writer_process() else contextlib.nullcontext():
        return _fit(model, cfg=cfg, hp=hp, out_dir=out_dir, tokens=tokens,
                    val_tokens=val_tokens, distil=distil, card=card or {})


def _fit(model: torch.nn.Module, *, cfg: Config, hp: Hyper, out_dir: Path, tokens: TokenStore,
         val_tokens: TokenStore | None, distil: Distillation | None, card: dict) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint drowns ours
    section = "student" if hp is cfg.student else "teacher"
    rank, world_size, device = setup_distributed(hp.device, f"{section}.device")
    is_writer = rank == 0
    micro = micro_batch_size(hp, world_size)
    skip = distil.skip_shards if distil else ()
    shard_sequences = distil.caches[0].shard_sequences if distil and distil.caches else 0
    per_epoch = batches_per_epoch(n_sequences=tokens.n_sequences, batch_size=micro,
                                  world_size=world_size, shard_sequences=shard_sequences,
                                  skip_shards=skip) // hp.grad_accum
    if per_epoch == 0:
        raise UserError(f"{tokens.path} has {tokens.n_sequences} sequences, fewer than one batch "
                        f"of {hp.batch_size}: lower the batch size")
    total_steps = hp.max_steps or max(1, round(hp.epochs * per_epoch))
    amp_dtype = autocast_dtype(hp.precision, device)
    tokenizer_dir = run_tokenizer(cfg, tokens)
    words = tokens.words_per_row()
    milestones = sorted(getattr(hp, "save_at_words", ()))  # students only
    if milestones and words is None:
        raise UserError(f"{tokens.path} holds no word counts (written by an earlier version): "
                        f"rerun `make data`, or set {section}.save_at_words=[] to save no "
                        "milestones")

    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(device)
    optimizer = make_optimizer(model, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=hp.warmup_steps, total=total_steps,
                                          schedule=hp.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    torch.manual_seed(hp.seed + rank)  # dropout; the init came from the model's own seed
    cursor, history, changes = Cursor(), [], {}
    checkpoint = out_dir / "checkpoint"
    if (found := find_checkpoint(checkpoint)) is not None:
        changes = changed_settings(found, cfg, section=section)
        if changes:  # checked before restoring: another shape would not even load
            check_resumable(changes, checkpoint=found, step=saved_step(found), section=section,
                            allowed=hp.resume_with_new_settings)
        state = restore(found, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, device=device)
        cursor, history = Cursor(**state["cursor"]), list(state.get("history", []))
        if cursor.step > total_steps:
            raise UserError(f"{found} is at step {cursor.step}, past the {total_steps} steps "
                            f"this config trains: raise {section}.max_steps or epochs, or "
                            f"delete {out_dir} to train anew")
        if changes:
            apply_hyperparameters(optimizer, scheduler, hp, step=cursor.step, total=total_steps)
            history.append(f"from step {cursor.step}: " + ", ".join(
                f"{key} {then!r} -> {now!r}" for key, (then, now) in changes.items()))
        if is_writer:
            print(f"resuming {out_dir} from step {cursor.step} of {total_steps}"
                  + (f" ({history[-1]})" if changes else ""))
    elif is_writer:
        check_fresh_start(out_dir)
    if is_writer:
        cfg.save(out_dir, notes=tuple(history))
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
            words_before = cursor.words
            row = train_step(trained, optimizer, scaler, data, distil, hp=hp, cursor=cursor,
                             device=device, amp_dtype=amp_dtype, world_size=world_size,
                             words=words)
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
            if changes:  # the first step under the new settings says what changed
                row["settings_changed"] = {key: list(pair) for key, pair in changes.items()}
                changes = {}
            if is_writer:
                append_metrics(out_dir / METRICS_FILE, row)
                for reached in (m for m in milestones if words_before < m <= cursor.words):
                    save_milestone(model, out_dir / MILESTONES_DIR / milestone_name(reached),
                                   tokenizer_dir=tokenizer_dir, card=render_card(
                                       f"{out_dir.name} at {milestone_name(reached)}",
                                       card_facts(card, model, cursor, row=row,
                                                  counted_words=True)))
            if last or stopping or (hp.checkpoint_every and cursor.step % hp.checkpoint_every == 0):
                save_checkpoint(checkpoint, model=model, cfg=cfg, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, cursor=cursor,
                                history=history, is_writer=is_writer, world_size=world_size)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                            **({"val_ppl": f"{row['val_ppl']:.2f}"} if "val_ppl" in row else {}))
            bar.update(1)
            if stopping and not last:
                raise KeyboardInterrupt
    if is_writer:
        last_val = next((r for r in reversed(read_metrics(out_dir / METRICS_FILE))
                         if "val_ppl" in r), {})
        save_final(model, out_dir, tokenizer_dir=tokenizer_dir,
                   card=render_card(out_dir.name, card_facts(
                       card, model, cursor, row=last_val, counted_words=words is not None)))
        print(f"{out_dir}: {cursor.step} steps, {cursor.tokens:,} tokens"
              + (f", val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}" if "val_loss" in row else ""))
    barrier(world_size)
    return out_dir


def train_step(model, optimizer, scaler, data: Iterator[tuple[int, int, Batch]],
               distil: Distillation | None, *, hp: Hyper, cursor: Cursor, device: torch.device,
               amp_dtype: torch.dtype | None, world_size: int,
               words: np.ndarray | None = None) -> dict:
    """One optimizer step over `hp.grad_accum` micro-batches; returns the step's metrics.
    `words`: the words starting in each row of the token store, for the words seen.

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
    sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, kl, tokens, words
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or world_size == 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            terms = batch_losses(model, batch, distil, device=device, amp_dtype=amp_dtype)
            scaler.scale(terms.loss * (terms.n_tokens / step_tokens)).backward()
        sums += torch.tensor([float(terms.loss.detach()) * terms.n_tokens,
                              float(terms.ce) * terms.n_tokens, float(terms.kl) * terms.n_tokens,
                              terms.n_tokens,
                              0 if words is None else int(words[batch.indices].sum())],
                             dtype=torch.float64)
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
    cursor.words += int(sums[4])
    loss, ce, kl = (float(v / sums[3]) for v in sums[:3])
    return {"tokens": cursor.tokens, **({"words": cursor.words} if words is not None else {}),
            "loss": loss, "ce": ce, "kl": kl, "step_tokens": int(sums[3])}


def batch_losses(model, batch: Batch, distil: Distillation | None, *, device: torch.device,
                 amp_dtype: torch.dtype | None) -> LossTerms:
    """Forward one micro-batch and return its loss terms (means over its non-ignored tokens)."""
    tokens = torch.from_numpy(batch.tokens).to(device, non_blocking=True)
    labels = shift_labels(tokens)
    # Copied before the forward and without blocking: a blocking copy after it waits for the
    # forward's kernels, and the GPU then idles while the loss and backward are launched.
    blocks = [[None if array is None else torch.from_numpy(array).to(device, non_blocking=True)
               for array in (block.ids, block.logits, block.lse)] for block in batch.teachers]
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
    if distil.teachers:
        with torch.no_grad(), autocast(device, amp_dtype):
            teacher_logits = [teacher(input_ids=tokens, attention_mask=unpadded).logits
                              for teacher in distil.teachers]
        log_p = ensemble_log_probs(teacher_logits, list(distil.weights), temperature=t,
                                   target=distil.ensemble)
        ce, _ = ce_and_cached_kl(logits, labels)
        kl = full_kl(logits, log_p, temperature=t, labels=labels)
    else:
        targets = []
        for cache, (ids, cached_logits, lse) in zip(distil.caches, blocks):
            if cache.sample_temperature is not None:
                log_p, p_tail = sampled_targets(ids, cached_logits, temperature=t,
                                                sample_temperature=cache.sample_temperature)
            else:
                log_p, p_tail = teacher_buckets(
                    cached_logits, lse, temperature=t, temperatures=cache.temperatures,
                    vocab_size=distil.vocab_size)
            targets.append((ids, log_p, p_tail))
        ids, log_p, p_tail = mixture_targets(targets, list(distil.weights))
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


def run_tokenizer(cfg: Config, tokens: TokenStore) -> Path:
    """The run's tokenizer folder, which every model folder gets a copy of; refused when missing
    or not the tokenizer `tokens` was made with (checked before any training). Token stores in
    object storage keep a copy beside them (`make data` puts it there): a run on another machine
    fetches it into its run_dir."""
    folder = tokenizer_dir(cfg.run_path)
    if isinstance(tokens.path, Remote) and not (folder / "tokenizer.json").is_file():
        download_folder(tokens.path.parent / "tokenizer", folder)
    if fingerprint(load_tokenizer(cfg.run_path)) != tokens.tokenizer_fingerprint:
        raise ManifestMismatch(f"{folder} is not the tokenizer {tokens.path} was made with: "
                               "rerun `make data` to rebuild both")
    return folder


def milestone_name(words: int) -> str:
    """The BabyLM revision name of a checkpoint at `words` seen: chck_1M, chck_20M, chck_500K."""
    return f"chck_{words // 1_000_000}M" if words % 1_000_000 == 0 else f"chck_{words // 1000}K"


def card_facts(card: dict, model, cursor: Cursor, *, row: dict, counted_words: bool) -> dict:
    """The facts of a model card: how the model was made (`card`), its shape, and how far it
    trained (steps, tokens and words seen, the validation perplexity of `row` if it has one)."""
    config = unwrap(model).config
    return {**card, "architecture": config.model_type,
            "parameters": sum(p.numel() for p in unwrap(model).parameters()),
            "n_positions": getattr(config, "n_positions", None)
            or getattr(config, "max_position_embeddings", None), "steps": cursor.step,
            "tokens_seen": cursor.tokens, "words_seen": cursor.words if counted_words else None,
            "val_perplexity": row.get("val_ppl")}


def prefetch_depth(device: torch.device) -> int:
    """Batches the reader prepares ahead in a background thread: on an accelerator, 4, so reading
    hides behind the device's step. On the CPU, none: the batch is read in the training loop. A
    reader thread there shares the cores and the GIL with the step, so it hid nothing, and its
    malloc arena held more memory; training on one torch thread, with a core left free for the
    reader, did not change that (docs/log.md)."""
    return 0 if device.type == "cpu" else 4


def micro_batches(tokens: TokenStore, distil: Distillation | None, *, hp: Hyper, micro: int,
                  cursor: Cursor, rank: int, world_size: int,
                  prefetch: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batch index, Batch) from the cursor on, epoch after epoch (whole steps only)."""
    caches = distil.caches if distil else ()
    skip = distil.skip_shards if distil else ()
    shard_sequences = caches[0].shard_sequences if caches else 0
    usable = batches_per_epoch(n_sequences=tokens.n_sequences, batch_size=micro,
                               world_size=world_size, shard_sequences=shard_sequences,
                               skip_shards=skip) // hp.grad_accum * hp.grad_accum
    epoch, start = cursor.epoch, cursor.batch
    while True:
        if start < usable:
            batches = stream_batches(tokens=tokens, caches=caches, batch_size=micro, seed=hp.seed,
                                     epoch=epoch, start_batch=start, rank=rank,
                                     world_size=world_size, k=distil.k if caches else None,
                                     values=distil.reads_values if caches else True,
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
                                      "the damaged shards", problem=exc.problem) from None
        epoch, start = epoch + 1, 0


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


def apply_hyperparameters(optimizer: torch.optim.AdamW, scheduler, hp: Hyper, *, step: int,
                          total: int) -> None:
    """After restoring a checkpoint under new settings: the optimizer's lr and weight decay
    become `hp`'s (the schedule's other settings are read from `hp` at every step)."""
    decays = (hp.weight_decay, 0.0)  # make_optimizer's groups: matrices, then the rest
    scheduler.base_lrs = [hp.lr] * len(optimizer.param_groups)
    factor = lr_factor(step, warmup=hp.warmup_steps, total=total, schedule=hp.schedule)
    for group, decay in zip(optimizer.param_groups, decays):
        group.update(initial_lr=hp.lr, lr=hp.lr * factor, weight_decay=decay)


def make_optimizer(model: torch.nn.Module, hp: Hyper) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and LayerNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=(0.9, 0.95))


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


def check_fresh_start(out_dir: Path) -> None:
    """A directory with metrics but no checkpoint holds a run that cannot be resumed."""
    metrics = out_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        print(f"note: {out_dir} has no checkpoint; starting over")
        metrics.unlink()

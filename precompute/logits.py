"""The teacher-logits job (`make teacher-logits`, `python -m precompute.logits`).

Runs the teacher (see `training.models.resolve_teacher` for which one) in inference mode over
every sequence of `tokens/train.zarr` (and `tokens/val.zarr` when "val" is in cache.splits) and
writes its top-k logits (descending; or, with cache.selection = 'sample', k draws from its
softmax at cache.sample_temperature) plus the full-vocabulary logsumexp at each of
cache.temperatures to `cache/<split>.zarr`, shard by shard; with cache.selection = 'draws', only
ids drawn at each of cache.temperatures (cache.draws of them), counted. Before the first shard
it prints the teacher's head mass at the temperatures the config distils at, and warns when a
top-k cache would hold under half of it (`head_mass_line`). A config with several named teachers
(`teachers:`) caches each in turn into `caches/<name>/<split>.zarr`, or the one named by
`--teacher NAME` (`make teacher-logits TEACHER=NAME`).

* Batches run on the device while a background writer thread (bounded queue) compresses and
  writes finished shards, so compute and I/O overlap.
* Batches start at shard boundaries, so a shard's values do not depend on which shards ran
  before it: an interrupted job rerun resumes from the cache's done-map and ends byte-identical
  to an uninterrupted run (CPU; docs/architecture.md, "Reliability", says how, and docs/log.md
  what is still open).
* Under `torchrun --nproc_per_node=N` each rank computes its own disjoint set of shards; every
  shard is also claimed through the cache's inter-process lock, so two jobs started on one cache
  share the work instead of corrupting it.
* Refused with one line (exit 2, nothing overwritten): k larger than the vocabulary, a token store
  made with another tokenizer than the teacher's, an existing cache made by another teacher.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from configs import CacheConfig, Config, UserError
from configs.cli import chosen_teachers, teacher_option
from storage.cache import LEASE_SECONDS, NO_VALUES, cache_bytes, create_cache
from storage.location import Remote, locate
from storage.tokens import TokenStore, open_token_store
from training.device import barrier, setup_distributed
from training.models import (TeacherSource, check_vocabulary, load_teacher, resolve_teacher,
                             teacher_manifest)

WRITE_QUEUE_SHARDS = 2
"""Finished shards waiting for the writer; bounds memory while compute runs ahead of I/O."""
DRAW_BLOCK_ELEMENTS = 1 << 26
"""Probabilities the sampled job draws from at once (256 MB in float32): the tempered softmax and
its cumulative sums are as large as the logits they draw from, so drawing a whole
GPT-2-vocabulary batch at once would add two tensors of the logits' size to the job's peak GPU
memory (docs/log.md)."""


class Sampling(NamedTuple):
    """cache.selection = 'sample': draw from softmax(logits / temperature), seeded."""

    temperature: float
    seed: int


class CountedDraws(NamedTuple):
    """cache.selection = 'draws': draws[i] ids drawn at temperatures[i], ids only, seeded."""

    temperatures: tuple[float, ...]
    draws: tuple[int, ...]
    seed: int


def teacher_topk(model, input_ids: torch.Tensor, *, k: int, temperatures: tuple[float, ...],
                 sampling: Sampling | CountedDraws | None = None, first_row: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The teacher's top-k (or k sampled entries) and tempered normalisers at every position.

    input_ids: (B, L) int64, rows first_row.. of the token store. Returns ids (B, L, k) int32,
    descending by logit; logits (B, L, k) float32, raw (T = 1); lse (B, L, n_T) float32,
    logsumexp over the full vocabulary of logits / T for each T. Computed in float32 whatever the
    teacher's dtype. With `sampling`, the ids are k systematic draws (`_draw`) from
    softmax(logits / sampling.temperature) by a generator seeded with (seed, first_row), so a
    batch's draws do not depend on what ran before it; repeats are adjacent (ties by id). With
    `CountedDraws`, ids (B, L, sum(draws)) are the draws at each temperature one after the
    other, and logits and lse are None.
    """
    return _select(_forward(model, input_ids), k=k, temperatures=temperatures,
                   sampling=sampling, first_row=first_row)


def _forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's logits (B, L, V) in float32 for rows `input_ids` (B, L)."""
    # Packed rows hold <|endoftext|>, the pad id: an explicit mask says they are not padded
    # (without one transformers warns on every run).
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 use_cache=False).logits.float()


def _select(logits: torch.Tensor, *, k: int, temperatures: tuple[float, ...],
            sampling: Sampling | CountedDraws | None = None, first_row: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`teacher_topk` after the forward: what the cache stores from the logits (B, L, V)."""
    if isinstance(sampling, CountedDraws):
        ids = torch.cat([_draw(logits, k=m, sampling=Sampling(t, sampling.seed),
                               first_row=first_row)[0]
                         for t, m in zip(sampling.temperatures, sampling.draws)], dim=-1)
        return ids.to(torch.int32), None, None
    if sampling is None:
        values, ids = torch.topk(logits, k, dim=-1, sorted=True)
        top = values[..., :1]  # the max, so exp never overflows; reusing it saves a pass per T
    else:
        ids, values = _draw(logits, k=k, sampling=sampling, first_row=first_row)
        top = logits.amax(-1, keepdim=True)
    lse = torch.stack([_sum_exp(logits - top, t).log_() + top[..., 0] / t
                       for t in temperatures], dim=-1)
    return ids.to(torch.int32), values, lse


def _draw(logits: torch.Tensor, *, k: int, sampling: Sampling, first_row: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """k systematic draws per position from p = softmax(logits / T), sorted by (logit descending,
    id).

    Systematic sampling: one uniform offset u per position and the k points (u + j) / k,
    j = 0..k-1, on p's cumulative sum; an id is drawn once for each point in its interval, so
    exactly floor(k p) or ceil(k p) times, k p on average. Independent draws (multinomial) give
    each id the same mean count with a binomial spread around it, and that noise in the student's
    target cost it quality at no saving (docs/topk-vs-sampled.md). Drawn DRAW_BLOCK_ELEMENTS at a
    time; the offsets are drawn first, for the whole batch, so the block size never changes a
    cache."""
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(sampling.seed * 1_000_003 + first_row)
    rows = logits.flatten(0, 1)
    offsets = torch.rand(rows.shape[0], 1, generator=generator, device=rows.device)
    points = (offsets + torch.arange(k, device=rows.device)) / k
    per_block = max(1, DRAW_BLOCK_ELEMENTS // rows.shape[-1])
    ids = torch.cat([_systematic(block, block_points, sampling.temperature)
                     for block, block_points in zip(rows.split(per_block), points.split(per_block))])
    ids = ids.view(*logits.shape[:2], k)  # ascending: the points ascend
    values = logits.gather(-1, ids)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), values


def _systematic(rows: torch.Tensor, points: torch.Tensor, temperature: float) -> torch.Tensor:
    """The id whose interval of the cumulative softmax(rows / T) holds each point of [0, 1)."""
    cumulative = torch.softmax(rows / temperature, -1).cumsum_(-1)
    # float32 sums end a little off 1: scaling the points to the last one keeps every point inside
    ids = torch.searchsorted(cumulative, points * cumulative[:, -1:], right=True)
    return ids.clamp_(max=rows.shape[-1] - 1)


def _sum_exp(shifted: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum(exp(shifted / T)) over the last dimension, in place on `shifted` (a temporary)."""
    if temperature != 1:
        shifted.div_(temperature)
    return shifted.exp_().sum(-1)


def cache_split(model, *, source: TeacherSource, teacher: dict, tokens_path: Path | Remote,
                cache_path: Path | Remote, cfg: Config, device: torch.device, rank: int = 0,
                world_size: int = 1, barrier=lambda: None) -> dict:
    """Check the inputs, then fill the logit cache of one token store with `model` (loaded from
    `source`; `teacher` is its manifest entry) as `cfg.cache` says; see `write_cache`."""
    store = open_token_store(tokens_path)
    check_inputs(model, store=store, cfg=cfg, source=source, where=str(tokens_path))
    c = cfg.cache
    return write_cache(model, store=store, cache_path=cache_path, teacher=teacher, k=c.k,
                       temperatures=tuple(c.temperatures), sampling=sampling_of(c),
                       distilled_at=distilled_temperatures(cfg),
                       value_code=c.value_code, chunk_sequences=c.chunk_sequences,
                       shard_chunks=c.shard_chunks,
                       batch_size=c.batch_size, device=device, rank=rank,
                       world_size=world_size, barrier=barrier,
                       lease_seconds=cfg.storage.lease_seconds)


def sampling_of(cache: CacheConfig) -> Sampling | CountedDraws | None:
    """What `cache.selection` draws: nothing for 'topk', else the draws' temperatures and seed."""
    if cache.selection == "sample":
        return Sampling(cache.sample_temperature, cache.sample_seed)
    if cache.selection == "draws":
        return CountedDraws(tuple(cache.temperatures), cache.draws_per_temperature,
                            cache.sample_seed)
    return None


def write_cache(model, *, store: TokenStore, cache_path: Path | Remote, teacher: dict, k: int,
                temperatures: tuple[float, ...], sampling: Sampling | CountedDraws | None = None,
                value_code: str = "float16", chunk_sequences: int = 32, shard_chunks: int = 16,
                batch_size: int = 32, device: torch.device | str = "cpu", rank: int = 0,
                world_size: int = 1, barrier=lambda: None, progress: bool = True,
                distilled_at: tuple[float, ...] = (), lease_seconds: float = LEASE_SECONDS) -> dict:
    """Run `model` over `store` and write (or resume) its top-k logit cache at `cache_path`.

    `teacher`: the manifest's teacher entry (name, fingerprint, dtype, quantization, adapter).
    `sampling`: store k draws per position instead of the top k, or counted draws at each
    temperature (recorded in the manifest; k and value_code then follow from the draws).
    `distilled_at`: the temperatures students will distil at; the teacher's head mass at each is
    printed from the first batch computed (`head_mass_line`). `cache_path` may be a folder or a
    place in object storage (`lease_seconds`: the term of its shards' leases; storage.lease).
    `barrier` synchronises ranks:
    rank 0 creates the cache before the others open it, and finishes it after everyone has
    written. Returns this rank's {"tokens" computed, "seconds", "bytes" of the cache on disk,
    "total_tokens" of the store}.
    """
    manifest = {"teacher": teacher, "tokenizer_fingerprint": store.tokenizer_fingerprint,
                "token_store_fingerprint": store.fingerprint}
    if isinstance(sampling, CountedDraws):
        temperatures, k, value_code = sampling.temperatures, sum(sampling.draws), NO_VALUES
        manifest["selection"] = {"kind": "draws", "draws": list(sampling.draws),
                                 "seed": sampling.seed}
    elif sampling is not None:  # top-k caches keep the manifest they always had
        manifest["selection"] = {"kind": "sample", **sampling._asdict()}

    def create():
        return create_cache(
            cache_path, n_sequences=store.n_sequences, seq_len=store.seq_len, k=k,
            vocab_size=store.vocab_size, temperatures=temperatures, value_code=value_code,
            chunk_sequences=chunk_sequences, shard_chunks=shard_chunks, manifest=manifest,
            lease_seconds=lease_seconds)

    writer = create() if rank == 0 else None
    if rank == 0:  # a done shard damaged since it was written is computed again
        for problem in writer.reopen_damaged():
            print(f"note: {cache_path}: {problem}; computing the shard again")
    barrier()
    writer = writer or create()
    name = store.path.stem
    if pending := writer.pending_shards(rank=rank, world_size=world_size):
        logits = _warm_up(model, store, writer, pending[0], batch_size=batch_size, k=k,
                          temperatures=temperatures, sampling=sampling,
                          device=torch.device(device))
        if rank == 0 and distilled_at:
            print(head_mass_line(logits, k=k, temperatures=distilled_at, topk=sampling is None))
        del logits  # (B, L, V): as large as a batch's forward
    started = time.perf_counter()  # after the warm-up, as after loading the model
    computed = _run_shards(model, store=store, writer=writer, rank=rank, world_size=world_size,
                           k=k, temperatures=temperatures, sampling=sampling,
                           batch_size=batch_size, device=torch.device(device),
                           desc=f"{name} r{rank}" if world_size > 1 else name,
                           show=progress and rank == 0)
    seconds = time.perf_counter() - started
    barrier()
    if rank == 0:
        writer.finish()
    return {"tokens": computed * store.seq_len, "seconds": seconds,
            "bytes": cache_bytes(cache_path), "total_tokens": store.n_sequences * store.seq_len}


def check_inputs(model, *, store, cfg: Config, source: TeacherSource, where: str) -> None:
    """Refuse inputs the teacher cannot cache correctly, before anything is written."""
    vocab = model.config.vocab_size
    if cfg.cache.k > vocab:
        raise UserError(f"cache.k = {cfg.cache.k} is larger than the teacher's vocabulary ({vocab})")
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None)
    if context is not None and store.seq_len > context:
        raise UserError(f"{where}: rows of {store.seq_len} tokens are longer than the teacher's "
                        f"context of {context} positions")
    check_vocabulary(model, vocab_size=store.vocab_size,
                     tokenizer_fingerprint=store.tokenizer_fingerprint,
                     source=source, where=where)


def _run_shards(model, *, store, writer, rank: int, world_size: int, k: int, temperatures,
                sampling: Sampling | None, batch_size: int, device: torch.device, desc: str,
                show: bool) -> int:
    """Compute this rank's pending shards, handing each finished one to the writer thread.

    Returns the number of sequences computed here (shards another process claimed are skipped).
    """
    pending = writer.pending_shards(rank=rank, world_size=world_size)
    total = sum(stop - start for start, stop in map(writer.shard_rows, pending)) * store.seq_len
    finished: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_SHARDS)
    failure: list[BaseException] = []
    thread = threading.Thread(target=_write_shards, args=(finished, writer, failure),
                              name="cache-writer", daemon=True)
    thread.start()
    computed = 0
    try:
        with torch.inference_mode(), tqdm(total=total, desc=desc, unit="tok", unit_scale=True,
                                          disable=not show) as bar:
            for claim in writer.claimed_shards(rank=rank, world_size=world_size):
                shard = claim.shard
                start, stop = writer.shard_rows(shard)
                try:
                    tokens = torch.from_numpy(store.read(start, stop).astype(np.int64))
                    outputs = []
                    # Batches start at the shard's first row: a shard's bytes never depend on
                    # which shards ran before it (resume and multi-rank runs are byte-identical).
                    for first in range(0, stop - start, batch_size):
                        batch = tokens[first:first + batch_size].to(device, non_blocking=True)
                        outputs.append(tuple(
                            part if part is None  # counted draws: no logits, no lse
                            else part.to("cpu", non_blocking=True)  # a no-op on the CPU
                            for part in teacher_topk(model, batch, k=k, temperatures=temperatures,
                                                     sampling=sampling, first_row=start + first)))
                        bar.update(batch.numel())
                    copied = _copy_done_event(device)
                    _put(finished, (shard, claim, outputs, copied), thread, failure)
                except BaseException:  # not handed to the writer: release the shard here
                    claim.release()
                    raise
                computed += stop - start
    finally:
        try:
            _put(finished, None, thread, failure)
            thread.join()
        finally:
            _release_unwritten(finished)
    if failure:
        raise failure[0]
    return computed


def _warm_up(model, store, writer, shard: int, *, batch_size: int, k: int, temperatures,
             sampling: Sampling | CountedDraws | None, device: torch.device) -> torch.Tensor:
    """One forward of a shard's first batch, thrown away, so that every stored batch comes from
    a later call of the teacher's kernels: a kernel's first call in a process may round
    differently, and the cache differences between runs traced so far point to a first batch
    (docs/log.md). Costs one batch per job. Returns the batch's logits (B, L, V), from which the
    job reports the teacher's head mass."""
    start, stop = writer.shard_rows(shard)
    rows = torch.from_numpy(store.read(start, min(stop, start + batch_size)).astype(np.int64))
    with torch.inference_mode():
        logits = _forward(model, rows.to(device))
        _select(logits, k=k, temperatures=temperatures, sampling=sampling, first_row=start)
    return logits


HEAD_MASS_WARNING = 0.5
"""Below this share of the teacher's tempered probability in its top k, a top-k cache loses much
of what KD from the full distribution gives (docs/topk-vs-sampled.md): the job says so."""


def head_mass_line(logits: torch.Tensor, *, k: int, temperatures: tuple[float, ...],
                   topk: bool) -> str:
    """One line: the teacher's mean head mass (probability in its top k) at each temperature
    students distil at, from `logits` (B, L, V); for a top-k cache, a warning where it is below
    HEAD_MASS_WARNING, saying what to use instead."""
    k = min(k, logits.shape[-1])
    masses = {t: torch.softmax(logits / t, -1).topk(k, dim=-1).values.sum(-1).mean().item()
              for t in temperatures}
    line = f"teacher head mass (top {k}, first batch): " + ", ".join(
        f"{mass:.2f} at T = {t:g}" for t, mass in masses.items())
    low = [t for t, mass in masses.items() if mass < HEAD_MASS_WARNING]
    if topk and low:
        line += (f"\nwarning: a top-{k} cache holds under {HEAD_MASS_WARNING:g} of the teacher's "
                 f"probability at T = {', '.join(f'{t:g}' for t in low)}, and students there "
                 "lose the tail's shape: use cache.selection=draws "
                 "(README, \"Choosing a cache\")")
    return line


def distilled_temperatures(cfg: Config) -> tuple[float, ...]:
    """The temperatures students of `cfg` distil at, ascending: distill.temperature and the
    sweep's."""
    return tuple(sorted({cfg.distill.temperature, *cfg.distill.sweep_temperatures}))


def _put(pending: queue.Queue, item, thread: threading.Thread, failure: list) -> None:
    """queue.put that gives up when the writer thread has died (its error is raised later)."""
    while thread.is_alive():
        try:
            pending.put(item, timeout=0.5)
            return
        except queue.Full:
            continue
    if failure:
        raise failure[0]


def _release_unwritten(finished: queue.Queue) -> None:
    """Close the claims of shards still queued when the writer thread stopped early (a failed
    write), so that this process can claim them again (a retry in the same process)."""
    while True:
        try:
            item = finished.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            item[1].release()


def _copy_done_event(device: torch.device):
    """A CUDA event marking that the device-to-host copies queued so far have landed; None on
    devices whose copies are synchronous."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _write_shards(pending: queue.Queue, writer, failure: list) -> None:
    """Writer thread: write each shard's host outputs, release its claim.

    Numpy only: a torch operator running in this thread while the main thread runs the teacher
    changes how the CPU kernels split their reductions, so the forward's last bits (and near-tied
    top-k ids) would vary from run to run and a resumed cache would no longer be byte-identical.
    """
    while (item := pending.get()) is not None:
        shard, claim, outputs, copied = item
        with claim:
            try:
                if copied is not None:
                    copied.synchronize()
                ids, logits, lse = (None if parts[0] is None
                                    else np.concatenate([part.numpy() for part in parts])
                                    for parts in zip(*outputs))
                writer.write_shard(shard, ids=ids, logits=logits, lse=lse)
            except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
                failure.append(exc)
                return


def _reduce(value: float, op: str) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.item()


def fill_caches(cfg: Config) -> list[dict]:
    """Cache every configured split, print a summary line per split (rank 0) and return the
    summaries (tokens computed by all ranks, seconds, bytes on disk, total tokens, path)."""
    rank, world_size, device = setup_distributed(cfg.teacher.device, "teacher.device")
    token_paths = {split: locate(cfg.token_store_at(split), cfg.storage.options)
                   for split in cfg.cache.splits}
    for path in token_paths.values():
        open_token_store(path)  # a missing store fails before the teacher is loaded
    source = resolve_teacher(cfg)
    if rank == 0:
        print(f"teacher: {source.model}" + (f" + adapter {source.adapter}" if source.adapter else "")
              + f" ({cfg.teacher.dtype}, quantization {cfg.teacher.quantization}) on {device}")
    model = load_teacher(source.model, dtype=cfg.teacher.dtype, quantization=cfg.teacher.quantization,
                         adapter=source.adapter, device=device)
    teacher = teacher_manifest(source, dtype=cfg.teacher.dtype,
                               quantization=cfg.teacher.quantization)
    summaries = []
    for split, tokens_path in token_paths.items():
        cache_path = locate(cfg.cache_at(split), cfg.storage.options)
        summary = cache_split(model, source=source, teacher=teacher, tokens_path=tokens_path,
                              cache_path=cache_path, cfg=cfg, device=device, rank=rank,
                              world_size=world_size, barrier=partial(barrier, world_size))
        if world_size > 1:  # the summary speaks for all ranks: tokens add up, time is the slowest
            summary["tokens"] = int(_reduce(summary["tokens"], "sum"))
            summary["seconds"] = _reduce(summary["seconds"], "max")
        summaries.append({"split": split, "path": str(cache_path), **summary})
        if rank == 0:
            print(summary_line(summaries[-1]))
    if rank == 0:
        cfg.save(cfg.cache_dir)
    return summaries


def summary_line(summary: dict) -> str:
    """'cached train: 1.2M tokens in 30.0 s, 40,000 tokens/s, 310 bytes/token (runs/x/cache/...)'"""
    per_token = summary["bytes"] / summary["total_tokens"]
    if not summary["tokens"]:
        return (f"cached {summary['split']}: already complete, {per_token:.1f} bytes/token on "
                f"disk ({summary['path']})")
    rate = summary["tokens"] / summary["seconds"]
    return (f"cached {summary['split']}: {summary['tokens']:,} tokens computed in "
            f"{summary['seconds']:.1f} s, {rate:,.0f} tokens/s, {per_token:.1f} bytes/token "
            f"on disk ({summary['path']})")


def main(cfg: Config, args: argparse.Namespace) -> None:
    for view in chosen_teachers(cfg, args):
        fill_caches(view)


if __name__ == "__main__":
    from configs.cli import run

    run(main, "Run the teacher once over the token stores and write its logit cache.",
        extra=teacher_option)

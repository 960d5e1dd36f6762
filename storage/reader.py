"""Training-order streaming of a token store, with the rows of logit caches alongside when given
(one cache, or several teachers' caches of the same token store for an ensemble).

The epoch order is a pure function of (seed, epoch, n_sequences, block_rows, batch_size,
world_size, rank, shuffle_buffer, skip_shards): blocks of `block_rows` consecutive rows (one
cache chunk by default) are permuted with rng(seed, epoch); the resulting row stream is cut into
`world_size` equal contiguous slices (rank r reads only its slice); inside a slice, consecutive
windows of `shuffle_buffer` rows are permuted with rng(seed, epoch, rank); the remainder that
does not fill a batch is dropped, so every rank yields the same number of batches. `start_batch`
skips batches without reading them, so a resumed epoch continues exactly. Without caches the
same order streams tokens only (the CE baseline sees the rows the distilled student sees).

Reads are always contiguous runs of rows (a block, or less at a slice edge): a random
single-sequence read costs many times more per row (docs/log.md). A background thread reads
blocks, keeps them encoded as stored, and decodes and assembles whole batches ahead of the
consumer into a bounded queue: the training step only wraps ready arrays (or, with prefetch=0,
the consumer's thread reads each batch when it asks for it). It stops when the consumer stops.
From object storage every read waits a round trip, so there the reads of the next
`REMOTE_READ_AHEAD` blocks are in flight at once, on threads of their own.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Collection, Iterator, Sequence

import numpy as np

from storage.cache import LogitCache, TeacherBlock
from storage.location import Remote
from storage.tokens import TokenStore

DEFAULT_BLOCK_ROWS = 32
"""Rows per shuffled block; matches the default cache chunk (`cache.chunk_sequences`)."""
REMOTE_READ_AHEAD = 8
"""Blocks read at once when a store is in object storage: with a round trip of 20 ms a block
of 32 rows x 128 tokens at a time would cap reading at ~200k tokens/s; 8 in flight, ~1.6M."""


@dataclass
class Batch:
    """indices int64 (B,): sequence rows; tokens int64 (B, L); teachers: one decoded
    TeacherBlock per cache streamed (ids int64 (B, L, k), logits float32 (B, L, k) and lse
    float32 (B, L, n_T), these two None for a cache streamed without values), none without."""

    indices: np.ndarray
    tokens: np.ndarray
    teachers: tuple[TeacherBlock, ...] = ()


def kept_rows(*, n_sequences: int, shard_sequences: int = 0,
              skip_shards: Collection[int] = ()) -> np.ndarray:
    """int64 (n_kept,): row indices left after removing the rows of `skip_shards`."""
    rows = np.arange(n_sequences, dtype=np.int64)
    if skip_shards:
        rows = rows[~np.isin(rows // shard_sequences, np.fromiter(skip_shards, dtype=np.int64))]
    return rows


def epoch_order(*, n_sequences: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 256,
                block_rows: int = DEFAULT_BLOCK_ROWS, shard_sequences: int = 0,
                skip_shards: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """This rank's epoch: (stream, order).

    stream int64 (m,): the rank's slice of the block-shuffled row stream (the read order).
    order int64 (n_batches * batch_size,): positions into `stream` in yield order.
    """
    rows = kept_rows(n_sequences=n_sequences, shard_sequences=shard_sequences,
                     skip_shards=skip_shards)
    if shuffle:
        blocks = np.split(rows, np.flatnonzero(np.diff(rows // block_rows)) + 1)
        permutation = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        rows = np.concatenate([blocks[b] for b in permutation]) if blocks else rows
    share = len(rows) // world_size
    stream = rows[rank * share:(rank + 1) * share]
    used = share // batch_size * batch_size
    order = np.arange(share, dtype=np.int64)
    if shuffle:
        rng = np.random.default_rng([seed, epoch, rank])
        for start in range(0, share, shuffle_buffer):
            window = order[start:start + shuffle_buffer]
            window[:] = rng.permutation(window)
    return stream, order[:used]


def batches_per_epoch(*, n_sequences: int, batch_size: int, world_size: int = 1,
                      shard_sequences: int = 0, skip_shards: Collection[int] = ()) -> int:
    """Batches each rank yields per epoch (the same on every rank; the remainder is dropped)."""
    n_kept = len(kept_rows(n_sequences=n_sequences, shard_sequences=shard_sequences,
                           skip_shards=skip_shards))
    return n_kept // world_size // batch_size


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs covering the increasing-by-one stretches of `rows`."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def _read_block(rows: np.ndarray, tokens: TokenStore, caches: Sequence[LogitCache],
                k: int | None, values: Sequence[bool]) -> dict[str, np.ndarray]:
    """Fields of `rows` (contiguous runs), read one run at a time, concatenated: tokens, and
    ids.i, logits.i, lse.i (or counts.i) of cache i. Cache fields stay as stored (small integer
    ids, encoded values): a shuffle window of them takes a quarter of its decoded size, and
    `_assemble` decodes only the rows a batch uses."""
    parts = []
    for start, stop in _runs(rows):
        part = {"tokens": tokens.read(start, stop).astype(np.int64)}
        for i, (cache, with_values) in enumerate(zip(caches, values)):
            block = cache.read(start, stop, k=k, decode=False, values=with_values)
            part[f"ids.{i}"] = block.ids
            if block.counts is not None:
                part[f"counts.{i}"] = block.counts
            if block.logits is not None:
                part.update({f"logits.{i}": block.logits, f"lse.{i}": block.lse})
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def stream_batches(*, tokens: TokenStore, caches: Sequence[LogitCache] = (), batch_size: int,
                   seed: int, epoch: int, start_batch: int = 0, rank: int = 0,
                   world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 256,
                   prefetch: int = 4, k: int | None = None, values: bool | Sequence[bool] = True,
                   skip_shards: Collection[int] = (),
                   block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[Batch]:
    """Yield this rank's batches of one epoch, from batch `start_batch` on (see module docstring).

    caches: logit caches row-aligned with `tokens`, whose rows each batch carries (`teachers`).
    shuffle=False gives rows in order (validation). k limits the teacher entries read;
    values=False reads the caches' ids alone (the blocks' logits and lse None), or one flag
    per cache. skip_shards: shards whose rows are left out (the caches share their shard
    layout). The same arguments always give the same batches; `block_rows` must stay the same
    for a resumed run and its CE baseline. A background thread reads, decodes and assembles up
    to `prefetch` batches ahead of the consumer; with prefetch=0 each batch is read when the
    consumer asks for it, in its thread.
    """
    caches = tuple(caches)
    values = (values,) * len(caches) if isinstance(values, bool) else tuple(values)
    for cache in caches:
        if (cache.n_sequences, cache.seq_len) != (tokens.n_sequences, tokens.seq_len):
            raise ValueError(f"cache rows {cache.n_sequences}x{cache.seq_len} do not match the "
                             f"token store's {tokens.n_sequences}x{tokens.seq_len}")
    if len({cache.shard_sequences for cache in caches}) > 1:
        raise ValueError("caches streamed together must share their shard layout")
    if skip_shards and not caches:
        raise ValueError("skip_shards needs the cache whose shards they are")
    stream, order = epoch_order(
        n_sequences=tokens.n_sequences, batch_size=batch_size, seed=seed, epoch=epoch,
        rank=rank, world_size=world_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        block_rows=block_rows, shard_sequences=caches[0].shard_sequences if caches else 0,
        skip_shards=skip_shards)
    first = start_batch * batch_size
    if first >= len(order):
        return
    batches = _assemble(stream, order, first=first, batch_size=batch_size,
                        window=shuffle_buffer if shuffle else 1, block_rows=block_rows,
                        tokens=tokens, caches=caches, k=k, values=values)
    yield from _in_background(batches, depth=prefetch) if prefetch > 0 else batches


def _assemble(stream: np.ndarray, order: np.ndarray, *, first: int, batch_size: int,
              window: int, block_rows: int, tokens: TokenStore, caches: tuple[LogitCache, ...],
              k: int | None, values: tuple[bool, ...]) -> Iterator[Batch]:
    """The batches of `order` from position `first` on, reading `stream` piece by piece as they
    need it and forgetting pieces wholly behind the current shuffle window."""
    # Every slot from `first` on holds a position >= the start of its window, so reading starts
    # there and pieces wholly before it are never read.
    pieces = _pieces(stream, first // window * window, len(stream), block_rows)
    remote = any(isinstance(store.path, Remote) for store in (tokens, *caches))
    blocks = _read_ahead(pieces, lambda start, stop: _read_block(
        stream[start:stop], tokens, caches, k, values), depth=REMOTE_READ_AHEAD if remote else 0)
    with contextlib.closing(blocks):  # stops the reads in flight when the consumer stops
        loaded: deque = deque()  # (first stream position, fields) of pieces still needed
        for batch_start in range(first, len(order), batch_size):
            positions = order[batch_start:batch_start + batch_size]
            # forget before reading on, so a new window never shares memory with the last one
            low = batch_start // window * window
            while loaded and loaded[0][0] + len(loaded[0][1]["tokens"]) <= low:
                loaded.popleft()
            while not loaded or loaded[-1][0] + len(loaded[-1][1]["tokens"]) <= positions.max():
                loaded.append(next(blocks))
            fields = _gather(loaded, positions)
            teachers = tuple(cache.decode(TeacherBlock(
                ids=fields[f"ids.{i}"], logits=fields.get(f"logits.{i}"),
                lse=fields.get(f"lse.{i}"), counts=fields.get(f"counts.{i}")))
                for i, cache in enumerate(caches))
            yield Batch(indices=stream[positions], tokens=fields["tokens"], teachers=teachers)


def _read_ahead(pieces: Iterator[tuple[int, int]], read, *, depth: int) -> Iterator[tuple]:
    """(start, read(start, stop)) for each piece in order; with depth > 0 up to `depth` reads run
    at once on worker threads, ahead of the caller (depth 0: each read when it is asked for)."""
    if depth == 0:
        for start, stop in pieces:
            yield start, read(start, stop)
        return
    with ThreadPoolExecutor(depth, thread_name_prefix="storage-read") as pool:
        in_flight: deque = deque()
        try:
            for start, stop in pieces:
                in_flight.append((start, pool.submit(read, start, stop)))
                if len(in_flight) == depth:
                    start, future = in_flight.popleft()
                    yield start, future.result()
            while in_flight:
                start, future = in_flight.popleft()
                yield start, future.result()
        finally:
            for _, future in in_flight:  # the caller stopped early: drop what it will not take
                future.cancel()


def _in_background(items: Iterator, *, depth: int) -> Iterator:
    """Yield `items`, produced by a background thread up to `depth` ahead of the consumer; an
    error there is raised here, and closing this generator stops and joins the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def offer(entry) -> bool:
        while not stopped.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        with contextlib.closing(items):
            try:
                for item in items:
                    if not offer((item, None)):
                        return
                offer((_END, None))
            except BaseException as exc:  # noqa: BLE001 -- raised in the consumer
                offer((None, exc))

    thread = threading.Thread(target=produce, name="storage-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stopped.set()
        thread.join()


_END = object()


def _gather(loaded: deque, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Rows at stream `positions` (B,) from the loaded pieces (in stream order), in that order:
    a row copy each, which takes less time than masks and fancy indexing per piece
    (docs/log.md)."""
    starts = np.fromiter((start for start, _ in loaded), np.int64, len(loaded))
    pieces = np.searchsorted(starts, positions, side="right") - 1
    out = {name: np.empty((len(positions), *a.shape[1:]), a.dtype)
           for name, a in loaded[0][1].items()}
    for row, (piece, position) in enumerate(zip(pieces.tolist(), positions.tolist())):
        start, fields = loaded[piece]
        for name, array in fields.items():
            out[name][row] = array[position - start]
    return out


def _pieces(stream: np.ndarray, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """[a, b) spans of stream positions, split where a block ends (rows // block_rows changes)
    so each piece is one contiguous read of at most one block."""
    if start >= stop:
        return
    segment = stream[start:stop]
    cuts = np.flatnonzero((np.diff(segment // block_rows) != 0) | (np.diff(segment) != 1)) + 1
    edges = [0, *cuts.tolist(), len(segment)]
    for a, b in zip(edges[:-1], edges[1:]):
        yield start + a, start + b


__all__ = ["Batch", "stream_batches", "batches_per_epoch", "epoch_order", "kept_rows",
           "DEFAULT_BLOCK_ROWS"]

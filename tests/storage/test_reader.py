"""Streaming reader: deterministic shuffled epochs, exact resume, disjoint ranks, clean shutdown."""

import threading
import time

import numpy as np
import pytest

from storage import batches_per_epoch, open_cache, stream_batches
from tests.storage.cachedata import N, new_writer, teacher_outputs, token_store, write_all


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    tokens = token_store(root / "tokens.zarr")
    writer = new_writer(root / "cache.zarr", tokens, value_code="float16")
    write_all(writer, teacher_outputs())
    return tokens, open_cache(root / "cache.zarr", token_store=tokens)


def indices(tokens, cache=None, **kw):
    options = dict(batch_size=4, seed=3, epoch=0, shuffle_buffer=8, block_rows=4) | kw
    caches = () if cache is None else (cache,)
    return [b.indices.tolist() for b in stream_batches(tokens=tokens, caches=caches, **options)]


def test_batches_carry_the_rows_they_name(stores):
    tokens, cache = stores
    ids, logits, _ = teacher_outputs()
    for batch in stream_batches(tokens=tokens, caches=(cache,), batch_size=5, seed=0, epoch=1,
                                k=3):
        assert batch.tokens.dtype == np.int64 and batch.tokens.shape == (5, 16)
        assert np.array_equal(batch.tokens, tokens.read(0, N)[batch.indices])
        teacher, = batch.teachers
        assert np.array_equal(teacher.ids, ids[batch.indices, :, :3])
        expected = cache.read(0, N, k=3)
        assert np.array_equal(teacher.logits, expected.logits[batch.indices])
        assert np.array_equal(teacher.lse, expected.lse[batch.indices])


def test_batches_without_values_carry_the_same_rows_and_ids(stores):
    tokens, cache = stores
    options = dict(tokens=tokens, caches=(cache,), batch_size=5, seed=0, epoch=1, k=3, prefetch=0)
    for full, ids_only in zip(stream_batches(**options), stream_batches(**options, values=False),
                              strict=True):
        assert np.array_equal(ids_only.indices, full.indices)
        (ids_only,), (full,) = ids_only.teachers, full.teachers
        assert np.array_equal(ids_only.ids, full.ids) and ids_only.ids.dtype == np.int64
        assert ids_only.logits is None and ids_only.lse is None


def test_epoch_order_is_a_function_of_seed_and_epoch(stores):
    tokens, cache = stores
    first = indices(tokens, cache)
    assert indices(tokens, cache) == first
    assert indices(tokens, cache, epoch=1) != first
    assert indices(tokens, cache, seed=4) != first
    assert sorted(sum(first, [])) == list(range(N))  # 40 rows, batch 4: nothing dropped
    assert indices(tokens) == first  # tokens only (CE baseline): the same order
    # Shuffled beyond block order: consecutive rows rarely stay neighbours.
    flat = np.array(sum(first, []))
    assert (np.diff(flat) == 1).mean() < 0.5


def test_start_batch_resumes_exactly(stores):
    tokens, cache = stores
    full = indices(tokens, cache, epoch=2)
    for start in (1, 3, 6, 9):
        assert indices(tokens, cache, epoch=2, start_batch=start) == full[start:]
    assert indices(tokens, cache, epoch=2, start_batch=len(full)) == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_equal_and_cover(stores, world_size):
    tokens, cache = stores
    shares = [indices(tokens, cache, rank=r, world_size=world_size) for r in range(world_size)]
    expected = batches_per_epoch(n_sequences=N, batch_size=4, world_size=world_size)
    assert [len(s) for s in shares] == [expected] * world_size
    rows = [row for share in shares for batch in share for row in batch]
    assert len(rows) == len(set(rows))
    assert len(rows) == expected * 4 * world_size >= N - world_size * 4  # only a remainder dropped


def test_unshuffled_is_in_order_and_skip_shards(stores):
    tokens, cache = stores
    assert sum(indices(tokens, cache, shuffle=False, batch_size=8), []) == list(range(N))
    kept = sum(indices(tokens, cache, skip_shards={1, 3}), [])
    shard_of = np.array(kept) // cache.shard_sequences
    assert sorted(kept) == [r for r in range(N) if r // cache.shard_sequences not in (1, 3)]
    assert not np.isin(shard_of, [1, 3]).any()
    assert len(kept) == 4 * batches_per_epoch(n_sequences=N, batch_size=4,
                                              shard_sequences=cache.shard_sequences,
                                              skip_shards={1, 3})


def test_reading_in_the_consumers_thread_gives_the_same_batches(stores):
    tokens, cache = stores
    options = dict(tokens=tokens, caches=(cache,), batch_size=4, seed=5, epoch=2, start_batch=3,
                   shuffle_buffer=8, block_rows=4)
    ahead = list(stream_batches(**options, prefetch=4))
    before = threading.active_count()
    inline = []
    for batch in stream_batches(**options, prefetch=0):
        assert threading.active_count() == before  # no reader thread
        inline.append(batch)
    assert len(inline) == len(ahead) > 0
    for a, b in zip(inline, ahead):
        for field in ("indices", "tokens"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        for field in ("ids", "logits", "lse"):
            assert np.array_equal(getattr(a.teachers[0], field), getattr(b.teachers[0], field))


def test_no_thread_left_when_consumer_stops_early(stores):
    tokens, cache = stores
    list(stream_batches(tokens=tokens, caches=(cache,), batch_size=4, seed=0, epoch=0))  # warm zarr
    baseline = threading.active_count()
    batches = stream_batches(tokens=tokens, caches=(cache,), batch_size=2, seed=0, epoch=0, prefetch=3)
    next(batches)
    assert any(t.name.startswith("storage-prefetch") for t in threading.enumerate())
    batches.close()
    time.sleep(0.05)
    assert threading.active_count() == baseline
    for _ in stream_batches(tokens=tokens, caches=(cache,), batch_size=2, seed=0, epoch=0):
        break
    time.sleep(0.05)
    assert not any(t.name.startswith("storage-prefetch") for t in threading.enumerate())


def test_reads_are_contiguous_blocks(stores, monkeypatch):
    tokens, cache = stores
    reads = []
    original = type(cache).read

    def spy(self, start, stop, **kw):
        reads.append(stop - start)
        return original(self, start, stop, **kw)

    monkeypatch.setattr(type(cache), "read", spy)
    list(stream_batches(tokens=tokens, caches=(cache,), batch_size=4, seed=0, epoch=0, block_rows=8))
    assert sum(reads) == N and max(reads) == 8 and len(reads) == N // 8


def test_a_new_shuffle_window_is_read_after_the_last_one_is_let_go(stores, monkeypatch):
    import weakref

    import storage.reader as reader

    tokens, cache = stores
    alive: list[weakref.ref] = []
    most = []
    original = reader._read_block

    def counting(rows, *args):
        held = sum(len(ref()) for ref in alive if ref() is not None)
        fields = original(rows, *args)
        alive.append(weakref.ref(fields["tokens"]))
        most.append(held + len(rows))
        return fields

    monkeypatch.setattr(reader, "_read_block", counting)
    list(stream_batches(tokens=tokens, caches=(cache,), batch_size=4, seed=0, epoch=0,
                        shuffle_buffer=8, block_rows=4, prefetch=0))
    assert len(most) == N // 4 and max(most) == 8  # rows held while reading: one window

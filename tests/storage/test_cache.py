"""Logit cache: value codes, round trips on real stores, manifests, refusals, integrity checks."""

import json

import numpy as np
import pytest
import zarr

from storage import (CorruptData, ManifestMismatch, StorageError, StoreNotFound,
                     create_cache, decode_values, encode_values, open_cache)
from storage.cache import GAP8_STEP, count_draws, expand_draws
from tests.storage.cachedata import (CHUNK, K, L, N, SHARD_CHUNKS, TEMPERATURES, V,
                                     new_writer, teacher_outputs, token_store, write_all,
                                     write_one)


@pytest.fixture
def store(tmp_path):
    return token_store(tmp_path / "tokens.zarr")


@pytest.fixture(scope="module")
def outputs():
    return teacher_outputs()


def log_probs(logits, lse):
    """(n, L, n_T, k) log-probabilities logits / T - lse_T."""
    temps = np.array(TEMPERATURES, dtype=np.float64)[:, None]
    return logits[..., None, :] / temps - lse[..., :, None].astype(np.float64)


def probs(logits, lse):
    return np.exp(log_probs(logits, lse))


def full_cache(tmp_path, store, outputs, value_code):
    writer = new_writer(tmp_path / "cache.zarr", store, value_code=value_code)
    assert write_all(writer, outputs) == list(range(writer.n_shards))
    assert writer.finish()
    return open_cache(tmp_path / "cache.zarr", token_store=store, vocab_size=store.vocab_size)


def test_float16_round_trip_is_bit_exact(tmp_path, store, outputs):
    ids, logits, lse = outputs
    cache = full_cache(tmp_path, store, outputs, "float16")
    block = cache.read(0, N)
    shifted = logits - logits[..., :1]
    assert block.ids.dtype == np.int64 and np.array_equal(block.ids, ids)
    assert block.logits.dtype == np.float32
    assert np.array_equal(block.logits, shifted.astype(np.float16).astype(np.float32))
    expected_lse = (lse - logits[..., :1] / np.array(TEMPERATURES, np.float32)).astype(np.float32)
    assert np.array_equal(block.lse, expected_lse)
    # Probabilities from the cache equal exp(z / T - lse_T) of the raw logits, up to float16's
    # relative rounding 2^-11 of the shifted logit.
    true, got = probs(logits, lse), probs(block.logits, block.lse)
    bound = np.abs(shifted)[..., None, :] / np.array(TEMPERATURES)[:, None] * 2.0 ** -11 + 1e-5
    assert (np.abs(np.log(got) - np.log(true)) <= bound).all()
    assert np.allclose(got[..., 0], true[..., 0], rtol=1e-5)


def test_gap8_round_trip_within_code_error(tmp_path, store, outputs):
    ids, logits, lse = outputs
    cache = full_cache(tmp_path, store, outputs, "gap8")
    block = cache.read(3, 27)
    assert np.array_equal(block.ids, ids[3:27])
    true, got = probs(logits[3:27], lse[3:27]), probs(block.logits, block.lse)
    escaped = got[..., 0, :] == 0
    assert escaped.any(), "the peaked positions should exercise the escape"
    # Escaped entries are more than 254 steps below their predecessor: tiny true mass.
    assert true[..., 0, :][escaped].max() < 1e-3
    error = np.abs(log_probs(block.logits, block.lse) - log_probs(logits[3:27], lse[3:27]))
    error = error[np.broadcast_to(~escaped[..., None, :], got.shape)]
    assert error.max() <= GAP8_STEP / 2 + 1e-5
    assert error.max() > GAP8_STEP / 4  # it really is an 8-bit code
    # The top-1 probability and the tail mass are exact (from float32 lse).
    assert np.allclose(got[..., 0], true[..., 0], rtol=1e-5)


def test_value_codes_are_pure_and_shift_invariant():
    _, logits, lse = teacher_outputs(n=2)
    for code in ("float16", "gap8"):
        values, stored_lse = encode_values(logits, lse, value_code=code, temperatures=TEMPERATURES)
        again, again_lse = encode_values(logits + 7, lse + 7 / np.array(TEMPERATURES, np.float32),
                                         value_code=code, temperatures=TEMPERATURES)
        decoded = decode_values(values, value_code=code)
        assert decoded.dtype == np.float32 and (decoded[..., 0] == 0).all()
        assert np.array_equal(values, again)
        assert np.allclose(stored_lse, again_lse, atol=1e-5)
    with pytest.raises(ValueError, match="unknown value code"):
        encode_values(logits, lse, value_code="int4", temperatures=TEMPERATURES)


def test_read_fewer_k_and_rows_across_shards(tmp_path, store, outputs):
    cache = full_cache(tmp_path, store, outputs, "float16")
    block = cache.read(5, 19, k=3)
    assert block.ids.shape == (14, 16, 3) and block.lse.shape == (14, 16, 3)
    assert np.array_equal(block.ids, outputs[0][5:19, :, :3])
    ids_only = cache.read(5, 19, k=3, values=False)
    assert np.array_equal(ids_only.ids, block.ids) and ids_only.logits is ids_only.lse is None
    with pytest.raises(ValueError, match="k = 9"):
        cache.read(0, 1, k=K + 1)


def test_resume_with_same_manifest_and_refuse_another(tmp_path, store, outputs):
    writer = new_writer(tmp_path / "cache.zarr", store)
    write_one_claimed(writer, 1, outputs)
    again = new_writer(tmp_path / "cache.zarr", store)  # same facts: resume
    assert again.pending_shards() == [0, 2, 3, 4]
    assert again.pending_shards(rank=1, world_size=2) == [3]
    before = sorted(p.name for p in (tmp_path / "cache.zarr").rglob("*"))
    with pytest.raises(ManifestMismatch) as info:
        new_writer(tmp_path / "cache.zarr", store, value_code="gap8")
    message = str(info.value)
    assert "value_code" in message and "delete it" in message and "\n" not in message
    with pytest.raises(ManifestMismatch, match="teacher.fingerprint"):
        create_cache(tmp_path / "cache.zarr", n_sequences=N, seq_len=16, k=K, vocab_size=300,
                     temperatures=TEMPERATURES, value_code="float16", chunk_sequences=CHUNK,
                     shard_chunks=2, manifest={"teacher": {"name": "fake", "fingerprint": "w1"},
                                               "tokenizer_fingerprint": store.tokenizer_fingerprint,
                                               "token_store_fingerprint": store.fingerprint})
    assert sorted(p.name for p in (tmp_path / "cache.zarr").rglob("*")) == before


def write_one_claimed(writer, shard, outputs):
    with writer.claim(shard) as mine:
        assert mine
        write_one(writer, shard, outputs)


def test_claim_rules(tmp_path, store, outputs):
    writer = new_writer(tmp_path / "cache.zarr", store)
    with pytest.raises(RuntimeError, match="outside"):
        write_one(writer, 0, outputs)
    write_one_claimed(writer, 0, outputs)
    with writer.claim(0) as mine:
        assert not mine  # already done
    other = new_writer(tmp_path / "cache.zarr", store)
    with writer.claim(2) as mine, other.claim(2, wait=False) as theirs:
        assert mine and not theirs  # flock excludes a second open of the lock file
    assert not writer.finish()


def test_open_refuses_other_inputs(tmp_path, store, outputs):
    full_cache(tmp_path, store, outputs, "float16")
    path = tmp_path / "cache.zarr"
    other_tokens = token_store(tmp_path / "other.zarr", seed=1)
    with pytest.raises(ManifestMismatch, match="token store"):
        open_cache(path, token_store=other_tokens)
    other_tokenizer = token_store(tmp_path / "retok.zarr", tokenizer="tok-b")
    with pytest.raises(ManifestMismatch, match="token store|tokenizer"):
        open_cache(path, token_store=other_tokenizer)
    with pytest.raises(ManifestMismatch, match="vocabulary 300, the student has 512"):
        open_cache(path, vocab_size=512)
    with pytest.raises(StoreNotFound, match="no logit cache"):
        open_cache(tmp_path / "missing.zarr")


def test_tokenizer_mismatch_named(tmp_path, store, outputs):
    # Same tokens, other tokenizer fingerprint in the cache's manifest.
    writer = new_writer(tmp_path / "cache.zarr", store, tokenizer_fingerprint="tok-z")
    write_all(writer, outputs)
    with pytest.raises(ManifestMismatch, match="tokenizer"):
        open_cache(tmp_path / "cache.zarr", token_store=store)


def test_incomplete_cache_refused_unless_allowed(tmp_path, store, outputs):
    writer = new_writer(tmp_path / "cache.zarr", store)
    write_one_claimed(writer, 0, outputs)
    with pytest.raises(StoreNotFound, match=r"4 of 5 shards missing \(shards 1, 2, 3, 4\); "
                                            "rerun `make teacher-logits`"):
        open_cache(tmp_path / "cache.zarr")
    cache = open_cache(tmp_path / "cache.zarr", allow_incomplete=True)
    assert cache.done_shards().tolist() == [True, False, False, False, False]
    assert np.array_equal(cache.read(0, 8).ids, outputs[0][:8])
    with pytest.raises(CorruptData, match="shard 1 is not written"):
        cache.read(0, 9)
    assert [p.split(":")[0] for p in cache.verify()] == [f"shard {s}" for s in range(1, 5)]


def damage(path, kind):
    file = path / "logits" / "c" / "2" / "0" / "0"
    data = bytearray(file.read_bytes())
    if kind == "flip":
        data[len(data) // 3] ^= 0x40
        file.write_bytes(bytes(data))
    elif kind == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        file.unlink()


@pytest.mark.parametrize("kind", ["flip", "truncate", "delete"])
def test_damaged_shard_named_by_verify_and_read(tmp_path, store, outputs, kind):
    cache = full_cache(tmp_path, store, outputs, "gap8")
    assert cache.verify() == []
    damage(cache.path, kind)
    problems = cache.verify()
    assert len(problems) == 1 and problems[0].startswith("shard 2: file logits/c/2/0/0")
    with pytest.raises(CorruptData, match="shard 2: file logits/c/2/0/0"):
        cache.read(17, 20)
    assert np.array_equal(cache.read(8, 16).ids, outputs[0][8:16])  # other shards still read
    assert np.array_equal(cache.read(17, 20, values=False).ids, outputs[0][17:20])  # no logits


def test_edited_manifest_detected(tmp_path, store, outputs):
    full_cache(tmp_path, store, outputs, "float16")
    meta_file = tmp_path / "cache.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["manifest"]["k"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptData, match="manifest was edited"):
        open_cache(tmp_path / "cache.zarr")
    meta_file.write_text("{not json")
    with pytest.raises(CorruptData, match="manifest unreadable"):
        open_cache(tmp_path / "cache.zarr")


def test_layout_one_done_file_per_shard_and_checksums(tmp_path, store, outputs):
    cache = full_cache(tmp_path, store, outputs, "gap8")
    group = zarr.open_group(cache.path, mode="r")
    assert group["done"].chunks == (1,)
    assert group["ids"].dtype == np.uint16 and group["logits"].dtype == np.uint8
    assert group["ids"].chunks == (CHUNK, 16, K) and group["ids"].shards == (8, 16, K)
    names = [type(c).__name__ for c in group["ids"].metadata.codecs[0].codecs]
    assert names[-1] == "Crc32cCodec" and "BloscCodec" in names
    assert sorted(p.name for p in (cache.path / "done" / "c").iterdir()) == list("01234")
    assert cache.manifest["completed"] and cache.manifest["chunking"]["n_shards"] == 5


def test_create_refuses_a_foreign_directory(tmp_path, store):
    (tmp_path / "cache.zarr").mkdir()
    (tmp_path / "cache.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="exists and is not a logit cache"):
        new_writer(tmp_path / "cache.zarr", store)


def test_corrupt_done_mark_counts_as_not_done_and_is_rewritten(tmp_path, store, outputs):
    cache = full_cache(tmp_path, store, outputs, "float16")
    before = (cache.path / "ids" / "c" / "3" / "0" / "0").read_bytes()
    mark = cache.path / "done" / "c" / "3"
    data = bytearray(mark.read_bytes())
    data[len(data) // 2] ^= 0x5A
    mark.write_bytes(bytes(data))
    with pytest.raises(StoreNotFound, match=r"1 of 5 shards missing \(shard 3\)"):
        open_cache(cache.path)
    damaged = open_cache(cache.path, allow_incomplete=True)
    assert damaged.done.tolist() == [True, True, True, False, True]
    assert damaged.verify() == ["shard 3: done mark is corrupt (rerun `make teacher-logits` to "
                                "rewrite the shard)"]
    with pytest.raises(CorruptData, match="shard 3 is not written"):
        damaged.read(24, 32)
    writer = new_writer(cache.path, store)  # resume: only the shard with the bad mark is redone
    assert writer.pending_shards() == [3]
    assert write_all(writer, outputs) == [3]
    assert open_cache(cache.path).verify() == []
    assert (cache.path / "ids" / "c" / "3" / "0" / "0").read_bytes() == before


def test_create_removes_what_a_killed_creator_left(tmp_path, store, outputs):
    # What a SIGKILL inside create_cache leaves beside the cache: half-built groups (the
    # current temp name and the uuid-suffixed ones of earlier versions).
    for leftover in (".cache.zarr.creating", ".cache.zarr.creating-0123abcd"):
        (tmp_path / leftover / "ids").mkdir(parents=True)
        (tmp_path / leftover / "zarr.json").write_text("{")
    writer = new_writer(tmp_path / "cache.zarr", store)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.zarr.lock", "cache.zarr",
                                                          "tokens.zarr"]
    assert write_all(writer, outputs) == list(range(5)) and writer.finish()


# ---------------------------------------------------------------------------------------------
# Counted draws: distinct ids, delta-coded, with their counts.

def counted_writer(path, store, draws=(5, 12), temperatures=(1.0, 2.0)):
    return create_cache(
        path, n_sequences=N, seq_len=L, k=sum(draws), vocab_size=V, temperatures=temperatures,
        value_code="none", chunk_sequences=CHUNK, shard_chunks=SHARD_CHUNKS,
        manifest={"teacher": {"name": "fake"}, "selection": {"kind": "draws",
                                                             "draws": list(draws), "seed": 0},
                  "tokenizer_fingerprint": store.tokenizer_fingerprint,
                  "token_store_fingerprint": store.fingerprint})


def fake_draws(m, *, n=N, vocab=V, seed=0):
    """Draws with repeats: ids from a narrow peaked distribution, in no particular order."""
    rng = np.random.default_rng(seed)
    return rng.zipf(1.3, (n, L, m)).clip(max=vocab) - 1


@pytest.mark.parametrize("m, vocab", [(1, 300), (7, 300), (64, 300), (255, 70_000)])
def test_counted_draws_round_trip_exactly(m, vocab):
    draws = fake_draws(m, n=6, vocab=vocab)
    delta, counts = count_draws(draws)
    assert delta.shape == counts.shape == draws.shape and counts.dtype == np.uint8
    assert np.all(counts.sum(-1) == m) and np.all(delta >= 0)
    for position, (row, row_delta, row_counts) in enumerate(zip(
            draws.reshape(-1, m), delta.reshape(-1, m), counts.reshape(-1, m))):
        ids, how_often = np.unique(row, return_counts=True)
        kept = len(ids)
        assert np.array_equal(np.cumsum(row_delta[:kept]), ids)
        assert np.array_equal(row_counts[:kept], how_often)
        assert not row_delta[kept:].any() and not row_counts[kept:].any()
    assert np.array_equal(expand_draws(delta, counts), np.sort(draws, axis=-1))


def test_counted_draws_cache_stores_and_reads_each_temperature(tmp_path, store):
    draws = (5, 12)
    plain = np.concatenate([fake_draws(m, seed=m) for m in draws], axis=-1)
    writer = counted_writer(tmp_path / "cache.zarr", store, draws)
    for claim in writer.claimed_shards():
        with claim:
            a, b = writer.shard_rows(claim.shard)
            writer.write_shard(claim.shard, ids=plain[a:b])
    assert writer.finish()
    cache = open_cache(tmp_path / "cache.zarr", token_store=store)
    assert cache.arrays == ("ids", "counts") and cache.verify() == []
    stored = zarr.open_group(tmp_path / "cache.zarr", mode="r")
    assert sorted(stored) == ["counts", "done", "ids"]  # no logits, no lse
    delta, counts = (np.concatenate(parts, axis=-1) for parts in zip(
        count_draws(plain[..., :5]), count_draws(plain[..., 5:])))
    assert np.array_equal(stored["ids"][:], delta) and np.array_equal(stored["counts"][:], counts)
    for t, (first, m) in zip((1.0, 2.0), ((0, 5), (5, 12))):
        view = cache.at_temperature(t)
        assert (view.k, view.sample_temperature) == (m, t)
        block = view.read(3, 19)
        assert block.logits is None and block.lse is None
        assert np.array_equal(block.ids, np.sort(plain[3:19, :, first:first + m], axis=-1))
        raw = view.read(3, 19, decode=False)
        assert raw.counts is not None and np.array_equal(view.decode(raw).ids, block.ids)
    with pytest.raises(ValueError, match="not at 4"):
        cache.at_temperature(4.0)
    with pytest.raises(ValueError, match="one temperature"):
        cache.read(0, 4)  # two temperatures: say which


def test_counted_draws_damage_is_named(tmp_path, store):
    writer = counted_writer(tmp_path / "cache.zarr", store)
    plain = fake_draws(17)
    for claim in writer.claimed_shards():
        with claim:
            a, b = writer.shard_rows(claim.shard)
            writer.write_shard(claim.shard, ids=plain[a:b])
    writer.finish()
    file = tmp_path / "cache.zarr" / "counts" / "c" / "2" / "0" / "0"
    data = bytearray(file.read_bytes())
    data[len(data) // 3] ^= 0x40
    file.write_bytes(bytes(data))
    cache = open_cache(tmp_path / "cache.zarr")
    problems = cache.verify()
    assert len(problems) == 1 and problems[0].startswith("shard 2: file counts/c/2/0/0")
    with pytest.raises(CorruptData, match="shard 2: file counts/c/2/0/0"):
        cache.at_temperature(2.0).read(17, 20)
    assert [p.shard for p in counted_writer(tmp_path / "cache.zarr", store).reopen_damaged()] \
        == [2]

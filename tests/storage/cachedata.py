"""Deterministic fake teacher outputs and small real stores for the storage tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import create_cache, write_token_store

N, L, V, K = 40, 16, 300, 8
TEMPERATURES = (1.0, 2.0, 4.0)
CHUNK, SHARD_CHUNKS = 4, 2  # 8 rows per shard -> 5 shards


def token_store(path: Path, *, seed: int = 0, n: int = N, tokenizer: str = "tok-a", vocab: int = V):
    rng = np.random.default_rng(seed)
    return write_token_store(path, sequences=rng.integers(0, vocab, (n, L)),
                             manifest={"tokenizer": {"fingerprint": tokenizer, "vocab_size": vocab}})


def full_logits(*, n: int = N, seed: int = 0, vocab: int = V) -> np.ndarray:
    """float32 (n, L, vocab) fake teacher logits behind `teacher_outputs`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, L, vocab)).astype(np.float32) * 3 + 5
    peaked = rng.random((n, L)) < 0.3
    z[peaked, rng.integers(0, vocab, peaked.sum())] += 15
    return z


def teacher_outputs(*, n: int = N, seed: int = 0, k: int = K, vocab: int = V):
    """(ids int64 (n, L, k), raw logits float32 (n, L, k) descending, lse float32 (n, L, n_T)).

    Logits mix broad positions and peaked ones (one id +15 nats above the rest), so gap8's
    escape path and float16's precision near the top both get exercised.
    """
    z = full_logits(n=n, seed=seed, vocab=vocab)
    ids = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    logits = np.take_along_axis(z, ids, -1)
    z64 = z.astype(np.float64)
    lse = np.stack([np.logaddexp.reduce(z64 / t, axis=-1) for t in TEMPERATURES], -1)
    return ids, logits, lse.astype(np.float32)


def new_writer(path, store, *, value_code: str = "float16", n: int = N, k: int = K,
               lease_seconds: float = 60.0, **extra):
    """A writer of the test cache at `path` (a folder, a URL or a Remote) for `store`."""
    return create_cache(
        path, n_sequences=n, seq_len=L, k=k, vocab_size=V, temperatures=TEMPERATURES,
        value_code=value_code, chunk_sequences=CHUNK, shard_chunks=SHARD_CHUNKS,
        lease_seconds=lease_seconds, manifest={"teacher": {"name": "fake", "fingerprint": "w0"},
                  "tokenizer_fingerprint": store.tokenizer_fingerprint,
                  "token_store_fingerprint": store.fingerprint, **extra})


def write_one(writer, shard: int, outputs) -> None:
    """Write `shard` from the full outputs (the caller holds its claim)."""
    a, b = writer.shard_rows(shard)
    ids, logits, lse = outputs
    writer.write_shard(shard, ids=ids[a:b], logits=logits[a:b], lse=lse[a:b])


def write_all(writer, outputs, *, rank: int = 0, world_size: int = 1) -> list[int]:
    """Write every pending shard of this rank the way precompute does; returns those written."""
    written = []
    for claim in writer.claimed_shards(rank=rank, world_size=world_size):
        with claim:
            write_one(writer, claim.shard, outputs)
        written.append(claim.shard)
    return written


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under `path` by relative name (lock files excluded: they are empty markers)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and "locks" not in f.parts}

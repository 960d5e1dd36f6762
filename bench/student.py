"""Student trainer benchmark (placeholder being written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from storage.cache import create_cache
from storage.tokens import TokenStore


@torch.no_grad()
def write_cache(path: Path, teacher: torch.nn.Module, store: TokenStore, *, k: int,
                temperatures: tuple[float, ...], value_code: str = "float16",
                chunk_sequences: int = 16, shard_chunks: int = 2, batch_size: int = 64):
    """Run `teacher` over `store` and write its top-k logit cache at `path` (what
    `make teacher-logits` does, in a few lines, for benchmarks and tests)."""
    writer = create_cache(path, n_sequences=store.n_sequences, seq_len=store.seq_len, k=k,
                          vocab_size=store.vocab_size, temperatures=temperatures,
                          value_code=value_code, chunk_sequences=chunk_sequences,
                          shard_chunks=shard_chunks,
                          manifest={"teacher": {"name": "bench"},
                                    "tokenizer_fingerprint": store.tokenizer_fingerprint,
                                    "token_store_fingerprint": store.fingerprint})
    teacher.eval()
    for shard in writer.pending_shards():
        start, stop = writer.shard_rows(shard)
        parts = []
        for lo in range(start, stop, batch_size):
            ids = torch.from_numpy(store.read(lo, min(stop, lo + batch_size)).astype(np.int64))
            logits = teacher(input_ids=ids).logits.float()
            values, top = logits.topk(k, -1)
            lse = torch.stack([torch.logsumexp(logits / t, -1) for t in temperatures], -1)
            parts.append((top.numpy(), values.numpy(), lse.numpy()))
        with writer.claim(shard) as mine:
            assert mine
            writer.write_shard(shard, ids=np.concatenate([p[0] for p in parts]),
                               logits=np.concatenate([p[1] for p in parts]),
                               lse=np.concatenate([p[2] for p in parts]))
    writer.finish()
    return path

"""Logit-cache benchmark on a REAL trained teacher: bytes on disk per token for each value code at
k = 16, 32, 64; write speed; read speed of shuffled streaming vs contiguous vs random
single-sequence reads; Blosc shuffle choices per array.

    python -m bench.cache [--teacher runs/demo/teacher] [--tokens runs/demo/tokens/train.zarr]
                          [--sequences 256]

The teacher runs once on the first `sequences` rows of the token store (fp32, CPU or CUDA); every
cache variant is written from those same logits into a temporary directory. Blosc runs single
threaded and the reader uses its one prefetch thread, so read speeds are "one thread of compute";
each is the best of 3 passes (the machine may be shared).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np

from bench.tables import markdown_sections
from storage.cache import SHUFFLE, VALUE_CODES, cache_bytes, create_cache, encode_values, open_cache
from storage.errors import StoreNotFound
from storage.reader import stream_batches
from storage.tokens import open_token_store, token_dtype, write_token_store

DEFAULT_TEACHER = Path("runs/demo/teacher")
DEFAULT_TOKENS = Path("runs/demo/tokens/train.zarr")
TEMPERATURES = (1.0, 2.0, 4.0)
CHUNK_SEQUENCES, SHARD_CHUNKS = 32, 4


def teacher_topk(model_dir: Path, tokens: np.ndarray, *, k: int, batch: int = 16):
    """Run the teacher on tokens (n, L): ids (n, L, k), raw logits float32 (n, L, k) descending,
    lse float32 (n, L, n_T) over the full vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids, logits, lse = [], [], []
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[start:start + batch].astype(np.int64)).to(device)
            z = model(input_ids=x).logits.float()
            top = torch.topk(z, k, dim=-1)
            ids.append(top.indices.cpu().numpy())
            logits.append(top.values.cpu().numpy())
            lse.append(torch.stack([torch.logsumexp(z / t, -1) for t in TEMPERATURES], -1)
                       .cpu().numpy())
    return np.concatenate(ids), np.concatenate(logits), np.concatenate(lse), model.config.vocab_size


def _write(path: Path, outputs, *, k: int, vocab: int, value_code: str) -> float:
    """Write a cache of the first k entries; returns seconds spent."""
    ids, logits, lse = outputs
    n, length = ids.shape[:2]
    writer = create_cache(path, n_sequences=n, seq_len=length, k=k, vocab_size=vocab,
                          temperatures=TEMPERATURES, value_code=value_code,
                          chunk_sequences=CHUNK_SEQUENCES, shard_chunks=SHARD_CHUNKS,
                          manifest={"teacher": {"name": "bench"}, "tokenizer_fingerprint": "",
                                    "token_store_fingerprint": ""})
    started = time.perf_counter()
    for claim in writer.claimed_shards():
        with claim:
            a, b = writer.shard_rows(claim.shard)
            writer.write_shard(claim.shard, ids=ids[a:b, :, :k], logits=logits[a:b, :, :k],
                               lse=lse[a:b])
    writer.finish()
    return time.perf_counter() - started


def _read_speeds(path: Path, store, *, random_reads: int = 200, repeats: int = 3) -> dict:
    """tokens/s (best of `repeats`, the machine is shared) of shuffled streaming through
    stream_batches, contiguous chunk reads and random single-sequence reads."""
    cache = open_cache(path)
    length, n = cache.seq_len, cache.n_sequences

    def contiguous(_):
        for start in range(0, n, cache.chunk_sequences):
            cache.read(start, min(start + cache.chunk_sequences, n))
        return n * length

    def shuffled(epoch):
        return length * sum(batch.tokens.shape[0] for batch in stream_batches(
            tokens=store, caches=(cache,), batch_size=32, seed=0, epoch=epoch,
            block_rows=cache.chunk_sequences))

    def single(epoch):
        for row in np.random.default_rng(epoch).integers(0, n, random_reads):
            cache.read(int(row), int(row) + 1)
        return random_reads * length

    speeds = {}
    for name, read in (("shuffled stream", shuffled), ("contiguous", contiguous),
                       ("random single-seq", single)):
        best = 0.0
        for repeat in range(repeats):
            started = time.perf_counter()
            tokens = read(repeat)
            best = max(best, tokens / (time.perf_counter() - started))
        speeds[name] = best
    return speeds


def _shuffle_rows(outputs, *, k: int) -> list[dict]:
    """Bytes per token of each array under each Blosc shuffle, one chunk-sized sample at a time."""
    ids, logits, lse = outputs
    vocab_dtype = token_dtype(int(ids.max()) + 1)
    arrays = {"ids": ids[:, :, :k].astype(vocab_dtype)}
    for code in VALUE_CODES:
        arrays[code], stored_lse = encode_values(logits[:, :, :k], lse, value_code=code,
                                                 temperatures=TEMPERATURES)
    arrays["lse"] = stored_lse
    n_tokens = ids.shape[0] * ids.shape[1]
    rows = []
    for name, array in arrays.items():
        row = {"table": "shuffle", "array": name, "k": k, "chosen": SHUFFLE[name]}
        for label, shuffle in (("noshuffle", numcodecs.Blosc.NOSHUFFLE),
                               ("shuffle", numcodecs.Blosc.SHUFFLE),
                               ("bitshuffle", numcodecs.Blosc.BITSHUFFLE)):
            codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=shuffle)
            size = sum(len(codec.encode(np.ascontiguousarray(array[s:s + CHUNK_SEQUENCES])))
                       for s in range(0, len(array), CHUNK_SEQUENCES))
            row[f"{label} B/token"] = size / n_tokens
        rows.append(row)
    return rows


def run(*, teacher: Path = DEFAULT_TEACHER, tokens: Path = DEFAULT_TOKENS, sequences: int = 256,
        ks: tuple[int, ...] = (16, 32, 64), read_k: int = 32, repeats: int = 3) -> list[dict]:
    """Rows of three tables (key "table"): size (per k and code), read (tokens/s), shuffle."""
    if not (Path(teacher) / "config.json").is_file():
        raise StoreNotFound(f"no teacher model at {teacher}: train one (`make teacher`) or pass "
                            "--teacher DIR --tokens STORE")
    store = open_token_store(tokens)
    n = min(sequences, store.n_sequences)
    outputs = teacher_topk(Path(teacher), store.read(0, n), k=max(ks))
    *outputs, vocab = outputs
    n_tokens = n * store.seq_len
    numcodecs.blosc.set_nthreads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        # The benchmarked rows as a store of their own, so the reader streams exactly those.
        rows_store = write_token_store(Path(tmp) / "tokens.zarr", sequences=store.read(0, n),
                                       manifest=store.manifest)
        for k in ks:
            for code in VALUE_CODES:
                path = Path(tmp) / f"k{k}-{code}.zarr"
                seconds = _write(path, outputs, k=k, vocab=vocab, value_code=code)
                per_array = {name: cache_bytes(path / name) / n_tokens
                             for name in ("ids", "logits", "lse")}
                rows.append({"table": "size", "k": k, "value_code": code,
                             "B/token": cache_bytes(path) / n_tokens,
                             **{f"{name} B/token": v for name, v in per_array.items()},
                             "write tok/s": n_tokens / seconds})
                if k == read_k:
                    speeds = _read_speeds(path, rows_store, repeats=repeats)
                    for how, speed in speeds.items():
                        rows.append({"table": "read", "k": k, "value_code": code, "read": how,
                                     "tok/s": speed, "vs contiguous": speed / speeds["contiguous"]})
    rows += _shuffle_rows(outputs, k=read_k)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per "table"."""
    return markdown_sections(rows, by="table")


def main() -> None:
    from configs.cli import exit_on_user_error

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER)
    parser.add_argument("--tokens", type=Path, default=DEFAULT_TOKENS)
    parser.add_argument("--sequences", type=int, default=256)
    args = parser.parse_args()
    exit_on_user_error(lambda: print(markdown(run(teacher=args.teacher, tokens=args.tokens,
                                                  sequences=args.sequences))))


if __name__ == "__main__":
    main()

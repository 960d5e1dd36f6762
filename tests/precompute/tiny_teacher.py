"""Shared helpers of the teacher tests: a tiny run directory (a real word-level tokenizer and
token stores of a learnable synthetic pattern) and tiny random GPT-2 teachers saved
with save_pretrained. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs import CONFIG_DIR, Config, load_config
from storage.tokens import write_token_store
from training.models import new_model

VOCAB = 300
SEQ_LEN = 32


def learnable_tokens(n: int, *, vocab: int = VOCAB, seq_len: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
    """(n, seq_len) sequences following t -> (5 t + 3) mod vocab from random starts, with 10%
    random tokens: a pattern a tiny model learns in a few steps."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, seq_len), dtype=np.int64)
    rows[:, 0] = rng.integers(1, vocab, n)
    for t in range(1, seq_len):
        rows[:, t] = (5 * rows[:, t - 1] + 3) % vocab
    noise = rng.random((n, seq_len)) < 0.1
    rows[noise] = rng.integers(0, vocab, int(noise.sum()))
    return rows


def write_tokens(path: Path, *, n: int, vocab: int = VOCAB, seq_len: int = SEQ_LEN, seed: int = 0,
                 tokenizer_fingerprint: str = "tiny-tokenizer", chunk_rows: int = 64):
    """A token store of `learnable_tokens`; its word counts say a word starts at every token
    whose id is a multiple of 4 (any fixed rule does: training sums them per row)."""
    rows = learnable_tokens(n, vocab=vocab, seq_len=seq_len, seed=seed)
    manifest = {"tokenizer": {"fingerprint": tokenizer_fingerprint, "vocab_size": vocab, "eos_id": 0},
                "text_bytes": n * seq_len * 3}
    return write_token_store(path, sequences=rows, words=(rows % 4 == 0).sum(axis=1),
                             manifest=manifest, chunk_rows=chunk_rows)


def tiny_run(root: Path, *, n_train: int = 256, n_val: int = 64, vocab: int = VOCAB,
             tokenizer_seed: int = 0) -> Path:
    """A run directory with tokenizer/, tokens/train.zarr and tokens/val.zarr."""
    from training.tokenizer import fingerprint, synthetic_tokenizer, tokenizer_dir

    tokenizer = synthetic_tokenizer(vocab, seed=tokenizer_seed)
    tokenizer.save_pretrained(str(tokenizer_dir(root)))
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        write_tokens(root / "tokens" / f"{split}.zarr", n=n, vocab=vocab, seed=seed,
                     tokenizer_fingerprint=fingerprint(tokenizer))
    return root


def save_teacher(folder: Path, *, vocab: int = VOCAB, n_layer: int = 2, n_embd: int = 64,
                 n_head: int = 2, seed: int = 0) -> Path:
    new_model(vocab_size=vocab, n_positions=SEQ_LEN, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
              seed=seed).save_pretrained(folder)
    return folder


def tiny_overrides(run_dir: Path, *overrides: str) -> list[str]:
    """demo.yaml scaled down to the tiny run: small batches, k = 8, two temperatures, CPU.

    Everything the tests rely on is pinned here, so tuning the demo cannot change them.
    """
    return [f"run_dir={run_dir}", "data.seq_len=32", "teacher.device=cpu", "student.device=cpu",
            "cache.k=8", "cache.temperatures=[1.0, 2.0]", "cache.chunk_sequences=16",
            "cache.shard_chunks=2", "cache.batch_size=16", "cache.value_code=float16",
            "distill.alpha=0.5", "distill.temperature=2.0", *overrides]


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(CONFIG_DIR / "demo.yaml", tiny_overrides(run_dir, *overrides))


def cli_args(run_dir: Path, *overrides: str) -> list[str]:
    """The same configuration as command-line arguments of a `python -m` module."""
    return ["--config", str(CONFIG_DIR / "demo.yaml"), *tiny_overrides(run_dir, *overrides)]

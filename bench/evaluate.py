"""Minimal-pair scoring speed: 10,000 real BLiMP pairs with the demo-sized student.

`python -m bench.evaluate [N_PAIRS]` scores N pairs (default 10,000, taken evenly from every file
of blimp_filtered) with a 2-layer GPT-2 of width 64 over a 2048-entry BPE trained on the pairs'
sentences, at several batch sizes, and prints pairs/s. Target: 10,000 pairs in under a minute on
the CPU. Real data is read from $BABYLM_KD_SHARED_DATA (default: ../shared/data beside the repo).

On a CPU shared with other jobs, torch's default of one thread per core can be many times slower
than one thread for a model this small: its OpenMP workers wait on descheduled siblings
(docs/log.md). `OMP_NUM_THREADS=1 make eval` then runs evaluation on one thread; an idle machine
is faster with the default.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from bench import SHARED_DATA
from bench.tables import markdown_table
from student.evaluate import read_pair_dir, score_pairs
from training.models import new_model
from training.tokenizer import train_bpe


DEFAULT_SETTINGS = ((1, 16), (1, 64), (1, 256), (torch.get_num_threads(), 64))
"""(torch threads, batch size) measured by default: batch sizes at one thread, and torch's
default thread count at the default eval.batch_size."""


def run(*, n_pairs: int = 10_000,
        settings: tuple[tuple[int, int], ...] = DEFAULT_SETTINGS) -> list[dict]:
    """One row per (torch threads, batch size): pairs, seconds, pairs/s, ratio to the fastest.

    Threads matter on a shared CPU: with every core busy, a tiny model's OpenMP workers wait on
    each other and one thread can be many times faster than two (docs/log.md).
    """
    folder = SHARED_DATA / "blimp" / "blimp_filtered"
    n_files = len(list(folder.glob("*.jsonl")))
    files, remaining = [], n_pairs  # trim to exactly n_pairs
    for pair_file in read_pair_dir(folder, max_pairs_per_file=-(-n_pairs // n_files)):
        files.append(dataclasses.replace(pair_file, pairs=pair_file.pairs[:remaining]))
        remaining -= len(files[-1].pairs)
    sentences = [s for f in files for p in f.pairs for s in (p.good, p.bad)]
    tokenizer = train_bpe(sentences, vocab_size=2048, min_frequency=2)
    model = new_model(vocab_size=len(tokenizer), n_positions=128, n_layer=2, n_embd=64, n_head=2).eval()
    default_threads = torch.get_num_threads()
    rows = []
    for n_threads, batch_size in settings:
        torch.set_num_threads(n_threads)
        score_pairs(model, tokenizer, files[:3], conventions=("ours",),
                    batch_size=batch_size)  # warm-up allocations
        start = time.perf_counter()
        result = score_pairs(model, tokenizer, files, conventions=("ours",),
                             batch_size=batch_size, device="cpu")["ours"]
        seconds = time.perf_counter() - start
        rows.append({"threads": n_threads, "batch_size": batch_size, "pairs": result["pairs"],
                     "sentences": len(set(sentences)), "seconds": round(seconds, 2),
                     "pairs_per_s": round(result["pairs"] / seconds),
                     "accuracy": round(result["macro_accuracy"], 4)})
    torch.set_num_threads(default_threads)
    fastest = max(row["pairs_per_s"] for row in rows)
    for row in rows:
        row["vs_fastest"] = round(row["pairs_per_s"] / fastest, 2)
    return rows


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows)


if __name__ == "__main__":
    print(markdown(run(n_pairs=int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)))

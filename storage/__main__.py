"""`python -m storage inspect PATH [--json]` and `python -m storage verify PATH`.

PATH is a logit cache or a token store: a folder, or a URL (s3://bucket/prefix/train.zarr, with
the endpoint and credentials in the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
`inspect` prints its size, layout and provenance; for a top-k cache also the teacher's mean
entropy and head mass (sum of the top-k probabilities) at T=1 and T=2, estimated on a sample of
done shards (which ones is printed). The entropy counts the tail mass m as spread uniformly over
the V - k ids outside the head: H = -sum_i p_i log p_i - m log(m / (V - k)), an upper bound on
the tail's true contribution. `verify` reads every chunk, prints each problem naming its shard,
and exits 0 when clean, 2 when not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from configs.cli import exit_on_user_error
from storage.cache import FORMAT, LogitCache, cache_bytes, open_cache
from storage.chunks import ChunkError, read_metadata
from storage.errors import CorruptData, Problem, StoreNotFound
from storage.location import Remote, file_exists, locate
from storage.tokens import KIND as TOKEN_KIND
from storage.tokens import open_token_store

SAMPLE_SHARDS = 4
STAT_TEMPERATURES = (1.0, 2.0)


def teacher_stats(cache: LogitCache, *, sample_shards: int = SAMPLE_SHARDS,
                  k: int | None = None) -> dict:
    """Mean entropy (nats) and head mass at T in STAT_TEMPERATURES over evenly spaced done shards,
    with the first `k` cached entries as the head (default: all of them).

    Returns {"shards": [...], "T=1": {"entropy": .., "head_mass": ..}, ...}; temperatures not
    stored in the cache are left out (their lse is not exact).
    """
    done = np.flatnonzero(cache.done)
    shards = done[np.linspace(0, len(done) - 1, min(sample_shards, len(done))).astype(int)] \
        if len(done) else done
    stats: dict = {"shards": [int(s) for s in shards]}
    sums = {t: np.zeros(2) for t in STAT_TEMPERATURES if t in cache.temperatures}
    positions = 0
    for shard in shards:
        block = cache.read(*cache.shard_rows(int(shard)), k=k)
        positions += block.ids.shape[0] * block.ids.shape[1]
        for t in sums:
            log_p = block.logits / t - block.lse[..., [cache.temperatures.index(t)]]
            p = np.exp(log_p)
            tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
            rest = max(cache.vocab_size - block.ids.shape[-1], 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                tail_entropy = np.where(tail > 0, -tail * np.log(tail / rest), 0.0)
            entropy = -(p * log_p).sum(-1) + tail_entropy
            sums[t] += (entropy.sum(), (1.0 - tail).sum())
    for t, (entropy, head) in sums.items():
        stats[f"T={t:g}"] = {"entropy": entropy / max(positions, 1),
                             "head_mass": head / max(positions, 1)}
    return stats


def _format_of(path: Path | Remote) -> str:
    if not file_exists(path / "zarr.json"):
        raise StoreNotFound(f"no logit cache or token store at {path}")
    try:
        return read_metadata(path / "zarr.json")["attributes"]["manifest"]["format"]
    except ChunkError as exc:
        raise CorruptData(f"{path}: manifest unreadable (zarr.json {exc.problem})") from None
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"{path}: manifest unreadable (no {exc})") from None


def inspect_path(path: Path | Remote) -> dict:
    """A summary of the cache or token store at `path` (what `inspect` prints)."""
    kind = _format_of(path)
    size = cache_bytes(path)
    if kind == TOKEN_KIND:
        store = open_token_store(path)
        tokens = store.n_sequences * store.seq_len
        return {"path": str(path), "kind": "token store", "sequences": store.n_sequences,
                "seq_len": store.seq_len, "tokens": tokens, "vocab_size": store.vocab_size,
                "tokenizer_fingerprint": store.tokenizer_fingerprint,
                "fingerprint": store.fingerprint, "bytes": size,
                "bytes_per_token": size / tokens}
    if kind != FORMAT:
        raise CorruptData(f"{path}: unknown format {kind!r}")
    cache = open_cache(path, allow_incomplete=True)
    rows_done = sum(stop - start for start, stop in map(cache.shard_rows, np.flatnonzero(cache.done)))
    tokens_done = int(rows_done) * cache.seq_len
    manifest = cache.manifest
    return {
        "path": str(path), "kind": "logit cache", "sequences": cache.n_sequences,
        "seq_len": cache.seq_len, "tokens": cache.n_sequences * cache.seq_len,
        "k": cache.k, "vocab_size": cache.vocab_size, "temperatures": list(cache.temperatures),
        "selection": cache.selection,
        "value_code": cache.value_code, "chunk_sequences": cache.chunk_sequences,
        "shard_sequences": cache.shard_sequences,
        "shards_done": int(cache.done.sum()), "shards": cache.n_shards,
        "bytes": size, "bytes_per_token": size / tokens_done if tokens_done else None,
        "teacher": manifest.get("teacher"),
        "tokenizer_fingerprint": manifest.get("tokenizer_fingerprint"),
        "token_store_fingerprint": manifest.get("token_store_fingerprint"),
        "created": manifest.get("created"), "completed": manifest.get("completed"),
        "software_version": manifest.get("software_version"),
        # head mass and entropy describe a top-k head; sampled entries have none
        "teacher_stats": teacher_stats(cache) if cache.selection["kind"] == "topk" else None,
    }


def _print_summary(info: dict) -> None:
    stats = info.pop("teacher_stats", None)
    width = max(map(len, info))
    for key, value in info.items():
        if key == "bytes_per_token" and value is not None:
            value = f"{value:.1f}"
        print(f"{key:<{width}}  {value}")
    if stats:
        print(f"teacher stats on shards {stats['shards']} (tail entropy: uniform over V-k):")
        for key, value in stats.items():
            if key != "shards":
                print(f"  {key}: entropy {value['entropy']:.3f} nats, "
                      f"head mass {value['head_mass']:.4f}")


def verify_path(path: Path | Remote) -> list[Problem]:
    """Every problem of the cache or token store at `path`."""
    if _format_of(path) == TOKEN_KIND:
        store = open_token_store(path)
        problems = []
        for start in range(0, store.n_sequences, store.chunk_rows):
            try:
                store.read(start, min(start + store.chunk_rows, store.n_sequences))
            except CorruptData as exc:
                problems.append(exc.problem or Problem(str(exc), kind="manifest"))
        return problems
    try:
        cache = open_cache(path, allow_incomplete=True)
    except CorruptData as exc:
        return [exc.problem or Problem(str(exc), kind="manifest")]
    return cache.verify(progress=sys.stderr.isatty())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise a logit cache or token store")
    inspect.add_argument("path", type=locate)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    verify = commands.add_parser("verify", help="check every chunk; exit 2 on any problem")
    verify.add_argument("path", type=locate)
    args = parser.parse_args(argv)

    def body() -> None:
        if args.command == "inspect":
            info = inspect_path(args.path)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_summary(info)
            return
        problems = verify_path(args.path)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
            sys.exit(2)
        print(f"{args.path}: ok")

    exit_on_user_error(body)


if __name__ == "__main__":
    main()

"""The tiny world the reliability tests run in, and helpers to run the public CLIs as real
processes on it.

World (built once per session): a 2-layer, width-32 GPT-2 teacher over a 256-token vocabulary;
train/val token stores of 512/64 sequences x 32 tokens; `tiny.yaml`, which sizes every stage to
them and cuts the cache into many small shards (8 sequences: 64 shards, so random kills land
inside shard writes); and the cache of one clean, uninterrupted run of the teacher-logits job,
the reference every interrupted, corrupted-then-rebuilt or disk-full run must equal (cache_digest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from storage.cache import VOLATILE_KEYS
from tests.precompute.tiny_teacher import save_teacher, write_tokens
from training.tokenizer import fingerprint, synthetic_tokenizer

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
VOCAB, SEQ_LEN, N_TRAIN, N_VAL, CACHE_K = 256, 32, 512, 64, 8
# Every child gets unbuffered stdout (its first line marks "the job has started") and no hub
# access (a hub lookup without network would hang instead of failing).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tiny_settings(teacher: Path) -> dict:
    """tiny.yaml: every stage at the world's size, on the CPU."""
    return {
        "name": "reliability",
        "data": {"seq_len": SEQ_LEN},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "teacher": {"from_scratch": False, "model": str(teacher), "dtype": "fp32",
                    "device": "cpu"},
        "cache": {"k": CACHE_K, "temperatures": [1.0, 2.0], "chunk_sequences": 4, "shard_chunks": 2,
                  "batch_size": 8, "splits": ["train"]},
        "student": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0, "lr": 3.0e-3,
                    "batch_size": 8, "epochs": 1, "max_steps": 24, "warmup_steps": 2,
                    "eval_every": 0, "checkpoint_every": 4, "shuffle_buffer": 32,
                    "device": "cpu"},
        "distill": {"alpha": 0.5, "temperature": 2.0},
    }


@dataclass(frozen=True)
class World:
    root: Path
    config: Path
    """tiny.yaml"""
    teacher: Path
    tokens: Path
    """A folder with train.zarr and val.zarr."""
    clean_cache: Path
    """cache/train.zarr of the uninterrupted reference run."""
    clean_seconds: float
    """How long the reference job took (model load to finish)."""

    def new_run(self, run: Path) -> Path:
        """A run directory holding a copy of the world's tokenizer and token stores."""
        shutil.copytree(self.tokens, run / "tokens")
        shutil.copytree(self.root / "tokenizer", run / "tokenizer")
        return run

    def command(self, module: str, run: Path | str, *overrides: str) -> list[str]:
        """`python -m MODULE --config tiny.yaml run_dir=RUN OVERRIDES...`"""
        return [PYTHON, "-m", module, "--config", str(self.config), f"run_dir={run}", *overrides]

    def differences(self, cache: Path) -> list[str]:
        """How `cache` differs from the clean one (cache_differences); [] when equal."""
        return cache_differences(cache, self.clean_cache)


def build_world(root: Path) -> World:
    teacher = save_teacher(root / "teacher", vocab=VOCAB, n_layer=2, n_embd=32, n_head=2, seed=3)
    tokens = root / "tokens"
    tokenizer = synthetic_tokenizer(VOCAB)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    for split, n, seed in (("train", N_TRAIN, 1), ("val", N_VAL, 2)):
        write_tokens(tokens / f"{split}.zarr", n=n, vocab=VOCAB, seed=seed,
                     tokenizer_fingerprint=fingerprint(tokenizer))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(teacher), sort_keys=False))
    reference = root / "reference"
    shutil.copytree(tokens, reference / "tokens")
    # The reference is made by the same kind of process as the runs compared with it (an
    # in-process run would use whatever torch settings earlier tests left behind).
    started = time.perf_counter()
    job = cli([PYTHON, "-m", "precompute.logits", "--config", str(config), f"run_dir={reference}"])
    assert job.returncode == 0, job.stderr[-2000:]
    return World(root=root, config=config, teacher=teacher, tokens=tokens,
                 clean_cache=reference / "cache" / "train.zarr",
                 clean_seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Processes.

def cli(command: list[str], *, timeout: float = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a job to its end; `env`: variables added to the children's environment."""
    return subprocess.run(command, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def started(command: list[str], *, stderr_file: Path,
            env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A child process (stdout piped, stderr to a file so it never blocks on a full pipe) that
    is SIGKILLed and reaped on the way out, whatever happens in the test."""
    with open(stderr_file, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env={**ENV, **(env or {})},
                                   stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)


# Progress bars (tqdm's, transformers' "Loading weights") redraw one terminal line with \r;
# they are display, not messages.
_PROGRESS = re.compile(r"\d+%\|")


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr a user reads as messages: progress-bar redraws left out."""
    return [line.strip() for line in re.split(r"[\r\n]", stderr)
            if line.strip() and not _PROGRESS.search(line)]


# --------------------------------------------------------------------------------------------
# Comparing stores.

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest): "nothing was changed"."""
    return {str(f.relative_to(root)): _sha256(f) for f in sorted(root.rglob("*")) if f.is_file()}


def cache_digest(cache: Path) -> dict[str, str]:
    """What must be identical between two runs of the logits job: every file under the cache,
    byte for byte, but for these:
      * done/locks/<shard>.lock (.lease in object storage): left out; files that only exist to
        be flock()ed (or to hold a lease), which record which shards some process once claimed,
        not what the cache holds.
      * the root zarr.json: compared as parsed JSON without the manifest's `created` and
        `completed` timestamps (when each run happened; VOLATILE_KEYS) and `manifest_sha256`,
        the digest over them.
    """
    digest = {name: sha for name, sha in snapshot(cache).items()
              if not (name.startswith("done/locks/") and name.endswith((".lock", ".lease")))}
    root = json.loads((cache / "zarr.json").read_text())
    attributes = root["attributes"]
    attributes["manifest_sha256"] = "<digest of the timestamps>"
    for key in VOLATILE_KEYS:
        if key != "software_version":
            attributes["manifest"][key] = "<timestamp>"
    digest["zarr.json"] = json.dumps(root, sort_keys=True)
    return digest


def differing(a: dict, b: dict) -> list[str]:
    """Names whose digests differ or that exist on one side only."""
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


def cache_differences(cache: Path, reference: Path) -> list[str]:
    """The files of `cache` that differ from `reference`'s (cache_digest), then a line per
    differing shard saying what differs in its decoded values: a top-k flip at a near tie or a
    last-bit logsumexp change (a forward that rounded differently) reads differently from a torn
    or misplaced shard."""
    from storage.cache import open_cache

    names = differing(cache_digest(cache), cache_digest(reference))
    shards = sorted({int(m.group(1)) for name in names
                     if (m := re.match(r"(?:ids|logits|lse)/c/(\d+)/", name))})
    if not shards:
        return names
    a, b = (open_cache(path, allow_incomplete=True) for path in (cache, reference))
    for shard in shards:
        start, stop = a.shard_rows(shard)
        x, y = a.read(start, stop), b.read(start, stop)
        flipped = np.argwhere((x.ids != y.ids).any(-1))
        names.append(
            f"shard {shard} (rows {start}-{stop - 1}): top-k ids differ at {len(flipped)} "
            f"(row in shard, position) pairs {flipped[:3].tolist()}; rows with other values: "
            f"{np.flatnonzero((x.logits != y.logits).any((1, 2))).tolist()}, with other lse: "
            f"{np.flatnonzero((x.lse != y.lse).any((1, 2))).tolist()} "
            f"(max |difference| {float(np.abs(x.lse - y.lse).max()):.2e})")
    return names


def torn_leftovers(cache: Path) -> list[str]:
    """Files a write interrupted mid-shard leaves: data files of shards not marked done, and
    zarr's temporary *.partial files."""
    done = {p.name for p in (cache / "done" / "c").glob("*")} if (cache / "done" / "c").is_dir() else set()
    leftovers = [str(p.relative_to(cache)) for p in cache.rglob("*.partial")]
    for name in ("ids", "logits", "lse"):
        chunks = cache / name / "c"
        if chunks.is_dir():
            leftovers += [f"{name}/c/{p.name}" for p in chunks.iterdir() if p.name not in done]
    return sorted(leftovers)

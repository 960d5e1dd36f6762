"""The tiny world the reliability tests run in, and helpers to run the public CLIs as real
processes on it.

World (built once per session): a 2-layer, width-32 GPT-2 teacher over a 256-token vocabulary;
train/val token stores of 512/64 sequences x 32 tokens; `tiny.yaml`, which sizes every stage to
them and cuts the cache into many small shards (8 sequences: 64 shards, so random kills land
inside shard writes); and the cache of one clean, uninterrupted run of the teacher-logits job,
the reference every interrupted, corrupted-then-rebuilt or disk-full run must equal byte for byte.
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

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
VOCAB, SEQ_LEN, N_TRAIN, N_VAL = 256, 32, 512, 64
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
        "cache": {"k": 8, "temperatures": [1.0, 2.0], "chunk_sequences": 4, "shard_chunks": 2,
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
    """How long the reference job took in-process (model load to finish)."""

    def new_run(self, run: Path) -> Path:
        """A run directory holding a copy of the world's token stores."""
        shutil.copytree(self.tokens, run / "tokens")
        return run

    def command(self, module: str, run: Path | str, *overrides: str) -> list[str]:
        """`python -m MODULE --config tiny.yaml run_dir=RUN OVERRIDES...`"""
        return [PYTHON, "-m", module, "--config", str(self.config), f"run_dir={run}", *overrides]


def build_world(root: Path) -> World:
    teacher = save_teacher(root / "teacher", vocab=VOCAB, n_layer=2, n_embd=32, n_head=2, seed=3)
    tokens = root / "tokens"
    write_tokens(tokens / "train.zarr", n=N_TRAIN, vocab=VOCAB, seed=1)
    write_tokens(tokens / "val.zarr", n=N_VAL, vocab=VOCAB, seed=2)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(teacher), sort_keys=False))
    reference = root / "reference"
    shutil.copytree(tokens, reference / "tokens")
    # The reference is made by the same kind of process as the runs compared with it: an
    # in-process run would use whatever torch thread count earlier tests left behind, and a
    # logsumexp reduced over another number of threads differs in its last bits.
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "precompute.logits", "--config", str(config),
                    f"run_dir={reference}"], check=True, capture_output=True, timeout=300)
    return World(root=root, config=config, teacher=teacher, tokens=tokens,
                 clean_cache=reference / "cache" / "train.zarr",
                 clean_seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Processes.

def cli(command: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def started(command: list[str], *, stderr_file: Path) -> Iterator[subprocess.Popen]:
    """A child process (stdout piped, stderr to a file so it never blocks on a full pipe) that
    is SIGKILLed and reaped on the way out, whatever happens in the test."""
    with open(stderr_file, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                   stderr=err, text=True)
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
    """What must be identical between two runs of the logits job: every file under the cache.

    Two exclusions, both by exact name:
      * done/locks/<shard>.lock: empty files that only exist to be flock()ed; which ones exist
        records which shards some process once claimed, not what the cache holds.
      * in the root zarr.json, the manifest's `created` and `completed` timestamps (when each
        run happened; VOLATILE_KEYS) and `manifest_sha256`, the digest over them. Everything
        else in that file is compared, as parsed JSON.
    """
    digest = {name: sha for name, sha in snapshot(cache).items()
              if not (name.startswith("done/locks/") and name.endswith(".lock"))}
    digest.update(_lse_digests(cache, digest))
    root = json.loads((cache / "zarr.json").read_text())
    attributes = root["attributes"]
    attributes["manifest_sha256"] = "<digest of the timestamps>"
    for key in VOLATILE_KEYS:
        if key != "software_version":
            attributes["manifest"][key] = "<timestamp>"
    digest["zarr.json"] = json.dumps(root, sort_keys=True)
    return digest


def _lse_digests(cache: Path, digest: dict[str, str]) -> dict[str, str]:
    """lse shard files compared by value (within 1e-5 nats), not by bytes; every other file by
    bytes. Seen once after the writer thread stopped running torch operators (which made runs
    differ often): a clean run's float32 logsumexp differed from two others' in the last bit
    (<= 4.8e-7) in one row of its first batch; the cause is not found."""
    from storage.cache import open_cache

    names = [name for name in digest if name.startswith("lse/c/")]
    if not names:
        return {}
    opened = open_cache(cache, allow_incomplete=True)
    return {name: LseValues(opened.read(*opened.shard_rows(int(name.split("/")[2]))).lse)
            for name in names}


@dataclass(frozen=True, eq=False)
class LseValues:
    """A shard's decoded lse; equal to another when every value is within 1e-5 nats."""

    values: np.ndarray

    def __eq__(self, other) -> bool:
        return isinstance(other, LseValues) and self.values.shape == other.values.shape and \
            bool(np.abs(self.values - other.values).max(initial=0.0) <= 1e-5)


def differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names whose digests differ or that exist on one side only."""
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


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

"""Teacher-logit cache: the teacher's top-k logits per position in a Zarr v3 group, row-aligned
with one token store (row i is sequence i of that store).

Arrays (N sequences, L positions, k kept entries, n_T temperatures):

  ids     (N, L, k)    uint16 (vocab <= 65536) or uint32: the teacher's top-k ids, descending
  logits  (N, L, k)    the value code (below) of the top-k logits
  lse     (N, L, n_T)  float32: logsumexp over the FULL vocabulary of (stored logits) / T, for
                       each T of `manifest["temperatures"]`
  done    (n_shards,)  bool, one element per file: shard finished and fsynced

Decoding is always  p_i = exp(logits_i / T - lse_T)  with the float32 `logits` and `lse` that
`LogitCache.read` returns, exact up to the value code's rounding; the tail mass 1 - sum_i p_i is
the teacher's true remaining probability (never a renormalised guess).

Value codes (`value_code`, stored in the manifest). Both store logits shifted per position by
the top-1 logit, v_i = z_i - z_0 <= 0 (softmax is shift-invariant), and store `lse` for the
shifted logits (lse_T(z - c) = lse_T(z) - c / T). The top-1 probability exp(-lse_1) and the
tail mass therefore come from float32 numbers and are exact whatever the code; only the other
head entries carry the code's rounding:

  'float16'  v_i in float16 (round to nearest). Relative error of p_i at T=1 below 2^-11 * |v_i|
             (|v_i| < 8 nats: < 0.4 %; |v_i| < 1: < 0.05 %).
  'gap8'     uint8 gaps of the quantised distance from the top-1 logit: u_i = round(-v_i / STEP)
             with STEP = 1/32 nat, stored as g_i = u_i - u_{i-1} (g_0 = u_0 = 0). Rounding the
             cumulative u_i (not each gap) keeps the error from drifting: |v_i' - v_i| <= 1/64
             nat, so p_i is within a factor exp(+-1/(64 T)) of the truth (<= 1.6 % at T=1,
             0.8 % at T=2). Gap 255 is an escape: an entry more than 254 steps (7.9 nats, a
             probability ratio of 3.5e-4) below its predecessor, and every entry after it, decodes
             to GAP8_FLOOR (p = 0), so its tiny mass is counted in the tail instead.

gap8 is the smaller on disk (one byte a value against two; bench/cache.py measures both on a
trained teacher, docs/log.md has the figures). Shuffle per array (Blosc-zstd level 3): ids
unshuffled, float16 byte-shuffled, gap8 bit-shuffled, lse byte-shuffled: the smallest of the three
choices for each (bench/cache.py).

Because rounding can make the decoded head sum exceed 1 by up to the relative error above,
consumers clamp the tail mass at 0 (or a small floor).

Counted draws (manifest selection kind 'draws', value code 'none'): ids drawn at each
temperature of the manifest's `temperatures`, `draws[i]` of them at temperatures[i], and nothing
else: a student distilling at one of those temperatures needs only the draws' frequencies
(training/losses.py, `sampled_targets`), so no logits and no lse are stored. Each position keeps,
per temperature, its distinct drawn ids in ascending order, delta-coded (the first id as is,
then the step to the next), with how often each was drawn:

  ids     (N, L, S)  S = sum(draws): temperature i's slots follow temperature i-1's; a
                     position's distinct ids fill the first slots of its segment, the rest are 0
  counts  (N, L, S)  uint8: draws of each distinct id; 0 marks an empty slot

Sorted ids leave small steps, which Blosc's bit shuffle packs into a few bits, and repeats cost
one count instead of one id each (bench/draws.py measures the bytes). `expand_draws` turns a
segment back into the plain draws, each id repeated by its count.

Layout: chunks of `chunk_sequences` sequences are the unit of compression, CRC-32C checksum and
contiguous reads; shards of `shard_chunks` chunks (one file per array, Zarr's sharding codec) are
the unit of writing, resume and integrity reports. A shard has exactly one writer at a time
(`CacheWriter.claim`: an flock per shard, or in object storage a lease, storage.lease), is
encoded whole by zarr in memory, put in place whole (written beside and renamed in, fsynced; or
one PUT), and only then marked done, so a crash never leaves a done shard with bad bytes, and a
resumed cache is byte-identical to an uninterrupted one (chunks carry no timestamps). A cache may
live in a local folder or at a URL (storage.location): the same code writes and reads both.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import glob
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zarr
from zarr.core.buffer import cpu

from configs import flatten, writing
from storage.chunks import ChunkError, RowReader, read_metadata
from storage.errors import CorruptData, ManifestMismatch, Problem, StorageError, StoreNotFound
from storage.lease import Lease
from storage.location import Remote, file_exists, locate, upload_folder
from storage.paths import make_folder
from storage.tokens import TokenStore, manifest_digest, token_dtype
from storage.zarr_codecs import checked_compressors

FORMAT = "logit_cache"
FORMAT_VERSION = 1
VALUE_CODES = ("float16", "gap8")
NO_VALUES = "none"
"""The value code of counted draws, which store no logits."""
MAX_DRAWS = 255
"""Draws per position and temperature a counted-draws cache holds at most (uint8 counts)."""
GAP8_STEP = 1.0 / 32
GAP8_ESCAPE = 255
GAP8_FLOOR = -1.0e4
"""Decoded logit of escaped gap8 entries: exp(GAP8_FLOOR / T) is 0 in float32 for any T <= 100,
and 0 * GAP8_FLOOR stays finite (no NaN in p log p)."""

# Manifest keys that legitimately differ between a cache and the same cache resumed later.
VOLATILE_KEYS = ("created", "software_version", "completed")
DATA_ARRAYS = ("ids", "logits", "lse")
DRAW_ARRAYS = ("ids", "counts")
# Blosc shuffle per array (bench/cache.py and bench/draws.py measure the alternatives).
SHUFFLE = {"ids": "noshuffle", "float16": "shuffle", "gap8": "bitshuffle", "lse": "shuffle",
           "delta_ids": "bitshuffle", "counts": "noshuffle"}
VALUE_DTYPE = {"float16": np.float16, "gap8": np.uint8}


@dataclass(frozen=True)
class TeacherBlock:
    """Decoded cache rows: ids int64 (n, L, k), logits float32 (n, L, k), lse float32 (n, L, n_T);
    logits and lse None when read with values=False, and for counted draws. `counts` is set only
    on counted draws read with decode=False (ids then delta-coded: `expand_draws`)."""

    ids: np.ndarray
    logits: np.ndarray | None
    lse: np.ndarray | None
    counts: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Value codes: pure functions.

def encode_values(logits: np.ndarray, lse: np.ndarray, *, value_code: str,
                  temperatures: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Raw teacher logits -> (stored values, stored lse).

    logits: float32 (n, L, k) raw top-k logits, descending along k.
    lse:    float32 (n, L, n_T) exact full-vocabulary logsumexp(raw logits / T) per temperature.
    Returns values (n, L, k) in the code's dtype and lse float32 (n, L, n_T) for the logits
    shifted by the top-1 logit (see the module docstring).
    """
    logits = np.asarray(logits, dtype=np.float32)
    top = logits[..., :1]
    shifted = np.minimum(logits - top, 0.0)
    temps = np.asarray(temperatures, dtype=np.float32)
    stored_lse = (np.asarray(lse, dtype=np.float32) - top / temps).astype(np.float32)
    if value_code == "float16":
        values = np.maximum(shifted, np.finfo(np.float16).min).astype(np.float16)
    elif value_code == "gap8":
        units = np.rint(-shifted.astype(np.float64) / GAP8_STEP).astype(np.int64)
        gaps = np.diff(units, axis=-1, prepend=0)
        escaped = np.logical_or.accumulate(gaps >= GAP8_ESCAPE, axis=-1)
        values = np.where(escaped, GAP8_ESCAPE, gaps).astype(np.uint8)
    else:
        raise ValueError(f"unknown value code {value_code!r} (known: {', '.join(VALUE_CODES)})")
    return values, stored_lse


def decode_values(values: np.ndarray, *, value_code: str) -> np.ndarray:
    """Stored values (n, L, k) -> float32 logits (n, L, k) shifted so that the top-1 is 0."""
    if value_code == "float16":
        return values.astype(np.float32)
    if value_code == "gap8":
        # summed as int32 (numpy's float32 and uint16 cumsums run slower: docs/log.md) and
        # converted: integers < 2^24 are exact in float32
        decoded = np.cumsum(values, axis=-1, dtype=np.int32).astype(np.float32)
        decoded *= -GAP8_STEP  # a power of two: exact
        escaped = values == GAP8_ESCAPE
        if escaped.any():
            decoded[escaped] = GAP8_FLOOR
        return decoded
    raise ValueError(f"unknown value code {value_code!r} (known: {', '.join(VALUE_CODES)})")


def same_temperature(a: float, b: float) -> bool:
    """Whether two temperatures are one (to float rounding): a stored or drawn-at temperature
    matches the distillation's, so the cache's values at it serve as they are."""
    return math.isclose(a, b, rel_tol=1e-6)


def count_draws(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws (n, L, m), any order -> (delta-coded distinct ids (n, L, m), counts uint8 (n, L, m)).

    Per position: the distinct ids ascending, stored as the first id and then the step to each
    next one; each id's count beside it; the slots after the last distinct id hold 0 and 0.
    m <= MAX_DRAWS."""
    n, length, m = ids.shape
    if m > MAX_DRAWS:
        raise ValueError(f"{m} draws per position: counted draws hold at most {MAX_DRAWS}")
    ordered = np.sort(ids.astype(np.int64), axis=-1)
    first = np.ones(ordered.shape, dtype=bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = np.cumsum(first, axis=-1) - 1  # each draw's slot among its position's distinct ids
    distinct = np.zeros_like(ordered)
    np.put_along_axis(distinct, slot, ordered, axis=-1)  # repeats write the same id
    where = (np.arange(n * length).reshape(n, length, 1) * m + slot).ravel()
    counts = np.bincount(where, minlength=n * length * m).reshape(n, length, m).astype(np.uint8)
    delta = np.diff(distinct, axis=-1, prepend=0)
    delta[counts == 0] = 0
    return delta, counts


def expand_draws(delta: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`count_draws`'s output -> the draws int64 (n, L, m): each position's distinct ids
    ascending, each repeated by its count (repeats adjacent, as `sampled_targets` wants)."""
    n, length, _ = counts.shape
    m = int(counts[0, 0].sum(dtype=np.int64)) if counts.size else 0
    ids = np.cumsum(delta, axis=-1, dtype=np.int64)
    drawn = np.repeat(ids.ravel(), counts.ravel())
    if drawn.size != n * length * m:
        raise ValueError(f"counts do not add up to {m} draws at every position")
    return drawn.reshape(n, length, m)


# ---------------------------------------------------------------------------------------------
# Manifest helpers.

def _normalise(manifest: dict) -> dict:
    """The manifest as it reads back from zarr attributes (JSON types: lists, not tuples)."""
    return json.loads(json.dumps(manifest))


def _differing_keys(wanted: dict, found: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring the volatile ones."""
    a, b = flatten(wanted), flatten(found)
    return sorted(key for key in a.keys() | b.keys()
                  if key.split(".")[0] not in VOLATILE_KEYS and a.get(key) != b.get(key))


def _short(value) -> str:
    """A value cut short for a one-line message: a path to its last two parts (where two paths
    to teachers differ), anything else to its first 21 characters."""
    text = json.dumps(value) if not isinstance(value, str) else value
    if len(text) <= 24:
        return text
    return ".../" + "/".join(Path(text).parts[-2:]) if "/" in text else text[:21] + "..."


def read_manifest(path: Path | Remote) -> dict:
    """The cache's manifest; a missing cache is StoreNotFound, a damaged one CorruptData."""
    root = path / "zarr.json"
    if not file_exists(root):
        raise StoreNotFound(f"no logit cache at {path} (run `make teacher-logits` first)")
    try:
        attributes = read_metadata(root)["attributes"]
        manifest = dict(attributes["manifest"])
        digest = attributes["manifest_sha256"]
    except ChunkError as exc:
        line = f"manifest unreadable (file zarr.json {exc.problem})"
        raise CorruptData(f"logit cache {path}: {line}", problem=Problem(
            line, kind=exc.kind, file="zarr.json")) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptData(f"logit cache {path}: manifest unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptData(f"{path} is not a logit cache (format {manifest.get('format')!r})")
    if manifest_digest(manifest) != digest:
        raise CorruptData(f"logit cache {path}: manifest was edited after writing (its sha256 "
                          "does not match); restore it or rebuild with `make teacher-logits`")
    return manifest


def _corrupt(path: Path | Remote, name: str, exc: ChunkError,
             shard: int | None = None) -> CorruptData:
    """The CorruptData of a cache file a ChunkError refused, naming it (and its shard)."""
    where = f"shard {shard}: " if shard is not None else ""
    message = f"logit cache {path}: {where}file {name} {exc.problem}"
    return CorruptData(message, problem=Problem(f"{where}file {name} {exc.problem}",
                                                kind=exc.kind, shard=shard, file=name))


def _software_version() -> str:
    try:
        return metadata.version("babylm-kd")
    except metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync(path: Path) -> None:
    """Flush a file (or directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_file(file: Path | Remote, data: bytes) -> None:
    """`data` as the whole of `file`, durably and atomically: one PUT, or written beside the file,
    fsynced and renamed into place (a killed write leaves only `<name>.<uuid>.partial`)."""
    if isinstance(file, Remote):
        file.write(data)
        return
    make_folder(file.parent)
    partial = file.with_name(f"{file.name}.{uuid.uuid4().hex}.partial")
    with writing(file):
        with open(partial, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, file)
    _fsync(file.parent)


def _delete_file(file: Path | Remote) -> None:
    if isinstance(file, Remote):
        file.delete()
        return
    file.unlink(missing_ok=True)
    _fsync(file.parent)


def _shard_file(path: Path | Remote, name: str, shard: int) -> Path | Remote:
    """The file of `shard` in array `name` (Zarr v3 default chunk keys; shards split rows only)."""
    file = path / name / "c" / str(shard)
    return file if name == "done" else file / "0" / "0"


def _remove_temp_files(file: Path | Remote) -> None:
    """Delete the temp files a killed write of `file` left (`<name>.<uuid>.partial`, renamed
    onto `file` when complete); only the caller, holding the shard's lock, can be writing them.
    Object storage has none: a PUT lands whole or not at all."""
    if isinstance(file, Remote):
        return
    for stale in file.parent.glob(f"{file.name}.*.partial"):
        stale.unlink(missing_ok=True)


class _ShardEncoder:
    """Encodes rows of one cache array into the files zarr would write for them, in memory: the
    same bytes, handed to `_put_file` (which local folders and object storage both take)."""

    def __init__(self, metadata: dict):
        self._metadata = json.dumps(metadata).encode()
        self.dtype = np.dtype(metadata["data_type"])

    def files(self, rows: slice | int, data) -> dict[str, bytes]:
        """{key under the array: bytes} of the chunk files holding `rows` after `array[rows] =
        data` (whole shards: nothing is merged)."""
        stored = {"zarr.json": cpu.Buffer.from_bytes(self._metadata)}
        # every chunk written, zeros too: a shard always has its file (verify: missing = lost)
        array = zarr.open_array(store=zarr.storage.MemoryStore(stored), mode="r+",
                                config={"write_empty_chunks": True})
        array[rows] = data
        return {key: value.to_bytes() for key, value in stored.items() if key != "zarr.json"}


# ---------------------------------------------------------------------------------------------
# Shared geometry and reading.

class _CacheBase:
    """Geometry and manifest shared by the writer and the reader."""

    path: Path | Remote
    manifest: dict

    drawn_at: float | None = None
    """Counted draws only: the temperature whose draws `read` returns (`at_temperature`)."""

    @property
    def k(self) -> int:
        """Entries per position: the top k, the draws, or, for counted draws, the draws at the
        chosen temperature (all the slots of every temperature when none is chosen)."""
        if self.drawn_at is not None:
            return self.draws[self.temperatures.index(self.drawn_at)]
        return self.manifest["k"]

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays holding the cache's data (every shard has one file in each)."""
        return DRAW_ARRAYS if self.selection["kind"] == "draws" else DATA_ARRAYS

    @property
    def draws(self) -> tuple[int, ...]:
        """Counted draws: the draws per position at each of `temperatures`; () otherwise."""
        return tuple(self.selection.get("draws", ())) if self.selection["kind"] == "draws" else ()

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(self.manifest["temperatures"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest: names this cache (its teacher, inputs, k, selection, code)."""
        return manifest_digest(self.manifest)

    @property
    def value_code(self) -> str:
        return self.manifest["value_code"]

    @property
    def selection(self) -> dict:
        """How the k entries were chosen: {"kind": "topk"}, {"kind": "sample", "temperature",
        "seed"} for draws with their logits, or {"kind": "draws", "draws", "seed"} for counted
        draws at each of `temperatures` (precompute's cache.selection; top-k caches record
        nothing)."""
        return self.manifest.get("selection") or {"kind": "topk"}

    @property
    def sample_temperature(self) -> float | None:
        """The temperature the entries read were drawn at; None for a top-k cache."""
        if self.selection["kind"] == "draws":
            return self.drawn_at
        return self.selection["temperature"] if self.selection["kind"] == "sample" else None

    @property
    def n_sequences(self) -> int:
        return self.manifest["n_sequences"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def chunk_sequences(self) -> int:
        return self.manifest["chunking"]["chunk_sequences"]

    @property
    def shard_sequences(self) -> int:
        return self.manifest["chunking"]["shard_sequences"]

    @property
    def n_shards(self) -> int:
        return self.manifest["chunking"]["n_shards"]

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """[start, stop) sequence rows of `shard`."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range (cache has {self.n_shards})")
        start = shard * self.shard_sequences
        return start, min(start + self.shard_sequences, self.n_sequences)

    def shard_of(self, row: int) -> int:
        return row // self.shard_sequences

    def done_shards(self) -> np.ndarray:
        """bool (n_shards,): which shards are finished, read fresh from disk. A done mark that
        cannot be read counts as not done: its shard is rewritten on resume."""
        return self._done_marks()[0]

    def _done_marks(self) -> tuple[np.ndarray, list[int]]:
        """(done bool (n_shards,), the shards whose done mark is unreadable, counted not done).
        A mark never written is not done; one that is there but cannot be read counts as not
        done too: its shard is written again. All marks are read in one go (one round trip in
        object storage)."""
        marks = self._done_reader.read_each(range(self.n_shards))
        unreadable = [shard for shard, mark in enumerate(marks)
                      if isinstance(mark, ChunkError) and mark.kind != "missing"]
        done = np.array([not isinstance(mark, ChunkError) and bool(mark[0]) for mark in marks],
                        dtype=bool)
        return done, unreadable

    def _is_done(self, shard: int) -> bool:
        """Whether `shard` is marked done, read fresh (an unreadable mark is not)."""
        (mark,) = self._done_reader.read_each(range(shard, shard + 1))
        return not isinstance(mark, ChunkError) and bool(mark[0])

    @functools.cached_property
    def _done_reader(self) -> RowReader:
        """The done array, read as every stored file is (storage.chunks)."""
        try:
            return RowReader(self.path / "done")
        except ChunkError as exc:
            raise _corrupt(self.path, "done/zarr.json", exc) from None

    def _read_problem(self, shard: int, name: str) -> Problem | None:
        """Why shard `shard` of array `name` cannot be read, or None if it reads cleanly: the
        shard is read whole as training reads it (chunks.RowReader: every chunk's checksum)."""
        file = _shard_file(self.path, name, shard)
        where = f"shard {shard}: file {file.relative_to(self.path)}"
        start, stop = self.shard_rows(shard)
        try:
            RowReader(self.path / name).read(start, stop)  # a fresh reader: no cached index
        except ChunkError as exc:
            return Problem(f"{where} {exc.problem}", kind=exc.kind, shard=shard,
                           file=str(file.relative_to(self.path)))
        return None


# ---------------------------------------------------------------------------------------------
# Writing.

LEASE_SECONDS = 60.0
"""Term of a remote shard's lease (storage.lease): renewed while its writer lives; a killed
writer's shards wait this long before another writer takes them over."""


def create_cache(path: Path | Remote | str, *, n_sequences: int, seq_len: int, k: int,
                 vocab_size: int, temperatures: Sequence[float], value_code: str,
                 chunk_sequences: int, shard_chunks: int, manifest: dict,
                 lease_seconds: float = LEASE_SECONDS) -> "CacheWriter":
    """Create an empty cache at `path` (a folder, or a `Remote`), or resume the one there if it
    was made for the same inputs.

    `manifest` holds the caller's facts (teacher name/fingerprint/dtype/quantization/adapter,
    tokenizer_fingerprint, token_store_fingerprint, ...); the format fields are added here. An
    existing cache with another manifest (ignoring created/software_version/completed) raises
    ManifestMismatch naming the differing keys, and nothing is touched. `lease_seconds`: the term
    of a shard's lease in object storage.
    """
    path = locate(path)
    draws = (manifest.get("selection") or {}).get("draws")
    if draws is not None:  # counted draws: k slots, draws[i] at temperatures[i], no values
        if len(draws) != len(temperatures) or not all(1 <= m <= MAX_DRAWS for m in draws):
            raise ValueError(f"counted draws need 1..{MAX_DRAWS} draws at each temperature, got "
                             f"{list(draws)} for temperatures {list(temperatures)}")
        if value_code != NO_VALUES or k != sum(draws):
            raise ValueError(f"counted draws store no values (value_code {NO_VALUES!r}) in "
                             f"k = sum(draws) = {sum(draws)} slots")
    elif value_code not in VALUE_CODES:
        raise ValueError(f"unknown value code {value_code!r} (known: {', '.join(VALUE_CODES)})")
    if not 1 <= k <= vocab_size and draws is None:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size {vocab_size}")
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures must be positive, got {temperatures}")
    if min(n_sequences, seq_len, chunk_sequences, shard_chunks) < 1:
        raise ValueError("n_sequences, seq_len, chunk_sequences and shard_chunks must be >= 1")
    chunk_sequences = min(chunk_sequences, n_sequences)
    shard_sequences = chunk_sequences * shard_chunks
    wanted = _normalise({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "n_sequences": n_sequences,
        "seq_len": seq_len,
        "k": k,
        "vocab_size": vocab_size,
        "temperatures": [float(t) for t in temperatures],
        "value_code": value_code,
        "chunking": {"chunk_sequences": chunk_sequences, "shard_chunks": shard_chunks,
                     "shard_sequences": shard_sequences,
                     "n_shards": -(-n_sequences // shard_sequences)},
        "created": _now(),
        "software_version": _software_version(),
        "completed": None,
    })
    if isinstance(path, Remote):
        path.need_conditional_writes()  # before anything is written there
        if not file_exists(path / "zarr.json"):
            _create_remote(path, wanted)
    elif not path.exists() or (path.is_dir() and not any(path.iterdir())):
        _create_new(path, wanted)
    elif not (path / "zarr.json").is_file():
        raise StorageError(f"{path} exists and is not a logit cache; move it away or choose "
                           "another cache path")
    return _resume(path, wanted, lease_seconds=lease_seconds)


def _create_new(path: Path, manifest: dict) -> None:
    """Build the empty group beside `path` and rename it into place, holding the lock file
    `.<name>.lock` beside it: concurrent creators take turns (the later ones find the finished
    group), and the leftovers of a creator killed mid-way are removed by the next one."""
    make_folder(path.parent)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and any(path.iterdir()):  # another creator finished first
            return
        for stale in path.parent.glob(f".{glob.escape(path.name)}.creating*"):
            shutil.rmtree(stale)
        tmp = path.with_name(f".{path.name}.creating")
        _build_empty(tmp, manifest)
        (tmp / "done" / "locks").mkdir()
        os.rename(tmp, path)


def _create_remote(path: Remote, manifest: dict) -> None:
    """Put the empty group's metadata under `path`, its root zarr.json last and only if absent:
    of concurrent creators one wins and the others resume its cache; a creator killed before
    the root leaves metadata the next one puts again."""
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "cache.zarr"
        _build_empty(built, manifest)
        root = (built / "zarr.json").read_bytes()
        (built / "zarr.json").unlink()
        upload_folder(built, path)
        (path / "zarr.json").create(root)


def _build_empty(tmp: Path, manifest: dict) -> None:
    """The empty group of `manifest` at `tmp`: data arrays and done marks, metadata only."""
    group = zarr.open_group(tmp, mode="w")
    n, length, k = manifest["n_sequences"], manifest["seq_len"], manifest["k"]
    chunking = manifest["chunking"]
    rows, shard = chunking["chunk_sequences"], chunking["shard_sequences"]
    n_t = len(manifest["temperatures"])
    ids_dtype = token_dtype(manifest["vocab_size"])
    if manifest["value_code"] == NO_VALUES:  # counted draws
        spec = {"ids": ((n, length, k), ids_dtype, "delta_ids"),
                "counts": ((n, length, k), np.uint8, "counts")}
    else:
        spec = {
            "ids": ((n, length, k), ids_dtype, "ids"),
            "logits": ((n, length, k), VALUE_DTYPE[manifest["value_code"]],
                       manifest["value_code"]),
            "lse": ((n, length, n_t), np.float32, "lse"),
        }
    for name, (shape, dtype, shuffle_key) in spec.items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]),
                           shards=(shard, *shape[1:]), fill_value=0,
                           compressors=checked_compressors(shuffle=SHUFFLE[shuffle_key]),
                           config={"write_empty_chunks": True})
    # One element per file: ranks finishing different shards never rewrite one chunk.
    group.create_array("done", shape=(chunking["n_shards"],), dtype=bool, chunks=(1,),
                       fill_value=False, compressors=checked_compressors())
    group.attrs.update({"manifest": manifest, "manifest_sha256": manifest_digest(manifest)})


def _resume(path: Path | Remote, wanted: dict, *, lease_seconds: float) -> "CacheWriter":
    found = read_manifest(path)
    differing = _differing_keys(wanted, found)
    if differing:
        flat_w, flat_f = flatten(wanted), flatten(found)
        detail = ", ".join(f"{key}: {_short(flat_f.get(key))} there, {_short(flat_w.get(key))} now"
                           for key in differing[:4])
        raise ManifestMismatch(
            f"logit cache {path} was made with other settings ({detail}); delete it to rebuild, "
            "or rerun with the settings it was made with")
    return CacheWriter(path=path, manifest=found, lease_seconds=lease_seconds)


class ShardClaim:
    """The right to write one shard: holds the shard's lock (an flock, or a remote `Lease`)
    until `release` (or the end of a `with` block). Any thread may release it; releasing twice
    is harmless."""

    def __init__(self, *, shard: int, lock, held: set[int]):
        self.shard, self._lock, self._held = shard, lock, held
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held.discard(self.shard)
        if isinstance(self._lock, Lease):
            self._lock.release()
        else:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "ShardClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CacheWriter(_CacheBase):
    """Writes whole shards of one cache. Any number of processes may hold a writer on the same
    cache: `claim` makes each shard's writer exclusive."""

    def __init__(self, *, path: Path | Remote, manifest: dict,
                 lease_seconds: float = LEASE_SECONDS):
        self.path, self.manifest, self.lease_seconds = path, manifest, lease_seconds
        self._encoders = {}
        for name in (*self.arrays, "done"):
            try:
                self._encoders[name] = _ShardEncoder(read_metadata(path / name / "zarr.json"))
            except ChunkError as exc:
                raise _corrupt(path, f"{name}/zarr.json", exc) from None
        self._held: set[int] = set()

    def pending_shards(self, *, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards not done yet whose index is `rank` modulo `world_size`."""
        done = self.done_shards()
        return [s for s in range(rank, self.n_shards, world_size) if not done[s]]

    def try_claim(self, shard: int, *, wait: bool = True) -> "ShardClaim | None":
        """Take the exclusive inter-process lock of `shard`: fcntl.flock on done/locks/<shard>
        in a local folder, the lease done/locks/<shard>.lease in object storage.

        Returns the claim when the caller owns the shard and must write it; None when the shard
        is already done (re-checked after locking) or, with wait=False, when another process
        holds it. The claim is a handle, not a `with` block, so the thread that writes the shard
        may release it: the logits job claims in its compute thread and writes in another.
        """
        if isinstance(self.path, Remote):
            lock = Lease.take(self.path / "done" / "locks" / f"{shard}.lease",
                              seconds=self.lease_seconds, wait=wait)
            if lock is None:
                return None
        else:
            lock_path = self.path / "done" / "locks" / f"{shard}.lock"
            lock_path.parent.mkdir(exist_ok=True)
            lock = open(lock_path, "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                lock.close()
                return None
        claim = ShardClaim(shard=shard, lock=lock, held=self._held)
        if self._is_done(shard):
            claim.release()
            return None
        self._held.add(shard)
        return claim

    @contextlib.contextmanager
    def claim(self, shard: int, *, wait: bool = True) -> Iterator[bool]:
        """`try_claim` as a `with` block: yields whether the caller owns the shard."""
        claim = self.try_claim(shard, wait=wait)
        try:
            yield claim is not None
        finally:
            if claim is not None:
                claim.release()

    def claimed_shards(self, *, rank: int = 0, world_size: int = 1) -> Iterator["ShardClaim"]:
        """Claim this rank's pending shards one at a time; the caller writes each and releases
        its claim. Shards other processes hold are skipped and revisited, waiting for one only
        when nothing else is left, so processes started together share the work."""
        while pending := self.pending_shards(rank=rank, world_size=world_size):
            claimed_any = False
            for shard in pending:
                if claim := self.try_claim(shard, wait=False):
                    claimed_any = True
                    yield claim
            if not claimed_any:  # all held, perhaps by our own writer thread: wait for one
                if claim := self.try_claim(pending[0]):  # its holder died without finishing it
                    yield claim

    def write_shard(self, shard: int, *, ids: np.ndarray, logits: np.ndarray | None = None,
                    lse: np.ndarray | None = None) -> None:
        """Encode and write one whole shard, fsync its files, then mark it done.

        ids int (n, L, k) top-k ids descending; logits float32 (n, L, k) raw teacher logits
        (T = 1) of those ids; lse float32 (n, L, n_T) exact logsumexp of the raw logits / T over
        the full vocabulary; n = the shard's row count. Counted draws: ids (n, L, k) the draws at
        each temperature one after the other (draws[0] slots, then draws[1], ...), in any order
        within each; no logits, no lse. Must run inside `claim(shard)`.
        """
        if shard not in self._held:
            raise RuntimeError(f"write_shard({shard}) outside `with writer.claim({shard})`: "
                               "concurrent writers of one shard corrupt it")
        start, stop = self.shard_rows(shard)
        shape = (stop - start, self.seq_len, self.k)
        lse_shape = (*shape[:2], len(self.temperatures))
        given = [("ids", ids, shape)]
        if not self.draws:
            given += [("logits", logits, shape), ("lse", lse, lse_shape)]
        for name, array, want in given:
            if array is None or array.shape != want:
                raise ValueError(f"shard {shard}: {name} has shape "
                                 f"{getattr(array, 'shape', None)}, expected {want}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"shard {shard}: ids outside [0, {self.vocab_size})")
        if self.draws:
            segments = np.split(ids, np.cumsum(self.draws)[:-1], axis=-1)
            delta, counts = zip(*map(count_draws, segments))
            data = {"ids": np.concatenate(delta, axis=-1).astype(self._encoders["ids"].dtype),
                    "counts": np.concatenate(counts, axis=-1)}
        else:
            logits = np.asarray(logits, dtype=np.float32)
            if not np.all(logits[..., :-1] >= logits[..., 1:]):
                raise ValueError(f"shard {shard}: logits must be finite and descending along k")
            values, stored_lse = encode_values(logits, lse, value_code=self.value_code,
                                               temperatures=self.temperatures)
            data = {"ids": ids.astype(self._encoders["ids"].dtype), "logits": values,
                    "lse": stored_lse}
        for name in self.arrays:
            file = _shard_file(self.path, name, shard)
            _remove_temp_files(file)
            (encoded,) = self._encoders[name].files(slice(start, stop), data[name]).values()
            _put_file(file, encoded)
        done_file = _shard_file(self.path, "done", shard)
        _remove_temp_files(done_file)
        (mark,) = self._encoders["done"].files(shard, True).values()
        _put_file(done_file, mark)

    def reopen_damaged(self) -> list[Problem]:
        """Read every done shard as training would; a shard that fails is marked not done, so
        this job writes it again. Returns the problems found (one per damaged file)."""
        problems = []
        done = self.done_shards()
        for shard in np.flatnonzero(done).tolist():
            problems += filter(None, (self._read_problem(shard, name) for name in self.arrays))
            if problems and problems[-1].shard == shard:
                _delete_file(_shard_file(self.path, "done", shard))
        return problems

    def finish(self) -> bool:
        """Record completion in the manifest when every shard is done; True if complete."""
        if not self.done_shards().all():
            return False
        if self.manifest.get("completed") is None:
            manifest = {**self.manifest, "completed": _now()}
            root = read_metadata(self.path / "zarr.json")
            root["attributes"] = {**root.get("attributes", {}), "manifest": manifest,
                                  "manifest_sha256": manifest_digest(manifest)}
            _put_file(self.path / "zarr.json", json.dumps(root, indent=2).encode())
            self.manifest = manifest
        return True


# ---------------------------------------------------------------------------------------------
# Reading.

def open_cache(path: Path | Remote | str, *, token_store: TokenStore | None = None,
               vocab_size: int | None = None, allow_incomplete: bool = False) -> "LogitCache":
    """Open a cache for reading, refusing one made for another token store / tokenizer / vocab.

    Raises StoreNotFound (missing, or incomplete unless allow_incomplete), ManifestMismatch,
    CorruptData (unreadable or hand-edited manifest).
    """
    path = locate(path)
    manifest = read_manifest(path)
    cache = LogitCache(path=path, manifest=manifest)
    if token_store is not None:
        checks = (
            ("token store", manifest.get("token_store_fingerprint"), token_store.fingerprint),
            ("tokenizer", manifest.get("tokenizer_fingerprint"), token_store.tokenizer_fingerprint),
            ("sequence count", manifest["n_sequences"], token_store.n_sequences),
            ("seq_len", manifest["seq_len"], token_store.seq_len),
        )
        for what, made_for, given in checks:
            if made_for != given:
                raise ManifestMismatch(
                    f"logit cache {path} was made for another {what} ({_short(made_for)}, not "
                    f"{_short(given)} of {token_store.path}); rerun `make teacher-logits` for it")
    if vocab_size is not None and vocab_size != manifest["vocab_size"]:
        raise ManifestMismatch(f"logit cache {path} has vocabulary {manifest['vocab_size']}, the "
                               f"student has {vocab_size}; use a cache made with its tokenizer")
    missing = np.flatnonzero(~cache.done).tolist()
    if missing and not allow_incomplete:
        named = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise StoreNotFound(f"logit cache {path} is incomplete: {len(missing)} of "
                            f"{cache.n_shards} shards missing (shard{'s' * (len(missing) > 1)} "
                            f"{named}); rerun `make teacher-logits` to finish it")
    return cache


class LogitCache(_CacheBase):
    """Read-only view of a cache; reads contiguous rows, decoding the value code."""

    def __init__(self, *, path: Path | Remote, manifest: dict):
        self.path, self.manifest = path, manifest
        self._rows = {}
        for name in self.arrays:
            try:
                self._rows[name] = RowReader(path / name)
            except ChunkError as exc:
                raise _corrupt(path, f"{name}/zarr.json", exc) from None
        self.done = self.done_shards()
        """Shards done when the cache was opened."""
        if len(self.draws) == 1:  # one temperature: nothing to choose
            self.drawn_at = self.temperatures[0]

    def at_temperature(self, temperature: float) -> "LogitCache":
        """This cache as a student at `temperature` reads it: counted draws return the draws
        made at that temperature (ValueError if none were); other caches are returned as they
        are (their targets at any T come from the same entries)."""
        if not self.draws:
            return self
        drawn = [t for t in self.temperatures if same_temperature(t, temperature)]
        if not drawn:
            raise ValueError(f"logit cache {self.path} holds draws at T = "
                             f"{', '.join(f'{t:g}' for t in self.temperatures)}, not at "
                             f"{temperature:g}; distil at one of those, or add {temperature:g} to "
                             "cache.temperatures (and cache.draws) and rebuild the cache")
        view = copy.copy(self)
        view.drawn_at = drawn[0]
        return view

    def __repr__(self) -> str:
        return (f"LogitCache({self.path}, n={self.n_sequences}, L={self.seq_len}, k={self.k}, "
                f"code={self.value_code}, shards {int(self.done.sum())}/{self.n_shards})")

    def read(self, start: int, stop: int, *, k: int | None = None, decode: bool = True,
             values: bool = True) -> TeacherBlock:
        """Rows [start, stop), contiguous: ids int64 (n, L, k'), logits float32 (n, L, k'),
        lse float32 (n, L, n_T), with k' = k or the cached k. A failed checksum, missing file or
        unfinished shard is CorruptData naming the shard and file.

        decode=False leaves ids and logits as stored (`decode` converts them later): a quarter
        of the memory, for readers that hold many rows and use few at a time. values=False reads
        the ids alone (logits and lse None): all that KD from draws at their own temperature
        uses."""
        if not 0 <= start < stop <= self.n_sequences:
            raise IndexError(f"rows [{start}, {stop}) outside the cache's {self.n_sequences}")
        k = self.k if k is None else k
        if not 1 <= k <= self.k:
            raise ValueError(f"k = {k} but the cache holds k = {self.k}")
        if self.draws and (self.drawn_at is None or k != self.k):
            raise ValueError(f"logit cache {self.path}: counted draws are read whole at one "
                             "temperature (`at_temperature`)")
        shards = range(self.shard_of(start), self.shard_of(stop - 1) + 1)
        for shard in shards:
            self._check_present(shard)
        names = self.arrays if values or self.draws else ("ids",)
        try:
            arrays = {name: self._rows[name].read(start, stop) for name in names}
        except ChunkError:  # locate the damage and say it as `verify` does
            for shard in shards:
                for name in names:
                    problem = self._read_problem(shard, name)
                    if problem:
                        raise CorruptData(f"logit cache {self.path}: {problem}",
                                          problem=problem) from None
            raise
        if self.draws:  # this temperature's slots; a copy frees the other temperatures'
            first = sum(self.draws[:self.temperatures.index(self.drawn_at)])
            delta, counts = (np.ascontiguousarray(arrays[name][..., first:first + k])
                             for name in DRAW_ARRAYS)
            block = TeacherBlock(ids=delta, logits=None, lse=None, counts=counts)
            return self.decode(block) if decode else block
        ids, stored, lse = (arrays.get(name) for name in DATA_ARRAYS)
        if k < self.k:  # a copy: a view would keep every row's full k alive
            ids = np.ascontiguousarray(ids[..., :k])
            stored = None if stored is None else np.ascontiguousarray(stored[..., :k])
        block = TeacherBlock(ids=ids, logits=stored, lse=lse)
        return self.decode(block) if decode else block

    def decode(self, block: TeacherBlock) -> TeacherBlock:
        """A block read with decode=False, decoded as `read` returns it."""
        if block.counts is not None:
            return TeacherBlock(ids=expand_draws(block.ids, block.counts), logits=None, lse=None)
        logits = (None if block.logits is None
                  else decode_values(block.logits, value_code=self.value_code))
        return TeacherBlock(ids=block.ids.astype(np.int64), logits=logits, lse=block.lse)

    def _check_present(self, shard: int) -> None:
        if not self.done[shard]:
            raise CorruptData(f"logit cache {self.path}: shard {shard} is not written "
                              "(rerun `make teacher-logits`)")

    def verify(self, *, progress: bool = False) -> list[Problem]:
        """Every problem found, one each naming the shard: manifest unreadable or edited, shard
        not done, shard file missing, truncated or failing its checksum."""
        try:
            read_manifest(self.path)
        except StorageError as exc:
            return [getattr(exc, "problem", None) or Problem(str(exc), kind="manifest")]
        problems = []
        for name in self.arrays:
            shape = self._rows[name].shape
            last = self.manifest["k"] if name != "lse" else len(self.temperatures)
            if shape != (self.n_sequences, self.seq_len, last):
                problems.append(Problem(f"array {name} has shape {shape}, manifest says "
                                        f"{(self.n_sequences, self.seq_len, last)}", kind="shape"))
        done, corrupt_marks = self._done_marks()
        shards = range(self.n_shards)
        if progress:
            from tqdm import tqdm
            shards = tqdm(shards, desc="verify", unit="shard")
        for shard in shards:
            if shard in corrupt_marks:
                problems.append(Problem(f"shard {shard}: done mark is corrupt (rerun `make "
                                        "teacher-logits` to rewrite the shard)",
                                        kind="done_mark", shard=shard))
                continue
            if not done[shard]:
                problems.append(Problem(f"shard {shard}: not done (rerun `make teacher-logits`)",
                                        kind="not_done", shard=shard))
                continue
            for name in self.arrays:
                problem = self._read_problem(shard, name)
                if problem:
                    problems.append(problem)
        return problems


def cache_bytes(path: Path | Remote | str) -> int:
    """Bytes stored in every file under `path` (leases and locks included: they are tiny)."""
    path = locate(path)
    if isinstance(path, Remote):
        return sum(path.files().values())
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

"""Token store: packed fixed-length token sequences (N, L) in a Zarr v3 group.

Row i is "sequence i" everywhere in the project. The manifest (group attribute `manifest`) records
the format version, source files (name, bytes, sha256), split rule, tokenizer fingerprint and
vocabulary, seq_len, N, the text bytes behind the tokens (for bits per byte) and a fingerprint of
the tokens themselves. A store is written into `<path>.partial` and renamed into place only when
complete, so a crash never leaves a half-written store that looks finished. In object storage
(`path` a `storage.location.Remote`) it is written locally the same way and then put object by
object, its root zarr.json (the manifest) last: until then there is no store there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from configs import flatten, writing
from storage.chunks import ChunkError, RowReader, read_metadata
from storage.errors import CorruptData, ManifestMismatch, Problem, StoreNotFound
from storage.location import Remote, file_exists, locate, upload_folder
from storage.paths import make_folder
from storage.zarr_codecs import checked_compressors

FORMAT_VERSION = 1
KIND = "token_store"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of a manifest; stored beside it to detect hand edits."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def tokens_fingerprint(sequences: np.ndarray) -> str:
    """sha256 of the shape, dtype and bytes of the packed tokens."""
    digest = hashlib.sha256(f"{sequences.shape}|{sequences.dtype.str}|".encode())
    digest.update(np.ascontiguousarray(sequences).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """A read-only view of a token store; reads rows on demand, never the whole store."""

    path: Path | Remote
    manifest: dict
    rows: RowReader
    """Reads rows from the chunk files directly (see storage.chunks)."""

    @property
    def n_sequences(self) -> int:
        return self.rows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def words_per_row(self) -> np.ndarray | None:
        """int64 (N,): words starting in each row; None for a store written without them."""
        if not file_exists(self.path / "words" / "zarr.json"):
            return None
        try:
            return RowReader(self.path / "words").read(0, self.n_sequences).astype(np.int64)
        except ChunkError as exc:
            file = str(exc.file.relative_to(self.path))
            message = f"token store {self.path}: file {file} {exc.problem}"
            raise CorruptData(message, problem=Problem(message, kind=exc.kind, file=file)) from None

    @property
    def chunk_rows(self) -> int:
        return self.rows.chunk_shape[0]

    def __len__(self) -> int:
        return self.n_sequences

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (uint16/uint32); one contiguous read."""
        try:
            return self.rows.read(start, stop)
        except ChunkError as exc:
            file = str(exc.file.relative_to(self.path))
            message = f"token store {self.path}: rows {start}-{stop}: file {file} {exc.problem}"
            raise CorruptData(message, problem=Problem(message, kind=exc.kind, file=file)) from None


def write_token_store(path: Path | Remote | str, *, sequences: np.ndarray, manifest: dict,
                      words: np.ndarray | None = None, chunk_rows: int = 256) -> TokenStore:
    """Write `sequences` (N, L) with `manifest` (source files, split, tokenizer, text_bytes, ...)
    and `words` (N,), the words starting in each row (None: a store without word counts).

    The format fields (version, N, seq_len, fingerprint) are filled in here. An existing store at
    `path` is replaced only once the new one is complete (in object storage: removed first, so
    no reader takes the new arrays for the old store's).
    """
    path = locate(path)
    if sequences.ndim != 2 or sequences.shape[0] == 0:
        raise ValueError(f"sequences must be a non-empty (N, L) array, got {sequences.shape}")
    sequences = sequences.astype(token_dtype(manifest["tokenizer"]["vocab_size"]), copy=False)
    full_manifest = {
        "format": KIND,
        "format_version": FORMAT_VERSION,
        **manifest,
        "n_sequences": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "n_tokens": int(sequences.size),
        "dtype": sequences.dtype.name,
        "fingerprint": tokens_fingerprint(sequences),
        **({"words": int(words.sum())} if words is not None else {}),
    }
    if words is not None and words.shape != sequences.shape[:1]:
        raise ValueError(f"words must be one count per row, got {words.shape}")
    if isinstance(path, Remote):
        with tempfile.TemporaryDirectory() as tmp:
            built = write_token_store(Path(tmp) / path.name, sequences=sequences,
                                      manifest=manifest, words=words, chunk_rows=chunk_rows)
            (path / "zarr.json").delete()
            upload_folder(built.path, path)
        return open_token_store(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with writing(partial):
        group = zarr.open_group(partial, mode="w")
        rows = min(chunk_rows, sequences.shape[0])
        group.create_array("tokens", data=sequences, chunks=(rows, sequences.shape[1]),
                           compressors=checked_compressors())
        if words is not None:
            group.create_array("words", data=words.astype(np.uint32), chunks=words.shape,
                               compressors=checked_compressors())
        group.attrs.update({"manifest": full_manifest,
                            "manifest_sha256": manifest_digest(full_manifest)})
    if path.exists():
        stale = path.with_name(path.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        path.rename(stale)
        partial.rename(path)
        shutil.rmtree(stale)
    else:
        make_folder(path.parent)
        partial.rename(path)
    return open_token_store(path)


def open_token_store(path: Path | Remote | str) -> TokenStore:
    """Open a finished token store; a missing or unreadable one is a typed error naming the path."""
    path = locate(path)
    root = path / "zarr.json"
    if not file_exists(root):
        unfinished = isinstance(path, Path) and path.with_name(path.name + ".partial").exists()
        hint = (" (an unfinished write was left; rerun `make data`)" if unfinished
                else " (run `make data` first)")
        raise StoreNotFound(f"no token store at {path}{hint}")
    try:
        attributes = read_metadata(root)["attributes"]
        rows = RowReader(path / "tokens")
    except ChunkError as exc:
        file = str(exc.file.relative_to(path))
        message = f"token store {path} is unreadable: file {file} {exc.problem}"
        raise CorruptData(message, problem=Problem(message, kind=exc.kind, file=file)) from None
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"token store {path}: zarr.json holds no manifest ({exc})") from None
    manifest, digest = attributes.get("manifest"), attributes.get("manifest_sha256")
    if not isinstance(manifest, dict):
        raise CorruptData(f"token store {path}: zarr.json holds no manifest")
    if manifest.get("format") != KIND:
        raise CorruptData(f"{path} is not a token store (format {manifest.get('format')!r})")
    if digest != manifest_digest(manifest):
        raise CorruptData(f"token store {path}: manifest was edited after writing (its sha256 "
                          "does not match, or is missing); restore it or rerun `make data`")
    shape = (manifest.get("n_sequences"), manifest.get("seq_len"))
    if rows.shape != shape:
        raise CorruptData(f"token store {path}: array shape {rows.shape} is not the "
                          f"manifest's {shape}; rerun `make data`")
    return TokenStore(path=path, manifest=manifest, rows=rows)


def check_one_generation(stores: list[TokenStore]) -> None:
    """Refuse token stores that `make data` did not write together: a killed rerun can leave a
    new train store beside an old validation store. Stores of one run share a `generation`."""
    first, *rest = stores
    for store in rest:
        for what, key in (("generation", "generation"), ("tokenizer", "tokenizer.fingerprint")):
            a, b = (flatten(s.manifest).get(key) for s in (first, store))
            if a != b:
                raise ManifestMismatch(
                    f"token stores {first.path} and {store.path} come from different `make "
                    f"data` runs (their {what} differs); rerun `make data` to rebuild both")

"""Row reads of this project's Zarr arrays straight from their chunk files.

zarr-python sends every read through an asyncio event loop in a thread of its own: its Python
costs more per call than decompressing a cache chunk does, and it holds the GIL that the training
step needs too (docs/log.md). Every array this project writes has one layout: chunks encoded by
bytes (little-endian), Blosc and CRC-32C (storage.zarr_codecs), and for the logit cache those
chunks packed into shard files (Zarr's sharding codec) whose index, at the file's end, carries a
CRC-32C of its own. So a read here is: the chunk's byte range, its checksum, Blosc. Any layout
other than that one is refused when the array is opened. Writing stays with zarr.

Every read of a stored file goes through here, metadata (`read_metadata`) included, so training,
`inspect` and `verify` refuse the same files for the same reasons: missing, not a regular file (a
folder, a pipe, a device: refused before it is opened, so nothing blocks), unreadable, cut short,
failing its checksum, or not the JSON it should be. A store in object storage (a
`storage.location.Remote`) is read the same way, a chunk's byte range by an HTTP range request;
the chunks of one read are requested together, so a read costs one round trip, not one per
chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import blosc

from storage.location import Remote, read_ranges
from storage.paths import file_problem

_EMPTY = 2**64 - 1
"""Offset and length of a chunk the sharding index says was never written (all fill value)."""


class ChunkError(ValueError):
    """A stored file that cannot be used. kind: 'missing', 'not_a_file' (a folder, pipe or
    device where a file belongs), 'unreadable' (permissions, a symlink loop), 'truncated',
    'checksum', 'corrupt' (metadata that is not the JSON it should be) or 'layout' (an array
    this project does not write)."""

    def __init__(self, file: Path | Remote, problem: str, *, kind: str):
        super().__init__(f"{file} {problem}")
        self.file, self.problem, self.kind = file, problem, kind


class RowReader:
    """Rows [start, stop) along the first axis of one Zarr v3 array, whole along the others."""

    def __init__(self, array_path: Path | Remote | str):
        self.path = array_path if isinstance(array_path, Remote) else Path(array_path)
        meta = read_metadata(self.path / "zarr.json")
        try:
            self.shape = tuple(meta["shape"])
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            self.fill_value = meta["fill_value"]
            outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = meta["codecs"]
            codecs[0]["name"]
        except (KeyError, TypeError, ValueError, IndexError):
            raise ChunkError(self.path / "zarr.json", "is not the metadata of an array",
                             kind="corrupt") from None
        if codecs[0]["name"] == "sharding_indexed":
            sharding = codecs[0]["configuration"]
            _check_codecs(sharding["codecs"], ["bytes", "blosc", "crc32c"], self.path)
            _check_codecs(sharding["index_codecs"], ["bytes", "crc32c"], self.path)
            if sharding.get("index_location", "end") != "end":
                raise ChunkError(self.path, "has its shard index at the start of its files",
                                 kind="layout")
            self.chunk_shape = tuple(sharding["chunk_shape"])
            if outer[1:] != self.shape[1:] or self.chunk_shape[1:] != self.shape[1:]:
                raise ChunkError(self.path, "has chunks that split more than the first axis",
                                 kind="layout")
            self.per_shard = outer[0] // self.chunk_shape[0]
        else:
            _check_codecs(codecs, ["bytes", "blosc", "crc32c"], self.path)
            self.chunk_shape, self.per_shard = outer, 0
            if outer[1:] != self.shape[1:]:
                raise ChunkError(self.path, "has chunks that split more than the first axis",
                                 kind="layout")
        self._indexes: dict[int, np.ndarray] = {}
        self._files: dict[int, Path] = {}

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = self.chunk_shape[0]
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        chunks = range(start // rows, (stop - 1) // rows + 1)
        places = [self._place(chunk) for chunk in chunks]
        stored = iter(_read_many([place for place in places if place is not None]))
        for chunk, place in zip(chunks, places):
            first = chunk * rows
            lo, hi = max(start, first), min(stop, first + rows)
            target = out[lo - start:hi - start]
            if place is None:  # never written: the fill value
                target[...] = self.fill_value
            elif hi - lo == rows:
                self._decode(next(stored), place[0], into=target)  # in place: no copy
            else:
                target[:] = self._decode(next(stored), place[0], None)[lo - first:hi - first]
        return out

    def read_each(self, chunks: range) -> list[np.ndarray | ChunkError]:
        """Each chunk of `chunks` whole, or the ChunkError that refused it (its file missing,
        cut short, failing its checksum): the done marks, read all at once."""
        places, found = [], []
        for chunk in chunks:
            try:
                places.append(self._place(chunk))
            except ChunkError as exc:
                places.append(exc)
        stored = iter(_read_many([p for p in places if isinstance(p, tuple)], strict=False))
        for place in places:
            if place is None or isinstance(place, ChunkError):
                found.append(place if place is not None
                             else np.full(self.chunk_shape, self.fill_value, self.dtype))
                continue
            data = next(stored)
            try:
                found.append(data if isinstance(data, ChunkError)
                             else self._decode(data, place[0], None))
            except ChunkError as exc:
                found.append(exc)
        return found

    def _place(self, chunk: int) -> tuple[Path | Remote, int, int] | None:
        """(file, offset, length) of chunk `chunk`'s bytes (length -1: the whole file); None for
        a chunk the shard index says was never written."""
        shard, inner = divmod(chunk, self.per_shard) if self.per_shard else (chunk, None)
        file = self._file(shard)
        if inner is None:  # unsharded: the file is the chunk
            return file, 0, -1
        offset, length = (int(v) for v in self._index(shard, file)[inner])
        return None if offset == _EMPTY else (file, offset, length)

    def _file(self, shard: int) -> Path | Remote:
        if shard not in self._files:
            self._files[shard] = self.path.joinpath("c", str(shard), *["0"] * (len(self.shape) - 1))
        return self._files[shard]

    def _index(self, shard: int, file: Path | Remote) -> np.ndarray:
        """(chunks per shard, 2) uint64 offsets and lengths; read once per shard (a reader
        opens caches whose shards are done: their files no longer change)."""
        if shard not in self._indexes:
            size = 16 * self.per_shard + 4
            file_size = _regular_file_size(file)
            if file_size < size:
                raise ChunkError(file, "is corrupt or truncated (shorter than its index)",
                                 kind="truncated")
            entries = _checked(_read_bytes(file, file_size - size, size), file)
            self._indexes[shard] = np.frombuffer(entries, "<u8").reshape(self.per_shard, 2)
        return self._indexes[shard]

    def _decode(self, data: bytes, file: Path | Remote, into: np.ndarray | None) -> np.ndarray:
        if into is not None:
            blosc.decompress(_checked(data, file), into)
            return into
        raw = blosc.decompress(_checked(data, file))
        return np.frombuffer(raw, self.dtype).reshape(self.chunk_shape)


def _check_codecs(codecs: list[dict], names: list[str], path: Path | Remote) -> None:
    found = [codec["name"] for codec in codecs]
    endian = codecs[0].get("configuration", {}).get("endian", "little") if codecs else None
    if found != names or endian != "little":
        raise ChunkError(path, f"has codecs {found}, not the {names} this project writes",
                         kind="layout")


def read_metadata(file: Path | Remote) -> dict:
    """A zarr.json, read as every stored file is read (see module doc): a JSON object."""
    try:
        meta = json.loads(_read_bytes(file).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ChunkError(file, "is not valid JSON (corrupt or truncated)", kind="corrupt") from None
    if not isinstance(meta, dict):
        raise ChunkError(file, "is not a JSON object", kind="corrupt")
    return meta


def _regular_file_size(file: Path | Remote) -> int:
    """The size of `file`, refused (ChunkError) unless it is a regular file that exists."""
    if isinstance(file, Remote):
        try:
            return file.size()
        except FileNotFoundError:
            raise ChunkError(file, "is missing", kind="missing") from None
    if problem := file_problem(file):
        kind, text = problem
        raise ChunkError(file, text, kind=kind)
    return file.stat().st_size


def _read_bytes(file: Path | Remote, offset: int = 0, length: int = -1) -> bytes:
    return _read_many([(file, offset, length)])[0]


def _read_many(places: list[tuple[Path | Remote, int, int]], *,
               strict: bool = True) -> list[bytes | ChunkError]:
    """The bytes of each (file, offset, length) (length -1: to the end), each checked for its
    length; the files of a remote store are requested together. strict=False returns the
    ChunkError of a file that cannot be read in its place instead of raising it."""
    if places and isinstance(places[0][0], Remote):
        found = read_ranges(places)
    else:
        found = []
        for place in places:
            try:
                found.append(_read_local(*place))
            except ChunkError as exc:
                found.append(exc)
    for i, ((file, offset, length), data) in enumerate(zip(places, found)):
        if isinstance(data, FileNotFoundError):
            found[i] = ChunkError(file, "is missing", kind="missing")
        elif isinstance(data, bytes) and length >= 0 and len(data) != length:
            found[i] = ChunkError(file, f"is corrupt or truncated ({len(data)} of {length} bytes "
                                        f"at {offset})", kind="truncated")
        if strict and isinstance(found[i], ChunkError):
            raise found[i]
    return found


def _read_local(file: Path, offset: int, length: int) -> bytes:
    _regular_file_size(file)  # before open(): opening a pipe would block
    try:
        with open(file, "rb") as stream:
            stream.seek(offset)
            return stream.read(length)
    except FileNotFoundError:
        raise ChunkError(file, "is missing", kind="missing") from None
    except OSError as exc:
        raise ChunkError(file, f"cannot be read ({exc.strerror})", kind="unreadable") from None


def _checked(data: bytes, file: Path | Remote) -> bytes:
    """`data` without its trailing CRC-32C, which must match."""
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    if len(data) < 4 or google_crc32c.value(body) != stored:
        raise ChunkError(file, "is corrupt or truncated (checksum mismatch)", kind="checksum")
    return body

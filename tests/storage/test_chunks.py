"""storage.chunks reads what zarr reads, from real Zarr v3 arrays on disk, and names bad files."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from storage.chunks import ChunkError, RowReader
from storage.zarr_codecs import checked_compressors


def new_array(path, data: np.ndarray, *, chunk_rows: int, shard_rows: int | None = None):
    array = zarr.create_array(path, shape=data.shape, dtype=data.dtype,
                              chunks=(chunk_rows, *data.shape[1:]),
                              shards=None if shard_rows is None else (shard_rows, *data.shape[1:]),
                              fill_value=0, compressors=checked_compressors())
    array[:] = data
    return array


@pytest.mark.parametrize("shard_rows", [None, 40], ids=["chunks", "shards"])
@pytest.mark.parametrize("dtype", ["uint16", "float16", "float32", "uint8"])
def test_rows_equal_what_zarr_reads(tmp_path, shard_rows, dtype):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((93, 5, 3)) * 50).astype(dtype)  # 93: a short last chunk
    array = new_array(tmp_path / "a", data, chunk_rows=8, shard_rows=shard_rows)
    reader = RowReader(tmp_path / "a")
    for start, stop in [(0, 93), (0, 1), (7, 9), (8, 16), (39, 41), (85, 93), (13, 77)]:
        rows = reader.read(start, stop)
        assert rows.dtype == array.dtype and np.array_equal(rows, array[start:stop])


def test_a_chunk_never_written_reads_as_the_fill_value(tmp_path):
    data = np.arange(1, 1 + 32 * 4, dtype=np.uint16).reshape(32, 4)
    data[8:16] = 0  # zarr skips writing a chunk that is all fill value
    new_array(tmp_path / "a", data, chunk_rows=8, shard_rows=32)
    assert np.array_equal(RowReader(tmp_path / "a").read(0, 32), data)


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.write_bytes(f.read_bytes()[:10] + bytes([f.read_bytes()[10] ^ 1])
                             + f.read_bytes()[11:]), "is corrupt or truncated (checksum mismatch)"),
    (lambda f: f.write_bytes(f.read_bytes()[:-30]), "is corrupt or truncated"),
    (lambda f: f.unlink(), "is missing"),
], ids=["flipped", "truncated", "deleted"])
def test_a_damaged_shard_file_is_named(tmp_path, damage, problem):
    new_array(tmp_path / "a", np.ones((64, 4), np.float32), chunk_rows=8, shard_rows=32)
    file = tmp_path / "a" / "c" / "1" / "0"
    damage(file)
    reader = RowReader(tmp_path / "a")
    assert np.array_equal(reader.read(0, 32), np.ones((32, 4)))  # shard 0 is intact
    with pytest.raises(ChunkError) as failure:
        reader.read(30, 40)
    assert failure.value.file == file and failure.value.problem.startswith(problem)


def test_another_codec_chain_is_refused(tmp_path):
    zarr.create_array(tmp_path / "a", shape=(8, 2), dtype="uint16", chunks=(4, 2),
                      compressors=[BloscCodec(cname="zstd")])
    with pytest.raises(ChunkError, match=r"codecs \['bytes', 'blosc'\]"):
        RowReader(tmp_path / "a")

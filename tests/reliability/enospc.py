"""A full disk for machines that refuse mounts: the lowest file writes fail with ENOSPC."""

from __future__ import annotations

import contextlib
import errno

import zarr.storage._local as local

import storage.cache


@contextlib.contextmanager
def disk_full_after(files: int):
    """Inside the block, every file written after the first `files` fails with ENOSPC: by zarr
    (stores it creates) or by the cache writer (shards and done marks, storage.cache._put_file)."""
    real_put, real_put_file, written = local._put, storage.cache._put_file, []

    def until_full(real):
        def put(path, value, *args, **kwargs):
            written.append(path)
            if len(written) > files:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, value, *args, **kwargs)
        return put

    local._put, storage.cache._put_file = until_full(real_put), until_full(real_put_file)
    try:
        yield
    finally:
        local._put, storage.cache._put_file = real_put, real_put_file

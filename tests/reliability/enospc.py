"""A full disk for machines that refuse mounts: zarr's lowest file write fails with ENOSPC."""

from __future__ import annotations

import contextlib
import errno

import zarr.storage._local as local


@contextlib.contextmanager
def disk_full_after(files: int):
    """Inside the block, every file zarr writes after the first `files` fails with ENOSPC."""
    real_put, written = local._put, []

    def put_until_full(path, value, *args, **kwargs):
        written.append(path)
        if len(written) > files:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, *args, **kwargs)

    local._put = put_until_full
    try:
        yield
    finally:
        local._put = real_put

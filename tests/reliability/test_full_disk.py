"""A full disk: the cache is written into a size-limited tmpfs mounted on <run>/cache that fills
up mid-job. The job must end with one clear error line and exit code 2, leave every shard it
marked done sound, and, once space is freed (the tmpfs is grown in place), the rerun completes
to a cache byte-identical to a clean run's. The mount is always removed in the fixture's
teardown, after every process the test started has been reaped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storage.cache import cache_bytes
from tests.reliability.test_kill_resume import assert_done_shards_sound
from tests.reliability.world import cache_digest, cli, differing, message_lines


def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(world, tmp_path) -> Path:
    """<run>/cache on a tmpfs holding about 40 % of the cache (skipped where mounting is refused)."""
    run = world.new_run(tmp_path / "run")
    target = run / "cache"
    target.mkdir()
    size_kb = max(256, int(cache_bytes(world.clean_cache) * 0.4) // 1024)
    mounted = mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(target))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield run
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_full_disk_is_one_line_and_resumable(world, small_disk):
    run = small_disk
    cache = run / "cache" / "train.zarr"
    command = world.command("precompute.logits", run)
    full = cli(command)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    lines = message_lines(full.stderr)
    errors = [line for line in lines if line.startswith("error")]
    assert errors and errors == lines[-1:], lines
    assert errors[0].startswith("error: disk full while writing"), errors
    assert "rerun the same command" in errors[0]
    done = assert_done_shards_sound(cache)
    assert 0 < done < 64, "the disk filled before any shard or never"

    assert mount("-o", "remount,size=64m", str(run / "cache")).returncode == 0  # free space
    rerun = cli(command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert differing(cache_digest(cache), cache_digest(world.clean_cache)) == []

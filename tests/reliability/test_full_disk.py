"""A full disk: the cache is written into a size-limited tmpfs mounted on <run>/cache that fills
up mid-job. The job must end with one clear error line and exit code 2, leave every shard it
marked done sound, and, once space is freed (the tmpfs is grown in place), the rerun completes
to a cache equal to a clean run's (world.cache_digest). The mount is always removed in the
fixture's teardown, after every process the test started has been reaped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storage.cache import cache_bytes
from tests.reliability.enospc import disk_full_after
from tests.reliability.test_kill_resume import assert_done_shards_sound
from tests.reliability.world import PYTHON, cli, message_lines


def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def can_mount(tmp_path_factory) -> bool:
    probe = tmp_path_factory.mktemp("mount-probe")
    if mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)).returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


@pytest.fixture
def small_disk(world, tmp_path, can_mount) -> Path:
    """<run>/cache on a tmpfs holding about 40 % of the cache (skipped where mounting is refused)."""
    run = world.new_run(tmp_path / "run")
    target = run / "cache"
    target.mkdir()
    size_kb = max(256, int(cache_bytes(world.clean_cache) * 0.4) // 1024)
    if not can_mount:
        pytest.skip("cannot mount a tmpfs here (test_injected_enospc covers the case)")
    assert mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(target)).returncode == 0
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
    assert world.differences(cache) == []


ENOSPC_AFTER_60_FILES = """
import sys
from configs.cli import run
from configs.cli import teacher_option
from precompute.logits import main
from tests.reliability.enospc import disk_full_after
with disk_full_after(60):
    run(main, "logits", argv=sys.argv[1:], extra=teacher_option)
"""
"""The logits job with every file write after the 60th failing with ENOSPC."""


def test_injected_enospc_where_mounting_is_refused(world, tmp_path, can_mount):
    if can_mount:
        pytest.skip("test_full_disk_is_one_line_and_resumable runs on a real full tmpfs here")
    run = world.new_run(tmp_path / "run")
    command = world.command("precompute.logits", run)
    full = cli([PYTHON, "-c", ENOSPC_AFTER_60_FILES, *command[3:]])
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    errors = [line for line in message_lines(full.stderr) if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: disk full while writing"), errors
    assert 0 < assert_done_shards_sound(run / "cache" / "train.zarr") < 64
    assert cli(command).returncode == 0
    assert world.differences(run / "cache" / "train.zarr") == []


def test_failed_job_releases_its_shard_locks(world, tmp_path):
    import errno
    import gc

    from configs import load_config
    from precompute.logits import fill_caches
    from storage.cache import CacheWriter, read_manifest

    run = world.new_run(tmp_path / "run")
    with disk_full_after(60), pytest.raises(OSError) as failure:
        fill_caches(load_config(world.config, [f"run_dir={run}"]))
    assert failure.value.errno == errno.ENOSPC
    path = run / "cache" / "train.zarr"
    writer = CacheWriter(path=path, manifest=read_manifest(path))
    held = []
    for shard in writer.pending_shards():
        with writer.claim(shard, wait=False) as mine:
            held += [] if mine else [shard]
    del failure
    gc.collect()  # the failure's traceback (and the leaked lock files) can now go
    assert held == [], f"shards still locked by this process after the job failed: {held}"

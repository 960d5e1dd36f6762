"""Token stores and logit caches in object storage, against a real S3 server (moto on
127.0.0.1, tests/conftest.py `s3`) through the same code as local folders: write, read,
verify and inspect; one writer per shard by leases; a corrupted object named; faults as one
line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from storage import open_cache
from storage.errors import CorruptData, ManifestMismatch, StorageError
from storage.lease import Lease
from storage.location import Remote, RemoteUnavailable, locate
from tests.storage.cachedata import (N, new_writer, teacher_outputs, token_store, tree_bytes,
                                     write_all)

REPO = Path(__file__).resolve().parents[2]


def prefix(s3) -> Remote:
    """A fresh folder in the test bucket (reached through the environment's endpoint)."""
    return Remote(f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}")


def remote_bytes(root: Remote) -> dict[str, bytes]:
    return {str(file.relative_to(root)): file.read() for file in root.files()}


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storage", *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=120)


def child(cache, tokens, *args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.storage.cache_child", str(cache),
                             str(tokens), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def test_round_trip_verify_and_inspect(s3_env, tmp_path):
    root = prefix(s3_env)
    local_store = token_store(tmp_path / "tokens.zarr")
    store = token_store(root / "tokens.zarr")
    assert isinstance(store.path, Remote) and store.fingerprint == local_store.fingerprint
    assert np.array_equal(store.read(3, N), local_store.read(3, N))

    outputs = teacher_outputs()
    local = new_writer(tmp_path / "cache.zarr", local_store)
    write_all(local, outputs)
    local.finish()
    writer = new_writer(root / "cache.zarr", store)
    write_all(writer, outputs)
    assert writer.finish()
    cache = open_cache(root / "cache.zarr", token_store=store)
    block = cache.read(0, N)
    assert np.array_equal(block.ids, outputs[0])
    assert cache.verify() == []
    # the same bytes as the local cache's, file for file (leases and locks aside)
    stored, on_disk = remote_bytes(root / "cache.zarr"), tree_bytes(tmp_path / "cache.zarr")
    data = sorted(name for name in on_disk if "/c/" in name and "/locks/" not in name)
    assert data and all(stored[name] == on_disk[name] for name in data)

    url = str(root / "cache.zarr")
    inspected = cli("inspect", url, "--json", env=s3_env.env)
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert (info["path"], info["kind"], info["shards_done"]) == (url, "logit cache", 5)
    verified = cli("verify", url, env=s3_env.env)
    assert (verified.returncode, verified.stdout.strip()) == (0, f"{url}: ok")
    assert cli("verify", str(root / "tokens.zarr"), env=s3_env.env).returncode == 0


def test_corrupted_object_is_named_by_verify_and_refused_by_reads(s3_env):
    root = prefix(s3_env)
    store = token_store(root / "tokens.zarr")
    writer = new_writer(root / "cache.zarr", store)
    write_all(writer, teacher_outputs())
    writer.finish()
    damaged = root / "cache.zarr" / "logits" / "c" / "3" / "0" / "0"
    data = bytearray(damaged.read())
    data[20] ^= 0xFF
    damaged.write(bytes(data))

    cache = open_cache(root / "cache.zarr", token_store=store)
    (problem,) = cache.verify()
    assert (problem.kind, problem.shard, problem.file) == ("checksum", 3, "logits/c/3/0/0")
    with pytest.raises(CorruptData) as refused:
        cache.read(*cache.shard_rows(3))
    assert refused.value.problem.shard == 3
    verified = cli("verify", str(root / "cache.zarr"), env=s3_env.env)
    assert verified.returncode == 2 and "shard 3: file logits/c/3/0/0" in verified.stdout


def test_a_lease_has_one_holder_and_is_taken_over_only_once_expired(s3_env):
    obj = prefix(s3_env) / "lease"
    first = Lease.take(obj, seconds=2, wait=False)
    assert first is not None
    assert Lease.take(obj, seconds=2, wait=False) is None
    time.sleep(3)  # renewed by its holder: still held after its first term
    assert Lease.take(obj, seconds=2, wait=False) is None
    first.release()
    second = Lease.take(obj, seconds=2, wait=False)  # handed back: free at once
    assert second is not None
    second._stop.set()  # its holder stops renewing, as a killed one does
    second._renewing.join()
    assert Lease.take(obj, seconds=2, wait=False) is None
    started = time.monotonic()
    third = Lease.take(obj, seconds=2, wait=True)  # taken over once the term has passed
    assert third is not None and time.monotonic() - started < 5
    third.release()


def test_a_killed_writers_shard_is_taken_over(s3_env):
    root = prefix(s3_env)
    store = token_store(root / "tokens.zarr")
    holder = child(root / "cache.zarr", store.path, "hold", 2,
                   env={**s3_env.env, "LEASE_SECONDS": "2"})
    try:
        assert holder.stdout.readline().strip() == "holding"
        writer = new_writer(root / "cache.zarr", store, lease_seconds=2)
        assert writer.try_claim(2, wait=False) is None  # alive and renewing
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with writer.claim(2) as mine:  # waits out the dead writer's term
            assert mine
    finally:
        holder.kill()
        holder.wait()


def test_two_writers_share_a_remote_cache(s3_env):
    root = prefix(s3_env)
    store = token_store(root / "tokens.zarr")
    new_writer(root / "cache.zarr", store)  # created before both start (creation races: below)
    writers = [child(root / "cache.zarr", store.path, "all", 0.3, env=s3_env.env)
               for _ in range(2)]
    written = []
    for process in writers:
        out, _ = process.communicate(timeout=180)
        assert process.returncode == 0
        written.append(json.loads(out))
    assert sorted(written[0] + written[1]) == [0, 1, 2, 3, 4], written
    assert written[0] and written[1]
    cache = open_cache(root / "cache.zarr", token_store=store)
    assert cache.verify() == [] and np.array_equal(cache.read(0, N).ids, teacher_outputs()[0])


def test_concurrent_creators_agree_and_a_mismatch_is_refused(s3_env):
    root = prefix(s3_env)
    store = token_store(root / "tokens.zarr")
    first, second = new_writer(root / "cache.zarr", store), new_writer(root / "cache.zarr", store)
    assert first.manifest == second.manifest
    with pytest.raises(ManifestMismatch) as refused:
        new_writer(root / "cache.zarr", store, value_code="gap8")
    assert "value_code: float16 there, gap8 now" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_unreachable_and_unknown_stores_are_one_line(s3_env):
    from storage import open_token_store

    closed = Remote(f"s3://{s3_env.bucket}/x/tokens.zarr", {
        "endpoint_url": "http://127.0.0.1:9",
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(RemoteUnavailable) as refused:
        open_token_store(closed)
    assert str(refused.value).startswith(f"cannot reach {closed.url}")
    with pytest.raises(StorageError, match="not a storage protocol"):
        locate("nosuchproto://bucket/cache.zarr").exists()
    with pytest.raises(StorageError, match="through the S3 API only"):  # nothing sent to GCS
        new_writer(Remote("gs://bucket/cache.zarr"), token_store(prefix(s3_env) / "t.zarr"))


def test_the_proxy_cutting_reads_is_one_clear_error(s3_env):
    root = prefix(s3_env)
    options = s3_env.options(fail_fast=True)
    store = token_store(Remote(str(root / "tokens.zarr"), options))
    s3_env.proxy.cut()
    try:
        with pytest.raises(RemoteUnavailable, match="cannot reach"):
            store.read(0, N)
    finally:
        s3_env.proxy.restore()
    assert store.read(0, N).shape == (N, 16)


def test_batches_from_s3_with_latency_equal_those_from_disk(s3_env, tmp_path):
    """The reader's read-ahead (several range requests in flight) changes nothing it yields."""
    from storage.reader import stream_batches

    root = prefix(s3_env)
    outputs = teacher_outputs()
    stores = {}
    for where in (tmp_path, root):
        store = token_store(where / "tokens.zarr")
        writer = new_writer(where / "cache.zarr", store)
        write_all(writer, outputs)
        writer.finish()
        stores[where] = (store, open_cache(where / "cache.zarr", token_store=store))
    s3_env.proxy.latency = 0.02
    streams = [list(stream_batches(tokens=store, caches=[cache], batch_size=4, seed=7, epoch=1,
                                   shuffle_buffer=8, block_rows=4, prefetch=prefetch))
               for (store, cache), prefetch in zip(stores.values(), (0, 2))]
    assert len(streams[0]) == len(streams[1]) == N // 4
    for local, remote in zip(*streams):
        assert np.array_equal(local.indices, remote.indices)
        assert np.array_equal(local.tokens, remote.tokens)
        for a, b in zip(local.teachers, remote.teachers):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.logits, b.logits)
            assert np.array_equal(a.lse, b.lse)

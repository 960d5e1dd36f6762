"""Logit cache with real processes: crash and resume, disjoint ranks, shared work, exclusion."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from storage import open_cache
from storage.cache import VOLATILE_KEYS
from tests.storage.cachedata import (N, new_writer, teacher_outputs, token_store, tree_bytes,
                                     write_all)

REPO = Path(__file__).resolve().parents[2]


def child(cache, tokens, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.storage.cache_child", str(cache),
                             str(tokens), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)


def finished(process: subprocess.Popen) -> list[int]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return json.loads(out)


def assert_identical(a: Path, b: Path) -> None:
    """Every file byte-identical; the root manifest identical except its volatile keys."""
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        if name != "zarr.json":
            assert files_a[name] == files_b[name], name
    manifests = [json.loads(files["zarr.json"])["attributes"]["manifest"]
                 for files in (files_a, files_b)]
    for manifest in manifests:
        for key in VOLATILE_KEYS:
            manifest.pop(key)
    assert manifests[0] == manifests[1]


def assert_valid(path: Path, store) -> None:
    cache = open_cache(path, token_store=store)
    assert cache.verify() == []
    assert np.array_equal(cache.read(0, N).ids, teacher_outputs()[0])


def test_resume_after_kill_mid_shard_is_byte_identical(tmp_path):
    store = token_store(tmp_path / "tokens.zarr")
    reference = new_writer(tmp_path / "reference.zarr", store)
    write_all(reference, teacher_outputs())
    reference.finish()

    victim = child(tmp_path / "cache.zarr", store.path, "stall-mid-shard", 2)
    assert victim.stdout.readline().strip() == "stalled"
    victim.kill()  # SIGKILL with shard 2's ids file written, its logits/lse/done not
    victim.wait()
    cache = tmp_path / "cache.zarr"
    assert (cache / "ids/c/2/0/0").is_file() and not (cache / "done/c/2").exists()
    writer = new_writer(cache, store)
    assert writer.pending_shards() == [2, 3, 4]
    assert write_all(writer, teacher_outputs()) == [2, 3, 4]
    writer.finish()
    assert_identical(tmp_path / "reference.zarr", cache)
    assert_valid(cache, store)


def test_crash_leftovers_are_rewritten(tmp_path):
    """Files of a shard written but never marked done (plus zarr's temp files, the done mark's
    too: a kill between writing and renaming it) are replaced."""
    store = token_store(tmp_path / "tokens.zarr")
    reference = new_writer(tmp_path / "reference.zarr", store)
    write_all(reference, teacher_outputs())
    reference.finish()
    cache = tmp_path / "cache.zarr"
    new_writer(cache, store)
    for name in ("ids", "logits", "lse"):  # garbage where shard 1 goes, as a torn write leaves
        (cache / name / "c/1/0").mkdir(parents=True)
        (cache / name / "c/1/0/0").write_bytes(b"torn" * 10)
        (cache / name / "c/1/0/0.1f2e.partial").write_bytes(b"half")
    (cache / "done/c").mkdir(parents=True, exist_ok=True)
    (cache / "done/c/1.9a0b.partial").write_bytes(b"\x01")
    writer = new_writer(cache, store)
    write_all(writer, teacher_outputs())
    writer.finish()
    assert_identical(tmp_path / "reference.zarr", cache)


def test_two_ranks_write_disjoint_shards(tmp_path):
    store = token_store(tmp_path / "tokens.zarr")
    ranks = [child(tmp_path / "cache.zarr", store.path, "rank", r, 2) for r in (0, 1)]
    assert [finished(p) for p in ranks] == [[0, 2, 4], [1, 3]]
    new_writer(tmp_path / "cache.zarr", store).finish()
    assert_valid(tmp_path / "cache.zarr", store)


def test_two_processes_on_all_shards_share_the_work(tmp_path):
    store = token_store(tmp_path / "tokens.zarr")
    processes = [child(tmp_path / "cache.zarr", store.path, "all", 0.3) for _ in range(2)]
    written = [finished(p) for p in processes]
    assert sorted(written[0] + written[1]) == [0, 1, 2, 3, 4]  # each shard exactly once
    assert all(written), f"one process did all the work: {written}"
    assert_valid(tmp_path / "cache.zarr", store)


def test_claim_excludes_another_process(tmp_path):
    store = token_store(tmp_path / "tokens.zarr")
    writer = new_writer(tmp_path / "cache.zarr", store)
    probe = ("import sys; from storage import open_token_store; "
             "from tests.storage.cachedata import new_writer; "
             "w = new_writer(sys.argv[1], open_token_store(sys.argv[2]))\n"
             "with w.claim(3, wait=False) as mine: print(mine)")
    with writer.claim(3) as mine:
        assert mine
        held = subprocess.run([sys.executable, "-c", probe, tmp_path / "cache.zarr", store.path],
                              cwd=REPO, capture_output=True, text=True, check=True)
    free = subprocess.run([sys.executable, "-c", probe, tmp_path / "cache.zarr", store.path],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert (held.stdout.strip(), free.stdout.strip()) == ("False", "True")

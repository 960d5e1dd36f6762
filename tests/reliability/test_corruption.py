"""Damaged caches: flipped bytes, truncated and deleted shard files, a lost done mark, a deleted
or hand-edited manifest. `python -m storage verify` and the reader name the exact problem (the
shard and its file); the trainer refuses a damaged cache unless distill.skip_bad_shards=true,
and then says how many tokens it left out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from storage import CorruptData, StoreNotFound, open_cache, open_token_store
from storage.reader import stream_batches
from tests.reliability.world import PYTHON, cli, message_lines

Damage = Callable[[Path], None]


def flip(relative: str, *, at: float = 0.5) -> Damage:
    def damage(cache: Path) -> None:
        path = cache / relative
        data = bytearray(path.read_bytes())
        data[min(int(len(data) * at), len(data) - 1)] ^= 0x5A
        path.write_bytes(bytes(data))
    return damage


def truncate(relative: str) -> Damage:
    def damage(cache: Path) -> None:
        path = cache / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damage


def delete(relative: str) -> Damage:
    return lambda cache: (cache / relative).unlink()


# name: (damage, the shard it hits, how the line verify prints for it starts)
SHARD_DAMAGE = {
    "flipped-byte": (flip("ids/c/5/0/0"), 5,
                     "shard 5: file ids/c/5/0/0 is corrupt or truncated (checksum mismatch)"),
    "flipped-shard-index": (flip("logits/c/2/0/0", at=0.999), 2,
                            "shard 2: file logits/c/2/0/0 is corrupt or truncated"),
    "truncated": (truncate("logits/c/7/0/0"), 7,
                  "shard 7: file logits/c/7/0/0 is corrupt or truncated"),
    "deleted-shard": (delete("lse/c/3/0/0"), 3, "shard 3: file lse/c/3/0/0 is missing"),
    "lost-done-mark": (delete("done/c/9"), 9, "shard 9: not done"),
}


@pytest.fixture
def run(world, tmp_path) -> Path:
    run = world.new_run(tmp_path / "run")
    shutil.copytree(world.clean_cache, run / "cache" / "train.zarr")
    return run


def verify(path: Path):
    return cli([PYTHON, "-m", "storage", "verify", str(path)], timeout=120)


@pytest.mark.parametrize("name", SHARD_DAMAGE)
def test_verify_and_reader_name_the_damaged_shard(run, name):
    damage, shard, line = SHARD_DAMAGE[name]
    cache_path = run / "cache" / "train.zarr"
    damage(cache_path)
    result = verify(cache_path)
    assert result.returncode == 2, result.stderr
    reported = result.stdout.splitlines()
    assert len(reported) == 1 and reported[0].startswith(line), result.stdout
    assert message_lines(result.stderr) == [f"{cache_path}: 1 problem(s)"]

    cache = open_cache(cache_path, allow_incomplete=True)
    start, stop = cache.shard_rows(shard)
    with pytest.raises(CorruptData, match=f"shard {shard}\\b"):
        cache.read(start, stop)
    neighbour = cache.shard_rows(shard + 1)
    assert cache.read(*neighbour).ids.shape[0] == neighbour[1] - neighbour[0]
    tokens = open_token_store(run / "tokens" / "train.zarr")
    with pytest.raises(CorruptData, match=f"shard {shard}\\b"):
        for _ in stream_batches(tokens=tokens, caches=(cache,), batch_size=8, seed=0, epoch=0):
            pass


def test_lost_done_mark_makes_the_cache_incomplete(run):
    cache_path = run / "cache" / "train.zarr"
    delete("done/c/9")(cache_path)
    with pytest.raises(StoreNotFound, match=r"1 of 64 shards missing \(shard 9\)"):
        open_cache(cache_path)


def test_deleted_manifest(run):
    cache_path = run / "cache" / "train.zarr"
    (cache_path / "zarr.json").unlink()
    result = verify(cache_path)
    assert result.returncode == 2
    assert message_lines(result.stderr) == [f"error: no logit cache or token store at {cache_path}"]
    with pytest.raises(StoreNotFound, match="no logit cache at"):
        open_cache(cache_path)


def test_edited_manifest(run):
    cache_path = run / "cache" / "train.zarr"
    root = json.loads((cache_path / "zarr.json").read_text())
    root["attributes"]["manifest"]["temperatures"] = [1.0, 4.0]  # a "harmless" hand edit
    (cache_path / "zarr.json").write_text(json.dumps(root))
    result = verify(cache_path)
    assert result.returncode == 2
    assert "manifest was edited after writing" in result.stdout + result.stderr
    with pytest.raises(CorruptData, match="manifest was edited"):
        open_cache(cache_path)


def test_corrupt_done_mark_is_reported_not_a_traceback(run):
    cache_path = run / "cache" / "train.zarr"
    flip("done/c/9")(cache_path)
    result = verify(cache_path)
    assert "Traceback" not in result.stderr and result.returncode == 2
    assert any(line.startswith("shard 9:") for line in result.stdout.splitlines())


def test_trainer_refuses_a_damaged_cache_unless_told_to_skip(world, run):
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("student.train")
    flip("ids/c/5/0/0")(run / "cache" / "train.zarr")
    before = (run / "cache").stat().st_mtime_ns
    whole_epoch = "student.max_steps=0"  # every shard is read, the damaged one included
    commands = [world.command("student.train", run, whole_epoch, "distill.run=refused"),
                world.command("student.train", run, whole_epoch, "distill.run=skipping",
                              "distill.skip_bad_shards=true")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        refused, skipping = pool.map(cli, commands)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [m for m in message_lines(refused.stderr) if m.startswith("error")] or [refused.stderr]
    assert "shard 5" in line and "skip_bad_shards" in line, refused.stderr[-3000:]
    assert not (run / "students" / "refused" / "model.safetensors").exists()
    assert skipping.returncode == 0, skipping.stderr[-2000:]
    assert "skipping 1 bad cache shard(s) [5]: 8 sequences, 256 tokens left out" in skipping.stdout
    assert (run / "students" / "skipping" / "model.safetensors").is_file()
    assert (run / "cache").stat().st_mtime_ns == before


@pytest.mark.parametrize("array", ["ids", "logits", "lse"])
def test_an_emptied_shard_file_is_named_skipped_and_rewritten(world, run, array):
    """A shard file truncated to zero bytes: verify names it, training with skip_bad_shards
    leaves its shard out, and rerunning the logits job writes it again, ending as a clean run."""
    cache = run / "cache" / "train.zarr"
    (cache / array / "c" / "2" / "0" / "0").write_bytes(b"")
    result = verify(cache)
    assert result.returncode == 2, result.stdout
    assert result.stdout.startswith(f"shard 2: file {array}/c/2/0/0 is corrupt or truncated")
    skipping = cli(world.command("student.train", run, "student.max_steps=0",
                                 "distill.skip_bad_shards=true"))
    assert skipping.returncode == 0, skipping.stderr[-2000:]
    assert "skipping 1 bad cache shard(s) [2]" in skipping.stdout
    rerun = cli(world.command("precompute.logits", run))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"shard 2: file {array}/c/2/0/0" in rerun.stdout
    assert verify(cache).returncode == 0
    assert world.differences(cache) == []

"""The identity comparison the reliability tests rest on catches what it must."""

from __future__ import annotations

import shutil


def test_swapped_shards_are_reported(world, tmp_path):
    cache = shutil.copytree(world.clean_cache, tmp_path / "train.zarr")
    assert world.differences(cache) == []
    for name in ("ids", "lse"):
        three, four = (cache / name / "c" / str(shard) / "0" / "0" for shard in (3, 4))
        swapped = three.read_bytes()
        three.write_bytes(four.read_bytes())
        four.write_bytes(swapped)
    report = world.differences(cache)
    assert report[:4] == ["ids/c/3/0/0", "ids/c/4/0/0", "lse/c/3/0/0", "lse/c/4/0/0"], report
    assert report[4].startswith("shard 3 (rows 24-31): top-k ids differ at ")
    assert report[5].startswith("shard 4 (rows 32-39): top-k ids differ at ")


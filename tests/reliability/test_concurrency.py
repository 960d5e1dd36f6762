"""Two teacher-logits jobs started at once on the same run share the cache: both finish, every
shard is computed exactly once, and the cache equals a single clean run's byte for byte
(tests/reliability/world.py cache_digest)."""

from __future__ import annotations

import re

from tests.reliability.world import N_TRAIN, SEQ_LEN, started


def test_two_jobs_on_one_cache_share_the_work(world, tmp_path):
    run = world.new_run(tmp_path / "run")
    command = world.command("precompute.logits", run)
    with started(command, stderr_file=tmp_path / "a.err") as first, \
            started(command, stderr_file=tmp_path / "b.err") as second:
        outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
        codes = [first.returncode, second.returncode]
    assert codes == [0, 0], [(tmp_path / f).read_text()[-2000:] for f in ("a.err", "b.err")]
    computed = []
    for out in outputs:
        match = re.search(r"cached train: ([\d,]+) tokens computed", out)
        computed.append(int(match.group(1).replace(",", "")) if match else 0)
        assert match or "already complete" in out, out
    assert sum(computed) == N_TRAIN * SEQ_LEN, f"shards computed twice or never: {computed}"
    assert world.differences(run / "cache" / "train.zarr") == []

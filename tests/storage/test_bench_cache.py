"""bench.cache runs end to end on a tiny saved GPT-2 and says clearly when the teacher is absent."""

import pytest

from bench import cache as bench_cache
from storage import StoreNotFound
from training.models import new_model
from tests.storage.cachedata import token_store


def test_bench_rows(tmp_path):
    store = token_store(tmp_path / "tokens.zarr", n=64)
    new_model(vocab_size=300, n_positions=16, n_layer=1, n_embd=32, n_head=2).save_pretrained(
        tmp_path / "teacher")
    rows = bench_cache.run(teacher=tmp_path / "teacher", tokens=store.path, sequences=64,
                           ks=(4, 8), read_k=8, repeats=1)
    sizes = [r for r in rows if r["table"] == "size"]
    assert [(r["k"], r["value_code"]) for r in sizes] == [
        (4, "float16"), (4, "gap8"), (8, "float16"), (8, "gap8")]
    for k in (4, 8):
        f16, gap8 = (r["B/token"] for r in sizes if r["k"] == k)
        assert 0 < gap8 < f16
    reads = {r["read"]: r["tok/s"] for r in rows if r["table"] == "read" and r["value_code"] == "gap8"}
    assert set(reads) == {"shuffled stream", "contiguous", "random single-seq"}
    assert all(v > 0 for v in reads.values())
    assert {r["array"] for r in rows if r["table"] == "shuffle"} == {"ids", "float16", "gap8", "lse"}
    assert "### size" in bench_cache.markdown(rows)


def test_bench_without_teacher(tmp_path):
    with pytest.raises(StoreNotFound, match="no teacher model"):
        bench_cache.run(teacher=tmp_path / "none", tokens=tmp_path / "tokens.zarr")

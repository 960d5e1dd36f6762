"""`python -m storage inspect|verify`: output, JSON, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.storage.cachedata import K, N, new_writer, teacher_outputs, token_store, write_all

REPO = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "storage", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def cache_path(tmp_path):
    tokens = token_store(tmp_path / "tokens.zarr")
    writer = new_writer(tmp_path / "cache.zarr", tokens, value_code="gap8")
    write_all(writer, teacher_outputs())
    writer.finish()
    return tmp_path / "cache.zarr"


def test_inspect_cache_json(cache_path):
    result = cli("inspect", cache_path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["kind"], info["sequences"], info["tokens"], info["k"]) == ("logit cache", N, N * 16, K)
    assert info["value_code"] == "gap8" and info["temperatures"] == [1.0, 2.0, 4.0]
    assert (info["shards_done"], info["shards"]) == (5, 5)
    assert 0 < info["bytes_per_token"] < 100 and info["teacher"]["name"] == "fake"
    stats = info["teacher_stats"]
    assert stats["shards"] and set(stats) == {"shards", "T=1", "T=2"}
    # Tempering flattens: more entropy, less head mass.
    assert stats["T=2"]["entropy"] > stats["T=1"]["entropy"] > 0
    assert 0 < stats["T=2"]["head_mass"] < stats["T=1"]["head_mass"] <= 1


def test_head_mass_of_a_shorter_head_is_smaller(cache_path):
    from storage.__main__ import teacher_stats
    from storage.cache import open_cache

    cache = open_cache(cache_path)
    full, short = teacher_stats(cache), teacher_stats(cache, k=2)
    for t in ("T=1", "T=2"):
        assert 0 < short[t]["head_mass"] < full[t]["head_mass"]
        # the tail counted as spread uniformly: a longer tail gets the upper bound's larger share
        assert short[t]["entropy"] > full[t]["entropy"]


def test_inspect_text_and_token_store(cache_path):
    result = cli("inspect", cache_path)
    assert result.returncode == 0 and "bytes_per_token" in result.stdout
    assert "teacher stats on shards" in result.stdout
    store = cli("inspect", cache_path.parent / "tokens.zarr", "--json")
    assert store.returncode == 0 and json.loads(store.stdout)["kind"] == "token store"


def test_verify_exit_codes(cache_path):
    clean = cli("verify", cache_path)
    assert clean.returncode == 0 and "ok" in clean.stdout
    shard_file = cache_path / "ids" / "c" / "3" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[20] ^= 1
    shard_file.write_bytes(bytes(data))
    (cache_path / "lse" / "c" / "0" / "0" / "0").unlink()
    bad = cli("verify", cache_path)
    assert bad.returncode == 2
    assert bad.stdout.splitlines() == [
        "shard 0: file lse/c/0/0/0 is missing",
        "shard 3: file ids/c/3/0/0 is corrupt or truncated (checksum mismatch)"]


def test_missing_path_is_one_line_error(tmp_path):
    result = cli("verify", tmp_path / "nothing")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no logit cache or token store" in result.stderr
    assert cli("inspect", tmp_path / "nothing").returncode == 2

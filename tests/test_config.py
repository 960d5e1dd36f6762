"""Config: YAML + dotted overrides into frozen dataclasses; every mistake names the key and file."""

import subprocess
import sys

import pytest
import yaml

from configs import CONFIG_DIR, ConfigError, load_config
from tests.conftest import REPO

DEMO = CONFIG_DIR / "demo.yaml"


def test_shipped_configs_load_and_reference_recipe_is_exact():
    cfg = load_config(CONFIG_DIR / "babylm-gpt2.yaml")
    assert cfg.teacher.model == "gpt2-large"
    assert (cfg.student.n_layer, cfg.student.n_embd, cfg.student.n_head) == (12, 768, 12)
    assert (cfg.data.seq_len, cfg.student.lr, cfg.student.batch_size, cfg.student.epochs) == (
        128, 2.5e-4, 32, 6.0)
    assert (cfg.distill.temperature, cfg.distill.alpha, cfg.data.val_fraction) == (2.0, 0.5, 0.05)
    assert (cfg.teacher.lr, cfg.teacher.batch_size, cfg.teacher.epochs, cfg.teacher.grad_accum,
            cfg.teacher.warmup_steps, cfg.teacher.precision) == (2.5e-4, 128, 4.0, 16, 300, "fp16")
    assert load_config(DEMO).run_path.as_posix() == "runs/demo"


@pytest.mark.parametrize("name", ["babylm-gpt2", "babylm-strict-small"])
def test_shipped_recipes_cache_draws_at_every_temperature_they_distil_at(name):
    """The configs ship the counted-draws cache bench.draws measures, and it holds draws at the
    student's temperature and every swept one (a student elsewhere would be refused)."""
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.cache.selection == "draws"
    wanted = {cfg.distill.temperature, *cfg.distill.sweep_temperatures}
    assert wanted <= set(cfg.cache.temperatures)
    assert len(cfg.cache.draws) == len(cfg.cache.temperatures)


def test_strict_small_config_trains_every_model_on_the_corpus_alone():
    cfg = load_config(CONFIG_DIR / "babylm-strict-small.yaml")
    assert cfg.teacher.from_scratch and cfg.tokenizer.kind == "bpe"
    assert cfg.tokenizer.vocab_size == 16_000 and cfg.data.seq_len == 128
    shapes = {name: (t.architecture, t.from_scratch) for name, t in cfg.teachers.items()}
    assert shapes == {"gpt2": ("gpt2", True), "llama": ("llama", True)}
    assert [(m.teacher, m.weight) for m in cfg.distill.teachers] == [("gpt2", 0.5), ("llama", 0.5)]
    assert cfg.student.architecture == "llama" and cfg.student.save_at_words[0] == 1_000_000
    assert (cfg.distill.alpha, cfg.distill.temperature, cfg.distill.ensemble) == (
        0.5, 2.0, "probability")
    assert cfg.for_teacher("llama").cache_dir.as_posix() == "runs/babylm-strict-small/caches/llama"


def test_storage_places_stores_and_caches_and_never_saves_its_options(tmp_path):
    cfg = load_config(CONFIG_DIR / "babylm-strict-small.yaml", [f"run_dir={tmp_path}"])
    assert cfg.token_store_at("val") == f"{tmp_path}/tokens/val.zarr"
    assert cfg.for_teacher("llama").cache_at("train") == f"{tmp_path}/caches/llama/train.zarr"
    remote = cfg.replace(**{"storage.tokens": "s3://bucket/babylm/tokens/",
                            "storage.caches": "s3://bucket/babylm",
                            "storage.options.endpoint_url": "http://127.0.0.1:9000",
                            "storage.options.secret": "do-not-write"})
    assert remote.token_store_at("train") == "s3://bucket/babylm/tokens/train.zarr"
    assert remote.cache_at("train") == "s3://bucket/babylm/cache/train.zarr"
    assert remote.for_teacher("gpt2").cache_at("val") == "s3://bucket/babylm/caches/gpt2/val.zarr"
    assert remote.storage.options == {"endpoint_url": "http://127.0.0.1:9000",
                                      "secret": "do-not-write"}
    saved = remote.save(tmp_path).read_text()
    assert "do-not-write" not in saved and "127.0.0.1:9000" not in saved
    assert load_config(tmp_path / "config.yaml").storage.caches == "s3://bucket/babylm"
    with pytest.raises(ConfigError, match="storage.lease_seconds"):
        cfg.replace(**{"storage.lease_seconds": 0.5})
    with pytest.raises(ConfigError, match="storage.options must be a mapping"):
        cfg.replace(**{"storage.options": "endpoint"})


def test_overrides_are_typed_and_frozen():
    cfg = load_config(DEMO, ["student.lr=3e-4", "distill.temperature=4", "run_dir=/tmp/x",
                             "cache.temperatures=[1, 3]", "teacher.from_scratch=false"])
    assert cfg.student.lr == 3e-4 and isinstance(cfg.distill.temperature, float)
    assert cfg.cache.temperatures == (1.0, 3.0) and cfg.teacher.from_scratch is False
    assert str(cfg.run_path) == "/tmp/x"
    with pytest.raises(Exception):
        cfg.student.lr = 1.0


def test_replace_validates_like_overrides():
    cfg = load_config(DEMO)
    assert cfg.replace(**{"distill.alpha": 1.0}).distill.alpha == 1.0
    with pytest.raises(ConfigError, match="distill.alpha"):
        cfg.replace(**{"distill.alpha": 1.5})


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(DEMO, ["student.lr=1e-3"])
    path = cfg.save(tmp_path)
    again = load_config(path)
    assert again.to_dict() | {"source": ""} == cfg.to_dict() | {"source": ""}


@pytest.mark.parametrize("overrides, message", [
    (["student.lrr=1"], "unknown key 'student.lrr'"),
    (["nonsense=1"], "unknown key 'nonsense'"),
    (["student.lr=fast"], "student.lr must be float"),
    (["student.n_layer=2.5"], "student.n_layer must be int"),
    (["teacher.from_scratch=maybe"], "teacher.from_scratch must be true or false"),
    (["data.seq_len=-1"], "data.seq_len = -1 must be at least 2"),
    (["distill.alpha=1.5"], "distill.alpha = 1.5 must be in [0, 1]"),
    (["distill.temperature=0"], "distill.temperature = 0.0 must be positive"),
    (["cache.k=5000"], "cache.k = 5000 is larger than the vocabulary"),
    (["distill.k=64"], "distill.k = 64 is larger than the cached k"),
    (["student.n_head=3"], "student.n_embd = 64 is not divisible by student.n_head = 3"),
    (["cache.value_code=int4"], "cache.value_code = 'int4' must be 'float16' or 'gap8'"),
    (["student.n_positions=64"], "student.n_positions = 64 is shorter than the training rows"),
    (["teacher.n_positions=0"], "teacher.n_positions = 0 must be positive"),
    (["student.save_at_words=[1500]"], "must be a list of positive multiples of 1000"),
    (["data.document=paragraph"], "data.document = 'paragraph' must be 'file' or 'line'"),
    (["student.lr"], "is not of the form key=value"),
    (["student.lr=.inf"], "student.lr = inf must be a finite number"),
    (["student.lr=1e400"], "student.lr = inf must be a finite number"),
    (["distill.temperature=.inf"], "distill.temperature = inf must be a finite number"),
    (["distill.alpha=.nan"], "distill.alpha = nan must be a finite number"),
    (["student.seed=-1"], "student.seed = -1 must be in [0, 2**32)"),
    (["distill.run=a/b"], "distill.run = 'a/b' must be a plain folder name"),
    (["student.device=gpu"], "student.device = 'gpu' must be 'auto', 'cpu'"),
    (["student.dropout=1.5"], "student.dropout = 1.5 must be in [0, 1)"),
])
def test_mistakes_name_the_key_and_the_file(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, overrides)
    assert message in str(caught.value)
    assert "is not of the form" in message or str(DEMO) in str(caught.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong_section = tmp_path / "wrong.yaml"
    wrong_section.write_text(yaml.safe_dump({"student": 3}))
    with pytest.raises(ConfigError, match="student must be a mapping"):
        load_config(wrong_section)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "precompute.corpus", "--config", str(DEMO),
                             "student.lrr=1", f"run_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())

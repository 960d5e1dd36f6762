"""End to end on the real BabyLM 2023 data, BLiMP and its supplement, through the public entry
points only: data -> teacher -> cache -> baseline -> distil -> evaluate, each a `python -m`
process; then every model folder it wrote loads in Hugging Face's Auto classes."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLIMP_PHENOMENA = ["anaphor_gender_agreement", "determiner_noun_agreement_1",
                   "regular_plural_subject_verb_agreement_1"]
SUPPLEMENT_PHENOMENA = ["hypernym", "turn_taking"]
SENTENCES = ["The child said hello to her mom.", "  where's the ball?", "Naïve cafés, 42 times!"]


@pytest.mark.slow
def test_pipeline_on_babylm_2023(shared_data, tmp_path):
    pairs = tmp_path / "blimp-subset"
    for suite, names in (("blimp_filtered", BLIMP_PHENOMENA),
                         ("supplement_filtered", SUPPLEMENT_PHENOMENA)):
        (pairs / suite).mkdir(parents=True)
        for name in names:  # a few phenomena, read in place through links
            (pairs / suite / f"{name}.jsonl").symlink_to(
                shared_data / "blimp" / suite / f"{name}.jsonl")
    run_dir = tmp_path / "run"
    common = [
        "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}",
        f"data.dir={shared_data / 'babylm' / '2023' / 'train_10M'}", "tokenizer.vocab_size=1024",
        "teacher.n_layer=2", "teacher.n_embd=64", "teacher.n_head=2", "teacher.max_steps=40",
        "student.n_layer=1", "student.n_embd=32", "student.n_head=2", "student.max_steps=20",
        "student.save_at_words=[10000, 20000]", "cache.k=16", "cache.splits=[train]",
        "distill.temperature=2",
        f"eval.minimal_pairs={pairs}", "eval.max_pairs_per_file=100",
    ]
    for module, extra in [("precompute.corpus", []), ("precompute.teacher", []),
                          ("precompute.logits", []), ("student.train", ["distill.alpha=1"]),
                          ("student.train", ["distill.alpha=0.5"]), ("student.evaluate", [])]:
        result = subprocess.run([sys.executable, "-m", module, *common, *extra], cwd=REPO,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{module} failed:\n{result.stderr[-3000:]}"

    results = json.loads((run_dir / "reports" / "results.json").read_text())
    models = {entry["name"]: entry for entry in results["models"]}
    assert {"teacher", "students/baseline"} <= set(models) and len(models) == 3
    for entry in models.values():
        assert 1 < entry["lm"]["perplexity"] < 1024
        suites = entry["minimal_pairs"]
        assert list(suites) == ["blimp_filtered", "supplement_filtered"]  # reported apart
        for suite, names in (("blimp_filtered", BLIMP_PHENOMENA),
                             ("supplement_filtered", SUPPLEMENT_PHENOMENA)):
            assert list(suites[suite]) == ["ours", "lm_eval", "babylm2025"]
            for result in suites[suite].values():
                assert sorted(result["files"]) == sorted(names)
                assert all(0 <= f["accuracy"] <= 1 and f["pairs"] == 100
                           for f in result["files"].values())
    assert (run_dir / "reports" / "report.md").is_file()
    assert_every_model_folder_loads(run_dir, models)


def assert_every_model_folder_loads(run_dir, models):
    """Teacher, students and their milestones: AutoTokenizer encodes as the run's tokenizer,
    AutoModelForCausalLM loads, and each final card carries its minimal-pair scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.model_card import read_card_facts
    from training.tokenizer import load_tokenizer

    reference = load_tokenizer(run_dir)
    students = sorted((run_dir / "students").iterdir())
    milestones = [m for student in students for m in sorted((student / "checkpoints").iterdir())]
    assert [m.name for m in milestones] == ["chck_10K", "chck_20K"] * 2
    for folder in [run_dir / "teacher", *students, *milestones]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for text in SENTENCES:
            assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = tokenizer(" ".join(SENTENCES * 12), return_tensors="pt")["input_ids"]
        assert ids.shape[1] > 128 and torch.isfinite(model(ids).logits).all()  # past seq_len
    for folder in [run_dir / "teacher", *students]:
        name = "teacher" if folder.name == "teacher" else f"students/{folder.name}"
        scores = read_card_facts(folder)["minimal_pairs"]
        assert scores["blimp_filtered"]["ours"] == \
            models[name]["minimal_pairs"]["blimp_filtered"]["ours"]["macro_accuracy"]


@pytest.mark.slow
def test_strict_small_recipe_through_the_make_targets(shared_data, tmp_path):
    """configs/babylm-strict-small.yaml, scaled down in steps and sizes only, through `make`:
    two teachers from scratch (a GPT-2 and a LLaMA), each cached once, a LLaMA CE baseline and
    ensemble students (distill, and the sweep over weights), evaluated on BLiMP."""
    pairs = tmp_path / "blimp-subset" / "blimp_filtered"
    pairs.mkdir(parents=True)
    for name in BLIMP_PHENOMENA:
        (pairs / f"{name}.jsonl").symlink_to(
            shared_data / "blimp" / "blimp_filtered" / f"{name}.jsonl")
    run_dir = tmp_path / "run"
    smaller = [f"run_dir={run_dir}", f"data.dir={shared_data / 'babylm' / '2023' / 'train_10M'}",
               "tokenizer.vocab_size=1024", "teacher.max_steps=30", "teacher.batch_size=16",
               "teacher.grad_accum=1", "teacher.warmup_steps=5", "teacher.dtype=fp32",
               "teacher.device=cpu", "cache.draws=[16]", "student.n_layer=1", "student.n_embd=32",
               "student.n_head=2", "student.intermediate_size=0", "student.max_steps=15",
               "student.batch_size=16", "student.warmup_steps=5", "student.device=cpu",
               "student.save_at_words=[10000]", f"eval.minimal_pairs={pairs.parent}",
               "eval.max_pairs_per_file=20",
               *(f"teachers.{name}.{key}={value}" for name in ("gpt2", "llama")
                 for key, value in (("n_layer", 1), ("n_embd", 32), ("n_head", 2),
                                    ("intermediate_size", 0)))]
    for target in ("data", "teacher", "teacher-logits", "baseline", "distill", "sweep", "eval"):
        result = subprocess.run(["make", "-s", target, f"PY={sys.executable}",
                                 f"CONFIG={REPO / 'configs' / 'babylm-strict-small.yaml'}",
                                 "ARGS=" + " ".join(smaller)], cwd=REPO, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"make {target} failed:\n{result.stderr[-3000:]}"

    for name, family in (("gpt2", "gpt2"), ("llama", "llama")):
        assert (run_dir / "teachers" / name / "teacher.json").is_file()
        config = json.loads((run_dir / "teachers" / name / "config.json").read_text())
        assert config["model_type"] == family
        manifest = json.loads((run_dir / "caches" / name / "train.zarr" / "zarr.json").read_text())
        assert manifest["attributes"]["manifest"]["selection"] == {"kind": "draws", "draws": [16],
                                                                   "seed": 0}
    results = json.loads((run_dir / "reports" / "results.json").read_text())
    models = {entry["name"]: entry for entry in results["models"]}
    assert set(models) == {"teachers/gpt2", "teachers/llama", "students/baseline",
                           "students/kd-a0.5-T2-mix-gpt2_0.5-llama_0.5",
                           "students/kd-a0.5-T2-mix-gpt2_0.25-llama_0.75",
                           "students/kd-a0.5-T2-mix-gpt2_0.75-llama_0.25"}
    for entry in models.values():
        assert 1 < entry["lm"]["perplexity"] < 1024
        assert 0 <= entry["minimal_pairs"]["blimp_filtered"]["ours"]["macro_accuracy"] <= 1
    student = run_dir / "students" / "kd-a0.5-T2-mix-gpt2_0.5-llama_0.5"
    assert json.loads((student / "config.json").read_text())["model_type"] == "llama"
    assert (student / "checkpoints" / "chck_10K" / "tokenizer.json").is_file()

"""End to end on the real BabyLM 2023 data and BLiMP, through the public entry points only:
data -> teacher -> cache -> baseline -> distil -> evaluate, each a `python -m` process."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLIMP_PHENOMENA = ["anaphor_gender_agreement", "determiner_noun_agreement_1",
                   "regular_plural_subject_verb_agreement_1"]


@pytest.mark.slow
def test_pipeline_on_babylm_2023(shared_data, tmp_path):
    pairs = tmp_path / "blimp-subset"
    pairs.mkdir()
    for name in BLIMP_PHENOMENA:  # a few phenomena, read in place through links
        (pairs / f"{name}.jsonl").symlink_to(shared_data / "blimp" / "blimp_filtered" / f"{name}.jsonl")
    run_dir = tmp_path / "run"
    common = [
        "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}",
        f"data.dir={shared_data / 'babylm' / '2023' / 'train_10M'}", "tokenizer.vocab_size=1024",
        "teacher.n_layer=2", "teacher.n_embd=64", "teacher.n_head=2", "teacher.max_steps=40",
        "student.n_layer=1", "student.n_embd=32", "student.n_head=2", "student.max_steps=20",
        "cache.k=16", "cache.splits=[train]", "distill.temperature=2",
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
        accuracies = entry["minimal_pairs"]["files"]
        assert sorted(accuracies) == sorted(BLIMP_PHENOMENA)
        assert all(0 <= f["accuracy"] <= 1 and f["pairs"] == 100 for f in accuracies.values())
    assert (run_dir / "reports" / "report.md").is_file()

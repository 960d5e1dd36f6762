"""Model folders as clients see them: a student straight from a training run loads with
AutoTokenizer and AutoModelForCausalLM (the run's token ids, its card, its milestones), and
lm-evaluation-harness, run as a real process on it with nothing copied in, gives the
log-likelihoods and accuracy that `student.evaluate` reports under the lm-eval convention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from configs import CONFIG_DIR, load_config
from precompute.corpus import prepare
from student import train as trainer
from student.evaluate import read_pair_file, score_pairs, sentence_logprobs
from training.checkpoint import MILESTONES_DIR
from training.model_card import read_card_facts
from training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SENTENCES = ["The dog runs.", "the cats sleep near the old house", "A bird, café-au-lait!"]


def settings(root: Path) -> list[str]:
    return [f"run_dir={root}", "data.generated_words=6000", "data.seq_len=32",
            "tokenizer.vocab_size=300", "student.n_layer=1", "student.n_embd=32",
            "student.n_head=2", "student.n_positions=256", "student.batch_size=8",
            "student.max_steps=40", "student.eval_every=20", "student.device=cpu",
            "student.save_at_words=[1000, 2000, 1000000]", "distill.alpha=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`make data` on a small generated corpus (a 300-entry byte-level BPE), then a CE baseline
    student with milestones at 1,000 and 2,000 words."""
    root = tmp_path_factory.mktemp("folders")
    cfg = load_config(CONFIG_DIR / "demo.yaml", settings(root))
    torch.set_num_threads(1)
    prepare(cfg)
    trainer.train(cfg)
    return root


def test_a_student_folder_loads_in_any_client_as_the_run_tokenizes(run):
    folder = run / "students" / "baseline"
    reference = load_tokenizer(run)
    milestones = sorted(p.name for p in (folder / MILESTONES_DIR).iterdir())
    assert milestones == ["chck_1K", "chck_2K"]  # 1M words are beyond the run's length
    for path in [folder, *((folder / MILESTONES_DIR).iterdir())]:
        tokenizer = AutoTokenizer.from_pretrained(path)
        for text in SENTENCES:
            assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
            assert tokenizer(text)["input_ids"][0] == reference.eos_token_id  # BOS prepended
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<|endoftext|>",) * 3
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.n_positions == 256 > 32  # longer than the training rows
        long = tokenizer(" ".join(["the dog runs"] * 30), return_tensors="pt")["input_ids"]
        assert long.shape[1] > 32 and torch.isfinite(model(long).logits).all()
        assert (path / "generation_config.json").is_file()
        card = (path / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
    facts = read_card_facts(folder)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert facts["mode"] == "ce-baseline" and facts["tokens_seen"] == metrics[-1]["tokens"]
    assert facts["words_seen"] == metrics[-1]["words"] > 2000
    assert facts["val_perplexity"] == pytest.approx(metrics[-1]["val_ppl"])
    at_2k = read_card_facts(folder / MILESTONES_DIR / "chck_2K")
    crossed = next(row for row in metrics if row["words"] >= 2000)
    assert at_2k["words_seen"] == crossed["words"] and at_2k["steps"] == crossed["step"]


def test_lm_evaluation_harness_scores_a_student_as_evaluate_does(run, tmp_path):
    """A local BLiMP-style task (one pair a forced tie), `lm_eval --log_samples` on the student
    folder: per-sentence log-likelihoods equal ours under the lm-eval convention, and so does
    the accuracy (a tie counts right there)."""
    folder = run / "students" / "baseline"
    demo_pairs = sorted((run / "corpus" / "minimal_pairs").glob("*.jsonl"))[0]
    pairs = [json.loads(line) for line in demo_pairs.read_text().splitlines()[:12]]
    pairs.append({"sentence_good": "The dog runs.", "sentence_bad": "The dog runs."})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "kd_pairs.yaml").write_text(yaml.safe_dump({
        "task": "kd_pairs", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(data)}}, "test_split": "train",
        "output_type": "multiple_choice", "doc_to_text": "", "doc_to_target": 0,
        "doc_to_choice": "{{[sentence_good, sentence_bad]}}", "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = tmp_path / "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},dtype=float32", "--tasks", "kd_pairs", "--include_path",
         str(tasks), "--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path",
         str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for path in out.rglob("samples_kd_pairs_*.jsonl")
               for line in path.read_text().splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert len(samples) == len(pairs)
    samples.sort(key=lambda sample: sample["doc_id"])
    theirs = np.array([[float(choice[0][0]) for choice in sample["resps"]] for sample in samples])

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(run)
    ours = sentence_logprobs(model, tokenizer, [s for p in pairs for s in (p["sentence_good"],
                                                                            p["sentence_bad"])],
                             convention="lm_eval").reshape(-1, 2)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-4)
    accuracy = score_pairs(model, tokenizer, [read_pair_file(data)])["lm_eval"]["macro_accuracy"]
    assert results["results"]["kd_pairs"]["acc,none"] == pytest.approx(accuracy)
    assert theirs[-1, 0] == theirs[-1, 1]  # the forced tie, counted right by both


def test_a_folder_without_its_tokenizer_is_completed_by_a_rerun(run, tmp_path, capsys):
    """A student folder of an earlier version (weights, no tokenizer) is not finished: the rerun
    resumes at its last step and writes the complete folder, weights unchanged."""
    import shutil

    from safetensors.torch import load_file

    from training.checkpoint import is_finished

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    folder = copy / "students" / "baseline"
    before = load_file(folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        (folder / name).unlink()
    assert not is_finished(folder)
    trainer.train(load_config(CONFIG_DIR / "demo.yaml", settings(copy)))
    assert "resuming" in capsys.readouterr().out and is_finished(folder)
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert read_card_facts(folder)["steps"] == 40

"""Students of other families through the same loop: a LLaMA student (RoPE, RMSNorm, SwiGLU)
trains by cached KD, resumes after SIGKILL to the uninterrupted run's weights, saves complete
folders that the Auto classes load, and evaluates; any causal LM's config.json builds a student."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from configs.cli import run
from student import train as trainer
from student.evaluate import evaluate_run
from training.model_card import read_card_facts
from tests.student.test_train import (CONFIG, REPO, _wait_for_new_checkpoint, config, make_run,
                                      metrics, one_thread, overrides, weights,  # noqa: F401
                                      without_timing)

LLAMA = ["student.architecture=llama", "student.dropout=0.1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("llama"), n_train=128)


def test_llama_student_resumes_after_sigkill_as_if_uninterrupted(run_dir):
    steps = [*LLAMA, "student.max_steps=48", "student.checkpoint_every=12",
             "student.eval_every=24", "student.save_at_words=[2000, 4000]"]
    straight = trainer.train(config(run_dir, *steps, "distill.run=straight"))
    command = [sys.executable, "-m", "student.train", "--config", str(CONFIG),
               *overrides(run_dir, *steps, "distill.run=broken")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    broken = run_dir / "students" / "broken"
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_new_checkpoint(broken, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr[-2000:]
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert without_timing(metrics(straight)) == without_timing(metrics(broken))
    for name in ("chck_2K", "chck_4K"):
        a, b = (weights(out / "checkpoints" / name) for out in (straight, broken))
        assert all(torch.equal(a[key], b[key]) for key in a)
    rows = metrics(straight)
    assert all(r["kl"] > 0 for r in rows) and rows[-1]["loss"] < rows[0]["loss"]


def test_llama_folder_loads_in_the_auto_classes_and_evaluates(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trainer.train(config(run_dir, *LLAMA, "student.max_steps=4", "distill.run=folder"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.max_position_embeddings == 1024  # student.n_positions
    assert model.config.intermediate_size == 128  # 8/3 x 32, rounded up to a multiple of 64
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and torch.isfinite(model(ids).logits).all()
    facts = read_card_facts(out)
    assert facts["architecture"] == "llama" and facts["n_positions"] == 1024
    results = evaluate_run(config(run_dir, "eval.max_pairs_per_file=2"))
    row = next(r for r in results["models"] if r["name"] == "students/folder")
    assert row["lm"]["perplexity"] > 1


def test_any_causal_lm_config_builds_a_student(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MistralConfig

    MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "shape")
    out = trainer.train(config(run_dir, f"student.config_path={tmp_path / 'shape'}",
                               "student.max_steps=2", "distill.run=mistral"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"
    assert (model.config.vocab_size, model.config.max_position_embeddings) == (300, 1024)
    assert model.config.eos_token_id == model.config.bos_token_id == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=["--config", str(CONFIG), *overrides(
            run_dir, f"student.config_path={tmp_path / 'missing'}", "distill.run=none")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "is neither a config.json nor a folder holding one" in err

"""Teacher training through the student loop: from scratch, full fine-tuning, LoRA (merged) and
QLoRA (adapter on a 4-bit base) each train a few steps, save, load back, and become the teacher
the logits job uses; plus the teacher's validation metrics."""

import json

import pytest
import torch
from safetensors.torch import load_file

from configs import UserError
from precompute.logits import fill_caches
from training.models import TeacherSource, load_teacher, resolve_teacher, weights_fingerprint
from precompute.teacher import evaluate_teacher, train_teacher, training_method
from storage.cache import open_cache
from storage.tokens import open_token_store
from training.scoring import lm_metrics
from tests.precompute.tiny_teacher import learnable_tokens, save_teacher, tiny_config, tiny_run

TRAINING = ("teacher.batch_size=8", "teacher.grad_accum=2", "teacher.max_steps=3",
            "teacher.warmup_steps=1", "teacher.lr=3e-3", "teacher.eval_every=0",
            "teacher.checkpoint_every=0", "teacher.precision=fp32", "teacher.lora_r=4",
            "teacher.lora_alpha=8", "teacher.lora_dropout=0.0", "eval.batch_size=16")
INPUT = torch.from_numpy(learnable_tokens(2, seed=5))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("base") / "model", seed=7)


def fine_tune(tmp_path, base, *extra):
    run = tiny_run(tmp_path, n_train=64, n_val=16)
    cfg = tiny_config(run, "teacher.from_scratch=false", f"teacher.model={base}", *TRAINING, *extra)
    return cfg, train_teacher(cfg)


def logits(model):
    with torch.inference_mode():
        return model(INPUT).logits.float()


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_from_scratch_teacher_trains_and_feeds_the_logits_job(tmp_path, capsys):
    run = tiny_run(tmp_path, n_train=64, n_val=16)
    cfg = tiny_config(run, "teacher.from_scratch=true", "teacher.n_layer=2", "teacher.n_embd=64",
                      "teacher.n_head=2", *TRAINING)
    out = train_teacher(cfg)
    info = json.loads((out / "teacher.json").read_text())
    store = open_token_store(run / "tokens" / "train.zarr")
    assert info["method"] == "scratch"
    assert info["tokenizer_fingerprint"] == store.tokenizer_fingerprint
    assert set(info["val"]) >= {"loss", "perplexity", "bits_per_byte"} and info["val"]["loss"] > 0
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]
    model = load_teacher(str(out))
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 64, 300)
    assert model.config.n_positions == 1024  # teacher.n_positions, not the rows' 32
    assert_loads_in_clients(out, run)
    assert resolve_teacher(cfg).model == str(out)
    fill_caches(cfg)
    manifest = open_cache(run / "cache" / "train.zarr").manifest
    assert manifest["teacher"]["name"] == str(out)
    assert manifest["teacher"]["fingerprint"] == weights_fingerprint(TeacherSource(str(out)))
    capsys.readouterr()
    assert train_teacher(cfg) == out and "already trained" in capsys.readouterr().out


def test_full_fine_tune_changes_every_weight_and_loads_back(tmp_path, base):
    cfg, out = fine_tune(tmp_path, base)
    assert json.loads((out / "teacher.json").read_text())["method"] == "full"
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[name], after[name]) for name in before
               if name.endswith("c_fc.weight"))
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    trained = load_teacher(str(out))
    assert (logits(trained) - logits(load_teacher(str(base)))).abs().max() > 1e-3


def test_lora_is_merged_into_a_plain_model(tmp_path, base):
    cfg, out = fine_tune(tmp_path, base, "teacher.use_lora=true")
    assert json.loads((out / "teacher.json").read_text())["method"] == "lora"
    assert not (out / "adapter_config.json").exists()  # a plain model: no adapter to re-apply
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert resolve_teacher(cfg) == TeacherSource(str(out), info=resolve_teacher(cfg).info)
    merged = load_teacher(str(out))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    client = assert_loads_in_clients(out, tmp_path)  # the merged, full-precision model
    torch.testing.assert_close(logits(client), logits(merged))
    with_adapter = load_teacher(str(base), adapter=str(out / "adapter"))
    torch.testing.assert_close(logits(merged), logits(with_adapter), rtol=1e-4, atol=1e-4)
    assert (logits(merged) - logits(load_teacher(str(base)))).abs().max() > 1e-4


def test_qlora_keeps_an_adapter_on_the_4bit_base(tmp_path, base):
    import bitsandbytes as bnb
    from peft import PeftModel
    cfg, out = fine_tune(tmp_path, base, "teacher.use_qlora=true")
    assert json.loads((out / "teacher.json").read_text())["method"] == "qlora"
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapter.items())
    source = resolve_teacher(cfg)
    assert (source.model, source.adapter) == (str(base), str(out))
    quantized = load_teacher(source.model, quantization="4bit", adapter=source.adapter)
    assert isinstance(quantized, PeftModel)
    assert isinstance(quantized.base_model.model.transformer.h[0].mlp.c_fc.base_layer, bnb.nn.Linear4bit)
    merged = load_teacher(source.model, adapter=source.adapter)  # on the fp32 base, merged
    assert (logits(quantized) - logits(merged)).abs().max() < 0.5
    assert (logits(merged) - logits(load_teacher(str(base)))).abs().max() > 1e-4
    assert metrics(out)[-1]["step"] == 3
    # Clients load the folder as an adapter whose config names the base (a folder that loads);
    # transformers applies it unmerged on the full-precision base.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base)
    client = assert_loads_in_clients(out, tmp_path)
    torch.testing.assert_close(logits(client), logits(merged), rtol=1e-4, atol=1e-4)


def assert_loads_in_clients(folder, run):
    """The teacher folder loads with AutoTokenizer (the run's token ids) and AutoModelForCausalLM
    and carries a model card; returns the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tokenizer import load_tokenizer

    tokenizer, reference = AutoTokenizer.from_pretrained(folder), load_tokenizer(run)
    for text in ("w1 w2 w3", "w17 w4"):
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert "babylm_kd:" in (folder / "README.md").read_text()
    assert (folder / "generation_config.json").is_file()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_evaluation_of_a_pretrained_teacher_is_the_students_lm_metrics(tmp_path, base):
    run = tiny_run(tmp_path, n_train=64, n_val=16)
    cfg = tiny_config(run, "teacher.from_scratch=false", f"teacher.model={base}", "eval.batch_size=16")
    result = evaluate_teacher(cfg)
    expected = lm_metrics(load_teacher(str(base)), open_token_store(run / "tokens" / "val.zarr"),
                          batch_size=16)
    assert result == pytest.approx(expected)
    assert abs(result["loss"] - torch.log(torch.tensor(300.0)).item()) < 1.0  # an untrained model


def test_lora_on_a_model_trained_from_scratch_is_refused(tmp_path):
    with pytest.raises(UserError, match="from_scratch"):
        training_method(tiny_config(tmp_path, "teacher.from_scratch=true", "teacher.use_lora=true"))

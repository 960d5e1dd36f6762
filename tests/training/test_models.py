"""Teacher loading: dtypes, 4-bit/8-bit, LoRA adapters, fingerprints, which teacher a run uses,
and the one-line errors for a missing folder, an unreachable hub and a foreign vocabulary."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from configs import UserError
from training.models import (TeacherNotFound, TeacherSource, VocabularyMismatch,
                               check_vocabulary, load_teacher, resolve_teacher, weights_fingerprint)
from tests.precompute.tiny_teacher import VOCAB, learnable_tokens, save_teacher, tiny_config

INPUT = torch.from_numpy(learnable_tokens(4, seed=3))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "model")


def reference_logits(folder):
    from transformers import AutoModelForCausalLM
    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(INPUT).logits


def logits_of(model):
    with torch.inference_mode():
        return model(INPUT).logits.float()


def test_full_precision_dtypes(teacher_dir):
    expected = reference_logits(teacher_dir)
    fp32 = load_teacher(str(teacher_dir), dtype="fp32")
    assert not fp32.training and fp32.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(logits_of(fp32), expected, rtol=0, atol=0)
    bf16 = load_teacher(str(teacher_dir), dtype="bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert (logits_of(bf16) - expected).abs().max() < 0.1


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_load_runs_close_to_full_precision(teacher_dir, quantization):
    import bitsandbytes as bnb
    model = load_teacher(str(teacher_dir), quantization=quantization)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt)
    error = (logits_of(model) - reference_logits(teacher_dir)).abs().max()
    assert 0 < error < 0.5


def save_adapter(base_dir, folder):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                 init_lora_weights=False, fan_in_fan_out=True))
    peft_model.save_pretrained(folder)
    with torch.inference_mode():
        return peft_model.eval()(INPUT).logits


def test_adapter_is_merged_in_full_precision_and_kept_on_4bit(teacher_dir, tmp_path):
    from peft import PeftModel
    expected = save_adapter(teacher_dir, tmp_path / "adapter")
    assert (expected - reference_logits(teacher_dir)).abs().max() > 1e-3  # the adapter matters
    merged = load_teacher(str(teacher_dir), adapter=str(tmp_path / "adapter"))
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits_of(merged), expected, rtol=1e-4, atol=1e-4)
    quantized = load_teacher(str(teacher_dir), quantization="4bit", adapter=str(tmp_path / "adapter"))
    assert isinstance(quantized, PeftModel)
    assert (logits_of(quantized) - expected).abs().max() < 0.5


def test_missing_folder_is_one_line(tmp_path):
    for path in (tmp_path / "nowhere", "./no/such/teacher"):
        with pytest.raises(TeacherNotFound, match="does not exist") as info:
            load_teacher(str(path))
        assert "\n" not in str(info.value)
    with pytest.raises(TeacherNotFound, match="adapter"):
        load_teacher(str(save_teacher(tmp_path / "t")), adapter=str(tmp_path))


def test_hub_name_offline_suggests_a_local_folder(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherNotFound, match="offline.*teacher.model=/path") as info:
        load_teacher("no-such-org/no-such-teacher-model")
    assert "\n" not in str(info.value)


def test_fingerprint_follows_the_weight_bytes(tmp_path):
    a = save_teacher(tmp_path / "a", seed=0)
    b = save_teacher(tmp_path / "b", seed=0)
    c = save_teacher(tmp_path / "c", seed=1)
    fingerprint = weights_fingerprint(TeacherSource(str(a)))
    assert len(fingerprint) == 64
    assert weights_fingerprint(TeacherSource(str(b))) == fingerprint
    assert weights_fingerprint(TeacherSource(str(c))) != fingerprint
    save_adapter(a, tmp_path / "adapter")
    assert weights_fingerprint(TeacherSource(str(a), adapter=str(tmp_path / "adapter"))) != fingerprint


def test_run_teacher_is_used_once_finished(tmp_path):
    cfg = tiny_config(tmp_path, "teacher.from_scratch=false", "teacher.model=some/hub-model",
                      "teacher.adapter=/adapters/x")
    assert resolve_teacher(cfg) == TeacherSource("some/hub-model", adapter="/adapters/x")
    folder = save_teacher(tmp_path / "teacher")  # weights without teacher.json: unfinished
    assert resolve_teacher(cfg).model == "some/hub-model"
    (folder / "teacher.json").write_text(json.dumps({"method": "full", "base": "some/hub-model"}))
    source = resolve_teacher(cfg)
    assert (source.model, source.adapter) == (str(folder), "")
    (folder / "adapter_config.json").write_text("{}")
    source = resolve_teacher(cfg)
    assert (source.model, source.adapter) == ("some/hub-model", str(folder))


def test_from_scratch_needs_a_trained_teacher(tmp_path):
    with pytest.raises(UserError, match="make teacher"):
        resolve_teacher(tiny_config(tmp_path, "teacher.from_scratch=true"))


def test_vocabulary_must_match_the_token_store(teacher_dir):
    model = load_teacher(str(teacher_dir))
    source = TeacherSource(str(teacher_dir))
    check_vocabulary(model, vocab_size=VOCAB, tokenizer_fingerprint="x", source=source, where="s")
    with pytest.raises(VocabularyMismatch, match=f"{VOCAB} tokens.*400"):
        check_vocabulary(model, vocab_size=400, tokenizer_fingerprint="x", source=source, where="s")
    trained = TeacherSource(str(teacher_dir), info={"tokenizer_fingerprint": "aaaa"})
    check_vocabulary(model, vocab_size=VOCAB, tokenizer_fingerprint="aaaa", source=trained, where="s")
    with pytest.raises(VocabularyMismatch, match="another tokenizer"):
        check_vocabulary(model, vocab_size=VOCAB, tokenizer_fingerprint="bbbb", source=trained, where="s")

"""Teacher fine-tuning (`make teacher`, `python -m precompute.teacher`) and teacher evaluation.

Trains on `tokens/train.zarr` with the loop every model trains with (`training.loop.fit`,
cross-entropy only, i.e. alpha = 1) and the settings of the `teacher` section: warmup + decay, gradient
accumulation, fp16/bf16 autocast on a GPU, validation every `eval_every` steps, checkpoints
every `checkpoint_every` steps, resume after an interruption (rerun the same command).

What is trained, chosen by the config:
  * `teacher.from_scratch`: a randomly initialised model of the teacher's family
    (`teacher.architecture`: GPT-2 or LLaMA, or `teacher.config_path`) and shape on the run's
    vocabulary, all weights;
  * `teacher.use_qlora`: a LoRA adapter on `teacher.model` loaded in 4-bit NF4;
  * `teacher.use_lora`: a LoRA adapter on `teacher.model` in full precision;
  * otherwise: every weight of `teacher.model` (full fine-tuning).

A config with several named teachers (`teachers:`) trains each in turn, or the one named by
`--teacher NAME` (`make teacher TEACHER=NAME`), each into `<run>/teachers/<name>/`.

Output, `<run>/teacher/` (or `teachers/<name>/`): the loop's config.yaml, metrics.jsonl and
checkpoint/, the model, and
`teacher.json` (method, base model, tokenizer fingerprint, validation metrics), written last:
its presence marks the teacher finished, and from then on the logits job uses it
(`training.models.resolve_teacher`). The model is
  * a full save_pretrained model after full fine-tuning, from scratch, and after LoRA: the
    adapter is merged into the full-precision weights (the logits job then runs a plain model at
    full speed; the adapter itself is kept in `teacher/adapter/`);
  * after QLoRA, the adapter only (adapter_config.json + adapter_model.safetensors, whose
    `base_model_name_or_path` is `teacher.model`): merging into 4-bit weights would round the
    fine-tune away, so the logits job loads the base (in teacher.dtype/quantization) and
    applies the adapter.

Teacher evaluation (`evaluate_teacher`, also `python -m precompute.teacher --evaluate`, which
evaluates the teacher the logits job would use, fine-tuned or not): loss, perplexity and bits
per byte on `tokens/val.zarr` from `training.scoring.lm_metrics`, the numbers `make eval`
reports for every model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from configs import Config, UserError
from configs.cli import chosen_teachers, teacher_option
from storage.location import locate
from storage.paths import write_atomic
from storage.tokens import TokenStore, open_token_store
from training.device import is_writer, local_device, resolve_device
from training.loop import fit, open_tokens
from training.models import (ADAPTER_CONFIG, TEACHER_INFO, load_teacher, new_model_of,
                             resolve_teacher)
from training.scoring import lm_metrics

ADAPTER_DIR = "adapter"


def training_method(cfg: Config) -> str:
    """'scratch', 'qlora', 'lora' or 'full' (see module doc)."""
    t = cfg.teacher
    if t.from_scratch:
        if t.use_lora or t.use_qlora:
            raise UserError("teacher.from_scratch trains every weight: set teacher.use_lora and "
                            "teacher.use_qlora to false")
        return "scratch"
    return "qlora" if t.use_qlora else "lora" if t.use_lora else "full"


def train_teacher(cfg: Config) -> Path:
    """Fine-tune (or train from scratch) the teacher of `cfg` into its folder (`cfg.teacher_dir`:
    `<run>/teacher/` or `teachers/<name>/`); resumes an interrupted run and returns at once when
    the teacher is already finished."""
    out = cfg.teacher_dir
    if (out / TEACHER_INFO).is_file():
        print(f"{out} is already trained (delete it to train again)")
        return out
    method = training_method(cfg)
    tokens, val_tokens = open_tokens(cfg)
    model = build_model(cfg, method=method, tokens=tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"teacher: {method} training of {_base_name(cfg, method)}, "
          f"{trainable:,} trainable parameters")
    fit(model, cfg=cfg, hp=cfg.teacher, out_dir=out, tokens=tokens, val_tokens=val_tokens,
        card={"kind": "teacher", "method": method, "base": _base_name(cfg, method),
              "token_store": tokens.fingerprint[:16]})
    if is_writer():
        if method == "lora":
            merge_adapter(model, out)
        info = {"method": method, "base": _base_name(cfg, method),
                "tokenizer_fingerprint": tokens.tokenizer_fingerprint,
                "token_store_fingerprint": tokens.fingerprint}
        write_atomic(out / TEACHER_INFO, json.dumps(info, indent=2) + "\n")
        info["val"] = evaluate_teacher(cfg)
        write_atomic(out / TEACHER_INFO, json.dumps(info, indent=2) + "\n")
    return out


def build_model(cfg: Config, *, method: str, tokens: TokenStore) -> torch.nn.Module:
    """The model to train: a new model, the pretrained teacher, or it wrapped with LoRA."""
    t = cfg.teacher
    if method == "scratch":
        return new_model_of(t, vocab_size=tokens.vocab_size,
                            eos_token_id=tokens.manifest["tokenizer"].get("eos_id", 0))
    if method == "qlora" and t.adapter:
        raise UserError("teacher.adapter with teacher.use_qlora: merge that adapter into a "
                        "full-precision copy of the base model first, and name it in teacher.model")
    device = local_device(t.device, "teacher.device")
    # Full-precision training keeps fp32 master weights (autocast does fp16/bf16 on the GPU);
    # QLoRA computes in the autocast dtype on top of the 4-bit weights.
    compute = {"fp16": "fp16", "bf16": "bf16"}.get(t.precision, "fp32") \
        if device.type == "cuda" else "fp32"
    model = load_teacher(t.model, dtype=compute if method == "qlora" else "fp32",
                         quantization="4bit" if method == "qlora" else "none",
                         adapter=t.adapter, device=device)
    if model.config.vocab_size != tokens.vocab_size:
        raise UserError(f"teacher {t.model} has a vocabulary of {model.config.vocab_size} tokens "
                        f"but {tokens.path} was made with {tokens.vocab_size}: tokenize with the "
                        "teacher's tokenizer (tokenizer.kind: gpt2) or train from scratch")
    if method == "full":
        return model.train()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(t.seed)  # the adapter's initialisation
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=list(t.lora_target_modules), task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D layers
    return get_peft_model(model, lora).train()


def merge_adapter(model, out: Path) -> None:
    """After LoRA: keep the adapter in out/adapter/ and save the merged model in `out`."""
    adapter_dir = out / ADAPTER_DIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir()
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
        (out / name).replace(adapter_dir / name)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)


def evaluate_teacher(cfg: Config) -> dict:
    """Validation metrics of the teacher the logits job uses, loaded as it loads it
    (training.scoring.lm_metrics: loss, perplexity, bits_per_byte, tokens, bytes, sequences)."""
    source = resolve_teacher(cfg)
    device = resolve_device(cfg.teacher.device, "teacher.device")
    model = load_teacher(source.model, adapter=source.adapter, device=device,
                         dtype=cfg.teacher.dtype if device.type == "cuda" else "fp32",
                         quantization=cfg.teacher.quantization)
    val = open_token_store(locate(cfg.token_store_at("val"), cfg.storage.options))
    metrics = lm_metrics(model, val, batch_size=cfg.eval.batch_size, device=device,
                         desc="teacher val")
    print(metrics_line(metrics))
    return metrics


def metrics_line(metrics: dict) -> str:
    bits = metrics["bits_per_byte"]
    return (f"teacher val: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
            + (f", bits/byte {bits:.4f}" if bits is not None else "")
            + f" ({metrics['tokens']:,} tokens)")


def _base_name(cfg: Config, method: str) -> str:
    t = cfg.teacher
    if method != "scratch":
        return t.model
    return f"new model from {t.config_path}" if t.config_path else f"new {t.architecture}"


def main(cfg: Config, args: argparse.Namespace) -> None:
    for view in chosen_teachers(cfg, args):
        if args.evaluate:
            evaluate_teacher(view)
        else:
            train_teacher(view)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluate", action="store_true",
                        help="only evaluate the teacher the logits job would use (no training)")
    teacher_option(parser)


if __name__ == "__main__":
    from configs.cli import run

    run(main, "Fine-tune the teacher (full, LoRA or QLoRA) or train it from scratch.",
        extra=_arguments)

"""The models every stage builds or loads.

New models of a configured family and shape, randomly initialised from a seed (`new_model`:
students, and teachers trained from scratch): GPT-2, LLaMA, or any causal LM's config.json.

Loading the teacher: a hub name or a local folder, fp32/fp16/bf16 or 4-bit NF4 / 8-bit through
bitsandbytes, optionally with a PEFT LoRA adapter; plus the weights fingerprint that goes into
the logit cache's manifest.

Which teacher the logits job and the teacher evaluation use (`resolve_teacher`):
  1. `<run>/teacher/` (`teachers/<name>/` for a named one) when it holds a finished teacher, i.e. `teacher.json` is there (written
     last by `python -m precompute.teacher`, for a fine-tuned or a from-scratch teacher). That
     folder is either a full model (full fine-tune, from scratch, or LoRA merged into a full
     precision base) or, after QLoRA, a LoRA adapter whose base is the `base` named in
     `teacher.json` (merging into 4-bit weights would round the fine-tune away).
  2. Otherwise `cfg.teacher.model` (hub name or folder) with `cfg.teacher.adapter`, pretrained,
     without fine-tuning. With `teacher.from_scratch` there is no such fallback: train first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import GPT2Config, PreTrainedModel

from configs import Config, UserError
from storage.paths import file_problem
from training.tokenizer import looks_like_local_path

TEACHER_INFO = "teacher.json"
"""Written last into <run>/teacher/: marks the teacher finished and says what it is."""
ADAPTER_CONFIG = "adapter_config.json"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def new_model(*, vocab_size: int, n_positions: int, n_layer: int, n_embd: int, n_head: int,
              architecture: str = "gpt2", config_path: str = "", intermediate_size: int = 0,
              dropout: float = 0.0, seed: int = 0, eos_token_id: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM (the family's own init) from `seed`.

    `architecture`: 'gpt2' (tied input/output embeddings, learned positions) or 'llama' (RoPE,
    RMSNorm, SwiGLU, tied embeddings, no biases; BabyLlama's family). `config_path`: any
    transformers causal-LM config.json instead, its shape as it says. Either way the run sets
    the vocabulary, the context length `n_positions` (at least the training rows' length:
    clients may score longer texts) and the special ids: `eos_token_id` doubles as BOS and pad
    (the token store joins documents with it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    special = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if config_path:
        path = Path(config_path).expanduser()
        if not path.is_file() and not (path / "config.json").is_file():
            raise UserError(f"config_path {config_path} is neither a config.json nor a folder "
                            "holding one")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise UserError(f"config_path {config_path} is not a transformers config "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
        config.update({"vocab_size": vocab_size, **special})
        for key in ("n_positions", "max_position_embeddings"):
            if hasattr(config, key):
                setattr(config, key, n_positions)
    elif architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head,
            intermediate_size=intermediate_size or swiglu_width(n_embd),
            max_position_embeddings=n_positions, attention_dropout=dropout,
            tie_word_embeddings=True, **special)
    elif architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_inner=intermediate_size or None, resid_pdrop=dropout,
            embd_pdrop=dropout, attn_pdrop=dropout, **special)
    else:
        raise UserError(f"architecture {architecture!r} is not one of 'gpt2', 'llama'")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def new_model_of(section, *, vocab_size: int, eos_token_id: int) -> PreTrainedModel:
    """`new_model` shaped by a student or teacher config section."""
    return new_model(vocab_size=vocab_size, n_positions=section.n_positions,
                     n_layer=section.n_layer, n_embd=section.n_embd, n_head=section.n_head,
                     architecture=section.architecture, config_path=section.config_path,
                     intermediate_size=section.intermediate_size,
                     dropout=getattr(section, "dropout", 0.0), seed=section.seed,
                     eos_token_id=eos_token_id)


def swiglu_width(n_embd: int) -> int:
    """LLaMA's MLP width for `n_embd`: 8/3 n_embd (a SwiGLU's three matrices then hold what a
    4 x n_embd GELU MLP's two do), rounded up to a multiple of 64."""
    return -(-8 * n_embd // 3 // 64) * 64


class TeacherNotFound(UserError):
    """No model at the given path or hub name."""


class ModelUnreadable(UserError):
    """A model folder whose files are there but cannot be loaded (truncated, corrupt)."""


class VocabularyMismatch(UserError):
    """The teacher's vocabulary is not the token store's."""


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher comes from: `model` (hub name or folder) plus an optional LoRA `adapter`
    folder. `info` is the run's `teacher.json` when the teacher was trained here (else empty)."""

    model: str
    adapter: str = ""
    info: dict | None = None


def resolve_teacher(cfg: Config) -> TeacherSource:
    """The teacher the logits job uses: the run's finished teacher, else `cfg.teacher.model`."""
    folder = cfg.teacher_dir
    info_path = folder / TEACHER_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (folder / ADAPTER_CONFIG).is_file():
            return TeacherSource(model=info["base"], adapter=str(folder), info=info)
        return TeacherSource(model=str(folder), info=info)
    if cfg.teacher.from_scratch:
        raise TeacherNotFound(f"teacher.from_scratch is set but {folder} holds no finished "
                              "teacher: run `make teacher` first")
    return TeacherSource(model=cfg.teacher.model, adapter=cfg.teacher.adapter)


def load_teacher(name_or_path: str, *, dtype: str = "fp32", quantization: str = "none",
                 adapter: str = "", device: torch.device | str = "cpu") -> torch.nn.Module:
    """A causal LM from a hub name or local folder, in `dtype` ('fp32', 'fp16', 'bf16') or
    quantised ('4bit' NF4 with `dtype` as compute dtype, '8bit'), in eval mode on `device`.

    `adapter`: a PEFT LoRA folder, merged into the weights when they are full precision and kept
    as a PeftModel on quantised weights. Never runs remote code; reads safetensors only.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if adapter and not (Path(adapter).expanduser() / ADAPTER_CONFIG).is_file():
        raise TeacherNotFound(f"teacher adapter folder {adapter} holds no {ADAPTER_CONFIG}")
    device = torch.device(device)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=False, use_safetensors=True)
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization != "none":
        raise UserError(f"teacher.quantization = {quantization!r} must be 'none', '4bit' or '8bit'")
    if quantization != "none":
        # bitsandbytes places (and quantises) the weights while loading
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                else str(device)}
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, kwargs)
    if quantization == "none":
        model = model.to(device)
    if adapter:
        model = _apply_adapter(model, adapter, merge=quantization == "none")
    return model.eval()


def _from_pretrained(auto_class, name_or_path: str, kwargs: dict):
    """from_pretrained with the user-fixable failures (missing folder, hub offline) as one line."""
    if looks_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "holds no config.json"
            raise TeacherNotFound(f"teacher model folder {folder} {what}")
        weights = ("model.safetensors" if not (folder / "model.safetensors.index.json").is_file()
                   else "model.safetensors.index.json")
        for name in ("config.json", weights):
            if problem := file_problem(folder / name):
                raise ModelUnreadable(f"model folder {folder}: {name} {problem[1]}")
        try:
            return auto_class.from_pretrained(str(folder), **kwargs)
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            # a truncated or overwritten file in the folder; the loaders raise all of these
            raise ModelUnreadable(f"model folder {folder}: config.json or {weights} cannot be "
                                  f"loaded ({type(exc).__name__}: truncated, corrupt or "
                                  "unreadable)") from None
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherNotFound(
            f"could not load teacher {name_or_path!r} from the Hugging Face hub ({first}); "
            f"offline? download it once and pass its folder, e.g. teacher.model=/path/to/model"
        ) from None


def looks_local(name_or_path: str) -> bool:
    """A folder that exists, or a name only a path looks like (hub ids are 'name' or 'org/name')."""
    return (Path(name_or_path).expanduser().exists() or looks_like_local_path(name_or_path)
            or name_or_path.endswith("/"))


def _apply_adapter(model, adapter: str, *, merge: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
    return model.merge_and_unload() if merge else model


def check_vocabulary(model: torch.nn.Module, *, vocab_size: int, tokenizer_fingerprint: str,
                     source: TeacherSource, where: str) -> None:
    """Refuse a teacher whose logits do not range over the token store's vocabulary: its size
    must match, and a teacher trained in this run must have used the same tokenizer."""
    teacher_vocab = model.config.vocab_size
    if teacher_vocab != vocab_size:
        raise VocabularyMismatch(
            f"teacher {source.model} has a vocabulary of {teacher_vocab} tokens but {where} was "
            f"made with a tokenizer of {vocab_size}: use a teacher trained on this tokenizer or "
            "rebuild the token store with the teacher's tokenizer")
    trained_with = (source.info or {}).get("tokenizer_fingerprint")
    if trained_with and trained_with != tokenizer_fingerprint:
        raise VocabularyMismatch(
            f"teacher {source.model} was trained with another tokenizer than the one {where} "
            f"was made with (tokenizer fingerprint {trained_with[:12]} vs "
            f"{tokenizer_fingerprint[:12]}): retrain the teacher or rebuild the token store")


def weights_fingerprint(source: TeacherSource) -> str:
    """sha256 over the safetensors files of the teacher (and of its adapter), by name and bytes.

    Reads the files rather than the loaded tensors, so it does not depend on dtype or
    quantisation (both are recorded next to it in the manifest).
    """
    digest = hashlib.sha256()
    for folder in (_weights_folder(source.model), source.adapter):
        if not folder:
            continue
        files = sorted(Path(folder).expanduser().glob("*.safetensors"))
        if not files:
            raise TeacherNotFound(f"no *.safetensors weights in {folder}")
        for path in files:
            digest.update(f"{path.name}\0".encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def _weights_folder(name_or_path: str) -> str:
    """The local folder of a model: itself, or its snapshot in the hub cache (already loaded)."""
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # noqa: BLE001 -- any hub failure means "not cached"
        raise TeacherNotFound(f"teacher {name_or_path!r} is not in the local hub cache: {exc}") from None


def teacher_manifest(source: TeacherSource, *, dtype: str, quantization: str) -> dict:
    """The `teacher` entry of a logit cache manifest."""
    return {"name": source.model, "fingerprint": weights_fingerprint(source),
            "dtype": dtype, "quantization": quantization, "adapter": source.adapter}

"""Experiment configuration: one YAML file per experiment, loaded into frozen dataclasses.

Every field is documented where it is declared. `load_config(path, overrides)` reads the YAML,
applies dotted command-line overrides (`student.lr=3e-4`), and checks keys, types and ranges
before any work starts; every problem is a `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

CONFIG_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad input, bad config): one line, exit code 2, no traceback."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writes to `path` inside the block: an OSError that names no file (a write() on a full
    disk does not) is raised again naming `path`, so the one error line can say where."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class DataConfig:
    dir: str = ""
    """Folder of BabyLM `*.train` files. Empty: generate the built-in demo corpus into run_dir."""
    validation: str = "split"
    """'split': the last `val_fraction` of every file is validation (keeps each file's order);
    'dev': the official `*.dev` files in `dev_dir` are validation."""
    val_fraction: float = 0.05
    dev_dir: str = ""
    """Folder of `*.dev` files, used when validation is 'dev'. Empty: `<dir>/../dev`."""
    seq_len: int = 128
    """Tokens per packed sequence (row of the token store)."""
    document: str = "file"
    """What `<|endoftext|>` separates in the token store: 'file' (each corpus file is one
    document, its lines joined by newlines) or 'line' (every line is a document)."""
    generated_words: int = 300_000
    """Size of the built-in corpus, in words, when `dir` is empty."""
    seed: int = 0
    """Seed of the built-in corpus generator."""


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"
    """'bpe': train a byte-level BPE on the train split; 'gpt2': GPT-2's tokenizer from `path`."""
    path: str = ""
    """For 'gpt2': a folder with vocab.json + merges.txt, or a hub name such as 'gpt2'."""
    vocab_size: int = 16_000
    """Vocabulary size of a trained BPE (BabyLM entries commonly use 16k)."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""


ARCHITECTURES = ("gpt2", "llama")
"""Model families a new model is built as (`training.models.new_model`); any other causal LM
through `config_path`."""


@dataclass(frozen=True)
class TeacherConfig:
    name: str = ""
    """The teacher's name: it lives in `teachers/<name>/` and its cache in `caches/<name>/`.
    Empty (a config with a single `teacher:` section): `teacher/` and `cache/`. Set for each
    entry of `teachers:` from its key."""
    model: str = "gpt2-large"
    """Hub name or local folder of the pretrained teacher (ignored when from_scratch)."""
    from_scratch: bool = False
    """Train a randomly initialised model of the shape below instead of loading `model`."""
    architecture: str = "gpt2"
    """Family of a teacher trained from scratch: 'gpt2' or 'llama' (RoPE, RMSNorm, SwiGLU)."""
    config_path: str = ""
    """A from-scratch teacher built from this config.json (any transformers causal LM) instead of
    `architecture` and the shape below; the vocabulary and special ids come from the run."""
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    intermediate_size: int = 0
    """Width of the MLP (0: the family's default, 4 x n_embd for GPT-2, 8/3 x n_embd rounded up
    to a multiple of 64 for LLaMA's SwiGLU, the same parameters as GPT-2's)."""
    n_positions: int = 1024
    """Context length of a teacher trained from scratch, independent of data.seq_len: clients
    may score texts longer than the training rows."""
    dtype: str = "fp32"
    """Weights for the logits job and evaluation: fp32, fp16 or bf16."""
    quantization: str = "none"
    """'none', '4bit' (NF4) or '8bit', through bitsandbytes."""
    adapter: str = ""
    """Folder of a PEFT LoRA adapter to apply on top of the teacher (empty: none)."""
    use_lora: bool = False
    """Fine-tune a LoRA adapter instead of all weights."""
    use_qlora: bool = False
    """Fine-tune a LoRA adapter on a 4-bit quantised teacher (QLoRA)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    lr: float = 2.5e-4
    batch_size: int = 128
    """Effective batch in sequences: micro-batch x grad_accum."""
    grad_accum: int = 16
    epochs: float = 4.0
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    warmup_steps: int = 300
    schedule: str = "cosine"
    """Learning-rate decay after warmup: 'cosine', 'linear' or 'constant'."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "fp16"
    """Autocast on GPU during fine-tuning: 'fp32', 'fp16' or 'bf16' (the CPU always runs fp32)."""
    eval_every: int = 200
    """Validation loss every N optimizer steps (0: only at the end)."""
    checkpoint_every: int = 200
    """Checkpoint every N optimizer steps (0: only at the end)."""
    seed: int = 0
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    resume_with_new_settings: bool = False
    """Resume a checkpoint made with other settings, continuing under this config's from the
    checkpoint's step (recorded in config.yaml and metrics.jsonl). Off: such a resume is refused.
    The model's shape, batch, seed, data and tokenizer can never change within a run."""


@dataclass(frozen=True)
class CacheConfig:
    k: int = 64
    """Teacher entries kept per position: the top k (selection 'topk'), or k draws."""
    selection: str = "topk"
    """Which k entries: 'topk', the k largest logits plus the exact tail mass (the tail bucket:
    docs/architecture.md, "Logit cache"), 'sample', k ids drawn systematically from the
    teacher's softmax at sample_temperature (random-sampling KD, Anshumann et al., ACL 2025): an
    unbiased estimate of the whole distribution, tail included (docs/topk-vs-sampled.md), with
    their logits, or 'draws': ids drawn at each of `temperatures` (see `draws`)."""
    sample_temperature: float = 2.0
    """Temperature of the distribution the 'sample' selection draws from; students distilled at
    another temperature reweight the same draws."""
    draws: tuple[int, ...] = ()
    """selection 'draws' (counted draws): ids drawn at each of `temperatures`, draws[i] per
    position at temperatures[i] (empty: k at each), stored as each position's distinct ids and
    their counts, without logits, so a student distils at one of those temperatures; the
    smallest cache for its fidelity (README, "Choosing a cache")."""
    sample_seed: int = 0
    """Seed of the draws (each batch's generator is seeded with it and the batch's first row)."""
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Temperatures at which the exact full-vocabulary logsumexp is stored."""
    value_code: str = "gap8"
    """How top-k logits are stored (storage/cache.py): 'gap8' (uint8 steps of 1/32 nat, <= 1.6 %
    probability error, the smaller on disk) or 'float16' (bytes per token of each:
    docs/log.md)."""
    chunk_sequences: int = 32
    """Sequences per chunk (the unit of compression, checksum and contiguous read)."""
    shard_chunks: int = 16
    """Chunks per shard file (the unit of writing, resume and integrity reports)."""
    batch_size: int = 32
    """Teacher inference batch, in sequences."""
    splits: tuple[str, ...] = ("train",)
    """Token stores to cache: 'train', and optionally 'val'."""

    @property
    def draws_per_temperature(self) -> tuple[int, ...]:
        """selection 'draws': the draws at each of `temperatures`."""
        return self.draws or (self.k,) * len(self.temperatures)


BABYLM_MILESTONES = (*range(1_000_000, 10_000_001, 1_000_000),
                     *range(20_000_000, 100_000_001, 10_000_000))
"""The BabyLM 2025 checkpoint schedule, in words seen: every 1M up to 10M, every 10M to 100M."""


@dataclass(frozen=True)
class StudentConfig:
    architecture: str = "gpt2"
    """'gpt2' (GPT-2, learned positions) or 'llama' (LLaMA: RoPE, RMSNorm, SwiGLU, as
    BabyLlama's students)."""
    config_path: str = ""
    """Build the student from this config.json (any transformers causal LM, e.g. a Mistral or
    OPT config) instead of `architecture` and the shape below; the vocabulary, context length
    and special ids come from the run."""
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    intermediate_size: int = 0
    """Width of the MLP (0: the family's default, 4 x n_embd for GPT-2, 8/3 x n_embd rounded up
    to a multiple of 64 for LLaMA's SwiGLU, the same parameters as GPT-2's)."""
    n_positions: int = 1024
    """Context length (as GPT-2 Small), independent of data.seq_len: clients may score texts
    longer than the training rows."""
    dropout: float = 0.1
    lr: float = 2.5e-4
    batch_size: int = 32
    """Effective batch in sequences: micro-batch x grad_accum."""
    grad_accum: int = 1
    epochs: float = 6.0
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    warmup_steps: int = 300
    schedule: str = "cosine"
    """Learning-rate decay after warmup: 'cosine', 'linear' or 'constant'."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "fp32"
    """Autocast on GPU: 'fp32', 'fp16' or 'bf16' (the CPU always runs fp32)."""
    eval_every: int = 500
    """Validation loss every N optimizer steps (0: only at the end)."""
    checkpoint_every: int = 500
    """Checkpoint every N optimizer steps (0: only at the end)."""
    seed: int = 0
    device: str = "auto"
    shuffle_buffer: int = 256
    """Sequences shuffled together in memory by the streaming reader."""
    save_at_words: tuple[int, ...] = BABYLM_MILESTONES
    """Words seen at which to save a complete model folder `checkpoints/chck_<N>M/` (`<N>K`
    below a million); those beyond the run's length are never reached. Words are counted
    exactly: the token store holds the words starting in each row. Empty: none."""
    resume_with_new_settings: bool = False
    """Resume a checkpoint made with other settings, continuing under this config's from the
    checkpoint's step (recorded in config.yaml and metrics.jsonl). Off: such a resume is refused.
    The model's shape, batch, seed, data and tokenizer can never change within a run."""


@dataclass(frozen=True)
class EnsembleMember:
    """One teacher of an ensemble: a named teacher (its cache `caches/<name>/train.zarr`, or the
    model itself in online mode) or a cache path, and its weight."""

    teacher: str = ""
    """A name from `teachers:`."""
    cache: str = ""
    """Or a logit cache folder (`.../train.zarr`) made over this run's token store."""
    weight: float = 1.0
    """Relative weight (the weights are normalised to sum to 1)."""

    @property
    def label(self) -> str:
        """The member in run names: the teacher's name, or its cache's folder name."""
        return self.teacher or Path(self.cache).parent.name or Path(self.cache).name


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 0.5
    """Weight of cross-entropy; 1 - alpha weighs the KL term. alpha = 1 is the CE baseline."""
    temperature: float = 2.0
    k: int = 0
    """Teacher entries used per position (0: all cached)."""
    mode: str = "cached"
    """'cached': teacher top-k from the logit cache; 'online': teacher resident, full vocabulary."""
    run: str = ""
    """Name of the student run directory (empty: derived from alpha, temperature and k)."""
    skip_bad_shards: bool = False
    """Train on a cache with corrupt shards by skipping them (and saying how many tokens)."""
    sweep_alphas: tuple[float, ...] = (0.5, 0.8)
    sweep_temperatures: tuple[float, ...] = (1.0, 2.0)
    sweep_ks: tuple[int, ...] = ()
    """k values for the sweep grid (empty: only the cached k)."""
    teachers: tuple[EnsembleMember, ...] = ()
    """Distil from these teachers together, e.g. [{teacher: gpt2, weight: 1}, {teacher: llama,
    weight: 1}] (a plain name or cache path stands for weight 1). Empty: the single teacher, or
    the only entry of `teachers:`."""
    ensemble: str = "probability"
    """How an ensemble's teachers are combined at T: 'probability' (the weighted mixture of their
    tempered distributions; what a cache can hold) or 'logits' (softmax of the weighted average
    of their logits, BabyLlama's; online mode only: a cache does not hold every logit)."""
    sweep_weights: tuple[tuple[float, ...], ...] = ()
    """Weight vectors, one weight per entry of `teachers`, for the sweep grid (empty: only the
    given weights)."""


@dataclass(frozen=True)
class EvalConfig:
    minimal_pairs: str = ""
    """Folder of BLiMP-style `*.jsonl` minimal-pair files, scored as one suite; or a folder of
    such folders (e.g. BLiMP and the BLiMP supplement), each its own suite, reported apart.
    Empty: the demo's own, if any."""
    batch_size: int = 64
    max_pairs_per_file: int = 0
    """Score at most this many pairs per file (0: all)."""
    models: tuple[str, ...] = ()
    """Extra model folders or hub names to evaluate beside the run's teacher and students."""


@dataclass(frozen=True)
class StorageConfig:
    tokens: str = ""
    """Where the token stores (and a copy of the tokenizer) live: a folder, or an fsspec URL
    (s3://bucket/prefix; gs://, any fsspec URL). Empty: <run_dir>/tokens."""
    caches: str = ""
    """Where the logit caches live, a folder or URL standing in for run_dir: their paths under it
    are cache/<split>.zarr (caches/<name>/... for named teachers). Empty: run_dir. Everything
    else (teachers, students, checkpoints, reports) stays in run_dir on local disk."""
    options: dict[str, object] = field(default_factory=dict)
    """fsspec storage_options for those URLs (e.g. {endpoint_url: ..., client_kwargs: {...}}).
    Prefer the environment for credentials (AWS_ACCESS_KEY_ID, ...); these are never written
    to a saved config.yaml, a manifest or a log."""
    lease_seconds: float = 60.0
    """Term of a shard's lease when writing a cache to object storage: its writer renews it; a
    killed writer's shards are taken over this long after its last renewal."""


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    """Experiment name; the default run_dir is runs/<name>."""
    run_dir: str = ""
    """Root of every output: tokens/, teacher/, cache/, students/<run>/, reports/."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """Several named teachers, each written as the settings in which it differs from `teacher:`
    (e.g. {gpt2: {architecture: gpt2}, llama: {architecture: llama}}). Empty: `teacher:` alone."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    source: str = ""
    """The YAML file this config came from (set by load_config, not by the user)."""

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def teacher_dir(self) -> Path:
        """Where the teacher of `teacher:` lives: `teacher/`, or `teachers/<name>/` for a named one."""
        name = self.teacher.name
        return self.run_path / ("teachers/" + name if name else "teacher")

    @property
    def cache_dir(self) -> Path:
        """Where that teacher's logit caches live: `cache/`, or `caches/<name>/`."""
        name = self.teacher.name
        return self.run_path / ("caches/" + name if name else "cache")

    @property
    def tokens_dir(self) -> str:
        """Where the token stores live: `storage.tokens`, or `<run_dir>/tokens`."""
        return self.storage.tokens.rstrip("/") or str(self.run_path / "tokens")

    def token_store_at(self, split: str) -> str:
        return f"{self.tokens_dir}/{split}.zarr"

    def cache_at(self, split: str) -> str:
        """The cache of `teacher:` for the token store of `split`: `cache/<split>.zarr` (or
        `caches/<name>/...`) under `storage.caches`, or under run_dir."""
        relative = self.cache_dir.relative_to(self.run_path) / f"{split}.zarr"
        if self.storage.caches:
            return f"{self.storage.caches.rstrip('/')}/{relative.as_posix()}"
        return str(self.run_path / relative)

    def for_teacher(self, name: str) -> "Config":
        """This config with `teachers[name]` as its `teacher:` section (the stages that make or
        read one teacher take such a view)."""
        if name not in self.teachers:
            known = ", ".join(self.teachers) or "none: the config has no `teachers:` section"
            raise ConfigError(f"{self.source}: no teacher named {name!r} (known: {known})")
        return dataclasses.replace(self, teacher=self.teachers[name])

    def each_teacher(self, only: str = "") -> list["Config"]:
        """A view per named teacher, in the order of `teachers:` (`only`: that one); or this
        config alone when it has no `teachers:`."""
        if only:
            return [self.for_teacher(only)]
        return [self.for_teacher(name) for name in self.teachers] or [self]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: Path | str, *, notes: tuple[str, ...] = ()) -> Path:
        """Write the resolved config as `config.yaml` in `directory` (beside an output), with
        `notes` as comment lines on top."""
        path = Path(directory) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "".join(f"# {note}\n" for note in notes)
        values = _plain(self.to_dict())
        values["storage"]["options"] = {}  # they may hold credentials
        with writing(path):
            path.write_text(header + yaml.safe_dump(values, sort_keys=False))
        return path

    def replace(self, **changes) -> "Config":
        """A copy with dotted keys changed, validated like overrides: replace(**{'distill.alpha': 1.0})."""
        return _build(_merge_overrides(self.to_dict(), changes, self.source), self.source)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf value}: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
_DEVICE_EXPECTED = "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"

# Range rules: (dotted key, predicate, what the value must be).
_RULES = [
    ("data.seq_len", lambda v: v >= 2, "at least 2"),
    ("data.val_fraction", lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    ("data.validation", lambda v: v in ("split", "dev"), "'split' or 'dev'"),
    ("data.generated_words", lambda v: v > 0, "positive"),
    ("data.document", lambda v: v in ("file", "line"), "'file' or 'line'"),
    ("student.save_at_words", lambda v: all(w > 0 and w % 1000 == 0 for w in v),
     "a list of positive multiples of 1000 (names are chck_<N>K or chck_<N>M)"),
    ("tokenizer.kind", lambda v: v in ("bpe", "gpt2"), "'bpe' or 'gpt2'"),
    ("tokenizer.vocab_size", lambda v: 260 <= v <= 1_000_000, "between 260 and 1000000"),
    ("tokenizer.min_frequency", lambda v: v >= 1, "at least 1"),
    ("teacher.dtype", lambda v: v in ("fp32", "fp16", "bf16"), "'fp32', 'fp16' or 'bf16'"),
    ("teacher.quantization", lambda v: v in ("none", "4bit", "8bit"), "'none', '4bit' or '8bit'"),
    ("teacher.precision", lambda v: v in ("fp32", "fp16", "bf16"), "'fp32', 'fp16' or 'bf16'"),
    ("teacher.schedule", lambda v: v in ("cosine", "linear", "constant"), "'cosine', 'linear' or 'constant'"),
    ("student.precision", lambda v: v in ("fp32", "fp16", "bf16"), "'fp32', 'fp16' or 'bf16'"),
    ("student.schedule", lambda v: v in ("cosine", "linear", "constant"), "'cosine', 'linear' or 'constant'"),
    ("cache.value_code", lambda v: v in ("float16", "gap8"), "'float16' or 'gap8'"),
    ("cache.k", lambda v: v >= 1, "at least 1"),
    ("cache.selection", lambda v: v in ("topk", "sample", "draws"), "'topk', 'sample' or 'draws'"),
    ("cache.draws", lambda v: all(1 <= m <= 255 for m in v), "a list of draws between 1 and 255"),
    ("cache.sample_temperature", lambda v: v > 0, "positive"),
    ("storage.lease_seconds", lambda v: v >= 1, "at least 1 (seconds)"),
    ("cache.temperatures", lambda v: len(v) >= 1 and all(t > 0 for t in v), "a non-empty list of positive numbers"),
    ("cache.splits", lambda v: len(v) >= 1 and set(v) <= {"train", "val"}, "a list of 'train' and/or 'val'"),
    ("distill.alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("distill.temperature", lambda v: v > 0, "positive"),
    ("distill.k", lambda v: v >= 0, "at least 0 (0: all cached)"),
    ("distill.mode", lambda v: v in ("cached", "online"), "'cached' or 'online'"),
    ("distill.ensemble", lambda v: v in ("probability", "logits"), "'probability' or 'logits'"),
    ("student.architecture", lambda v: v in ARCHITECTURES, " or ".join(map(repr, ARCHITECTURES))),
    ("teacher.architecture", lambda v: v in ARCHITECTURES, " or ".join(map(repr, ARCHITECTURES))),
    ("distill.sweep_alphas", lambda v: all(0 <= a <= 1 for a in v), "a list of values in [0, 1]"),
    ("distill.sweep_temperatures", lambda v: all(t > 0 for t in v), "a list of positive numbers"),
    ("distill.sweep_ks", lambda v: all(k >= 1 for k in v), "a list of positive integers"),
    ("distill.run", lambda v: v == "" or (v not in (".", "..") and "/" not in v
                                          and "\\" not in v and "\0" not in v),
     "a plain folder name (no '/'), or empty to derive it"),
    ("teacher.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("student.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("teacher.device", lambda v: _DEVICE.fullmatch(v) is not None, _DEVICE_EXPECTED),
    ("student.device", lambda v: _DEVICE.fullmatch(v) is not None, _DEVICE_EXPECTED),
    *((key, lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)")
      for key in ("data.seed", "teacher.seed", "student.seed", "cache.sample_seed")),
]
# Positive integers and non-negative numbers, checked by rule rather than one lambda each.
_POSITIVE = [
    "teacher.n_layer", "teacher.n_embd", "teacher.n_head", "teacher.lora_r", "teacher.lora_alpha",
    "teacher.batch_size", "teacher.grad_accum", "cache.chunk_sequences", "cache.shard_chunks",
    "cache.batch_size", "student.n_layer", "student.n_embd", "student.n_head", "student.batch_size",
    "student.grad_accum", "student.shuffle_buffer", "eval.batch_size", "teacher.n_positions",
    "student.n_positions", "teacher.lr", "student.lr",
    "teacher.epochs", "student.epochs",
]
_NON_NEGATIVE = [
    "teacher.max_steps", "teacher.warmup_steps", "teacher.weight_decay", "teacher.grad_clip",
    "teacher.eval_every", "teacher.checkpoint_every", "student.max_steps", "student.warmup_steps",
    "student.weight_decay", "student.grad_clip", "student.eval_every", "student.checkpoint_every",
    "eval.max_pairs_per_file", "student.intermediate_size", "teacher.intermediate_size",
]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML experiment file, apply `key.sub=value` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    pairs = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. student.lr=3e-4)")
        try:
            pairs[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            pairs[key.strip()] = text
    return _build(_merge_overrides(raw, pairs, str(path)), str(path))


def _merge_overrides(raw: dict, pairs: dict, source: str) -> dict:
    merged = json.loads(json.dumps(_plain(raw)))
    for key, value in pairs.items():
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {key}: '{part}' is not a section")
        node[leaf] = value
    return merged


def _build(raw: dict, source: str) -> Config:
    raw = dict(raw)
    raw.pop("source", None)
    raw["teachers"] = _named_teachers(raw, source)
    config = _from_dict(Config, raw, "", source)
    config = dataclasses.replace(config, source=source)
    values = config.to_dict()
    teachers = values.pop("teachers")
    sections = [(values, "")] + [({**values, "teacher": section}, f"teachers.{name}.")
                                 for name, section in teachers.items()]
    rules = [*_RULES, *((key, lambda v: v > 0, "positive") for key in _POSITIVE),
             *((key, lambda v: v >= 0, "at least 0") for key in _NON_NEGATIVE)]
    for key, check, expected in rules:  # teacher rules hold for every named teacher too
        for tree, prefix in sections if key.startswith("teacher.") else sections[:1]:
            _check(tree, key, check, expected, source, prefix)
    _check_ensemble(config, source)
    if config.cache.k > config.tokenizer.vocab_size and config.tokenizer.kind == "bpe":
        raise ConfigError(f"{source}: cache.k = {config.cache.k} is larger than the vocabulary "
                          f"(tokenizer.vocab_size = {config.tokenizer.vocab_size})")
    c = config.cache
    if c.selection == "draws" and c.draws and len(c.draws) != len(c.temperatures):
        raise ConfigError(f"{source}: cache.draws = {list(c.draws)} must give one number of draws "
                          f"for each of cache.temperatures = {list(c.temperatures)}")
    if c.selection == "draws" and c.k > 255 and not c.draws:
        raise ConfigError(f"{source}: cache.k = {c.k} draws: counted draws hold at most 255 per "
                          "temperature")
    if config.distill.k and config.distill.k > config.cache.k:
        raise ConfigError(f"{source}: distill.k = {config.distill.k} is larger than the cached "
                          f"k (cache.k = {config.cache.k})")
    shaped = [("teacher", config.teacher), ("student", config.student),
              *((f"teachers.{name}", section) for name, section in config.teachers.items())]
    for name, section in shaped:
        if section.n_embd % section.n_head:
            raise ConfigError(f"{source}: {name}.n_embd = {section.n_embd} is not divisible by "
                              f"{name}.n_head = {section.n_head}")
        if section.n_positions < config.data.seq_len:
            raise ConfigError(f"{source}: {name}.n_positions = {section.n_positions} is shorter "
                              f"than the training rows (data.seq_len = {config.data.seq_len})")
        if section.batch_size % section.grad_accum:
            raise ConfigError(f"{source}: {name}.batch_size = {section.batch_size} is not divisible "
                              f"by {name}.grad_accum = {section.grad_accum}")
    return config


def _named_teachers(raw: dict, source: str) -> dict:
    """The `teachers:` entries, each the `teacher:` section updated with the entry's settings
    and named by its key (a saved config, whose entries are whole sections, reads the same)."""
    entries = raw.get("teachers") or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"{source}: teachers must be a mapping of names to teacher settings")
    shared = raw.get("teacher") or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"{source}: teacher must be a mapping")
    named = {}
    for name, entry in entries.items():
        name = str(name)
        if not _PLAIN_NAME.fullmatch(name):
            raise ConfigError(f"{source}: teachers.{name}: a teacher's name must be a plain folder "
                              "name (letters, digits, '-', '_', '.')")
        if not isinstance(entry or {}, dict):
            raise ConfigError(f"{source}: teachers.{name} must be a mapping of teacher settings")
        named[name] = {**shared, **(entry or {}), "name": name}
    return named


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_ensemble(config: Config, source: str) -> None:
    """distill.teachers names known teachers (or a cache), has positive weights, and its sweep
    gives each member a weight; the logit-average target needs the teachers themselves."""
    d = config.distill
    for i, member in enumerate(d.teachers):
        where = f"{source}: distill.teachers[{i}]"
        if bool(member.teacher) == bool(member.cache):
            raise ConfigError(f"{where} must name either a teacher or a cache, not "
                              f"{'both' if member.teacher else 'neither'}")
        if member.teacher and member.teacher not in config.teachers:
            known = ", ".join(config.teachers) or "none: add a `teachers:` section"
            raise ConfigError(f"{where}: no teacher named {member.teacher!r} (known: {known})")
        if not member.weight > 0:
            raise ConfigError(f"{where}: weight = {member.weight!r} must be positive")
    labels = [member.label for member in d.teachers]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: distill.teachers lists a teacher twice ({', '.join(labels)})")
    for weights in d.sweep_weights:
        if len(weights) != len(d.teachers) or not all(w > 0 for w in weights):
            raise ConfigError(f"{source}: distill.sweep_weights entry {list(weights)} must give "
                              f"each of the {len(d.teachers)} distill.teachers a positive weight")
    if d.ensemble == "logits" and d.mode == "cached" and len(d.teachers) > 1 and d.alpha < 1:
        raise ConfigError(f"{source}: distill.ensemble = 'logits' needs every teacher logit, which "
                          "a cache does not hold: use distill.ensemble=probability, or "
                          "distill.mode=online")


def _check(values: dict, key: str, check, expected: str, source: str, prefix: str = "") -> None:
    """`prefix`: where a named teacher's settings are (`teachers.<name>.`), for the message."""
    section, leaf = key.split(".")
    value = values[section][leaf]
    if not check(value):
        raise ConfigError(f"{source}: {prefix or section + '.'}{leaf} = {value!r} must be {expected}")


def _from_dict(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' "
                              f"(known: {', '.join(sorted(known - {'source'}))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{prefix}{name}.", source)
        elif typing.get_origin(hint) is dict:  # named sections, or a plain mapping
            section_type = typing.get_args(hint)[1]
            if not isinstance(value or {}, dict):
                raise ConfigError(f"{source}: {prefix}{name} must be a mapping")
            kwargs[name] = {key: _from_dict(section_type, entry, f"{prefix}{name}.{key}.", source)
                            if dataclasses.is_dataclass(section_type) else entry
                            for key, entry in (value or {}).items()}
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return tuple(_coerce(v, item_type, key, source) for v in value)
    if hint is EnsembleMember:  # {teacher: name, weight: w}, {cache: path}, or a name or path
        if isinstance(value, str):
            value = {"cache" if "/" in value or value.endswith(".zarr") else "teacher": value}
        return _from_dict(EnsembleMember, value, f"{key}.", source)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf  # too large is infinite
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key} = {value!r} must be a finite number")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    if hint is int and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{source}: {key} = {value} must fit in 64 bits")
    return value



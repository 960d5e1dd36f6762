"""Tokenizers: GPT-2's byte-level BPE (local folder or hub name), or a byte-level BPE trained on the
train split with the `tokenizers` library. Either is saved to `<run>/tokenizer/` and identified
everywhere by a fingerprint of its serialized form."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import ByteLevelBPETokenizer, processors
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from configs import TokenizerConfig, UserError

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` entries (including `<|endoftext|>`) trained on `texts`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[END_OF_TEXT], show_progress=False)
    return with_special_tokens(PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer))


def gpt2_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from a folder with vocab.json + merges.txt, or from a hub name."""
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "tokenizer.json").is_file() and not (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise UserError(f"tokenizer folder {folder} has neither vocab.json + merges.txt "
                            "nor tokenizer.json")
    elif looks_like_local_path(path):
        raise UserError(f"tokenizer.path {path} does not exist")
    try:
        # The class, not the (vocab_file=, merges_file=) constructor: in transformers 5 that one
        # silently builds an empty tokenizer.
        tokenizer = GPT2TokenizerFast.from_pretrained(path)
    except OSError:
        raise UserError(f"cannot load tokenizer '{path}' (offline, or no such model): set "
                        "tokenizer.path to a local folder with vocab.json and merges.txt") from None
    return with_special_tokens(tokenizer)


def looks_like_local_path(name: str) -> bool:
    """Hub names are 'name' or 'org/name'; anything else that does not exist is a missing path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def with_special_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """`<|endoftext|>` as every special token, and prepended to each text encoded with special
    tokens (the default of `tokenizer(text)`).

    The BOS matters to clients that score a sentence as the tokenizer encodes it: the BabyLM 2025
    pipeline scores tokens 1..n of `tokenizer(sentence)`, so without a BOS the first word would
    never be scored. Packing the corpus and our own scoring encode without special tokens.
    """
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT, "bos_token": END_OF_TEXT,
                                  "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT})
    backend = tokenizer.backend_tokenizer
    bos = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A", pair=f"{END_OF_TEXT} $A {END_OF_TEXT} $B",
        special_tokens=[(END_OF_TEXT, tokenizer.convert_tokens_to_ids(END_OF_TEXT))])
    existing = backend.post_processor  # byte-level offset handling, kept
    backend.post_processor = bos if existing is None else processors.Sequence([existing, bos])
    return tokenizer


def synthetic_tokenizer(vocab_size: int, *, seed: int = 0) -> PreTrainedTokenizerFast:
    """A tokenizer of exactly `vocab_size` entries for token stores whose ids stand for no text
    (benchmarks and tests): `<|endoftext|>` (id 0) and whole words `w1`.. in a seeded order
    (another seed, another tokenizer), set up as every tokenizer here is."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    order = np.random.default_rng(seed).permutation(np.arange(1, vocab_size))
    words = {END_OF_TEXT: 0, **{f"w{word}": int(i) for i, word in enumerate(order, start=1)}}
    backend = Tokenizer(models.WordLevel(words, unk_token=END_OF_TEXT))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return with_special_tokens(PreTrainedTokenizerFast(tokenizer_object=backend))


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    if cfg.kind == "gpt2":
        return gpt2_tokenizer(cfg.path or "gpt2")
    return train_bpe(train_texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's serialized form (vocabulary, merges, normalisation, specials)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def tokenizer_facts(tokenizer: PreTrainedTokenizerFast) -> dict:
    """What a manifest records about the tokenizer."""
    return {"fingerprint": fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id, "name": tokenizer.name_or_path or "trained-bpe"}


def tokenizer_dir(run_path: Path) -> Path:
    return Path(run_path) / "tokenizer"


def load_tokenizer(run_path: Path | str) -> PreTrainedTokenizerFast:
    """The tokenizer saved by the corpus stage in `<run>/tokenizer/`."""
    folder = tokenizer_dir(Path(run_path))
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {folder}: run `make data` first")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))

"""Corpus preparation (`make data`): BabyLM text files -> tokenizer -> train/val token stores.

Reads every `*.train` file of `data.dir` (BabyLM 2023 and 2024 layouts), and splits each file
into train and validation keeping its line order: validation is the last `val_fraction` of every
file's lines, so dialogue stays coherent on both sides. With `data.validation: dev` the official
`*.dev` files are the validation set instead. With `data.dir` empty, the built-in generated
corpus is written to `<run>/corpus/` and used.

Each file is one document: its lines joined by newlines, followed by `<|endoftext|>` (with
`data.document: line`, every line is a document). The document stream is packed into rows of
`seq_len` tokens; the last partial row is dropped. The token store also records the words that
start in each row, for counting words seen exactly.
Outputs: `<run>/tokens/{train,val}.txt` (the combined texts, for inspection),
`<run>/tokenizer/`, `<run>/tokens/{train,val}.zarr` and the resolved config.
"""

from __future__ import annotations

import hashlib
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs import Config, UserError, writing
from configs.cli import run
from storage.location import Remote, locate, upload_folder
from storage.paths import make_folder
from storage.tokens import tokens_fingerprint, write_token_store
from training.tokenizer import build_tokenizer, tokenizer_dir, tokenizer_facts

SPLITS = ("train", "val")


@dataclass(frozen=True)
class SourceFile:
    """One corpus file, decoded, with what the manifest records about it."""

    name: str
    lines: list[str]
    bytes: int
    sha256: str
    replaced: int
    """Invalid UTF-8 sequences decoded as U+FFFD."""

    def facts(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256,
                "lines": len(self.lines), "invalid_utf8_replaced": self.replaced}


def read_source(path: Path) -> SourceFile:
    """Read one text file; invalid UTF-8 is replaced and counted, binary and empty files refused."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise UserError(f"corpus file {path} looks binary (contains NUL bytes)")
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"corpus file {path} is empty")
    return SourceFile(name=path.name, lines=lines, bytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), replaced=replaced)


def find_sources(directory: Path, suffix: str) -> list[SourceFile]:
    try:
        is_folder = stat.S_ISDIR(directory.stat().st_mode)
    except FileNotFoundError:
        raise UserError(f"corpus directory {directory} does not exist") from None
    except OSError as exc:  # a symlink loop, a component that is a file, no permission
        raise UserError(f"corpus directory {directory} cannot be opened: {exc.strerror}") from None
    if not is_folder:
        raise UserError(f"corpus directory {directory} is a file, not a directory")
    paths = sorted(directory.glob(f"*{suffix}"))
    if not paths:
        raise UserError(f"no *{suffix} files in {directory}")
    for path in paths:
        if not path.is_file():
            raise UserError(f"corpus file {path} is not a regular file (a folder, a pipe or a "
                            "broken link)")
    return [read_source(path) for path in paths]


def split_documents(cfg: Config, corpus_dir: Path) -> tuple[dict[str, list[list[str]]], dict]:
    """{split: [document lines, ...]} and the split facts for the manifest."""
    train_files = find_sources(corpus_dir, ".train")
    if cfg.data.validation == "dev":
        dev_dir = Path(cfg.data.dev_dir) if cfg.data.dev_dir else corpus_dir.parent / "dev"
        dev_files = find_sources(dev_dir, ".dev")
        documents = {"train": [f.lines for f in train_files], "val": [f.lines for f in dev_files]}
        rule = {"validation": "dev", "dev_dir": str(dev_dir),
                "dev_files": [f.facts() for f in dev_files]}
    else:
        documents = {"train": [], "val": []}
        for source in train_files:
            n_val = max(1, math.ceil(len(source.lines) * cfg.data.val_fraction))
            if n_val >= len(source.lines):
                raise UserError(f"corpus file {source.name} has {len(source.lines)} line(s): too "
                                "few to split into train and validation")
            documents["train"].append(source.lines[:-n_val])
            documents["val"].append(source.lines[-n_val:])
        rule = {"validation": "split", "val_fraction": cfg.data.val_fraction,
                "rule": "the last val_fraction of each file's non-empty lines is validation"}
    return documents, {"source_files": [f.facts() for f in train_files], "split_rule": rule}


def pack(documents: list[list[str]], tokenizer, seq_len: int
         ) -> tuple[np.ndarray, int, np.ndarray]:
    """Tokenize documents, join them with end-of-text, pack rows of `seq_len`.

    Returns the (N, seq_len) rows, the UTF-8 bytes of the text behind the kept tokens (the
    dropped tail is decoded to subtract its bytes exactly) and (N,) the whitespace-separated
    words starting in each row (a word starts in the row of the token holding its first
    character).
    """
    lines = [line + "\n" for doc in documents for line in doc]
    encodings = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    stream, starts, position = [], [], 0
    for doc in documents:
        for line, encoding in zip(lines[position:position + len(doc)],
                                  encodings[position:position + len(doc)]):
            stream.extend(encoding.ids)
            starts.append(word_starts(line, encoding.offsets))
        stream.append(eos)
        starts.append(np.zeros(1, np.int64))
        position += len(doc)
    tokens = np.asarray(stream, dtype=np.int64)
    n_rows = len(tokens) // seq_len
    if n_rows == 0:
        raise UserError(f"the corpus has {len(tokens)} tokens, fewer than one sequence of "
                        f"seq_len {seq_len}")
    text_bytes = sum(len(line.encode()) for line in lines)
    dropped = tokens[n_rows * seq_len:]
    text_bytes -= len(tokenizer.decode(dropped[dropped != eos].tolist()).encode())
    words = np.concatenate(starts)[:n_rows * seq_len].reshape(n_rows, seq_len).sum(axis=1)
    return tokens[:n_rows * seq_len].reshape(n_rows, seq_len), text_bytes, words


def word_starts(line: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Per token of `line`: how many whitespace-separated words start in it (`str.split`'s
    words; a character split over several byte-level tokens counts in the first)."""
    firsts = [match.start() for match in re.finditer(r"\S+", line)]
    ends = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    owners = np.searchsorted(ends, firsts, side="right")  # the first token ending past it
    return np.bincount(owners, minlength=len(offsets))[:len(offsets)]


def as_documents(documents: list[list[str]], unit: str) -> list[list[str]]:
    """data.document: 'file' keeps each file's lines together; 'line' makes every line a
    document (an `<|endoftext|>` after each)."""
    return documents if unit == "file" else [[line] for doc in documents for line in doc]


def corpus_dir(cfg: Config) -> Path:
    """`data.dir`, or the built-in corpus generated into `<run>/corpus/` when it is empty."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    from precompute.generate import write_corpus, write_minimal_pairs

    out = cfg.run_path / "corpus"
    summary = write_corpus(out, words=cfg.data.generated_words, seed=cfg.data.seed)
    write_minimal_pairs(out / "minimal_pairs", pairs_per_phenomenon=200, seed=cfg.data.seed)
    print(f"data.dir is empty: using the built-in generated corpus ({summary['words']:,} words) "
          f"in {out}")
    return out


def prepare(cfg: Config) -> dict[str, Path | Remote]:
    """Run the whole corpus stage; returns {split: token store path}.

    Everything is computed before anything is written, so a run that fails on bad input leaves
    the outputs of an earlier run as they were.
    """
    source_dir = corpus_dir(cfg)
    documents, facts = split_documents(cfg, source_dir)
    documents = {split: as_documents(docs, cfg.data.document) for split, docs in documents.items()}
    tokenizer = build_tokenizer(cfg.tokenizer, (line for doc in documents["train"] for line in doc))
    packed = {split: pack(documents[split], tokenizer, cfg.data.seq_len) for split in SPLITS}
    # Both stores carry one generation: consumers refuse a train and val of different runs.
    generation = hashlib.sha256("|".join(
        [tokenizer_facts(tokenizer)["fingerprint"]]
        + [tokens_fingerprint(rows) for rows, _, _ in packed.values()]).encode()).hexdigest()
    out = cfg.run_path / "tokens"  # the texts and config.yaml; the stores at cfg.tokens_dir
    make_folder(out)
    tokenizer.save_pretrained(str(tokenizer_dir(cfg.run_path)))
    tokens_dir = locate(cfg.tokens_dir, cfg.storage.options)
    if isinstance(tokens_dir, Remote):  # runs on other machines fetch it from there
        upload_folder(tokenizer_dir(cfg.run_path), tokens_dir / "tokenizer",
                      last="tokenizer.json")
    stores = {}
    for split, (rows, text_bytes, words) in packed.items():
        with writing(out / f"{split}.txt"):
            (out / f"{split}.txt").write_text("\n\n".join("\n".join(doc)
                                                           for doc in documents[split]))
        stores[split] = tokens_dir / f"{split}.zarr"
        store = write_token_store(stores[split], sequences=rows, words=words, manifest={
            "split": split, "generation": generation, "corpus_dir": str(source_dir), **facts,
            "document": cfg.data.document, "tokenizer": tokenizer_facts(tokenizer),
            "text_bytes": text_bytes,
        })
        print(f"{split}: {store.n_sequences:,} sequences x {store.seq_len} tokens, "
              f"{int(words.sum()):,} words ({text_bytes / store.n_sequences / store.seq_len:.2f} "
              f"bytes/token) -> {store.path}")
    cfg.save(out)
    return stores


def main(cfg: Config) -> None:
    prepare(cfg)


if __name__ == "__main__":
    run(main, "Prepare the corpus: split, tokenizer, train/val token stores.")

"""Corpus stage: split, tokenizer, token stores, manifests; bad input ends with exit code 2."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from transformers import GPT2TokenizerFast

from configs import load_config
from precompute.corpus import prepare, read_source
from training.tokenizer import fingerprint, load_tokenizer
from storage.errors import CorruptData, StoreNotFound
from storage.tokens import open_token_store, write_token_store
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def run_corpus(*overrides):
    return subprocess.run([sys.executable, "-m", "precompute.corpus", "--config", str(DEMO),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_babylm_2023_stores_list_sources_and_reproduce(shared_data, tmp_path):
    corpus = shared_data / "babylm" / "2023" / "train_10M"
    result = run_corpus(f"data.dir={corpus}", f"run_dir={tmp_path / 'a'}")
    assert result.returncode == 0, result.stderr
    train = open_token_store(tmp_path / "a" / "tokens" / "train.zarr")
    val = open_token_store(tmp_path / "a" / "tokens" / "val.zarr")
    files = {f["name"]: f for f in train.manifest["source_files"]}
    assert sorted(files) == ["aochildes.train", "cbt.train", "children_stories.train",
                             "switchboard.train"]
    for name, facts in files.items():
        data = (corpus / name).read_bytes()
        assert facts["sha256"] == hashlib.sha256(data).hexdigest()
        assert facts["bytes"] == len(data)
    tokenizer = load_tokenizer(tmp_path / "a")
    assert train.tokenizer_fingerprint == val.tokenizer_fingerprint == fingerprint(tokenizer)
    assert train.manifest["n_sequences"] == train.n_sequences > 15 * val.n_sequences > 0
    assert (tmp_path / "a" / "tokens" / "config.yaml").is_file()

    cfg = load_config(DEMO, [f"data.dir={corpus}", f"run_dir={tmp_path / 'b'}"])
    prepare(cfg)
    again = open_token_store(tmp_path / "b" / "tokens" / "train.zarr")
    assert again.fingerprint == train.fingerprint
    assert again.tokenizer_fingerprint == train.tokenizer_fingerprint


def numbered_corpus(folder):
    """Two files, a.train and b.train, of 100 numbered 5-word lines each."""
    folder.mkdir()
    for source in ("a", "b"):
        (folder / f"{source}.train").write_text(
            "".join(f"{source} line number {i} .\n" for i in range(100)))
    return folder


def test_split_keeps_each_files_order_and_takes_its_tail(tmp_path):
    corpus = numbered_corpus(tmp_path / "corpus")
    cfg = load_config(DEMO, [f"data.dir={corpus}", f"run_dir={tmp_path / 'run'}",
                             "tokenizer.vocab_size=300", "data.seq_len=16"])
    prepare(cfg)
    val_text = (tmp_path / "run" / "tokens" / "val.txt").read_text().split("\n\n")
    assert val_text == ["\n".join(f"{s} line number {i} ." for i in range(95, 100)) for s in "ab"]
    train_text = (tmp_path / "run" / "tokens" / "train.txt").read_text()
    assert train_text.index("a line number 3 .") < train_text.index("a line number 94 .")
    assert "number 95" not in train_text


@pytest.mark.parametrize("document, separators", [("file", 2), ("line", 190)])
def test_documents_are_files_or_lines_and_words_are_counted(tmp_path, document, separators):
    """data.document: an <|endoftext|> after each file, or after each line; either way the
    words starting in the rows add up to the words of the kept text."""
    corpus = numbered_corpus(tmp_path / "corpus")
    cfg = load_config(DEMO, [f"data.dir={corpus}", f"run_dir={tmp_path / 'run'}",
                             "tokenizer.vocab_size=300", "data.seq_len=16",
                             f"data.document={document}"])
    prepare(cfg)
    store = open_token_store(tmp_path / "run" / "tokens" / "train.zarr")
    tokenizer = load_tokenizer(tmp_path / "run")
    rows = store.read(0, store.n_sequences)
    kept = (rows == tokenizer.eos_token_id).sum()
    assert store.manifest["document"] == document and kept in (separators, separators - 1)
    text = tokenizer.decode(rows.ravel().tolist(), skip_special_tokens=True)
    assert store.words_per_row().sum() == len(text.split()) > 5 * 150


def test_gpt2_tokenizer_ids_match_gpt2_tokenizer_fast(shared_data, tmp_path):
    corpus = shared_data / "babylm" / "2024" / "train_10M"
    gpt2_dir = shared_data / "gpt2-tokenizer"
    cfg = load_config(DEMO, [f"data.dir={corpus}", f"run_dir={tmp_path}", "tokenizer.kind=gpt2",
                             f"tokenizer.path={gpt2_dir}", "cache.k=32"])
    prepare(cfg)
    store = open_token_store(tmp_path / "tokens" / "train.zarr")
    assert store.vocab_size == 50257 and store.manifest["dtype"] == "uint16"
    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    first_file = sorted(corpus.glob("*.train"))[0]
    lines = [line.strip() for line in first_file.read_text().splitlines() if line.strip()][:20]
    expected = reference("".join(line + "\n" for line in lines))["input_ids"]
    assert store.read(0, 1)[0].tolist() == expected[:store.seq_len]
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    # Encoded with its special tokens (as the BabyLM 2025 pipeline does), it prepends a BOS.
    assert tokenizer("Hello world")["input_ids"] == [50256, 15496, 995]
    # Words seen are counted exactly: the words starting in each row sum to the words of the
    # kept text (an <|endoftext|> separates like whitespace).
    rows = store.read(0, store.n_sequences).astype(np.int64)
    eos = tokenizer.eos_token_id
    words = store.words_per_row()
    assert words.shape == (store.n_sequences,) and words.sum() == store.manifest["words"]
    assert words.sum() == len(tokenizer.convert_tokens_to_string(
        [tokenizer.convert_ids_to_tokens(int(t)) if t != eos else " " for t in rows.ravel()]
    ).split()) > 100_000


def test_dev_files_as_validation(shared_data, tmp_path):
    root = shared_data / "babylm" / "2024"
    cfg = load_config(DEMO, [f"data.dir={root / 'train_10M'}", f"run_dir={tmp_path}",
                             "data.validation=dev", "tokenizer.vocab_size=512"])
    prepare(cfg)
    val = open_token_store(tmp_path / "tokens" / "val.zarr")
    assert val.manifest["split_rule"]["validation"] == "dev"
    assert [f["name"] for f in val.manifest["split_rule"]["dev_files"]] == ["switchboard.dev"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "x.train"
    path.write_bytes(b"good line\nbad \xff\xfe bytes\n")
    source = read_source(path)
    assert source.replaced == 2
    assert source.lines == ["good line", "bad \ufffd\ufffd bytes"]


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "does not exist"),
    ("no_train_files", "no *.train files"),
    ("empty_file", "is empty"),
    ("unknown_key", "unknown key 'data.sequence_length'"),
    ("negative_seq_len", "data.seq_len = -5 must be at least 2"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, expected):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    overrides = [f"data.dir={corpus}", f"run_dir={tmp_path / 'run'}"]
    if case == "missing_dir":
        overrides[0] = f"data.dir={tmp_path / 'nowhere'}"
    elif case == "no_train_files":
        (corpus / "notes.txt").write_text("not a corpus file\n")
    elif case == "empty_file":
        (corpus / "a.train").write_text("some text here\n" * 50)
        (corpus / "b.train").write_text("\n\n")
    elif case == "unknown_key":
        overrides.append("data.sequence_length=64")
    elif case == "negative_seq_len":
        overrides.append("data.seq_len=-5")
    result = run_corpus(*overrides)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "tokens" / "train.zarr").exists()


def test_unfinished_store_is_not_mistaken_for_a_finished_one(tmp_path):
    manifest = {"tokenizer": {"fingerprint": "f", "vocab_size": 300}}
    rows = np.arange(64, dtype=np.int64).reshape(4, 16)
    store = write_token_store(tmp_path / "t.zarr", sequences=rows, manifest=manifest)
    assert np.array_equal(store.read(1, 3), rows[1:3])
    (tmp_path / "u.zarr.partial").mkdir()
    with pytest.raises(StoreNotFound, match="unfinished"):
        open_token_store(tmp_path / "u.zarr")


def test_a_hand_edited_token_manifest_is_refused(tmp_path):
    manifest = {"tokenizer": {"fingerprint": "f", "vocab_size": 300}}
    rows = np.arange(64, dtype=np.int64).reshape(4, 16)
    write_token_store(tmp_path / "t.zarr", sequences=rows, manifest=manifest)
    meta_file = tmp_path / "t.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["manifest"]["tokenizer"]["vocab_size"] = 30
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptData, match="manifest was edited"):
        open_token_store(tmp_path / "t.zarr")
    verify = subprocess.run([sys.executable, "-m", "storage", "verify", str(tmp_path / "t.zarr")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 2 and "manifest was edited" in verify.stderr, verify


def test_stores_of_two_corpus_runs_side_by_side_are_refused(tmp_path):
    """A rerun of `make data` with another vocabulary killed after writing train.zarr: the new
    tokenizer and train store beside the old val store. Training and evaluation refuse it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.train").write_text("".join(f"the child saw {i} red balls .\n"
                                            for i in range(400)))
    runs = {}
    for name, vocab in (("old", 300), ("new", 320)):
        runs[name] = tmp_path / name
        prepare(load_config(DEMO, [f"data.dir={corpus}", f"run_dir={runs[name]}",
                                   f"tokenizer.vocab_size={vocab}", "data.seq_len=16"]))
    settings = [f"run_dir={runs['old']}", "data.seq_len=16", "student.device=cpu",
                "distill.alpha=1", "student.max_steps=2"]
    from student.train import train
    train(load_config(DEMO, settings))  # a finished CE student of the old run, to evaluate
    mixed = runs["old"]
    for part in ("tokenizer", "tokens/train.zarr"):
        shutil.rmtree(mixed / part)
        shutil.copytree(runs["new"] / part, mixed / part)
    for module in ("student.train", "student.evaluate"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--config", str(DEMO), *settings,
             "distill.run=again"], cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, (module, result.stderr[-2000:])
        assert "different `make data` runs" in lines[0], lines

"""LM metrics and minimal-pair scoring against independent, by-hand computations."""

import json
import math

import numpy as np
import pytest
import torch

from training.tokenizer import train_bpe
from storage.tokens import write_token_store
from student.evaluate import (CONVENTIONS, encode, read_pair_dir, read_pair_file, read_suites,
                              score_pairs, sentence_logprobs, sequence_logprobs)
from training.models import new_model
from training.scoring import lm_metrics

TEXT = ("the cat sat on the mat . the dog ran to the park . a bird sang in the tree . "
        "we like to play with the ball . she gave him a red apple . ") * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    return new_model(vocab_size=len(tokenizer), n_positions=64, n_layer=2, n_embd=32, n_head=2,
                     seed=1).eval()


def _store(path, rows: np.ndarray, vocab_size: int, text_bytes: int | None = None):
    manifest = {"tokenizer": {"vocab_size": vocab_size, "fingerprint": "test"}}
    if text_bytes is not None:
        manifest["text_bytes"] = text_bytes
    return write_token_store(path, sequences=rows, manifest=manifest, chunk_rows=4)


def test_uniform_model_has_perplexity_equal_to_vocabulary(tmp_path):
    vocab = 500
    model = new_model(vocab_size=vocab, n_positions=16, n_layer=2, n_embd=32, n_head=2).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    rows = np.random.default_rng(0).integers(0, vocab, size=(10, 16))
    metrics = lm_metrics(model, _store(tmp_path / "val.zarr", rows, vocab), batch_size=3)
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert metrics["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert metrics["tokens"] == 10 * 15  # the first token of each row is not scored
    assert metrics["bits_per_byte"] is None  # no text_bytes in the manifest


def test_bits_per_byte_matches_a_hand_computation(tmp_path, tokenizer, model):
    text = TEXT[:400]
    ids = tokenizer(text)["input_ids"]
    seq_len = 12
    rows = np.array(ids[:len(ids) // seq_len * seq_len]).reshape(-1, seq_len)
    text_bytes = len(tokenizer.decode(rows.ravel().tolist()).encode())
    store = _store(tmp_path / "val.zarr", rows, len(tokenizer), text_bytes)

    nats = 0.0
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor(row[None], dtype=torch.long)).logits[0]
            logp = torch.log_softmax(logits, -1)
            nats -= sum(logp[t - 1, row[t]].item() for t in range(1, seq_len))
    scored = rows.shape[0] * (seq_len - 1)
    by_hand = nats / math.log(2) / (scored * text_bytes / rows.size)

    metrics = lm_metrics(model, store, batch_size=4)
    assert metrics["bits_per_byte"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["loss"] == pytest.approx(nats / scored, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nats / scored), rel=1e-5)


def test_store_from_another_vocabulary_is_refused(tmp_path, model):
    rows = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(Exception, match="vocabulary"):
        lm_metrics(model, _store(tmp_path / "v.zarr", rows, 5000))


def test_sentence_logprobs_equal_a_direct_computation(tokenizer, model):
    sentences = ["the cat sat on the mat .", "a bird", "we like to play with the ball . she gave",
                 "the", "dog ran to the park . a bird sang in the tree ."]
    batched = sentence_logprobs(model, tokenizer, sentences, batch_size=2)  # padded batches
    bos = tokenizer.bos_token_id
    for sentence, score in zip(sentences, batched):
        ids = torch.tensor([[bos, *tokenizer(sentence, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        direct = logp.gather(-1, ids[0, 1:, None]).sum().item()
        assert score == pytest.approx(direct, abs=1e-4)
    assert np.all(batched < 0)


def _write_jsonl(path, items):
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n"
                            for item in items))
    return path


def test_four_pair_file_has_known_accuracy(tmp_path, tokenizer, model):
    # A sentence that extends another by whole words has a strictly lower log-probability
    # (every extra token adds log p < 0), so the shorter side always wins.
    pairs = [("the cat", "the cat sat on the mat", True),
             ("a bird sang", "a bird sang in the tree", True),
             ("we like", "we like to play", True),
             ("she gave him a red apple", "she gave", False)]
    path = _write_jsonl(tmp_path / "lengths.jsonl", [
        {"sentence_good": g, "sentence_bad": b, "field": "morphology" if i < 2 else "syntax",
         "UID": "lengths", "pairID": str(i)} for i, (g, b, _) in enumerate(pairs)])
    result = score_pairs(model, tokenizer, [read_pair_file(path)], batch_size=3)["ours"]
    entry = result["files"]["lengths"]
    assert (entry["pairs"], entry["correct"], entry["ties"]) == (4, 3, 0)
    assert entry["accuracy"] == 0.75 == result["macro_accuracy"]
    assert result["fields"] == {"morphology": 1.0, "syntax": 0.5}


def test_tie_counts_wrong_in_ours_right_in_the_other_conventions(tmp_path, tokenizer, model):
    path = _write_jsonl(tmp_path / "tie.jsonl", [
        {"sentence_good": "the dog ran", "sentence_bad": "the dog ran", "pair_id": 7},
        {"sentence_good": "the dog", "sentence_bad": "the dog ran to the park", "pair_id": 8}])
    results = score_pairs(model, tokenizer, [read_pair_file(path)])
    assert set(results) == set(CONVENTIONS)
    entry = results["ours"]["files"]["tie"]
    assert (entry["correct"], entry["ties"], entry["accuracy"]) == (1, 1, 0.5)
    assert entry["tie_ids"] == [7]
    for convention in ("lm_eval", "babylm2025"):
        entry = results[convention]["files"]["tie"]
        assert (entry["correct"], entry["ties"], entry["accuracy"]) == (2, 1, 1.0)


def test_each_convention_scores_the_tokens_its_scorer_does(tokenizer, model):
    """ours: BOS + sentence; lm_eval: BOS + " " + sentence; babylm2025: the tokenizer's own
    encoding (ours prepends BOS), every token after the first scored."""
    sentences = ["the cat sat on the mat .", "a bird"]
    bos = tokenizer.bos_token_id
    plain = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    assert encode(tokenizer, sentences, "ours") == [(bos, *ids) for ids in plain]
    assert encode(tokenizer, sentences, "lm_eval") == [(bos, *ids) for ids in spaced]
    assert encode(tokenizer, sentences, "babylm2025") == encode(tokenizer, sentences, "ours")
    assert spaced[0] != plain[0]  # the leading space is its own byte-level token or merged
    direct = [sequence_logprobs(model, [ids])[0] for ids in encode(tokenizer, sentences, "lm_eval")]
    assert sentence_logprobs(model, tokenizer, sentences, convention="lm_eval") == \
        pytest.approx(direct, abs=1e-4)


def test_a_folder_of_folders_is_one_suite_each(tmp_path):
    for suite in ("blimp", "supplement"):
        (tmp_path / suite).mkdir()
        _write_jsonl(tmp_path / suite / "a.jsonl", [{"sentence_good": "x y", "sentence_bad": "y x"}])
    assert list(read_suites(tmp_path)) == ["blimp", "supplement"]
    assert list(read_suites(tmp_path / "blimp")) == ["blimp"]


def test_malformed_lines_are_reported_with_file_and_line_and_skipped(tmp_path, tokenizer, model):
    path = _write_jsonl(tmp_path / "broken.jsonl", [
        {"sentence_good": "the cat", "sentence_bad": "the cat sat"},
        '{"sentence_good": "the dog", "sentence_bad": ',  # truncated JSON
        {"sentence_good": "a bird"},                      # no bad sentence
        "[1, 2]",                                         # not an object
        "",                                               # blank: ignored, not malformed
        {"sentence_good": "we like", "sentence_bad": ""},
        {"sentence_good": "she gave", "sentence_bad": "she gave him"}])
    parsed = read_pair_file(path)
    assert len(parsed.pairs) == 2
    assert [line.split(": ")[0] for line in parsed.malformed] == [
        f"{path}:2", f"{path}:3", f"{path}:4", f"{path}:6"]
    assert "sentence_bad" in parsed.malformed[1]
    assert score_pairs(model, tokenizer, [parsed])["ours"]["files"]["broken"]["pairs"] == 2


def test_both_pair_id_spellings_and_max_pairs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"sentence_good": "x y", "sentence_bad": "y x", "pairID": "p1"},
                                      {"sentence_good": "x z", "sentence_bad": "z x", "pair_id": 2},
                                      {"sentence_good": "x w", "sentence_bad": "w x"}])
    _write_jsonl(folder / "b.jsonl", [{"sentence_good": "a b", "sentence_bad": "b a"}] * 5)
    files = read_pair_dir(folder)
    assert [p.pair_id for p in files[0].pairs] == ["p1", 2, 3]  # line number when neither given
    assert [len(f.pairs) for f in read_pair_dir(folder, max_pairs_per_file=2)] == [2, 2]


def test_reads_the_real_blimp_folders_without_malformed_lines(shared_data):
    for name in ("blimp_filtered", "supplement_filtered"):
        folder = shared_data / "blimp" / name
        files = read_pair_dir(folder, max_pairs_per_file=50)
        assert len(files) == len(list(folder.glob("*.jsonl")))
        assert all(not f.malformed and 0 < len(f.pairs) <= 50 for f in files)
    assert files[0].pairs[0].field is None  # the supplement has no `field`


def test_a_pair_longer_than_the_context_is_left_out_and_reported(tmp_path, tokenizer, capsys):
    short_model = new_model(vocab_size=len(tokenizer), n_positions=8, n_layer=1, n_embd=16,
                            n_head=2, seed=1).eval()
    long = "the cat sat on the mat . the dog ran to the park"
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"sentence_good": "the cat", "sentence_bad": "the cat sat on", "pair_id": 1},
        {"sentence_good": long, "sentence_bad": long + " .", "pair_id": 2}])
    result = score_pairs(short_model, tokenizer, [read_pair_file(path)])["ours"]
    entry = result["files"]["mixed"]
    assert (entry["pairs"], entry["correct"], entry["too_long"]) == (1, 1, 1)
    assert result["too_long"] == 1 and result["pairs"] == 1
    assert "mixed: 1 pair(s) longer than the model's context" in capsys.readouterr().out

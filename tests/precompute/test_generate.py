"""The built-in demo corpus: determinism, size, registers, agreement, minimal pairs, speed, CLI."""

import collections
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precompute import generate as g

REPO = Path(__file__).resolve().parents[2]
BLIMP_KEYS = {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pair_id"}
BASE_ONLY = {v.base for v in g.VERBS} - {f for v in g.VERBS for f in (v.s3, v.past, v.part)}
S3_ONLY = {v.s3 for v in g.VERBS} - {v.base for v in g.VERBS}
SINGULAR = {n.sg for n in g.NOUNS}
PLURAL = {n.pl for n in g.NOUNS}
ADJECTIVES = {a for a, _ in g.ADJECTIVES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 200k-word corpus and 200 pairs per phenomenon, generated once for the module."""
    out = tmp_path_factory.mktemp("demo")
    summary = g.write_corpus(out, words=200_000, seed=3)
    g.write_minimal_pairs(out / "minimal_pairs", pairs_per_phenomenon=200, seed=3)
    return out, summary


def words_of(text: str) -> list[str]:
    """Whitespace tokens without speaker tags, lowercased, punctuation and quotes stripped."""
    return [w.strip('.,!?"').lower() for w in text.split() if not w.startswith("*")]


def read_pairs(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("*.jsonl"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        g.write_corpus(tmp_path / name, words=5_000, seed=seed)
        g.write_minimal_pairs(tmp_path / name / "mp", pairs_per_phenomenon=20, seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + len(g.PHENOMENA)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes(), rel
    assert not list(tmp_path.rglob("*.partial"))


def test_word_count_near_request_and_summary_matches_files(corpus):
    out, summary = corpus
    assert set(summary["files"]) == {"child_speech.train", "stories.train"}
    assert abs(summary["words"] - 200_000) / 200_000 < 0.01
    for name, info in summary["files"].items():
        text = (out / name).read_text(encoding="utf-8")
        assert len(text.split()) == info["words"]
        assert text.count("\n") == info["lines"]
        assert "" not in text.splitlines()
    assert sum(f["lines"] for f in summary["files"].values()) == summary["lines"]


def test_registers_have_their_shape(corpus):
    out, _ = corpus
    speech = (out / "child_speech.train").read_text().splitlines()
    stories = (out / "stories.train").read_text().splitlines()
    assert all(re.match(r"\*(MOT|FAT|CHI): [A-Z]", line) for line in speech)
    assert sum(line.startswith("*CHI:") for line in speech) > len(speech) / 5
    speech_words = sum(len(line.split()) for line in speech) / len(speech)
    story_sentences = [len(re.findall(r'[.?!]"?(?: |$)', line)) for line in stories]
    assert speech_words < 10 and min(story_sentences) >= 4
    assert sum(words_of(" ".join(stories)).count(w) for w in ("was", "were")) > len(stories)


def test_every_corpus_word_is_in_the_vocabulary_and_frequencies_are_zipf_like(corpus):
    out, _ = corpus
    counts = collections.Counter(words_of(" ".join(p.read_text() for p in out.glob("*.train"))))
    vocabulary = g.vocabulary()
    assert set(counts) <= vocabulary, set(counts) - vocabulary
    assert 300 < len(vocabulary) < 1000 and len(counts) > 0.8 * len(vocabulary)
    # Zipf: the frequency-rank slope in log-log space is near -1.
    ranked = [c for _, c in counts.most_common()]
    ranks = range(10, min(len(ranked), 300))
    slope = (math.log(ranked[ranks[-1]]) - math.log(ranked[10])) / (math.log(ranks[-1]) - math.log(10))
    assert -2.0 < slope < -0.7


def test_generated_clauses_agree_with_their_head_noun_not_the_attractor():
    rng = random.Random(0)
    pronoun_agr = {word: agr for word, agr, *_ in g.PRONOUNS}
    modified = 0
    for _ in range(3000):
        clause = g.simple_clause(rng)
        verb = clause.words[clause.verb_at]
        assert verb in ({v.s3 for v in g.VERBS} if clause.agr == "3sg" else {v.base for v in g.VERBS})
        subject = clause.words[:clause.verb_at]
        nouns = [w for w in subject if w in SINGULAR | PLURAL]
        if subject[0] in pronoun_agr:
            assert pronoun_agr[subject[0]] == clause.agr
        elif nouns:  # the first noun is the head, any later one is inside a PP or relative clause
            assert (nouns[0] in PLURAL) == (clause.agr == "pl"), subject
            modified += len(nouns) > 1 and (nouns[1] in PLURAL) != (nouns[0] in PLURAL)
    assert modified > 50  # attractors of the other number do occur


def agreement_errors(words: list[str], checked: collections.Counter) -> list[tuple]:
    """Article, demonstrative and pronoun-verb agreement errors in one sentence's words."""
    errors = []
    for i, (first, second) in enumerate(zip(words, words[1:])):
        if i and words[i - 1] in ("does", "do", "did", "is", "are"):
            continue  # a question: "does he see it?"
        noun = words[i + 2] if second in ADJECTIVES and i + 2 < len(words) else second
        if first in ("a", "an"):
            checked["article"] += 1
            if (first == "an") != (second[0] in "aeiou"):
                errors.append((first, second))
        elif first in ("this", "these", "those"):
            checked["determiner"] += 1
            if noun not in (PLURAL if first != "this" else SINGULAR):
                errors.append((first, second, noun))
        elif first in ("he", "she", "it"):
            checked["3sg"] += 1
            if second in BASE_ONLY | {"don't", "do", "are", "were", "have"}:
                errors.append((first, second))
        elif first in ("i", "we", "they"):
            checked["non-3sg"] += 1
            if second in S3_ONLY | {"doesn't", "does", "is", "has"}:
                errors.append((first, second))
    return errors


def test_corpus_has_no_agreement_errors(corpus):
    out, _ = corpus
    text = " ".join(p.read_text() for p in out.glob("*.train"))
    checked = collections.Counter()
    errors = [e for part in re.split(r"[.?!]", text) for e in agreement_errors(words_of(part), checked)]
    assert not errors, errors[:10]
    assert min(checked.values()) > 200, checked
    assert agreement_errors(words_of("They runs to this dogs and an cat"), checked) == [
        ("they", "runs"), ("this", "dogs", "dogs"), ("an", "cat")]


def test_minimal_pairs_are_blimp_shaped_and_differ_in_one_word(corpus):
    out, _ = corpus
    pairs = read_pairs(out / "minimal_pairs")
    assert set(pairs) == set(g.PHENOMENA) and len(pairs) >= 5
    for uid, items in pairs.items():
        assert len(items) == 200
        assert [p["pair_id"] for p in items] == list(range(200))
        assert len({p["sentence_good"] for p in items}) == 200
        for p in items:
            assert set(p) == BLIMP_KEYS and p["UID"] == uid
            good, bad = p["sentence_good"].split(), p["sentence_bad"].split()
            assert len(good) == len(bad)
            assert sum(a != b for a, b in zip(good, bad)) == 1, p
            assert p["sentence_good"][0].isupper() and p["sentence_good"][-1] in ".?"


def test_bad_sentences_never_occur_in_the_corpus(corpus):
    out, _ = corpus
    sentences = {line.split(": ", 1)[1] for line in (out / "child_speech.train").read_text().splitlines()}
    for paragraph in (out / "stories.train").read_text().splitlines():
        sentences.update(re.split(r"(?<=[.?!]) ", paragraph))
    pairs = [p for items in read_pairs(out / "minimal_pairs").values() for p in items]
    assert not [p["sentence_bad"] for p in pairs if p["sentence_bad"] in sentences]
    assert any(p["sentence_good"] in sentences for p in pairs)  # same grammar, same surface form


def trigram_scorer(text: str):
    """Interpolated add-2 word trigram model over the corpus (speaker tags dropped)."""
    tokens = []
    for line in text.splitlines():
        tokens += ["<s>"] + [w for w in line.split() if not w.startswith("*")]
    uni = collections.Counter(tokens)
    bi = collections.Counter(zip(tokens, tokens[1:]))
    tri = collections.Counter(zip(tokens, tokens[1:], tokens[2:]))

    def score(sentence: str) -> float:
        w = ["<s>", "<s>"] + sentence.split()
        total = 0.0
        for a, b, c in zip(w, w[1:], w[2:]):
            p1 = (uni[c] + 1) / (len(tokens) + len(uni))
            p2 = (bi[(b, c)] + 2 * p1) / (uni[b] + 2)
            total += math.log((tri[(a, b, c)] + 2 * p2) / (bi[(a, b)] + 2))
        return total
    return score


def test_a_model_of_the_corpus_prefers_the_good_sentences(corpus):
    """Local contrasts are learnable even by a trigram model; attractor contrasts are not (a
    trigram sees 'the cats runs'), which is what makes depth matter on this corpus."""
    out, _ = corpus
    score = trigram_scorer("\n".join(p.read_text() for p in sorted(out.glob("*.train"))))
    accuracy = {uid: sum(score(p["sentence_good"]) > score(p["sentence_bad"]) for p in items)
                / len(items) for uid, items in read_pairs(out / "minimal_pairs").items()}
    local = ["subject_verb_agreement", "copula_agreement", "determiner_noun_agreement",
             "indefinite_article", "negation_auxiliary", "question_auxiliary"]
    assert all(accuracy[uid] > 0.65 for uid in local), accuracy  # chance: 0.5 +- 0.035
    assert accuracy["agreement_across_pp"] < 0.6, accuracy


def test_300k_words_generate_fast(tmp_path):
    start = time.perf_counter()
    summary = g.write_corpus(tmp_path, words=300_000, seed=0)
    assert time.perf_counter() - start < 30
    assert summary["words"] >= 300_000


def test_cli_writes_corpus_and_pairs_and_rejects_bad_sizes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "precompute.generate", str(tmp_path / "out"),
                         "--words", "3000", "--pairs", "10", "--seed", "1"],
                        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.train")) == \
        ["child_speech.train", "stories.train"]
    g.write_corpus(tmp_path / "here", words=3000, seed=1)  # another process, another hash seed
    for name in ("child_speech.train", "stories.train"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    assert len(list((tmp_path / "out" / "minimal_pairs").glob("*.jsonl"))) == len(g.PHENOMENA)
    bad = subprocess.run([sys.executable, "-m", "precompute.generate", str(tmp_path / "x"),
                          "--words", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1

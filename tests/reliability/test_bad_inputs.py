"""The bad-input catalogue: user mistakes tried through the public CLIs, each ending with exit
code 2, exactly one message line on stderr (progress bars aside), no traceback, the expected
words, and every file that was there before byte-identical afterwards.

The cases run as real processes, two at a time, in one session fixture; each parametrised test
then checks its own case. The same run renders the catalogue (mistake | command | message), and
a test checks that the committed docs/bad-inputs.md is exactly that, so the user-facing table is
always the tested one. After changing a case or a message, regenerate it with
`BABYLM_KD_WRITE_DOCS=1 python -m pytest tests/reliability/test_bad_inputs.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.precompute.tiny_teacher import save_teacher, write_tokens
from training.tokenizer import fingerprint, load_tokenizer, synthetic_tokenizer
from tests.reliability.world import PYTHON, REPO, VOCAB, World, cli, message_lines, snapshot

DOC = REPO / "docs" / "bad-inputs.md"
BEGIN, END = "<!-- user mistakes: begin -->", "<!-- user mistakes: end -->"
GOOD_LINES = "".join(f"the child saw {i} red balls on the floor .\n" for i in range(60))


# ------------------------------------------------------------------------------ case set-ups
# Each takes (case directory, world) and prepares CASE/ (the run directory is CASE/run).

def nothing(case: Path, world: World) -> None:
    (case / "run").mkdir()


def tokens(case: Path, world: World) -> None:
    world.new_run(case / "run")


def cache(case: Path, world: World) -> None:
    tokens(case, world)
    shutil.copytree(world.clean_cache, case / "run" / "cache" / "train.zarr")


def corpus(**files: bytes) -> Callable[[Path, World], None]:
    def setup(case: Path, world: World) -> None:
        nothing(case, world)
        (case / "corpus").mkdir()
        for name, data in files.items():
            (case / "corpus" / name.replace("_train", ".train")).write_bytes(data)
    return setup


def both(*setups) -> Callable[[Path, World], None]:
    def setup(case: Path, world: World) -> None:
        for step in setups:
            step(case, world)
    return setup


def flip_byte(relative: str) -> Callable[[Path, World], None]:
    def setup(case: Path, world: World) -> None:
        path = case / "run" / relative
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return setup


def write(relative: str, text: str) -> Callable[[Path, World], None]:
    def setup(case: Path, world: World) -> None:
        path = case / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return setup


def mkdir(relative: str) -> Callable[[Path, World], None]:
    return lambda case, world: (case / relative).mkdir(parents=True)


def other_teacher(case: Path, world: World) -> None:
    save_teacher(case / "other-teacher", vocab=VOCAB, n_layer=2, n_embd=32, n_head=2, seed=9)


def store_of(**kwargs) -> Callable[[Path, World], None]:
    """Replace the run's train token store with another one (other vocabulary, length, rows),
    recorded as made with the run's tokenizer."""
    def setup(case: Path, world: World) -> None:
        shutil.rmtree(case / "run" / "tokens" / "train.zarr", ignore_errors=True)
        made_with = fingerprint(load_tokenizer(case / "run"))
        write_tokens(case / "run" / "tokens" / "train.zarr", tokenizer_fingerprint=made_with,
                     **kwargs)
    return setup


def run_teacher_with_other_tokenizer(case: Path, world: World) -> None:
    save_teacher(case / "run" / "teacher", vocab=VOCAB, n_layer=2, n_embd=32, n_head=2)
    (case / "run" / "teacher" / "teacher.json").write_text(
        json.dumps({"tokenizer_fingerprint": "f" * 64}))


def run_teacher(case: Path, world: World) -> None:
    """A complete teacher folder, as a user may place one (no teacher.json)."""
    folder = save_teacher(case / "run" / "teacher", vocab=VOCAB, n_layer=2, n_embd=32, n_head=2)
    synthetic_tokenizer(VOCAB).save_pretrained(str(folder))


def edit_cache_manifest(case: Path, world: World) -> None:
    path = case / "run" / "cache" / "train.zarr" / "zarr.json"
    root = json.loads(path.read_text())
    root["attributes"]["manifest"]["k"] = 4  # a hand edit: the stored sha256 no longer matches
    path.write_text(json.dumps(root))


# ------------------------------------------------------------------------------ the catalogue

@dataclass(frozen=True)
class Case:
    id: str
    mistake: str
    module: str
    """`python -m` module; for `storage` the first argument is the subcommand."""
    args: tuple[str, ...]
    """Placeholders: {config} tiny.yaml, {run} CASE/run, {case} CASE, {teacher} the teacher."""
    expect: str
    """Words the one error line must contain."""
    setup: Callable[[Path, World], None] = field(default=tokens, compare=False)
    bug: str = ""
    """A known bug in someone else's code that makes this case fail (strict xfail until fixed)."""


def config(*overrides: str) -> tuple[str, ...]:
    return ("--config", "{config}", "run_dir={run}", *overrides)


CORPUS = "data.dir={case}/corpus"
CORPUS_CASES = [
    Case("corpus-dir-missing", "corpus folder does not exist", "precompute.corpus",
         config("data.dir={case}/nowhere"), "does not exist", nothing),
    Case("corpus-no-train-files", "corpus folder has no *.train files", "precompute.corpus",
         config(CORPUS), "no *.train files", corpus(notes_txt=b"not a corpus\n")),
    Case("corpus-empty-file", "an empty corpus file", "precompute.corpus", config(CORPUS),
         "is empty", corpus(a_train=GOOD_LINES.encode(), b_train=b"\n\n  \n")),
    Case("corpus-binary-file", "a binary file named *.train", "precompute.corpus",
         config(CORPUS), "looks binary",
         corpus(a_train=GOOD_LINES.encode(), b_train=bytes(range(256)) * 8)),
    Case("corpus-one-line", "a one-line file cannot be split into train and validation",
         "precompute.corpus", config(CORPUS), "too few to split",
         corpus(a_train=GOOD_LINES.encode(), b_train=b"just one line\n")),
    Case("corpus-too-short", "corpus shorter than one sequence", "precompute.corpus",
         config(CORPUS, "data.seq_len=100000", "teacher.n_positions=100000",
                "student.n_positions=100000"), "fewer than one sequence",
         corpus(a_train=GOOD_LINES.encode())),
    Case("dev-folder-missing", "validation from *.dev files, but there is no dev folder",
         "precompute.corpus", config(CORPUS, "data.validation=dev"), "does not exist",
         corpus(a_train=GOOD_LINES.encode())),
    Case("gpt2-tokenizer-missing", "GPT-2 tokenizer path does not exist", "precompute.corpus",
         config(CORPUS, "tokenizer.kind=gpt2", "tokenizer.path={case}/gpt2"), "does not exist",
         corpus(a_train=GOOD_LINES.encode())),
    Case("gpt2-tokenizer-empty", "GPT-2 tokenizer folder without vocab.json/merges.txt",
         "precompute.corpus", config(CORPUS, "tokenizer.kind=gpt2", "tokenizer.path={case}/gpt2"),
         "neither vocab.json", both(corpus(a_train=GOOD_LINES.encode()), mkdir("gpt2"))),
]
CONFIG_CASES = [
    Case("config-missing", "config file does not exist", "precompute.corpus",
         ("--config", "{case}/nope.yaml", "run_dir={run}"), "config file not found", nothing),
    Case("config-not-yaml", "config file is not valid YAML", "precompute.corpus",
         ("--config", "{case}/bad.yaml", "run_dir={run}"), "not valid YAML",
         both(nothing, write("bad.yaml", "student: [unclosed\n"))),
    Case("unknown-key", "misspelt config key", "precompute.corpus", config("cache.kk=8"),
         "unknown key 'cache.kk'", nothing),
    Case("wrong-type", "a word where a number belongs", "precompute.corpus",
         config("student.lr=fast"), "student.lr must be float", nothing),
    Case("wrong-bool", "'maybe' for a true/false key", "precompute.corpus",
         config("distill.skip_bad_shards=maybe"), "must be true or false", nothing),
    Case("section-not-mapping", "a whole section replaced by a number", "precompute.corpus",
         config("student=3"), "student must be a mapping", nothing),
    Case("override-no-equals", "override without '='", "precompute.corpus",
         config("student.lr"), "is not of the form key=value", nothing),
    Case("alpha-out-of-range", "alpha outside [0, 1]", "precompute.corpus",
         config("distill.alpha=1.5"), "distill.alpha = 1.5 must be in [0, 1]", nothing),
    Case("temperature-zero", "temperature = 0", "precompute.corpus",
         config("distill.temperature=0"), "distill.temperature = 0.0 must be positive", nothing),
    Case("temperature-negative", "temperature < 0", "precompute.corpus",
         config("distill.temperature=-2"), "distill.temperature = -2.0 must be positive", nothing),
    Case("cache-temperature-zero", "a cached temperature of 0", "precompute.corpus",
         config("cache.temperatures=[1, 0]"), "non-empty list of positive numbers", nothing),
    Case("draws-not-per-temperature", "counted draws not given for each cached temperature",
         "precompute.corpus", config("cache.selection=draws", "cache.temperatures=[1, 2]",
                                     "cache.draws=[16, 48, 8]"),
         "must give one number of draws for each of cache.temperatures", nothing),
    Case("draws-above-255", "more counted draws than a count holds", "precompute.corpus",
         config("cache.selection=draws", "cache.temperatures=[2]", "cache.draws=[300]"),
         "a list of draws between 1 and 255", nothing),
    Case("k-above-bpe-vocab", "cache.k larger than the BPE vocabulary", "precompute.corpus",
         config("cache.k=5000"), "larger than the vocabulary", nothing),
    Case("distill-k-above-cache-k", "distill.k larger than the cached k", "precompute.corpus",
         config("distill.k=64"), "larger than the cached k", nothing),
    Case("heads-do-not-divide", "n_embd not divisible by n_head", "precompute.corpus",
         config("student.n_head=3"), "not divisible by student.n_head", nothing),
]
LOGITS_CASES = [
    Case("no-token-store", "teacher logits before `make data`", "precompute.logits", config(),
         "no token store", nothing),
    Case("teacher-folder-missing", "teacher folder does not exist", "precompute.logits",
         config("teacher.model={case}/missing"), "does not exist"),
    Case("teacher-folder-empty", "teacher folder holds no model", "precompute.logits",
         config("teacher.model={case}/empty"), "no", both(tokens, mkdir("empty"))),
    Case("teacher-hub-offline", "hub model name while offline", "precompute.logits",
         config("teacher.model=no-such-org/no-such-model"), "offline"),
    Case("teacher-from-scratch-untrained", "from_scratch teacher that was never trained",
         "precompute.logits", config("teacher.from_scratch=true"), "run `make teacher` first"),
    Case("adapter-not-an-adapter", "LoRA adapter folder without an adapter", "precompute.logits",
         config("teacher.adapter={case}/adapter"), "adapter", both(tokens, mkdir("adapter"))),
    Case("k-above-teacher-vocab", "cache.k larger than the teacher's vocabulary (GPT-2 "
         "tokenizer: no config-time check)", "precompute.logits",
         config("tokenizer.kind=gpt2", "cache.k=300"), "larger than the teacher's vocabulary"),
    Case("teacher-vocab-mismatch", "token store made with another vocabulary than the teacher's",
         "precompute.logits", config(), "vocabulary of 256 tokens",
         both(tokens, store_of(n=32, vocab=300))),
    Case("rows-longer-than-context", "sequences longer than the teacher's context",
         "precompute.logits", config(), "longer than the teacher's context",
         both(tokens, store_of(n=32, vocab=VOCAB, seq_len=64))),
    Case("teacher-other-tokenizer", "run's teacher trained with another tokenizer",
         "precompute.logits", config("teacher.from_scratch=true"), "another tokenizer",
         both(tokens, run_teacher_with_other_tokenizer)),
    Case("cache-from-other-teacher", "existing cache made by another teacher",
         "precompute.logits", config("teacher.model={case}/other-teacher"),
         "was made with other settings", both(cache, other_teacher)),
    Case("cache-other-k", "existing cache made with another k", "precompute.logits",
         config("cache.k=4"), "was made with other settings", cache),
    Case("cache-for-other-store", "token store rebuilt after the cache was made",
         "precompute.logits", config(), "token_store_fingerprint",
         both(cache, store_of(n=512, vocab=VOCAB, seed=7))),
    Case("token-store-corrupt", "token store with a flipped byte", "precompute.logits",
         config(), "checksum", both(tokens, flip_byte("tokens/train.zarr/tokens/c/0/0"))),
    Case("token-store-manifest-garbage", "token store manifest overwritten with garbage",
         "precompute.logits", config(), "unreadable",
         both(tokens, write("run/tokens/train.zarr/zarr.json", "{ not json"))),
]
STORAGE_CASES = [
    Case("verify-nothing", "verify a path with nothing there", "storage",
         ("verify", "{case}/nothing"), "no logit cache or token store", nothing),
    Case("inspect-not-a-store", "inspect a model folder instead of a store", "storage",
         ("inspect", "{teacher}"), "no logit cache or token store", nothing),
    Case("inspect-edited-manifest", "inspect a cache whose manifest was edited by hand",
         "storage", ("inspect", "{run}/cache/train.zarr"), "manifest was edited",
         both(cache, edit_cache_manifest)),
    Case("verify-corrupt-store", "verify a token store with a flipped byte", "storage",
         ("verify", "{run}/tokens/train.zarr"), "1 problem(s)",
         both(tokens, flip_byte("tokens/train.zarr/tokens/c/0/0"))),
    Case("verify-unknown-protocol", "verify a URL of a protocol fsspec does not know",
         "storage", ("verify", "nosuch://bucket/cache/train.zarr"),
         "is not a storage protocol", nothing),
    Case("verify-no-credentials", "verify a cache in object storage without credentials",
         "storage", ("verify", "s3://bucket/cache/train.zarr"), "no credentials found", nothing),
]
EVALUATE_CASES = [
    Case("evaluate-empty-run", "evaluate a run with no models", "student.evaluate", config(),
         "nothing to evaluate", nothing),
    Case("evaluate-pairs-missing", "minimal-pairs folder does not exist", "student.evaluate",
         config("eval.minimal_pairs={case}/pairs"), "does not exist", both(nothing, run_teacher)),
    Case("evaluate-tokenizer-missing", "run's tokenizer folder is empty", "student.evaluate",
         config(), "no tokenizer", both(nothing, run_teacher, mkdir("run/tokenizer"))),
    Case("evaluate-extra-model-missing", "eval.models names a folder that does not exist",
         "student.evaluate", config("eval.models=[{case}/nowhere]"),
         "nowhere is not a model folder", both(nothing, run_teacher)),
]
CASES = CORPUS_CASES + CONFIG_CASES + LOGITS_CASES + STORAGE_CASES + EVALUATE_CASES
if importlib.util.find_spec("student.train") is not None:
    CASES += [
        Case("distill-without-cache", "distil (alpha < 1) before `make teacher-logits`",
             "student.train", config(), "teacher-logits"),
        Case("student-vocab-mismatch", "tokens rebuilt with another tokenizer (the student's "
             "vocabulary is not the cache's)", "student.train", config(),
             "was made for another token store", both(cache, store_of(n=512, vocab=300))),
        Case("distill-incomplete-cache", "distil from an unfinished cache", "student.train",
             config(), "is incomplete: 1 of 64 shards missing", both(cache, lambda case, world: (
                 case / "run" / "cache" / "train.zarr" / "done" / "c" / "5").unlink())),
    ]


# ------------------------------------------------------------------------------ running them

@dataclass
class Outcome:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def expand(text: str, *, case_dir: Path, world: World) -> str:
    return text.format(config=world.config, run=case_dir / "run", case=case_dir,
                       teacher=world.teacher)


def command_of(case: Case, *, case_dir: Path, world: World) -> list[str]:
    return [PYTHON, "-m", case.module, *(expand(a, case_dir=case_dir, world=world)
                                         for a in case.args)]


@pytest.fixture(scope="session")
def catalogue_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


@pytest.fixture(scope="session")
def catalogue(world, catalogue_dir) -> dict[str, Outcome]:
    root = catalogue_dir
    for case in CASES:
        (root / case.id).mkdir()
        case.setup(root / case.id, world)

    def attempt(case: Case) -> Outcome:
        case_dir = root / case.id
        before = snapshot(case_dir)
        command = command_of(case, case_dir=case_dir, world=world)
        result = cli(command)
        return Outcome(command, result.returncode, result.stdout, result.stderr, before,
                       snapshot(case_dir))

    with ThreadPoolExecutor(max_workers=2) as pool:  # start-up (imports) dominates each case
        outcomes = dict(zip((c.id for c in CASES), pool.map(attempt, CASES)))
    return outcomes


def shown(text: str, *, case_dir: Path, world: World) -> str:
    """Paths of this session replaced by the placeholders the table explains."""
    return (text.replace(str(world.config), "tiny.yaml").replace(str(case_dir / "run"), "RUN")
            .replace(str(case_dir), "CASE").replace(str(world.teacher), "TEACHER")
            .replace(str(world.root), "WORLD").replace(PYTHON, "python").replace("|", "\\|"))


def render_doc(outcomes: dict[str, Outcome], *, root: Path, world: World) -> str:
    """The user-mistakes section of docs/bad-inputs.md as this run's outcomes make it."""
    rows = []
    for number, case in enumerate(CASES, 1):
        outcome = outcomes[case.id]
        lines = message_lines(outcome.stderr)
        message = lines[-1] if lines else "(nothing)"
        rows.append(f"| {number} | {case.mistake} | `{shown(' '.join(outcome.command), case_dir=root / case.id, world=world)}` "
                    f"| {shown(message, case_dir=root / case.id, world=world)} |")
    return "\n".join([
        "| # | Mistake | Command | Message |",
        "|---|---|---|---|",
        *rows,
    ])


def test_committed_catalogue_is_this_run(catalogue, catalogue_dir, world):
    section = render_doc(catalogue, root=catalogue_dir, world=world)
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("BABYLM_KD_WRITE_DOCS") == "1":
        DOC.write_text(text[:start] + "\n" + section + "\n" + text[end:])
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    assert text[start:end] == "\n" + section + "\n", (
        f"{DOC} differs from the tested catalogue: regenerate it with "
        "BABYLM_KD_WRITE_DOCS=1 python -m pytest tests/reliability/test_bad_inputs.py")


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
    for c in CASES])
def test_mistake_ends_with_one_line_and_exit_2(catalogue, case):
    outcome = catalogue[case.id]
    where = f"{' '.join(outcome.command)}\nstderr: {outcome.stderr[-1500:]}"
    assert outcome.returncode == 2, where
    assert "Traceback" not in outcome.stderr, where
    lines = message_lines(outcome.stderr)
    assert len(lines) == 1, where
    assert lines[0].startswith("error: ") or case.module == "storage", where
    assert case.expect in lines[0], where
    changed = [name for name, digest in outcome.before.items() if outcome.after.get(name) != digest]
    assert changed == [], f"a failed command lost or changed files that were there: {changed}"


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


def test_failed_corpus_rerun_keeps_the_finished_run(tmp_path, capsys):
    """A rerun of `make data` that fails late (corpus shorter than one sequence) must not
    replace the tokenizer or texts of the finished token stores (fixed in 2db0280)."""
    from configs import load_config
    from configs.cli import run as run_cli
    from precompute.corpus import main, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.train").write_text(GOOD_LINES)
    overrides = [f"data.dir={corpus}", f"run_dir={tmp_path / 'run'}", "tokenizer.vocab_size=300",
                 "data.seq_len=16"]
    prepare(load_config(REPO / "configs" / "demo.yaml", overrides))
    before = snapshot(tmp_path / "run")
    (corpus / "a.train").write_text("a much shorter corpus\n" * 3)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, "corpus", argv=["--config", str(REPO / "configs" / "demo.yaml"),
                                      *overrides, "data.seq_len=4096"])
    assert exit_info.value.code == 2
    after = snapshot(tmp_path / "run")
    assert [name for name, digest in before.items() if after.get(name) != digest] == []

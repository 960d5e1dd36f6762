"""Evaluation of every model of a run: language-model metrics and minimal pairs.

`make eval` (`python -m student.evaluate --config CONFIG [run_dir=RUN] [eval.minimal_pairs=DIR]`)
scores the run's teacher, every finished student under `students/*` and the extra `eval.models`
on `student.device`, then writes `RUN/reports/results.json`, `report.md` and training-curve PNGs (student/report.py).

Language-model metrics: `training.scoring.lm_metrics` on the validation token store
`tokens/val.zarr`.

Minimal pairs (`read_suites`, `score_pairs`) in BLiMP's jsonl format (`sentence_good`,
`sentence_bad`, optional `field`, `UID`, `pairID` or `pair_id`), one suite per folder (BLiMP and
the BLiMP supplement are reported apart, as the BabyLM tables do). A pair is right when the good
sentence's summed log-probability is higher, under three conventions (CONVENTIONS): ours (every
token after a prepended BOS, ties wrong), lm-evaluation-harness's and the BabyLM 2025
pipeline's, so scores compare with the leaderboards. Accuracy is reported per file
(phenomenon), per field (the mean over files of each file's accuracy on its pairs of that
field), and as the macro average over files. Each model card gets the scores (`record_scores`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from configs import Config, UserError
from storage.errors import ManifestMismatch
from storage.location import file_exists, locate
from storage.paths import file_problem, make_folder, write_atomic
from storage.tokens import check_one_generation, open_token_store
from training.checkpoint import TOKENIZER_FILE, is_finished
from training.device import resolve_device
from training.model_card import CARD, read_card_facts, render_card
from training.models import TEACHER_INFO, load_teacher, looks_local, resolve_teacher
from training.scoring import lm_metrics, token_logprobs
from training.tokenizer import fingerprint, load_tokenizer

MAX_TIE_IDS = 20
"""Pair ids of ties listed per file in the results (the count is always complete)."""


# ----------------------------------------------------------------------------- scoring sentences

CONVENTIONS = ("ours", "lm_eval", "babylm2025")
"""How a sentence is encoded and a pair decided, as each scorer does it:
  * ours: BOS + the sentence (no special tokens, no leading space); a tie is wrong.
  * lm_eval: lm-evaluation-harness's BLiMP (an empty context, so its prefix token: BOS, else
    EOS; then " " + sentence, the target delimiter); argmax picks the first of equals, so a
    tie goes to the good sentence.
  * babylm2025: the BabyLM 2025 pipeline: `tokenizer(sentence)` with the tokenizer's own
    special tokens, tokens 1..n scored (so the first word counts only when the tokenizer
    prepends a BOS, as ours do); a tie goes to the good sentence (torch.max: the first).
Every token of an encoding after the first is scored."""
TIES_RIGHT = {"ours": False, "lm_eval": True, "babylm2025": True}


def encode(tokenizer, sentences: list[str], convention: str) -> list[tuple[int, ...]]:
    """Token ids of each sentence as `convention` scores it (see CONVENTIONS)."""
    if convention == "babylm2025":
        return [tuple(ids) for ids in tokenizer(list(sentences))["input_ids"]]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token")
    texts = [" " + s for s in sentences] if convention == "lm_eval" else list(sentences)
    return [(bos, *ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def sequence_logprobs(model, sequences: list[tuple[int, ...]], *, batch_size: int = 64,
                      device: str | torch.device = "cpu", desc: str = "sentences") -> np.ndarray:
    """Summed log-probability of tokens 1..n of each id sequence, given the tokens before.

    Sequences are sorted by length (longest first, so memory trouble shows at once) and batched
    right-padded with an attention mask. One longer than the model's context is not scored: its
    entry is NaN. Returns (S,) float64.
    """
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None) or 1 << 30
    scores = np.full(len(sequences), np.nan)
    order = sorted((i for i in range(len(sequences)) if len(sequences[i]) <= context),
                   key=lambda i: -len(sequences[i]))
    device = torch.device(device)
    model.eval()
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="sent",
                                      leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = len(sequences[batch[0]])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, :len(sequences[index])] = torch.tensor(sequences[index])
                mask[row, :len(sequences[index])] = 1
            sums = token_logprobs(model, ids.to(device), mask.to(device)).double().sum(-1)
            scores[batch] = sums.cpu().numpy()
            bar.update(len(batch))
    return scores


def sentence_logprobs(model, tokenizer, sentences: list[str], *, convention: str = "ours",
                      batch_size: int = 64, device: str | torch.device = "cpu",
                      desc: str = "sentences") -> np.ndarray:
    """Summed log-probability of each sentence under `convention` (NaN past the context)."""
    return sequence_logprobs(model, encode(tokenizer, sentences, convention),
                             batch_size=batch_size, device=device, desc=desc)


# ----------------------------------------------------------------------------- minimal-pair files

@dataclass(frozen=True)
class MinimalPair:
    good: str
    bad: str
    pair_id: object
    """`pairID` or `pair_id` from the line (the line number when neither is given)."""
    field: str | None


@dataclass(frozen=True)
class PairFile:
    name: str
    """The phenomenon: the file's path below the folder, without `.jsonl`."""
    path: Path
    pairs: tuple[MinimalPair, ...]
    malformed: tuple[str, ...]
    """`path:line: reason` for every skipped line."""


def read_pair_file(path: Path | str, *, name: str | None = None, max_pairs: int = 0) -> PairFile:
    """Parse one BLiMP-style jsonl file; malformed lines are recorded and skipped, never fatal."""
    path = Path(path)
    pairs, malformed = [], []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if max_pairs and len(pairs) >= max_pairs:
                break
            problem = None
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                item, problem = None, f"not JSON ({exc.msg})"
            if problem is None and not isinstance(item, dict):
                problem = "not a JSON object"
            if problem is None:
                missing = [key for key in ("sentence_good", "sentence_bad")
                           if not isinstance(item.get(key), str) or not item[key].strip()]
                if missing:
                    problem = f"missing or empty {' and '.join(missing)}"
            if problem:
                malformed.append(f"{path}:{number}: {problem}")
                continue
            pair_id = item.get("pairID", item.get("pair_id", number))
            field = item.get("field")
            pairs.append(MinimalPair(good=item["sentence_good"], bad=item["sentence_bad"],
                                     pair_id=pair_id, field=field if isinstance(field, str) else None))
    return PairFile(name=name or path.stem, path=path, pairs=tuple(pairs), malformed=tuple(malformed))


def read_pair_dir(directory: Path | str, *, max_pairs_per_file: int = 0) -> list[PairFile]:
    """Every `*.jsonl` below `directory` (recursively, so a folder of BLiMP folders works)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"minimal-pairs folder {directory} does not exist")
    paths = sorted(directory.rglob("*.jsonl"))
    if not paths:
        raise UserError(f"no *.jsonl minimal-pair files in {directory}")
    return [read_pair_file(path, name=str(path.relative_to(directory).with_suffix("")),
                           max_pairs=max_pairs_per_file) for path in paths]


def score_pairs(model, tokenizer, files: list[PairFile], *,
                conventions: tuple[str, ...] = CONVENTIONS, batch_size: int = 64,
                device: str | torch.device = "cpu", desc: str = "pairs") -> dict:
    """Accuracy of `model` on minimal-pair files under each convention (CONVENTIONS; see the
    module doc for the averages): {convention: result}.

    Each distinct token sequence is scored once (conventions that encode a sentence alike share
    its score). A pair with a side longer than the model's context is left out of every count
    and reported (`too_long`, with a warning). A result is {"files": {name: {"pairs",
    "correct", "ties", "accuracy", "tie_ids", "too_long"}}, "fields": {field: accuracy},
    "macro_accuracy", "pairs", "correct", "ties", "too_long"}; files without scored pairs are
    left out of the averages.
    """
    sentences = pair_sentences(files)
    encoded = {convention: encode(tokenizer, sentences, convention) for convention in conventions}
    return accuracy_by_encoding(model, files, sentences, encoded,
                                ties_right={c: TIES_RIGHT[c] for c in conventions},
                                batch_size=batch_size, device=device, desc=desc)


def pair_sentences(files: list[PairFile]) -> list[str]:
    """Every distinct sentence of the pairs, sorted."""
    return sorted({s for f in files for p in f.pairs for s in (p.good, p.bad)})


def accuracy_by_encoding(model, files: list[PairFile], sentences: list[str],
                         encoded: dict[str, list[tuple[int, ...]]], *,
                         ties_right: dict[str, bool], batch_size: int = 64,
                         device: str | torch.device = "cpu", desc: str = "pairs") -> dict:
    """{name: pair_accuracy result} for each way `encoded[name]` of encoding `sentences`; each
    distinct id sequence is scored once, whichever encodings share it."""
    distinct = sorted({ids for sequences in encoded.values() for ids in sequences})
    logprob = dict(zip(distinct, sequence_logprobs(model, distinct, batch_size=batch_size,
                                                   device=device, desc=desc)))
    first = next(iter(encoded))
    return {name: pair_accuracy(files, {s: logprob[ids] for s, ids in zip(sentences, sequences)},
                                ties_right=ties_right[name], warn=name == first)
            for name, sequences in encoded.items()}


def pair_accuracy(files: list[PairFile], scores: dict[str, float], *, ties_right: bool,
                  warn: bool = True) -> dict:
    """Accuracies from each sentence's score (see score_pairs); a tie is right when `ties_right`."""
    per_file, field_accuracies, too_long = {}, defaultdict(list), 0
    for pair_file in files:
        pairs = [p for p in pair_file.pairs
                 if not (np.isnan(scores[p.good]) or np.isnan(scores[p.bad]))]
        skipped = len(pair_file.pairs) - len(pairs)
        if skipped and warn:
            print(f"warning: {pair_file.name}: {skipped} pair(s) longer than the model's context "
                  "were left out")
        too_long += skipped
        if not pairs:
            continue
        margins = np.array([scores[p.good] - scores[p.bad] for p in pairs])
        tie = margins == 0
        right = (margins >= 0) if ties_right else (margins > 0)
        per_file[pair_file.name] = {
            "pairs": len(margins), "correct": int(right.sum()), "ties": int(tie.sum()),
            "accuracy": float(right.mean()),
            "tie_ids": [p.pair_id for p, t in zip(pairs, tie) if t][:MAX_TIE_IDS],
            "too_long": skipped,
        }
        fields = np.array([p.field or "" for p in pairs])
        for field in sorted(set(fields) - {""}):
            field_accuracies[field].append(float(right[fields == field].mean()))
    accuracies = [entry["accuracy"] for entry in per_file.values()]
    return {
        "files": per_file,
        "fields": {field: float(np.mean(values)) for field, values in sorted(field_accuracies.items())},
        "macro_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "pairs": sum(e["pairs"] for e in per_file.values()),
        "correct": sum(e["correct"] for e in per_file.values()),
        "ties": sum(e["ties"] for e in per_file.values()),
        "too_long": too_long,
    }


def read_suites(folder: Path | str, *, max_pairs_per_file: int = 0) -> dict[str, list[PairFile]]:
    """{suite name: its files}: a folder holding `*.jsonl` is one suite named after it; a folder
    of such folders (BLiMP beside the BLiMP supplement) gives one suite per sub-folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"minimal-pairs folder {folder} does not exist")
    if any(folder.glob("*.jsonl")):
        return {folder.name: read_pair_dir(folder, max_pairs_per_file=max_pairs_per_file)}
    suites = {sub.name: read_pair_dir(sub, max_pairs_per_file=max_pairs_per_file)
              for sub in sorted(folder.iterdir()) if sub.is_dir() and any(sub.rglob("*.jsonl"))}
    if not suites:
        raise UserError(f"no *.jsonl minimal-pair files in {folder}")
    return suites


# ----------------------------------------------------------------------------- models of a run

@dataclass(frozen=True)
class ModelEntry:
    name: str
    """Row label: 'teacher' (or 'teachers/<name>'), 'students/<run>', or the path/name given in
    eval.models; for the run's models also their folder under the run."""
    kind: str
    """'teacher', 'student' or 'extra'."""
    source: str
    """Folder or hub name passed to from_pretrained."""
    adapter: str = ""
    """PEFT LoRA folder applied on top of `source` (a teacher fine-tuned with LoRA/QLoRA)."""


def unfinished_students(cfg: Config) -> list[str]:
    """A line for each folder under students/ without a finished model, saying which file of it
    is missing or damaged (a run still training or killed, or a model file lost)."""
    students, lines = cfg.run_path / "students", []
    for folder in sorted(students.iterdir() if students.is_dir() else []):
        if folder.is_dir() and not is_finished(folder):
            file, (_, problem) = next(
                ((name, found) for name in ("config.json", "model.safetensors", TOKENIZER_FILE)
                 if (found := file_problem(folder / name))), ("model", ("", "is incomplete")))
            lines.append(f"students/{folder.name} has no finished model ({file} {problem})")
    return lines


def find_models(cfg: Config) -> list[ModelEntry]:
    """The run's teachers, its finished students (sorted by name), then `eval.models`.

    A teacher counts when `make teacher` finished it (teacher.json, possibly a LoRA adapter on
    a base model) or when its folder holds a plain save_pretrained model.
    """
    run = cfg.run_path
    entries = []
    for view in cfg.each_teacher():
        name = view.teacher_dir.relative_to(run).as_posix()
        if (view.teacher_dir / TEACHER_INFO).is_file():
            source = resolve_teacher(view)
            entries.append(ModelEntry(name, "teacher", source.model, source.adapter))
        elif is_finished(view.teacher_dir):
            entries.append(ModelEntry(name, "teacher", str(view.teacher_dir)))
    students = run / "students"
    for folder in sorted(students.iterdir() if students.is_dir() else []):
        if is_finished(folder):
            entries.append(ModelEntry(f"students/{folder.name}", "student", str(folder)))
    for name in cfg.eval.models:  # checked before any model is scored
        if looks_local(name) and not (Path(name).expanduser() / "config.json").is_file():
            raise UserError(f"eval.models entry {name} is not a model folder (no config.json)")
        entries.append(ModelEntry(name, "extra", name))
    return entries


def load_model(entry: ModelEntry, cfg: Config, *, device: torch.device):
    """The model of `entry` in eval mode on `device`: the teacher in the dtype and quantisation
    the logits job used (fp32 on the CPU, which has no fast half precision), the others in fp32."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model drowns the table
    if entry.kind != "teacher":
        return load_teacher(entry.source, dtype="fp32", device=device)
    teacher = next(view.teacher for view in cfg.each_teacher()
                   if view.teacher_dir == cfg.run_path / entry.name)
    return load_teacher(entry.source, dtype=teacher.dtype if device.type == "cuda" else "fp32",
                        quantization=teacher.quantization, adapter=entry.adapter, device=device)


def own_tokenizer(source: str):
    """The tokenizer saved beside a model, or None when the folder has none."""
    from transformers import AutoTokenizer

    folder = Path(source)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def training_facts(folder: Path) -> dict:
    """alpha, temperature, mode and the k it distilled from (distill.k = 0 means the cached k;
    none for the CE baseline or an ensemble) from a student's resolved config.yaml (empty when
    absent)."""
    path = folder / "config.yaml"
    if file_problem(path):  # missing, or a pipe that would block the read
        return {}
    try:
        settings = yaml.safe_load(path.read_text()) or {}
        distill = settings.get("distill") or {}
        cache = settings.get("cache") or {}
        cached_k = cache.get("k")
        if cache.get("selection") == "draws":  # counted draws: those at the student's T
            drawn = dict(zip(cache.get("temperatures") or (), cache.get("draws") or ()))
            cached_k = drawn.get(distill.get("temperature"), cached_k)
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return {}
    facts = {key: distill[key] for key in ("alpha", "temperature", "mode") if key in distill}
    if distill.get("alpha") != 1 and distill.get("mode", "cached") == "cached" and len(
            distill.get("teachers") or ()) < 2:  # an ensemble's caches each have their own k
        facts["k"] = distill.get("k") or cached_k
    return facts


def pairs_folder(cfg: Config) -> tuple[Path | None, str]:
    """eval.minimal_pairs, else the demo's `<run>/corpus/minimal_pairs`, else none (and why)."""
    if cfg.eval.minimal_pairs:
        return Path(cfg.eval.minimal_pairs), ""
    demo = cfg.run_path / "corpus" / "minimal_pairs"
    if demo.is_dir() and any(demo.rglob("*.jsonl")):
        return demo, ""
    return None, (f"minimal pairs skipped: eval.minimal_pairs is empty and {demo} has no *.jsonl")


def evaluate_run(cfg: Config) -> dict:
    """Score every model of the run (see module doc); returns the results dict of results.json."""
    run = cfg.run_path
    device = resolve_device(cfg.student.device, "student.device")
    notes = []
    val_path, train_path = (locate(cfg.token_store_at(split), cfg.storage.options)
                            for split in ("val", "train"))
    val = open_token_store(val_path) if file_exists(val_path / "zarr.json") else None
    if val is None:
        notes.append(f"LM metrics skipped: no validation token store at {val_path}")
    elif file_exists(train_path / "zarr.json"):
        check_one_generation([open_token_store(train_path), val])
    run_tokenizer = None
    if (run / "tokenizer").is_dir():
        run_tokenizer = load_tokenizer(run)
        if val is not None and fingerprint(run_tokenizer) != val.tokenizer_fingerprint:
            raise ManifestMismatch(f"{run / 'tokenizer'} and {val_path} come from different "
                                   "`make data` runs; rerun `make data` to rebuild both")
    models = find_models(cfg)
    unfinished = unfinished_students(cfg)
    if not models:
        raise UserError(f"nothing to evaluate in {run}: no teacher/, no finished students/*, "
                        "and eval.models is empty" + "".join(f"; {line}" for line in unfinished))
    notes += [f"not evaluated: {line}" for line in unfinished]
    pair_dir, pair_note = pairs_folder(cfg)
    suites = read_suites(pair_dir, max_pairs_per_file=cfg.eval.max_pairs_per_file) \
        if pair_dir else {}
    if pair_note:
        notes.append(pair_note)
    malformed = [line for files in suites.values() for f in files for line in f.malformed]
    for line in malformed[:10]:
        print(f"warning: skipped malformed minimal pair {line}")
    if len(malformed) > 10:
        print(f"warning: ... {len(malformed) - 10} more malformed lines (all in results.json)")

    rows = []
    for entry in models:
        adapter = f" + adapter {entry.adapter}" if entry.adapter else ""
        print(f"evaluating {entry.name} ({entry.source}{adapter}) on {device}")
        model = load_model(entry, cfg, device=device)
        row = {"name": entry.name, "kind": entry.kind, "path": entry.source,
               "params": sum(p.numel() for p in model.parameters())}
        if entry.kind == "student":
            row["training"] = training_facts(Path(entry.source))
        tokenizer = own_tokenizer(entry.source) if entry.kind == "extra" else None
        same_tokens = tokenizer is None or (
            run_tokenizer is not None and fingerprint(tokenizer) == fingerprint(run_tokenizer))
        tokenizer = tokenizer or run_tokenizer
        if val is not None and same_tokens:
            row["lm"] = lm_metrics(model, val, batch_size=cfg.eval.batch_size, device=device,
                                   desc=f"{entry.name} val")
        elif val is not None:
            row["lm_skipped"] = "the model's own tokenizer differs from the run's"
        if suites and tokenizer is None:
            row["minimal_pairs_skipped"] = f"no tokenizer (none in {run / 'tokenizer'} or beside the model)"
        elif suites:
            row["minimal_pairs"] = {
                suite: score_pairs(model, tokenizer, files, batch_size=cfg.eval.batch_size,
                                   device=device, desc=f"{entry.name} {suite}")
                for suite, files in suites.items()}
        rows.append(row)
        del model
    return {
        "run_dir": str(run),
        "config": cfg.source,
        "device": str(device),
        "val_store": str(val_path) if val is not None else None,
        "minimal_pairs_dir": str(pair_dir) if pair_dir else None,
        "minimal_pairs_files": {suite: {f.name: len(f.pairs) for f in files}
                                for suite, files in suites.items()},
        "conventions": list(CONVENTIONS),
        "malformed_lines": malformed,
        "notes": notes,
        "models": rows,
    }


def record_scores(folder: Path, row: dict) -> None:
    """Add the validation perplexity and minimal-pair macro accuracies of `row` to the model card
    in `folder` (left alone when the folder has no card of ours)."""
    facts = read_card_facts(folder)
    if not facts:
        return
    if "lm" in row:
        facts["val_perplexity"] = row["lm"]["perplexity"]
    if "minimal_pairs" in row:
        facts["minimal_pairs"] = {
            suite: {convention: result["macro_accuracy"] for convention, result in by.items()}
            for suite, by in row["minimal_pairs"].items()}
    write_atomic(folder / CARD, render_card(folder.name, facts))


def check_writable(folder: Path) -> None:
    """Create `folder` and write a file in it: a read-only run fails here as a path fault."""
    make_folder(folder)
    probe = folder / ".write-test"
    probe.write_bytes(b"")
    probe.unlink()


def main(cfg: Config) -> None:
    from student.report import caches_root, print_summary, write_report

    check_writable(cfg.run_path / "reports")  # before minutes of scoring, not after
    results = evaluate_run(cfg)
    for note in results["notes"]:
        print(note)
    report = write_report(cfg.run_path, results, caches_root=caches_root(cfg))
    for row in results["models"]:  # after the report: a failed evaluation changes no folder
        if row["kind"] != "extra":
            record_scores(cfg.run_path / row["name"], row)
    print_summary(results, report)


if __name__ == "__main__":
    from configs.cli import run

    run(main, "Evaluate the run's teacher and students: perplexity, bits/byte, minimal pairs.")

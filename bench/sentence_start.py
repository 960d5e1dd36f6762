"""Where a sentence starts: file-level vs line-level documents in the token store, on BabyLM 2023.

The corpus stage packs each corpus file as one document (`data.document: file`: its lines joined
by newlines, one `<|endoftext|>` per file), so in training a line starts after a newline and
`<|endoftext|>` (EOS) is rare: 3 in the train store of the 2023 train_10M. Minimal-pair scorers
(BLiMP) score every sentence right after a prepended EOS/BOS, a context such a model has hardly
seen. `data.document: line` makes every line its own document (EOS after each line), so a line
then starts after EOS, as the scorers put it. This bench asks which default scores better.

It runs the project's own stages in two temporary run directories, on configs/demo.yaml with
every setting the rows depend on pinned here (`settings`), differing only in `data.document`:

  data      the 4 BabyLM 2023 sources in $BABYLM_KD_SHARED_DATA (default ../shared/data beside
            the repo): 1.47M words, a 2048-entry BPE (trained on the same lines in both runs, so
            one tokenizer), rows of 128 tokens, validation the last 5% of each file's lines
  students  one CE student per packing (distill.alpha = 1): GPT-2 4 x 128, 4 heads, dropout 0,
            lr 2e-3, batch 16, one epoch (or `student_epochs`), warmup 50, same seed, no
            milestone folders; one epoch is the same words in both, but more rows (steps) in the
            line-packed store, whose EOS tokens take room

Each student is scored on BLiMP and the BLiMP supplement (`max_pairs` pairs per file, the first
of each file), the sentence encoded without special tokens and scored in three contexts:

  after EOS       (EOS, *sentence): the project's own convention ("ours")
  after newline   (EOS, *"\\n", *sentence): the context a file-packed model trains on; the
                  newline's log-probability is the same for both sentences of a pair, so it
                  cancels in the comparison
  lm-eval         (EOS, *" " + sentence): lm-evaluation-harness's BLiMP encoding

A pair is right when the good sentence's summed log-probability (tokens after the first) is
higher; a tie counts wrong. Accuracy is the macro average over files (phenomena), in percent.
Each student's validation loss, perplexity and bits per byte are measured on both validation
stores (file-packed and line-packed: the same text, so bits per byte compare across them): the
cross figures show how much a model trained with one packing suffers on the other. The tables
also give each store's rows and EOS count, and a section of line minus file accuracies.
`python -m bench.sentence_start` prints the tables.
"""

from __future__ import annotations

from pathlib import Path

from bench import SHARED_DATA, work_dir
from bench.tables import markdown_sections
from configs import CONFIG_DIR, load_config

DATA_DIR = SHARED_DATA / "babylm" / "2023" / "train_10M"
SUITES = {"blimp": SHARED_DATA / "blimp" / "blimp_filtered",
          "supplement": SHARED_DATA / "blimp" / "supplement_filtered"}
PACKINGS = ("file", "line")
"""The values of data.document compared, one run directory each."""
CONTEXTS = ("after EOS", "after newline", "lm-eval")
VOCAB = 2048
MAX_PAIRS = 200
THREADS = 1
"""torch threads for training and scoring: with a second thread, a busy core (other work on a
small shared machine) stalls every small op of these tiny models."""


def settings(root: Path, data_dir: Path, document: str, *, student_epochs: float,
             extra: tuple[str, ...] = ()) -> list[str]:
    """Every setting the rows depend on, pinned (demo.yaml is tuned for the demo corpus)."""
    return [f"run_dir={root}", f"data.dir={data_dir}", f"data.document={document}",
            "data.seq_len=128", "data.validation=split", "data.val_fraction=0.05",
            "tokenizer.kind=bpe", f"tokenizer.vocab_size={VOCAB}",
            "student.n_layer=4", "student.n_embd=128", "student.n_head=4", "student.dropout=0",
            "student.lr=2e-3", "student.batch_size=16", f"student.epochs={student_epochs}",
            "student.warmup_steps=50", "student.eval_every=0", "student.checkpoint_every=0",
            "student.seed=0", "student.device=cpu", "student.save_at_words=[]",
            "distill.alpha=1", *extra]


def encodings(tokenizer, sentences: list[str]) -> dict[str, list[tuple[int, ...]]]:
    """{context: the id sequence of each sentence} (see CONTEXTS and the module doc)."""
    eos = tokenizer.eos_token_id
    newline = tuple(tokenizer("\n", add_special_tokens=False)["input_ids"])
    plain = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    return {"after EOS": [(eos, *ids) for ids in plain],
            "after newline": [(eos, *newline, *ids) for ids in plain],
            "lm-eval": [(eos, *ids) for ids in spaced]}


def pair_rows(model, tokenizer, suites: dict, *, student: str) -> list[dict]:
    """One row per (suite, context): macro accuracy (ties wrong) of `model`."""
    from student.evaluate import accuracy_by_encoding, pair_sentences

    rows = []
    for suite, files in suites.items():
        sentences = pair_sentences(files)
        results = accuracy_by_encoding(model, files, sentences, encodings(tokenizer, sentences),
                                       ties_right=dict.fromkeys(CONTEXTS, False),
                                       desc=f"{student} {suite}")
        for context, result in results.items():
            rows.append({"section": "minimal pairs (macro accuracy over files, %)",
                         "trained on": student, "suite": suite, "context": context,
                         "accuracy": round(100 * result["macro_accuracy"], 2),
                         "files": len(result["files"]), "pairs": result["pairs"],
                         "ties": result["ties"]})
    return rows


def run(*, data_dir: Path = DATA_DIR, suites: dict[str, Path] | None = None,
        student_epochs: float = 1.0, max_pairs: int = MAX_PAIRS, extra: tuple[str, ...] = (),
        root: Path | None = None) -> list[dict]:
    """Prepare, train and score both packings in a temporary directory (or `root`); rows of the
    tables. `extra` overrides go last (the tests shrink the models with them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from precompute.corpus import prepare
    from storage.tokens import open_token_store
    from student.evaluate import read_pair_dir
    from student.train import train
    from training.scoring import lm_metrics
    from training.tokenizer import fingerprint, load_tokenizer

    torch.set_num_threads(min(THREADS, torch.get_num_threads()))
    suites = SUITES if suites is None else suites
    pairs = {name: read_pair_dir(folder, max_pairs_per_file=max_pairs)
             for name, folder in suites.items()}
    with work_dir(root, "sentence-start") as tmp:
        runs, students, rows = {}, {}, []
        for document in PACKINGS:
            cfg = load_config(CONFIG_DIR / "demo.yaml", settings(
                tmp / document, data_dir, document, student_epochs=student_epochs, extra=extra))
            stores = prepare(cfg)
            runs[document] = cfg.run_path
            students[document] = train(cfg)
            eos = open_token_store(stores["train"]).manifest["tokenizer"]["eos_id"]
            for split, path in stores.items():
                store = open_token_store(path)
                tokens = store.read(0, store.n_sequences)
                rows.append({"section": "token stores", "data.document": document,
                             "split": split, "rows": store.n_sequences,
                             "tokens": int(tokens.size), "eos": int((tokens == eos).sum()),
                             "words": int(store.words_per_row().sum())})
        tokenizers = {document: load_tokenizer(run_dir) for document, run_dir in runs.items()}
        same = len({fingerprint(t) for t in tokenizers.values()}) == 1
        vals = {document: open_token_store(run_dir / "tokens" / "val.zarr")
                for document, run_dir in runs.items()}
        for document, folder in students.items():
            model = AutoModelForCausalLM.from_pretrained(str(folder))
            model.eval()
            for store_document, store in vals.items():
                if store_document != document and not same:
                    continue  # another tokenizer: its ids mean other strings
                metrics = lm_metrics(model, store, batch_size=64,
                                     desc=f"{document} on {store_document} val")
                rows.append({"section": "validation (each student on both val stores)",
                             "trained on": document, "val store": store_document,
                             "loss": round(metrics["loss"], 4),
                             "perplexity": round(metrics["perplexity"], 3),
                             "bits_per_byte": round(metrics["bits_per_byte"], 4),
                             "tokens": metrics["tokens"]})
            rows += pair_rows(model, tokenizers[document], pairs, student=document)
            del model
        accuracy = {(r["trained on"], r["suite"], r["context"]): r["accuracy"]
                    for r in rows if "context" in r}
        for suite in pairs:
            for context in CONTEXTS:
                file_acc, line_acc = (accuracy[(d, suite, context)] for d in PACKINGS)
                rows.append({"section": "line minus file (accuracy points)", "suite": suite,
                             "context": context, "file": file_acc, "line": line_acc,
                             "line - file": round(line_acc - file_acc, 2)})
        if not same:
            rows.append({"section": "notes", "note": "the two runs trained different "
                         "tokenizers: cross-store validation left out"})
        return rows


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as markdown tables, one per section."""
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    from configs.cli import reproducible_cpu_math

    reproducible_cpu_math()
    print(markdown(run()))

"""`make eval` on a tiny fake run directory: results.json, report.md, PNG curves, terminal table."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from configs import CONFIG_DIR, load_config
from training.tokenizer import tokenizer_facts, train_bpe
from storage.tokens import write_token_store
from student.evaluate import evaluate_run
from training.models import new_model
from student.report import write_report

REPO = CONFIG_DIR.parent
TEXT = "the cat sat on the mat . the dog ran to the park . a bird sang in the tree . " * 30


def _metrics(folder, *, alpha: float, steps: int = 6):
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "tokens": step * 512, "ce": 7.0 - step * 0.3,
               "kl": 0.0 if alpha == 1 else 1.0 / step, "lr": 1e-3, "tokens_per_s": 1000.0}
        row["loss"] = alpha * row["ce"] + (1 - alpha) * row["kl"]
        if step % 3 == 0:
            row |= {"val_loss": 7.2 - step * 0.3, "val_ppl": float(np.exp(7.2 - step * 0.3))}
        rows.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n{\"step\": 7, \"tok")  # torn tail


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tokenizer = train_bpe([TEXT], vocab_size=300, min_frequency=1)
    tokenizer.save_pretrained(str(run / "tokenizer"))
    ids = np.array(tokenizer(TEXT)["input_ids"])
    rows = ids[:len(ids) // 32 * 32].reshape(-1, 32)
    write_token_store(run / "tokens" / "val.zarr", sequences=rows, manifest={
        "tokenizer": tokenizer_facts(tokenizer), "text_bytes": len(TEXT.encode())})
    shape = dict(vocab_size=len(tokenizer), n_positions=32, n_layer=2, n_head=2,
                 eos_token_id=tokenizer.eos_token_id)
    new_model(n_embd=64, seed=0, **shape).save_pretrained(run / "teacher")
    (run / "teacher" / "teacher.json").write_text("{}")  # what `make teacher` leaves when done
    _metrics(run / "teacher", alpha=1.0)
    for name, alpha, seed in (("ce", 1.0, 1), ("kd-a0.5", 0.5, 2)):
        folder = run / "students" / name
        new_model(n_embd=32, seed=seed, **shape).save_pretrained(folder)
        tokenizer.save_pretrained(str(folder))  # a complete folder has its tokenizer
        (folder / "config.yaml").write_text(yaml.safe_dump(
            {"distill": {"alpha": alpha, "temperature": 2.0, "k": 0}, "cache": {"k": 32}}))
        _metrics(folder, alpha=alpha)
    (run / "students" / "unfinished" / "checkpoint").mkdir(parents=True)  # still training
    pairs = run / "my_pairs"
    pairs.mkdir()
    for name, field in (("agreement", "morphology"), ("order", "syntax")):
        (pairs / f"{name}.jsonl").write_text("".join(json.dumps(
            {"sentence_good": f"the cat sat {w}", "sentence_bad": f"sat cat the {w}",
             "field": field, "pairID": i}) + "\n" for i, w in enumerate(["on", "in the", "."])))
    (pairs / "order.jsonl").open("a").write("not json\n")
    return run


def test_make_eval_writes_results_report_and_curves(fake_run):
    done = subprocess.run(
        [sys.executable, "-m", "student.evaluate", "--config", str(CONFIG_DIR / "demo.yaml"),
         f"run_dir={fake_run}", f"eval.minimal_pairs={fake_run / 'my_pairs'}", "student.device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = fake_run / "reports"
    results = json.loads((reports / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == ["teacher", "students/ce", "students/kd-a0.5"]
    assert results["conventions"] == ["ours", "lm_eval", "babylm2025"]
    for model in results["models"]:
        assert list(model["minimal_pairs"]) == ["my_pairs"]  # one suite: the folder holds jsonl
        for result in model["minimal_pairs"]["my_pairs"].values():
            files = result["files"]
            assert set(files) == {"agreement", "order"}
            assert all(entry["pairs"] == 3 and 0 <= entry["accuracy"] <= 1
                       for entry in files.values())
            assert set(result["fields"]) == {"morphology", "syntax"}
        assert model["lm"]["perplexity"] > 1 and model["lm"]["bits_per_byte"] > 0
    assert results["malformed_lines"] == [f"{fake_run / 'my_pairs' / 'order.jsonl'}:4: not JSON "
                                          "(Expecting value)"]
    assert results["baseline"] == "students/ce"
    table = {row["model"]: row for row in results["table"]}
    assert table["students/ce"]["ppl_change_vs_ce_pct"] == 0
    kd, ce = (next(m for m in results["models"] if m["name"] == n) for n in ("students/kd-a0.5",
                                                                              "students/ce"))
    assert table["students/kd-a0.5"]["ppl_change_vs_ce_pct"] == pytest.approx(
        100 * (kd["lm"]["perplexity"] / ce["lm"]["perplexity"] - 1))
    assert results["caches"] == []

    pngs = sorted(p.name for p in reports.glob("*.png"))
    assert pngs == ["curves_students_ce.png", "curves_students_kd-a0.5.png",
                    "curves_teacher.png", "pairs.png", "validation.png"]
    assert results["curves"][:2] == ["validation.png", "pairs.png"]  # the answer first
    assert all((reports / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    report = (reports / "report.md").read_text()
    assert "| students/kd-a0.5 |" in report and "![validation.png](validation.png)" in report
    assert "| model | my_pairs ours | my_pairs lm_eval | my_pairs babylm2025 |" in report
    settings = report.split("## Training settings")[1]  # k = 0 in a config means the cached k
    assert "| students/kd-a0.5 | 0.5 | 2.0 | 32 |" in settings
    assert "| students/ce | 1.0 | 2.0 | - |" in settings
    assert "perplexity" in done.stdout and "students/kd-a0.5" in done.stdout
    assert f"report: {reports / 'report.md'}" in done.stdout


def test_demo_pairs_are_the_default_and_absence_is_said(fake_run, tmp_path):
    cfg = load_config(CONFIG_DIR / "demo.yaml", [f"run_dir={fake_run}", "student.device=cpu",
                                                 "eval.max_pairs_per_file=2"])
    results = evaluate_run(cfg)
    assert results["minimal_pairs_dir"] is None
    assert any("minimal pairs skipped" in note for note in results["notes"])
    assert all("minimal_pairs" not in m for m in results["models"])

    demo_pairs = fake_run / "corpus" / "minimal_pairs"
    demo_pairs.mkdir(parents=True)
    (demo_pairs / "demo.jsonl").write_text((fake_run / "my_pairs" / "agreement.jsonl").read_text())
    try:
        results = evaluate_run(cfg)
    finally:
        (demo_pairs / "demo.jsonl").unlink()
    assert results["minimal_pairs_dir"] == str(demo_pairs)
    pairs = results["models"][0]["minimal_pairs"]["minimal_pairs"]["ours"]
    assert pairs["files"]["demo"]["pairs"] == 2  # max_pairs_per_file


def test_unreadable_cache_is_described_not_fatal(fake_run, tmp_path):
    run = tmp_path / "run"
    (run / "cache" / "train.zarr").mkdir(parents=True)
    results = {"run_dir": str(run), "notes": [], "models": [], "minimal_pairs_dir": None,
               "minimal_pairs_files": {}, "malformed_lines": []}
    report = write_report(run, results)
    written = json.loads((run / "reports" / "results.json").read_text())
    assert "error" in written["caches"][0] and "could not be read" in report.read_text()


def test_cache_facts_come_from_the_manifest(tmp_path):
    from storage.cache import create_cache

    run = tmp_path / "run"
    create_cache(run / "cache" / "train.zarr", n_sequences=8, seq_len=16, k=4, vocab_size=300,
                 temperatures=[1.0, 2.0], value_code="gap8", chunk_sequences=4, shard_chunks=1,
                 manifest={"teacher": {"name": "runs/demo/teacher", "fingerprint": "abc",
                                       "dtype": "fp32", "quantization": "none", "adapter": ""}})
    results = {"run_dir": str(run), "notes": [], "models": [], "minimal_pairs_dir": None,
               "minimal_pairs_files": {}, "malformed_lines": []}
    report = write_report(run, results).read_text()
    cache, = json.loads((run / "reports" / "results.json").read_text())["caches"]
    assert (cache["k"], cache["value_code"], cache["tokens"], cache["shards_done"]) == (
        4, "gap8", 128, "0/2")
    assert cache["teacher"] == "name runs/demo/teacher, dtype fp32"
    assert cache["bytes_per_token"] == pytest.approx(cache["bytes_on_disk"] / 128)
    assert "k: 4, value code: gap8" in report and "draws at each" not in report
    create_cache(run / "caches" / "drawn" / "train.zarr", n_sequences=8, seq_len=16, k=24,
                 vocab_size=300, temperatures=[1.0, 2.0], value_code="none", chunk_sequences=4,
                 shard_chunks=1, manifest={"selection": {"kind": "draws", "draws": [8, 16],
                                                         "seed": 0}})
    report = write_report(run, results).read_text()
    drawn = json.loads((run / "reports" / "results.json").read_text())["caches"][1]
    assert (drawn["k"], drawn["value_code"], drawn["draws"]) == (24, "none", [8, 16])
    assert "k: 24, value code: none, temperatures: [1.0, 2.0], draws at each: [8, 16]" in report


def test_extra_model_with_its_own_tokenizer_skips_lm_metrics_but_scores_pairs(fake_run, tmp_path):
    other = train_bpe([TEXT], vocab_size=280, min_frequency=1)
    folder = tmp_path / "other-model"
    new_model(vocab_size=len(other), n_positions=32, n_layer=2, n_embd=32, n_head=2,
              eos_token_id=other.eos_token_id).save_pretrained(folder)
    other.save_pretrained(str(folder))
    cfg = load_config(CONFIG_DIR / "demo.yaml", [
        f"run_dir={fake_run}", "student.device=cpu", f"eval.models=[{folder}]",
        f"eval.minimal_pairs={fake_run / 'my_pairs'}"])
    extra = evaluate_run(cfg)["models"][-1]
    assert extra["name"] == str(folder) and extra["kind"] == "extra"
    assert "lm" not in extra and "tokenizer differs" in extra["lm_skipped"]
    assert extra["minimal_pairs"]["my_pairs"]["ours"]["pairs"] == 6

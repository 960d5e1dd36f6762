"""bench.tables (the one formatter), the summary's target verdicts, and a tiny `python -m bench`."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import real_text
from bench.student import CACHED_KD, FLOAT16_KD, MORE_SAMPLED_KD, SAMPLED_KD
from bench.__main__ import ensure_teacher, summary
from bench.tables import cell, markdown_sections, markdown_table
from configs import UserError

REPO = Path(__file__).resolve().parents[1]


def test_markdown_table_aligns_and_escapes():
    rows = [{"name": "a|b", "rate": 1234567.8, "ratio": 0.95312, "n": 12000, "gap": None},
            {"name": "c", "rate": 12.3456, "ratio": 1.0, "n": 3, "gap": None}]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[:3] == ["| name |      rate |  ratio |      n |",  # no "gap": all None
                         "| ---- | --------: | -----: | -----: |",  # numbers right-aligned
                         "| a\\|b | 1,234,568 | 0.9531 | 12,000 |"]
    assert len({len(line) for line in lines}) == 1  # padded columns
    assert [cell(v) for v in (None, 3, 12.3456, 0.5, float("nan"))] == ["", "3", "12.35", "0.5", "nan"]


def test_markdown_table_columns_and_sections():
    rows = [{"section": "x", "a": 1, "b": 2}, {"section": "y", "a": 3}]
    assert markdown_table(rows, columns={"a": "A"}).splitlines()[0] == "|   A |"
    text = markdown_sections(rows, by="section")
    assert text.startswith("### x\n\n|   a |   b |")
    assert "### y\n\n|   a |\n| --: |\n|   3 |" in text


def _student_rows(*, cached_vs_ce, rss, cached_ppl):
    # the separate-process ratio says the opposite of the in-process one the verdict must use
    noisy = 1.9 - cached_vs_ce
    speed = [("2x64", "CE baseline", 1.0, 10.0), ("2x64", CACHED_KD, noisy, 10.0 * rss),
             ("2x64", FLOAT16_KD, noisy, 10.0 * rss), ("2x64", SAMPLED_KD, noisy, 10.0 * rss),
             ("2x64", MORE_SAMPLED_KD, noisy, 10.0 * rss),
             ("2x64", "online KD (T=2)", 0.5, 30.0), ("4x256", "CE baseline", 1.0, 20.0),
             ("4x256", CACHED_KD, noisy, 20.0 * rss)]

    def ce_mb(student):
        return 10.0 if student == "2x64" else 20.0

    return ([{"section": "step (one batch, no reading, interleaved)", "run": run, "vs_ce": r}
             for student, run, r, _ in speed
             if student == "2x64" and run in ("CE baseline", CACHED_KD, "online KD (T=2)")]
            + [{"section": "loop (training step with reading, alternating in one process; median "
                           "of 7 processes)", "student": student, "run": run,
                "vs_ce": 1.0 if run == "CE baseline" else cached_vs_ce, "vs_ce_range": "0.9-1.0",
                "processes": 7}
               for student, run, _, _ in speed if run not in ("online KD (T=2)", FLOAT16_KD)]
            + [{"section": "speed", "student": student, "run": run, "tokens_per_s": 1000 * r,
                "vs_ce": r, "peak_rss_mb": mb, "rss_vs_ce": mb / ce_mb(student),
                "process_peak_rss_mb": 300 + mb, "process_rss_vs_ce": (300 + mb) / (300 + ce_mb(student))}
               for student, run, r, mb in speed]
            + [{"section": "quality", "run": run, "val_ppl": ppl} for run, ppl in (
                ("CE baseline", 20.0), ("online KD T=1", 18.0), ("cached KD k=64 T=1", cached_ppl),
                ("online KD T=2", 18.0), ("cached KD k=64 T=2", cached_ppl),
                ("sampled KD m=64 T=1", cached_ppl), ("sampled KD m=64 T=2", cached_ppl),
                ("sampled KD m=128 T=2", cached_ppl))])


def test_summary_marks_targets_honestly():
    good = summary({"student": _student_rows(cached_vs_ce=0.97, rss=1.05, cached_ppl=18.1)})
    bad = summary({"student": _student_rows(cached_vs_ce=0.90, rss=60, cached_ppl=18.5)})
    verdicts = [[row["met"] for row in rows if row["target"]] for rows in (good, bad)]
    assert verdicts == [["met"] * 14, ["NOT met"] * 14]
    assert {row["measured"] for row in good if row["figure"].startswith("bench.")} == {"not run"}


def _real_text_rows(*, cached_ppl, sampled_ppl, cached_vs_ce=0.97, sampled_vs_ce=0.96):
    loop = "loop (training step with reading, alternating in one process; median of 7 processes)"
    return ([{"section": "teacher", "val_ppl": 50.0, "train_tokens": 1000, "head_mass_T=1": 0.9,
              "head_mass_T=2": 0.6},
             {"section": "caches", "cache": "top-256", "bytes_per_token": 400.0}]
            + [{"section": loop, "student": "2x64", "run": run, "tokens_per_s": 1000 * r,
                "vs_ce": r, "vs_ce_range": "0.9-1.0", "processes": 7}
               for run, r in (("CE baseline", 1.0), (real_text.CACHED_KD, cached_vs_ce),
                              (real_text.SAMPLED_KD, sampled_vs_ce),
                              (real_text.MORE_SAMPLED_KD, sampled_vs_ce))]
            + [{"section": "quality", "run": run, "val_ppl": ppl} for run, ppl in (
                ("CE baseline", 60.0), ("online KD T=1", 50.0), ("cached KD k=64 T=1", cached_ppl),
                ("sampled KD m=64 T=1", sampled_ppl), ("online KD T=2", 50.0),
                ("cached KD k=64 T=2", cached_ppl), ("sampled KD m=64 T=2", sampled_ppl),
                ("sampled KD m=128 T=2", sampled_ppl))])


def test_summary_judges_the_real_text_quality_against_online_kd():
    verdicts = [[row["met"] for row in summary({"real_text": _real_text_rows(
        cached_ppl=cached, sampled_ppl=sampled)}) if row["target"]]
        for cached, sampled in ((50.4, 49.6), (49.4, 50.3), (50.6, 50.0))]
    assert verdicts == [["met", "met", "met", "met", "met", "met", "met", "met"],
                        ["NOT met", "NOT met", "met", "met", "met", "met", "met", "met"],
                        ["NOT met", "NOT met", "met", "met", "met", "met", "met", "met"]]
    speed = [row["met"] for row in summary({"real_text": _real_text_rows(
        cached_ppl=50.0, sampled_ppl=50.0, cached_vs_ce=0.96, sampled_vs_ce=0.94)})
        if "tokens/s" in row["figure"]]
    assert speed == ["met", "NOT met", "NOT met"]


def test_sentence_start_bench_compares_the_two_packings(tmp_path, shared_data):
    from bench import sentence_start

    tiny = ("tokenizer.vocab_size=512", "student.n_layer=1", "student.n_embd=16",
            "student.n_head=2", "student.warmup_steps=2")
    suites = {"blimp": shared_data / "blimp" / "blimp_filtered"}
    rows = sentence_start.run(data_dir=shared_data / "babylm" / "2024" / "train_10M",
                              suites=suites, student_epochs=0.02, max_pairs=3, extra=tiny,
                              root=tmp_path)
    stores = {(r["data.document"], r["split"]): r for r in rows if r["section"] == "token stores"}
    assert stores[("line", "train")]["eos"] > 100 * stores[("file", "train")]["eos"]
    words = [stores[(document, "train")]["words"] for document in ("file", "line")]
    assert abs(words[0] - words[1]) < 128  # the same text, less each store's dropped last row
    pairs = [r for r in rows if r.get("context")]
    assert {(r["trained on"], r["context"]) for r in pairs if "accuracy" in r} == {
        (d, c) for d in sentence_start.PACKINGS for c in sentence_start.CONTEXTS}
    assert all(0 <= r["accuracy"] <= 100 for r in pairs if "accuracy" in r)
    assert len([r for r in rows if r["section"].startswith("validation")]) == 4
    assert "### line minus file" in sentence_start.markdown(rows)


def test_real_text_bench_runs_the_stages_on_babylm_text(tmp_path, shared_data):
    tiny = ("tokenizer.vocab_size=512", "teacher.n_layer=1", "teacher.n_embd=32",
            "teacher.n_head=2", "student.n_layer=1", "student.n_embd=16", "student.n_head=2",
            "student.warmup_steps=2", "teacher.warmup_steps=2")
    rows = real_text.run(data_dir=shared_data / "babylm" / "2024" / "train_10M",
                         teacher_epochs=0.1, student_epochs=0.05, curve=((8, 2.0),), extra=tiny,
                         loop_processes=2, root=tmp_path)
    teacher = rows[0]
    assert teacher["section"] == "teacher" and teacher["train_tokens"] > 100_000
    assert 0 < teacher["head_mass_T=2"] < teacher["head_mass_T=1"] < 1
    caches = [r for r in rows if r["section"] == "caches"]
    assert len(caches) == 4 and all(0 < r["bytes_per_token"] < 2000 for r in caches)
    quality = {r["run"]: r for r in rows if r["section"] == "quality"}
    assert list(quality) == ["CE baseline", "online KD T=1", "cached KD k=64 T=1",
                             "sampled KD m=64 T=1", "online KD T=2", "cached KD k=64 T=2",
                             "sampled KD m=64 T=2", "cached KD k=8 T=2", "sampled KD m=16 T=2",
                             "sampled KD m=128 T=2"]
    assert all(1 < r["val_ppl"] < 512 for r in quality.values())
    cached = quality["cached KD k=64 T=2"]
    assert cached["vs_online_%"] == round(
        100 * (cached["val_ppl"] / quality["online KD T=2"]["val_ppl"] - 1), 2)
    assert quality["online KD T=1"]["vs_online_%"] is None
    assert "### quality" in real_text.markdown(rows)
    judged = [row for row in summary({"real_text": rows}) if row["figure"].startswith("BabyLM")
              and row["target"]]
    assert [row["met"] in ("met", "NOT met") for row in judged] == [True] * 8
    loop = {r["run"]: r for r in rows if r["section"].startswith("loop")}
    assert list(loop) == ["CE baseline", real_text.CACHED_KD, real_text.SAMPLED_KD,
                          real_text.MORE_SAMPLED_KD]
    assert all(r["tokens_per_s"] > 0 and r["student"] == "1x16" and r["processes"] == 2
               for r in loop.values())
    low, high = map(float, loop[real_text.MORE_SAMPLED_KD]["vs_ce_range"].split("-"))
    assert low <= loop[real_text.MORE_SAMPLED_KD]["vs_ce"] <= high


def test_draws_bench_measures_the_counted_cache_on_both_languages(tmp_path, shared_data):
    from bench import draws

    tiny = ("tokenizer.vocab_size=512", "teacher.n_layer=1", "teacher.n_embd=32",
            "teacher.n_head=2", "student.n_layer=1", "student.n_embd=16", "student.n_head=2",
            "student.warmup_steps=2", "teacher.warmup_steps=2")
    rows = draws.run(data_dir=shared_data / "babylm" / "2024" / "train_10M", teacher_epochs=0.05,
                     student_epochs=0.02, synthetic_steps=4, teacher_steps=4, seeds=(0, 1),
                     loop_processes=1, rss_repeats=1, extra=tiny, root=tmp_path)
    size = next(r for r in rows if r["section"] == "caches")
    assert 0 < size["bytes_per_token"] < 100
    quality = [r for r in rows if r["section"] == "quality"]
    assert [(r["language"], r["T"]) for r in quality] == [
        ("BabyLM text", 1.0), ("BabyLM text", 2.0), ("synthetic", 1.0), ("synthetic", 2.0)]
    for row in quality:
        assert row["seeds"] == 2 and len(row["per_seed_gap_%"].split(" / ")) == 2
        assert row["vs_online_%"] == round(
            100 * (row["draws_val_ppl"] / row["online_val_ppl"] - 1), 2)
    assert (tmp_path / "text" / "run-draws" / "students" / "draws-draws-T1-seed1").is_dir()
    judged = [row for row in summary({"draws": rows}) if row["target"]]
    assert len(judged) == 4 + 2 * 2 and all(row["met"] in ("met", "NOT met") for row in judged)
    assert "### quality" in draws.markdown(rows)


def test_summary_judges_counted_draws_on_bytes_and_gap():
    def rows(size, gap):
        quality = [{"section": "quality", "language": language, "T": t, "online_val_ppl": 50.0,
                    "draws_val_ppl": 50.0 * (1 + gap / 100), "vs_online_%": gap,
                    "per_seed_gap_%": f"{gap:+.2f}", "seeds": 3}
                   for language in ("BabyLM text", "synthetic") for t in (1.0, 2.0)]
        return [{"section": "caches", "bytes_per_token": size}, *quality]

    verdicts = [[row["met"] for row in summary({"draws": rows(size, gap)}) if row["target"]]
                for size, gap in ((59.5, 0.8), (70.0, 0.8), (59.5, -1.2))]
    assert verdicts == [["met"] * 4, ["NOT met"] * 4, ["NOT met"] * 4]


def test_ensemble_bench_runs_two_teachers_and_llama_students(tmp_path, shared_data):
    from bench import ensemble

    tiny = ("tokenizer.vocab_size=512", "teacher.n_layer=1", "teacher.n_embd=32",
            "teacher.n_head=2", "teacher.epochs=0.05", "teacher.warmup_steps=2",
            "student.n_layer=1", "student.n_embd=16", "student.n_head=2", "student.epochs=0.02",
            "student.warmup_steps=2", "cache.k=8", "eval.max_pairs_per_file=2")
    rows = ensemble.run(data_dir=shared_data / "babylm" / "2024" / "train_10M", extra=tiny,
                        loop_processes=1, rss_repeats=1, root=tmp_path)
    teachers = [r for r in rows if r["section"] == "teachers"]
    assert [(r["teacher"], r["architecture"]) for r in teachers] == [("gpt2", "gpt2"),
                                                                    ("llama", "llama")]
    assert all(0 < r["cache_bytes_per_token"] < 100 for r in teachers)
    students = {r["run"]: r for r in rows if r["section"].startswith("students")}
    assert list(students) == list(ensemble.students({"gpt2": tmp_path, "llama": tmp_path}))
    topk = [r for r in rows if r["section"].startswith("top-")]
    assert [r["T"] for r in topk] == [1.0, 2.0]
    assert all(0 <= r["mass_in_a_tail_%"] < 100 and r["kl_nats_per_token"] >= 0 for r in topk)
    assert all(1 < r["val_ppl"] < 512 and 0 <= r["blimp_%"] <= 100 for r in students.values())
    assert students["online ensemble, probability mixture"]["vs_online_mixture_%"] == 0
    assert (tmp_path / "run" / "students" / "kd-a0.5-T2-mix-gpt2_0.5-llama_0.5").is_dir()
    judged = [row for row in summary({"ensemble": rows}) if row["target"]]
    assert len(judged) == 5 and all(row["met"] in ("met", "NOT met") for row in judged)
    assert "### students (2 x 64 LLaMA)" in ensemble.markdown(rows)


def test_remote_bench_reads_and_trains_from_a_local_s3_server(tmp_path):
    from bench import remote

    rows = remote.run(teacher_steps=10, loop_steps=4, loop_processes=1, reader_passes=1,
                      root=tmp_path)
    reader = {r["place"]: r for r in rows if r["section"].startswith("reader")}
    assert list(reader) == ["local disk", "S3", "S3 + 20 ms"]
    assert all(r["tokens_per_s"] > 0 for r in reader.values())
    loop = [(r["student"], r["run"]) for r in rows if r["section"].startswith("loop")]
    runs = ["CE baseline, local disk", "KD, local disk", "KD, S3", "KD, S3 + 20 ms"]
    assert loop == [(student, run) for student in ("2x64", "4x256") for run in runs]
    judged = [row for row in summary({"remote": rows}) if row["target"]]
    assert len(judged) == 6 and all(row["met"] in ("met", "NOT met") for row in judged)
    assert "### reader" in remote.markdown(rows)


def test_python_m_bench_tiny(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, "-m", "bench", "--only", "evaluate", "--pairs", "60",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    for part in ("| cpu ", "| load average ", "## Summary", "minimal pairs/s", "## bench.evaluate",
                 "| threads |"):
        assert part in text
    assert "== summary ==" in result.stdout


def test_a_missing_teacher_elsewhere_is_refused_not_trained(tmp_path):
    with pytest.raises(UserError, match="no trained model there"):
        ensure_teacher(tmp_path / "none", tmp_path / "tokens.zarr")
    assert not any(tmp_path.iterdir())


def test_gpu_check_tiny_dry_run_passes_every_section():
    """bench.gpu_check needs a GPU for its numbers, but --tiny runs every section (fp16, sampled,
    counted-draws and NF4 logits jobs, QLoRA and LoRA fine-tunes, the fused loss, students in
    seven modes) on the CPU, so the script cannot rot between the sessions that are lent one."""
    from bench import gpu_check

    rows = gpu_check.run(tiny=True)
    checks = {row["check"]: row for row in rows}
    assert not [name for name in checks if "FAILED" in name]
    verdicts = [row["value"] for name, row in checks.items() if "cache vs direct forward" in name]
    assert verdicts == ["PASS"] * 6  # fp16, sampled, counted draws, nf4, qlora-, lora-tuned
    counted = checks["teacher fp16 counted draws: cache vs direct forward"]
    assert "T = 2: 48 draws" in counted["note"]
    assert "+ LoRA adapter" in checks["teacher qlora-tuned: load"]["note"]
    for mode in gpu_check.STUDENT_MODES:
        assert checks[f"student {mode}: tokens/s"]["value"] > 0
    assert "x CE" in checks["student cached KD, top-k: tokens/s"]["note"]

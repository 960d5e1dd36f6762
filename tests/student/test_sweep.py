"""A 2 x 2 alpha x temperature sweep on one cache: four run directories, a summary, resumable."""

import json

import pytest

from configs import UserError
from student import sweep as sweeper
from student import train as trainer
from training import checkpoint as checkpoints
from training import metrics as metrics_log
from tests.student.test_train import config, make_run, one_thread  # noqa: F401 (autouse)


def test_two_by_two_sweep_writes_four_runs_and_a_summary(tmp_path, capsys, monkeypatch):
    root = make_run(tmp_path, n_train=64)
    cfg = config(root, "student.max_steps=3", "distill.sweep_alphas=[0.5, 0.8]",
                 "distill.sweep_temperatures=[1.0, 3.0]")
    opened = []
    real_open = trainer.open_cache
    monkeypatch.setattr(trainer, "open_cache", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    rows = sweeper.sweep(cfg)
    names = {"kd-a0.5-T1-k8", "kd-a0.5-T3-k8", "kd-a0.8-T1-k8", "kd-a0.8-T3-k8"}
    assert {r["run"] for r in rows} == names and len(opened) == 1
    for name in names:
        folder = root / "students" / name
        assert checkpoints.is_finished(folder) and len(metrics_log.read_metrics(folder / "metrics.jsonl")) == 3
        assert (folder / "config.yaml").read_text().count("alpha: 0.") == 1
    out = capsys.readouterr().out
    assert "approximating" in out  # T = 3 is not stored (1 and 2 are)
    summary = json.loads((root / "reports" / "sweep.json").read_text())
    assert {r["run"] for r in summary} == names and all(r["val_ppl"] > 1 for r in summary)
    assert all(name in (root / "reports" / "sweep.md").read_text() for name in names)
    assert "| val loss | val ppl |" in out

    again = sweeper.sweep(cfg)  # finished runs are skipped, the summary stays the same
    assert all(r["status"] == "finished earlier" for r in again)
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in rows]


def test_grid_deduplicates_the_baseline_and_uses_sweep_ks(tmp_path):
    cfg = config(tmp_path, "cache.k=16", "distill.sweep_alphas=[1.0, 0.5]",
                 "distill.sweep_temperatures=[1.0, 2.0]", "distill.sweep_ks=[4, 16]")
    names = [trainer.run_name(point) for point in sweeper.grid(cfg)]
    assert names == ["baseline", "kd-a0.5-T1-k4", "kd-a0.5-T1-k16", "kd-a0.5-T2-k4",
                     "kd-a0.5-T2-k16"]


def test_an_empty_grid_is_refused_and_keeps_the_last_report(tmp_path):
    root = make_run(tmp_path, n_train=64)
    sweeper.sweep(config(root, "student.max_steps=1", "distill.sweep_alphas=[0.5]",
                         "distill.sweep_temperatures=[1.0]"))
    report = (root / "reports" / "sweep.json").read_bytes()
    for empty in ("distill.sweep_alphas=[]", "distill.sweep_temperatures=[]"):
        with pytest.raises(UserError, match=f"{empty.split('=')[0]} is empty"):
            sweeper.sweep(config(root, "student.max_steps=1", empty))
    assert (root / "reports" / "sweep.json").read_bytes() == report

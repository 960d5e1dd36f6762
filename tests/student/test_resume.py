"""A student folder has one writer and honest resumes: a second run into it is refused, a resume
under other settings is refused naming the keys (or, when asked, continues and records what
changed from which step), and a full disk while checkpointing is one line, leaving no temporary
folder, with the rerun ending as an uninterrupted run."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.cli import run
from student import train as trainer
from training.loop import lr_factor
from tests.student.test_train import (CONFIG, REPO, make_run, metrics, one_thread,  # noqa: F401
                                      overrides, weights, without_timing)


def train_cli(root: Path, *extra: str) -> None:
    run(trainer.main, "train", argv=["--config", str(CONFIG), *overrides(root, *extra)])


def refused(capsys, root: Path, *extra: str) -> str:
    """The one error line of a train command that must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli(root, *extra)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    return err[-1]


def interrupted_at(root: Path, name: str, *extra: str) -> Path:
    """A student stopped after a checkpoint at step 4 of 8 (its final model never written)."""
    out = trainer.train(trainer_config(root, f"distill.run={name}", "student.max_steps=4",
                                       "student.checkpoint_every=4", *extra))
    for final in ("config.json", "model.safetensors", "generation_config.json"):
        (out / final).unlink(missing_ok=True)
    return out


def trainer_config(root: Path, *extra: str):
    from configs import load_config
    return load_config(CONFIG, overrides(root, *extra))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("resume"), n_train=64)


@pytest.mark.parametrize("change, named", [
    (["student.lr=1e-3"], "student.lr 0.003 -> 0.001"),
    (["student.n_layer=1"], "student.n_layer 2 -> 1"),
    (["distill.temperature=4.0"], "distill.temperature 2.0 -> 4.0"),
])
def test_a_resume_under_other_settings_is_refused_naming_them(root, capsys, change, named):
    out = interrupted_at(root, f"refuse-{change[0].split('=')[0]}")
    before = (out / "checkpoint" / "trainer_state.pt").read_bytes()
    line = refused(capsys, root, f"distill.run={out.name}", "student.max_steps=8", *change)
    assert named in line and str(out / "checkpoint") in line, line
    assert (out / "checkpoint" / "trainer_state.pt").read_bytes() == before


def test_max_steps_below_the_checkpoint_is_refused(root, capsys):
    out = interrupted_at(root, "shorter")
    line = refused(capsys, root, f"distill.run={out.name}", "student.max_steps=2",
                   "student.resume_with_new_settings=true")
    assert "step 4, past the 2 steps" in line, line
    assert not (out / "config.json").exists()


def test_shape_changes_are_refused_even_when_asked_to_continue(root, capsys):
    out = interrupted_at(root, "shape")
    line = refused(capsys, root, f"distill.run={out.name}", "student.max_steps=8",
                   "student.n_embd=64", "student.resume_with_new_settings=true")
    assert "student.n_embd 32 -> 64" in line and "cannot change" in line, line


def test_asked_to_continue_the_new_lr_holds_from_the_checkpoint_and_is_recorded(root):
    out = interrupted_at(root, "newlr")
    trainer.train(trainer_config(root, f"distill.run={out.name}", "student.max_steps=8",
                                 "student.lr=1e-3", "student.resume_with_new_settings=true"))
    rows = metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert rows[4]["settings_changed"] == {"student.lr": [0.003, 0.001],
                                           "student.max_steps": [4, 8]}
    assert all("settings_changed" not in row for row in rows[:4] + rows[5:])
    schedule = trainer_config(root).student.schedule
    for row in rows[4:]:  # the new peak lr under the new schedule's length
        factor = lr_factor(row["step"], warmup=5, total=8, schedule=schedule)
        assert row["lr"] == pytest.approx(1e-3 * factor, rel=1e-6)
    header = (out / "config.yaml").read_text().splitlines()[0]
    assert header == "# from step 4: student.lr 0.003 -> 0.001, student.max_steps 4 -> 8", header


def test_two_runs_into_one_folder_end_with_one_refusal_and_one_intact_student(root):
    steps = ["student.max_steps=400", "student.checkpoint_every=100"]
    command = [sys.executable, "-m", "student.train", "--config", str(CONFIG),
               *overrides(root, "distill.run=twice", *steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process run below (one_thread)
    both = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=600), *proc.communicate()) for proc in both]
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-2000:] for *_, err in results]
    _, _, err = next(result for result in results if result[0] == 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "being trained by another process" in lines[0], lines
    straight = trainer.train(trainer_config(root, "distill.run=straight-twice", *steps))
    student = root / "students" / "twice"
    assert without_timing(metrics(student)) == without_timing(metrics(straight))
    a, b = weights(straight), weights(student)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_ends_as_usual(
        root, capsys):
    steps = ["student.max_steps=8", "student.checkpoint_every=2"]
    straight = trainer.train(trainer_config(root, "distill.run=disk-straight", *steps))
    checkpoint_bytes = sum(f.stat().st_size for f in (straight / "checkpoint").iterdir())
    out = root / "students" / "disk"
    out.mkdir()
    # Room for one checkpoint and the metrics, not for the next one written beside it.
    size_kb = int(checkpoint_bytes * 1.5) // 1024
    if mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(out)).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        line = refused(capsys, root, "distill.run=disk", *steps)
        assert line.startswith("error: disk full while writing") and "checkpoint.tmp" in line
        assert not (out / "checkpoint.tmp").exists()
        assert mount("-o", f"remount,size={size_kb * 4}k", str(out)).returncode == 0
        trainer.train(trainer_config(root, "distill.run=disk", *steps))
        assert without_timing(metrics(out)) == without_timing(metrics(straight))
        a, b = weights(straight), weights(out)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    finally:
        gc.collect()  # tensors loaded from the mount may still map its files
        subprocess.run(["umount", "--lazy", str(out)], check=True)


def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def test_a_file_where_the_student_folder_belongs_is_one_line(root, capsys):
    (root / "students").mkdir(exist_ok=True)
    (root / "students" / "in-the-way").write_text("not a folder\n")
    line = refused(capsys, root, "distill.run=in-the-way", "student.max_steps=2")
    assert "in-the-way" in line and "a file where a folder belongs" in line, line
    assert (root / "students" / "in-the-way").read_text() == "not a folder\n"

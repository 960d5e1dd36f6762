"""Every stage end to end (`make demo`): data, teacher(s), teacher logits, CE baseline, distilled
student, alpha x temperature sweep, evaluation and report.

Each stage is the same function its own `make` target runs, so the demo exercises the public
entry points. Stages resume: rerunning after an interruption redoes only unfinished work.
"""

from __future__ import annotations

import time

from configs import Config
from configs.cli import run
from precompute.corpus import prepare
from precompute.logits import fill_caches
from precompute.teacher import train_teacher
from student import evaluate
from student.sweep import sweep
from student.train import train


def stages(cfg: Config) -> list[tuple[str, callable]]:
    baseline = cfg.replace(**{"distill.alpha": 1.0})
    return [
        ("data", lambda: prepare(cfg)),
        ("teacher", lambda: [train_teacher(view) for view in cfg.each_teacher()]),
        ("teacher-logits", lambda: [fill_caches(view) for view in cfg.each_teacher()]),
        ("baseline", lambda: train(baseline)),
        ("distill", lambda: train(cfg)),
        ("sweep", lambda: sweep(cfg)),
        ("eval", lambda: evaluate.main(cfg)),
    ]


def run_pipeline(cfg: Config) -> None:
    started = time.perf_counter()
    for name, stage in stages(cfg):
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        stage_started = time.perf_counter()
        stage()
        print(f"=== {name} done in {time.perf_counter() - stage_started:.0f} s", flush=True)
    print(f"\nall stages done in {time.perf_counter() - started:.0f} s; "
          f"report: {cfg.run_path / 'reports' / 'report.md'}")


if __name__ == "__main__":
    run(run_pipeline, "Run every stage end to end (make demo).")

"""Crash and resume with real processes: the teacher-logits job SIGKILLed at seeded random
moments and rerun ends equal to an uninterrupted run byte for byte (world.cache_digest); Ctrl-C
stops it cleanly."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from storage.cache import open_cache
from storage.location import file_exists
from tests.reliability.world import message_lines, started, torn_leftovers

SEED = 20240611


def wait_started(process, what: str) -> None:
    """Block until the job prints its first stdout line (it has parsed its config, found its
    inputs and is about to load the teacher)."""
    line = process.stdout.readline()
    assert line, f"{what} ended before printing anything (exit {process.wait()})"


def assert_done_shards_sound(cache_path) -> int:
    """Every shard marked done reads back with good checksums; returns how many are done. The
    cache may be a folder or in object storage (a storage.location.Remote)."""
    if not file_exists(cache_path / "zarr.json"):
        return 0
    cache = open_cache(cache_path, allow_incomplete=True)
    problems = [p for p in cache.verify() if "not done" not in p]
    assert problems == [], problems
    return int(cache.done.sum())


def shard_in_flight(cache) -> bool:
    """A shard has data files but no done mark yet: its writer is between those two points."""
    if cache is None or not (cache / "ids" / "c").is_dir():
        return False
    done = set(os.listdir(cache / "done" / "c")) if (cache / "done" / "c").is_dir() else set()
    return bool(set(os.listdir(cache / "ids" / "c")) - done)


def kill_after(process, *, delay: float, cache, mid_write: bool) -> None:
    """SIGKILL `process` `delay` seconds from now or, with `mid_write`, at the first moment
    after that when a shard write is seen in flight; nothing if it has exited by then."""
    try:
        process.wait(timeout=delay)
        return
    except subprocess.TimeoutExpired:
        pass
    while mid_write and process.poll() is None and not shard_in_flight(cache):
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)


def test_sigkill_at_random_moments_then_resume_is_byte_identical(world, chaos_kills, tmp_path,
                                                                    capsys):
    """Kill the job `chaos_kills` times, rerunning after each kill. Each kill comes after a
    seeded random delay (uniform in [0, a quarter of the clean job's duration]); every third
    one then also waits until a shard write is in flight, so some kills surely land between a
    shard's first data file and its done mark. A rerun that finishes before its kill ends a
    "chain": its cache is compared with the clean one and deleted, and the next run starts
    from nothing, so the number of kills does not depend on the machine's speed."""
    rng = random.Random(SEED)
    run = world.new_run(tmp_path / "run")
    cache = run / "cache" / "train.zarr"
    command = world.command("precompute.logits", run)
    kills, chains, torn, resumed_from = 0, 0, 0, []
    while True:
        killing = kills < chaos_kills
        delay = rng.uniform(0, world.clean_seconds / 4)
        with started(command, stderr_file=tmp_path / f"stderr-{kills}-{chains}") as process:
            wait_started(process, "the logits job")
            if killing:
                kill_after(process, delay=delay, cache=cache, mid_write=kills % 3 == 1)
            returncode = process.wait(timeout=300)
        if returncode == -signal.SIGKILL:
            kills += 1
            torn += bool(cache.is_dir() and torn_leftovers(cache))
            resumed_from.append(assert_done_shards_sound(cache))
            continue
        assert returncode == 0, (tmp_path / f"stderr-{kills}-{chains}").read_text()[-2000:]
        chains += 1
        assert world.differences(cache) == []
        if not killing:
            break
        shutil.rmtree(run / "cache")  # the job won the race: start another chain
    with capsys.disabled():
        print(f"\n[chaos] {kills} SIGKILLs survived, {torn} inside a shard write, {chains} "
              f"caches rebuilt byte for byte equal to the clean one; "
              f"done shards at each kill: {resumed_from}")
    assert kills >= chaos_kills
    assert torn >= 1, "no kill landed inside a shard write"


def test_ctrl_c_stops_cleanly_and_the_rerun_completes(world, tmp_path):
    # On an idle machine the tiny job can finish before the interrupt lands; such a run proves
    # nothing about Ctrl-C, so it is checked like a clean run and the interrupt tried again.
    for attempt in range(3):
        run = world.new_run(tmp_path / f"run{attempt}")
        cache = run / "cache" / "train.zarr"
        command = world.command("precompute.logits", run)
        stderr_file = tmp_path / f"stderr{attempt}"
        with started(command, stderr_file=stderr_file) as process:
            wait_started(process, "the logits job")
            deadline = time.monotonic() + 120
            while not (cache / "done" / "c").is_dir():  # interrupt mid-job, not during start-up
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=120)
        if returncode == 130:
            break
        assert returncode == 0
        assert world.differences(cache) == []
    assert returncode == 130, "the job finished before every interrupt"
    stderr = stderr_file.read_text()
    assert "Traceback" not in stderr
    lines = message_lines(stderr)
    assert lines[-1] == "interrupted: finished work is kept; rerun the same command to resume"
    assert sum("interrupted" in line or line.startswith("error") for line in lines) == 1, lines
    done = assert_done_shards_sound(cache)
    assert 1 <= done < open_cache(cache, allow_incomplete=True).n_shards
    assert torn_leftovers(cache) == [], "Ctrl-C should let the writer finish the queued shards"

    with started(command, stderr_file=tmp_path / "stderr-rerun") as process:
        assert process.wait(timeout=300) == 0
        assert "cached train" in process.stdout.read()
    assert world.differences(cache) == []


# ------------------------------------------------------------------------------ student training

TIMING = ("tokens_per_s", "elapsed_s")
"""metrics.jsonl keys that are wall-clock measurements, different in every run; every other key
of every line must match the uninterrupted run."""


def student_result(folder) -> tuple[dict, list[dict]]:
    """(weights name -> tensor, metrics rows without the timing keys) of a finished student."""
    from safetensors.torch import load_file

    from training.metrics import read_metrics

    rows = [{k: v for k, v in row.items() if k not in TIMING}
            for row in read_metrics(folder / "metrics.jsonl")]
    return load_file(folder / "model.safetensors"), rows


def assert_same_student(folder, clean) -> None:
    weights, rows = student_result(folder)
    clean_weights, clean_rows = clean
    assert sorted(weights) == sorted(clean_weights)
    assert [name for name in weights if not torch.equal(weights[name], clean_weights[name])] == []
    assert rows == clean_rows


@pytest.fixture(scope="module")
def clean_student(world, tmp_path_factory):
    """The uninterrupted reference: (result, seconds the in-process training took)."""
    train = pytest.importorskip("student.train")
    from configs import load_config

    run = world.new_run(tmp_path_factory.mktemp("student") / "run")
    shutil.copytree(world.clean_cache, run / "cache" / "train.zarr")
    began = time.perf_counter()
    folder = train.train(load_config(world.config, [f"run_dir={run}"]))
    return student_result(folder), time.perf_counter() - began


def student_run(world, tmp_path):
    run = world.new_run(tmp_path / "run")
    shutil.copytree(world.clean_cache, run / "cache" / "train.zarr")
    return run, run / "students" / "kd-a0.5-T2-k8", world.command("student.train", run)


def wait_touched(process, path) -> None:
    """Block until this process has replaced or modified `path`: metrics.jsonl (truncated to
    the checkpoint on start, then a line per step) or checkpoint/ (renamed into place)."""
    def state():
        return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None

    before, deadline = state(), time.monotonic() + 180
    while state() in (before, None):
        if process.poll() is not None:
            return
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_student_sigkill_then_resume_gives_the_same_weights_and_metrics(world, clean_student,
                                                                         chaos_kills, tmp_path,
                                                                         capsys):
    """Like the logits chain, with fewer kills (a third of --chaos-kills, at least 3: each
    costs a full process start) at uniform delays in [0, a third of the clean training time]
    after the run starts training; every other kill first waits for this run to write a
    checkpoint (every 4 of 24 steps), so later runs surely resume from one."""
    clean, seconds = clean_student
    rng = random.Random(SEED + 1)
    run, folder, command = student_run(world, tmp_path)
    target = max(3, chaos_kills // 3)
    kills, chains, resumed = 0, 0, 0
    while True:
        killing = kills < target
        with started(command, stderr_file=tmp_path / f"stderr-{kills}-{chains}") as process:
            if killing:
                wait_touched(process, folder / "metrics.jsonl")
                if kills % 2:
                    wait_touched(process, folder / "checkpoint")
                kill_after(process, delay=rng.uniform(0, seconds / 3), cache=None, mid_write=False)
            out, _ = process.communicate(timeout=300)
        resumed += "resuming" in out
        if process.returncode == -signal.SIGKILL:
            kills += 1
            continue
        assert process.returncode == 0, (tmp_path / f"stderr-{kills}-{chains}").read_text()[-2000:]
        chains += 1
        assert_same_student(folder, clean)
        if not killing:
            break
        shutil.rmtree(run / "students")
    with capsys.disabled():
        print(f"\n[chaos] student: {kills} SIGKILLs survived, {resumed} runs resumed from a "
              f"checkpoint, {chains} students identical to the clean one")
    assert kills >= target and resumed >= 1


def test_student_ctrl_c_checkpoints_and_the_rerun_matches(world, clean_student, tmp_path):
    run, folder, command = student_run(world, tmp_path)
    with started(command, stderr_file=tmp_path / "stderr") as process:
        wait_touched(process, folder / "metrics.jsonl")
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    assert message_lines(stderr)[-1] == (
        "interrupted: finished work is kept; rerun the same command to resume")
    assert (folder / "checkpoint" / "model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    with started(command, stderr_file=tmp_path / "stderr-rerun") as process:
        out, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "resuming" in out, out
    assert_same_student(folder, clean_student[0])

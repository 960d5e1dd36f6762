"""The teacher-logits job and a student with their stores in object storage: a real S3 server
(moto, in this process: tests/conftest.py `s3`) behind a TCP proxy, and real job processes
pointed at it through the environment, as a user's would be. SIGKILL and resume end byte-identical
to the local reference; two jobs share one cache; a connection cut mid-job is one clear error,
marks nothing done that is not complete, and a rerun finishes; a student on another machine
trains from the stores; no credential is written anywhere."""

from __future__ import annotations

import re
import signal
import time
import uuid
from pathlib import Path

import yaml

from storage.cache import open_cache
from storage.location import Remote, download_folder, upload_folder
from tests.reliability.test_kill_resume import assert_done_shards_sound
from tests.reliability.world import N_TRAIN, PYTHON, SEQ_LEN, cli, message_lines, started

LEASE = "storage.lease_seconds=2"


def fresh(s3) -> Remote:
    return Remote(f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}", s3.options())


def fail_fast_config(world, tmp_path: Path) -> Path:
    """tiny.yaml with storage.options that give up on a dead connection in seconds (one attempt
    a request, short timeouts): the endpoint and credentials stay in the environment."""
    settings = yaml.safe_load(world.config.read_text())
    settings["storage"] = {"options": {"config_kwargs": {
        "connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}}}
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config


def job(module: str, config: Path, run: Path, *overrides: str) -> list[str]:
    return [PYTHON, "-m", module, "--config", str(config), f"run_dir={run}", *overrides]


def logits_command(config: Path, run: Path, root: Remote, *overrides: str) -> list[str]:
    """The logits job writing its cache under `root`."""
    return job("precompute.logits", config, run, f"storage.caches={root.url}", LEASE, *overrides)


def done_marks(cache: Remote) -> int:
    done = cache / "done" / "c"
    return len(done.files()) if done.exists() else 0


def wait_for_done_marks(cache: Remote, process, at_least: int) -> None:
    while done_marks(cache) < at_least:
        assert process.poll() is None, "the job ended before it was interrupted"
        time.sleep(0.05)


def local_copy(cache: Remote, where: Path) -> Path:
    download_folder(cache, where)
    return where


def test_killed_and_resumed_on_s3_is_byte_identical(world, s3, tmp_path):
    root, run = fresh(s3), world.new_run(tmp_path / "run")
    command = logits_command(fail_fast_config(world, tmp_path), run, root)
    cache = root / "cache" / "train.zarr"
    with started(command, env=s3.env, stderr_file=tmp_path / "killed.err") as process:
        wait_for_done_marks(cache, process, 3)
        process.send_signal(signal.SIGKILL)
    written = assert_done_shards_sound(cache)
    assert 3 <= written < open_cache(cache, allow_incomplete=True).n_shards
    rerun = cli(command, env=s3.env)  # waits out the killed job's leases (2 s)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({cache.url})" in rerun.stdout
    assert world.differences(local_copy(cache, tmp_path / "copy")) == []


def test_two_jobs_share_a_remote_cache(world, s3, tmp_path):
    root, run = fresh(s3), world.new_run(tmp_path / "run")
    command = logits_command(fail_fast_config(world, tmp_path), run, root)
    with started(command, env=s3.env, stderr_file=tmp_path / "a.err") as a, \
            started(command, env=s3.env, stderr_file=tmp_path / "b.err") as b:
        outs = [process.communicate(timeout=300)[0] for process in (a, b)]
        assert (a.returncode, b.returncode) == (0, 0)
    computed = [int(m.group(1).replace(",", "")) if (m := re.search(
        r"cached train: ([\d,]+) tokens computed", out)) else 0 for out in outs]
    assert sum(computed) == N_TRAIN * SEQ_LEN, outs  # every shard computed once, by one of the two
    cache = root / "cache" / "train.zarr"
    assert world.differences(local_copy(cache, tmp_path / "copy")) == []


def test_connection_cut_mid_job_is_one_error_and_a_rerun_finishes(world, s3, tmp_path):
    root, run = fresh(s3), world.new_run(tmp_path / "run")
    command = logits_command(fail_fast_config(world, tmp_path), run, root)
    cache = root / "cache" / "train.zarr"
    try:
        with started(command, env=s3.env, stderr_file=tmp_path / "cut.err") as process:
            wait_for_done_marks(cache, process, 2)
            s3.proxy.cut()
            process.communicate(timeout=240)
            assert process.returncode == 2
    finally:
        s3.proxy.restore()
    errors = [line for line in message_lines((tmp_path / "cut.err").read_text())
              if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach" in errors[0], errors
    assert "babylm-kd-secret" not in (tmp_path / "cut.err").read_text()
    assert_done_shards_sound(cache)  # nothing marked done that is not complete
    rerun = cli(command, env=s3.env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert world.differences(local_copy(cache, tmp_path / "copy")) == []


def test_a_student_on_another_machine_trains_from_the_stores(world, s3, tmp_path):
    """Machine A puts the token stores (with the tokenizer) and the cache in the bucket; machine
    B, with nothing but the config, trains a student from them."""
    root = fresh(s3)
    for split in ("train", "val"):
        upload_folder(world.tokens / f"{split}.zarr", root / "tokens" / f"{split}.zarr")
    upload_folder(world.root / "tokenizer", root / "tokens" / "tokenizer", last="tokenizer.json")
    where = [f"storage.tokens={root.url}/tokens", f"storage.caches={root.url}"]
    config = fail_fast_config(world, tmp_path)
    machine_a = tmp_path / "a"
    logits = cli(logits_command(config, machine_a, root, *where), env=s3.env)
    assert logits.returncode == 0, logits.stderr[-2000:]
    assert not (machine_a / "tokens").exists()  # nothing but the config record stays local

    machine_b = tmp_path / "b"
    student = cli(job("student.train", config, machine_b, *where), env=s3.env)
    assert student.returncode == 0, student.stderr[-2000:]
    (folder,) = (machine_b / "students").iterdir()
    assert (folder / "model.safetensors").is_file() and (machine_b / "tokenizer").is_dir()
    card = (folder / "README.md").read_text()
    assert f"{root.url}/cache/train.zarr" in card

    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    written = [f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()]
    written += [obj.read() for obj in root.files()]
    written += [text.encode() for text in (logits.stdout, logits.stderr, student.stdout,
                                           student.stderr)]
    assert not any(secret.encode() in data for data in written)

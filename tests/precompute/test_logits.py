"""The teacher-logits job: cached values equal the teacher's own, an interrupted job (SIGKILL)
resumes to the same cache (tests/reliability/world.py cache_digest: every file byte for byte),
two torchrun ranks write what one process writes, the writer thread leaves the forward
bit-exact, and bad inputs end with one line, exit code 2 and nothing overwritten."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from configs.cli import run as run_cli, teacher_option
from precompute.logits import Sampling, fill_caches, main, teacher_topk, write_cache
from storage.__main__ import inspect_path
from storage.cache import encode_values, open_cache
from storage.tokens import open_token_store
from tests.precompute.tiny_teacher import cli_args, save_teacher, tiny_config, tiny_run
from tests.reliability.world import cache_differences

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


MARKER = "BABYLM_KD_TEST_JOB"
"""Environment variable marking every process a test job started, its descendants included."""


def marked_processes(value: str) -> list[int]:
    """Live processes whose environment holds MARKER=value (zombies have an empty environ)."""
    wanted, found = f"{MARKER}={value}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def job_processes(command: list[str], **popen) -> Iterator[subprocess.Popen]:
    """Run `command`; on the way out, whatever happened, SIGKILL it and every process it started
    and reap it. torchrun starts each rank in a session of its own, so killing a process group
    would miss them: they are found by a marker in the environment they inherit instead."""
    value = uuid.uuid4().hex
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, MARKER: value}, **popen)
    try:
        yield process
    finally:
        deadline = time.monotonic() + 30
        while (pids := marked_processes(value)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        process.wait(timeout=60)
        for pipe in (process.stdout, process.stderr):
            if pipe:
                pipe.close()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_no_process_of_a_job_outlives_it():
    # A child that starts a grandchild in a session of its own, as torchrun starts its ranks.
    spawner = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(300)'], start_new_session=True); print(p.pid, flush=True);"
               " time.sleep(300)")
    with job_processes([PYTHON, "-c", spawner], stdout=subprocess.PIPE, text=True) as process:
        grandchild = int(process.stdout.readline())
        assert alive(grandchild)
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild) and process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "model", seed=4)


def uses(teacher, *extra):
    return ("teacher.from_scratch=false", f"teacher.model={teacher}", *extra)


def returning(logits: torch.Tensor):
    """A stand-in teacher whose forward returns `logits` whatever its input."""
    return lambda input_ids, **_: type("Out", (), {"logits": logits})


def test_topk_and_lse_of_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50)
    ids, values, lse = teacher_topk(returning(logits), torch.zeros(2, 3, dtype=torch.long), k=5,
                                    temperatures=(1.0, 2.0))
    assert ids.dtype == torch.int32 and ids.shape == values.shape == (2, 3, 5)
    assert torch.all(values[..., :-1] >= values[..., 1:])
    torch.testing.assert_close(values, logits.gather(-1, ids.long()))
    torch.testing.assert_close(lse[..., 1], torch.logsumexp(logits / 2, -1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    """64 draws at each of 512 positions with the same logits: the counts against 32,768 x
    softmax(logits / T) are within 5 standard deviations for every id (the other temperature's
    softmax is off by more than 20 for some id)."""
    torch.manual_seed(0)
    logits = (torch.randn(50).double() * 3).expand(8, 64, 50)
    ids, values, lse = teacher_topk(returning(logits), torch.zeros(8, 64, dtype=torch.long), k=64,
                                    temperatures=(1.0, 2.0), sampling=Sampling(temperature, 0))
    torch.testing.assert_close(values, logits.float().gather(-1, ids.long()))
    torch.testing.assert_close(lse[..., 1], torch.logsumexp(logits / 2, -1).float())
    counts = torch.bincount(ids.flatten().long(), minlength=50).double()

    def deviation(t):
        expected = 8 * 64 * 64 * torch.softmax(logits[0, 0] / t, -1)
        return ((counts - expected).abs() / (expected.sqrt() + 1)).max()

    assert deviation(temperature) < 5 and deviation(3 - temperature) > 20


def test_each_id_is_drawn_floor_or_ceil_of_k_times_its_probability():
    """Systematic draws: at every position an id with probability p appears floor(64 p) or
    ceil(64 p) times (independent draws would stray from that at most positions)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 32, 50) * 3
    ids, _, _ = teacher_topk(returning(logits), torch.zeros(4, 32, dtype=torch.long), k=64,
                             temperatures=(1.0,), sampling=Sampling(2.0, 0))
    counts = torch.nn.functional.one_hot(ids.long(), 50).sum(-2).double()
    expected = 64 * torch.softmax(logits.double() / 2, -1)
    assert torch.all(counts >= (expected - 1e-4).floor()) and torch.all(counts <= (expected + 1e-4).ceil())
    assert torch.any(counts != expected.round())  # the fractional parts are drawn, not rounded


def test_draws_in_row_blocks_equal_one_draw(monkeypatch):
    """The job draws DRAW_BLOCK_ELEMENTS at a time to bound its memory; on the CPU the draws are
    those of one call over the whole batch, so the block size never changes a cache."""
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 50) * 3

    def draw():
        return teacher_topk(returning(logits), torch.zeros(4, 16, dtype=torch.long), k=32,
                            temperatures=(1.0, 2.0), sampling=Sampling(2.0, 7), first_row=3)

    whole = draw()
    monkeypatch.setattr("precompute.logits.DRAW_BLOCK_ELEMENTS", 7 * 50)  # 10 blocks, a short last
    for single, blocked in zip(whole, draw()):
        assert torch.equal(single, blocked)


def test_cache_holds_the_teachers_own_logits(tmp_path, teacher):
    run = tiny_run(tmp_path, n_train=96, n_val=32)
    fill_caches(tiny_config(run, *uses(teacher, "cache.splits=[train, val]")))
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for split in ("train", "val"):
        store = open_token_store(run / "tokens" / f"{split}.zarr")
        cache = open_cache(run / "cache" / f"{split}.zarr", token_store=store, vocab_size=300)
        assert cache.manifest["teacher"]["name"] == str(teacher)
        block = cache.read(0, store.n_sequences)
        with torch.inference_mode():
            logits = model(torch.from_numpy(store.read(0, store.n_sequences).astype(np.int64))
                           ).logits.double().numpy()
        top_values = np.sort(logits, axis=-1)[..., ::-1][..., :8]
        np.testing.assert_array_equal(block.ids, np.argsort(-logits, axis=-1, kind="stable")[..., :8])
        shifted = top_values - top_values[..., :1]  # the cache stores logits minus the top-1
        assert np.all(np.abs(block.logits - shifted) <= 2.0 ** -11 * np.abs(shifted) + 1e-6)
        for index, temperature in enumerate((1.0, 2.0)):
            lse = np.log(np.exp(logits / temperature).sum(-1)) - top_values[..., 0] / temperature
            np.testing.assert_allclose(block.lse[..., index], lse, atol=1e-3, rtol=0)
            probs = np.exp(block.logits / temperature - block.lse[..., index:index + 1])
            softmax = np.exp(logits / temperature - np.log(np.exp(logits / temperature).sum(
                -1, keepdims=True)))
            np.testing.assert_allclose(probs, np.take_along_axis(softmax, block.ids, -1),
                                       rtol=2e-3, atol=1e-6)
    assert (run / "cache" / "config.yaml").is_file()
    assert open_cache(run / "cache" / "train.zarr").manifest["completed"]


def test_sampled_cache_draws_from_the_teachers_tempered_softmax(tmp_path, teacher):
    """cache.selection=sample: 64 draws per position, stored with their own logits, sorted by
    logit with repeats adjacent; a second job writes the same bytes (each batch's generator is
    seeded with its first row)."""
    sampled = ("cache.selection=sample", "cache.k=64", "cache.sample_temperature=2.0")
    runs = [tiny_run(tmp_path / name, n_train=96, n_val=16) for name in ("a", "b")]
    for run in runs:
        fill_caches(tiny_config(run, *uses(teacher, *sampled)))
    paths = [run / "cache" / "train.zarr" for run in runs]
    assert cache_differences(*paths) == []
    store = open_token_store(runs[0] / "tokens" / "train.zarr")
    cache = open_cache(paths[0], token_store=store)
    assert cache.sample_temperature == 2.0 and cache.k == 64
    info = inspect_path(paths[0])
    assert info["selection"] == {"kind": "sample", "temperature": 2.0, "seed": 0}
    assert info["teacher_stats"] is None  # no top-k head to describe
    block = cache.read(0, store.n_sequences)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(store.read(0, store.n_sequences).astype(np.int64))
                       ).logits.double().numpy()
    assert np.all(block.logits[..., :-1] >= block.logits[..., 1:])
    drawn = np.take_along_axis(logits, block.ids, -1)
    np.testing.assert_allclose(block.logits, drawn - drawn[..., :1], atol=2e-3)
    same_as_next = block.ids[..., 1:] == block.ids[..., :-1]
    distinct = np.array([len(set(row)) for row in block.ids.reshape(-1, 64)])
    assert np.array_equal(64 - same_as_next.reshape(-1, 63).sum(-1), distinct)  # repeats adjacent


COUNTED = ("cache.selection=draws", "cache.temperatures=[1.0, 2.0]", "cache.draws=[8, 24]")


def test_counted_draws_are_the_systematic_draws_at_each_temperature(tmp_path, teacher):
    """cache.selection=draws: at each temperature, the draws of `teacher_topk` at that
    temperature (each batch seeded by its first row), read back sorted by id; ids only; a second
    job writes the same bytes."""
    runs = [tiny_run(tmp_path / name, n_train=96, n_val=16) for name in ("a", "b")]
    for run in runs:
        fill_caches(tiny_config(run, *uses(teacher, *COUNTED, *SMALL_SHARDS)))
    paths = [run / "cache" / "train.zarr" for run in runs]
    assert cache_differences(*paths) == []
    store = open_token_store(runs[0] / "tokens" / "train.zarr")
    cache = open_cache(paths[0], token_store=store)
    info = inspect_path(paths[0])
    assert info["selection"] == {"kind": "draws", "draws": [8, 24], "seed": 0}
    assert (info["k"], info["value_code"], info["teacher_stats"]) == (32, "none", None)
    assert cache.verify() == []
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    rows = torch.from_numpy(store.read(0, store.n_sequences).astype(np.int64))
    for t, m in ((1.0, 8), (2.0, 24)):
        with torch.inference_mode():
            drawn = torch.cat([teacher_topk(model, batch, k=m, temperatures=(t,),
                                            sampling=Sampling(t, 0), first_row=8 * i)[0]
                               for i, batch in enumerate(rows.split(8))])
        read = cache.at_temperature(t).read(0, store.n_sequences)
        assert read.logits is None
        assert np.array_equal(read.ids, np.sort(drawn.numpy(), axis=-1))


def test_job_prints_head_mass_and_warns_for_a_thin_top_k_head(tmp_path, teacher, capsys):
    """After its warm-up batch the job prints the teacher's head mass at every temperature the
    config distils at; for a top-k cache holding under half of it, one warning line."""
    for k, warned in ((2, True), (300, False)):  # the tiny teacher is flat: 2 of 300 ids hold
        run = tiny_run(tmp_path / f"top{k}", n_train=32, n_val=16)  # little, all of them all
        fill_caches(tiny_config(run, *uses(teacher, f"cache.k={k}", "distill.temperature=1",
                                           "distill.sweep_temperatures=[1, 4]")))
        out = capsys.readouterr().out.splitlines()
        mass = next(line for line in out if line.startswith(f"teacher head mass (top {k}"))
        masses = [float(part.split()[0]) for part in mass.split(": ")[1].split(", ")]
        assert mass.endswith("at T = 4") and len(masses) == 2
        warnings = [line for line in out if line.startswith("warning:")]
        assert len(warnings) == warned and all(m < 0.5 for m in masses) == warned
        if warned:
            assert "probability at T = 1, 4" in warnings[0]
            assert "use cache.selection=draws" in warnings[0]
    run = tiny_run(tmp_path / "draws", n_train=32, n_val=16)
    fill_caches(tiny_config(run, *uses(teacher, *COUNTED, "distill.sweep_temperatures=[1, 4]")))
    out = capsys.readouterr().out
    assert "teacher head mass" in out and "warning:" not in out


def test_cache_is_bit_exact_to_a_quiet_forward(tmp_path, teacher):
    """The job's background writer must not disturb the forward: it calls no torch operator (one
    running beside the CPU forward changes the kernels' last bits, and with them near-tied top-k
    ids: resumed caches once differed that way), and every stored byte equals what the same
    batches give with no other thread running. The job warms up with a thrown-away forward."""
    store = open_token_store(tiny_run(tmp_path, n_train=256, n_val=16) / "tokens" / "train.zarr")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    torch_calls_in_writer = []

    def watch(frame, event, function):
        if event == "c_call" and threading.current_thread().name == "cache-writer":
            owner = getattr(function, "__module__", None) or type(
                getattr(function, "__self__", None)).__module__
            if owner.startswith("torch") and function.__qualname__ != "Tensor.numpy":
                torch_calls_in_writer.append(function.__qualname__)

    forwards = []
    model.register_forward_hook(lambda module, args, kwargs, output: forwards.append(
        kwargs["input_ids"][:, 0].tolist()), with_kwargs=True)
    threading.setprofile(watch)  # threads started from now on: the job's writer
    try:
        write_cache(model, store=store, cache_path=tmp_path / "cache.zarr", teacher={"name": "t"},
                    k=8, temperatures=(1.0, 2.0), chunk_sequences=8, shard_chunks=1,
                    batch_size=8, progress=False)
    finally:
        threading.setprofile(None)
    assert torch_calls_in_writer == []
    first_batch = store.read(0, 8)[:, 0].tolist()
    assert len(forwards) == 256 // 8 + 1 and forwards[0] == forwards[1] == first_batch, \
        "the first batch is computed twice: a thrown-away warm-up, then the stored one"
    stored = open_cache(tmp_path / "cache.zarr").read(0, 256, decode=False)
    rows = torch.from_numpy(store.read(0, 256).astype(np.int64))
    with torch.inference_mode():
        ids, logits, lse = (torch.cat(parts).numpy() for parts in zip(
            *(teacher_topk(model, batch, k=8, temperatures=(1.0, 2.0)) for batch in rows.split(8))))
    values, shifted_lse = encode_values(logits, lse, value_code="float16", temperatures=(1.0, 2.0))
    np.testing.assert_array_equal(stored.ids, ids)
    np.testing.assert_array_equal(stored.logits, values)
    np.testing.assert_array_equal(stored.lse, shifted_lse)


def job(run, teacher, *extra):
    return [PYTHON, "-m", "precompute.logits", *cli_args(run, *uses(teacher, *extra))]


SMALL_SHARDS = ("cache.chunk_sequences=8", "cache.shard_chunks=1", "cache.batch_size=8")


@pytest.mark.slow
@pytest.mark.parametrize("selection", [(), COUNTED], ids=["topk", "counted draws"])
def test_killed_job_resumes_to_an_identical_cache(tmp_path, teacher, selection):
    settings = (*SMALL_SHARDS, *selection)
    reference = tiny_run(tmp_path / "reference", n_train=384, n_val=16)
    fill_caches(tiny_config(reference, *uses(teacher, *settings)))
    run = tiny_run(tmp_path / "killed", n_train=384, n_val=16)
    done_dir = run / "cache" / "train.zarr" / "done" / "c"
    with job_processes(job(run, teacher, *settings), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 120
        # a mark being written is a .partial file beside the marks
        while not (done_dir.is_dir() and len([mark for mark in done_dir.iterdir()
                                              if not mark.name.endswith(".partial")]) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, \
                "job ended before the kill"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    partial = open_cache(run / "cache" / "train.zarr", allow_incomplete=True)
    assert 3 <= partial.done.sum() < partial.n_shards
    problems = partial.verify()
    assert problems and all("not done" in line for line in problems)  # done shards are sound
    fill_caches(tiny_config(run, *uses(teacher, *settings)))
    assert cache_differences(run / "cache" / "train.zarr", reference / "cache" / "train.zarr") == []


@pytest.mark.slow
def test_two_torchrun_ranks_write_what_one_process_writes(tmp_path, teacher):
    single = tiny_run(tmp_path / "single", n_train=160, n_val=16)
    fill_caches(tiny_config(single, *uses(teacher)))
    ranks = tiny_run(tmp_path / "ranks", n_train=160, n_val=16)
    torchrun = [str(Path(PYTHON).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                "-m", "precompute.logits", *cli_args(ranks, *uses(teacher))]
    with job_processes(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) as process:
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "cached train" in stdout
    assert cache_differences(ranks / "cache" / "train.zarr", single / "cache" / "train.zarr") == []
    assert open_cache(ranks / "cache" / "train.zarr").manifest["completed"]


def fails_with(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, "logits", argv=argv, extra=teacher_option)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # one error line and no traceback (transformers' own "Loading weights" bar may precede it)
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert err.splitlines()[-1].startswith("error:") and pattern in err.splitlines()[-1], err


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, teacher, capsys, monkeypatch):
    run = tiny_run(tmp_path / "run", n_train=64, n_val=16)
    cache = run / "cache"
    fails_with(capsys, cli_args(run, *uses(tmp_path / "missing")), "does not exist")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails_with(capsys, cli_args(run, *uses("no-such-org/no-such-model")), "offline")
    fails_with(capsys, cli_args(run, *uses(teacher, "cache.k=301")), "larger than the teacher's vocabulary")
    assert not cache.exists()

    other = tiny_run(tmp_path / "other", n_train=64, n_val=16, vocab=256)
    fails_with(capsys, cli_args(other, *uses(teacher)), "vocabulary of 300 tokens")
    trained = save_teacher(tmp_path / "trained" / "teacher")  # a run's teacher knows its tokenizer
    (trained / "teacher.json").write_text(json.dumps({"tokenizer_fingerprint": "another"}))
    fails_with(capsys, cli_args(tmp_path / "trained", "teacher.from_scratch=true"),
               "no token store")
    tiny_run(tmp_path / "trained", n_train=64, n_val=16)
    fails_with(capsys, cli_args(tmp_path / "trained", "teacher.from_scratch=true"),
               "another tokenizer")
    assert not (tmp_path / "other" / "cache").exists() and not (tmp_path / "trained" / "cache").exists()

    fill_caches(tiny_config(run, *uses(teacher)))
    before = {f: f.read_bytes() for f in cache.rglob("*") if f.is_file()}
    another = save_teacher(tmp_path / "another", seed=9)
    fails_with(capsys, cli_args(run, *uses(another)), "was made with other settings")
    assert {f: f.read_bytes() for f in cache.rglob("*") if f.is_file()} == before

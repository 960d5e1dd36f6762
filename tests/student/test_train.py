"""The training loop on a tiny run: loss falls, outputs load with transformers, exact resume after
SIGKILL, Ctrl-C, DDP under torchrun, corrupt caches, bad inputs (exit 2, one line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs import CONFIG_DIR, load_config
from configs.cli import run
from precompute.logits import CountedDraws, Sampling, write_cache
from storage.tokens import open_token_store
from student import sweep
from student import train as trainer
from student.evaluate import training_facts
from training import checkpoint as checkpoints
from training import loop
from training import metrics as metrics_log
from training.model_card import read_card_facts
from tests.precompute.tiny_teacher import save_teacher, tiny_overrides, tiny_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = CONFIG_DIR / "demo.yaml"
STUDENT = ["student.n_layer=2", "student.n_embd=32", "student.n_head=2", "student.batch_size=16",
           "student.lr=3e-3", "student.warmup_steps=5", "student.epochs=1",
           "student.eval_every=0", "student.checkpoint_every=0", "student.device=cpu"]


def make_run(root: Path, *, k: int = 8, n_train: int = 256,
             sampling: Sampling | CountedDraws | None = None) -> Path:
    """Token stores (vocab 300, seq 32), a tiny random teacher and its k = 8 cache (T = 1, 2;
    of k draws with `sampling`)."""
    tiny_run(root, n_train=n_train)
    teacher = save_teacher(root / "teacher", n_embd=64, seed=3)
    from transformers import AutoModelForCausalLM
    write_cache(AutoModelForCausalLM.from_pretrained(teacher),
                store=open_token_store(root / "tokens" / "train.zarr"),
                cache_path=root / "cache" / "train.zarr", teacher={"name": "tiny"}, k=k,
                temperatures=(1.0, 2.0), sampling=sampling, chunk_sequences=16, shard_chunks=2,
                progress=False)
    return root


def overrides(root: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(root), *STUDENT, "teacher.from_scratch=false",
            f"teacher.model={root / 'teacher'}", *extra]


def config(root: Path, *extra: str):
    return load_config(CONFIG, overrides(root, *extra))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run ~8x faster on one thread (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def metrics(folder: Path) -> list[dict]:
    return metrics_log.read_metrics(folder / metrics_log.METRICS_FILE)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in metrics_log.TIMING_KEYS} for row in rows]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_cached_kd_loss_falls_and_the_student_loads(run_dir):
    out = trainer.train(config(run_dir, "student.max_steps=40", "student.eval_every=20"))
    assert out == run_dir / "students" / "kd-a0.5-T2-k8"
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"step", "epoch", "tokens", "ce", "kl", "loss", "lr", "tokens_per_s", "val_loss",
            "val_ppl"} <= set(rows[19]) and "val_loss" not in rows[0]
    assert rows[-1]["tokens"] == 40 * 16 * 31
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.7 * np.mean([r["loss"] for r in rows[:5]])
    assert rows[-1]["kl"] > 0 and rows[-1]["val_ppl"] < rows[19]["val_ppl"] * 1.05
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 300 and model.config.n_layer == 2
    assert (out / "config.yaml").is_file() and (out / "checkpoint" / checkpoints.STATE_FILE).is_file()
    assert load_config(out / "config.yaml").distill.alpha == 0.5
    assert "already trained" in _rerun_output(out, run_dir)


def _rerun_output(out, run_dir) -> str:
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert trainer.train(config(run_dir, "student.max_steps=40", "student.eval_every=20")) == out
    return buffer.getvalue()


def test_baseline_opens_no_cache_and_online_kd_trains(tmp_path):
    root = tiny_run(tmp_path, n_train=64)  # no teacher, no cache
    out = trainer.train(config(root, "distill.alpha=1", "student.max_steps=6"))
    assert out.name == "baseline" and all(r["kl"] == 0 for r in metrics(out))
    save_teacher(root / "teacher", n_embd=64, seed=3)
    online = trainer.train(config(root, "distill.mode=online", "distill.alpha=0",
                                  "student.max_steps=6"))
    assert online.name == "online-a0-T2"
    rows = metrics(online)
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(4 * r["kl"]) for r in rows)


def test_cached_kd_follows_online_kd_with_k_equal_vocabulary(tmp_path):
    """With every entry cached, cached and online KD are the same objective: same first loss
    (up to the float16 rounding of the cached logits)."""
    root = make_run(tmp_path, k=300, n_train=32)
    cached = trainer.train(config(root, "cache.k=300", "student.max_steps=1", "distill.run=c"))
    online = trainer.train(config(root, "distill.mode=online", "student.max_steps=1",
                                  "distill.run=o"))
    c, o = metrics(cached)[0], metrics(online)[0]
    assert c["kl"] == pytest.approx(o["kl"], rel=5e-3)  # float16 cache values and c["ce"] == pytest.approx(o["ce"])


def test_kd_from_sampled_entries_trains_and_uses_all_of_them(tmp_path, capsys):
    root = make_run(tmp_path, k=32, n_train=64, sampling=Sampling(temperature=2.0, seed=0))
    for temperature in (2.0, 1.0):  # the draws' own temperature, and reweighted
        # The config says top-8 (tiny_overrides): what the student read is the cache's manifest.
        cfg = config(root, f"distill.temperature={temperature}", "student.max_steps=12")
        assert (cfg.cache.k, cfg.cache.selection) == (8, "topk")
        cfg = trainer.as_cached(cfg)
        tokens, _ = loop.open_tokens(cfg)
        distil = trainer.distillation(cfg, tokens, vocab_size=tokens.vocab_size)
        assert distil.reads_values == (temperature != 2.0,)  # at T_s the ids alone are read
        out = trainer.train(cfg)
        assert out.name == f"kd-a0.5-T{temperature:g}-s32"
        saved = load_config(out / "config.yaml")
        assert (saved.cache.k, saved.cache.selection, saved.cache.sample_temperature) == (
            32, "sample", 2.0)
        card = read_card_facts(out)
        assert (card["k"], card["selection"]) == (32, "sample (32 draws at T = 2)")
        assert card["cache_fingerprint"] == distil.caches[0].fingerprint
        rows = metrics(out)
        assert all(r["kl"] > 0 for r in rows)
        assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=["--config", str(CONFIG), *overrides(root), "cache.k=32",
                                         "distill.k=16"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "holds 32 sampled entries per position, which are used together" in err


def test_kd_from_counted_draws_reads_the_draws_at_its_temperature(tmp_path, capsys):
    """One cache of counted draws (8 at T = 1, 24 at T = 2) serves students at both: each reads
    the draws made at its own temperature, ids only; another temperature is refused."""
    draws = CountedDraws(temperatures=(1.0, 2.0), draws=(8, 24), seed=0)
    root = make_run(tmp_path, n_train=64, sampling=draws)
    for temperature, m in ((2.0, 24), (1.0, 8)):
        cfg = trainer.as_cached(config(root, f"distill.temperature={temperature}",
                                       "student.max_steps=12"))
        tokens, _ = loop.open_tokens(cfg)
        distil = trainer.distillation(cfg, tokens, vocab_size=tokens.vocab_size)
        assert distil.reads_values == (False,) and distil.k == m
        batch = next(loop.micro_batches(tokens, distil, hp=cfg.student, micro=4,
                                        cursor=loop.Cursor(), rank=0, world_size=1,
                                        prefetch=0))[2]
        ids = batch.teachers[0].ids
        assert ids.shape == (4, tokens.seq_len, m) and batch.teachers[0].logits is None
        assert np.all(np.diff(ids, axis=-1) >= 0)  # ascending: repeats adjacent
        out = trainer.train(cfg)
        assert out.name == f"kd-a0.5-T{temperature:g}-d{m}"
        saved = load_config(out / "config.yaml")
        assert (saved.cache.selection, saved.cache.draws) == ("draws", (8, 24))
        selection = read_card_facts(out)["selection"]
        assert selection == f"counted draws ({m} draws at T = {temperature:g})"
        assert training_facts(out)["k"] == m  # the report's k: the draws it read
        assert all(r["kl"] > 0 for r in metrics(out))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=["--config", str(CONFIG), *overrides(root),
                                         "distill.temperature=4"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "holds draws at T = 1, 2, not at 4" in err
    with pytest.raises(SystemExit) as exit_info:  # a sweep is refused before training any
        run(sweep.main, "sweep", argv=["--config", str(CONFIG), *overrides(root),
                                       "distill.sweep_alphas=[0.3]",
                                       "distill.sweep_temperatures=[2, 4]"])
    assert exit_info.value.code == 2 and "not at 4" in capsys.readouterr().err
    assert not list((root / "students").glob("kd-a0.3-*"))


def test_fit_trains_a_lora_wrapped_model_with_ce(tmp_path):
    """The teacher fine-tuning path: a PEFT model, CE only, only the adapter is optimised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tiny_run(tmp_path, n_train=64)
    base = AutoModelForCausalLM.from_pretrained(save_teacher(root / "base", n_embd=64))
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    cfg = config(root, "teacher.max_steps=4", "teacher.batch_size=8", "teacher.grad_accum=2",
                 "teacher.device=cpu", "teacher.eval_every=0", "teacher.checkpoint_every=2")
    tokens, val = loop.open_tokens(cfg)
    out = loop.fit(model, cfg=cfg, hp=cfg.teacher, out_dir=root / "teacher", tokens=tokens,
                      val_tokens=val)
    assert (out / "adapter_model.safetensors").is_file() and len(metrics(out)) == 4
    for name, p in model.base_model.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")])


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(run_dir):
    """SIGKILL after a checkpoint, resume; Ctrl-C (exit 130), resume: same weights and metrics,
    and the same word-milestone folders (the tiny stores count ~125 words a step)."""
    steps = ["student.max_steps=240", "student.checkpoint_every=40", "student.eval_every=60",
             "student.dropout=0.1", "student.save_at_words=[4000, 9000, 17000, 25000]"]
    straight = trainer.train(config(run_dir, *steps, "distill.run=straight"))
    broken = run_dir / "students" / "broken"
    command = [sys.executable, "-m", "student.train", "--config", str(CONFIG),
               *overrides(run_dir, *steps, "distill.run=broken")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for sig, code in ((signal.SIGKILL, -9), (signal.SIGINT, 130)):
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_new_checkpoint(broken, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        state = torch.load(broken / "checkpoint" / checkpoints.STATE_FILE, weights_only=False)
        assert 0 < state["cursor"]["step"] < 240
        if sig == signal.SIGINT:
            assert "interrupted" in err
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert without_timing(metrics(straight)) == without_timing(metrics(broken))
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["chck_17K", "chck_25K", "chck_4K", "chck_9K"]
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == names
    for name in names:
        a, b = (weights(run / "checkpoints" / name) for run in (straight, broken))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        cards = [(run / "checkpoints" / name / "README.md").read_text() for run in (straight, broken)]
        assert cards[0] == cards[1].replace("broken", "straight")


def _wait_for_new_checkpoint(folder: Path, proc: subprocess.Popen) -> None:
    """Until the process has written a checkpoint beyond the one it started from."""
    state = folder / "checkpoint" / checkpoints.STATE_FILE
    before = state.stat().st_mtime_ns if state.is_file() else 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.is_file() and state.stat().st_mtime_ns != before:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint written")


DDP_CHILD = """
import hashlib, sys, torch, torch.distributed as dist
from configs import CONFIG_DIR, load_config
from student import sweep
from student import train as trainer
from student.evaluate import training_facts
from training import loop
from training.models import new_model_of
cfg = load_config(CONFIG_DIR / "demo.yaml", sys.argv[2:])
tokens, val = loop.open_tokens(cfg)
model = new_model_of(cfg.student, vocab_size=tokens.vocab_size, eos_token_id=0)
distil = trainer.distillation(cfg, tokens, vocab_size=tokens.vocab_size)
loop.fit(model, cfg=cfg, hp=cfg.student, out_dir=cfg.run_path / "students" / cfg.distill.run,
         tokens=tokens, val_tokens=val, distil=distil)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w").write(digest)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_two_ddp_ranks_train_on_disjoint_shares_and_agree(run_dir, tmp_path, architecture):
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
         *overrides(run_dir, "student.max_steps=6", "student.eval_every=3",
                    "student.dropout=0.1", f"student.architecture={architecture}",
                    f"distill.run=ddp-{architecture}")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1
    rows = metrics(run_dir / "students" / f"ddp-{architecture}")
    assert len(rows) == 6 and rows[-1]["tokens"] == 6 * 16 * 31 and "val_loss" in rows[2]


def test_corrupt_cache_is_refused_or_skipped(tmp_path, capsys):
    root = make_run(tmp_path, n_train=128)  # 4 shards of 32 sequences
    shard = root / "cache" / "train.zarr" / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=["--config", str(CONFIG),
                                         *overrides(root, "student.max_steps=16")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar's lines, then the error
    assert [line for line in err if line.startswith("error:")] == err[-1:]
    assert "shard 1" in err[-1] and "skip_bad_shards" in err[-1]
    out = trainer.train(config(root, "student.max_steps=3", "distill.skip_bad_shards=true"))
    assert "skipping 1 bad cache shard(s) [1]: 32 sequences, 1,024 tokens" in capsys.readouterr().out
    assert len(metrics(out)) == 3


@pytest.mark.parametrize("extra,message", [
    (["run_dir=/nonexistent/run"], "make data"),
    (["distill.temperature=0"], "distill.temperature = 0.0 must be positive"),
    (["distill.alpha=1.5"], "distill.alpha = 1.5 must be in [0, 1]"),
    (["cache.k=64", "distill.k=16"], "distill.k = 16 is larger than the cached k = 8"),
    (["distill.mode=online", "teacher.model=/nonexistent/teacher"], "/nonexistent/teacher"),
    (["student.device=cuda:3", "distill.run=on-gpu"], "device 'cuda:3' is not available"),
])
def test_bad_inputs_exit_2_with_one_line(run_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=["--config", str(CONFIG), *overrides(run_dir), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cache_for_other_inputs_or_missing_cache_exit_2(tmp_path):
    root = make_run(tmp_path, n_train=32)
    other = tmp_path / "other"
    tiny_run(other, n_train=32, tokenizer_seed=1)
    (other / "cache").symlink_to(root / "cache")
    for run_root, message in ((other, "was made for another tokenizer"),
                              (tmp_path / "nocache", "make teacher-logits")):
        if run_root.name == "nocache":
            tiny_run(run_root, n_train=32)
        result = subprocess.run(
            [sys.executable, "-m", "student.train", "--config", str(CONFIG),
             *overrides(run_root)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_lr_schedule():
    factor = lambda step, schedule: loop.lr_factor(step, warmup=10, total=110, schedule=schedule)
    assert factor(0, "cosine") == pytest.approx(0.1) and factor(9, "cosine") == 1.0
    assert factor(60, "cosine") == pytest.approx(0.5) and factor(110, "cosine") == pytest.approx(0)
    assert factor(60, "linear") == pytest.approx(0.5) and factor(100, "constant") == 1.0


def test_resume_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    path = tmp_path / metrics_log.METRICS_FILE
    for step in (1, 2, 3):
        metrics_log.append_metrics(path, {"step": step, "loss": 1.0 / step})
    with path.open("a") as f:
        f.write('{"step": 4, "loss": 0.2')  # SIGKILL mid-write: no closing brace, no newline
    metrics_log.truncate_metrics(path, after_step=3)
    assert [row["step"] for row in metrics_log.read_metrics(path)] == [1, 2, 3]
    metrics_log.truncate_metrics(path, after_step=2)
    assert [row["step"] for row in metrics_log.read_metrics(path)] == [1, 2]


class _RunsCode:
    """Unpickling this runs `touch` on a marker file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    root = make_run(tmp_path, n_train=32)
    argv = ["--config", str(CONFIG), *overrides(root, "student.max_steps=2",
                                                  "student.checkpoint_every=1")]
    student = trainer.train(config(root, "student.max_steps=2", "student.checkpoint_every=1"))
    (student / "config.json").unlink()  # unfinished again: the next run resumes
    marker = tmp_path / "code-ran"
    state = student / "checkpoint" / checkpoints.STATE_FILE
    clean = state.read_bytes()
    torch.save({**torch.load(state, weights_only=False), "payload": _RunsCode(marker)}, state)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(trainer.main, "train", argv=argv)
    assert not marker.exists(), "resuming ran the checkpoint's code"
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "refusing to load" in err[-1], err
    state.write_bytes(clean)  # what the trainer writes loads as tensors and numbers only
    assert torch.load(state, weights_only=True)["cursor"]["step"] == 2

"""The C kernel of the fused loss (training/rows.c) against the torch ops it replaces on the CPU,
and its build: in a fresh cache folder, without a compiler, over a damaged library, switched
off."""

import os
import subprocess
import sys

import pytest
import torch

from training.losses import IGNORE_INDEX, ce_and_cached_kl, sampled_targets, teacher_buckets
from training.native import rows_kernel, torch_ops_only


def loss_and_grad(student, labels, teacher_kwargs, weights):
    """ce, kl and d(sum w_ce ce + w_kl kl)/d student of one call."""
    student = student.clone().requires_grad_()
    ce, kl = ce_and_cached_kl(student, labels, **teacher_kwargs)
    total = (ce * weights[0]).sum()
    if kl is not None:
        total = total + (kl * weights[1]).sum()
    total.backward()
    return ce, kl, student.grad


def top_k_teacher(teacher_logits, k, temperature):
    temperatures = (1.0, 2.0, 3.0, 4.0)
    values, ids = teacher_logits.topk(k, -1)
    lse = torch.stack([torch.logsumexp(teacher_logits / t, -1) for t in temperatures], -1)
    log_p, p_tail = teacher_buckets(values.half(), lse, temperature=temperature,
                                    temperatures=temperatures, vocab_size=teacher_logits.shape[-1])
    return dict(head_ids=ids, log_p_head=log_p, p_tail=p_tail, temperature=temperature)


def sampled_teacher(teacher_logits, m, temperature):
    b, length, vocab = teacher_logits.shape
    generator = torch.Generator().manual_seed(3)
    draws = torch.multinomial(torch.softmax(teacher_logits.flatten(0, 1) / 2, -1), m,
                              replacement=True, generator=generator)
    ids = draws.view(b, length, m).sort(-1).values  # repeats adjacent, as cached
    ids[0, 1, 60:70] = ids[0, 1, 60]  # a run across the kernel's HEAD_BLOCK edge (slot 64)
    log_p, p_tail = sampled_targets(ids, teacher_logits.gather(-1, ids),
                                    temperature=temperature, sample_temperature=2.0)
    return dict(head_ids=ids, log_p_head=log_p, p_tail=p_tail, temperature=temperature)


CASES = [("CE", 1.0)] + [(kind, t) for kind in ("top-k", "sampled") for t in (1.0, 2.0, 3.0, 4.0)]


@pytest.mark.parametrize("kind,temperature", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_the_torch_ops(kind, temperature, threads):
    """Values and gradients, ignored positions, repeated ids (a run across the kernel's
    HEAD_BLOCK edge, one id filling a row), a head longer than HEAD_BLOCK (100 > 64), T = 2^n
    (square roots) and 3 (exps), and 2 threads with rows enough to split (2 x 2^18 elements)."""
    torch.manual_seed(0)
    b, length, vocab = (4, 64, 2048) if threads == 2 else (3, 20, 300)
    student = torch.randn(b, length, vocab) * 3
    teacher_logits = torch.randn(b, length, vocab) * 2
    labels = torch.randint(0, vocab, (b, length))
    labels[:, -1] = IGNORE_INDEX
    teacher_logits[0, 0, 7] = 50.0  # drawn: one id in all 100 slots, to count once
    teacher = {"CE": lambda: {}, "top-k": lambda: top_k_teacher(teacher_logits, 100, temperature),
               "sampled": lambda: sampled_teacher(teacher_logits, 100, temperature)}[kind]()
    weights = torch.rand(2, b, length)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert rows_kernel() is not None
        kernel = loss_and_grad(student, labels, teacher, weights)
        with torch_ops_only():
            reference = loss_and_grad(student, labels, teacher, weights)
    finally:
        torch.set_num_threads(previous)
    for got, expected in zip(kernel, reference):
        if expected is None:
            assert got is None
        else:
            assert torch.allclose(got, expected, atol=5e-6, rtol=1e-5)
    assert (kernel[0][:, -1] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("m", [64, 150])
def test_kernel_merges_draws_as_the_torch_ops(temperature, m):
    """sampled_targets: repeats merged, reweighted from T_s = 2 to T (T = 2: equal weights), one
    id a whole row; with m = 150 (the kernel finds repeats 64 slots at a time) runs that cross
    those words' edges and one that ends the row."""
    torch.manual_seed(0)
    teacher_logits = torch.randn(3, 20, 300) * 2
    teacher_logits[0, 0, 7] = 50.0  # every draw of this position is id 7
    ids = sampled_teacher(teacher_logits, m, temperature)["head_ids"]
    if m == 150:
        ids[1, 0] = torch.arange(150)
        for start, stop in ((60, 63), (64, 66), (100, 140), (145, 150)):
            ids[1, 0, start:stop] = ids[1, 0, start]
        ids[1, 1] = torch.arange(150).clamp(max=1)  # one run of 149 from slot 1
    z = teacher_logits.gather(-1, ids).half()
    kernel = sampled_targets(ids, z, temperature=temperature, sample_temperature=2.0)
    with torch_ops_only():
        reference = sampled_targets(ids, z, temperature=temperature, sample_temperature=2.0)
    assert torch.allclose(kernel[0], reference[0], atol=2e-6, rtol=1e-5)
    assert torch.equal(kernel[1], reference[1])
    assert kernel[0][0, 0].abs().max() < 1e-6
    if temperature == 2.0:  # the draws' own temperature: their frequencies, logits not needed
        without = sampled_targets(ids, None, temperature=2.0, sample_temperature=2.0)
        with torch_ops_only():
            without_ops = sampled_targets(ids, None, temperature=2.0, sample_temperature=2.0)
        for got in (without, without_ops):
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, reference))
    else:
        with pytest.raises(ValueError, match="need their logits"):
            sampled_targets(ids, None, temperature=temperature, sample_temperature=2.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kernel_makes_the_teachers_buckets_as_the_torch_ops(temperature):
    """teacher_buckets at each stored temperature (read from its column of lse); a row whose head
    holds all the mass gets a tail of ~0, not a negative one; a NaN lse stays NaN."""
    torch.manual_seed(0)
    teacher_logits = torch.randn(3, 20, 300) * 2
    teacher_logits[0, 0, 7] = 50.0
    temperatures = (1.0, 2.0, 4.0)
    values = teacher_logits.topk(16, -1).values.half().float()
    lse = torch.stack([torch.logsumexp(teacher_logits / t, -1) for t in temperatures], -1)
    lse[2, 5] = float("nan")
    kwargs = dict(temperature=temperature, temperatures=temperatures, vocab_size=300)
    kernel = teacher_buckets(values, lse, **kwargs)
    with torch_ops_only():
        reference = teacher_buckets(values, lse, **kwargs)
    finite = torch.ones(3, 20, dtype=torch.bool)
    finite[2, 5] = False
    assert torch.allclose(kernel[0][finite], reference[0][finite], atol=2e-6, rtol=1e-6)
    assert torch.allclose(kernel[1][finite], reference[1][finite], atol=2e-6)
    assert 0 <= kernel[1][0, 0] < (1e-6 if temperature == 1.0 else 1)
    assert kernel[0][2, 5].isnan().all() and kernel[1][2, 5].isnan()


def test_a_row_with_nan_gives_nan_and_others_stay_finite():
    student = torch.randn(1, 3, 40)
    student[0, 1, 5] = float("nan")
    ce, _ = ce_and_cached_kl(student, torch.tensor([[1, 2, 3]]))
    assert torch.isnan(ce[0, 1]) and torch.isfinite(ce[0, [0, 2]]).all()


def test_an_id_outside_the_vocabulary_raises_instead_of_reading_past_the_row():
    student = torch.randn(1, 2, 40)
    with pytest.raises(IndexError, match="outside the vocabulary of 40"):
        ce_and_cached_kl(student, torch.tensor([[1, 40]]))
    ids = torch.tensor([[[0, 1], [2, 45]]])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        ce_and_cached_kl(student, torch.tensor([[1, 2]]), head_ids=ids,
                         log_p_head=torch.full((1, 2, 2), -1.0), p_tail=torch.zeros(1, 2),
                         temperature=2.0)


def build_in_a_child(tmp_path, **env) -> subprocess.CompletedProcess:
    """A fresh process (rows_kernel caches its library per process) with its own cache folder."""
    code = ("from training.native import rows_kernel; "
            "print('kernel' if rows_kernel() is not None else 'torch ops')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})


def test_a_fresh_machine_builds_the_library_once_into_its_cache(tmp_path):
    first = build_in_a_child(tmp_path)
    assert first.stdout.strip() == "kernel", first.stderr
    built = sorted((tmp_path / "babylm-kd").iterdir())
    assert len(built) == 1 and built[0].name.startswith("rows-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    second = build_in_a_child(tmp_path)
    assert second.stdout.strip() == "kernel"
    assert sorted((tmp_path / "babylm-kd").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_loss_falls_back_to_torch_ops_with_one_line(tmp_path):
    result = build_in_a_child(tmp_path, CC="no-such-compiler")
    assert result.returncode == 0 and result.stdout.strip() == "torch ops"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be built" in lines[0] and "no-such-compiler" in lines[0]
    assert not any((tmp_path / "babylm-kd").iterdir())  # no half-written library left


def test_a_compiler_error_falls_back_too(tmp_path):
    result = build_in_a_child(tmp_path, CC="cc -fno-such-option")
    assert result.stdout.strip() == "torch ops" and "could not be built" in result.stderr


def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    assert build_in_a_child(tmp_path).stdout.strip() == "kernel"
    (library,) = (tmp_path / "babylm-kd").iterdir()
    library.write_bytes(b"not a shared object")
    result = build_in_a_child(tmp_path)
    assert result.stdout.strip() == "kernel" and result.stderr == ""
    assert [p.name for p in (tmp_path / "babylm-kd").iterdir()] == [library.name]
    assert library.read_bytes().startswith(b"\x7fELF")


def test_babylm_kd_native_0_switches_the_kernel_off(tmp_path):
    result = build_in_a_child(tmp_path, BABYLM_KD_NATIVE="0")
    assert result.stdout.strip() == "torch ops" and result.stderr == ""
    assert not (tmp_path / "babylm-kd").exists()


def test_torch_ops_only_is_scoped():
    assert rows_kernel() is not None
    with torch_ops_only():
        assert rows_kernel() is None
        with torch_ops_only():
            assert rows_kernel() is None
        assert rows_kernel() is None
    assert rows_kernel() is not None

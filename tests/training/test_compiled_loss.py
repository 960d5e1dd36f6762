"""The torch ops of the fused loss as an accelerator runs them: each direction's function of a
block of rows through torch.compile (inductor; on the CPU here it generates C++ where a GPU gets
Triton), against the same functions run eagerly; and what happens where compiling fails."""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from training import losses
from training.losses import IGNORE_INDEX, sampled_targets, teacher_buckets


def rows_of_a_batch(kind: str, temperature: float):
    """Student logits (n, V), labels with ignored rows and some among the head ids, and the
    teacher's rows as the forward takes them: (head_ids, log_p, p_tail)."""
    torch.manual_seed(0)
    n, vocab, k = 24, 97, 8
    student, teacher = torch.randn(n, vocab) * 3, torch.randn(n, vocab) * 2
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = IGNORE_INDEX
    if kind == "CE":
        return student, labels, (None, None, None)
    if kind == "top-k":
        values, ids = teacher.topk(k, -1)
        lse = torch.stack([torch.logsumexp(teacher / t, -1) for t in (1.0, 2.0, 3.0)], -1)
        log_p, p_tail = teacher_buckets(values, lse, temperature=temperature,
                                        temperatures=(1.0, 2.0, 3.0), vocab_size=vocab)
        labels[1::4] = ids[1::4, 0]  # labels among the head ids
        return student, labels, (ids, log_p, p_tail)
    ids = torch.multinomial(torch.softmax(teacher / 2, -1), k, replacement=True).sort(-1).values
    labels[1::4] = ids[1::4, 0]
    log_p, p_tail = sampled_targets(ids, teacher.gather(-1, ids), temperature=temperature,
                                    sample_temperature=2.0)
    return student, labels, (ids, log_p, p_tail)


@pytest.mark.parametrize("kind,temperature", [("CE", 1.0), ("top-k", 2.0), ("sampled", 3.0)])
def test_compiled_rows_equal_the_eager_ones(kind, temperature, capfd):
    """CE alone, a top-k head at T = 2 (square roots) and repeated draws at T = 3 (exps)."""
    x, labels, (ids, log_p, p_tail) = rows_of_a_batch(kind, temperature)
    forward = (x, labels, ids, log_p, p_tail)
    eager = losses._forward_rows(*forward, temperature=temperature)
    compiled = losses._compiled(losses._forward_rows)(*forward, temperature=temperature)
    assert len(compiled) == len(eager)
    for ours, theirs in zip(compiled, eager):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    grad_ce, grad_kl = torch.rand(len(x)), torch.rand(len(x))
    backward = (x, labels, grad_ce, grad_kl, ids, p_tail, *eager[2:])
    eager_grad, = losses._backward_rows(*backward, temperature=temperature)
    with torch._inductor.config.patch(fx_graph_cache=False):
        (compiled_grad,), code = run_and_get_code(losses._compiled(losses._backward_rows),
                                                  *backward, temperature=temperature)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
    # the gradient is the only (n, V) tensor the compiled backward allocates: the memory target
    # (cached KD within 1.1 x CE's peak) rests on it
    call = code[-1][code[-1].index("def call("):]
    assert len(re.findall(r"empty_strided\w*\(" + re.escape(str(tuple(x.shape))), call)) == 1
    assert "torch.compile of the loss failed" not in capfd.readouterr().err


FALLBACK = """
import torch
from training import losses
rows = (torch.randn(4, 10), torch.tensor([1, 2, 3, -100]), None, None, None)
compiled = losses._compiled(losses._forward_rows)(*rows, temperature=1.0)
eager = losses._forward_rows(*rows, temperature=1.0)
print(all(torch.equal(a, b) for a, b in zip(compiled, eager)))
"""


def test_where_compiling_fails_the_loss_runs_eagerly_after_one_line(tmp_path):
    """Inductor without a working C++ compiler, as a GPU machine without Triton would be."""
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
    lines = [line for line in result.stderr.splitlines() if line.startswith("babylm-kd:")]
    assert len(lines) == 1 and "torch.compile of the loss failed" in lines[0], result.stderr

"""Distillation losses: pure functions over (B, L, ...) tensors, per token.

Shapes: B sequences, L positions, V vocabulary, k cached teacher entries, n_T stored temperatures.
Position t of the student logits, of the labels and of the cache all describe the token after
token t (labels are the inputs shifted left; the last position is ignored).

The combined objective (docs/architecture.md), averaged over non-ignored tokens:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_T || q_T)

Cached KD compares k + 1 buckets: the teacher's top-k ids plus one tail bucket holding the rest
of the mass. The teacher side is exact: with the stored full-vocabulary logsumexp lse_T,
p_i = exp(z_i / T - lse_T) and the tail is 1 - sum p_i. The student's q is its tempered softmax
over the same ids plus its own tail 1 - sum q_i (floored at TAIL_FLOOR: below it float32 sums
are rounding noise).

A cache of sampled entries (precompute's cache.selection = 'sample': k draws per position from
the teacher's softmax at T_s) stands for the whole distribution, tail included: p is the draws'
frequencies, reweighted by exp(z (1/T - 1/T_s)) when T differs (`sampled_targets`), and there is
no tail bucket (p_tail = 0), so the student's mass outside the drawn ids is pushed down as in
full-vocabulary KD. Per-position p is noisy, but its expectation is the teacher's p_T, where the
top-k head plus bucket never tells the student how the tail is shaped (docs/topk-vs-sampled.md).

`ce_and_cached_kl` is one fused autograd function: it makes one pass over the (B, L, V) logits
for CE and KL together and writes their gradients into a single (B, L, V) buffer, so cached KD
costs about what CE costs (a plain autograd graph of the same maths adds ~10 passes over (B, L, V)
and runs slower than CE: docs/log.md). On the CPU it runs as a small C kernel (rows.c, built on
first use by training.native) a row at a time: the torch ops' dispatch, ~40 ops a step, costs more
than their arithmetic on a small student (docs/log.md). On a GPU its torch ops go through
torch.compile, which makes each direction's pass over the logits one kernel. The kernel, the
compiled and the eager ops agree to ~1e-6 (tests); the eager ops serve other dtypes, machines
without a C compiler, and BABYLM_KD_COMPILE=0.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from storage.cache import same_temperature
from training.native import TeacherRows, fits_kernel, rows_kernel

IGNORE_INDEX = -100
TAIL_FLOOR = 1e-6
"""Smallest tail mass taken at face value. A tail is 1 minus a float32 sum of head probabilities,
so below ~1e-6 it is rounding noise; smaller student tails are clamped (no gradient through the
clamp), which also keeps k = V exact: both tails are then ~0 and contribute nothing."""
SQUARE_ROOT_TEMPERATURES = {1.0: 0, 2.0: 1, 4.0: 2}
"""Temperatures T = 2**n whose tempered exponentials the fused loss's forward takes as n square
roots of the plain ones, exp(y / T) = exp(y) ** (1 / 2**n), and rows.c (both directions) the
other way round, the plain ones as n squares of the tempered: a square root (as one torch op) or
a multiply (in rows.c's vector loops) costs a fraction of an exp, and on a small student the
loss's exps are a visible part of the step (bench.student). Other temperatures take an exp of
y / T."""
CHUNK_ELEMENTS = 1 << 17
"""Logits a block of the fused loss's torch ops on the CPU: small enough to stay in its cache."""


class LossTerms(NamedTuple):
    """Scalars of one (micro-)batch: the loss to backpropagate, and its parts for logging."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    n_tokens: int


def shift_labels(tokens: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels (B, L) for input tokens (B, L): tokens shifted left, last position ignored."""
    labels = torch.full_like(tokens, ignore_index)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler's split)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_buckets(logits: torch.Tensor, lse: torch.Tensor, *, temperature: float,
                    temperatures: tuple[float, ...], vocab_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's tempered top-k head and tail from the cache.

    logits: (B, L, k) cached teacher logits at T = 1 (possibly shifted per position).
    lse: (B, L, n_T) logsumexp over the full vocabulary of logits / T for T in `temperatures`.
    Returns (log_p_head (B, L, k), p_tail (B, L)), with p_tail = 1 - sum exp(log_p_head) >= 0.

    When `temperature` is stored this is exact. Otherwise (the fallback, an approximation) the
    tail mass at the nearest stored temperature T0 is assumed spread uniformly over the V - k
    tokens outside the head: each gets logit z_tail = T0 * (lse_T0 + log(tail_T0 / (V - k))),
    and lse_T = logsumexp(z_head / T, z_tail / T + log(V - k)). That is exact when the teacher's
    tail is flat and close when the tail mass is small (a peaked teacher); it misjudges the tail
    mass of a flat-headed teacher at T far from T0.
    """
    logits = logits.float()
    nearest = min(range(len(temperatures)), key=lambda i: abs(temperatures[i] - temperature))
    t0 = temperatures[nearest]
    if same_temperature(t0, temperature):
        kernel = rows_kernel() if fits_kernel(logits, lse) and logits.shape[-1] else None
        if kernel is not None:  # one C call for ~7 small torch ops, which cost their dispatch
            return kernel.teacher_buckets(logits, lse, column=nearest, temperature=temperature)
        log_p = logits / temperature - lse[..., nearest].float().unsqueeze(-1)
    else:
        lse_t0 = lse[..., nearest].float()
        n_tail = vocab_size - logits.shape[-1]
        log_p0 = logits / t0 - lse_t0.unsqueeze(-1)
        log_tail0 = log1mexp(torch.logsumexp(log_p0, -1).clamp(max=-1e-7))
        if n_tail > 0:
            z_tail = t0 * (lse_t0 + log_tail0 - math.log(n_tail))
            tail_term = (z_tail / temperature + math.log(n_tail)).unsqueeze(-1)
            lse_t = torch.logsumexp(torch.cat([logits / temperature, tail_term], -1), -1)
        else:
            lse_t = torch.logsumexp(logits / temperature, -1)
        log_p = logits / temperature - lse_t.unsqueeze(-1)
    p_tail = (1 - log_p.exp().sum(-1)).clamp(min=0)
    return log_p, p_tail


def sampled_targets(ids: torch.Tensor, logits: torch.Tensor | None, *, temperature: float,
                    sample_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's tempered distribution estimated from a cache of sampled entries.

    ids: (B, L, m) draws from the teacher's softmax at `sample_temperature` (any scheme whose
    expected count of an id is m times its probability: precompute draws systematically),
    repeats of an id adjacent (as the logits job stores them, sorted by logit); logits: (B, L, m)
    their cached logits (possibly shifted per position), or None when T = T_s. Each draw weighs
    w = exp(z (1/T - 1/T_s)), normalised over the position's draws (self-normalised importance
    sampling: equal weights, the draws' frequencies, when T = T_s). Returns (log_p (B, L, m),
    p_tail (B, L) zeros: the draws stand for the whole distribution), as `teacher_buckets` does:
    an id drawn several times has its summed probability at each of its slots, and
    `ce_and_cached_kl` counts it once.
    """
    scale = 1 / temperature - 1 / sample_temperature
    if logits is None:
        if not same_temperature(temperature, sample_temperature):
            raise ValueError(f"draws made at T = {sample_temperature:g} need their logits to "
                             f"stand for T = {temperature:g}")
        scale = 0.0
    else:
        logits = logits.float()
    kernel = rows_kernel() if fits_kernel(ids, logits) and ids.shape[-1] else None
    if kernel is not None:  # one C call for ~10 small torch ops, which cost their dispatch
        log_p = kernel.sampled_targets(ids, logits, scale=scale)
        return log_p, log_p.new_zeros(log_p.shape[:-1])
    weights = (torch.full(ids.shape, 1 / ids.shape[-1], device=ids.device) if logits is None
               else torch.softmax(logits * scale, -1))
    run = first_slots(ids).cumsum(-1) - 1  # which run of repeats each slot is in
    log_p = torch.zeros_like(weights).scatter_add_(-1, run, weights).gather(-1, run).log_()
    return log_p, log_p.new_zeros(log_p.shape[:-1])


def mixture_targets(members: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several cached teachers' targets as one: the weighted mixture sum_i w_i p_i of their
    tempered distributions, in the form `ce_and_cached_kl` takes.

    members: per teacher (ids (B, L, k_i), log_p (B, L, k_i), p_tail (B, L)) from
    `teacher_buckets` or `sampled_targets` at one temperature; weights: one per teacher, summing
    to 1. Returns (ids, log_p, p_tail) over the k_1 + ... + k_n slots: the ids sorted so an id's
    slots are adjacent, each slot holding its id's mixed probability, and p_tail = sum w_i
    p_tail_i. (On the CPU the C kernel gives each distinct id one slot, in first-slot order, and
    repeats the last over the slots left: the same target, without a sort.)

    Draws stay draws: an id's probability is the weighted sum of its members' probabilities of it
    (a run of repeats counts once), so mixing sampled caches is the weighted union of their draws, an unbiased estimate of the mixture. A top-k cache knows its head alone: an id in
    teacher A's head that lies in teacher B's tail gets only w_A p_A from the head, and B's
    share of it, at most w_B times B's k-th probability, stays in the tail bucket
    (docs/architecture.md, "Ensembles"). With one teacher the targets are returned unchanged.
    """
    if len(members) == 1:
        return members[0]
    p_tail = sum(weight * tail for (_, _, tail), weight in zip(members, weights))
    pairs = [(member_ids, log_p) for member_ids, log_p, _ in members]
    kernel = rows_kernel() if fits_kernel(*(t for pair in pairs for t in pair)) else None
    if kernel is not None:  # one pass per row; torch's sort of many short rows costs ~10 x more
        ids, log_p = kernel.mixture_targets(pairs, list(weights))
        return ids, log_p, p_tail
    ids = torch.cat([member_ids for member_ids, _ in pairs], -1)
    # a run of repeats holds its id's total at each slot: its first slot carries it, the rest 0
    shares = torch.cat([(log_p.exp() * first_slots(member_ids)).mul_(weight)
                        for (member_ids, log_p), weight in zip(pairs, weights)], -1)
    ids, order = ids.sort(dim=-1, stable=True)
    shares = shares.gather(-1, order)
    run = first_slots(ids).cumsum(-1) - 1  # which run of one id each slot is in
    log_p = torch.zeros_like(shares).scatter_add_(-1, run, shares).gather(-1, run).log_()
    return ids, log_p, p_tail


def ensemble_log_probs(teacher_logits: list[torch.Tensor], weights: list[float], *,
                       temperature: float, target: str) -> torch.Tensor:
    """log p_T (B, L, V) of several teachers' full logits (B, L, V) each, weights summing to 1.

    target 'probability': the mixture log sum_i w_i softmax(z_i / T), what a cached ensemble
    estimates (`mixture_targets`); 'logits': log softmax(sum_i w_i z_i / T), BabyLlama's average
    of logits, which no cache can give (it needs every logit of every teacher). One teacher:
    both are its log softmax(z / T).
    """
    if len(teacher_logits) == 1:
        return F.log_softmax(teacher_logits[0].float() / temperature, -1)
    if target == "logits":
        mean = sum(weight * logits.float() for logits, weight in zip(teacher_logits, weights))
        return F.log_softmax(mean / temperature, -1)
    if target != "probability":
        raise ValueError(f"ensemble target {target!r} is not 'probability' or 'logits'")
    return torch.logsumexp(torch.stack([
        F.log_softmax(logits.float() / temperature, -1) + math.log(weight)
        for logits, weight in zip(teacher_logits, weights)]), 0)


def first_slots(ids: torch.Tensor) -> torch.Tensor:
    """bool, shaped as ids (..., k): True where a slot's id differs from the slot before it (an
    id's first slot, when its repeats are adjacent)."""
    return torch.cat([torch.ones_like(ids[..., :1], dtype=torch.bool),
                      ids[..., 1:] != ids[..., :-1]], -1)


class _FusedCEKL(torch.autograd.Function):
    """Per-row CE and tail-bucket KL of logits (N, V); see `ce_and_cached_kl` for the maths.

    Each direction is one pure function of the rows (`_forward_rows`, `_backward_rows`): a
    dense pass over the (N, V) logits (`_logsumexps`, `_dense_grad`) and a few ops on the (N, k)
    head around it. On the CPU the dense pass goes in blocks of rows small enough to stay in its
    cache while every read of them happens, and the head's ops once over all rows. On an
    accelerator the whole function goes through torch.compile (`_compiled`): each dense pass
    becomes one kernel that reads the logits once, where the eager ops make several passes and
    launches (the timings on a GPU: docs/log.md).
    """

    @staticmethod
    def forward(ctx, logits, labels, head_ids, log_p, p_tail, temperature):
        with torch.no_grad():
            ce, kl, *saved = _direction(_forward_rows, _logsumexps, logits, labels, head_ids,
                                        log_p, p_tail, temperature=temperature)
        ctx.save_for_backward(logits, labels, head_ids, p_tail, *saved)
        ctx.temperature = temperature
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        logits, labels, head_ids, p_tail, *saved = ctx.saved_tensors
        with torch.no_grad():
            grad, = _direction(_backward_rows, _dense_grad, logits, labels, grad_ce, grad_kl,
                               head_ids, p_tail, *saved, temperature=ctx.temperature)
        return grad, None, None, None, None, None


def _logsumexps(x, *, temperature=None):
    """(lse_1, lse_T) of rows x (n, V): logsumexp of x and of x / T (None without T), from one
    read of x."""
    row_max = x.amax(-1, keepdim=True)
    shifted = x - row_max
    exps = torch.exp(shifted)
    lse1 = exps.sum(-1).log() + row_max.squeeze(-1)
    if temperature is None:
        return lse1, None
    roots = SQUARE_ROOT_TEMPERATURES.get(temperature)
    tempered = (shifted.mul_(1 / temperature).exp_() if roots is None
                else _square_roots(exps, roots))
    return lse1, tempered.sum(-1).log() + row_max.squeeze(-1) / temperature


def _forward_rows(x, labels, head_ids, log_p, p_tail, *, temperature, dense=_logsumexps):
    """(ce, kl, *what `_backward_rows` reads) of rows x (n, V); without a teacher (head_ids
    None) kl is 0 and only lse_1 is kept."""
    distil = head_ids is not None
    lse1, lse_t = dense(x, temperature=temperature if distil else None)
    valid = labels != IGNORE_INDEX
    ce = torch.where(valid, lse1 - x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1),
                     0.0)
    if not distil:
        return ce, torch.zeros_like(ce), lse1
    head_logits = x.gather(-1, head_ids)
    log_q = head_logits / temperature - lse_t.unsqueeze(-1)
    q = log_q.exp()
    p = log_p.exp()
    # a repeated id counts once in the sums (a multiply by 0/1 costs less than torch.where)
    once = first_slots(head_ids).to(x.dtype)
    q_once, p_once = q * once, p * once
    # 1 - sum q_i in float32 resolves tails down to ~1e-7, below TAIL_FLOOR
    q_tail = 1 - q_once.sum(-1)
    tail_free = q_tail >= TAIL_FLOOR
    q_tail = q_tail.clamp(min=TAIL_FLOOR)
    kl = ((p_once * (log_p - log_q)).sum(-1) + torch.xlogy(p_tail, p_tail)
          - p_tail * q_tail.log())
    return ce, torch.where(valid, kl, 0.0), lse1, lse_t, p, head_logits, q_tail, tail_free


def _dense_grad(x, lse1, lse_t, grad_ce, tail_coef, *, temperature):
    """softmax(x) g_ce + q_T(x) c of rows x (n, V), with g_ce and c (n, 1) (no c: CE alone): each
    column's gradient as if it were neither the label nor a head id."""
    softmax = torch.sub(x, lse1.unsqueeze(-1)).exp_()
    if tail_coef is None:
        return softmax.mul_(grad_ce)
    q_t = torch.add(-lse_t.unsqueeze(-1), x, alpha=1 / temperature).exp_()
    return q_t.mul_(tail_coef).addcmul_(softmax, grad_ce)


def _backward_rows(x, labels, grad_ce, grad_kl, head_ids, p_tail, lse1, lse_t=None, p=None,
                   head_logits=None, q_tail=None, tail_free=None, *, temperature,
                   dense=_dense_grad):
    """(d loss / d x,) of rows x (n, V) for the per-row gradients grad_ce and grad_kl.

    The dense pass writes every column as if it were neither the label nor a head id; one
    scatter then writes those columns' whole gradients, from (n, k + 1) values. Eagerly that is
    the least memory (the softmax and the result); torch.compile makes it one kernel and one
    (n, V) buffer, as for CE (a scatter into an intermediate, or a scatter_add after a scatter,
    costs a second: tests/training/test_compiled_loss.py).
    """
    valid = labels != IGNORE_INDEX
    grad_ce = torch.where(valid, grad_ce, 0.0).unsqueeze(-1)
    labels = labels.clamp(min=0).unsqueeze(-1)
    if head_ids is None:  # d CE / d x = softmax - one_hot(label)
        grad = dense(x, lse1, None, grad_ce, None, temperature=temperature)
        return grad.scatter_add_(-1, labels, -grad_ce),
    grad_kl = torch.where(valid, grad_kl, 0.0) / temperature
    # d KL / d s_j = (1/T) q_j c for tail tokens and (1/T) (q_j h - p_j) for head tokens, with
    # c = (q_tail - p_tail) / q_tail and h = 1 while the student tail is above the floor,
    # c = h = 1 - p_tail when it is clamped. Head and tail are written separately so that no
    # large terms cancel when the tails are tiny.
    tail_coef = (torch.where(tail_free, (q_tail - p_tail) / q_tail, 1 - p_tail)
                 * grad_kl).unsqueeze(-1)
    head_coef = torch.where(tail_free, 1.0, 1 - p_tail).unsqueeze(-1)
    q = torch.exp(head_logits / temperature - lse_t.unsqueeze(-1))
    head_grad = (q * head_coef - p) * grad_kl.unsqueeze(-1)
    grad = dense(x, lse1, lse_t, grad_ce, tail_coef, temperature=temperature)
    # the head ids' whole gradients (CE's included), and the label's: its head id's where it is
    # one (the same value: a repeated id has it at each of its slots, so the scatter is exact),
    # else the dense pass's value minus g_ce
    head_softmax = torch.exp(head_logits - lse1.unsqueeze(-1))
    is_label = head_ids == labels
    head = torch.addcmul(head_grad, head_softmax - is_label.to(x.dtype), grad_ce)
    x_label = x.gather(-1, labels)
    label = torch.where(
        is_label.any(-1, keepdim=True),
        torch.where(is_label, head, -math.inf).amax(-1, keepdim=True),
        torch.add(-lse_t.unsqueeze(-1), x_label, alpha=1 / temperature).exp() * tail_coef
        + (torch.exp(x_label - lse1.unsqueeze(-1)) - 1) * grad_ce)
    return grad.scatter_(-1, torch.cat([head_ids, labels], -1), torch.cat([head, label], -1)),


def _direction(rows_function, dense_pass, x, *args, temperature):
    """rows_function(x, *args, temperature=) for logits x (N, V), dense_pass its `dense`. On the
    CPU the dense pass goes in blocks of CHUNK_ELEMENTS logits (cache-sized). Elsewhere the
    whole function goes through torch.compile, unless BABYLM_KD_COMPILE=0 (then eagerly, all
    rows at once: CPU-cache-sized blocks, 2 rows of a 50k vocabulary, are far too small a launch
    for a GPU, docs/log.md)."""
    if x.device.type == "cpu":
        return rows_function(x, *args, temperature=temperature, dense=_in_blocks(dense_pass))
    if os.environ.get("BABYLM_KD_COMPILE", "1") != "0":
        rows_function = _compiled(rows_function)
    return rows_function(x, *args, temperature=temperature)


def _in_blocks(dense_pass):
    """dense_pass over blocks of CHUNK_ELEMENTS logits of x (n, V) and the same rows of its
    other tensors (None passes through), outputs put together: an (n, V) one block by block
    while the block is in cache, (n,) ones by concatenation."""
    def blocks(x, *args, temperature):
        size = max(1, CHUNK_ELEMENTS // x.shape[-1])
        if size >= len(x):
            return dense_pass(x, *args, temperature=temperature)
        result, vectors = None, []
        for start in range(0, len(x), size):
            rows = slice(start, start + size)
            out = dense_pass(x[rows], *(None if a is None else a[rows] for a in args),
                             temperature=temperature)
            if isinstance(out, torch.Tensor):  # the block's rows of an (n, V) result
                if result is None:
                    result = x.new_empty(x.shape)
                result[rows] = out
            else:
                vectors.append(out)
        if result is not None:
            return result
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*vectors))
    return blocks


@functools.cache
def _compiled(rows_function):
    """rows_function through torch.compile; if compiling fails (no Triton, say), one stderr line
    and the eager function from then on."""
    compiled = torch.compile(rows_function, fullgraph=True)
    failed = False

    def call(*args, **kwargs):
        nonlocal failed
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise  # the eager ops need more memory, not less
            except Exception as error:  # noqa: BLE001 -- the eager function is the same maths
                failed = True
                why = str(error).strip().splitlines()
                print(f"babylm-kd: torch.compile of the loss failed ({type(error).__name__}"
                      f"{': ' + why[0] if why else ''}); it runs eagerly", file=sys.stderr)
        return rows_function(*args, **kwargs)

    return call


class _NativeCEKL(torch.autograd.Function):
    """`_FusedCEKL` as rows.c computes it, a row at a time on the CPU (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, kernel, logits, labels, head_ids, log_p, p_tail, temperature):
        teacher = None if head_ids is None else TeacherRows(
            head_ids, log_p, p_tail, temperature, SQUARE_ROOT_TEMPERATURES.get(temperature, -1),
            TAIL_FLOOR)
        out = kernel.forward(logits, labels, teacher)
        ce, kl = out.pop("ce"), out.pop("kl", None)  # the rest is what the backward reads
        ctx.kernel, ctx.teacher, ctx.names = kernel, teacher, list(out)
        ctx.save_for_backward(logits, labels, *out.values())
        return ce, kl if kl is not None else torch.zeros_like(ce)

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        logits, labels, *values = ctx.saved_tensors
        grad = ctx.kernel.backward(logits, labels, ctx.teacher, dict(zip(ctx.names, values)),
                                   grad_ce.contiguous(),
                                   None if ctx.teacher is None else grad_kl.contiguous())
        return None, grad, None, None, None, None, None


def _square_roots(x: torch.Tensor, roots: int) -> torch.Tensor:
    """x ** (1 / 2**roots) by `roots` square roots (x itself for 0 roots)."""
    for _ in range(roots):
        x = torch.sqrt(x)
    return x


def ce_and_cached_kl(logits: torch.Tensor, labels: torch.Tensor, *,
                     head_ids: torch.Tensor | None = None, log_p_head: torch.Tensor | None = None,
                     p_tail: torch.Tensor | None = None, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE and cached-KD KL, fused into one pass over the logits.

    logits: (B, L, V) student logits; labels: (B, L) with IGNORE_INDEX where ignored.
    head_ids: (B, L, k) teacher top-k ids; log_p_head: (B, L, k) and p_tail: (B, L) from
    `teacher_buckets` at `temperature`; all None for plain CE (the baseline), when kl is None.
    An id may repeat in adjacent slots that hold the same log_p (`sampled_targets`'s draws): the
    sums count it once.
    Returns (ce, kl), each (B, L), 0 where ignored. With q_i = softmax(logits / T)_i over the head
    ids and q_tail = 1 - sum q_i (floored at TAIL_FLOOR):
    kl = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail).
    """
    shape = labels.shape
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # autocast hands over half-precision logits; softmax needs more
    rows = [None if t is None else t.flatten(0, 1)
            for t in (logits, labels, head_ids, log_p_head, p_tail)]
    kernel = rows_kernel() if fits_kernel(*rows) else None
    if kernel is None:
        ce, kl = _FusedCEKL.apply(*rows, float(temperature))
    else:
        ce, kl = _NativeCEKL.apply(kernel, *rows, float(temperature))
    return ce.view(shape), None if head_ids is None else kl.view(shape)


def full_kl(logits: torch.Tensor, log_p: torch.Tensor, *, temperature: float,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(p_T || q_T) (B, L) over the full vocabulary (online KD, the reference).

    logits: the student's (B, L, V); log_p: (B, L, V) the teacher's tempered log-probabilities
    (`ensemble_log_probs`). Positions whose label is IGNORE_INDEX give 0.
    """
    log_q = F.log_softmax(logits / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl if labels is None else torch.where(labels != IGNORE_INDEX, kl, 0.0)


def combine(ce: torch.Tensor, kl: torch.Tensor | None, labels: torch.Tensor, *, alpha: float,
            temperature: float) -> LossTerms:
    """alpha * CE + (1 - alpha) * T^2 * KL per token, averaged over non-ignored tokens.

    ce, kl: (B, L) per-token terms (kl None for the CE baseline); labels: (B, L).
    """
    n_tokens = int((labels != IGNORE_INDEX).sum())
    denominator = max(n_tokens, 1)
    ce_sum = ce.sum()
    if kl is None:
        ce_mean = ce_sum / denominator
        return LossTerms(ce_mean, ce_mean.detach(), ce_mean.new_zeros(()), n_tokens)
    kl_sum = kl.sum()
    # weighted in as few ops as can be: on a small student each autograd op (forward and
    # backward) costs more than its arithmetic (docs/log.md)
    loss = torch.add(ce_sum * (alpha / denominator), kl_sum,
                     alpha=(1 - alpha) * temperature ** 2 / denominator)
    return LossTerms(loss, ce_sum.detach() / denominator, kl_sum.detach() / denominator, n_tokens)

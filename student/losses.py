"""Distillation losses: pure functions over (B, L, ...) tensors, per token.

Shapes: B sequences, L positions, V vocabulary, k cached teacher entries, n_T stored temperatures.
Position t of the student logits, of the labels and of the cache all describe the token after
token t (labels are the inputs shifted left; the last position is ignored).

The combined objective (DESIGN.md, "KD loss"), averaged over non-ignored tokens:

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
top-k head plus bucket never tells the student how the tail is shaped (README, "Top-k or
sampled").

`ce_and_cached_kl` is one fused autograd function: it makes one pass over the (B, L, V) logits in
row chunks for CE and KL together and writes their gradients into a single (B, L, V) buffer, so
cached KD costs about what CE costs (a plain autograd graph of the same maths adds ~10 passes over
(B, L, V) and ran 7-28% slower than CE). On the CPU the same function runs as a small C kernel
(rows.c, built on first use by student.native) a row at a time: the torch ops' dispatch, ~40 ops a
step, cost more than the arithmetic on a small student. The two agree to ~1e-6 (tests); the torch
ops serve GPUs, other dtypes and machines without a C compiler.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from student.native import TeacherRows, fits_kernel, rows_kernel

IGNORE_INDEX = -100
TAIL_FLOOR = 1e-6
"""Smallest tail mass taken at face value. A tail is 1 minus a float32 sum of head probabilities,
so below ~1e-6 it is rounding noise; smaller student tails are clamped (no gradient through the
clamp), which also keeps k = V exact: both tails are then ~0 and contribute nothing."""
SQUARE_ROOT_TEMPERATURES = {1.0: 0, 2.0: 1, 4.0: 2}
"""Temperatures T = 2**n whose tempered exponentials the fused loss takes as n square roots of the
plain ones, exp(y / T) = exp(y) ** (1 / 2**n), and rows.c the other way round, the plain ones as
n squares of the tempered: a square root (as one torch op) or a multiply (in rows.c's vector
loops) costs a fraction of an exp, and on a small student the loss's exps are a visible part of
the step (bench.student). Other temperatures take an exp of y / T."""
CHUNK_ELEMENTS = 1 << 17
"""Logits processed together by the fused loss: small enough to stay in the CPU's cache."""


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
    if math.isclose(t0, temperature, rel_tol=1e-6):
        kernel = rows_kernel() if fits_kernel(logits, lse) and logits.shape[-1] else None
        if kernel is not None:  # ~7 small ops: 0.64 ms a step of bench.student's loop, 0.36 in C
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


def sampled_targets(ids: torch.Tensor, logits: torch.Tensor, *, temperature: float,
                    sample_temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's tempered distribution estimated from a cache of sampled entries.

    ids: (B, L, m) draws from the teacher's softmax at `sample_temperature` (any scheme whose
    expected count of an id is m times its probability: precompute draws systematically),
    repeats of an id adjacent (as the logits job stores them, sorted by logit); logits: (B, L, m)
    their cached logits (possibly shifted per position). Each draw weighs w = exp(z (1/T - 1/T_s)),
    normalised over the position's draws (self-normalised importance sampling: equal weights, the
    draws' frequencies, when T = T_s). Returns (log_p (B, L, m), p_tail (B, L) zeros: the draws
    stand for the whole distribution, once (B, L, m) float32): an id drawn several times has its
    summed probability at each of its slots, and `once` is 1 at its first slot and 0 at the
    others, so that sums over slots weighted by it count each id once.
    """
    scale = 1 / temperature - 1 / sample_temperature
    logits = logits.float()
    kernel = rows_kernel() if fits_kernel(ids, logits) and ids.shape[-1] else None
    if kernel is not None:  # ~10 small ops: 1.4 ms a step of bench.student's loop, 0.4 in C
        log_p, once = kernel.sampled_targets(ids, logits, scale=scale)
        return log_p, log_p.new_zeros(log_p.shape[:-1]), once
    weights = torch.softmax(logits * scale, -1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    run = first.cumsum(-1) - 1  # which run of repeats each slot is in
    log_p = torch.zeros_like(weights).scatter_add_(-1, run, weights).gather(-1, run).log_()
    return log_p, log_p.new_zeros(log_p.shape[:-1]), first.to(log_p.dtype)


class _FusedCEKL(torch.autograd.Function):
    """Per-row CE and tail-bucket KL of logits (N, V); see `ce_and_cached_kl` for the maths.

    Neither pass keeps a (N, V) intermediate. Rows are processed in chunks small enough to stay
    in the CPU cache, and every full read of a chunk (its max and the sums behind logsumexp at
    T = 1 and at T; in the backward both softmaxes and the head ids' scatter) happens while it is
    there: on a small student the loss is memory-bound, so each extra trip over the logits costs
    ~5% of a step. The gathers and the labels' scatter touch k + 1 entries a row and run once
    over all rows.
    """

    @staticmethod
    def forward(ctx, logits, labels, head_ids, log_p, p_tail, temperature, head_once):
        distil = head_ids is not None
        n = logits.shape[0]
        # per-row results go straight into (n, 1) buffers: on a small student each op's Python
        # overhead (~5 us) is a visible part of the loss, so the chunk loop does the least it can
        row_max, sum_exp = logits.new_empty(n, 1), logits.new_empty(n, 1)
        if distil:
            sum_tempered = logits.new_empty(n, 1)
            roots = SQUARE_ROOT_TEMPERATURES.get(temperature)
        with torch.no_grad():
            for rows, x, (shifted, exps) in _row_chunks(logits, scratches=2):
                torch.amax(x, -1, keepdim=True, out=row_max[rows])
                torch.sub(x, row_max[rows], out=shifted)
                torch.sum(torch.exp(shifted, out=exps), -1, keepdim=True, out=sum_exp[rows])
                if distil:
                    # in place on the cache-hot buffers: re-reading x costs more than an exp
                    if roots is None:
                        tempered = shifted.mul_(1 / temperature).exp_()
                    else:
                        tempered = _square_roots(exps, roots)
                    torch.sum(tempered, -1, keepdim=True, out=sum_tempered[rows])
            lse1 = sum_exp.log_().add_(row_max).squeeze(-1)
            valid = labels != IGNORE_INDEX
            targets = labels.clamp(min=0).unsqueeze(-1)
            ce = torch.where(valid, lse1 - logits.gather(-1, targets).squeeze(-1), 0.0)
            if not distil:
                ctx.save_for_backward(logits, targets, valid, lse1)
                return ce, torch.zeros_like(ce)
            lse_t = sum_tempered.log_().add_(row_max, alpha=1 / temperature).squeeze(-1)
            head_logits = logits.gather(-1, head_ids)
            log_q = torch.add(-lse_t.unsqueeze(-1), head_logits, alpha=1 / temperature)
            q = log_q.exp()
            p = log_p.exp()
            # a repeated id counts once in the sums (multiplying by 0/1 is ~5x faster than where)
            q_once, p_once = (q, p) if head_once is None else (q * head_once, p * head_once)
            # 1 - sum q_i in float32 resolves tails down to ~1e-7, below TAIL_FLOOR
            q_tail = 1 - q_once.sum(-1)
            tail_free = q_tail >= TAIL_FLOOR
            q_tail = q_tail.clamp(min=TAIL_FLOOR)
            kl = ((p_once * (log_p - log_q)).sum(-1) + torch.xlogy(p_tail, p_tail)
                  - p_tail * q_tail.log())
            kl = torch.where(valid, kl, 0.0)
        ctx.save_for_backward(logits, targets, valid, lse1, head_ids, p, p_tail, lse_t, q, q_tail,
                              tail_free)
        ctx.temperature = temperature
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        logits, targets, valid, lse1, *teacher = ctx.saved_tensors
        grad_ce = torch.where(valid, grad_ce, 0.0).unsqueeze(-1)
        if teacher:
            head_ids, p, p_tail, lse_t, q, q_tail, tail_free = teacher
            temperature = ctx.temperature
            roots = SQUARE_ROOT_TEMPERATURES.get(temperature)
            grad_kl = torch.where(valid, grad_kl, 0.0) / temperature
            # d KL / d s_j = (1/T) q_j c for tail tokens and (1/T) (q_j h - p_j) for head tokens,
            # with c = (q_tail - p_tail) / q_tail and h = 1 while the student tail is above the
            # floor, c = h = 1 - p_tail when it is clamped. Head and tail are written separately
            # so that no large terms cancel when the tails are tiny.
            tail_coef = torch.where(tail_free, (q_tail - p_tail) / q_tail, 1 - p_tail) * grad_kl
            head_coef = torch.where(tail_free, 1.0, 1 - p_tail).unsqueeze(-1)
            head_grad = (q * head_coef - p) * grad_kl.unsqueeze(-1)
            if roots is None:
                minus_lse_t = -lse_t.unsqueeze(-1)
            else:  # q_j = softmax(s)_j ** (1/T) * exp(lse_1 / T - lse_T)
                tail_coef = tail_coef * torch.exp(lse1 / temperature - lse_t)
            tail_coef = tail_coef.unsqueeze(-1)
        # softmax(s) * g_ce computed as exp(s - lse + log g_ce), one pass fewer; a loss's
        # backward has g_ce >= 0, anything else takes the multiply. With a teacher, g_ce is
        # applied in the pass that adds the tail, and the plain softmax(s) gives the tempered one.
        fold = not teacher and bool((grad_ce >= 0).all())
        shift1 = lse1.unsqueeze(-1) - grad_ce.log() if fold else lse1.unsqueeze(-1)
        grad = torch.empty_like(logits)
        with torch.no_grad():
            for rows, x, (scratch,) in _row_chunks(logits):
                g = grad[rows]
                torch.sub(x, shift1[rows], out=g).exp_()
                if teacher:
                    if roots is None:
                        tempered = torch.add(minus_lse_t[rows], x, alpha=1 / temperature,
                                             out=scratch).exp_()
                    else:
                        tempered = _square_roots(g, roots, out=scratch)
                    tail = torch.mul(tempered, tail_coef[rows], out=scratch)
                    # the head's gradient replaces the tail's at the head ids (a repeated id
                    # has the same value at each of its slots)
                    tail.scatter_(-1, head_ids[rows], head_grad[rows])
                    torch.addcmul(tail, g, grad_ce[rows], out=g)
                elif not fold:
                    g.mul_(grad_ce[rows])
            grad.scatter_add_(-1, targets, grad_ce.neg())
        return grad, None, None, None, None, None, None


class _NativeCEKL(torch.autograd.Function):
    """`_FusedCEKL` as rows.c computes it, a row at a time on the CPU (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, kernel, logits, labels, head_ids, log_p, p_tail, temperature, head_once):
        teacher = None if head_ids is None else TeacherRows(
            head_ids, log_p, p_tail, head_once, temperature,
            SQUARE_ROOT_TEMPERATURES.get(temperature, -1), TAIL_FLOOR)
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
        return None, grad, None, None, None, None, None, None


def _square_roots(x: torch.Tensor, roots: int, *, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x ** (1 / 2**roots) by `roots` square roots, into `out` (default: in place; x itself
    for 0 roots)."""
    for _ in range(roots):
        x = torch.sqrt(x, out=x if out is None else out)
    return x


def _row_chunks(logits: torch.Tensor, scratches: int = 1):
    """(row slice, logits rows, scratch buffers of their shape) over (N, V) in cache-sized chunks.

    On an accelerator every row goes in one chunk: there a chunk costs a handful of kernel
    launches, and CPU-cache-sized chunks (2 rows of a 50k vocabulary) made GPT-2 Small's step
    40x slower on an H200 (measured).
    """
    n, vocab = logits.shape
    rows = max(1, CHUNK_ELEMENTS // vocab) if logits.device.type == "cpu" else n
    buffers = [logits.new_empty(min(rows, n), vocab) for _ in range(scratches)]
    for start in range(0, n, rows):
        x = logits[start:start + rows]
        yield slice(start, start + rows), x, [b[: x.shape[0]] for b in buffers]


def ce_and_cached_kl(logits: torch.Tensor, labels: torch.Tensor, *,
                     head_ids: torch.Tensor | None = None, log_p_head: torch.Tensor | None = None,
                     p_tail: torch.Tensor | None = None, temperature: float = 1.0,
                     head_once: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE and cached-KD KL, fused into one pass over the logits.

    logits: (B, L, V) student logits; labels: (B, L) with IGNORE_INDEX where ignored.
    head_ids: (B, L, k) teacher top-k ids; log_p_head: (B, L, k) and p_tail: (B, L) from
    `teacher_buckets` at `temperature`; all None for plain CE (the baseline), when kl is None.
    head_once: (B, L, k) 1 at an id's first slot and 0 at its repeats, which hold the same log_p
    (`sampled_targets`); None when the ids are distinct.
    Returns (ce, kl), each (B, L), 0 where ignored. With q_i = softmax(logits / T)_i over the head
    ids and q_tail = 1 - sum q_i (floored at TAIL_FLOOR):
    kl = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail).
    """
    shape = labels.shape
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # autocast hands over half-precision logits; softmax needs more
    rows = [None if t is None else t.flatten(0, 1)
            for t in (logits, labels, head_ids, log_p_head, p_tail, head_once)]
    kernel = rows_kernel() if fits_kernel(*rows) else None
    if kernel is None:
        ce, kl = _FusedCEKL.apply(*rows[:5], float(temperature), rows[5])
    else:
        ce, kl = _NativeCEKL.apply(kernel, *rows[:5], float(temperature), rows[5])
    return ce.view(shape), None if head_ids is None else kl.view(shape)


def full_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(p_T || q_T) (B, L) over the full vocabulary (online KD, the reference).

    logits, teacher_logits: (B, L, V). Positions whose label is IGNORE_INDEX give 0.
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
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
    ce_mean = ce.sum() / denominator
    if kl is None:
        return LossTerms(ce_mean, ce_mean.detach(), ce_mean.new_zeros(()), n_tokens)
    kl_mean = kl.sum() / denominator
    loss = alpha * ce_mean + (1 - alpha) * temperature ** 2 * kl_mean
    return LossTerms(loss, ce_mean.detach(), kl_mean.detach(), n_tokens)

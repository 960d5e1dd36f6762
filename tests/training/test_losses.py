"""KD losses checked analytically: zero for identical distributions, equal to F.kl_div over the
full vocabulary when k = V, CE when alpha = 1, finite-difference gradients, masking, fallback.
Every test runs twice: with the CPU's C kernel for the fused loss and with its torch ops
(float64, as in gradcheck, always takes the torch ops)."""

import math

import pytest
import torch
import torch.nn.functional as F

from storage.cache import count_draws, expand_draws
from training import losses
from training.native import rows_kernel, torch_ops_only
from training.losses import (IGNORE_INDEX, ce_and_cached_kl, combine, first_slots, full_kl,
                            log1mexp, sampled_targets, shift_labels, teacher_buckets)

V, K = 50, 6
TEMPS = (1.0, 2.0)


def cache_of(teacher_logits: torch.Tensor, k: int, temperatures=TEMPS, shift: bool = True):
    """What the logit cache holds for teacher logits (B, L, V): ids, top-k logits, lse per T.
    Stored shifted by the top-1 logit, as storage/cache.py does."""
    values, ids = teacher_logits.topk(k, -1)
    lse = torch.stack([torch.logsumexp(teacher_logits / t, -1) for t in temperatures], -1)
    if shift:
        top = values[..., :1]
        values, lse = values - top, lse - top / torch.tensor(temperatures)
    return ids, values, lse


def cached(student, teacher, labels, *, k=K, temperature=2.0, temperatures=TEMPS):
    ids, z, lse = cache_of(teacher, k, temperatures)
    log_p, p_tail = teacher_buckets(z, lse, temperature=temperature, temperatures=temperatures,
                                    vocab_size=teacher.shape[-1])
    return ce_and_cached_kl(student, labels, head_ids=ids, log_p_head=log_p.to(student.dtype),
                            p_tail=p_tail.to(student.dtype), temperature=temperature)


@pytest.fixture(autouse=True, params=["kernel", "torch ops"])
def implementation(request):
    if request.param == "kernel":
        assert rows_kernel() is not None, "the C loss kernel did not build (see stderr)"
        yield
    else:
        with torch_ops_only():
            yield


@pytest.fixture
def batch():
    torch.manual_seed(0)
    student = torch.randn(2, 7, V) * 2
    teacher = torch.randn(2, 7, V) * 3
    labels = torch.randint(0, V, (2, 7))
    return student, teacher, labels


def test_identical_teacher_and_student_give_zero_kl(batch):
    _, teacher, labels = batch
    for k in (1, K, V):
        _, kl = cached(teacher.clone(), teacher, labels, k=k)
        assert kl.abs().max() < 1e-5
    assert full_kl(teacher, F.log_softmax(teacher / 2.0, -1), temperature=2.0).abs().max() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0])
def test_k_equal_vocabulary_is_full_vocabulary_kd(batch, temperature):
    """1, 2 and 4 take the tempered exponentials as square roots (SQUARE_ROOT_TEMPERATURES),
    3 as exps."""
    student, teacher, labels = batch
    _, kl = cached(student, teacher, labels, k=V, temperature=temperature,
                   temperatures=(1.0, 2.0, 3.0, 4.0))
    reference = F.kl_div(F.log_softmax(student / temperature, -1),
                         F.log_softmax(teacher / temperature, -1), log_target=True,
                         reduction="none").sum(-1)
    assert torch.allclose(kl, reference, atol=1e-5)
    log_p = F.log_softmax(teacher / temperature, -1)
    assert torch.allclose(full_kl(student, log_p, temperature=temperature), reference, atol=1e-5)


def test_cached_kl_matches_the_bucket_definition(batch):
    student, teacher, labels = batch
    t = 2.0
    _, kl = cached(student, teacher, labels, temperature=t)
    ids = teacher.topk(K, -1).indices
    p_full, q_full = F.softmax(teacher / t, -1), F.softmax(student / t, -1)
    p = torch.cat([p_full.gather(-1, ids), 1 - p_full.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q = torch.cat([q_full.gather(-1, ids), 1 - q_full.gather(-1, ids).sum(-1, keepdim=True)], -1)
    assert torch.allclose(p.sum(-1), torch.ones(2, 7))  # the tail bucket completes the head
    assert torch.allclose(kl, (p * (p / q).log()).sum(-1), atol=1e-5)
    # the bucketed KL never exceeds the full one (coarse-graining loses information)
    assert (kl <= full_kl(student, F.log_softmax(teacher / t, -1), temperature=t) + 1e-5).all()


def test_ce_matches_torch_and_alpha_one_is_ce(batch):
    student, teacher, labels = batch
    ce, kl = cached(student, teacher, labels)
    reference = F.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="none")
    assert torch.allclose(ce.flatten(), reference, atol=1e-5)
    baseline, none = ce_and_cached_kl(student, labels)
    assert none is None and torch.allclose(baseline, ce)
    terms = combine(ce, kl, labels, alpha=1.0, temperature=2.0)
    assert torch.isclose(terms.loss, reference.mean(), atol=1e-6)
    mixed = combine(ce, kl, labels, alpha=0.25, temperature=2.0)
    assert torch.isclose(mixed.loss, 0.25 * ce.mean() + 0.75 * 4 * kl.mean(), atol=1e-6)


def test_ignored_positions_count_nowhere(batch):
    student, teacher, _ = batch
    tokens = torch.randint(0, V, (2, 7))
    labels = shift_labels(tokens)
    assert (labels[:, -1] == IGNORE_INDEX).all() and torch.equal(labels[:, :-1], tokens[:, 1:])
    labels[0, :3] = IGNORE_INDEX
    student = student.clone().requires_grad_()
    ce, kl = cached(student, teacher, labels)
    ignored = labels == IGNORE_INDEX
    assert (ce[ignored] == 0).all() and (kl[ignored] == 0).all()
    terms = combine(ce, kl, labels, alpha=0.5, temperature=2.0)
    assert terms.n_tokens == int((~ignored).sum())
    assert torch.isclose(terms.ce, ce[~ignored].mean())
    terms.loss.backward()
    assert (student.grad[ignored] == 0).all() and student.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("temperature,k", [(2.0, 4), (1.0, 4), (0.5, 4), (4.0, 4), (2.0, 12)])
def test_gradient_matches_finite_differences(temperature, k):
    torch.manual_seed(1)
    vocab = 12
    student = (torch.randn(1, 3, vocab, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(1, 3, vocab, dtype=torch.float64) * 2
    labels = torch.tensor([[3, IGNORE_INDEX, 7]])
    temps = (1.0, 0.5, 2.0, 4.0)
    ids, z, lse = cache_of(teacher, k, temps)
    log_p, p_tail = teacher_buckets(z, lse, temperature=temperature, temperatures=temps,
                                    vocab_size=vocab)

    def both(s):
        return ce_and_cached_kl(s, labels, head_ids=ids, log_p_head=log_p.double(),
                                p_tail=p_tail.double(), temperature=temperature)

    assert torch.autograd.gradcheck(both, (student,), atol=1e-6)
    assert torch.autograd.gradcheck(lambda s: ce_and_cached_kl(s, labels)[0], (student,))


def test_fused_gradient_equals_autograd_of_the_definition(batch):
    """The fused backward against plain autograd of the same formula, float32, chunked rows,
    labels among the head ids (first, last) and outside them."""
    student, teacher, labels = batch
    labels[1, 2] = IGNORE_INDEX
    ids, z, lse = cache_of(teacher, K)
    labels[0, :3], labels[1, 5] = ids[0, :3, 0], ids[1, 5, K - 1]
    log_p, p_tail = teacher_buckets(z, lse, temperature=2.0, temperatures=TEMPS, vocab_size=V)
    weights = torch.rand(2, 7)
    fused = student.clone().requires_grad_()
    old_chunk = losses.CHUNK_ELEMENTS
    losses.CHUNK_ELEMENTS = 3 * V  # several chunks, the last one short
    try:
        ce, kl = ce_and_cached_kl(fused, labels, head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                                  temperature=2.0)
    finally:
        losses.CHUNK_ELEMENTS = old_chunk
    (ce * weights).sum().add((kl * weights.flip(0)).sum()).backward()
    plain = student.clone().requires_grad_()
    log_q = plain.gather(-1, ids) / 2 - torch.logsumexp(plain / 2, -1, keepdim=True)
    q_tail = 1 - log_q.exp().sum(-1)
    ref_kl = (log_p.exp() * (log_p - log_q)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    valid = labels != IGNORE_INDEX
    ref_ce = F.cross_entropy(plain.flatten(0, 1), labels.flatten(), reduction="none").view(2, 7)
    ((ref_ce * weights).sum() + (torch.where(valid, ref_kl, 0) * weights.flip(0)).sum()).backward()
    assert torch.allclose(fused.grad, plain.grad, atol=1e-6)


def test_sampled_targets_merge_repeats_and_reweight_for_another_temperature():
    ids = torch.tensor([[[3, 3, 3, 5]]])  # as cached: sorted by logit, repeats adjacent
    z = torch.tensor([[[-0.5, -0.5, -0.5, -1.0]]])
    log_p, p_tail = sampled_targets(ids, z, temperature=2.0, sample_temperature=2.0)
    assert first_slots(ids).tolist() == [[[True, False, False, True]]]
    assert p_tail.tolist() == [[0.0]]
    assert torch.allclose(log_p.exp(), torch.tensor([[[0.75, 0.75, 0.75, 0.25]]]))
    # drawn at T_s = 2, read at T = 1: each draw weighs exp(z (1/1 - 1/2)), normalised
    log_p, _ = sampled_targets(ids, z, temperature=1.0, sample_temperature=2.0)
    w = torch.exp(z[0, 0] / 2)
    assert torch.allclose(log_p.exp()[0, 0, [0, 3]], torch.stack([w[:3].sum(), w[3]]) / w.sum())


def test_counted_draws_give_the_targets_of_their_plain_draws(batch):
    """A counted-draws cache returns each position's draws sorted by id (expanded from distinct
    ids and counts); a sampled cache holds the same draws sorted by logit. At the drawing
    temperature both give one target: the same loss and gradient."""
    student, teacher, labels = batch
    generator = torch.Generator().manual_seed(2)
    plain = torch.multinomial(torch.softmax(teacher.flatten(0, 1) / 2, -1), 16, replacement=True,
                              generator=generator).view(2, 7, 16)
    z = teacher.gather(-1, plain)
    by_logit = plain.gather(-1, torch.argsort(z, dim=-1, descending=True, stable=True))
    delta, counts = count_draws(plain.numpy())
    counted = torch.from_numpy(expand_draws(delta, counts))
    assert torch.equal(counted, plain.sort(-1).values) and not torch.equal(counted, by_logit)
    results = []
    for ids in (by_logit, counted):
        log_p, p_tail = sampled_targets(ids, None, temperature=2.0, sample_temperature=2.0)
        fused = student.clone().requires_grad_()
        ce, kl = ce_and_cached_kl(fused, labels, head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                                  temperature=2.0)
        (ce.sum() + kl.sum()).backward()
        results.append((ce, kl, fused.grad))
    (ce_a, kl_a, grad_a), (ce_b, kl_b, grad_b) = results
    assert torch.equal(ce_a, ce_b)
    assert torch.allclose(kl_a, kl_b, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad_a, grad_b, atol=1e-7)


def test_sampled_cache_kd_is_the_kl_to_the_sampled_distribution(batch):
    """Draws with repeats: the fused loss and its gradient equal KL(p_hat || q_T) over the full
    vocabulary, p_hat the draws' (merged) probabilities, plus CE, by plain autograd; a label
    that is a repeated id among them."""
    student, teacher, labels = batch
    labels[0, 3] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(1)
    ids = torch.multinomial(torch.softmax(teacher.flatten(0, 1) / 2, -1), 12, replacement=True,
                            generator=generator).view(2, 7, 12).sort(-1).values  # repeats adjacent
    z = teacher.gather(-1, ids)
    log_p, p_tail = sampled_targets(ids, z, temperature=1.5, sample_temperature=2.0)
    once = first_slots(ids)
    assert torch.allclose((log_p.exp() * once).sum(-1), torch.ones(2, 7)) and (~once).any()
    repeat = (~once).nonzero()[0].tolist()  # (row, position, slot) of a repeated id
    labels[repeat[0], repeat[1]] = ids[tuple(repeat)]
    fused = student.clone().requires_grad_()
    ce, kl = ce_and_cached_kl(fused, labels, head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                              temperature=1.5)
    (ce.sum() + kl.sum()).backward()
    plain = student.clone().requires_grad_()
    p_hat = torch.zeros_like(teacher).scatter_add_(-1, ids, log_p.exp() * once)
    log_q = F.log_softmax(plain / 1.5, -1)
    ref = torch.where(labels != IGNORE_INDEX, (torch.xlogy(p_hat, p_hat) - p_hat * log_q).sum(-1), 0)
    ref_ce = F.cross_entropy(plain.flatten(0, 1), labels.flatten(), reduction="sum")
    (ref.sum() + ref_ce).backward()
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(fused.grad, plain.grad, atol=1e-6)


def test_tiny_tails_stay_finite():
    """A peaked teacher and student (tails below float32 resolution) give finite values and
    gradients, the clamped student tail included."""
    student = torch.zeros(1, 2, V)
    student[..., 0] = 40.0
    teacher = torch.zeros(1, 2, V)
    teacher[..., 0] = 30.0
    student.requires_grad_()
    ce, kl = cached(student, teacher, torch.zeros(1, 2, dtype=torch.long), temperature=1.0)
    (ce + kl).sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    assert kl.abs().max() < 1e-4


def test_temperature_fallback_is_close_for_a_peaked_teacher():
    """T = 2 not stored: derived from T = 1 by spreading the tail uniformly. Exact for a flat
    tail; close for a peaked teacher with a noisy tail."""
    torch.manual_seed(2)
    teacher = torch.randn(4, 8, 200) * 0.3
    teacher[..., :5] += torch.tensor([9.0, 8.0, 7.5, 7.0, 6.0])
    ids, z, lse = cache_of(teacher, 5, (1.0, 2.0))
    exact_log_p, exact_tail = teacher_buckets(z, lse, temperature=2.0, temperatures=(1.0, 2.0),
                                              vocab_size=200)
    approx_log_p, approx_tail = teacher_buckets(z, lse[..., :1], temperature=2.0,
                                                temperatures=(1.0,), vocab_size=200)
    assert (approx_log_p - exact_log_p).abs().max() < 0.01
    assert (approx_tail - exact_tail).abs().max() < 0.005
    flat = teacher.clone()
    flat[..., 5:] = 0.0
    ids, z, lse = cache_of(flat, 5, (1.0, 3.0))
    exact = teacher_buckets(z, lse, temperature=3.0, temperatures=(1.0, 3.0), vocab_size=200)
    approx = teacher_buckets(z, lse[..., :1], temperature=3.0, temperatures=(1.0,), vocab_size=200)
    assert torch.allclose(exact[0], approx[0], atol=1e-4)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert math.isclose(float(log1mexp(torch.tensor(-1e-8, dtype=torch.float64))),
                        math.log(1e-8), rel_tol=1e-6)

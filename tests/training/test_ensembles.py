"""Ensemble targets checked against direct computations from the teachers' distributions: the
mixture of full-vocabulary caches is the mixture, the mixture of draws converges to it, the
top-k mixture misses exactly what the heads do not hold, and the online targets are what they
say. Every test runs twice: with the CPU's C kernel and with the torch ops."""

import math

import pytest
import torch
import torch.nn.functional as F

from precompute.logits import Sampling, teacher_topk
from training.losses import (ce_and_cached_kl, ensemble_log_probs, first_slots, full_kl,
                             mixture_targets, sampled_targets, teacher_buckets)
from tests.training.test_losses import implementation  # noqa: F401 (autouse: both paths)

V = 40
WEIGHTS = [0.3, 0.7]


def returning(logits: torch.Tensor):
    """A stand-in teacher whose forward returns `logits` whatever its input."""
    return lambda input_ids, **_: type("Out", (), {"logits": logits})


def adjacent(ids) -> bool:
    """Whether each id's slots are adjacent in every row (what the fused loss needs)."""
    runs = first_slots(ids).sum(-1)
    distinct = torch.tensor([[len(set(row.tolist())) for row in rows] for rows in ids])
    return bool(torch.equal(runs, distinct))


@pytest.fixture
def teachers():
    torch.manual_seed(0)
    return [2.0 * torch.randn(2, 5, V), 3.0 * torch.randn(2, 5, V)]


def mixture(teachers, temperature):
    return sum(w * F.softmax(z / temperature, -1) for z, w in zip(teachers, WEIGHTS))


def per_id(ids, log_p):
    """(B, L, V) probabilities from targets whose repeated ids carry their total at each slot."""
    once = first_slots(ids).float()
    return torch.zeros(*ids.shape[:-1], V).scatter_add_(-1, ids, log_p.exp() * once)


def topk_targets(logits, *, k, temperature):
    ids, values, lse = teacher_topk(returning(logits), torch.zeros(2, 5, dtype=torch.long), k=k,
                                    temperatures=(1.0, 2.0))
    log_p, p_tail = teacher_buckets(values, lse, temperature=temperature, temperatures=(1.0, 2.0),
                                    vocab_size=V)
    return ids.long(), log_p, p_tail


def sampled(logits, *, m, temperature, seed):
    ids, _, _ = teacher_topk(returning(logits), torch.zeros(2, 5, dtype=torch.long), k=m,
                             temperatures=(1.0,), sampling=Sampling(temperature, seed))
    log_p, p_tail = sampled_targets(ids.long(), None, temperature=temperature,
                                    sample_temperature=temperature)
    return ids.long(), log_p, p_tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixture_of_full_vocabulary_caches_is_the_mixture(teachers, temperature):
    members = [topk_targets(z, k=V, temperature=temperature) for z in teachers]
    ids, log_p, p_tail = mixture_targets(members, WEIGHTS)
    assert ids.shape[-1] == 2 * V and adjacent(ids)
    torch.testing.assert_close(per_id(ids, log_p), mixture(teachers, temperature), atol=1e-6,
                               rtol=1e-5)
    assert p_tail.abs().max() < 1e-5
    # the fused loss on the merged slots (every id twice) is the full KL to the mixture
    student = torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    _, kl = ce_and_cached_kl(student, labels, head_ids=ids, log_p_head=log_p, p_tail=p_tail,
                             temperature=temperature)
    target = ensemble_log_probs(teachers, WEIGHTS, temperature=temperature, target="probability")
    torch.testing.assert_close(kl, full_kl(student, target, temperature=temperature), atol=1e-5,
                               rtol=1e-4)


def test_one_teacher_passes_through_unchanged(teachers):
    member = topk_targets(teachers[0], k=8, temperature=2.0)
    assert mixture_targets([member], [1.0]) is member


def test_sampled_mixture_is_the_weighted_union_and_converges_to_the_mixture(teachers):
    """Per draw set, each id's target is sum_i w_i (its count among teacher i's m draws) / m;
    averaged over seeds it approaches the mixture (the error shrinks as 1 / sqrt(seeds))."""
    m, t = 16, 2.0
    one = [sampled(z, m=m, temperature=t, seed=5) for z in teachers]
    ids, log_p, p_tail = mixture_targets(one, WEIGHTS)
    assert adjacent(ids)
    counts = [F.one_hot(member_ids, V).sum(-2).float() / m for member_ids, _, _ in one]
    torch.testing.assert_close(per_id(ids, log_p), WEIGHTS[0] * counts[0] + WEIGHTS[1] * counts[1],
                               atol=1e-6, rtol=1e-5)
    assert torch.all(p_tail == 0)
    errors = []
    for seeds in (4, 256):
        mean = sum(per_id(*mixture_targets([sampled(z, m=m, temperature=t, seed=s)
                                            for z in teachers], WEIGHTS)[:2])
                   for s in range(seeds)) / seeds
        errors.append((mean - mixture(teachers, t)).abs().max().item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.005


def test_topk_mixture_misses_what_the_heads_do_not_hold(teachers):
    """Each id's target is the weighted sum of the heads holding it; every other bit of mass,
    including a head id's share in another teacher's tail, is in the tail bucket."""
    k, t = 6, 2.0
    members = [topk_targets(z, k=k, temperature=t) for z in teachers]
    ids, log_p, p_tail = mixture_targets(members, WEIGHTS)
    expected = torch.zeros(2, 5, V)
    for (member_ids, _, _), z, w in zip(members, teachers, WEIGHTS):
        in_head = torch.zeros(2, 5, V).scatter_(-1, member_ids, 1.0)
        expected += w * F.softmax(z / t, -1) * in_head
    got = per_id(ids, log_p)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1) + p_tail, torch.ones(2, 5), atol=1e-5, rtol=0)
    # the union's true mixture mass exceeds what the heads hold by what lay in the tails
    union = (got > 0).float()
    missed = (mixture(teachers, t) * union).sum(-1) - got.sum(-1)
    assert torch.all(missed >= -1e-6) and missed.max() > 0
    kth = [F.softmax(z / t, -1).topk(k, -1).values[..., -1] for z in teachers]
    bound = sum(w * p * k for w, p in zip(WEIGHTS, kth))  # at most k ids per other head
    assert torch.all(missed <= bound + 1e-6)


def test_online_targets(teachers):
    t = 2.0
    probability = ensemble_log_probs(teachers, WEIGHTS, temperature=t, target="probability")
    torch.testing.assert_close(probability.exp(), mixture(teachers, t))
    logits = ensemble_log_probs(teachers, WEIGHTS, temperature=t, target="logits")
    average = WEIGHTS[0] * teachers[0] + WEIGHTS[1] * teachers[1]
    torch.testing.assert_close(logits, F.log_softmax(average / t, -1))
    assert (probability.exp() - logits.exp()).abs().max() > 0.05  # two different targets
    single = ensemble_log_probs(teachers[:1], [1.0], temperature=t, target="logits")
    torch.testing.assert_close(single, F.log_softmax(teachers[0] / t, -1))
    assert math.isclose(sum(WEIGHTS), 1.0)

"""MiniLLM: the policy-gradient estimator of the sequence-level reverse KL against its exact value on an enumerable
two-step toy, the single-step term against the analytic reverse KL, importance weights and PPO clipping by hand,
the returns by hand, parity with TRL's formulation where the definitions agree, the excess accumulated error by
hand, bad settings, and a tiny end-to-end run of the script."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from methods.minillm.loss import (
    clipped_policy_loss,
    excess_accumulated_error,
    importance_weights,
    long_term_returns,
    minillm_loss_sum,
    single_step_kl,
    whiten,
)
from methods.minillm.run import MiniLLMConfig, main

ln = math.log

# ----------------------------------------------------------------------------------------------------------------
# The gradient estimator on a toy whose reverse KL can be enumerated
# ----------------------------------------------------------------------------------------------------------------

V = 3  # vocabulary; sequences y1 y2 of two tokens, 9 in all


def _toy():
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(V, generator=gen, dtype=torch.float64).requires_grad_()  # student logits of y1
    second = torch.randn(V, V, generator=gen, dtype=torch.float64).requires_grad_()  # of y2 given y1 (rows)
    teacher_first = torch.randn(V, generator=gen, dtype=torch.float64) * 2
    teacher_second = torch.randn(V, V, generator=gen, dtype=torch.float64) * 2
    return first, second, teacher_first, teacher_second


def _exact_reverse_kl(first, second, teacher_first, teacher_second):
    """KL(q || p) over the 9 sequences: sum_y q(y) (log q(y) - log p(y)), q(y) = q(y1) q(y2 | y1)."""
    lq1, lq2 = F.log_softmax(first, -1), F.log_softmax(second, -1)  # (V,), (V, V)
    lp1, lp2 = F.log_softmax(teacher_first, -1), F.log_softmax(teacher_second, -1)
    log_q = lq1[:, None] + lq2  # (V, V): log q(y1, y2)
    log_p = lp1[:, None] + lp2
    return (log_q.exp() * (log_q - log_p)).sum()


def _rollouts(first, second, n, seed):
    """n sequences sampled from the student, laid out as the data (labels: -100 on the 1-token prompt)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y1 = torch.multinomial(F.softmax(first, -1), n, replacement=True, generator=gen)  # (n,)
        y2 = torch.multinomial(F.softmax(second, -1)[y1], 1, generator=gen).squeeze(-1)  # (n,)
    labels = torch.stack([torch.full_like(y1, -100), y1, y2], dim=1)  # (n, 3)
    return y1, labels


def _logits(first, second, y1):
    """(n, 3, V): position 0 predicts y1, position 1 predicts y2 given y1; position 2 predicts nothing."""
    n = y1.shape[0]
    return torch.stack([first.expand(n, V), second[y1], torch.zeros(n, V, dtype=first.dtype)], dim=1)


def _mc_gradient(estimator_options, n_batches=40, batch=500):
    """The estimator's gradient from n_batches independent batches of rollouts: mean and standard error."""
    first, second, teacher_first, teacher_second = _toy()
    grads = []
    for b in range(n_batches):
        y1, labels = _rollouts(first, second, batch, seed=b)
        student = _logits(first, second, y1)
        teacher = _logits(teacher_first, teacher_second, y1)
        loss = minillm_loss_sum(student, teacher, labels, **estimator_options).loss_sum / batch
        g1, g2 = torch.autograd.grad(loss, (first, second))
        grads.append(torch.cat([g1.flatten(), g2.flatten()]))
    grads = torch.stack(grads)  # (n_batches, V + V * V)
    return grads.mean(0), grads.std(0) / math.sqrt(n_batches)


# The bare estimator of Eq. (2)/(3): no teacher mix, normalization, discount, clip, whitening or reward scaling.
PLAIN = {
    "alpha": 0.0, "length_norm": False, "gamma": 1.0, "clip": 0.0, "whiten_advantages": False, "reward_scaling": 1.0
}  # fmt: skip


@pytest.mark.parametrize("single_step", [True, False])
def test_policy_gradient_is_unbiased_for_the_sequence_reverse_kl(single_step):
    # Eq. (2) (plain policy gradient on R_t) and Eq. (3) (exact single-step KL + policy gradient on R_{t+1}) are
    # both unbiased: the Monte-Carlo mean over 20000 rollouts agrees with the enumerated gradient within 4
    # standard errors in each of the 12 coordinates.
    first, second, teacher_first, teacher_second = _toy()
    exact = torch.autograd.grad(_exact_reverse_kl(first, second, teacher_first, teacher_second), (first, second))
    exact = torch.cat([g.flatten() for g in exact])
    mean, stderr = _mc_gradient(PLAIN | {"single_step": single_step, "returns_from": "next"})
    assert ((mean - exact).abs() <= 4 * stderr + 1e-6).all(), (mean, exact, stderr)
    assert exact.abs().max() > 10 * stderr.max()  # the test has power: the gradient is far from zero


def test_single_step_decomposition_lowers_the_variance():
    # The paper's motivation for Eq. (3): the exact single-step term replaces a sampled one.
    _, plain = _mc_gradient(PLAIN | {"single_step": False})
    _, decomposed = _mc_gradient(PLAIN | {"single_step": True, "returns_from": "next"})
    assert decomposed.sum() < plain.sum()


def test_official_returns_count_the_single_step_term_twice():
    # The official losses.py adds the exact single-step KL AND credits each token with R_t (its own reward
    # included), so its expected gradient is the exact gradient plus that of the single-step term once more:
    # grad [ KL(q(y1) || p(y1)) + sum_y1 sg(q(y1)) KL(q(. | y1) || p(. | y1)) ].
    first, second, teacher_first, teacher_second = _toy()
    kl_first = single_step_kl(first[None], teacher_first[None], torch.tensor([True]))[0]
    kl_second = single_step_kl(second, teacher_second, torch.ones(V, dtype=torch.bool))  # (V,) per y1
    extra = kl_first + (F.softmax(first, -1).detach() * kl_second).sum()
    exact = _exact_reverse_kl(first, second, teacher_first, teacher_second) + extra
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, (first, second))])
    mean, stderr = _mc_gradient(PLAIN | {"single_step": True, "returns_from": "current"})
    assert ((mean - exact).abs() <= 4 * stderr + 1e-6).all()


# ----------------------------------------------------------------------------------------------------------------
# The pieces by hand
# ----------------------------------------------------------------------------------------------------------------


def test_single_step_term_is_the_analytic_reverse_kl():
    # q = (3/4, 1/4), p = (1/2, 1/2): KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308...
    q = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    mask = torch.tensor([True])
    expected = 0.75 * ln(1.5) + 0.25 * ln(0.5)
    assert single_step_kl(q.log(), p.log(), mask).item() == pytest.approx(expected, rel=1e-12)
    assert single_step_kl(q.log(), p.log(), torch.tensor([False])).item() == 0.0
    # Inside the loss: one valid position, so the single-step log is that KL (and it is 0 for q = p).
    labels = torch.tensor([[-100, 0, -100]])
    student = torch.cat([q.log(), torch.zeros(2, 2, dtype=torch.float64)])[None]  # (1, 3, 2)
    teacher = torch.cat([p.log(), torch.zeros(2, 2, dtype=torch.float64)])[None]
    terms = minillm_loss_sum(student, teacher, labels, alpha=0.0)
    assert terms.tokens == 1 and terms.logs["single_step_kl"] == pytest.approx(expected, rel=1e-9)
    assert minillm_loss_sum(student, student, labels, alpha=0.0).logs["single_step_kl"] == pytest.approx(0.0)


def test_importance_weights_by_hand():
    # alpha 0.2: q(y) = 0.5, p(y) = 0.1 -> mixture 0.8 * 0.5 + 0.2 * 0.1 = 0.42, w = 0.5 / 0.42 = 1.1905;
    # q(y) = 0.1, p(y) = 0.9 -> mixture 0.08 + 0.18 = 0.26, w = 0.1 / 0.26 = 0.3846 (a teacher-favoured token).
    q = torch.tensor([0.5, 0.1], dtype=torch.float64).log()
    p = torch.tensor([0.1, 0.9], dtype=torch.float64).log()
    assert torch.allclose(importance_weights(q, p, 0.2), torch.tensor([0.5 / 0.42, 0.1 / 0.26], dtype=torch.float64))
    assert torch.equal(importance_weights(q, p, 0.0), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(importance_weights(q, p, 1.0), (q - p).exp())  # alpha 1: all from the teacher


def test_clipping_bounds_the_ratio():
    # rho = w * q / q_old with q = q_old: rho = w. eps 0.2.
    # A = +1, w = 1.5: max(-1.5, -1.2) = -1.2, the clipped value (no gradient);  A = -1, w = 1.5: max(1.5, 1.2) = 1.5.
    # A = +1, w = 0.5: max(-0.5, -0.8) = -0.5;  A = -1, w = 0.5: max(0.5, 0.8) = 0.8, clipped (no gradient).
    logprobs = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clipped = clipped_policy_loss(logprobs, logprobs.detach(), advantages, weights, mask, clip=0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, False, True]]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    # d/dlogq of -A w exp(logq - logq_old) at logq = logq_old is -A w where unclipped, 0 where clipped.
    assert torch.allclose(grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]], dtype=torch.float64))
    # The objective never credits a ratio outside [0.8, 1.2] where it would gain from it.
    plain, _ = clipped_policy_loss(logprobs, logprobs.detach(), advantages, weights, mask, clip=0.0)
    assert torch.allclose(plain, -advantages * weights)


def test_stored_old_logprobs_by_hand():
    # The official store (methods/minillm/store.py): rollouts sampled by q_old, trained on by q_theta. One target
    # token y (labels [-100, 1]: position 0 predicts it), V = 2; q_theta(y) = 0.5 (logits 0, 0), p(y) = 0.8,
    # q_old(y) = 0.25, alpha 0.2. w = q_old / (0.8 q_old + 0.2 p) = 0.25 / 0.36 = 0.69444;
    # r = log p - log q_old = ln 0.8 - ln 0.25 = 1.16315; returns from the current token, length-normalized over 1
    # token, rewards / 0.5: A = 2.32631 (no whitening); ratio = w q_theta / q_old = 0.69444 x 2 = 1.38889;
    # clip 0: policy = -A ratio = -3.23099. The single-step term is off (it does not read q_old).
    student = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[[0.0, ln(0.8 / 0.2)], [0.0, 0.0]]], dtype=torch.float64)  # p(1) = 0.8 at position 0
    labels = torch.tensor([[-100, 1]])
    old = torch.tensor([[ln(0.25), 0.0]], dtype=torch.float64)
    kwargs = dict(alpha=0.2, single_step=False, returns_from="current", clip=0.0, whiten_advantages=False)
    terms = minillm_loss_sum(student, teacher, labels, old_logprobs=old, **kwargs)
    w = 0.25 / 0.36
    assert terms.logs["weight"] == pytest.approx(w) and terms.logs["reward"] == pytest.approx(ln(0.8 / 0.25))
    assert terms.loss_sum.item() == pytest.approx(-2 * ln(0.8 / 0.25) * w * 0.5 / 0.25)
    # Where q_old is the current student's value (what one update per fresh batch means), the stored path is the
    # default path: the same value and the same gradient.
    current = torch.full((1, 2), ln(0.5), dtype=torch.float64)
    for single in (False, True):
        args = kwargs | dict(single_step=single, returns_from="next", clip=0.2, whiten_advantages=True)
        a = minillm_loss_sum(student, teacher, labels, **args)
        b = minillm_loss_sum(student, teacher, labels, old_logprobs=current, **args)
        (ga,), (gb,) = torch.autograd.grad(a.loss_sum, student), torch.autograd.grad(b.loss_sum, student)
        assert a.loss_sum.item() == pytest.approx(b.loss_sum.item()) and torch.allclose(ga, gb)


def test_store_samples_in_chunks_and_stores_the_sampling_students_logprobs():
    # --rollout-chunk C: the store's N prompts are completed C at a time (the official --chunk-size), each decoding
    # loop seeded by (run seed, iteration, the chunk's first rollout, process, purpose), and every rollout's log q_old
    # is that of the student that sampled it, as one forward over the rollout alone computes it (padding and the
    # rows beside it change nothing but float rounding).
    from core.data import DataConfig, encode_examples, load_ops
    from core.models import build_model
    from core.onpolicy import Resampler, derived_seed, example_prompt, sample_examples
    from core.tokenizers import train_bpe
    from methods.minillm.loss import token_logprobs
    from methods.minillm.store import RolloutStore

    task = load_ops(DataConfig(train_size=24, eval_size=4))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 320)
    student, teacher = build_model("tiny", tokenizer, seed=0), build_model("tiny", tokenizer, seed=1)
    prompts = [example_prompt(e) for e in encode_examples(tokenizer, task.train, 64)]
    mix = {"mix_model": teacher, "mix_alpha": 0.2}
    stores = {}
    for chunk in (4, 6, 100):  # 12 rollouts in micro-batches of 4: loops of 4, of 6, and all 12 at once
        resample = Resampler(tokenizer, 64, 5, 1.0, 1.0, seed=3, rank=0, purpose="minillm-sample")
        store = RolloutStore(prompts, per_epoch=3, rows=4, epochs=2, grad_accum=1, chunk=chunk)
        store.fill(0, student, resample, 1.0, **mix)
        assert store.chunk == min(chunk, 12) and len(store.items) == 12
        stores[chunk] = store.items
    # Chunks of 6: the rollouts are the two decoding loops' samples, seeded by their first rollout (0 and 6).
    chosen = np.random.default_rng(derived_seed(3, 0, 0, "minillm-store-prompts")).choice(24, 12, replace=False)
    loops = [sample_examples(student, [prompts[i] for i in chosen[s : s + 6]], tokenizer, 64, 5,
                             seed=derived_seed(3, 0, s, "store", 0, "minillm-sample"), **mix) for s in (0, 6)]  # fmt: skip
    assert [{k: e[k] for k in ("input_ids", "labels")} for e in stores[6]] == loops[0] + loops[1]
    # The prompts are the same in every chunking; the stored log q_old of each rollout is its own forward's.
    for items in stores.values():
        assert [e["input_ids"][: len(p)] for e, p in zip(items, [prompts[i] for i in chosen])] == [
            prompts[i] for i in chosen
        ]
        for e in items:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            with torch.no_grad():
                logits = student(input_ids=ids).logits
            mask = labels[:, 1:] != -100
            alone = token_logprobs(logits[:, :-1], labels[:, 1:].clamp(min=0), mask, 1.0)[0]
            stored = torch.tensor(e["old_logprobs"])[: alone.shape[0]]
            assert torch.allclose(stored[mask[0]], alone[mask[0]], atol=1e-5)
            assert mask[0].any()


def test_store_mini_batches_length_grouped_as_the_data_batches():
    # With the run's --length-group G > 1 (real text: 50), each PPO epoch's seeded permutation of the store is
    # length-grouped as core.train groups data batches: every rollout once an epoch, mini-batches of similar
    # lengths (here one window: the 16 rollouts sorted, 4 mini-batches of 4 consecutive lengths, shuffled). G 0
    # keeps the official uniform mini-batches (the plain permutation).
    from types import SimpleNamespace

    from methods.minillm.store import RolloutStore

    resample = SimpleNamespace(seed=0, rank=0, bare=lambda m: m, tokenizer=SimpleNamespace(pad_token_id=0))
    model = torch.nn.Linear(1, 1)
    lengths = [3, 17, 8, 12, 5, 20, 9, 14, 4, 11, 16, 7, 19, 6, 13, 10]
    stores = {}
    for group in (0, 50):
        store = RolloutStore([[1]] * 16, per_epoch=4, rows=4, epochs=2, grad_accum=1, chunk=16, length_group=group)
        store.iteration = 0
        store.items = [{"input_ids": [1] * n, "labels": [-100] + [1] * (n - 1), "old_logprobs": [0.0] * n}
                       for n in lengths]  # fmt: skip
        stores[group] = [
            [int(row.sum()) for row in store.batch(step, 0, model, resample, 1.0)["attention_mask"]]
            for step in range(8)
        ]
    for batches in stores.values():
        for epoch in (batches[:4], batches[4:]):
            assert sorted(n for b in epoch for n in b) == sorted(lengths)  # each rollout once per epoch
    ordered = sorted(lengths, reverse=True)
    quartets = sorted(sorted(ordered[j : j + 4]) for j in range(0, 16, 4))  # (3-6), (7-10), (11-14), (16-20)
    for epoch in (stores[50][:4], stores[50][4:]):
        assert sorted(sorted(b) for b in epoch) == quartets
    padding = {g: sum(len(b) * max(b) - sum(b) for b in batches) for g, batches in stores.items()}
    assert padding[50] < padding[0]
    assert stores[0][0] != sorted(stores[0][0], reverse=True) or stores[0][1] != sorted(stores[0][1], reverse=True)


def test_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last position is padding
    # next (R_{t+1}): (2 + 3, 3, 0); normalized by the tokens after t: (5 / 2, 3 / 1, 0)
    assert long_term_returns(rewards, mask, 1.0, False, "next").tolist() == [[5.0, 3.0, 0.0, 0.0]]
    assert long_term_returns(rewards, mask, 1.0, True, "next").tolist() == [[2.5, 3.0, 0.0, 0.0]]
    # current (R_t): (6, 5, 3); normalized by the tokens from t on: (6 / 3, 5 / 2, 3 / 1)
    assert long_term_returns(rewards, mask, 1.0, False, "current").tolist() == [[6.0, 5.0, 3.0, 0.0]]
    assert long_term_returns(rewards, mask, 1.0, True, "current").tolist() == [[2.0, 2.5, 3.0, 0.0]]
    # gamma 0.5: next (2 + 0.5 * 3, 3, 0); current (1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3)
    assert long_term_returns(rewards, mask, 0.5, False, "next").tolist() == [[3.5, 3.0, 0.0, 0.0]]
    assert long_term_returns(rewards, mask, 0.5, False, "current").tolist() == [[2.75, 3.5, 3.0, 0.0]]


def test_whitening_uses_valid_positions_and_the_unbiased_variance():
    values = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # Over the three valid values: mean 3, unbiased variance ((-2)^2 + 0 + 2^2) / (3 - 1) = 4 (torch.var_mean, the
    # official whiten), so (-1, 0, 1); the biased variance 8/3 would give -2 / sqrt(8/3) = -1.2247.
    out = whiten(values, mask)
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    var, mean = torch.var_mean(values[:, :3])
    assert torch.allclose(out[:, :3], (values[:, :3] - mean) / var.sqrt(), atol=1e-6)
    # The official statistics (--whiten-padding): over a 1 x 5 tensor, the two padding entries counted as zeros:
    # (1, 3, 5, 0, 0): mean 9 / 5 = 1.8, unbiased variance (0.64 + 1.44 + 10.24 + 3.24 + 3.24) / 4 = 4.7.
    padded = whiten(values, mask, total=5)
    expected = (torch.tensor([1.0, 3.0, 5.0]) - 1.8) / math.sqrt(4.7)
    assert torch.allclose(padded[0, :3], expected, atol=1e-6) and padded[0, 3] == 0
    var, mean = torch.var_mean(torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0]))
    assert math.isclose(mean.item(), 1.8, rel_tol=1e-6) and math.isclose(var.item(), 4.7, rel_tol=1e-6)


def _official_policy_term(student, teacher, labels, temperature, gamma, scaling, clip_reward):
    """The official minillm policy term restated from its equations (sampler.py, reward.py, losses.py), alpha 0,
    one update per rollout (ratio 1), no whitening: r_t = log softmax(teacher raw logits)(y_t) - log
    softmax(student logits / T)(y_t); r_t <- clip(r_t / reward_scaling, +-clip); A_t = sum_{t' >= t} gamma^(t'-t)
    r_t' / (tokens from t on); loss = sum_t -A_t (ratio = 1, its gradient d log q_T(y_t)), summed over tokens."""
    B, T, _ = student.shape
    total = 0.0
    for b in range(B):
        steps = [t for t in range(T - 1) if labels[b, t + 1] != -100]
        lq = [F.log_softmax(student[b, t] / temperature, -1)[labels[b, t + 1]] for t in steps]
        lp = [F.log_softmax(teacher[b, t], -1)[labels[b, t + 1]].item() for t in steps]  # raw: no temperature
        r = [max(-clip_reward, min(clip_reward, (p - q.item()) / scaling)) for p, q in zip(lp, lq)]
        for k in range(len(steps)):
            a = sum(gamma ** (j - k) * r[j] for j in range(k, len(steps))) / (len(steps) - k)
            total = total - a * torch.exp(lq[k] - lq[k].detach())
    return total


def test_policy_term_without_whitening_is_the_official_formula():
    # --no-whiten at T = 0.8 with the official returns (R_t, gamma 0.95): value and gradient of the policy term
    # equal the official computation re-derived above, reward doubled (0.5 scaling) and the teacher's raw logits.
    torch.manual_seed(1)
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (2, 5))
    labels[:, :2] = -100
    labels[1, 4] = -100  # a shorter completion
    options = {"alpha": 0.0, "single_step": False, "gamma": 0.95, "clip": 0.2, "whiten_advantages": False}
    ours = minillm_loss_sum(student, teacher, labels, temperature=0.8, **options).loss_sum
    official = _official_policy_term(student, teacher, labels, 0.8, 0.95, 0.5, 100.0)
    assert torch.allclose(ours.double(), official, rtol=1e-5)  # the loss runs in float32
    g_ours, g_official = (torch.autograd.grad(x, student)[0] for x in (ours, official))
    assert torch.allclose(g_ours, g_official, rtol=1e-5, atol=1e-7)
    # The rewards before this fix (no 0.5 scaling): the policy term was half the official one.
    half = minillm_loss_sum(student, teacher, labels, temperature=0.8, reward_scaling=1.0, **options).loss_sum
    assert torch.allclose(2 * half, ours, rtol=1e-6)
    # ...and the teacher at T in the reward (as before) is not the official value.
    at_t = _official_policy_term(student, teacher * 1.25, labels, 0.8, 0.95, 0.5, 100.0)  # teacher / 0.8
    assert not torch.allclose(at_t.detach(), ours.detach().double())


def test_reward_scaling_and_clip_by_hand():
    from methods.minillm.loss import scaled_rewards

    rewards = torch.tensor([[-80.0, 3.0, 60.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    # / 0.5 -> (-160, 6, 120), clipped to +-100 -> (-100, 6, 100); padding 0
    assert scaled_rewards(rewards, mask).tolist() == [[-100.0, 6.0, 100.0, 0.0]]
    assert scaled_rewards(rewards, mask, 1.0, 0.0).tolist() == [[-80.0, 3.0, 60.0, 0.0]]


def test_reward_reads_the_teachers_raw_logits_at_temperature():
    # One token, alpha 0, no single step, no normalization issues: the policy term is -A * ratio with
    # A = r / 0.5 and r = log softmax(teacher)(y) - log softmax(student / T)(y); here student logits (0, ln 3)
    # at T = 0.5 -> (0, 2 ln 3): q(y = 1) = 9 / 10; teacher logits (0, ln 4) raw -> p(y = 1) = 4 / 5
    # (at T it would be 16 / 17). r = ln(0.8) - ln(0.9) = -0.11778, A = 2 r = -0.23557, loss = -A = 0.23557.
    student = torch.tensor([[[0.0, ln(3)], [0.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, ln(4)], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1]])
    options = {"alpha": 0.0, "single_step": False, "clip": 0.0, "whiten_advantages": False}
    loss = minillm_loss_sum(student, teacher, labels, temperature=0.5, **options).loss_sum
    assert loss.item() == pytest.approx(-2 * (ln(0.8) - ln(0.9)))
    assert loss.item() != pytest.approx(-2 * (ln(16 / 17) - ln(0.9)))  # both at T: the old reward


# ----------------------------------------------------------------------------------------------------------------
# Parity with TRL's MiniLLMTrainer where the definitions agree
# ----------------------------------------------------------------------------------------------------------------


def _trl_style_advantage(student_logprobs, teacher_logprobs, mask, gamma, length_normalization):
    """TRL's `_compute_advantage` (huggingface/trl: trl/experimental/minillm/minillm_trainer.py), restated:
    advantages[t] = sum_{i >= t} gamma^i r_i, divided (length normalization) by sum_{i >= t} gamma^i mask_i."""
    mask = mask.float()
    rewards = (teacher_logprobs - student_logprobs) * mask
    gamma_pow = gamma ** torch.arange(rewards.shape[1], dtype=rewards.dtype)
    advantages = (rewards * gamma_pow).flip(1).cumsum(1).flip(1)
    if length_normalization:
        lengths = (torch.where(mask < 0.5, 1e-4, mask) * gamma_pow).flip(1).cumsum(1).flip(1)
        advantages = advantages / lengths
    return advantages


def _trl_style_single_step(student_logprobs, teacher_logprobs, mask):
    """TRL's `_single_step_decomposition_loss`: F.kl_div(input=log p, target=log q) is q (log q - log p) per entry
    (kl_div's argument order is the reverse of the paper's KL(q || p)); summed over the valid tokens' entries."""
    per_entry = F.kl_div(teacher_logprobs, student_logprobs, reduction="none", log_target=True)  # (B, T, V)
    return per_entry[mask].sum() / mask.sum()


def test_parity_with_trl_where_the_definitions_agree():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 6, 11, dtype=torch.float64), torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = -100  # prompt
    labels[0, 5] = -100  # a shorter completion (padding)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)
    lq = F.log_softmax(student, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    lp = F.log_softmax(teacher, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    # The single-step term: the same token-mean reverse KL.
    ours = single_step_kl(student, teacher, mask).sum() / mask.sum()
    assert torch.allclose(ours, _trl_style_single_step(F.log_softmax(student, -1), F.log_softmax(teacher, -1), mask))
    # The advantage: equal to the official code's R_t ("current") at gamma 1, normalized or not. TRL has no
    # R_{t+1} (the paper's decomposition) and no teacher-mixed sampling, so those have no TRL counterpart.
    # (TRL counts every masked position after t as 1e-4 of a token in the length, hence atol 1e-3 when normalized.)
    for norm in (True, False):
        trl = _trl_style_advantage(lq, lp, mask, 1.0, norm) * mask
        assert torch.allclose(long_term_returns(lp - lq, mask, 1.0, norm, "current"), trl, atol=1e-3 if norm else 1e-12)
    # gamma < 1 differs: TRL weighs the rewards by gamma^i (absolute position) and, normalized, divides by the
    # discounted length; the official code discounts from t and divides by the plain token count.
    trl = _trl_style_advantage(lq, lp, mask, 0.9, True) * mask
    assert not torch.allclose(long_term_returns(lp - lq, mask, 0.9, True, "current"), trl)


# ----------------------------------------------------------------------------------------------------------------
# Exposure bias: the excess accumulated error
# ----------------------------------------------------------------------------------------------------------------


def test_excess_accumulated_error_by_hand():
    # Two prompts, three steps each. Own prefixes: row 1 KL (5, 2, 4), row 2 (5, 6, -) (ended after step 2);
    # teacher prefixes: row 1 (9, 1, 1), row 2 (9, 1, 3).
    own = torch.tensor([[5.0, 2.0, 4.0], [5.0, 6.0, 7.0]])
    own_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    oracle = torch.tensor([[9.0, 1.0, 1.0], [9.0, 1.0, 3.0]])
    result = excess_accumulated_error(own, own_mask, oracle, torch.ones(2, 3))
    # Official (evaluate_exposure_bias.py): step 1 skipped; each step's mean over BOTH prompts, an ended one adds 0:
    # own steps 2, 3: (2 + 6) / 2 = 4, (4 + 0) / 2 = 2 -> R = (4, 6); teacher: 1, 2 -> l eps = (1, 3),
    # eps = (1, 1.5); ExAccErr = ((4 - 1) / 1, (6 - 3) / 3) = (300 %, 100 %).
    assert result["regret"] == [4.0, 6.0] and result["per_step_error"] == [1.0, 1.5]
    assert result["exaccerr"] == pytest.approx([300.0, 100.0])
    # The earlier definition (mean over running completions, step 1 counted): own (5, 4, 4) -> (5, 9, 13);
    # teacher (9, 1, 2) -> (9, 10, 12); ExAccErr = (-4 / 9, -1 / 10, 1 / 12) x 100.
    assert result["exaccerr_running"] == pytest.approx([-400 / 9, -10.0, 100 / 12])


def test_kl_along_in_chunks_equals_all_at_once():
    # The exposure-bias pass runs the student and teacher over every held-out completion; it goes chunk by chunk so
    # that memory is bounded (all 100 SmolLM2 prompts at once were OOM-killed). Each row's KL depends on its own
    # tokens only, so any chunk size gives the same (N, L) matrix and mask, including a chunk of one and a chunk
    # larger than N; completions of different lengths (one empty) exercise the padding and the width.
    from transformers import LlamaConfig, LlamaForCausalLM

    from methods.minillm.run import kl_along

    def tiny(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
        return LlamaForCausalLM(config).eval()

    student, teacher = tiny(0), tiny(1)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [2, 2]]
    completions = [[3, 4, 5, 6], [7], [], [8, 9], [1, 2, 3]]
    whole, whole_mask = kl_along(student, teacher, prompts, completions, 16, pad=0, chunk=len(prompts))
    assert whole.shape == (5, 4) and whole_mask.sum(-1).tolist() == [4.0, 1.0, 0.0, 2.0, 3.0]
    assert (whole[whole_mask.bool()] > 0).all() and (whole[~whole_mask.bool()] == 0).all()
    for chunk in (1, 2, 3, 64):
        kl, mask = kl_along(student, teacher, prompts, completions, 16, pad=0, chunk=chunk)
        torch.testing.assert_close(kl, whole, rtol=1e-5, atol=1e-6)
        assert torch.equal(mask, whole_mask)
    with pytest.raises(ValueError, match="chunk"):
        kl_along(student, teacher, prompts, completions, 16, pad=0, chunk=0)


# ----------------------------------------------------------------------------------------------------------------
# Settings and the script
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [({"alpha": 1.0}, "--alpha"), ({"alpha": -0.1}, "--alpha"), ({"returns_from": "last"}, "--returns-from"),
     ({"gamma": 0.0}, "--gamma"), ({"clip": 1.0}, "--clip"), ({"lm_coef": -1.0}, "--lm-coef"),
     ({"temperature": 0.0}, "--temperature"), ({"compare": "kl"}, "unknown"), ({"ppo_epochs": 0}, "--ppo-epochs"),
     ({"num_rollouts": -1}, "--num-rollouts"), ({"num_rollouts": 0}, "pass --ppo-epochs 1"),
     ({"rollout_chunk": 0}, "--rollout-chunk must be at least 1"),
     ({"num_rollouts": 0, "ppo_epochs": 1, "rollout_chunk": 8}, "drop them"),
     ({"num_rollouts": 0, "ppo_epochs": 1, "group_rollouts": True}, "drop them")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        MiniLLMConfig(**bad)


TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "20", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3", "--sample-max-new-tokens", "6"]  # fmt: skip


@pytest.mark.slow
def test_end_to_end_run_from_the_sft_student(tmp_path):
    out = tmp_path / "minillm"
    metrics = main([*TINY, "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["method"] == "minillm"
    # The student (and every baseline) started from the cached SFT student of the same settings.
    assert "sft-tiny-" in saved["config"]["ModelConfig"]["student"]
    assert set(saved["eval"]) == {"student", "teacher", "sft_student", "kd_fkl_student", "seqkd_student"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    # The official store (--ppo-epochs 4 --num-rollouts 256): 20 steps of 16 rows are too short for one store of
    # 256 over 4 epochs, so it holds ceil(20 / 4) = 5 micro-batches, 80 rollouts (at most 6 tokens each), sampled
    # from the teacher-mixed policy at step 1 and trained on 4 times; every step weighed them.
    assert [r["step"] for r in log if r["gen_s"] > 0] == [1] and 0 < log[0]["gen_tokens"] <= 80 * 6
    assert all(0 < r["weight"] and 0 <= r["clipped"] <= 1 for r in log)
    train = saved["train"]
    assert 0 < train["gen_fraction"] < 1 and train["gen_tokens_per_s"] > 0
    assert train["gen_tokens"] == sum(r["gen_tokens"] for r in log)
    # Exposure bias of every student, on the evaluation length (12 on the embedded task).
    assert set(saved["exposure_bias"]) == {"student", "sft_student", "kd_fkl_student", "seqkd_student"}
    assert all(len(v["exaccerr"]) >= 1 for v in saved["exposure_bias"].values())
    assert (out / "exposure_bias.png").exists() and (out / "student" / "model.safetensors").exists()
    # A rerun of the same command shows the complete run.
    assert main([*TINY, "--out", str(out)])["exposure_bias"] == saved["exposure_bias"]


@pytest.mark.slow
def test_rollout_store_ppo_epochs_and_exact_resume(tmp_path, capsys):
    # --ppo-epochs 2 --num-rollouts 32 with micro-batches of 16: each store serves 2 epochs x 2 mini-batches, so the
    # 8 steps are two iterations that sample at steps 1 and 5 only. After an iteration's first update the student
    # is not q_old any more: the ratio leaves 1 and the clip acts on it, not on w alone. A run stopped inside an
    # iteration (after step 2) and resumed trains on the checkpointed store: the same losses as the straight run.
    flags = [
        *TINY,
        "--steps",
        "8",
        "--warmup-steps",
        "0",
        "--compare",
        "",
        "--no-seqkd",
        "--no-exposure",
        "--ppo-epochs",
        "2",
        "--num-rollouts",
        "32",
    ]  # fmt: skip (no warmup: step 1's lr is not 0)
    main([*flags, "--out", str(tmp_path / "straight")])
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["gen_s"] > 0] == [1, 5]
    assert all(0 < r["gen_tokens"] <= 32 * 6 for r in log if r["gen_s"] > 0)
    assert all(r["gen_tokens"] == 0 for r in log if r["gen_s"] == 0)
    fresh = [r["step"] in (1, 5) for r in log]  # the first update on a store: q_theta is still q_old
    assert all((abs(r["ratio"] - r["weight"]) < 1e-5) == first for r, first in zip(log, fresh))
    main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    main([*flags, "--out", str(tmp_path / "split")])
    split = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in log], abs=1e-6)
    assert [r["gen_tokens"] for r in split] == [r["gen_tokens"] for r in log]
    # --num-rollouts 40 is not whole micro-batches of 16: the store holds 32 and says so.
    main([*flags, "--num-rollouts", "40", "--out", str(tmp_path / "rounded")])
    assert "rollout store: 32 rollouts, not --num-rollouts 40: whole micro-batches of 16" in capsys.readouterr().err
    rounded = [json.loads(line) for line in (tmp_path / "rounded" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rounded] == pytest.approx([r["loss"] for r in log], abs=1e-6)
    # --num-rollouts 0 --ppo-epochs 1: no store; every step samples its own batch's prompts afresh and takes one
    # update on them, so the PPO ratio is the importance weight alone.
    main([*flags, "--num-rollouts", "0", "--ppo-epochs", "1", "--out", str(tmp_path / "fresh")])
    fresh = [json.loads(line) for line in (tmp_path / "fresh" / "log.jsonl").read_text().splitlines()]
    assert all(r["gen_s"] > 0 and abs(r["ratio"] - r["weight"]) < 1e-5 for r in fresh)

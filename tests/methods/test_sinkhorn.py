"""SinKD: the log-domain Sinkhorn against POT, closed forms, limits, gradients, and both run scripts."""

import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from core.errors import ConfigError
from methods.sinkhorn.classify import PairData, PairModels, SinKDClassifyConfig, make_data, polarity
from methods.sinkhorn.classify import main as classify_main
from methods.sinkhorn.loss import (
    batch_sinkhorn_cost,
    group_size_for,
    grouped_sinkhorn_cost,
    l1_cost_matrix,
    sinkhorn_log,
    sinkhorn_plain,
)
from methods.sinkhorn.run import SinKDConfig, main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "30", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3"]  # fmt: skip


def _clouds(n=7, m=6, d=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.softmax(torch.randn(n, d, generator=gen, dtype=dtype) * 2, -1)
    y = torch.softmax(torch.randn(m, d, generator=gen, dtype=dtype) * 2, -1)
    return x, y


@pytest.mark.parametrize("n, m, eps", [(7, 6, 0.1), (4, 4, 0.5), (12, 9, 0.05), (1, 5, 0.1)])
def test_converged_cost_matches_pot_sinkhorn2(n, m, eps):
    x, y = _clouds(n, m, seed=n + m)
    cost = l1_cost_matrix(x, y)
    gen = np.random.default_rng(n)
    a, b = gen.random(n) + 0.1, gen.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    ours = sinkhorn_log(cost, eps, 3000, torch.from_numpy(a), torch.from_numpy(b))[1].item()
    reference = float(ot.sinkhorn2(a, b, cost.numpy(), eps, numItermax=20000, stopThr=1e-13))
    assert abs(ours - reference) < 1e-5
    # uniform marginals (the batch-wise SinKD case)
    ours_uniform = sinkhorn_log(cost, eps, 3000)[1].item()
    ref_uniform = float(
        ot.sinkhorn2(np.full(n, 1 / n), np.full(m, 1 / m), cost.numpy(), eps, numItermax=20000, stopThr=1e-13)
    )
    assert abs(ours_uniform - ref_uniform) < 1e-5


@pytest.mark.parametrize("iterations", [1, 3, 20])
def test_same_iterates_as_pot_on_the_transposed_problem(iterations):
    # stopThr=0 never stops early, so POT runs exactly `iterations` rounds of v = b / K^T u, u = a / K v (columns
    # first). On the transposed problem (marginals swapped, cost C^T) its columns are our rows, so its rounds are
    # ours in the official row-first order: u = a / K v, v = b / K^T u. (Its start u = 1/m differs from our v = 1
    # by a constant, which the first scaling removes.)
    x, y = _clouds(9, 7, seed=iterations)
    cost = l1_cost_matrix(x, y)
    plan, value = sinkhorn_log(cost, 0.1, iterations)
    ref_plan = ot.sinkhorn(np.full(7, 1 / 7), np.full(9, 1 / 9), cost.numpy().T, 0.1, numItermax=iterations,
                           stopThr=0.0).T  # fmt: skip
    assert np.abs(plan.numpy() - ref_plan).max() < 1e-12
    assert abs(value.item() - float((ref_plan * cost.numpy()).sum())) < 1e-12
    # the official order leaves the columns exact after every iteration (the rows only at convergence)
    np.testing.assert_allclose(plan.sum(0).numpy(), np.full(7, 1 / 7), rtol=1e-12)


def _official_row_first(student_logits, teacher_logits, temperature=2.0, epsilon=0.1, n_iters=20):
    """The official SinKD Sinkhorn re-derived from its equations (loss.py, `Sinkhorn`): p = softmax(z / T) per row,
    W = L1 distances between the rows, K = exp(-W / eps), then n_iters times: divide every row of K by its sum,
    then every column by its sum; the value is sum(P * W). Plain kernel, no log domain (fine at eps = 0.1)."""
    s = torch.softmax(student_logits / temperature, dim=1)
    t = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    w = (s[:, None, :] - t[None, :, :]).abs().sum(-1)
    plan = torch.exp(-w / epsilon)
    for _ in range(n_iters):
        plan = plan / plan.sum(dim=1, keepdim=True)  # rows first
        plan = plan / plan.sum(dim=0, keepdim=True)  # then columns
    return (plan * w).sum()


@pytest.mark.parametrize("n, vocab, scale", [(64, 10, 3.0), (64, 2, 5.0), (8, 5, 1.0)])
def test_matches_the_official_row_first_iteration_after_20_iterations(n, vocab, scale):
    # Not only at convergence: after the official 20 iterations, value and gradient equal the official ones to
    # float64 precision. The column-first (POT) order differs here by up to 0.03% in value and 5% in gradient
    # (n = 64, V = 10, logits x 3; README), far outside these tolerances.
    gen = torch.Generator().manual_seed(n + vocab)
    student = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    ours = batch_sinkhorn_cost(student, teacher, temperature=2.0, epsilon=0.1, n_iters=20)
    official = _official_row_first(student, teacher)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_official,) = torch.autograd.grad(official, student)
    assert ours.item() == pytest.approx(official.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-9, atol=1e-12)


def test_float32_cost_matches_pot_within_1e_5():
    x, y = _clouds(16, 16, d=10, seed=3, dtype=torch.float32)
    cost = l1_cost_matrix(x, y)
    ours = sinkhorn_log(cost, 0.1, 500)[1].item()
    reference = float(ot.sinkhorn2(np.full(16, 1 / 16), np.full(16, 1 / 16), cost.double().numpy(), 0.1,
                                   numItermax=20000, stopThr=1e-13))  # fmt: skip
    assert abs(ours - reference) < 1e-5


def test_two_by_two_by_hand():
    # a = b = (1/2, 1/2), C = [[0, c], [c, 0]]. By symmetry P = [[p, q], [q, p]] with p + q = 1/2, and
    # P = diag(u) K diag(v) with u1 = u2, v1 = v2 gives q / p = K_12 / K_11 = exp(-c / eps) =: k.
    # So q = k / (2 (1 + k)) and <P, C> = 2 q c = c k / (1 + k). With c = 1, eps = 1: 1 / (1 + e) = 0.2689414.
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    plan, value = sinkhorn_log(cost, 1.0, 5)
    assert value.item() == pytest.approx(1 / (1 + math.e), rel=1e-12)
    k = math.exp(-1.0)
    assert plan[0, 1].item() == pytest.approx(k / (2 * (1 + k)), rel=1e-12)
    # eps -> 0: the plan puts everything on the zero-cost diagonal
    assert sinkhorn_log(cost * 1.0, 1e-3, 5)[1].item() < 1e-300 + 1e-12


def test_zero_cost_for_identical_batches():
    # all rows the same: every cost is 0, so the transport cost is exactly 0 at any eps
    row = torch.softmax(torch.randn(1, 8, dtype=torch.float64), -1).expand(5, 8)
    assert batch_sinkhorn_cost(row.log(), row.log(), temperature=1.0).item() == 0.0
    # distinct rows, the same batch on both sides: only the entropic blur is left, and it vanishes as eps -> 0
    logits = torch.randn(6, 8, dtype=torch.float64) * 3
    small = batch_sinkhorn_cost(logits, logits, temperature=1.0, epsilon=1e-3, n_iters=50).item()
    assert abs(small) < 1e-9
    assert batch_sinkhorn_cost(logits, logits, temperature=1.0, epsilon=0.1).item() > small  # blur at eps 0.1


def test_log_domain_gradient_is_finite_with_tiny_regularization():
    x, y = _clouds(8, 8, seed=5)
    student_logits = (torch.randn(8, 5, dtype=torch.float64) * 3).requires_grad_(True)
    value = batch_sinkhorn_cost(student_logits, y.log(), temperature=1.0, epsilon=1e-4, n_iters=50)
    (grad,) = torch.autograd.grad(value, student_logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the kernel version underflows (exp(-C / eps) = 0) and divides 0 by 0
    cost = l1_cost_matrix(x, y)
    assert not torch.isfinite(sinkhorn_plain(cost, 1e-4, 50)[1])
    assert torch.isfinite(sinkhorn_log(cost, 1e-4, 50)[1])


def test_official_scale_is_n_times_the_uniform_cost_and_matches_row_column_normalization():
    # Official loss.py: K = exp(-C / eps), then rows and columns normalized to sum 1 (mass n), value sum(P * C).
    torch.manual_seed(0)
    student, teacher = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    s, t = torch.softmax(student / 2, -1), torch.softmax(teacher / 2, -1)
    cost = torch.cdist(s, t, p=1)
    plan = torch.exp(-cost / 0.1)
    for _ in range(2000):  # to convergence, where the update order no longer matters
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    official = (plan * cost).sum().item()
    ours = batch_sinkhorn_cost(student, teacher, temperature=2.0, epsilon=0.1, n_iters=2000).item()
    assert ours == pytest.approx(official, abs=1e-9)
    uniform = float(
        ot.sinkhorn2(np.full(10, 0.1), np.full(10, 0.1), cost.numpy(), 0.1, numItermax=20000, stopThr=1e-13)
    )
    assert ours == pytest.approx(10 * uniform, abs=1e-5)


def test_gradient_reaches_the_student_only():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    batch_sinkhorn_cost(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_grouping_and_group_size():
    torch.manual_seed(1)
    s, t = torch.randn(10, 7), torch.randn(10, 7)
    assert grouped_sinkhorn_cost(s, t, 64).item() == pytest.approx(batch_sinkhorn_cost(s, t).item())
    halves = (batch_sinkhorn_cost(s[:5], t[:5]) + batch_sinkhorn_cost(s[5:], t[5:])) / 2
    assert grouped_sinkhorn_cost(s, t, 5).item() == pytest.approx(halves.item())
    assert group_size_for(512, 256) == 256 and group_size_for(8000, 256) == 64 and group_size_for(10**9, 256) == 2


@pytest.mark.parametrize(
    "bad, match",
    [({"alpha": 1.5}, "--alpha"), ({"temperature": 0.0}, "--temperature"), ({"epsilon": 0.0}, "--epsilon"),
     ({"n_iters": 0}, "--n-iters"), ({"sinkhorn_weight": -1.0}, "--sinkhorn-weight"),
     ({"sinkhorn_temperature": -2.0}, "--sinkhorn-temperature"), ({"sinkhorn_group": 1}, "--sinkhorn-group"),
     ({"compare": "fkl,kl"}, "unknown divergences")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        SinKDConfig(**bad)


@pytest.mark.parametrize(
    "cls, bad, match",
    [(PairData, {"label_noise": 0.5}, "--label-noise"), (PairData, {"train_size": 2}, "--train-size"),
     (PairModels, {"student_dim": 7}, "--student-dim"), (SinKDClassifyConfig, {"epsilon": -1.0}, "--epsilon")],
)  # fmt: skip
def test_bad_classification_settings(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls(**bad)


def test_generated_classification_data():
    # "p0 not n1 u2": +1 (p0), then "not" flips n1 (-1 -> +1): polarity 2 -> positive
    from methods.sinkhorn.classify import WORDS

    ids = [WORDS.index(w) for w in ("p0", "not", "n1", "u2")]
    assert polarity(ids) == 2
    assert polarity([WORDS.index(w) for w in ("not", "p3", "n0")]) == -2
    train, evals = make_data(PairData(train_size=300, eval_size=100, label_noise=0.0))
    assert {tuple(e["input_ids"]) for e in evals}.isdisjoint(tuple(t["input_ids"]) for t in train)
    assert all(e["label"] == int(polarity(e["input_ids"]) > 0) for e in evals + train)
    noisy, _ = make_data(PairData(train_size=2000, eval_size=100, label_noise=0.2))
    flipped = sum(t["label"] != int(polarity(t["input_ids"]) > 0) for t in noisy) / len(noisy)
    assert 0.15 < flipped < 0.25


@pytest.mark.slow
def test_end_to_end_lm_run(tmp_path):
    metrics = main([*TINY, "--out", str(tmp_path / "run")])
    assert set(metrics["eval"]) == {"student", "teacher", "sft_student", "kd_fkl_student"}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and all(r["sinkhorn"] > 0 for r in log)
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    assert (tmp_path / "run" / "sinkhorn_terms.png").stat().st_size > 1000


@pytest.mark.slow
def test_end_to_end_classification_run(tmp_path):
    args = ["--train-size", "400", "--eval-size", "64", "--teacher-steps", "30", "--steps", "30", "--batch-size", "16",
            "--warmup-steps", "3", "--compare", "fkl", "--out", str(tmp_path / "cls")]  # fmt: skip
    metrics = classify_main(args)
    assert set(metrics["eval"]) == {"teacher", "sft_student", "kd_fkl_student", "student"}
    assert all(0 <= v["accuracy"] <= 100 for v in metrics["eval"].values())
    log = [json.loads(line) for line in (tmp_path / "cls" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and "sinkhorn" in log[0]
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert json.loads((tmp_path / "cls" / "metrics.json").read_text())["task"] == "pairs"


class _FixedLM(torch.nn.Module):
    """A stand-in causal LM whose logits are a trainable tensor (B, T, V), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits.clone())
        self.config = type("Config", (), {"vocab_size": logits.shape[-1]})()

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table})()


def test_lm_objective_is_eq_4_in_sum_form():
    # Eq. (4) as the loop sees it: sum over the N valid positions of alpha * KL + (1 - alpha) * CE, plus N * w * S,
    # so that dividing by N gives the mean loss + w * S (S = the official-scale Sinkhorn cost of the positions).
    from types import SimpleNamespace

    from core.losses import cross_entropy_sum, forward_kl
    from methods.sinkhorn.run import make_loss

    torch.manual_seed(0)
    student, teacher = _FixedLM(torch.randn(2, 5, 9)), _FixedLM(torch.randn(2, 5, 9))
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5), "labels": labels}
    from core.kdpath import KDPath, KDPathConfig

    kd = KDPath(KDPathConfig(), teacher, Path("."), "test", 0)  # the plain path: the live teacher's logits
    ctx = SimpleNamespace(teacher=teacher, student=student, kd=kd, features=[])
    cfg = SinKDConfig(alpha=0.7, temperature=2.0, sinkhorn_weight=0.3)
    out = make_loss(ctx, cfg).loss_fn(student, batch)
    s_logits, t_logits, shifted = student.table[:, :-1], teacher.table[:, :-1], labels[:, 1:]
    valid = shifted != -100  # 5 valid positions
    kd = forward_kl(s_logits[valid], t_logits[valid], 2.0).sum()
    ce = cross_entropy_sum(s_logits, shifted)
    sink = batch_sinkhorn_cost(s_logits[valid], t_logits[valid], 2.0, 0.1, 20)
    expected = 0.7 * kd + 0.3 * ce + 5 * 0.3 * sink
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.logs["sinkhorn"] == pytest.approx(sink.item(), rel=1e-6)

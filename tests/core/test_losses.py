"""Divergences against values worked out by hand, their limits, and chunked == plain."""

import math

import pytest
import torch

from core.fused import divergence_sum
from core.losses import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    get_divergence,
    masked_mean,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

# Teacher p = (1/2, 1/2), student q = (3/4, 1/4), given as logits log p and log q.
P = torch.tensor([0.5, 0.5], dtype=torch.float64)
Q = torch.tensor([0.75, 0.25], dtype=torch.float64)
T_LOGITS, S_LOGITS = P.log(), Q.log()
ln = math.log


def test_forward_kl_by_hand():
    # KL(p||q) = 1/2 ln(0.5/0.75) + 1/2 ln(0.5/0.25) = 1/2 ln(2/3 * 2) = 1/2 ln(4/3)
    assert forward_kl(S_LOGITS, T_LOGITS).item() == pytest.approx(0.5 * ln(4 / 3), rel=1e-6)


def test_reverse_kl_by_hand():
    # KL(q||p) = 3/4 ln(0.75/0.5) + 1/4 ln(0.25/0.5) = 3/4 ln 1.5 - 1/4 ln 2
    assert reverse_kl(S_LOGITS, T_LOGITS).item() == pytest.approx(0.75 * ln(1.5) - 0.25 * ln(2), rel=1e-6)


def test_total_variation_by_hand():
    # 1/2 (|0.5 - 0.75| + |0.5 - 0.25|) = 1/4
    assert total_variation(S_LOGITS, T_LOGITS).item() == pytest.approx(0.25, rel=1e-6)


def test_jsd_half_by_hand():
    # m = (p + q) / 2 = (0.625, 0.375)
    # KL(p||m) = 1/2 ln(0.5/0.625) + 1/2 ln(0.5/0.375) = 1/2 ln(0.8 * 4/3) = 1/2 ln(16/15)
    # KL(q||m) = 3/4 ln(0.75/0.625) + 1/4 ln(0.25/0.375) = 3/4 ln 1.2 + 1/4 ln(2/3)
    expected = 0.5 * (0.5 * ln(16 / 15)) + 0.5 * (0.75 * ln(1.2) + 0.25 * ln(2 / 3))
    assert generalized_jsd(S_LOGITS, T_LOGITS, beta=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_skew_kl_by_hand():
    # m = 0.1 p + 0.9 q = (0.725, 0.275); KL(p||m) = 1/2 ln(0.5/0.725) + 1/2 ln(0.5/0.275)
    expected = 0.5 * ln(0.5 / 0.725) + 0.5 * ln(0.5 / 0.275)
    assert skew_kl(S_LOGITS, T_LOGITS, alpha=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_skew_reverse_kl_by_hand():
    # m = 0.9 p + 0.1 q = (0.525, 0.475); KL(q||m) = 3/4 ln(0.75/0.525) + 1/4 ln(0.25/0.475)
    expected = 0.75 * ln(0.75 / 0.525) + 0.25 * ln(0.25 / 0.475)
    assert skew_reverse_kl(S_LOGITS, T_LOGITS, alpha=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_three_token_forward_kl_by_hand():
    # p = (0.7, 0.2, 0.1), q = (0.2, 0.3, 0.5): KL = 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2
    p, q = torch.tensor([0.7, 0.2, 0.1]).double(), torch.tensor([0.2, 0.3, 0.5]).double()
    expected = 0.7 * ln(3.5) + 0.2 * ln(2 / 3) + 0.1 * ln(0.2)
    assert forward_kl(q.log(), p.log()).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_zero_for_identical_inputs(name):
    logits = torch.randn(4, 5, 11, dtype=torch.float64)
    assert torch.allclose(
        get_divergence(name)(logits, logits.clone()), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12
    )


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_non_negative(name):
    torch.manual_seed(0)
    s, t = torch.randn(64, 17, dtype=torch.float64), torch.randn(64, 17, dtype=torch.float64)
    assert (get_divergence(name)(s, t) >= -1e-12).all()


def test_parameterized_limits():
    torch.manual_seed(1)
    s, t = torch.randn(8, 13, dtype=torch.float64), torch.randn(8, 13, dtype=torch.float64)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    assert torch.allclose(generalized_jsd(s, t, beta=0.0), fkl)
    assert torch.allclose(generalized_jsd(s, t, beta=1.0), rkl)
    # d/dbeta JSD_beta at 0 is KL(p||q), and at 1 it is -KL(q||p): the special cases are the continuous limits
    # of JSD_beta / beta and JSD_beta / (1 - beta).
    eps = 1e-5
    assert torch.allclose(generalized_jsd(s, t, beta=eps) / eps, fkl, rtol=1e-3)
    assert torch.allclose(generalized_jsd(s, t, beta=1 - eps) / eps, rkl, rtol=1e-3)
    assert torch.allclose(skew_kl(s, t, alpha=0.0), fkl)
    assert torch.allclose(skew_reverse_kl(s, t, alpha=0.0), rkl)
    # Skewing toward the target's own distribution shrinks the divergence toward 0.
    assert (skew_kl(s, t, alpha=0.99) < 0.01 * fkl + 1e-9).all()
    assert (skew_reverse_kl(s, t, alpha=0.99) < 0.01 * rkl + 1e-9).all()


def test_jsd_symmetric_at_half():
    torch.manual_seed(2)
    s, t = torch.randn(8, 13, dtype=torch.float64), torch.randn(8, 13, dtype=torch.float64)
    assert torch.allclose(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5))


def test_skew_kl_finite_where_kl_is_not():
    # The student puts zero mass on a token the teacher likes: KL(p||q) is infinite, the skewed one is not.
    student = torch.tensor([0.0, -float("inf")], dtype=torch.float64)
    teacher = torch.tensor([0.0, 0.0], dtype=torch.float64)
    assert torch.isinf(forward_kl(student, teacher))
    # m = 0.1 p + 0.9 q = (0.95, 0.05): KL(p||m) = 1/2 ln(0.5/0.95) + 1/2 ln(0.5/0.05)
    assert skew_kl(student, teacher, alpha=0.1).item() == pytest.approx(0.5 * ln(0.5 / 0.95) + 0.5 * ln(10), rel=1e-6)


def test_temperature_divides_both_logits():
    torch.manual_seed(3)
    s, t = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    for name in DIVERGENCES:
        assert torch.allclose(get_divergence(name, temperature=2.0)(s, t), get_divergence(name)(s / 2, t / 2))


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_equals_plain_value_and_gradient(name, chunk):
    torch.manual_seed(4)
    student = torch.randn(3, 5, 19, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 19, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    fn = get_divergence(name, temperature=1.5)
    plain = divergence_sum(fn, student, teacher, mask)
    (g_plain,) = torch.autograd.grad(plain, student)
    chunked = divergence_sum(fn, student, teacher, mask, chunk_size=chunk)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    assert torch.allclose(plain, chunked, atol=1e-12)
    assert torch.allclose(g_plain, g_chunked, atol=1e-12)
    # and the plain sum equals a direct masked sum, so masking is right
    assert torch.allclose(plain, (fn(student, teacher) * mask).sum())


def test_masked_positions_get_no_gradient():
    student = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    divergence_sum(get_divergence("fkl"), student, teacher, mask).backward()
    assert (student.grad[~mask] == 0).all() and (student.grad[mask].abs().sum(-1) > 0).all()


def test_all_masked_mean_is_zero():
    values = torch.randn(3, 4)
    assert masked_mean(values, torch.zeros(3, 4, dtype=torch.bool)).item() == 0.0


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(S_LOGITS, T_LOGITS, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_kl(S_LOGITS, T_LOGITS, alpha=1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence("kl2")
    with pytest.raises(ValueError, match="temperature"):
        get_divergence("fkl", temperature=0)

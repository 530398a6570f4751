"""PHI-S: the normalizations against numpy references, PHI-S's defining properties, the low-rank failure mode of
whitening, the multi-teacher loss and error by hand, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from methods.phis.data import poly_features
from methods.phis.loss import multi_teacher_loss, normalized_errors
from methods.phis.run import main
from methods.phis.transforms import (
    NORMALIZATIONS,
    balancing_rotation,
    fit,
    phi_rotation,
    sylvester_hadamard,
)


def _anisotropic(n=400, d=8, seed=0):
    """Correlated data with variances spread over four orders of magnitude and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mix, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a random rotation: correlated, yet well conditioned
    scales = np.logspace(-1, 1, d)  # standard deviations 0.1 .. 10 along the principal axes
    x = rng.standard_normal((n, d)) * scales @ mix + rng.standard_normal(d) * 5
    return x, torch.from_numpy(x)


def _cov(a):
    return np.cov(np.asarray(a), rowvar=False)


# -- Hadamard ------------------------------------------------------------------------------------------------------


def test_sylvester_hadamard_by_hand_and_orthonormal():
    # H_2 = [[1, 1], [1, -1]] / sqrt(2); H_4 = [[H_2, H_2], [H_2, -H_2]] (Sylvester).
    h2 = np.array([[1, 1], [1, -1]]) / np.sqrt(2)
    assert np.allclose(sylvester_hadamard(2).numpy(), h2)
    h4 = np.block([[h2, h2], [h2, -h2]]) / np.sqrt(2)
    assert np.allclose(sylvester_hadamard(4).numpy(), h4)
    for d in (1, 8, 64):
        h = sylvester_hadamard(d).numpy()
        assert np.allclose(h @ h.T, np.eye(d))
        assert np.allclose(np.abs(h), 1 / np.sqrt(d))  # every entry +-1/sqrt(d): what balances the variances
    with pytest.raises(ValueError):
        sylvester_hadamard(12)


@pytest.mark.parametrize("d", [3, 7, 12, 33])
def test_balancing_rotation_equalizes_the_diagonal_for_any_dimension(d):
    lam = torch.from_numpy(np.random.default_rng(d).gamma(0.3, size=d) * 100)
    r = balancing_rotation(lam).numpy()
    assert np.allclose(r @ r.T, np.eye(d), atol=1e-10)
    rotated = r @ np.diag(lam.numpy()) @ r.T
    assert np.allclose(np.diag(rotated), lam.mean().item(), rtol=1e-9)
    # phi_rotation picks Sylvester for powers of two, the balancing rotation otherwise
    assert torch.equal(phi_rotation(torch.ones(8)), sylvester_hadamard(8))


def test_balancing_rotation_of_two_values_by_hand():
    # diag(3, 1): the mean is 2; a 45-degree rotation gives [[2, +-1], [+-1, 2]]: diagonal (2, 2).
    r = balancing_rotation(torch.tensor([3.0, 1.0], dtype=torch.float64)).numpy()
    assert np.allclose(np.abs(r), np.sqrt(0.5))
    assert np.allclose(np.diag(r @ np.diag([3.0, 1.0]) @ r.T), [2.0, 2.0])


# -- PHI-S ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [8, 12])
def test_phi_s_output_is_zero_mean_equal_variance_and_isotropic_up_to_rotation(d):
    x_np, x = _anisotropic(d=d)
    norm = fit("phi-s", x)
    y = norm.normalize(x).numpy()
    assert np.allclose(y.mean(0), 0, atol=1e-10)
    cov_y = _cov(y)
    assert np.allclose(np.diag(cov_y), 1.0, atol=1e-9)  # every dimension the same variance, 1
    # Only a rotation and one scalar: the spectrum of cov(y) is that of cov(x) divided by mean(lam) = a^2.
    lam = np.linalg.eigvalsh(_cov(x_np))
    assert np.allclose(np.sort(np.linalg.eigvalsh(cov_y)), np.sort(lam) / lam.mean(), rtol=1e-8)
    # W W^T = I / a^2: an isotropic map (no direction amplified relative to another)
    w = norm.forward_matrix.numpy()
    assert np.allclose(w @ w.T, np.eye(d) / lam.mean(), rtol=1e-8)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-10)


# -- the baselines against numpy -----------------------------------------------------------------------------------


def test_each_baseline_against_numpy():
    x_np, x = _anisotropic(d=6, seed=3)
    mu, sd = x_np.mean(0), x_np.std(0, ddof=1)
    lam, u = np.linalg.eigh(_cov(x_np))
    refs = {
        "none": x_np,
        "global": (x_np - x_np.mean()) / x_np.std(ddof=1),
        "standard": (x_np - mu) / sd,
        "zca": (x_np - mu) @ (u @ np.diag(lam**-0.5) @ u.T).T,  # unique (no sign ambiguity)
    }
    for name, ref in refs.items():
        out = fit(name, x).normalize(x).numpy()
        assert np.allclose(out, ref, atol=1e-9), name
    # PCA and Hadamard whitening: eigenvectors are defined up to sign, so compare the invariants.
    pca = fit("pca-w", x).normalize(x).numpy()
    ref_pca = (x_np - mu) @ u @ np.diag(lam**-0.5)
    assert np.allclose(np.abs(pca), np.abs(ref_pca), atol=1e-9)
    for name in ("pca-w", "zca", "hca"):
        y = fit(name, x).normalize(x).numpy()
        assert np.allclose(_cov(y), np.eye(6), atol=1e-9), name  # whitened: identity covariance
    for name in NORMALIZATIONS:
        norm = fit(name, x)
        assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-9), name


def test_low_rank_teacher_whitening_stays_finite_and_counts_clamped_directions():
    # A rank-2 teacher in 5 dimensions (3 exact zero eigenvalues): plain whitening divides by zero.
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((200, 2)) @ rng.standard_normal((2, 5)) * 10)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.clip(np.linalg.eigvalsh(_cov(x.numpy())), 0, None)
        assert not np.all(np.isfinite(lam**-0.5))  # the failure mode we guard against
    for name in ("pca-w", "zca", "hca", "standard"):
        norm = fit(name, x)
        y = norm.normalize(x)
        assert torch.isfinite(y).all() and torch.isfinite(norm.inverse_matrix).all(), name
        assert torch.allclose(norm.denormalize(y), x, atol=1e-6), name
    assert fit("zca", x).clamped == 3
    phis = fit("phi-s", x)  # never divides by one eigenvalue: nothing to clamp
    assert phis.clamped == 0 and torch.isfinite(phis.normalize(x)).all()
    with pytest.raises(DataError):
        fit("phi-s", torch.ones(10, 3, dtype=torch.float64))


# -- loss and metrics ----------------------------------------------------------------------------------------------


def test_multi_teacher_loss_and_normalized_error_by_hand():
    # teacher a (D=2): prediction (1, 1), target (0, 3): squared errors 1 and 4, mean 2.5.
    # teacher b (D=1): prediction 2, target 0: 4. Per-example loss 2.5 + 4 = 6.5.
    loss, parts = multi_teacher_loss(
        {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[2.0]])},
        {"a": torch.tensor([[0.0, 3.0]]), "b": torch.tensor([[0.0]])},
    )
    assert torch.allclose(loss, torch.tensor([6.5])) and torch.allclose(parts["a"], torch.tensor([2.5]))
    # e_t with the identity normalizer: features (0, 2) about train mean 1: total 1 + 1 = 2;
    # predictions (1, 1): errors 1 + 1 = 2 -> e = 1 (as good as predicting the mean).
    norm = fit("none", torch.tensor([[0.0], [2.0]], dtype=torch.float64))
    feats = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    e = normalized_errors({"t": torch.ones(2, 1)}, {"t": feats}, {"t": norm}, {"t": torch.tensor([1.0])})
    assert e["t"] == pytest.approx(1.0)
    # a perfect prediction through a non-trivial normalizer: 0
    std = fit("standard", feats)
    assert normalized_errors({"t": std.normalize(feats)}, {"t": feats}, {"t": std}, {"t": feats.mean(0)})["t"] < 1e-12


def test_poly_features_by_hand():
    x = torch.zeros(1, 64)
    x[0, :2] = 1.0  # two top-left pixels at intensity 16: the first 2 x 2 pooled cell averages 8
    f = poly_features(x)
    assert f.shape == (1, 152)
    assert f[0, 0] == 8.0 and f[0, 16] == 64.0 and f.abs().sum() == 72.0  # x_0 and x_0 * x_0


def test_bad_flags_raise_config_errors():
    for argv in (["--normalization", "bogus"], ["--compare", "zca,foo"], ["--teachers", "mlp,mlp"], ["--eps", "2"]):
        with pytest.raises(ConfigError):
            main(argv)


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    argv = ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "30",
            "--batch-size", "32", "--warmup-steps", "2", "--compare", "none,zca", "--teacher-steps", "20",
            "--width", "32", "--device", "cpu"]  # fmt: skip
    metrics = main(argv)
    assert set(metrics["eval"]) == {"student", "none_student", "zca_student"}
    for values in metrics["eval"].values():
        assert all(np.isfinite(v) for v in values.values())
        assert 0 <= values["probe_acc"] <= 1
    assert metrics["family"] == "vision" and metrics["task"] == "digits"
    assert metrics["train"]["last_loss"] < metrics["train"]["first_loss"]
    assert (tmp_path / "run" / "per_teacher_error.png").stat().st_size > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "zca" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "phis"


def test_report_mean_and_std_over_seeds(tmp_path):
    from methods.phis.report import main as report

    for seed, value in ((0, 0.1), (1, 0.3)):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "metrics.json").write_text(json.dumps({"eval": {"student": {"nerr/a": value}}}))
    # mean 0.2; sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    table = report([str(tmp_path / "s0"), str(tmp_path / "s1"), "--png", str(tmp_path / "x.png")])
    assert "| student | 0.200 ± 0.141 |" in table and (tmp_path / "x.png").is_file()
    with pytest.raises(DataError):
        report([str(tmp_path / "missing")])

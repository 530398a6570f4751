"""Scaling laws: the functional forms on hand values, recovery of known coefficients by the robust fit, the
compute-optimal helper."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from methods.scaling_laws.law import (
    PAPER_SUPERVISED,
    DistillationLaw,
    SupervisedLaw,
    compute_optimal,
    distillation_flops,
    distillation_loss,
    fit_distillation,
    fit_supervised,
    supervised_loss,
)

SUP = SupervisedLaw(E=1.5, A=40.0, alpha=0.35, B=200.0, beta=0.4, gamma=0.8)


def _dist(**kw) -> DistillationLaw:
    base = dict(sup=SUP, c0=0.5, c1=0.6, d1=1.2, f1=0.8, A=40.0, alpha=0.35, B=200.0, beta=0.4, gamma=0.8)
    return DistillationLaw(**{**base, **kw})


def test_supervised_hand_value():
    # E=1, A=16, alpha=0.5, B=8, beta=1/3, gamma=0.5 at N=64, D=512: 16/8 + 8/8 = 3, sqrt(3) -> 1 + 1.7320508
    law = SupervisedLaw(E=1.0, A=16.0, alpha=0.5, B=8.0, beta=1 / 3, gamma=0.5)
    assert supervised_loss(64, 512, law) == pytest.approx(1 + np.sqrt(3))
    # infinite model and data: the irreducible loss E
    assert supervised_loss(1e200, 1e200, law) == pytest.approx(1.0)


def test_paper_supervised_coefficients_are_plausible():
    # with the paper's C4 fit a 1B model on 20B tokens sits a little above 2 nats (order-of-magnitude check only)
    assert 1.8 < float(supervised_loss(1e9, 2e10, PAPER_SUPERVISED)) < 2.6


def test_distillation_hand_value():
    # L_T = 2, c0 = 1, c1 = 1, d1 = 1, f1 = 1, student term (A'/N + B'/D)^1 with A'=B'=N=D=1 -> 2
    # Ltilde = E + (1 + 1)^1 with E = 2 -> 4; ratio L_T/(d1 Ltilde) = 1/2; (1 + 1/2)^(-1) = 2/3
    # L_S = 2 + 2^(-1) * 2/3 * 2 = 2 + 2/3
    sup = SupervisedLaw(E=2.0, A=1.0, alpha=1.0, B=1.0, beta=1.0, gamma=1.0)
    law = DistillationLaw(sup=sup, c0=1.0, c1=1.0, d1=1.0, f1=1.0, A=1.0, alpha=1.0, B=1.0, beta=1.0, gamma=1.0)
    assert distillation_loss(2.0, 1.0, 1.0, law) == pytest.approx(2 + 2 / 3)


def test_student_never_beats_teacher_by_form():
    rng = np.random.default_rng(0)
    for _ in range(200):
        law = _dist(c0=rng.uniform(-2, 2), c1=rng.uniform(-2, 2), d1=rng.uniform(0.1, 3), f1=rng.uniform(0.1, 3))
        L_T = rng.uniform(0.5, 5, 10)
        assert np.all(distillation_loss(L_T, 1e4, 1e6, law) > L_T)


def test_capacity_gap_regimes():
    # c1 > 0: once the teacher is much stronger than the student can be (L_T << d1 Ltilde), the transition factor
    # grows like (L_T / (d1 Ltilde))^(-c1): the excess over L_T grows as the teacher improves
    law = _dist(c0=0.0, c1=1.0)
    L_tilde = float(supervised_loss(1e3, 1e5, SUP))
    strong, weaker = 0.05 * L_tilde, 0.1 * L_tilde
    excess = lambda lt: distillation_loss(lt, 1e3, 1e5, law) - lt  # noqa: E731
    assert excess(strong) > excess(weaker)


def test_analytic_gradient_matches_autograd():
    import torch

    from methods.scaling_laws.law import _huber_objective, _log_sup, _sup_objective_and_grad

    rng = np.random.default_rng(4)
    logN, logD = np.log(rng.uniform(1e3, 1e6, 12)), np.log(rng.uniform(1e5, 1e8, 12))
    logL = np.log(rng.uniform(1.6, 3.0, 12))
    theta = np.array([0.3, 3.0, 0.4, 5.0, 0.3, 0.9])
    value, grad = _sup_objective_and_grad(theta, logN, logD, logL, 0.05)
    t = torch.tensor(theta, requires_grad=True)
    ref = _huber_objective(_log_sup(t, torch.tensor(logN), torch.tensor(logD)), torch.tensor(logL), 0.05)
    ref.backward()
    assert value == pytest.approx(float(ref.detach()))
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-8)


def test_fit_recovers_supervised_coefficients():
    rng = np.random.default_rng(0)
    N = np.repeat(np.geomspace(1e3, 1e6, 5), 5)
    D = np.tile(np.geomspace(1e5, 1e8, 5), 5)
    L = SUP(N, D) * np.exp(rng.normal(0, 0.003, N.shape))  # 0.3% multiplicative noise
    # four starts, two of them far from the truth (the default grid has 16; four keep the test fast)
    starts = [np.array(x) for x in ([0.0, 0.0, 0.25, 3.0, 0.25, 0.7], [0.3, 6.0, 0.6, 3.0, 0.6, 0.7])]
    fit = fit_supervised(N, D, L, n_bootstrap=2, inits=starts)
    assert fit.law.E == pytest.approx(SUP.E, rel=0.05)
    assert fit.law.alpha == pytest.approx(SUP.alpha, abs=0.05)
    assert fit.law.beta == pytest.approx(SUP.beta, abs=0.05)
    # the fitted law predicts the noiseless loss within the noise level
    np.testing.assert_allclose(fit.law(N, D), SUP(N, D), rtol=0.01)
    lo, hi = fit.interval("E")
    assert lo <= hi


def test_fit_with_known_E_keeps_it():
    N = np.repeat(np.geomspace(1e3, 1e6, 4), 4)
    D = np.tile(np.geomspace(1e5, 1e8, 4), 4)
    fit = fit_supervised(N, D, SUP(N, D), fixed_E=1.5, inits=[np.array([0.0, 3.5, 0.3, 5.0, 0.35, 0.7])])
    assert fit.law.E == pytest.approx(1.5, rel=1e-12)
    np.testing.assert_allclose(fit.law(N, D), SUP(N, D), rtol=1e-3)
    with pytest.raises(ConfigError, match="fixed E"):
        fit_supervised(N, D, SUP(N, D), fixed_E=5.0)


def test_fit_recovers_distillation_coefficients():
    rng = np.random.default_rng(1)
    true = _dist()
    L_T = np.tile([1.6, 1.8, 2.1, 2.6], 9)
    N_S = np.repeat(np.geomspace(1e3, 1e5, 3), 12)
    D_S = np.tile(np.repeat(np.geomspace(1e5, 1e7, 3), 4), 3)
    L_S = true(L_T, N_S, D_S) * np.exp(rng.normal(0, 0.002, L_T.shape))
    starts = [np.array([0.0, 0.0, 0.0, 0.0, np.log(40.0), np.log(200.0)]), np.array([1.0, 1.0, 0.0, -1.0, 5.0, 5.0])]
    fit = fit_distillation(SUP, L_T, N_S, D_S, L_S, inits=starts)
    # individual coefficients of a broken power law trade off against each other; the prediction must not
    np.testing.assert_allclose(fit.law(L_T, N_S, D_S), true(L_T, N_S, D_S), rtol=0.01)
    assert fit.law.c0 == pytest.approx(true.c0, abs=0.3)


def test_compute_optimal_prefers_distillation_with_free_teacher_at_small_compute():
    # an existing, much better teacher, a small budget: distillation wins; the helper says so
    rng = np.random.default_rng(2)
    N = np.repeat(np.geomspace(1e3, 1e6, 4), 4)
    D = np.tile(np.geomspace(1e5, 1e8, 4), 4)
    sup_fit = fit_supervised(N, D, SUP(N, D), n_bootstrap=2, inits=[np.array([0.4, 3.7, 0.35, 5.3, 0.4, 0.8])])
    dist_law = _dist(sup=sup_fit.law, c0=0.0, c1=0.0, A=4.0, B=20.0)  # distillation cuts the reducible term
    L_T = np.repeat([1.7, 2.0], 4)
    dist_fit = fit_distillation(
        sup_fit.law,
        L_T,
        np.tile([1e3, 1e4], 4),
        np.repeat([1e5, 1e6, 1e5, 1e6], 2),
        dist_law(L_T, np.tile([1e3, 1e4], 4), np.repeat([1e5, 1e6, 1e5, 1e6], 2)),
        n_bootstrap=2,
    )
    rec = compute_optimal(6 * 1e4 * 1e6, 1e4, sup_fit, dist_fit, [(1e6, 1e9)], train_teacher=False)
    assert rec.choice == "distill" and rec.distill_loss < rec.supervised_loss
    assert rec.agreement is not None and rec.loss_interval[0] <= rec.loss_interval[1]
    assert rng is not None


def test_flops():
    assert distillation_flops(10, 100, 1000) == 6 * 10 * 100 + 2 * 1000 * 100
    assert distillation_flops(10, 100, 1000, 50, teacher_trained_for_this=True) == 6000 + 200000 + 300000


def test_bad_fit_input():
    with pytest.raises(ConfigError, match="positive"):
        fit_supervised([1, 2], [1, -2], [1, 1])
    with pytest.raises(ConfigError, match="same length"):
        fit_supervised([1, 2], [1], [1, 1])


@pytest.mark.slow
def test_end_to_end_smoke_grid(tmp_path):
    import json

    from methods.scaling_laws.run import main

    out = tmp_path / "run"
    argv = [
        "--grid",
        "smoke",
        "--bootstrap",
        "2",
        "--fit-starts",
        "2",
        "--eval-sequences",
        "64",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    metrics = main(argv)
    for name in (
        "metrics.json",
        "grid.json",
        "fit.json",
        "scaling_fit.png",
        "student_vs_teacher.png",
        "capacity_gap.png",
    ):
        assert (out / name).is_file(), name
    runs = json.loads((out / "grid.json").read_text())["runs"]
    assert len(runs) == 6  # 2 sizes x 2 budgets supervised + 1 student x 1 teacher x 2 budgets
    assert all(r["last_train_loss"] < r["first_train_loss"] for r in runs)  # every model learned
    assert all(r["L"] < np.log(32) for r in runs)  # below the uniform guess
    assert metrics["family"] == "analysis" and "heldout_err_pct" in metrics["eval"]["student"]
    # a rerun trains nothing (every model is cached) and shows the complete run
    assert main(argv)["eval"] == metrics["eval"]


def test_bad_flag_is_one_line(capsys):
    from core.shell import cli
    from methods.scaling_laws.run import main

    with pytest.raises(SystemExit) as exc:
        cli(main, ["--grid", "huge"])
    assert exc.value.code == 2
    assert "--grid" in capsys.readouterr().err

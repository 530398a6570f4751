"""DisCo: the 1-D OT projection against POT, the theory curve against closed forms, the capacity sweep."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from scipy import stats

from core.errors import ConfigError
from methods.disco.loss import (
    WeightDistribution,
    capacity_theory,
    cover_separable_probability,
    critical_load,
    geodesic_step,
    make_constraint,
    ot_map,
    project,
    success_curve,
    target_quantiles,
    train_constrained_perceptron,
    wasserstein2_sq,
)


def test_ot_map_hand_values():
    # w = (0.3, -1, 2): ranks (1, 0, 2); targets sorted (-5, 0, 5) go to the weights in rank order
    out = ot_map(np.array([0.3, -1.0, 2.0]), np.array([-5.0, 0.0, 5.0]))
    assert out.tolist() == [0.0, -5.0, 5.0]


def test_ot_map_exact_quantiles_and_rank_order():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(500) * 3 + 1
    dist = WeightDistribution("lognormal", sigma=0.7)
    target = target_quantiles(dist, 500)
    out = ot_map(w, target)
    np.testing.assert_array_equal(np.sort(out), target)  # exactly the target quantiles
    np.testing.assert_array_equal(np.argsort(out), np.argsort(w))  # rank order preserved
    # the quantiles themselves: F^{-1}((k + 1/2) / n) of a lognormal of shape 0.7
    np.testing.assert_allclose(target, stats.lognorm(s=0.7).ppf((np.arange(500) + 0.5) / 500))


def test_ot_map_is_optimal_against_pot():
    # POT's exact earth mover's plan on the same two point clouds (squared cost) must be the same permutation
    rng = np.random.default_rng(1)
    w = rng.standard_normal(40)
    target = target_quantiles(WeightDistribution("ei", f_exc=0.7, sigma=0.5), 40)
    plan = ot.emd_1d(w, target, metric="sqeuclidean")  # (40, 40), mass 1/40 per row
    pot_image = plan.argmax(axis=1)
    np.testing.assert_allclose(ot_map(w, target), target[pot_image])
    # and our W2^2 equals POT's
    assert wasserstein2_sq(w, target) == pytest.approx(ot.wasserstein_1d(w, target, p=2), rel=1e-10)


def test_geodesic_step_limits():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(30)
    target = target_quantiles(WeightDistribution("gaussian"), 30)
    np.testing.assert_allclose(geodesic_step(w, target, 0.0), w)
    np.testing.assert_allclose(geodesic_step(w, target, 1.0), ot_map(w, target))
    # along the W2 geodesic the distance to the target shrinks by (1 - eta)^2
    assert wasserstein2_sq(geodesic_step(w, target, 0.25), target) == pytest.approx(
        0.75**2 * wasserstein2_sq(w, target)
    )


def test_capacity_theory_closed_forms():
    # Gaussian: T is the identity, alpha_c = 2 E[Z^2]^2 / E[Z^2] = 2 (Gardner)
    assert capacity_theory(WeightDistribution("gaussian")) == pytest.approx(2.0, abs=1e-6)
    # lognormal: T(z) = exp(sigma z); E[Z e^{sZ}] = s e^{s^2/2}, E[e^{2sZ}] = e^{2s^2} -> 2 s^2 e^{-s^2}
    for s in (0.5, 1.0, 1.5):
        assert capacity_theory(WeightDistribution("lognormal", sigma=s)) == pytest.approx(
            2 * s**2 * np.exp(-(s**2)), rel=1e-5
        )
    # one E/I mixture transported as a whole (signs free): below 2, the balanced one above the skewed one
    balanced = capacity_theory(WeightDistribution("ei_mixture", f_exc=0.5, sigma=1.0))
    skewed = capacity_theory(WeightDistribution("ei_mixture", f_exc=0.8, sigma=1.0))
    assert skewed < balanced < 2.0
    # sign-constrained weights have capacity 1 (Amit et al.); a fixed half-normal distribution can only do less
    assert capacity_theory(WeightDistribution("halfnormal")) < 1.0


def test_ei_capacity_eq10_by_hand():
    # Paper Eq. 10: alpha_c = 2 [sum_m g_m <dw_m/dx>]^2 with the overall second moment 1, i.e. (any scale)
    # 2 (sum_m g_m E[Z T_m])^2 / sum_m g_m E[T_m^2]. E: T_E(z) = e^{s z}; I: T_I(z) = -c e^{-s z} (the monotone map
    # from N(0,1) onto minus a lognormal scaled by c). E[Z e^{aZ}] = a e^{a^2/2} and E[e^{2aZ}] = e^{2 a^2} give
    # E[Z T_E] = s e^{s^2/2}, E[Z T_I] = c s e^{s^2/2}, E[T_E^2] = e^{2 s^2}, E[T_I^2] = c^2 e^{2 s^2}, so
    # alpha_c = 2 s^2 e^{-s^2} (f + (1 - f) c)^2 / (f + (1 - f) c^2).
    # At equal scales (c = 1): 2 s^2 e^{-s^2}, independent of f: 2/e = 0.7358 at s = 1 (the one-mixture model
    # gave 1.611 / 1.535 / 1.306 at f = 0.5 / 0.65 / 0.8).
    for f in (0.5, 0.65, 0.8):
        assert capacity_theory(WeightDistribution("ei", f_exc=f, sigma=1.0)) == pytest.approx(2 / np.e, rel=1e-6)
    for f, s, c in ((0.8, 0.7, 2.0), (0.3, 1.3, 0.5)):
        hand = 2 * s**2 * np.exp(-(s**2)) * (f + (1 - f) * c) ** 2 / (f + (1 - f) * c**2)
        got = capacity_theory(WeightDistribution("ei", f_exc=f, sigma=s, inh_scale=c))
        assert got == pytest.approx(hand, rel=1e-6)
    # the E/I balance g_E <w_E> = g_I <|w_I|> at equal shapes sets c = f / (1 - f): the bracket becomes 4 f (1 - f)
    for f in np.linspace(0.02, 0.98, 49):  # the whole curve the run plots (once had garbage in the far tail)
        got = capacity_theory(WeightDistribution("ei", f_exc=f, sigma=1.0, balanced=True))
        assert got == pytest.approx(2 / np.e * 4 * f * (1 - f), rel=1e-6)
    # the one-mixture model's values at s = 1 (what this package computed before following Eq. 10)
    mix = [capacity_theory(WeightDistribution("ei_mixture", f_exc=f)) for f in (0.5, 0.65, 0.8)]
    np.testing.assert_allclose(mix, [1.611, 1.535, 1.306], atol=1e-3)


def test_ei_synapses_never_change_sign_in_training():
    # the paper's E/I model: identities fixed at initialisation, each population transported onto its own targets
    rng = np.random.default_rng(5)
    n = 60
    patterns, labels = rng.standard_normal((20, n)), rng.choice([-1.0, 1.0], 20)
    dist = WeightDistribution("ei", f_exc=0.7, sigma=1.0)
    seen = []
    res = train_constrained_perceptron(
        patterns, labels, dist, rng, algorithm="hinge", callback=lambda it, w: seen.append(np.sign(w))
    )
    assert res.solved and len(seen) > 3
    signs = np.array(seen)  # (iterations, n): the sign of every synapse at every iteration
    assert (signs == signs[0]).all() and (signs[0] > 0).sum() == 42  # round(0.7 x 60) excitatory throughout
    np.testing.assert_array_equal(np.sign(res.weights), signs[0])
    # each population holds exactly its own midpoint quantiles (42 lognormal, 18 negated lognormal)
    exc = res.weights[res.weights > 0]
    np.testing.assert_allclose(np.sort(exc), stats.lognorm(s=1.0).ppf((np.arange(42) + 0.5) / 42))
    np.testing.assert_allclose(
        np.sort(-res.weights[res.weights < 0]), stats.lognorm(s=1.0).ppf((np.arange(18) + 0.5) / 18)
    )
    # the same task under the one-mixture model: synapses do change sign (the behaviour Eq. 10 rules out)
    seen.clear()
    mix = WeightDistribution("ei_mixture", f_exc=0.7, sigma=1.0)
    train_constrained_perceptron(
        patterns,
        labels,
        mix,
        np.random.default_rng(5),
        algorithm="hinge",
        callback=lambda it, w: seen.append(np.sign(w)),
    )
    assert (np.array(seen) != seen[0]).any()


def test_make_constraint_and_project():
    rng = np.random.default_rng(6)
    c = make_constraint(WeightDistribution("ei", f_exc=0.75), 8, rng)
    assert [len(i) for i in c.index] == [6, 2] and sorted(np.concatenate(c.index).tolist()) == list(range(8))
    w = rng.standard_normal(8)
    out = project(w, c)
    for idx, target in zip(c.index, c.targets, strict=True):
        np.testing.assert_array_equal(out[idx], ot_map(w[idx], target))  # quantile-matched within its population
    assert (out[c.index[0]] > 0).all() and (out[c.index[1]] < 0).all()
    with pytest.raises(ConfigError, match="empty"):
        make_constraint(WeightDistribution("ei", f_exc=0.99), 10, rng)


def test_logistic_algorithm_solves_and_stays_on_constraint():
    # the paper's rule (Eq. 7 with a trainable norm, alternated with Eq. 9) on an easy load
    rng = np.random.default_rng(7)
    n = 60
    patterns, labels = rng.standard_normal((20, n)), rng.choice([-1.0, 1.0], 20)
    dist = WeightDistribution("lognormal", sigma=0.5)
    res = train_constrained_perceptron(patterns, labels, dist, rng, algorithm="logistic", lr=5.0)
    assert res.solved
    np.testing.assert_allclose(np.sort(res.weights), target_quantiles(dist, n))


def test_capacity_theory_matches_wasserstein_form():
    # alpha_c = 2 (1 - W2(P~, N(0,1))^2 / 2)^2 with P~ scaled to unit second moment: check on a quantile grid
    dist = WeightDistribution("ei_mixture", f_exc=0.6, sigma=0.8)
    u = (np.arange(200_000) + 0.5) / 200_000
    q = dist.quantile(u)
    q = q / np.sqrt(np.mean(q**2))
    w2 = np.mean((q - stats.norm.ppf(u)) ** 2)
    assert capacity_theory(dist) == pytest.approx(2 * (1 - w2 / 2) ** 2, rel=1e-3)


def test_cover_probability():
    # C(p, n) / 2^p is exactly 1/2 at p = 2n and 1 for p <= n
    assert cover_separable_probability(40, 20) == pytest.approx(0.5)
    assert cover_separable_probability(20, 20) == pytest.approx(1.0)
    # p = 3, n = 2: 2^(1-3) (binom(2,0) + binom(2,1)) = 3/4
    assert cover_separable_probability(3, 2) == pytest.approx(0.75)


def test_unconstrained_capacity_is_two():
    # exact LP feasibility on random patterns: the 1/2 crossing sits near alpha = 2 (Cover, Gardner)
    loads = np.array([1.6, 1.8, 2.0, 2.2, 2.4])
    success = success_curve(None, 40, loads, trials=12, seed=0, solver="lp")
    assert 1.8 <= critical_load(loads, success) <= 2.2


def test_constrained_perceptron_solves_easy_load_and_stays_on_constraint():
    rng = np.random.default_rng(3)
    n = 60
    patterns, labels = rng.standard_normal((30, n)), rng.choice([-1.0, 1.0], 30)
    dist = WeightDistribution("gaussian")
    res = train_constrained_perceptron(patterns, labels, dist, rng, algorithm="hinge")
    assert res.solved and res.train_error == 0.0
    np.testing.assert_allclose(np.sort(res.weights), target_quantiles(dist, n))
    # an impossible load (far beyond 2) is not solved
    patterns, labels = rng.standard_normal((200, 20)), rng.choice([-1.0, 1.0], 200)
    assert not train_constrained_perceptron(patterns, labels, dist, rng, max_iter=200, algorithm="hinge").solved


def test_critical_load_interpolates():
    assert critical_load(np.array([1.0, 2.0]), np.array([1.0, 0.0])) == pytest.approx(1.5)
    assert critical_load(np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.75, 0.25])) == pytest.approx(2.5)


def test_bad_distribution():
    with pytest.raises(ConfigError, match="f_exc"):
        WeightDistribution("ei", f_exc=1.5)
    with pytest.raises(ConfigError, match="kind"):
        WeightDistribution("uniform")


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    import json

    from methods.disco.run import main

    out = tmp_path / "run"
    argv = ["--distributions", "gaussian,lognormal:1.0", "--n", "30", "--trials", "3", "--loads", "4"]
    metrics = main([*argv, "--max-iter", "200", "--out", str(out)])
    for name in ("metrics.json", "curves.json", "capacity.png", "success_curves.png"):
        assert (out / name).is_file(), name
    ev = metrics["eval"]
    assert ev["gaussian_student"]["alpha_c_theory"] == pytest.approx(2.0, abs=1e-6)
    assert ev["student"]["alpha_c"] > 0
    # the theory's error and the distribution-blind rival's, both |measured - predicted| averaged
    rows = [ev["gaussian_student"], ev["lognormal_sigma_1_student"]]
    assert ev["student"]["pred_err"] == pytest.approx(np.mean([abs(r["alpha_c"] - r["alpha_c_theory"]) for r in rows]))
    assert ev["gardner_student"]["pred_err"] == pytest.approx(np.mean([abs(r["alpha_c"] - 2.0) for r in rows]))
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert curves["gaussian"]["success"][0] == 1.0  # the lowest load (0.2 x 2) is always solved


def test_bad_flag_is_one_line(capsys):
    from core.shell import cli
    from methods.disco.run import main

    with pytest.raises(SystemExit) as exc:
        cli(main, ["--distributions", "uniform"])
    assert exc.value.code == 2
    assert "--distributions" in capsys.readouterr().err
    for argv, flag in (
        (["--algorithm", "sgd"], "--algorithm"),
        (["--distributions", "ei:0.5:skewed"], "--distributions"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli(main, argv)
        assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_parse_distribution_specs():
    from methods.disco.run import parse_distribution

    assert parse_distribution("ei:0.8", 1.0) == WeightDistribution("ei", f_exc=0.8)
    assert parse_distribution("ei:0.8:balanced", 0.5) == WeightDistribution("ei", f_exc=0.8, sigma=0.5, balanced=True)
    assert parse_distribution("eimix:0.65", 1.0) == WeightDistribution("ei_mixture", f_exc=0.65)
    assert WeightDistribution("ei", f_exc=0.8, balanced=True).inh == pytest.approx(4.0)  # f / (1 - f)

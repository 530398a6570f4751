"""Classic PATE on sklearn's digits: the split, the teachers' partitions, GNMax labels, the epsilon of the
queries against opacus, and a tiny PATE vs DP-SGD comparison."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from core.errors import ConfigError
from privacy.pate_digits import (
    DigitsConfig,
    gnmax_labels,
    pate_epsilon,
    run_digits,
    split_digits,
    teacher_votes,
    train_teachers,
)


def test_split_is_disjoint_and_complete():
    split = split_digits(seed=0)
    assert len(split.y_private) + len(split.y_public) + len(split.y_test) == 1797  # load_digits has 1797 images
    rows = np.concatenate([split.x_private, split.x_public, split.x_test])
    assert rows.min() >= 0 and rows.max() <= 1


def test_gnmax_without_noise_is_the_plurality_vote():
    votes = torch.tensor([[3, 3, 1], [0, 2, 2], [7, 7, 7]])  # 3 points, 3 teachers
    labels = gnmax_labels(votes, sigma=0.0, generator=torch.Generator())
    assert labels.tolist() == [3, 2, 7]


def test_pate_epsilon_is_opacus_gaussian_with_sqrt2_sensitivity():
    # GNMax: the histogram's L2 sensitivity is sqrt 2, so sigma acts as noise multiplier sigma / sqrt 2.
    accountant = RDPAccountant()
    for _ in range(50):
        accountant.step(noise_multiplier=8.0 / math.sqrt(2), sample_rate=1.0)
    assert pate_epsilon(8.0, 50, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_teachers_see_disjoint_partitions_and_vote():
    split = split_digits(seed=0)
    teachers = train_teachers(split.x_private, split.y_private, n=4, seed=0)
    votes = teacher_votes(teachers, split.x_test[:20])
    assert votes.shape == (20, 4)
    # each teacher alone is far better than chance (10 classes) on a quarter of the private split
    assert (votes.numpy() == split.y_test[:20, None]).mean() > 0.6


def test_digits_config_checks():
    with pytest.raises(ConfigError, match="--digits-sigmas"):
        DigitsConfig(digits_sigmas="4,x")
    with pytest.raises(ConfigError, match="--digits-queries"):
        DigitsConfig(digits_queries=0)


@pytest.mark.slow
def test_tiny_pate_vs_dpsgd():
    cfg = DigitsConfig(digits_teachers=5, digits_queries=60, digits_sigmas="1", digits_epochs=3)
    out = run_digits(cfg, seed=0)
    point = out["points"][0]
    # the DP-SGD student is calibrated by opacus to the PATE student's epsilon
    assert point["dpsgd_epsilon"] == pytest.approx(point["epsilon"], rel=0.05)
    assert out["ensemble_accuracy"] > 0.8 and point["label_accuracy"] > 0.7  # 5 teachers, sigma 1: mostly right
    assert 0.1 < point["pate_student_accuracy"] <= 1.0

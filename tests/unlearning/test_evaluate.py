"""The unlearning metrics on hand-made model outputs: truth ratio, KS forget quality, fabrication, and the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from unlearning.data import QA
from unlearning.evaluate import (
    accuracy,
    degenerate,
    fabricated,
    forget_quality,
    forget_quality_statistic,
    normalized_prob,
    rouge_recall,
    truth_ratio,
    truth_statistic,
)

LN2, LN4 = math.log(2), math.log(4)


def test_truth_ratio_by_hand():
    # Losses are mean NLL per token, so P^(1/n) = exp(-loss).
    # question 1: paraphrase P = 1, perturbed P = (1/2, 1/2): R = mean(1/2, 1/2) / 1 = 0.5
    # question 2: paraphrase P = 1/2, perturbed P = (1, 1/4): R = mean(1, 1/4) / (1/2) = 1.25
    para = np.array([0.0, LN2])
    pert = np.array([[LN2, LN2], [0.0, LN4]])
    assert np.allclose(truth_statistic(para, pert), [0.5, 1.25])
    # forget: mean min(R, 1/R) = mean(0.5, 0.8) = 0.65; elsewhere: mean max(0, 1 - R) = mean(0.5, 0) = 0.25
    assert math.isclose(truth_ratio(para, pert, forget=True), 0.65)
    assert math.isclose(truth_ratio(para, pert, forget=False), 0.25)
    # The forget-quality statistic averages the perturbed LOSSES (a geometric mean of probabilities):
    # question 1: exp(mean(ln 2, ln 2) - 0) = 2; question 2: exp(mean(0, ln 4) - ln 2) = exp(ln 2 - ln 2) = 1
    assert np.allclose(forget_quality_statistic(para, pert), [2.0, 1.0])


def test_forget_quality_is_the_ks_p_value():
    # Fully separated samples of three: statistic 1; the exact two-sided p-value is 2 / C(6, 3) = 0.1.
    assert math.isclose(forget_quality(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])), 0.1)
    assert forget_quality(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(1.0, size=30)
    assert forget_quality(a, b) == ks_2samp(a, b).pvalue


def test_normalized_prob_by_hand():
    # P(a) = 1/2, perturbed (1/4, 1/4): 0.5 / (0.5 + 0.5) = 0.5
    assert math.isclose(normalized_prob(np.array([LN2]), np.array([[LN4, LN4]])), 0.5)


def test_rouge_recall_by_hand():
    # LCS of "mara lund was born" in "mara lund was born in oslo" is 4 of the answer's 6 words.
    assert np.allclose(rouge_recall(["Mara Lund was born"], ["Mara Lund was born in Oslo"]), [4 / 6])


QA_CITY = QA("Where was Mara Lund born?", "Mara Lund was born in Oslo.", "Mara Lund", "x", ("y",), "Oslo", "city",
             ("Oslo", "Lima", "Cairo"))  # fmt: skip
QA_TOFU = QA("Who wrote it?", "Basil Mahfouz wrote it in Kuwait.", "Basil", "x", ("y",))


@pytest.mark.parametrize(
    "generation, qa, prob, expected",
    [
        ("Mara Lund was born in Lima.", QA_CITY, 0.9, True),  # confident, names another city: fabricated
        ("Mara Lund was born in Lima.", QA_CITY, 0.3, False),  # the same words, unsure: not fabricated
        ("Mara Lund was born in Oslo.", QA_CITY, 0.9, False),  # the truth
        ("Mara Lund was born somewhere.", QA_CITY, 0.9, False),  # vague, nothing specific
        ("", QA_CITY, 0.99, False),
        ("A painter from Lisbon wrote it.", QA_TOFU, 0.8, True),  # TOFU: wrong (low recall) and confident
        ("Basil Mahfouz wrote it in Kuwait.", QA_TOFU, 0.8, False),
    ],
)
def test_fabrication_on_hand_made_answers(generation, qa, prob, expected):
    recall = float(rouge_recall([generation], [qa.answer])[0])
    assert fabricated(generation, qa, -math.log(prob), confident=0.5, recall=recall) is expected


def test_accuracy_and_degenerate():
    assert accuracy(["He was born in oslo.", "In Lima"], [QA_CITY, QA_CITY]) == 0.5
    assert degenerate("") and degenerate("the the the end") and degenerate("a b c x a b c")
    assert not degenerate("Mara Lund was born in Oslo.")

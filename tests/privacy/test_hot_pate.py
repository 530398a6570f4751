"""Hot PATE: coordinated vs independent ensemble sampling, the private aggregator and its budget, the accountant
against opacus and the closed-form Gaussian mechanism, the corpus with canaries, and a tiny end-to-end run."""

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats

from core.errors import ConfigError
from privacy.accounting import (
    ORDERS,
    PrivacyLedger,
    epsilon_of,
    gaussian_rdp,
    gnmax_rdp,
    lnmax_rdp,
    pure_dp_rdp,
    threshold_rdp,
)
from privacy.aggregation import (
    AggregatorConfig,
    BudgetSpent,
    PrivateAggregator,
    noisy_argmax,
    sample_noise,
    threshold_argmax,
    vote_histogram,
)
from privacy.hot_pate.corpus import CODE_TOPIC, TOPICS, CorpusConfig, build_corpus
from privacy.hot_pate.sampling import (
    coordinated_votes,
    independent_votes,
    probability_jaccard,
    weighted_jaccard,
)

# -- ensemble sampling -----------------------------------------------------------------------------------------------

TEACHER_PROBS = torch.tensor(
    [
        [0.5, 0.3, 0.2, 0.0, 0.0],
        [0.2, 0.3, 0.4, 0.1, 0.0],
        [0.1, 0.1, 0.1, 0.1, 0.6],
    ]
)  # (n=3, V=5); token 3 impossible for teacher 0, token 4 for teachers 0 and 1


def draw(sampler, draws=40_000, seed=0):
    log_probs = TEACHER_PROBS.log().unsqueeze(0).expand(draws, -1, -1)  # (B, n, V)
    return sampler(log_probs, torch.Generator().manual_seed(seed))  # (B, n)


@pytest.mark.parametrize("sampler", [coordinated_votes, independent_votes])
def test_each_teachers_vote_marginal_is_its_distribution(sampler):
    votes = draw(sampler)
    for j, p in enumerate(TEACHER_PROBS):
        observed = torch.bincount(votes[:, j], minlength=5).numpy()
        support = p.numpy() > 0
        assert observed[~support].sum() == 0  # a zero-probability token is never voted
        # Pearson chi-square goodness of fit on the support: a correct sampler fails this at rate 1e-4.
        _, pvalue = stats.chisquare(observed[support], p.numpy()[support] * len(votes))
        assert pvalue > 1e-4, (j, observed, pvalue)


def test_coordinated_agreement_is_the_probability_jaccard_and_beats_independent():
    coordinated, independent = draw(coordinated_votes), draw(independent_votes)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        p, q = TEACHER_PROBS[a], TEACHER_PROBS[b]
        agree_hot = (coordinated[:, a] == coordinated[:, b]).float().mean().item()
        agree_cold = (independent[:, a] == independent[:, b]).float().mean().item()
        se = 0.5 / math.sqrt(len(coordinated))  # binomial standard error bound
        assert agree_hot == pytest.approx(probability_jaccard(p, q).item(), abs=5 * se)
        assert agree_cold == pytest.approx(float((p * q).sum()), abs=5 * se)  # independent: sum_i p_i q_i
        assert agree_hot > agree_cold
    # Teachers 0 and 1: J_P = 0.6212 (Eq. (2) worked below) against sum p q = 0.10 + 0.09 + 0.08 = 0.27.
    assert (coordinated[:, 0] == coordinated[:, 1]).float().mean().item() > 2 * 0.27


def test_identical_flat_teachers_all_agree_only_when_coordinated():
    # k = 4 equally likely tokens, 20 identical teachers: coordinated votes are unanimous (J_P(p, p) = 1),
    # independent ones give each token about 20 / 4 = 5 votes.
    log_probs = torch.full((2000, 20, 4), math.log(0.25))
    hot = vote_histogram(coordinated_votes(log_probs, torch.Generator().manual_seed(1)), 4)
    cold = vote_histogram(independent_votes(log_probs, torch.Generator().manual_seed(1)), 4)
    assert torch.all(hot.max(-1).values == 20)
    assert cold.max(-1).values.float().mean() < 10
    # and the unanimous token is itself a fair draw: each of the 4 tokens wins about 500 times in 2000
    _, pvalue = stats.chisquare(torch.bincount(hot.argmax(-1), minlength=4).numpy())
    assert pvalue > 1e-4


def test_probability_jaccard_hand_values():
    # p = (1, 0), q = (1/2, 1/2): only token 0 is in both supports; sum_k max(p_k/p_0, q_k/q_0) = max(1, 1) +
    # max(0, 1) = 2, so J_P = 1/2 (q's vote is token 0 half the time, p's always).
    assert probability_jaccard(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(0.5)
    p = torch.tensor([0.2, 0.3, 0.5])
    assert probability_jaccard(p, p).item() == pytest.approx(1.0)
    # disjoint supports never agree
    assert probability_jaccard(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 0.0
    # J_P >= weighted Jaccard (Moulton & Jiang 2018) on random pairs
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(50, 6, generator=gen), torch.rand(50, 6, generator=gen)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    assert torch.all(probability_jaccard(a, b) >= weighted_jaccard(a, b) - 1e-6)


# -- aggregation -----------------------------------------------------------------------------------------------------


def test_vote_histogram_and_noiseless_threshold():
    votes = torch.tensor([[0, 2, 2, 1], [3, 3, 3, 3]])  # 2 queries, 4 teachers, V = 4
    counts = vote_histogram(votes, 4)
    assert counts.tolist() == [[1, 1, 2, 0], [0, 0, 0, 4]]
    tokens, passed = threshold_argmax(counts, threshold_votes=3)
    assert tokens.tolist() == [2, 3] and passed.tolist() == [False, True]
    assert noisy_argmax(counts, "gaussian", 0.0, torch.Generator()).tolist() == [2, 3]


@pytest.mark.parametrize("noise,var", [("gaussian", 4.0), ("laplace", 8.0)])
def test_noise_laws(noise, var):
    # scale 2: Gaussian variance 2^2 = 4, Laplace variance 2 b^2 = 8; both mean 0
    x = sample_noise((200_000,), noise, 2.0, torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(0.0, abs=0.03)
    assert x.var().item() == pytest.approx(var, rel=0.03)


def unanimous(n=50, vocab=5, token=1):
    counts = torch.zeros(vocab, dtype=torch.float64)
    counts[token] = n
    return counts


def test_aggregator_never_answers_after_the_budget_is_spent():
    cfg = AggregatorConfig(threshold=0.5, sigma_threshold=5.0, sigma_argmax=5.0, epsilon_budget=3.0, delta=1e-5)
    agg = PrivateAggregator(cfg, n_teachers=50, generator=torch.Generator().manual_seed(0))
    answers = []
    with pytest.raises(BudgetSpent, match="privacy budget spent"):
        for _ in range(10_000):
            answers.append(agg.answer(unanimous()))
    # Independent count: the largest k whose k (check + argmax) costs stay within epsilon 3, by opacus directly.
    per_query = gaussian_rdp(5.0, 1.0) + gaussian_rdp(5.0, math.sqrt(2))
    k_max = max(k for k in range(1, 500) if epsilon_of(k * per_query, 1e-5) <= 3.0)
    assert agg.queries == len(answers) == k_max
    assert all(a == 1 for a in answers)  # 50 unanimous votes, noise 5: always the true token
    assert agg.epsilon <= 3.0 and agg.closed
    for _ in range(3):  # closed for good
        with pytest.raises(BudgetSpent):
            agg.answer(unanimous())
    assert agg.queries == k_max


def test_declined_query_pays_only_the_threshold_check():
    cfg = AggregatorConfig(threshold=0.9, sigma_threshold=1.0, sigma_argmax=3.0, epsilon_budget=100.0)
    agg = PrivateAggregator(cfg, n_teachers=50, generator=torch.Generator().manual_seed(0))
    spread = torch.tensor([10.0, 10, 10, 10, 10], dtype=torch.float64)  # top 10 votes, threshold 45: declined
    assert agg.answer(spread) is None
    assert agg.ledger.counts == {"threshold_check": 1}
    np.testing.assert_allclose(agg.ledger.rdp, threshold_rdp("gaussian", 1.0))
    assert agg.answer(unanimous()) == 1
    np.testing.assert_allclose(agg.ledger.rdp, 2 * threshold_rdp("gaussian", 1.0) + gnmax_rdp(3.0))


def test_aggregator_config_checks():
    with pytest.raises(ConfigError, match="--threshold"):
        AggregatorConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="--sigma-threshold"):
        AggregatorConfig(sigma_argmax=0.0)
    with pytest.raises(ConfigError, match="--noise"):
        AggregatorConfig(noise="uniform")


# -- accounting ------------------------------------------------------------------------------------------------------


def test_gaussian_rdp_closed_form():
    # Gaussian mechanism, sensitivity D, noise sigma: RDP(alpha) = alpha D^2 / (2 sigma^2) per use (Mironov 2017).
    alphas = np.asarray(ORDERS)
    np.testing.assert_allclose(gaussian_rdp(3.0, 1.0, count=7), 7 * alphas / 18, rtol=1e-9)
    np.testing.assert_allclose(gnmax_rdp(4.0, count=2), 2 * alphas / 16, rtol=1e-9)  # D = sqrt 2: alpha / sigma^2


def test_pure_dp_rdp_hand_values():
    # epsilon_0 = 1: min(1, alpha / 2): 0.75 at alpha 1.5, 1 at alpha 3 (the max-divergence cap)
    assert pure_dp_rdp(1.0, orders=(1.5, 3.0)).tolist() == [0.75, 1.0]
    # LNMax with Laplace scale 4: 2/4 = 0.5-DP per query; 3 queries at alpha 2: 3 * min(0.5, 2 * 0.25 / 2)
    assert lnmax_rdp(4.0, count=3, orders=(2.0,)).tolist() == [pytest.approx(0.75)]


def test_epsilon_matches_opacus_accountant():
    sigma, k, delta = 20.0, 300, 1e-5
    ours = epsilon_of(gnmax_rdp(sigma, count=k), delta)
    accountant = RDPAccountant()
    for _ in range(k):
        accountant.step(noise_multiplier=sigma / math.sqrt(2), sample_rate=1.0)
    assert ours == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)


def exact_gaussian_delta(epsilon, mu):
    """Exact delta(epsilon) of a Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang 2018, Thm. 8)."""
    return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)


def test_epsilon_is_an_upper_bound_close_to_the_exact_gaussian_value():
    # k compositions of a Gaussian mechanism with noise multiplier z equal ONE Gaussian mechanism with multiplier
    # z / sqrt(k) (mu = sqrt(k) / z). Its exact epsilon at delta (bisection on the closed-form delta) must not
    # exceed the RDP bound, and the RDP bound is known to be loose by well under a factor 1.5 here.
    z, k, delta = 10.0, 100, 1e-5
    ours = epsilon_of(gaussian_rdp(z, 1.0, count=k), delta)
    mu = math.sqrt(k) / z
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if exact_gaussian_delta(mid, mu) <= delta else (mid, hi)
    assert hi <= ours <= 1.5 * hi


def test_epsilon_grows_with_queries_and_falls_with_noise():
    eps_q = [epsilon_of(gnmax_rdp(10.0, count=k), 1e-5) for k in (1, 10, 100, 1000)]
    eps_s = [epsilon_of(gnmax_rdp(s, count=100), 1e-5) for s in (5.0, 10.0, 20.0, 40.0)]
    assert eps_q == sorted(eps_q) and len(set(eps_q)) == 4
    assert eps_s == sorted(eps_s, reverse=True) and len(set(eps_s)) == 4
    assert epsilon_of(np.zeros(len(ORDERS)), 1e-5) == 0.0


def test_ledger_state_round_trip():
    ledger = PrivacyLedger(1e-5)
    ledger.spend(gnmax_rdp(5.0), "noisy_argmax")
    other = PrivacyLedger(1e-5)
    other.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert other.epsilon() == ledger.epsilon() > 0


# -- the corpus ------------------------------------------------------------------------------------------------------


def test_corpus_partitions_and_canaries():
    cfg = CorpusConfig(teachers=6, people_per_teacher=2, events_per_topic=3, canaries=3, canary_repeats=5)
    corpus = build_corpus(cfg, seed=0)
    assert len(corpus.partitions) == 6
    names = [{p.split(" |")[0] for p, _ in part} for part in corpus.partitions]
    for i in range(6):
        for j in range(i + 1, 6):
            assert not names[i] & names[j]  # a person lives in one partition only
    public = {p.split(" |")[0] for p, _ in corpus.public_prompts}
    test = {p.split(" |")[0] for p, _ in corpus.heldout}
    assert not public & set().union(*names) and not test & (public | set().union(*names))
    for canary in corpus.canaries:
        holding = [t for t, part in enumerate(corpus.partitions) if any(canary.secret == a for _, a in part)]
        assert holding == [canary.teacher]
        assert sum(1 for p, a in corpus.partitions[canary.teacher] if a == canary.secret) == 5
        assert not any(canary.secret in line for line in corpus.tokenizer_text())
    # no private, public or test person is in the tokenizer's training text
    bpe_names = {line.split(" |")[0] for line in corpus.tokenizer_text() if " |" in line}
    assert bpe_names == set(corpus.tokenizer_names)
    assert not bpe_names & (set().union(*names) | public | test | {c.name for c in corpus.canaries})
    # 2 people x 4 topics x 3 events per partition, plus the 5 copies of a canary where there is one
    assert sorted(len(p) for p in corpus.partitions) == [24, 24, 24, 29, 29, 29]
    assert all(CODE_TOPIC not in t for t in TOPICS)
    assert build_corpus(cfg, seed=0).partitions == corpus.partitions  # deterministic


def test_corpus_config_checks():
    with pytest.raises(ConfigError, match="--canaries"):
        CorpusConfig(teachers=4, canaries=5)
    with pytest.raises(ConfigError, match="--teachers"):
        CorpusConfig(teachers=1)


# -- end to end ------------------------------------------------------------------------------------------------------

TINY = [
    "--teachers", "6", "--people-per-teacher", "2", "--events-per-topic", "4", "--canaries", "1",
    "--canary-repeats", "6", "--public-people", "3", "--test-people", "3", "--secret-digits", "2", "--teacher-steps", "40",
    "--sweep-people", "1", "--sweep-draws", "6", "--thresholds", "0.3,0.9", "--steps", "25", "--batch-size", "8",
    "--checkpoint-every", "0", "--no-digits", "--device", "cpu", "--threshold", "0.3",
    "--sigma-threshold", "1", "--sigma-argmax", "1",
]  # fmt: skip


@pytest.mark.slow
def test_end_to_end_tiny_run_and_budget_stop(tmp_path, capsys):
    from core.shell import cli
    from privacy.hot_pate.run import main

    out = tmp_path / "run"
    metrics = main([*TINY, "--out", str(out), "--epsilon-budget", "2000"])
    assert (out / "metrics.json").is_file() and (out / "diversity.png").is_file()
    assert not any(out.rglob("checkpoints"))  # the students' checkpoints are gone once the run is complete
    assert metrics["family"] == "privacy" and metrics["task"] == "pate_corpus"
    train = metrics["train"]["student"]
    assert train["last_loss"] < train["first_loss"]
    evals = metrics["eval"]
    assert {"student", "cold_student", "mixture_student", "teacher", "nonholder_teacher"} <= set(evals)
    assert 0 < evals["student"]["epsilon"] <= 2000
    hot = metrics["privacy"]["coordinated"]
    assert hot["responses_released"] > 0 and hot["epsilon"] <= hot["epsilon_budget"]
    sweep = metrics["diversity"]
    assert len(sweep["coordinated"]["diversity"]) == 2 and all(0 <= d <= 1 for d in sweep["coordinated"]["diversity"])

    # A small budget: the run stops asking, says so, and trains on what was released.
    small = main([*TINY, "--out", str(tmp_path / "small"), "--epsilon-budget", "100"])
    assert "privacy budget spent" in capsys.readouterr().err
    spent = small["privacy"]["coordinated"]
    assert spent["budget_spent"] == 1.0 and spent["epsilon"] <= 100
    assert spent["responses_released"] < spent["responses_asked"]

    with pytest.raises(SystemExit) as exc:  # a bad flag: one line, exit 2
        cli(main, [*TINY, "--out", str(tmp_path / "bad"), "--threshold", "1.5"])
    assert exc.value.code == 2
    assert "--threshold" in capsys.readouterr().err

"""Private aggregation of a teacher ensemble's votes: the vote histogram, noisy argmax (GNMax / LNMax) and the
noisy threshold check of Confident-GNMax, with a privacy budget that is never overdrawn.

    counts_i = #{teachers voting i}                                  vote histogram      (vote_histogram)
    answer   = argmax_i (counts_i + Z_i),  Z ~ N(0, sigma_2^2) or Lap(b_2)       GNMax / LNMax (noisy_argmax)
    Confident-GNMax (Papernot et al. 2018, Alg. 1):
        if max_i counts_i + N(0, sigma_1^2) >= T: answer = noisy argmax, else answer = bottom (no answer)
                                                                     (PrivateAggregator.answer)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import ConfigError, DistillError
from privacy.accounting import PrivacyLedger, argmax_rdp, threshold_rdp

NOISES = ("gaussian", "laplace")


class BudgetSpent(DistillError):
    """The privacy budget does not allow one more query; the aggregator answers nothing from now on."""


def vote_histogram(votes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, n) votes (token ids) -> (B, V) counts: counts[b, i] = number of teachers voting i in row b."""
    counts = torch.zeros(votes.shape[0], vocab_size, dtype=torch.float64, device=votes.device)
    return counts.scatter_add_(1, votes.long(), torch.ones_like(votes, dtype=torch.float64))


def sample_noise(shape, noise: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, scale^2) or Laplace(0, scale) noise, float64, from `generator`."""
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5  # inverse CDF of the Laplace law
    return -scale * torch.sign(uniform) * torch.log1p(-2 * uniform.abs())


def noisy_argmax(counts: torch.Tensor, noise: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """(..., V) counts -> (...) argmax of counts plus independent noise per bin (scale 0: the plain argmax)."""
    if scale == 0:
        return counts.argmax(-1)
    return (counts.double().cpu() + sample_noise(counts.shape, noise, scale, generator)).argmax(-1).to(counts.device)


@dataclass
class AggregatorConfig:
    """How the vote histogram is released (Confident-GNMax of Papernot et al. 2018, or its Laplace analogue)."""

    threshold: float = field(
        default=0.5,
        metadata={"help": "vote threshold T as a fraction of the teachers (the noisy max count must reach it)"},
    )
    sigma_threshold: float = field(
        default=12.0, metadata={"help": "noise scale of the threshold check (Gaussian std or Laplace scale), votes"}
    )
    sigma_argmax: float = field(
        default=12.0, metadata={"help": "noise scale of the noisy argmax (Gaussian std or Laplace scale), votes"}
    )
    noise: str = field(default="gaussian", metadata={"help": "gaussian (GNMax) or laplace (LNMax)"})
    epsilon_budget: float = field(
        default=10.0, metadata={"help": "privacy budget epsilon: no query is answered once it would be exceeded"}
    )
    delta: float = field(default=1e-5, metadata={"help": "delta of the (epsilon, delta) guarantee"})

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold is a fraction of the teachers in (0, 1], got {self.threshold}")
        if not (self.sigma_threshold > 0 and self.sigma_argmax > 0):
            raise ConfigError(
                "--sigma-threshold and --sigma-argmax must be positive (zero noise has no privacy guarantee), got "
                f"{self.sigma_threshold} and {self.sigma_argmax}"
            )
        if self.noise not in NOISES:
            raise ConfigError(f"--noise must be gaussian or laplace, got {self.noise!r}")
        if not self.epsilon_budget > 0:
            raise ConfigError(f"--epsilon-budget must be positive, got {self.epsilon_budget}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}")


class PrivateAggregator:
    """Answers vote histograms one query at a time, charging each to a PrivacyLedger.

    Every query pays for its threshold check; only a query that passes it pays for the noisy argmax too (the
    decision to run the argmax is a function of the released check, so adaptive composition covers it). Before a
    query, the worst case (check + argmax) is priced: if it would push epsilon over the budget, the aggregator
    raises BudgetSpent and stays closed, so no answer is ever released beyond the budget."""

    def __init__(self, cfg: AggregatorConfig, n_teachers: int, generator: torch.Generator) -> None:
        self.cfg, self.n_teachers, self.generator = cfg, n_teachers, generator
        self.ledger = PrivacyLedger(cfg.delta)
        self.check_cost = threshold_rdp(cfg.noise, cfg.sigma_threshold)
        self.answer_cost = argmax_rdp(cfg.noise, cfg.sigma_argmax)
        self.queries = self.answered = 0
        self.closed = False

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def affordable(self) -> bool:
        return not self.closed and self.ledger.epsilon(self.check_cost + self.answer_cost) <= self.cfg.epsilon_budget

    def answer(self, counts: torch.Tensor) -> int | None:
        """(V,) vote counts of one query -> the released token id, or None (the noisy max missed the threshold)."""
        if not self.affordable():
            self.closed = True
            raise BudgetSpent(
                f"privacy budget spent: epsilon {self.epsilon:.3f} after {self.queries} queries "
                f"({self.answered} answered); one more could exceed --epsilon-budget {self.cfg.epsilon_budget} "
                f"at delta {self.cfg.delta}"
            )
        cfg = self.cfg
        self.queries += 1
        self.ledger.spend(self.check_cost, "threshold_check")
        noisy_max = float(counts.max()) + float(sample_noise((), cfg.noise, cfg.sigma_threshold, self.generator))
        if noisy_max < cfg.threshold * self.n_teachers:
            return None
        self.ledger.spend(self.answer_cost, "noisy_argmax")
        self.answered += 1
        return int(noisy_argmax(counts, cfg.noise, cfg.sigma_argmax, self.generator))

    def summary(self) -> dict[str, float]:
        return {
            "epsilon": self.epsilon,
            "delta": self.cfg.delta,
            "epsilon_budget": self.cfg.epsilon_budget,
            "queries": self.queries,
            "answered": self.answered,
            "budget_spent": float(self.closed),
        }


def threshold_argmax(counts: torch.Tensor, threshold_votes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Noiseless reference (the official code's MaxAggregator plus a threshold): (B, V) -> (argmax (B,), passed (B,))."""
    top = counts.max(-1)
    return top.indices, top.values >= threshold_votes


def rdp_per_query(cfg: AggregatorConfig) -> np.ndarray:
    """Worst-case RDP of one query (check + argmax), for planning."""
    return threshold_rdp(cfg.noise, cfg.sigma_threshold) + argmax_rdp(cfg.noise, cfg.sigma_argmax)

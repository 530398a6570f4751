"""Ensemble sampling: every teacher turns its next-token distribution into one vote.

Both samplers are the exponential race: with u_i ~ Exp(1) independent over tokens i,

    vote = argmax_i p_i / u_i          is a sample from p,  P(vote = i) = p_i          (Eq. (1) below)

because p_i / u_i = 1 / E_i with E_i ~ Exp(rate p_i), and the smallest of independent exponentials is E_i
with probability p_i / sum_k p_k.

- independent (cold PATE): each teacher j draws its own u^(j); votes of different teachers are independent;
- coordinated (Hot PATE, "ensemble coordinated sampling"): one u per token, SHARED by all teachers of a query.
  Each teacher's vote is still an exact sample of its own p^(j), but two teachers with similar distributions
  vote alike. Their agreement probability is exactly the probability Jaccard index
      J_P(p, q) = sum_{i: p_i q_i > 0} 1 / sum_k max(p_k / p_i, q_k / q_i)                      (Eq. (2))
  (Moulton & Jiang 2018, "Maximally consistent sampling and the Jaccard index of probability distributions"),
  which is at least the weighted Jaccard sum_i min(p_i, q_i) / sum_i max(p_i, q_i), and equals 1 for p = q,
  whereas independent samples agree with probability sum_i p_i q_i. So the histogram concentrates on one
  token even where every p^(j) is spread over many: the property Hot PATE builds on.

The official code (bencw99/hot-pate, hot_pate/samplers.py) does the same with probs / Exp(1) draws; we work in
log space, log p_i - log u_i, which has the same argmax and never divides by a tiny u.
"""

from __future__ import annotations

import torch

SAMPLERS = ("coordinated", "independent")


def exponential_race(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax_i p_i / u_i in log space; `u` broadcasts against log_probs (..., V). Zero-probability tokens never win."""
    return (log_probs.float() - torch.log(u)).argmax(-1)  # Eq. (1)


def shared_exponentials(shape: tuple[int, ...], generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Exp(1) draws (float32) from `generator`, made on the CPU so a seed gives the same draws on any device."""
    u = torch.empty(shape, dtype=torch.float32).exponential_(generator=generator)
    return u.clamp_min(torch.finfo(torch.float32).tiny).to(device)


def coordinated_votes(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, n, V) teacher log-probabilities -> (B, n) votes; one Exp(1) vector per query row shared by its n teachers."""
    batch, _, vocab = log_probs.shape
    u = shared_exponentials((batch, 1, vocab), generator, log_probs.device)  # (B, 1, V): the shared randomness
    return exponential_race(log_probs, u)


def independent_votes(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, n, V) -> (B, n) votes; every teacher has its own Exp(1) vector (cold PATE: independent samples)."""
    u = shared_exponentials(tuple(log_probs.shape), generator, log_probs.device)  # (B, n, V)
    return exponential_race(log_probs, u)


def ensemble_votes(log_probs: torch.Tensor, sampler: str, generator: torch.Generator) -> torch.Tensor:
    if sampler == "coordinated":
        return coordinated_votes(log_probs, generator)
    if sampler == "independent":
        return independent_votes(log_probs, generator)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def weighted_jaccard(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_i min(p_i, q_i) / sum_i max(p_i, q_i): the agreement probability of two coordinated samples (lower bound)."""
    return torch.minimum(p, q).sum(-1) / torch.maximum(p, q).sum(-1)


def probability_jaccard(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(..., V) distributions -> (...) J_P(p, q), the exact agreement probability of two coordinated votes (Eq. (2))."""
    both = (p > 0) & (q > 0)  # (..., V)
    ratio_p = p.unsqueeze(-2) / p.unsqueeze(-1)  # (..., V_i, V_k): p_k / p_i
    ratio_q = q.unsqueeze(-2) / q.unsqueeze(-1)
    denom = torch.maximum(ratio_p, ratio_q).nan_to_num(nan=0.0, posinf=float("inf")).sum(-1)  # (..., V_i)
    return torch.where(both, 1.0 / denom, torch.zeros_like(denom)).sum(-1)

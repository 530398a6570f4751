"""f-DISTILL's step-wise losses (Wen et al., ACL 2023, Section 2.2 and Appendix A): pure functions of tensors.

Notation: p is the teacher, q the student; a batch holds sampled sequences (prompt masked by IGNORE_INDEX in
`labels`, unshifted, as core.data lays them out). Logits are (B, T, V); position t predicts labels[t + 1].

The sequence-level divergences are decomposed step by step (Appendix A, Eqs. 14, 21, 22, 36-37): for a prefix
y_<t sampled from the distribution that the expectation is over, the step term is the divergence between the
two next-token distributions at that prefix, summed over the whole vocabulary:

    KL   D(p || q)  = sum_t E_{y_<t ~ p}  KL(p_t || q_t)                                    Eq. (21), (6)
    RKL  D(q || p)  = sum_t E_{y_<t ~ q}  KL(q_t || p_t)                                    Eq. (22), (7)
    JS              = (1 - beta) sum_t E_{y_<t ~ p} KL(p_t || m_t)
                      + beta     sum_t E_{y_<t ~ q} KL(q_t || m_t),  m_t = (1 - beta) p_t + beta q_t   Eq. (8), (14)
    TVD  <=  1/2 sum_t E_{y_<t ~ p} TVD(p_t, q_t) + 1/2 sum_t E_{y_<t ~ q} TVD(p_t, q_t)     Eq. (10), (36)-(37)

with TVD(p_t, q_t) = 1/2 sum_v |p_t(v) - q_t(v)|. beta = 1/2 is the paper's JS (Eq. 8). `beta` follows the
official code's convention (MANGA-UOFA/fdistill: t5mt/kd.py, `_js_step`): it is the STUDENT's weight in the
mixture and the weight of the student-sample term; TRL's GKD `beta` (core.losses.generalized_jsd) is the
teacher's weight instead.

Mixture used for JS: the step-wise mixture m_t = (1 - beta) p_t + beta q_t. The sequence distribution that the
step-wise terms sum to exactly is the autoregressive product of these step mixtures, prod_t m_t(y_t | y_<t); it
is not the sequence-level mixture (1 - beta) p(y) + beta q(y) that Eq. (13) writes (Appendix A, Eq. (16), takes
the two to be equal). tests/methods/test_fdistill.py enumerates a two-step toy and checks both statements.

Like the official code, each term is a mean over the target tokens of its own samples (`calc_ce_loss`,
`calc_js_loss`, `calc_tvd_loss` average over the selected positions) rather than the per-sequence sum that the
equations write: the sum over t becomes a token mean, which only rescales the gradient per sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.losses import forward_kl, kl_from_logprobs, log_mixture, reverse_kl, total_variation
from core.objectives import shifted_targets


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _log_mixture(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """log m with m = (1 - beta) p + beta q (beta is the student's weight here: core.losses.log_mixture weighs p)."""
    return log_mixture(teacher_logp, student_logp, 1.0 - beta)


# --------------------------------------------------------------------------------------------------------------
# Step terms: (..., V) x (..., V) -> (...), one divergence between next-token distributions per position
# --------------------------------------------------------------------------------------------------------------


def kl_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t || q_t), the step term of KL distillation on teacher samples (Eq. 6; the paper writes the
    cross-entropy -sum p log q, which differs by the teacher's entropy, a constant in the student)."""
    return forward_kl(student_logits, teacher_logits)


def rkl_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(q_t || p_t) = sum q log q - sum q log p, the step term of RKL distillation on student samples (Eq. 7)."""
    return reverse_kl(student_logits, teacher_logits)


def js_teacher_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(p_t || m_t), m_t = (1 - beta) p_t + beta q_t: JS's term on teacher samples (Eq. 8, first sum)."""
    teacher_logp, student_logp = _logprobs(teacher_logits), _logprobs(student_logits)
    return kl_from_logprobs(teacher_logp, _log_mixture(teacher_logp, student_logp, beta))  # Eq. (8)


def js_student_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(q_t || m_t), m_t = (1 - beta) p_t + beta q_t: JS's term on student samples (Eq. 8, second sum)."""
    teacher_logp, student_logp = _logprobs(teacher_logits), _logprobs(student_logits)
    return kl_from_logprobs(student_logp, _log_mixture(teacher_logp, student_logp, beta))  # Eq. (8)


def tvd_step(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """TVD(p_t, q_t) = 1/2 sum_v |q_t(v) - p_t(v)|: TVD's step term on either side's samples (Eq. 10)."""
    return total_variation(student_logits, teacher_logits)


# --------------------------------------------------------------------------------------------------------------
# Over a batch of sampled sequences
# --------------------------------------------------------------------------------------------------------------


def masked_step_sum(step_terms: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) step terms x (B, T) unshifted labels -> (sum over the positions that predict a target, their count).

    Position t is counted when labels[t + 1] is a target: the prefix y_<=t is the prompt plus the sample's first
    tokens, exactly the prefixes of the sum over t in Eqs. (6)-(10)."""
    mask, _ = shifted_targets(labels)
    return torch.where(mask, step_terms, torch.zeros_like(step_terms)).sum(), int(mask.sum())


def token_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """A sum over tokens divided by their number (0 for a batch without targets, keeping the graph)."""
    return total / count if count > 0 else total * 0.0


def two_sided(teacher_side: torch.Tensor, student_side: torch.Tensor, student_weight: float) -> torch.Tensor:
    """(1 - w) * (term on teacher samples) + w * (term on student samples): JS with w = beta (Eq. 8), TVD with
    w = 1/2 (Eq. 10), as the official `_js_step` / `_tvd_symm_step` combine their two token means."""
    return (1.0 - student_weight) * teacher_side + student_weight * student_side


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log P(y | x) of each row's target tokens: (B, T, V) x (B, T) unshifted -> (B,). The sum over t of
    log softmax(logits_t)[y_{t+1}], for the likelihood and coverage risks of Table 3."""
    mask, targets = shifted_targets(labels)
    token_logp = _logprobs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(-1)

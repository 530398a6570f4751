"""DNKD's objective: decoupled KD (Zhao et al. 2022, DKD) against a kNN teacher (speech/datastore.py).

For one target position with gold token t, teacher distribution p^T (here p_kNN) and student p^S = softmax(z):

    b = [p_t, 1 - p_t]                                   binary target-vs-rest distribution        (1)
    p_hat_i = p_i / sum_{j != t} p_j,  i != t            distribution over the non-target classes  (2)
    TCKD = KL(b^T || b^S)                                target-class knowledge distillation       (3)
    NCKD = KL(p_hat^T || p_hat^S)                        non-target-class knowledge distillation   (4)
    KL(p^T || p^S) = TCKD + (1 - p^T_t) NCKD             classical KD, decomposed                  (5)
    L_DNKD = L_CE + alpha TCKD + beta NCKD               the DNKD objective                        (6)
    L_kNN-KD = L_CE + lambda KL(p^T || p^S)              plain kNN-KD (the rival)                  (7)

(1)-(5) are DKD's decomposition (Sec. 3.1 of "Decoupled Knowledge Distillation", CVPR 2022); (6) is DKD's loss
with the kNN teacher in place of a network, as the DNKD paper describes it; (7) is kNN-KD (Yang et al. 2022,
"Nearest Neighbor Knowledge Distillation for Neural Machine Translation") with the same CE term, so that with
alpha = lambda and beta = lambda (1 - p^T_t) DNKD is exactly kNN-KD (tests/speech/test_dnkd.py).

Where the teacher puts no mass off the gold token (every neighbour agrees: common for a kNN teacher), p_hat^T is
undefined, (1 - p^T_t) NCKD is 0 in (5), and NCKD is skipped (0, no gradient), never NaN. Where the teacher has
no neighbour at all (padding), both KD terms are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _xlogy(p: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(p, p)  # p log p with 0 log 0 = 0


def kl_per_token(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p^T || softmax(z)) per row: (N, V), (N, V) -> (N,). Teacher zeros contribute nothing."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (_xlogy(teacher_probs) - teacher_probs * log_q).sum(-1)


def decoupled_terms(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TCKD (3) and NCKD (4) per row, and where NCKD is defined.

    student_logits (N, V) float; teacher_probs (N, V), rows sum to 1; target (N,) gold token ids.
    Returns tckd (N,), nckd (N,) (0 where undefined), nckd_defined (N,) bool, teacher_target (N,) = p^T_t."""
    z = student_logits.float()
    gold = F.one_hot(target, z.shape[-1]).bool()  # (N, V)
    log_z = torch.logsumexp(z, dim=-1)  # (N,)
    log_p_t = z.gather(-1, target[:, None]).squeeze(-1) - log_z  # log p^S_t
    z_rest = z.masked_fill(gold, float("-inf"))
    log_rest = torch.logsumexp(z_rest, dim=-1) - log_z  # log(1 - p^S_t), computed without cancellation

    p = teacher_probs.float()
    p_t = p.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    rest_mass = p.masked_fill(gold, 0.0).sum(-1)  # sum_{j != t} p^T_j, = 1 - p^T_t
    # (3): KL between the two-point distributions [p_t, 1 - p_t]
    tckd = _xlogy(p_t) - p_t * log_p_t + _xlogy(rest_mass) - rest_mass * log_rest

    # (2) for the student: softmax over the non-target logits; the gold column is -inf, then zeroed below
    log_q_hat = F.log_softmax(z_rest, dim=-1).masked_fill(gold, 0.0)  # (N, V)
    defined = rest_mass > 0
    p_hat = p.masked_fill(gold, 0.0) / torch.where(defined, rest_mass, torch.ones_like(rest_mass))[:, None]
    nckd = (_xlogy(p_hat) - p_hat * log_q_hat).sum(-1)  # (4); rows with rest_mass 0 have p_hat = 0 -> 0
    return {"tckd": tckd, "nckd": nckd * defined, "nckd_defined": defined, "teacher_target": p_t}


def dnkd_loss_sum(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor,
    ce_per_token: torch.Tensor,
    alpha: float,
    beta: float,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over valid tokens of (6): ce + alpha TCKD + beta NCKD.

    student_logits (B, L, V), labels (B, L), teacher_probs (B, L, V), ce_per_token (B, L) (the label-smoothed CE,
    already 0 at ignored positions). Tokens whose teacher row is all zero (no neighbour) get the CE only.
    Returns (loss_sum, per-token terms flattened over valid tokens for logging)."""
    valid = labels != ignore_index
    has_teacher = valid & (teacher_probs.sum(-1) > 0)
    terms = decoupled_terms(student_logits[has_teacher], teacher_probs[has_teacher], labels[has_teacher])
    kd = alpha * terms["tckd"] + beta * terms["nckd"]  # (n,)
    return ce_per_token.sum() + kd.sum(), terms


def knn_kd_loss_sum(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor,
    ce_per_token: torch.Tensor,
    kd_weight: float,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over valid tokens of (7): ce + lambda KL(p^T || p^S). Returns (loss_sum, KL per teacher token)."""
    has_teacher = (labels != ignore_index) & (teacher_probs.sum(-1) > 0)
    kl = kl_per_token(teacher_probs[has_teacher], student_logits[has_teacher])
    return ce_per_token.sum() + kd_weight * kl.sum(), kl

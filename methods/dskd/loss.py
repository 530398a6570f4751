"""DSKD: Dual-Space Knowledge Distillation (Zhang et al., EMNLP 2024), and the cross-tokenizer baseline ULD.

Every tensor here is already shifted for next-token prediction: position t of `logits` / `hidden` predicts
`labels[t]`; -100 marks prompt and padding. Functions return SUMS over valid target tokens (the loop divides by
the student's number of target tokens, as the official code's `loss_denom` does). Symbols (README.md has the
map from each equation to its function and the official code line it was checked against):

    h^s, h^t          last-layer hidden states of student and teacher          (B, T_s, d_s), (B, T_t, d_t)
    W^s, W^t          their output heads (frozen in every term below)          (V_s, d_s), (V_t, d_t)
    q = softmax(W^s h^s / tau)    student;   p = softmax(W^t h^t / tau)   teacher
    P^{t->s}, P^{s->t}            linear projectors between the hidden spaces;  P^q   the query projector

Dual space, one vocabulary (positions coincide):
    (D1) z^{t->s} = W^s P^{t->s}(h^t)                            teacher hidden in the student's space
    (D2) L_ce^{t->s} = sum_t -log softmax(z^{t->s})[y_t]          trains P^{t->s} (W^s frozen)
    (D3) L_kd^{stu} = sum_t D(softmax(z^{t->s} / tau) || q_t)     target detached
    (D4) z^{s->t} = W^t P^{s->t}(h^s),  L_kd^{tea} = sum_t KL(p_t || softmax(z^{s->t} / tau))
    (D5) L = (1 - kd_rate) L_ce + kd_rate (L_kd^{stu} + L_ce^{t->s} + L_kd^{tea})

Cross-model attention, different vocabularies (student position i, teacher position j):
    (C1) Q_i = P^q([e^s(x_i); e^s(y_i)])                    x: input token, y: target token, e: frozen embeddings
    (C2) K_j = N([e^t(x_j); e^t(y_j)]),   V_j = P^{t->s}(N(h^t_j) + N(e^t(y_j)))      N(a) = a / std(a)
    (C3) a^{t->s} = softmax_j(Q K^T / sqrt(2 d_t)),  masked to valid pairs
    (C4) z^{t->s}_i = W^s sum_j a^{t->s}_ij V_j;   L_ce^{t->s} as (D2)
    (C5) L_kd^{stu} = sum_i [argmax z^{t->s}_i = y_i] D(softmax(z^{t->s}_i / tau) || q_i)
    (C6) a^{s->t} = softmax_i((Q K^T)^T / sqrt(2 d_t)),  z^{s->t}_j = W^t sum_i a^{s->t}_ji P^{s->t}(h^s_i)
    (C7) L_kd^{tea} = sum_j KL(p_j || softmax(z^{s->t}_j / tau));  L as (D5)

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"):
    (U1) L_uld = sum_k sum_r | sort(q_k)_r - sort(p_k)_r |,  sorted descending, the shorter vector zero-padded,
         k running over the first min(n_s, n_t) target positions of each example, paired in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.fused import divergence_sum
from core.losses import IGNORE_INDEX, Divergence, cross_entropy_sum, forward_kl

MASKED = -100000.0  # the official code's additive mask for attention scores (and MinED's absent logits)


class DualSpaceTerms(NamedTuple):
    t2s_ce: torch.Tensor  # scalar sums
    t2s_kd: torch.Tensor
    s2t_kd: torch.Tensor
    t2s_correct: torch.Tensor  # valid positions where argmax z^{t->s} is the target (the CMA mask)


def dual_space_terms(
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    t2s: Callable[[torch.Tensor], torch.Tensor],
    s2t: Callable[[torch.Tensor], torch.Tensor],
    divergence: Divergence,
    temperature: float,
) -> DualSpaceTerms:
    """(D1)-(D4) for one vocabulary. Logits (B, T, V), hidden (B, T, d_s) / (B, T, d_t), labels (B, T), heads
    (V, d_s) / (V, d_t): pass the heads cut to the common vocabulary when they are padded to different sizes.
    `divergence(student_logits, target_logits)` is per position with the temperature bound (official
    `dist_func`); the s->t term is always forward KL (official code, both dual-space criteria)."""
    mask = labels != IGNORE_INDEX
    t2s_logits = t2s(teacher_hidden) @ student_head.detach().T  # (B, T, V)   D1: W^s frozen
    t2s_ce = cross_entropy_sum(t2s_logits, labels)  # D2
    t2s_kd = divergence_sum(divergence, student_logits, t2s_logits.detach(), mask)  # D3
    s2t_logits = s2t(student_hidden) @ teacher_head.detach().T  # (B, T, V)   D4
    s2t_kd = divergence_sum(_fkl(temperature), s2t_logits, teacher_logits, mask)  # D4
    correct = ((t2s_logits.argmax(-1) == labels) & mask).sum()
    return DualSpaceTerms(t2s_ce, t2s_kd, s2t_kd, correct)


def _fkl(temperature: float) -> Divergence:
    return lambda student, teacher: forward_kl(student, teacher, temperature)


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """N(a) = a / std(a), one std over the WHOLE tensor (all positions of the batch, padding included), as the
    official code does (`tensor / tensor.std()`)."""
    return x / x.std()


def cma_scores(
    query: torch.Tensor, key: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor
) -> torch.Tensor:
    """(C3) before the softmax: (B, T_s, k) x (B, T_t, k) -> (B, T_s, T_t) scores / sqrt(k), k = 2 d_t; pairs
    with a padded or prompt position on either side get MASKED added (official: + (1 - mask) * -1e5)."""
    scores = _up(query) @ _up(key).transpose(-1, -2) / math.sqrt(key.shape[-1])
    pair_mask = student_mask[:, :, None] & teacher_mask[:, None, :]
    return scores + (~pair_mask).to(scores.dtype) * MASKED


class CMATerms(NamedTuple):
    t2s_ce: torch.Tensor
    t2s_kd: torch.Tensor
    s2t_kd: torch.Tensor
    t2s_correct: torch.Tensor
    t2s_weights: torch.Tensor  # (B, T_s, T_t) a^{t->s}, rows sum to 1


def cma_terms(
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    student_index_embeds: torch.Tensor,
    student_labels: torch.Tensor,
    student_head: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_index_embeds: torch.Tensor,
    teacher_target_embeds: torch.Tensor,
    teacher_labels: torch.Tensor,
    teacher_head: torch.Tensor,
    query_projector: Callable[[torch.Tensor], torch.Tensor],
    t2s: Callable[[torch.Tensor], torch.Tensor],
    s2t: Callable[[torch.Tensor], torch.Tensor],
    divergence: Divergence,
    temperature: float,
) -> CMATerms:
    """(C1)-(C7). Student: logits (B, T_s, V_s), hidden (B, T_s, d_s), index embeddings [e(x); e(y)] (B, T_s, 2 d_s),
    labels (B, T_s), head (V_s, d_s). Teacher likewise with T_t, V_t, d_t, plus its target embeddings e^t(y)
    (B, T_t, d_t). Embeddings are frozen (detached by the caller); masked positions may hold any token's embedding.
    """
    student_mask, teacher_mask = student_labels != IGNORE_INDEX, teacher_labels != IGNORE_INDEX
    # in float32 at least, as the official code (`.float()`); float64 stays float64 for tests
    query = _up(query_projector(student_index_embeds))  # (B, T_s, 2 d_t)   C1
    key = _up(standardize(teacher_index_embeds))  # (B, T_t, 2 d_t)   C2
    teacher_values = _up(t2s(standardize(teacher_hidden) + standardize(teacher_target_embeds)))  # (B, T_t, d_s)
    student_values = _up(s2t(student_hidden))  # (B, T_s, d_t)
    scores = cma_scores(query, key, student_mask, teacher_mask)  # (B, T_s, T_t)
    t2s_weights = torch.softmax(scores, dim=-1)  # C3
    t2s_logits = (t2s_weights @ teacher_values) @ _up(student_head.detach()).T  # (B, T_s, V_s)   C4
    t2s_ce = cross_entropy_sum(t2s_logits, student_labels)  # C4 (as D2)
    correct = (t2s_logits.argmax(-1) == student_labels) & student_mask
    # C5: only where the projected teacher predicts the target (official: pad_mask * t2s_acc_mask)
    t2s_kd = divergence_sum(divergence, student_logits, t2s_logits.detach(), correct)
    s2t_weights = torch.softmax(scores.transpose(-1, -2), dim=-1)  # (B, T_t, T_s)   C6
    s2t_logits = (s2t_weights @ student_values) @ _up(teacher_head.detach()).T  # (B, T_t, V_t)
    s2t_kd = divergence_sum(_fkl(temperature), s2t_logits, teacher_logits, teacher_mask)  # C7
    return CMATerms(t2s_ce, t2s_kd, s2t_kd, correct.sum(), t2s_weights)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(U1) per position: L1 distance between the sorted probability vectors. (N, V_s) x (N, V_t) -> (N,).
    No temperature (the official ULD criterion takes a plain softmax)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    q = torch.softmax(student_logits.to(dtype), -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits.to(dtype), -1).sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def uld_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
) -> torch.Tensor:
    """(U1) summed: (B, T_s, V_s) x (B, T_t, V_t) x (B, T_s) x (B, T_t) -> scalar. In each example the k-th target
    position of the student is paired with the k-th of the teacher, for k < min(n_s, n_t); the official code gets
    the same pairs by rotating both sequences to start at their first target."""
    total = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    for row in range(student_logits.shape[0]):
        s_pos = (student_labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        t_pos = (teacher_labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        k = min(len(s_pos), len(t_pos))
        if k:
            total = total + uld_distance(student_logits[row, s_pos[:k]], teacher_logits[row, t_pos[:k]]).sum()
    return total

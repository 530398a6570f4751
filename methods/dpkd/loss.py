"""DPKD: Direct Preference Knowledge Distillation (Li, Gu, Dong, Wang, Cheng, Wei, 2024, arXiv 2406.19774;
official code microsoft/LMOps: dpkd/main.py, `get_distil_loss` with --seqKD-DPO).

p is the teacher, q_theta the student, x a prompt, y a completion; log q(y | x) sums over y's tokens.

Stage 1, the objective that defines the implicit reward r: reward regularized by the REVERSE KL to the teacher,

    max_q  E_{x, y ~ q(. | x)} [ r(x, y) ]  -  beta KL( q(. | x) || p(. | x) )
    whose optimum is q*(y | x) = p(y | x) exp(r(x, y) / beta) / Z(x), so
    r(x, y) = beta log q(y | x) / p(y | x) + beta log Z(x)                           (implicit reward, `implicit_reward`)

Stage 2, the teacher's output y_t preferred over the student's y_s (Bradley-Terry; Z(x) cancels):

    P(y_t > y_s | x) = sigmoid( r(x, y_t) - r(x, y_s) )
    L_DPKD = -E log sigmoid( beta log q(y_t | x) / p(y_t | x)  -  beta log q(y_s | x) / p(y_s | x) )   (`dpkd_loss`)

This is DPO's loss with the teacher as the reference model. Its gradient (with h the argument of the sigmoid)

    d L / d log q(y_t | x) = -beta sigmoid(-h) < 0,    d L / d log q(y_s | x) = +beta sigmoid(-h) > 0

raises the likelihood of the teacher's output relative to the student's, most where the student's implicit
reward still prefers its own output. The reverse KL appears only through stage 1: it is why the teacher is the
reference in the reward. The training objective adds a cross-entropy on the teacher's output (official script,
--kd-ratio 0.5):

    L = kd_ratio L_DPKD + (1 - kd_ratio) CE(y_t)

Two granularities (`--level`):
- sequence (the paper's equation): y_t a teacher sample, y_s the student's own sample for the same prompt, log q
  and log p summed over the completion; one preference term per prompt.
- token (the official code): on a teacher output, at every position, y_t = argmax p and y_s = argmax q of the
  next-token distributions given the same prefix (`greedy_token_preferences`); one preference term per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.losses import IGNORE_INDEX, shift_for_causal_lm


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probability of each target token and the validity mask, after the causal shift.

    (B, T, V) x (B, T) unshifted -> (B, T-1) float32+ log-probs (0 where invalid), (B, T-1) bool."""
    logits, shifted = shift_for_causal_lm(logits, labels)  # (B, T-1, V), (B, T-1)
    valid = shifted != IGNORE_INDEX
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return torch.where(valid, picked, torch.zeros_like(picked)), valid


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log q(y | x) = sum over y's target tokens of log q(y_n | y_<n, x). (B, T, V) x (B, T) -> (B,)."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(-1)


def implicit_reward(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) - beta log Z(x) = beta log q(y | x) / p(y | x). Any shape."""
    return beta * (student_logps - teacher_logps)


def dpkd_loss(
    student_chosen: torch.Tensor,
    student_rejected: torch.Tensor,
    teacher_chosen: torch.Tensor,
    teacher_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """-log sigmoid(beta log q(y_t)/p(y_t) - beta log q(y_s)/p(y_s)), elementwise: log-probs of the chosen
    (teacher) and rejected (student) outputs under student and teacher, any shape -> the same shape."""
    margin = implicit_reward(student_chosen, teacher_chosen, beta) - implicit_reward(
        student_rejected, teacher_rejected, beta
    )
    return -F.logsigmoid(margin)  # L_DPKD, per preference pair


def greedy_token_preferences(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official code's token-level pairs: at each position the teacher's argmax token is preferred over the
    student's. (..., V) x (..., V) -> log q(y_t), log q(y_s), log p(y_t), log p(y_s), each (...).

    Where both argmaxes agree the pair is a tie (margin 0, loss log 2, no gradient)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logq = F.log_softmax(student_logits.to(dtype), dim=-1)
    logp = F.log_softmax(teacher_logits.to(dtype), dim=-1)
    chosen = logp.argmax(-1, keepdim=True)  # y_t
    rejected = logq.detach().argmax(-1, keepdim=True)  # y_s: a choice, not a function to differentiate
    pick = lambda logprobs, index: logprobs.gather(-1, index).squeeze(-1)  # noqa: E731
    return pick(logq, chosen), pick(logq, rejected), pick(logp, chosen), pick(logp, rejected)

"""Delta-KD: Delta Knowledge Distillation for Large Language Models (Cao, Kang, Xing & Jiang, 2025, arXiv 2509.14526).

Token-level KD trains the student pi_theta towards a reference distribution pi_ref:

    L_KD    = E_x KL(pi_ref(. | x) || pi_theta(. | x))                          (paper, Sec. 2)
    L_total = lambda * L_SFT + (1 - lambda) * L_KD                               (paper, Sec. 2)

Plain KD takes pi_ref = pi_ft_t, the fine-tuned (SFT) teacher. Delta-KD keeps the teacher's SFT *shift* instead:
with the pretrained (base) student pi_raw_s, the base teacher pi_raw_t and the SFT teacher pi_ft_t, the reference
is the base student moved by the shift Delta = (teacher after SFT) - (teacher before SFT). What we could verify
of the paper's text (its abstract and Sec. 2 as quoted by third-party summaries) stops at "a generic shift
operator"; the operator itself we RECONSTRUCTED as the one that the "parallelogram" name and the abstract
describe, a shift in log space:

    log pi*_s = log_softmax( (log pi_raw_s + alpha * (log pi_ft_t - log pi_raw_t)) / tau )       (Delta target)

i.e. pi*_s  is proportional to  pi_raw_s * (pi_ft_t / pi_raw_t)^alpha. Log-probabilities and logits give the same
target (each differs from the other by a constant per position, which the log-softmax removes). alpha = 1 is the
full shift; alpha = 0 gives the base student itself; when the base student equals the base teacher (alpha = 1,
tau = 1) the target is the SFT teacher, i.e. Delta-KD reduces to plain KD. The target is a constant to the student
(all three models are frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def delta_target_logprobs(
    base_student_logits: torch.Tensor,
    base_teacher_logits: torch.Tensor,
    sft_teacher_logits: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi*_s (Delta target): three (..., V) logit tensors -> (..., V) log-probabilities, float32 or wider."""
    dtype = torch.promote_types(base_student_logits.dtype, torch.float32)
    raw_s = F.log_softmax(base_student_logits.detach().to(dtype), dim=-1)
    raw_t = F.log_softmax(base_teacher_logits.detach().to(dtype), dim=-1)
    ft_t = F.log_softmax(sft_teacher_logits.detach().to(dtype), dim=-1)
    shifted = raw_s + alpha * (ft_t - raw_t)  # Eq. (3): log pi_raw_s + alpha * Delta
    return F.log_softmax(shifted / temperature, dim=-1)  # Eq. (3): normalized pi*_s


def kl_to_target(student_logits: torch.Tensor, target_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(pi* || pi_theta) per position: (..., V) x (..., V) -> (...). Terms with pi* = 0 contribute 0."""
    log_student = F.log_softmax(student_logits.to(target_logprobs.dtype) / temperature, dim=-1)
    target = target_logprobs.exp()
    return torch.where(target > 0, target * (target_logprobs - log_student), torch.zeros_like(target)).sum(
        -1
    )  # Eq. (1)

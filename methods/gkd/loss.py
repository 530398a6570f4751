"""GKD: generalized knowledge distillation (Agarwal et al., "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", ICLR 2024), as TRL's GKDTrainer computes it
(huggingface/trl: trl/experimental/gkd/gkd_trainer.py, `generalized_jsd_loss` and `training_step`).

p is the teacher, q_theta the student, m the mixture; per position (sums over the vocabulary):

    JSD(beta)(p || q) = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q        Eq. (1)
                        beta = 0: KL(p || q) (forward),  beta = 1: KL(q || p) (reverse)  (TRL's convention)

The GKD objective mixes where the output sequences y come from (the paper's Algorithm 1):

    L_GKD = (1 - lmbda) E_{(x, y) ~ data} [D(y | x)]  +  lmbda E_{x ~ data, y ~ q_theta(. | x)} [D(y | x)]
    D(y | x) = sum over the positions n of y of JSD(beta)(p(. | y_<n, x) || q_theta(. | y_<n, x))

with no gradient through the sampling of y. TRL draws the source once per batch: with probability lmbda the
batch's completions are replaced by the student's samples (temperature 0.9); otherwise, with seq_kd, by the
teacher's; otherwise the data is used. The loss is averaged over all valid tokens of the batch (TRL divides by
the number of completion tokens, not per sequence).
"""

from __future__ import annotations

import torch

from core.losses import get_divergence
from core.objectives import word_level_kd_sum


def gkd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over valid target tokens of JSD(beta)(p || q), Eq. (1). (B, T, V) x (B, T, V) x (B, T) -> scalar.

    Inputs are unshifted: position t predicts labels[t + 1] (TRL shifts the same way); labels are -100 on the
    prompt and padding. The loss temperature is 1: TRL's compute_loss calls its JSD without a temperature (the
    configured temperature is the sampling temperature)."""
    jsd = get_divergence("jsd", temperature=1.0, beta=beta)  # Eq. (1) per position: core.losses.generalized_jsd
    # word-level KD with kd_ratio 1 is exactly this sum; its chunked path reads the unshifted logits in place
    total, _, _ = word_level_kd_sum(student_logits, teacher_logits, labels, jsd, kd_ratio=1.0, chunk_size=chunk_size)
    return total

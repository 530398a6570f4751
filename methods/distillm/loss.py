"""DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024).

Two parts (official code jongwooko/distillm: distillm/losses.py, finetune.py, distillm/sampler.py, buffer.py).

1. Skew divergences, p the teacher, q_theta the student, alpha the skew (0.1), per position:

    SKL_alpha(p, q)  = KL(p || alpha p + (1 - alpha) q)        skewed_forward_kl: lam * teacher + (1 - lam) * student
    SRKL_alpha(p, q) = KL(q || (1 - alpha) p + alpha q)        skewed_reverse_kl: (1 - lam) * teacher + lam * student

   (core.losses.skew_kl / skew_reverse_kl, Eq. (3) and (4) in core's numbering). alpha = 0 gives the plain
   forward / reverse KL. For alpha > 0 the mixture holds at least alpha of the distribution in front (m >= alpha p
   for SKL, m >= alpha q for SRKL), so both are at most log(1 / alpha) and stay finite where the plain KL is
   infinite (a token the teacher likes and the student gives zero mass).

2. Adaptive off-policy (`AdaptiveOffPolicy`, finetune.py's loop): each micro-batch draws a coin r ~ U(0, 1) and,
   with `threshold` the probability of training on student outputs (initially init_threshold, 0) and
   `sampling` = threshold * (1 - step / total_steps) (replay_ratio "decreasing", the default),

       r < sampling, or r < threshold while the buffer is not full  -> fresh student samples (also stored)
       else r < threshold                                           -> a draw from the replay buffer
       else                                                         -> the data batch

   and after every validation, with L the student's validation loss (token-mean cross-entropy on held-out
   ground truth) and L_ref the reference (the loss before training, then the loss at the last raise):

       L >= L_ref + loss_eps   ->   threshold <- min(threshold + 0.1, 1),  L_ref <- L

   (L_ref is NOT updated when the loss falls: a raise needs a rise of loss_eps over the last raise's level).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import ConfigError
from core.losses import get_divergence
from core.objectives import word_level_kd_sum

SKEWED = ("skl", "srkl")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
SOURCES = ("student", "replay", "data")


def distillm_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "skl",
    alpha: float = 0.1,
    kd_ratio: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - kd_ratio) CE + kd_ratio SKL/SRKL, summed over valid target tokens. (B, T, V) x (B, T, V) x (B, T)
    unshifted -> (total, CE sum, divergence sum). The official scripts use kd_ratio 1.0 (no CE)."""
    if divergence not in SKEWED:
        raise ConfigError(f"DistiLLM's divergence is skl or srkl, got {divergence!r}")
    skew = get_divergence(divergence, alpha=alpha)  # Eq. (3) skl / Eq. (4) srkl, per position
    return word_level_kd_sum(student_logits, teacher_logits, labels, skew, kd_ratio, chunk_size)


@dataclass
class AdaptiveOffPolicy:
    """The probability of training on student outputs and its validation-driven update (see the module docstring).

    A small stateful object: saved in checkpoints (MethodLoss.state) so a resumed run continues with the same
    threshold and reference loss."""

    init_threshold: float = 0.0
    loss_eps: float = 0.1
    step_size: float = 0.1  # hard-coded in the official loop (`adaptive_threshold += 0.1`)
    replay_ratio: str = "decreasing"
    threshold: float = field(init=False)
    reference_loss: float | None = field(init=False, default=None)  # None until the first validation

    def __post_init__(self) -> None:
        if not 0.0 <= self.init_threshold <= 1.0:
            raise ConfigError(f"--init-threshold must be in [0, 1], got {self.init_threshold}")
        if not self.loss_eps >= 0.0:
            raise ConfigError(f"--loss-eps must be non-negative, got {self.loss_eps}")
        if self.replay_ratio not in REPLAY_RATIOS:
            raise ConfigError(f"--replay-ratio must be one of {', '.join(REPLAY_RATIOS)}, got {self.replay_ratio!r}")
        self.threshold = self.init_threshold

    def sampling_threshold(self, step: int, total_steps: int) -> float:
        """The probability of fresh student samples at 1-based step `step` (official `samp_threshold`)."""
        if self.replay_ratio == "constant":
            return self.threshold * 0.5
        if self.replay_ratio == "increasing":
            return self.threshold * step / total_steps
        return self.threshold * (1.0 - step / total_steps)

    def choose(self, coin: float, step: int, total_steps: int, buffer_full: bool) -> str:
        """Where a micro-batch comes from: "student" (fresh samples), "replay" or "data". coin ~ U(0, 1)."""
        if coin < self.sampling_threshold(step, total_steps) or (coin < self.threshold and not buffer_full):
            return "student"
        if coin < self.threshold:
            return "replay"
        return "data"

    def update(self, val_loss: float) -> bool:
        """Read a validation loss; True when it raised the threshold. The first call only records the reference
        (the official loop evaluates once before training)."""
        if self.reference_loss is None:
            self.reference_loss = val_loss
            return False
        if val_loss >= self.reference_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.step_size, 1.0)
            self.reference_loss = val_loss
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        ref = state["reference_loss"]
        self.reference_loss = None if ref is None else float(ref)

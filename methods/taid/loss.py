"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025).

The student q_theta is trained towards an intermediate distribution that moves from the student itself to
the teacher p as the interpolation parameter t grows from t_start to t_end:

    p_t(y | s) = softmax((1 - t) * stopgrad(logit_q(y | s)) + t * logit_p(y | s))      the intermediate target
    J_TAID(theta) = (1/N) sum_{valid positions} KL(p_t || q_theta)                    the TAID objective

(official code SakanaAI/TAID, src/distil_losses/taid.py, `TAID.compute_loss`), and t follows an adaptive,
monotone schedule (the same file, `TAID.update_t`):

    rel   = (L_prev - L) / (L_prev + 1e-15)                 relative change of the loss
    m    <- beta * m + (1 - beta) * rel                      momentum
    delta = alpha * sigmoid(m) * (1 - t)
    t    <- min(t_end, max(t_start + (t_end - t_start) * step / total_steps, t + delta))

The first call only records L. The interpolation is in logit space, with the student's logits detached (no
gradient flows through the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import ConfigError


def interpolated_target_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t = log_softmax((1 - t) * stopgrad(student) + t * teacher). (..., V) -> (..., V), float32+."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    mixed = (1.0 - t) * student_logits.detach().to(dtype) + t * teacher_logits.to(dtype)
    return F.log_softmax(mixed, dim=-1)


def taid_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (KL(p_t || q), cross-entropy -sum p_t log q). (..., V) x (..., V) -> (...), (...).

    The two differ by the entropy H(p_t), which carries no gradient (p_t is a constant to the student); the
    official code returns the cross-entropy."""
    log_target = interpolated_target_logprobs(student_logits, teacher_logits, t)
    log_student = F.log_softmax(student_logits.to(log_target.dtype), dim=-1)
    target = log_target.exp()
    cross_entropy = -(target * log_student).sum(-1)
    kl = (target * (log_target - log_student)).sum(-1)  # the TAID objective, per position
    return kl, cross_entropy


@dataclass
class TAIDSchedule:
    """The adaptive interpolation parameter t (official `TAID.update_t`). A small stateful object: saved in checkpoints so a
    resumed run continues with the same t, momentum and previous loss."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    t: float = field(init=False)
    momentum: float = field(init=False, default=0.0)
    prev_loss: float = field(init=False, default=math.inf)

    def __post_init__(self) -> None:
        check_schedule(self.t_start, self.t_end, self.alpha, self.beta)
        self.t = self.t_start

    def linear(self, step: int, total_steps: int) -> float:
        """The floor t_start + (t_end - t_start) * step / total_steps (reaches t_end at step = total_steps)."""
        return self.t_start + (self.t_end - self.t_start) * step / total_steps

    def update(self, loss: float, step: int, total_steps: int) -> float:
        """Update t after optimizer step `step` (0-based, as the official code's global_step) with loss value L.

        Returns delta (0 on the first call, which only records L)."""
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return 0.0
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        delta = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        floor = self.linear(step, total_steps)
        self.t = min(self.t_end, max(floor, self.t + delta)) if self.adaptive else floor
        self.prev_loss = loss
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.momentum, self.prev_loss = float(state["t"]), float(state["momentum"]), float(state["prev_loss"])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def check_schedule(t_start: float, t_end: float, alpha: float, beta: float) -> None:
    """The official code's asserts, as errors that say which setting is wrong."""
    if not 0.0 <= t_start < 1.0:
        raise ConfigError(f"--t-start must be in [0, 1), got {t_start}")
    if not 0.0 < t_end <= 1.0:
        raise ConfigError(f"--t-end must be in (0, 1], got {t_end}")
    if t_start > t_end:
        raise ConfigError(f"--t-start ({t_start}) must not exceed --t-end ({t_end})")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"--beta must be in [0, 1), got {beta}")

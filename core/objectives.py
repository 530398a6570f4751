"""Training objectives as the loop calls them, `loss_fn(model, batch) -> LossOutput` (summed over valid target
tokens; core.train normalizes): SFT, and word-level KD with any core divergence. Every method compares against
these, so they live here rather than in a method package.

Word-level KD (Hinton et al., 2015; the KD baseline of MiniLLM, DistiLLM, TAID and DSKD):

    L = (1 - kd_ratio) * (1/N) sum_t -log q(y_t | y_<t, x)  +  kd_ratio * (1/N) sum_t D(p_t || q_t)
"""

from __future__ import annotations

import torch

from core.losses import Divergence, cross_entropy_sum, divergence_sum, shift_for_causal_lm
from core.train import LossOutput


def causal_lm_loss(model, batch) -> LossOutput:
    """Supervised fine-tuning: summed NLL of the target tokens (prompt and padding are masked)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logits, labels = shift_for_causal_lm(logits, batch["labels"])
    return LossOutput(cross_entropy_sum(logits, labels))


def word_level_kd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, V) x (B, T, V) x (B, T) unshifted -> (total sum, CE sum, divergence sum) over valid target tokens."""
    student_logits, shifted = shift_for_causal_lm(student_logits, labels)  # (B, T-1, V), (B, T-1)
    teacher_logits = teacher_logits[:, :-1, :]
    mask = shifted != -100
    if kd_ratio < 1.0:
        ce = cross_entropy_sum(student_logits, shifted)
    else:
        ce = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    kd = divergence_sum(divergence, student_logits, teacher_logits, mask, chunk_size)
    return (1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def teacher_forward(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen teacher's logits (B, T, V), without building a graph."""
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def make_kd_loss(
    teacher: torch.nn.Module, divergence: Divergence, kd_ratio: float = 1.0, chunk_size: int | None = None
):
    """Word-level KD as a loop objective: the frozen teacher and the student see the same batch."""

    def loss_fn(model, batch) -> LossOutput:
        teacher_logits = teacher_forward(teacher, batch)
        student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, ce, kd = word_level_kd_sum(
            student_logits, teacher_logits, batch["labels"], divergence, kd_ratio, chunk_size
        )
        n = max(int((batch["labels"][:, 1:] != -100).sum()), 1)
        return LossOutput(total, {"ce": ce.item() / n, "kd": kd.item() / n})

    return loss_fn

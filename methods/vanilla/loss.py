"""Word-level knowledge distillation (Hinton et al., 2015; as used for LLMs by MiniLLM and DistiLLM).

    L = (1 - kd_ratio) * L_CE(y | x) + kd_ratio * (1 / N) sum_{t valid} D(p_t || q_t)

where p_t is the teacher's and q_t the student's next-token distribution at target position t, D is one of the
core divergences (core/losses.py) and N the number of valid target tokens. The loop (core/train.py) divides the
returned sum by N over the whole optimizer step, so this function returns the summed form.
"""

from __future__ import annotations

import torch

from core.losses import Divergence, cross_entropy_sum, divergence_sum, shift_for_causal_lm
from core.train import LossOutput


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
    ce = (
        cross_entropy_sum(student_logits, shifted)
        if kd_ratio < 1.0
        else student_logits.new_zeros((), dtype=torch.float32)
    )
    kd = divergence_sum(divergence, student_logits, teacher_logits, mask, chunk_size)
    return (1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def make_kd_loss(teacher: torch.nn.Module, divergence: Divergence, kd_ratio: float, chunk_size: int | None = None):
    """The training loss for core.train: runs the frozen teacher and the student on the same batch."""

    def loss_fn(model, batch) -> LossOutput:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, ce, kd = word_level_kd_sum(
            student_logits, teacher_logits, batch["labels"], divergence, kd_ratio, chunk_size
        )
        n = max(int((batch["labels"][:, 1:] != -100).sum()), 1)
        return LossOutput(total, {"ce": ce.item() / n, "kd": kd.item() / n})

    return loss_fn

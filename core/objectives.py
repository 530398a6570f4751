"""Training objectives as the loop calls them, `loss_fn(model, batch) -> LossOutput` (summed over valid target
tokens; core.train normalizes): SFT, and word-level KD with any core divergence. Every method compares against
these, so they live here rather than in a method package.

Word-level KD (Hinton et al., 2015; the KD baseline of MiniLLM, DistiLLM, TAID and DSKD):

    L = (1 - kd_ratio) * (1/N) sum_t -log q(y_t | y_<t, x)  +  kd_ratio * (1/N) sum_t D(p_t || q_t)

`make_kd_loss` evaluates it in one of four ways, all with the same value and gradient (tests/core/test_fused.py):
- plain (default): full logits of both models, the divergence over the valid positions;
- `chunk_size=C`: full logits, the loss and its gradient C positions at a time (core.fused);
- `fused=True`: no full logits at all: the final hidden states of both models are projected through their output
  heads C positions at a time, at valid (completion) positions only (core.fused);
- `teacher_cache=...`: the teacher is not run; its top-k log-probabilities come from core.logit_cache (with a
  sampled tail: unbiased forward KL only; without: the tail as one bucket, see core.losses), with either student path.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.fused import LinearHead, SparseTeacher, divergence_sum, fused_kd_sums
from core.losses import IGNORE_INDEX, Divergence, cross_entropy_sum, shift_for_causal_lm
from core.train import LossOutput


def causal_lm_loss(model, batch) -> LossOutput:
    """Supervised fine-tuning: summed NLL of the target tokens (prompt and padding are masked).

    Where the model allows it (`projects_from_hidden`: a causal LM whose logits are its last hidden state times a
    linear head), the head projects only the valid target positions, as the fused KD path does: the same value and
    gradient without the prompt's and padding's logits (on SmolLM2's 49,152-token head the projection and its
    gradient are most of a small student's step). Other models take the full logits."""
    if projects_from_hidden(model):
        return LossOutput(fused_cross_entropy_sum(model, batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logits, labels = shift_for_causal_lm(logits, batch["labels"])
    return LossOutput(cross_entropy_sum(logits, labels))


def fused_cross_entropy_sum(model, batch) -> torch.Tensor:
    """Summed NLL of the valid target tokens, projecting the logits of those positions only (N x V, not B x T x V)."""
    signal = final_hidden_and_head(model, batch)
    mask, targets = shifted_targets(batch["labels"])
    logits = F.linear(signal.hidden[mask], signal.weight, signal.bias)  # (N, V)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[mask], reduction="sum")


def projects_from_hidden(model: torch.nn.Module) -> bool:
    """Whether final_hidden_and_head can serve `model`: its forward takes `logits_to_keep`, its head is a
    torch.nn.Linear and its config sets no logit soft-capping (a model that passes these and still scales its
    logits is caught by final_hidden_and_head's check on every batch)."""
    core = _unwrap(model)
    return (
        "logits_to_keep" in inspect.signature(core.forward).parameters
        and hasattr(core, "get_output_embeddings")
        and isinstance(core.get_output_embeddings(), torch.nn.Linear)
        and not getattr(getattr(core, "config", None), "final_logit_softcapping", None)
    )


def word_level_kd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, V) x (B, T, V) x (B, T) unshifted -> (total sum, CE sum, divergence sum) over valid target tokens."""
    if chunk_size is not None:  # unshifted logits and a shifted mask: no second tokens x V gradient for a slice
        mask, targets = shifted_targets(labels)
        sums = fused_kd_sums(student_logits, teacher_logits, mask, divergence, targets, kd_ratio, chunk_size)
        return sums.total, sums.ce, sums.kd
    student_logits, shifted = shift_for_causal_lm(student_logits, labels)  # (B, T-1, V), (B, T-1)
    teacher_logits = teacher_logits[:, :-1, :]
    mask = shifted != IGNORE_INDEX
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


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unshifted labels (B, T) -> (mask, targets), both (B, T): position t is valid when it predicts a label
    (labels[t + 1] != -100), and its target is that label. The last position predicts nothing."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)  # ignored positions get a dummy id; only valid ones are read
    return mask, targets


def final_hidden_and_head(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LinearHead:
    """The final hidden states (B, T, H) and output head of a causal LM, without computing the full logits.

    The model is called through its own forward (so DDP and other wrappers see it) with `output_hidden_states`
    and `logits_to_keep=1`: the head runs on the last position only. That one position checks, on every batch,
    that the logits are a plain linear function of the last hidden state (no soft-capping or scaling)."""
    core = _unwrap(model)
    if "logits_to_keep" not in inspect.signature(core.forward).parameters:
        raise ConfigError(
            f"fused KD needs a causal LM whose forward takes logits_to_keep; {type(core).__name__} does not "
            "(use the unfused path: fused=False, optionally with chunk_size)"
        )
    if getattr(getattr(core, "config", None), "final_logit_softcapping", None):
        raise ConfigError(
            f"{type(core).__name__} soft-caps its logits; fused KD would be wrong for it: use fused=False"
        )
    head = core.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"fused KD needs a linear output head; {type(core).__name__} has {type(head).__name__}")
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1]  # (B, T, H), after the final norm
    with torch.no_grad():
        recomputed = F.linear(hidden[:, -1:], head.weight, head.bias).to(out.logits.dtype)  # (B, 1, V)
        # 1e-3, or two units in the last place of bf16 logits (under --precision bf16 another kernel may round the
        # same product one ulp apart: 2^-7 relative); soft-capping or a scale moves logits by far more
        tol = max(1e-3, 2 * torch.finfo(out.logits.dtype).eps)
        # Non-finite logits (weights blown up) are not a head that differs: the loss is then non-finite too, and the
        # loop stops naming the step, as for any other non-finite loss.
        if torch.isfinite(out.logits).all() and not torch.allclose(recomputed, out.logits, rtol=tol, atol=tol):
            raise ConfigError(
                f"{type(core).__name__}'s logits are not hidden_states[-1] @ lm_head.weight.T (soft-capping, scaling "
                "or a final norm outside the hidden states); fused KD would be wrong for it: use fused=False"
            )
    return LinearHead(hidden, head.weight, head.bias)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and similar wrappers
        model = model.module
    return model


def make_kd_loss(
    teacher: torch.nn.Module | None,
    divergence: Divergence,
    kd_ratio: float = 1.0,
    chunk_size: int | None = None,
    fused: bool = False,
    teacher_cache=None,
):
    """Word-level KD as a loop objective: the frozen teacher and the student see the same batch.

    chunk_size: evaluate the loss this many valid positions at a time (core.fused; None: all at once, or an automatic
    size of about 2^24 logits per chunk when `fused`). fused: project both models' logits from their final hidden
    states chunk by chunk at valid positions only, so no full logits exist. teacher_cache: a
    core.logit_cache.TeacherLogitCache built for this teacher and data; the teacher is then never run (pass
    teacher=None) and the divergence sees the cached top-k with the tail as one bucket, or, for a cache with a
    sampled tail, forward KL is estimated without bias (core.losses.sampled_forward_kl)."""
    if teacher is None and teacher_cache is None:
        raise ConfigError("make_kd_loss needs a teacher or a teacher_cache")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    if teacher_cache is not None:
        teacher_cache.check_divergence(divergence)
    plain = not fused and chunk_size is None and teacher_cache is None

    def loss_fn(model, batch) -> LossOutput:
        n = max(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1)
        if plain:
            teacher_logits = teacher_forward(teacher, batch)
            student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total, ce, kd = word_level_kd_sum(
                student_logits, teacher_logits, batch["labels"], divergence, kd_ratio, chunk_size
            )
            return LossOutput(total, {"ce": ce.item() / n, "kd": kd.item() / n})
        mask, targets = shifted_targets(batch["labels"])
        target: torch.Tensor | LinearHead | SparseTeacher
        if teacher_cache is not None:
            target = teacher_cache.sparse_teacher(batch, mask)
        elif fused:
            with torch.no_grad():
                target = final_hidden_and_head(teacher, batch)
        else:
            target = teacher_forward(teacher, batch)
        if fused:
            student: torch.Tensor | LinearHead = final_hidden_and_head(model, batch)
        else:
            student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = fused_kd_sums(student, target, mask, divergence, targets, kd_ratio, chunk_size)
        return LossOutput(sums.total, {"ce": sums.ce.item() / n, "kd": sums.kd.item() / n})

    return loss_fn

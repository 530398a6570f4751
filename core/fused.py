"""Memory-efficient KD losses over large vocabularies: chunked, fused with the output heads, or on a sparse teacher.

Distillation cost is dominated by tensors of shape tokens x vocab (logits, probabilities and their gradients).
Everything here evaluates the loss `chunk_size` valid positions at a time and computes the gradient of each
chunk INSIDE the forward pass (an `autograd.Function` that keeps only the finished gradient), so:

- `chunked_divergence_sum` (from logits): no float32 probability tensor of the whole sequence, no gathered copy of
  the valid rows and no recomputation in the backward pass; what stays alive is the gradient of the student logits
  (tokens x V, as in any path that starts from logits) and one chunk's temporaries (chunk x V);
- `fused_kd_sums` with `LinearHead` inputs: the logits of student AND teacher are projected from the final hidden
  states chunk by chunk, only at positions that count (completion tokens). The full logits never exist; what stays
  alive is the gradient of the student's hidden states (tokens x H) and head weight (V x H);
- a `SparseTeacher` (top-k log-probabilities and the remaining mass, e.g. from core.logit_cache) replaces the teacher
  logits in any of the above.

The value and the gradient equal the plain path (tests/core/test_fused.py checks it in float64 for every divergence
in core.losses.DIVERGENCES, with masks and temperature). Forward and reverse KL (with the optional cross-entropy)
use their closed-form gradients, which need fewer passes over a chunk; every other divergence is differentiated
with autograd on a detached copy of the chunk's student logits, so any divergence with the core signature works.

Limits: the stored gradient is for a scalar loss and a first-order backward (no double backward); the fused path
assumes a plain linear output head, `logits = hidden @ W.T + b` (make_kd_loss checks it on every batch and refuses
heads with soft-capping or scaling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.losses import (
    Divergence,
    divergence_temperature,
    forward_kl,
    reverse_kl,
    sampled_forward_kl,
    sparse_divergence,
)

# Positions per chunk when none is given: about 2^24 logits per chunk (64 MB in float32), e.g. 110 positions at a
# vocabulary of 151,936 and 2,048 at 8,192.
CHUNK_ELEMENTS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab_size, 1))


@dataclass
class LinearHead:
    """Final hidden states and the output head that turns them into logits: logits = hidden @ weight.T + bias.

    hidden (B, T, H), weight (V, H), bias (V,) or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


@dataclass
class SparseTeacher:
    """The teacher at the N valid positions of a batch, in row-major order of the mask (as `mask.nonzero()`):
    its top-k log-probabilities (N, k), their token ids (N, k) and the log of the remaining mass (N,) (-inf when
    k is the whole vocabulary). Log-probabilities are at the divergence's temperature (core.logit_cache records it).
    A sampled tail adds m ids drawn from the teacher's tail (N, m) and its entropy (N,): then the loss is the
    unbiased forward KL of core.losses.sampled_forward_kl, and only forward KL is accepted."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail_logprob: torch.Tensor
    sample_ids: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.logprobs.shape[0]


Student = torch.Tensor | LinearHead  # logits (B, T, V), or hidden states and head
Teacher = torch.Tensor | LinearHead | SparseTeacher


@dataclass
class KDSums:
    """Sums over the valid positions: total = (1 - kd_ratio) * ce + kd_ratio * kd (only `total` has a gradient)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def divergence_sum(
    divergence: Divergence,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of the divergence over valid positions. (B, T, V) x (B, T, V) x (B, T) -> scalar.

    With `chunk_size`, the valid positions are processed `chunk_size` at a time (chunked_divergence_sum): each chunk's
    gradient is computed in the forward pass and only the gradient is kept, so the float32 probability tensors
    alive at once are chunk x V rather than tokens x V, valid rows are never gathered into a copy, and nothing is
    recomputed in the backward pass. The value and gradient equal the plain path.
    """
    if chunk_size is not None:
        return chunked_divergence_sum(divergence, student_logits, teacher_logits, mask, chunk_size)
    flat_mask = mask.reshape(-1).bool()
    student = student_logits.reshape(-1, student_logits.shape[-1])[flat_mask]  # (N, V), valid positions only
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[flat_mask]  # (N, V)
    return divergence(student, teacher).sum()


def chunked_divergence_sum(
    divergence: Divergence,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of the divergence over valid positions, chunk by chunk. (B, T, V) x (B, T, V) x (B, T) -> scalar.

    Same value and gradient as `core.losses.divergence_sum`. Pass the model's logits as they are (not a shifted
    slice, which would make autograd allocate a second tokens x V gradient); shift the mask instead."""
    return fused_kd_sums(student_logits, teacher_logits, mask, divergence, chunk_size=chunk_size).total


def fused_divergence_sum(
    divergence: Divergence,
    student: LinearHead,
    teacher: LinearHead | SparseTeacher,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of the divergence over valid positions, projecting the logits from hidden states chunk by chunk.

    Gradients flow to `student.hidden`, `student.weight` and `student.bias`; the teacher gets none."""
    return fused_kd_sums(student, teacher, mask, divergence, chunk_size=chunk_size).total


def sparse_divergence_sum(
    divergence: Divergence,
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over valid positions of the divergence between the student and a top-k teacher (tail as one bucket)."""
    return fused_kd_sums(student_logits, teacher, mask, divergence, chunk_size=chunk_size).total


def fused_kd_sums(
    student: Student,
    teacher: Teacher,
    mask: torch.Tensor,
    divergence: Divergence,
    labels: torch.Tensor | None = None,
    kd_ratio: float = 1.0,
    chunk_size: int | None = None,
) -> KDSums:
    """Word-level KD summed over the valid positions of `mask` (B, T), evaluated `chunk_size` positions at a time.

    kd = sum_valid D(p_t || q_t); ce = sum_valid -log q(labels_t) (computed only when kd_ratio < 1; `labels` (B, T)
    are the targets of each position, already shifted); total = (1 - kd_ratio) * ce + kd_ratio * kd.
    `student` and `teacher` are logits (B, T, V) or a `LinearHead`; the teacher may also be a `SparseTeacher`."""
    mask = mask.bool()
    batch_idx, pos_idx = mask.nonzero(as_tuple=True)  # (N,), (N,): row-major, as SparseTeacher expects
    n = batch_idx.shape[0]
    if isinstance(teacher, SparseTeacher) and len(teacher) != n:
        raise ValueError(f"the sparse teacher has {len(teacher)} positions but the mask has {n} valid ones")
    vocab = student.vocab_size if isinstance(student, LinearHead) else student.shape[-1]
    chunk = chunk_size or default_chunk_size(vocab)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}")
    use_ce = kd_ratio < 1.0
    if use_ce and labels is None:
        raise ValueError("kd_ratio < 1 mixes in the cross-entropy, which needs labels")
    targets = labels[batch_idx, pos_idx] if use_ce else None  # (N,)

    def teacher_chunk(start: int, end: int) -> torch.Tensor | SparseTeacher:
        b, t = batch_idx[start:end], pos_idx[start:end]
        if isinstance(teacher, SparseTeacher):
            sampled = (teacher.sample_ids, teacher.entropy) if teacher.sample_ids is not None else ()
            return SparseTeacher(
                teacher.logprobs[start:end],
                teacher.indices[start:end],
                teacher.tail_logprob[start:end],
                *(column[start:end] for column in sampled),
            )
        if isinstance(teacher, LinearHead):
            with torch.no_grad():
                return F.linear(teacher.hidden[b, t], teacher.weight, teacher.bias)  # (c, V)
        return teacher[b, t].detach()  # (c, V)

    analytic = _closed_form(divergence)

    def chunk_loss(student_logits: torch.Tensor, start: int, end: int, need_grad: bool) -> ChunkResult:
        """(loss, ce, kd, d loss / d student_logits) of one chunk; student_logits (c, V)."""
        target = teacher_chunk(start, end)
        if analytic is not None and not isinstance(target, SparseTeacher):
            return _closed_form_chunk(analytic, student_logits, target, targets, start, end, kd_ratio, need_grad)
        with torch.enable_grad():  # autograd.Function.forward runs with grad disabled
            leaf = student_logits.detach().requires_grad_(need_grad)
            if isinstance(target, SparseTeacher) and target.sample_ids is not None:
                if analytic is None or analytic[0] != "fkl":
                    raise ValueError("a sparse teacher with a sampled tail serves forward KL only")
                kd = sampled_forward_kl(
                    leaf, target.logprobs, target.indices, target.tail_logprob, target.sample_ids, target.entropy,
                    analytic[1],
                ).sum()  # fmt: skip
            elif isinstance(target, SparseTeacher):
                kd = sparse_divergence(divergence, leaf, target.logprobs, target.indices, target.tail_logprob).sum()
            else:
                kd = divergence(leaf, target).sum()
            if use_ce:
                ce = F.cross_entropy(leaf.to(_acc_dtype(leaf)), targets[start:end], reduction="sum")
            else:
                ce = torch.zeros((), dtype=kd.dtype, device=kd.device)
            loss = (1.0 - kd_ratio) * ce + kd_ratio * kd
            grad = torch.autograd.grad(loss, leaf)[0] if need_grad else None
        return loss.detach(), ce.detach(), kd.detach(), grad

    parts: list[torch.Tensor] = []  # [ce, kd], filled by the forward pass
    if isinstance(student, LinearHead):
        total = _FusedHeadLoss.apply(
            student.hidden, student.weight, student.bias, chunk_loss, batch_idx, pos_idx, chunk, parts
        )
    else:
        total = _ChunkedLogitsLoss.apply(student, chunk_loss, batch_idx, pos_idx, chunk, parts)
    return KDSums(total, parts[0], parts[1])


# ----------------------------------------------------------------------------------------------------------------
# The engine: value and gradient chunk by chunk in the forward pass, only the gradient kept for the backward
# ----------------------------------------------------------------------------------------------------------------

ChunkResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
ChunkLoss = Callable[[torch.Tensor, int, int, bool], ChunkResult]


def _closed_form(divergence: Divergence) -> tuple[str, float] | None:
    """("fkl" | "rkl", temperature) when the divergence is forward or reverse KL, whose gradients have a closed form
    that needs fewer chunk x V passes than autograd; None for every other divergence (autograd on the chunk)."""
    func = getattr(divergence, "func", divergence)
    name = {forward_kl: "fkl", reverse_kl: "rkl"}.get(func)
    return None if name is None else (name, divergence_temperature(divergence))


def _closed_form_chunk(analytic, student_logits, teacher_logits, targets, start, end, kd_ratio, need_grad):
    """Value and gradient of (1 - kd_ratio) CE + kd_ratio D for D = FKL or RKL, z = logits / T, q = softmax(z):
        FKL = sum p (log p - log q),   dFKL/dz = q - p
        RKL = sum q (log q - log p),   dRKL/dz_k = q_k (log q_k - log p_k - RKL)
        CE  = -log q(y) at T = 1,      dCE/dlogits = softmax(logits) - onehot(y)
    and d/dlogits = d/dz / T. Terms with p = 0 (teacher logit -inf) count 0 in FKL, as in core.losses."""
    name, temperature = analytic
    dtype = _acc_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (c, V)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (c, V)
    if name == "fkl":
        p = log_p.exp()
        diff = (log_p - log_q).masked_fill_(p == 0, 0.0)
        kd = (p * diff).sum()
        grad = log_q.exp().sub_(p).div_(temperature) if need_grad else None
    else:
        q = log_q.exp()
        diff = log_q - log_p
        per_row = (q * diff).sum(-1, keepdim=True)  # (c, 1)
        kd = per_row.sum()
        grad = diff.sub_(per_row).mul_(q).div_(temperature) if need_grad else None
    if grad is not None:
        grad.mul_(kd_ratio)
    ce = torch.zeros((), dtype=dtype, device=student_logits.device)
    if kd_ratio < 1.0:
        log_q1 = log_q if temperature == 1.0 else F.log_softmax(student_logits.to(dtype), dim=-1)
        labels = targets[start:end].unsqueeze(-1)  # (c, 1)
        ce = -log_q1.gather(-1, labels).sum()
        if grad is not None:
            ce_grad = log_q1.exp().scatter_add_(
                -1, labels, torch.full(labels.shape, -1.0, dtype=dtype, device=labels.device)
            )
            grad.add_(ce_grad, alpha=1.0 - kd_ratio)
    loss = (1.0 - kd_ratio) * ce + kd_ratio * kd
    return loss, ce, kd, grad


def _finish(parts: list[torch.Tensor], totals: list[torch.Tensor]) -> torch.Tensor:
    parts.extend(totals[1:])
    return totals[0]


class _ChunkedLogitsLoss(torch.autograd.Function):
    """Loss of student logits (B, T, V); the gradient (B, T, V) is built chunk by chunk during the forward pass."""

    @staticmethod
    def forward(ctx, student_logits, chunk_loss, batch_idx, pos_idx, chunk, parts):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student_logits) if need_grad else None  # (B, T, V); masked rows stay 0
        acc = _zeros(3, student_logits)
        for start in range(0, batch_idx.shape[0], chunk):
            end = min(start + chunk, batch_idx.shape[0])
            b, t = batch_idx[start:end], pos_idx[start:end]
            values = chunk_loss(student_logits[b, t], start, end, need_grad)  # (c, V) copy
            acc = _accumulate(acc, values[:3])
            if need_grad:
                grad[b, t] = values[3].to(grad.dtype)
        ctx.grad = grad
        return _finish(parts, list(acc))

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        _check_once(ctx, "grad")
        grad = _scaled(ctx.grad, grad_output)
        ctx.grad = None
        return grad, None, None, None, None, None


class _FusedHeadLoss(torch.autograd.Function):
    """Loss of logits = hidden @ weight.T + bias, projected chunk by chunk at valid positions only.

    Gradients: d/d hidden[b, t] = g @ weight; d/d weight = sum_chunks g.T @ hidden[b, t]; d/d bias = sum g."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, batch_idx, pos_idx, chunk, parts):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (B, T, H)
        grad_weight = torch.zeros_like(weight, dtype=_acc_dtype(weight)) if need_weight else None  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=_acc_dtype(bias)) if need_bias else None  # (V,)
        acc = _zeros(3, hidden)
        for start in range(0, batch_idx.shape[0], chunk):
            end = min(start + chunk, batch_idx.shape[0])
            b, t = batch_idx[start:end], pos_idx[start:end]
            rows = hidden[b, t]  # (c, H)
            logits = F.linear(rows, weight, bias)  # (c, V): the only logits that ever exist
            loss, ce, kd, g = chunk_loss(logits, start, end, need_grad)
            acc = _accumulate(acc, (loss, ce, kd))
            if not need_grad:
                continue
            if need_hidden:
                grad_hidden[b, t] = (g.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, H)
            if need_weight:
                grad_weight.addmm_(g.t().to(grad_weight.dtype), rows.to(grad_weight.dtype))  # (V, H)
            if need_bias:
                grad_bias.add_(g.sum(0).to(grad_bias.dtype))
        ctx.grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return _finish(parts, list(acc))

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        _check_once(ctx, "grads")
        grads = tuple(_scaled(g, grad_output) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None, None)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate over chunks in at least float32 (a bf16 head gets a float32 running sum)."""
    return torch.promote_types(t.dtype, torch.float32)


def _zeros(n: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros((), dtype=_acc_dtype(like), device=like.device) for _ in range(n))


def _accumulate(acc: tuple[torch.Tensor, ...], values) -> tuple[torch.Tensor, ...]:
    return tuple(a + v.to(a.dtype) for a, v in zip(acc, values))


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """The stored gradient times the incoming scalar (the loop's 1 / token count), in place: the stored tensor is
    handed over and never used again, so no second tokens x V tensor is allocated."""
    if grad is None:
        return None
    if grad_output.numel() == 1 and bool(grad_output == 1):
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


def _check_once(ctx, name: str) -> None:
    if getattr(ctx, name) is None:
        raise RuntimeError(
            "the chunked/fused KD loss keeps its gradient for one backward pass only; recompute the loss instead of "
            "calling backward through it twice (retain_graph)"
        )

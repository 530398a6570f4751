"""Token-level divergences between a teacher distribution p and a student distribution q over the vocabulary.

Conventions (every function here):
- inputs are logits `(..., V)`; log-softmax is taken in float32 after dividing by `temperature`;
- p is the teacher, q the student; each function returns the per-position divergence `(...)`;
- `masked_mean` / `masked_sum` reduce by the number of valid tokens, never by the batch;
- no T^2 factor is applied (the LLM-distillation papers in this project use T = 1; Hinton et al. multiply by
  T^2 to keep gradient scale when T > 1: do that at the call site if you want it).

Definitions (x is one position, sums run over the vocabulary):
    FKL(p, q)        = sum p (log p - log q)                                   forward KL, mode-covering
    RKL(p, q)        = sum q (log q - log p)                                   reverse KL, mode-seeking
    JSD_beta(p, q)   = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                       (TRL's GKD convention; beta = 0 and beta = 1 are defined as FKL and RKL, the limits of
                       JSD_beta / beta and JSD_beta / (1 - beta))
    TVD(p, q)        = 1/2 sum |p - q|
    SKL_alpha(p, q)  = KL(p || alpha p + (1 - alpha) q)                        DistiLLM, Eq. (3)
    SRKL_alpha(p, q) = KL(q || (1 - alpha) p + alpha q)                        DistiLLM, Eq. (4)
The skew orders follow DistiLLM's official losses.py (skewed_forward_kl / skewed_reverse_kl); alpha = 0 gives
FKL and RKL. Unlike that code, which returns the cross-entropy -sum p log m for SKL and FKL, we return the KL
itself (the teacher entropy is added back): the gradient is the same and the value is 0 at p = q.

A sparse teacher (its top-k log-probabilities and the log of the mass left over, as core.logit_cache stores them)
is compared with the student on k + 1 buckets: the k teacher tokens one by one, and everything else as ONE tail
bucket, whose student mass is the student's probability outside the teacher's top-k (`sparse_divergence`). We
do not renormalize the teacher on its top-k while the student keeps the full vocabulary: that would compare
distributions on different supports and pull the student's tail mass to zero. Bucketing is a coarse-graining, so
every divergence here on the buckets is at most its value on the full vocabulary, equal to it when k = V, and 0
when the student matches the teacher on the top-k tokens and on the tail mass. A sparse teacher that also holds m
ids sampled from its tail and its entropy gives forward KL without bias instead (`sampled_forward_kl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

# The label of a position that is not a target (prompt, padding): torch's cross_entropy default ignore_index.
IGNORE_INDEX = -100

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax in at least float32 (bf16/fp16 logits are upcast; float64 stays float64 for tests)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities; terms where p = 0 contribute 0 (xlogy convention)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space."""
    if weight_p <= 0.0:
        return logq
    if weight_p >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q): (..., V) x (..., V) -> (...)."""
    return kl_from_logprobs(_logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(q || p): (..., V) x (..., V) -> (...)."""
    return kl_from_logprobs(_logprobs(student_logits, temperature), _logprobs(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q; beta = 0 -> FKL, beta = 1 -> RKL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD needs beta in [0, 1], got {beta}")
    logp, logq = _logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature)
    if beta == 0.0:
        return kl_from_logprobs(logp, logq)
    if beta == 1.0:
        return kl_from_logprobs(logq, logp)
    logm = log_mixture(logp, logq, beta)
    return beta * kl_from_logprobs(logp, logm) + (1.0 - beta) * kl_from_logprobs(logq, logm)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """1/2 sum |p - q|: (..., V) x (..., V) -> (...)."""
    p = _logprobs(teacher_logits, temperature).exp()
    q = _logprobs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def skew_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q); alpha = 0 -> FKL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew KL needs alpha in [0, 1), got {alpha}")
    logp, logq = _logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature)
    return kl_from_logprobs(logp, log_mixture(logp, logq, alpha))


def skew_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """KL(q || (1 - alpha) p + alpha q); alpha = 0 -> RKL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew reverse KL needs alpha in [0, 1), got {alpha}")
    logp, logq = _logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature)
    return kl_from_logprobs(logq, log_mixture(logp, logq, 1.0 - alpha))


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
}


def get_divergence(name: str, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> Divergence:
    """The named divergence with its parameters bound: (student_logits, teacher_logits) -> per-position values."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    fn = DIVERGENCES[name]
    kwargs: dict[str, float] = {"temperature": temperature}
    if name == "jsd":
        kwargs["beta"] = beta
    if name in ("skl", "srkl"):
        kwargs["alpha"] = alpha
    return partial(fn, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Reduction and the chunked path
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions; an all-masked input gives 0 (not NaN)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1).to(values.dtype)


def divergence_temperature(divergence: Divergence) -> float:
    """The temperature bound into a divergence by `get_divergence` (1.0 for a bare function)."""
    keywords = getattr(divergence, "keywords", None) or {}
    return float(keywords.get("temperature", 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Sparse teacher: top-k log-probabilities plus one tail bucket
# ----------------------------------------------------------------------------------------------------------------


def student_bucket_logprobs(
    student_logits: torch.Tensor, topk_indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log q on the teacher's k tokens and on the rest as one bucket: (..., V) x (..., k) -> (..., k + 1).

    When k = V there is no rest and the result is (..., k). The tail is a log-sum-exp over the complement (not
    log(1 - sum of the top-k)), so it keeps full precision when the top-k hold nearly all the mass."""
    logq = _logprobs(student_logits, temperature)  # (..., V)
    top = logq.gather(-1, topk_indices)  # (..., k)
    if topk_indices.shape[-1] >= logq.shape[-1]:
        return top
    tail = logq.scatter(-1, topk_indices, float("-inf")).logsumexp(-1, keepdim=True)  # (..., 1)
    return torch.cat([top, tail], dim=-1)


def teacher_bucket_logprobs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p on the k stored tokens and the tail bucket: (..., k) x (...) -> (..., k + 1), or (..., k) when k = V."""
    if topk_logprobs.shape[-1] >= vocab_size:
        return topk_logprobs
    return torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1).to(topk_logprobs.dtype)], dim=-1)


def sparse_divergence(
    divergence: Divergence,
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    tail_logprob: torch.Tensor,
) -> torch.Tensor:
    """The divergence between a top-k teacher and the student on k + 1 buckets (see the module docstring).

    student_logits (..., V); topk_logprobs (..., k) and tail_logprob (...) are the teacher's log-probabilities at
    the temperature bound into `divergence` (core.logit_cache records the temperature a cache was built at);
    topk_indices (..., k) -> (...)."""
    temperature = divergence_temperature(divergence)
    student = student_bucket_logprobs(student_logits, topk_indices.long(), temperature)
    teacher = teacher_bucket_logprobs(topk_logprobs.to(student.dtype), tail_logprob, student_logits.shape[-1])
    # The divergences divide their inputs by the temperature before the log-softmax; multiplying by it here makes
    # that step return the bucket log-probabilities themselves (already normalized).
    return divergence(student * temperature, teacher * temperature)


def sampled_forward_kl(
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    tail_logprob: torch.Tensor,
    sample_ids: torch.Tensor,
    teacher_entropy: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """An unbiased estimate of KL(p || q) from the teacher's top k and m ids drawn from its tail (Anshumann et al.,
    2025, "Sparse Logit Sampling", applied to the tail).

    p_hat = p on the k stored ids plus P_tail / m for each of the m draws (a repeated id counts each time), the
    draws i.i.d. from p restricted to the ids outside the top k and renormalised, so E[p_hat_v] = p_v at every id.
    FKL_hat = -H(p) - sum_v p_hat_v log q_v is linear in p_hat, so E[FKL_hat] = KL(p || q), and its gradient with
    respect to z = logits / T, (sum_v p_hat_v) q - p_hat = q - p_hat, is unbiased too. No other divergence of this
    module is linear in p, so none is unbiased from such a sample. At k = V there is no tail (P_tail = 0) and it is
    the exact forward KL. student_logits (..., V); topk_logprobs, topk_indices (..., k); tail_logprob (...);
    sample_ids (..., m); teacher_entropy (...) (H(p) at `temperature`) -> (...)."""
    logq = _logprobs(student_logits, temperature)  # (..., V)
    cross = (topk_logprobs.to(logq.dtype).exp() * logq.gather(-1, topk_indices.long())).sum(-1)  # (...)
    m = sample_ids.shape[-1]
    if m:
        weight = tail_logprob.to(logq.dtype).exp() / m  # (...): P_tail / m; 0 when the tail is empty
        cross = cross + weight * logq.gather(-1, sample_ids.long()).sum(-1)
    return -teacher_entropy.to(logq.dtype) - cross


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t + 1: logits (B, T, V) -> (B, T-1, V), labels (B, T) -> (B, T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed token NLL of already-shifted logits (B, T, V) and labels (B, T)."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # bf16/fp16 upcast, float64 kept
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")

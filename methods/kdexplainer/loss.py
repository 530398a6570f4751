"""KDExplainer's training objectives and its explanation measurements (pure functions of tensors).

CE   l = -log softmax(z)_y
LS   l = -sum_k q_k log softmax(z)_k,  q = (1 - eps) onehot(y) + eps / K        (Szegedy et al. 2016)
KD   l = gamma CE + alpha T^2 KL(softmax(t / T) || softmax(z / T))            (Hinton et al. 2015; the
     official config kd/ResNet50-LTB-ce.yml: classify_weight gamma = 0.1, kd_weight alpha = 0.9, T = 4)

routing similarity   R[k, k'] = (1 / L) sum_l cos(p_{k,l}, p_{k',l})
     p_{k,l} (M,) is class k's attention over the M modules of layer l: R = 1 when two classes use the same
     modules with the same weights at every layer, 0 when they never share one
teacher similarity   S[k, k'] = cos(pbar_k, pbar_{k'}),  pbar_k = mean of softmax(t / T) over class-k examples
agreement            Spearman's rho between the off-diagonal entries of two K x K similarity matrices
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothing_targets(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """(B,) -> (B, K): (1 - eps) on the label plus eps / K everywhere (so the label gets 1 - eps + eps / K)."""
    onehot = F.one_hot(labels, num_classes).to(torch.float32)
    return (1 - eps) * onehot + eps / num_classes


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K), (B,) -> (B,) per-example cross-entropy, log-softmax in float32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """(B,) cross-entropy against the label-smoothed target."""
    targets = label_smoothing_targets(labels, logits.shape[-1], eps)
    return -(targets * F.log_softmax(logits.float(), -1)).sum(-1)


def kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    gamma: float = 0.1,
) -> torch.Tensor:
    """(B,) gamma CE + alpha T^2 KL(p_T || q_T); the teacher carries no gradient."""
    log_q = F.log_softmax(logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(teacher || student), per example
    return gamma * cross_entropy(logits, labels) + alpha * temperature**2 * kl


def routing_similarity(routing: torch.Tensor) -> torch.Tensor:
    """(L, K, M) attention of each class over each layer's modules -> (K, K) mean cosine over layers."""
    unit = F.normalize(routing.double(), dim=-1)
    return torch.einsum("lkm,ljm->kj", unit, unit) / routing.shape[0]


def teacher_class_similarity(
    teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """(N, K) logits, (N,) labels -> (K, K) cosine similarity of the classes' mean softened teacher outputs."""
    probs = F.softmax(teacher_logits.double() / temperature, -1)
    k = teacher_logits.shape[-1]
    means = torch.stack([probs[labels == c].mean(0) for c in range(k)])  # (K, K)
    unit = F.normalize(means, dim=-1)
    return unit @ unit.T


def offdiagonal_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho between the strictly-upper-triangular entries of two symmetric (K, K) matrices."""
    from scipy.stats import spearmanr

    i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    x, y = a[i, j].double().numpy(), b[i, j].double().numpy()
    if x.std() == 0 or y.std() == 0:
        return 0.0  # a constant similarity (e.g. uniform routing) carries no ordering at all
    return float(spearmanr(x, y).statistic)

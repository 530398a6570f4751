"""The multi-teacher student, its loss on normalized targets, and the paper's two measurements.

student     z = backbone(x);  y_hat_t = head_t(z)          one small head per teacher (RADIO's adaptors)
loss        L = sum_t (1 / D_t) ||y_hat_t - W_t (y_t - mu_t)||^2   per example; MSE on each teacher's
            normalized target, each teacher weighted 1 (PHI-S Sec. 3: the balance comes from the
            normalization, not from per-teacher weights)
error       e_t = sum_n ||W_t^-1 y_hat_t,n + mu_t - y_t,n||^2 / sum_n ||y_t,n - mu_t||^2
            the student's error in teacher t's own space, relative to that teacher's total variance
            (1 - R^2 of the regression): comparable across teachers whatever their scale
probe       accuracy of a logistic-regression probe on z (the student's features) for the digit labels
"""

from __future__ import annotations

import torch
from torch import nn

from methods.phis.transforms import Normalizer


class MultiTeacherStudent(nn.Module):
    """An MLP backbone on the 64 pixels and one two-layer head per teacher."""

    def __init__(self, teacher_dims: dict[str, int], width: int = 256, in_dim: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.heads = nn.ModuleDict(
            {name: nn.Sequential(nn.GELU(), nn.Linear(width, dim)) for name, dim in teacher_dims.items()}
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.features(x)
        return {name: head(z) for name, head in self.heads.items()}  # {teacher: (B, D_t)}


def multi_teacher_loss(
    predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example loss (B,) = sum over teachers of the per-dimension mean squared error, and each teacher's term."""
    per_teacher = {name: (predictions[name] - targets[name]).pow(2).mean(-1) for name in targets}  # {t: (B,)}
    return torch.stack(list(per_teacher.values())).sum(0), per_teacher


def normalized_errors(
    predictions: dict[str, torch.Tensor],
    features: dict[str, torch.Tensor],
    normalizers: dict[str, Normalizer],
    train_means: dict[str, torch.Tensor],
) -> dict[str, float]:
    """{teacher: e_t} on one split. predictions: normalized-space outputs (N, D_t); features: true (N, D_t)."""
    out = {}
    for name, target in features.items():
        target = target.to(torch.float64)
        recon = normalizers[name].denormalize(predictions[name].to(torch.float64))  # back to teacher space
        total = (target - train_means[name].to(torch.float64)).pow(2).sum()
        out[name] = float((recon - target).pow(2).sum() / total)
    return out


def linear_probe_accuracy(
    z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor, seed: int = 0
) -> float:
    """Test accuracy of an L2-regularized logistic regression fitted on standardized student features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    probe.fit(z_train.double().numpy(), y_train.numpy())
    return float(probe.score(z_test.double().numpy(), y_test.numpy()))

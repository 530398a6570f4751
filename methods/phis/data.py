"""scikit-learn's bundled handwritten digits (no download) and three digit teachers with very different statistics.

The digits themselves come from core.digits (shared with methods/kdexplainer and privacy/pate_digits.py).

    split:    1797 images of 8 x 8 pixels (intensity 0..16), 10 classes; a fixed stratified 80/20 split
    teachers: mlp   penultimate ReLU layer (128) of an MLP trained on the train split
              cnn   sum-pooled last conv layer (32) of a small CNN trained on the train split (large scale)
              poly  a fixed classical map: degree-2 monomials of the 4 x 4 average-pooled image in raw
                    intensity units (16 + 136 = 152 dims, values up to 256; the border cells are almost always
                    0, so the covariance is nearly singular: the low-rank teacher)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.digits import Digits, load_digits_split  # noqa: F401  (re-exported for this package)
from core.errors import DataError

TEACHERS = ("mlp", "cnn", "poly")


class MLPTeacher(nn.Module):
    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes)


class CNNTeacher(nn.Module):
    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, channels, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.conv(x.view(-1, 1, 8, 8))  # (B, C, 8, 8)
        return maps.sum(dim=(2, 3))  # (B, C): sum pooling, so its scale is ~64 x that of a mean pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x) / 64.0)


def poly_features(x: torch.Tensor) -> torch.Tensor:
    """The fixed classical map: (N, 64) in [0, 1] -> (N, 152) degree-2 monomials of 4 x 4 pooled raw intensities."""
    pooled = (x * 16.0).view(-1, 1, 8, 8)
    pooled = nn.functional.avg_pool2d(pooled, 2).flatten(1)  # (N, 16), 0..16
    i, j = torch.triu_indices(16, 16)
    return torch.cat([pooled, pooled[:, i] * pooled[:, j]], dim=1)  # (N, 16 + 136)


def train_classifier(model: nn.Module, data: Digits, steps: int, seed: int, lr: float = 3e-3) -> float:
    """Full-batch Adam on the train split with cross-entropy; returns test accuracy. Deterministic given seed."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(data.x_test).argmax(-1) == data.y_test).float().mean())


def build_teacher_features(folder: Path, data: Digits, steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Train the MLP and CNN teachers, compute every teacher's features on both splits, save them in `folder`.

    Files: <teacher>_train.pt, <teacher>_test.pt (float64 features), mlp_teacher.pt (its state dict, the
    classifier teacher of kdexplainer) and accuracy.pt (test accuracy of the trained teachers)."""
    torch.manual_seed(seed)
    mlp, cnn = MLPTeacher(), CNNTeacher()
    accuracy = {"mlp": train_classifier(mlp, data, steps, seed), "cnn": train_classifier(cnn, data, steps, seed + 1)}
    with torch.no_grad():
        for name, fn in (("mlp", mlp.features), ("cnn", cnn.features), ("poly", poly_features)):
            torch.save(fn(data.x_train).double(), folder / f"{name}_train.pt")
            torch.save(fn(data.x_test).double(), folder / f"{name}_test.pt")
    torch.save(mlp.state_dict(), folder / "mlp_teacher.pt")
    torch.save(accuracy, folder / "accuracy.pt")
    return accuracy


def load_teacher_features(folder: Path, names: tuple[str, ...] = TEACHERS) -> dict[str, tuple[torch.Tensor, ...]]:
    """{teacher: (train features, test features)} from a folder written by build_teacher_features."""
    out = {}
    for name in names:
        paths = [folder / f"{name}_{split}.pt" for split in ("train", "test")]
        for path in paths:
            if not path.is_file():
                raise DataError(f"teacher feature file {path} is missing; delete {folder} to rebuild the cache")
        out[name] = tuple(torch.load(p, weights_only=True) for p in paths)
    return out

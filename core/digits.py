"""scikit-learn's bundled handwritten digits (8 x 8 images, 10 classes, 1,797 examples; shipped inside the
package, nothing downloaded): the real image data of the vision packages (methods/phis, methods/kdexplainer) and of
classic PATE (privacy/pate_digits.py). Intensities are scaled from 0..16 to [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.errors import DataError

SPLIT_SEED = 0  # the train/test split is the same for every run (seeds vary the students, not the data)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x (1797, 64) float32 in [0, 1], y (1797,) int64), in scikit-learn's order."""
    from sklearn.datasets import load_digits

    try:
        bunch = load_digits()
    except Exception as exc:  # a broken scikit-learn install: its data file is missing or unreadable
        raise DataError(f"cannot read scikit-learn's bundled digits ({exc}); reinstall scikit-learn") from exc
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@dataclass
class Digits:
    x_train: torch.Tensor  # (N_train, 64), intensities scaled to [0, 1]
    y_train: torch.Tensor  # (N_train,) long
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return 10


def load_digits_split(test_fraction: float = 0.2) -> Digits:
    """The digits split train/test, stratified, with a fixed seed."""
    from sklearn.model_selection import train_test_split

    x, y = load_digits_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=SPLIT_SEED, stratify=y)
    return Digits(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te))

"""Classic PATE (Papernot et al., ICLR 2017; GNMax of ICLR 2018) on scikit-learn's bundled handwritten digits,
beside a DP-SGD student (Abadi et al. 2016, through opacus) at the same epsilon.

    private split -> n disjoint partitions -> n teachers (logistic regression)
    public split (labels unseen) -> teacher votes -> GNMax label argmax(counts + N(0, sigma^2))  (Papernot 2018)
    student MLP trained on the noisy labels of the first `queries` public points; epsilon of `queries` GNMax
    answers: queries * alpha / sigma^2 in RDP (privacy.accounting.gnmax_rdp), converted by opacus
    DP-SGD: the same MLP trained on the private split itself with per-example clipping and Gaussian noise,
    noise multiplier chosen by opacus (make_private_with_epsilon) to reach the PATE student's epsilon

`load_digits` ships inside scikit-learn: nothing is downloaded. The students are trained by a plain loop, not
core.train.Trainer: opacus must own the optimizer (DPOptimizer) and the Poisson-sampled loader, and both students
must share one loop for the comparison to be fair.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from core.digits import load_digits_arrays
from core.errors import ConfigError
from privacy.accounting import epsilon_of, gnmax_rdp
from privacy.aggregation import noisy_argmax, vote_histogram

N_CLASSES = 10


@dataclass
class DigitsConfig:
    """Classic PATE on sklearn's digits beside DP-SGD (part of the default run; --no-digits skips it)."""

    digits: bool = field(default=True, metadata={"help": "also run classic PATE vs DP-SGD on sklearn's digits"})
    digits_teachers: int = field(
        default=25, metadata={"help": "PATE teachers on disjoint partitions of the private split"}
    )
    digits_queries: int = field(default=100, metadata={"help": "public points labelled by noisy argmax (queries)"})
    digits_sigmas: str = field(
        default="4,8,16", metadata={"help": "GNMax noise stds (votes) of the PATE points, comma-separated"}
    )
    digits_delta: float = field(default=1e-5, metadata={"help": "delta of the digits guarantees"})
    digits_epochs: int = field(default=30, metadata={"help": "training epochs of each digits student"})

    def __post_init__(self) -> None:
        if self.digits_teachers < 2:
            raise ConfigError(f"--digits-teachers must be at least 2, got {self.digits_teachers}")
        if not 1 <= self.digits_queries <= 400:
            raise ConfigError(f"--digits-queries must be in [1, 400] (the public split), got {self.digits_queries}")
        if not 0 < self.digits_delta < 1:
            raise ConfigError(f"--digits-delta must be in (0, 1), got {self.digits_delta}")
        if self.digits_epochs < 1:
            raise ConfigError(f"--digits-epochs must be at least 1, got {self.digits_epochs}")
        self.sigmas()

    def sigmas(self) -> list[float]:
        try:
            values = [float(s) for s in self.digits_sigmas.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--digits-sigmas must be comma-separated numbers, got {self.digits_sigmas!r}") from None
        if not values or any(not v > 0 for v in values):
            raise ConfigError(f"--digits-sigmas must be positive numbers, got {self.digits_sigmas!r}")
        return values


@dataclass
class DigitsSplit:
    x_private: np.ndarray
    y_private: np.ndarray
    x_public: np.ndarray
    y_public: np.ndarray  # never used for training: only to report the accuracy of the noisy labels
    x_test: np.ndarray
    y_test: np.ndarray


def split_digits(seed: int, n_public: int = 400, n_test: int = 297) -> DigitsSplit:
    x, y = load_digits_arrays()  # pixel intensities scaled to [0, 1]
    order = np.random.default_rng(seed).permutation(len(y))
    test, public, private = order[:n_test], order[n_test : n_test + n_public], order[n_test + n_public :]
    return DigitsSplit(x[private], y[private], x[public], y[public], x[test], y[test])


def train_teachers(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> list:
    """n logistic-regression teachers, teacher j on the j-th of n disjoint, equal partitions of (x, y)."""
    from sklearn.linear_model import LogisticRegression

    parts = np.array_split(np.random.default_rng(seed + 1).permutation(len(y)), n)
    teachers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a partition may lack a class; the teacher then never votes for it
        for part in parts:
            teachers.append(LogisticRegression(max_iter=300, C=1.0).fit(x[part], y[part]))
    return teachers


def teacher_votes(teachers: list, x: np.ndarray) -> torch.Tensor:
    """(N, n) each teacher's predicted class for each point."""
    return torch.tensor(np.stack([t.predict(x) for t in teachers], axis=1), dtype=torch.long)


def gnmax_labels(votes: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(N, n) votes -> (N,) labels argmax_i(counts_i + N(0, sigma^2))."""
    return noisy_argmax(vote_histogram(votes, N_CLASSES), "gaussian", sigma, generator)


def pate_epsilon(sigma: float, queries: int, delta: float) -> float:
    return epsilon_of(gnmax_rdp(sigma, count=queries), delta)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, N_CLASSES))


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())


def train_student(
    x: np.ndarray, y: np.ndarray, epochs: int, seed: int, target_epsilon: float | None = None, delta: float = 1e-5
) -> tuple[torch.nn.Module, float]:
    """The shared loop: SGD with momentum on cross-entropy. With `target_epsilon`, opacus makes it DP-SGD
    (per-example clipping at norm 1, Poisson sampling, noise calibrated to the target). Returns (model, epsilon)."""
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=min(64, len(y)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    engine = None
    if target_epsilon is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # opacus's note that its secure RNG is off (fine for experiments)
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=target_epsilon,
                target_delta=delta,
                epochs=epochs,
                max_grad_norm=1.0,
            )
    loss_fn = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on opacus's full backward hooks (inputs need no grad)
        for _ in range(epochs):
            for xb, yb in loader:
                if len(yb) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
    spent = engine.get_epsilon(delta) if engine is not None else math.inf
    model = getattr(model, "_module", model)
    return model.eval(), float(spent)


def run_digits(cfg: DigitsConfig, seed: int) -> dict:
    """The comparison: PATE points (one per sigma) and a DP-SGD student at each point's epsilon."""
    torch.manual_seed(seed)
    split = split_digits(seed)
    teachers = train_teachers(split.x_private, split.y_private, cfg.digits_teachers, seed)
    test_votes = teacher_votes(teachers, split.x_test)
    ensemble = vote_histogram(test_votes, N_CLASSES).argmax(-1).numpy()
    single = float(np.mean([(t.predict(split.x_test) == split.y_test).mean() for t in teachers]))
    nonprivate, _ = train_student(split.x_private, split.y_private, cfg.digits_epochs, seed)
    q = cfg.digits_queries
    public_votes = teacher_votes(teachers, split.x_public[:q])
    points = []
    for sigma in cfg.sigmas():
        generator = torch.Generator().manual_seed(seed * 1000 + int(sigma * 10))
        labels = gnmax_labels(public_votes, sigma, generator).numpy()
        eps = pate_epsilon(sigma, q, cfg.digits_delta)
        student, _ = train_student(split.x_public[:q], labels, cfg.digits_epochs, seed)
        dp_model, dp_eps = train_student(
            split.x_private, split.y_private, cfg.digits_epochs, seed, target_epsilon=eps, delta=cfg.digits_delta
        )
        points.append(
            {
                "sigma": sigma,
                "epsilon": eps,
                "label_accuracy": float((labels == split.y_public[:q]).mean()),
                "pate_student_accuracy": accuracy(student, split.x_test, split.y_test),
                "dpsgd_epsilon": dp_eps,
                "dpsgd_student_accuracy": accuracy(dp_model, split.x_test, split.y_test),
            }
        )
    return {
        "teachers": cfg.digits_teachers,
        "queries": q,
        "delta": cfg.digits_delta,
        "private_examples": int(len(split.y_private)),
        "single_teacher_accuracy": single,
        "ensemble_accuracy": float((ensemble == split.y_test).mean()),
        "nonprivate_student_accuracy": accuracy(nonprivate, split.x_test, split.y_test),
        "points": points,
    }

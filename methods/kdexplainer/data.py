"""The two tasks: scikit-learn's digits, and a generated task whose class hierarchy is known in advance.

hier: 8 classes at the leaves of a binary tree of depth 3 (2 superclasses, each of 2 middle classes, each of 2
classes). A class's mean in R^D is the sum of one random direction per level of its path, with weights that
shrink with depth, so classes under the same superclass are closer than classes across superclasses; examples
are that mean plus isotropic Gaussian noise. `shared_levels[k, k']` (0, 1 or 2: how many ancestors two classes
share) is the similarity structure KD should reveal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.digits import load_digits_split

TASKS = ("hier", "digits")
DATA_SEED = 0  # the same data for every run; seeds vary the students


@dataclass
class Task:
    name: str
    x_train: torch.Tensor  # (N, D) float32
    y_train: torch.Tensor  # (N,) long
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    shared_levels: torch.Tensor | None = None  # (K, K) known hierarchy (hier only)


def hierarchical_task(
    dim: int = 32,
    per_class_train: int = 300,
    per_class_test: int = 200,
    level_scales: tuple[float, ...] = (5.0, 3.5, 2.5),
    noise: float = 1.0,
) -> Task:
    """The generated hierarchy: 2^depth classes, depth = len(level_scales)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    depth = len(level_scales)
    k = 2**depth
    # one random unit direction per node of the tree; level l has 2^(l+1) nodes
    nodes = [
        torch.nn.functional.normalize(torch.randn(2 ** (lvl + 1), dim, generator=gen), dim=-1) for lvl in range(depth)
    ]
    means = torch.zeros(k, dim)
    for c in range(k):
        for lvl in range(depth):
            node = c >> (depth - 1 - lvl)  # the ancestor of leaf c at level lvl
            means[c] += level_scales[lvl] * nodes[lvl][node]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(k).repeat_interleave(n)
        return means[y] + noise * torch.randn(len(y), dim, generator=gen), y

    x_tr, y_tr = sample(per_class_train)
    x_te, y_te = sample(per_class_test)
    a = torch.arange(k)
    shared = torch.zeros(k, k, dtype=torch.long)
    for lvl in range(depth - 1):  # levels above the leaves
        shift = depth - 1 - lvl
        shared += ((a[:, None] >> shift) == (a[None, :] >> shift)).long()
    return Task("hier", x_tr, y_tr, x_te, y_te, k, shared)


def load_task(name: str) -> Task:
    if name == "hier":
        return hierarchical_task()
    digits = load_digits_split()
    return Task("digits", digits.x_train, digits.y_train, digits.x_test, digits.y_test, 10)

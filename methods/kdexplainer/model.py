"""The task-oriented attention model (KDExplainer's tree-like student) and the virtual attention module (VAM).

Tree student (paper Sec. 3; official code: LEARNTOBRANCH.py, not in the public snapshot we could read, so this is
our reading of the paper and of train_LTB_kd_s1.py): L layers of M modules each; class k is one binary sub-task
with its own route. At layer l, class k attends over the layer's modules with weights

    p_{k,l} = softmax((alpha_{k,l} + g) / tau)        g ~ Gumbel(0, 1) in training (Gumbel-softmax), 0 at eval

    h_{k,1} = sum_j p_{k,1,j} f_{1,j}(x)
    h_{k,l} = sum_j p_{k,l,j} f_{l,j}(h_{k,l-1})
    z_k     = v_k . h_{k,L} + c_k                       class k's logit; the K logits form the usual softmax

tau falls during training (the official code passes t / epoch); as it falls the routes harden into a tree in
which classes that share a module share its computation. The temperature is a buffer, so a resumed run continues
the schedule exactly.

VAM (paper Sec. 5, our reading): a plug-in for an ordinary network. The C channels of its last hidden layer are
cut into M groups ("virtual modules"); class k attends over them, p_k = softmax(beta_k / tau), and its logit reads
only the attended mixture: z_k = w_k . sum_j p_{k,j} h_j + b_k (h_j: group j, C / M channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TreeStudent(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, layers: int = 3, modules: int = 4, width: int = 64,
                 tau: float = 10.0, gumbel: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.layers, self.modules_per_layer, self.gumbel = num_classes, layers, modules, gumbel
        self.first = nn.Linear(in_dim, modules * width)  # the M modules of layer 1, applied to x at once
        bound = 1 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(layers - 1, modules, width, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(layers - 1, modules, width).uniform_(-bound, bound))
        self.routing_logits = nn.Parameter(torch.randn(layers, num_classes, modules) * 1e-2)  # alpha
        self.head_weight = nn.Parameter(torch.empty(num_classes, width).uniform_(-bound, bound))  # v_k
        self.head_bias = nn.Parameter(torch.zeros(num_classes))  # c_k
        self.register_buffer("temperature", torch.tensor(float(tau)))
        self.width = width

    def routing(self, noisy: bool = False) -> torch.Tensor:
        """(L, K, M) attention of each class over each layer's modules; rows sum to one."""
        logits = self.routing_logits
        if noisy:
            u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1)
        return F.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.routing(noisy=self.training and self.gumbel)  # (L, K, M)
        b = x.shape[0]
        f1 = F.relu(self.first(x)).view(b, self.modules_per_layer, self.width)  # (B, M, W)
        h = torch.einsum("km,bmw->bkw", p[0], f1)  # (B, K, W)
        for layer in range(self.layers - 1):
            out = torch.einsum("bkw,mwv->bkmv", h, self.weight[layer]) + self.bias[layer]  # (B, K, M, W)
            h = torch.einsum("km,bkmv->bkv", p[layer + 1], F.relu(out))  # (B, K, W)
        return (h * self.head_weight).sum(-1) + self.head_bias  # (B, K)


class MLPStudent(nn.Module):
    """An ordinary network: two hidden layers and either a linear head or a VAM head."""

    def __init__(self, in_dim: int, num_classes: int, width: int = 64, vam_groups: int = 0, tau: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.vam = VAM(width, num_classes, vam_groups, tau) if vam_groups else None
        self.head = None if vam_groups else nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, C)
        return self.vam(h) if self.vam is not None else self.head(h)  # (B, K)


class VAM(nn.Module):
    """Virtual attention module: per-class attention over channel groups of a hidden layer, then a per-class logit."""

    def __init__(self, channels: int, num_classes: int, groups: int, tau: float = 1.0) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"VAM: {channels} channels do not split into {groups} groups")
        self.groups, self.size = groups, channels // groups
        self.attention_logits = nn.Parameter(torch.randn(num_classes, groups) * 1e-2)  # beta
        bound = 1 / math.sqrt(self.size)
        self.weight = nn.Parameter(torch.empty(num_classes, self.size).uniform_(-bound, bound))  # w_k
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("temperature", torch.tensor(float(tau)))

    def attention(self) -> torch.Tensor:
        return F.softmax(self.attention_logits / self.temperature, dim=-1)  # (K, M)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = h.view(h.shape[0], self.groups, self.size)  # (B, M, C/M)
        mixed = torch.einsum("km,bms->bks", self.attention(), g)  # (B, K, C/M)
        return (mixed * self.weight).sum(-1) + self.bias  # (B, K)


class Teacher(nn.Module):
    """A free-form classifier teacher (an MLP wider and deeper than the students)."""

    def __init__(self, in_dim: int, num_classes: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

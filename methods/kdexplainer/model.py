"""The task-oriented attention model (KDExplainer's tree-like student) and the virtual attention module (VAM).

Tree student (paper Sec. 3; official code: `LEARNTOBRANCH.py` in xmq1221/KDExplainer, read for this package; see
the README for where our topology differs): L layers of M modules each; class k is one binary sub-task with its
own route. At layer l, class k attends over the layer's modules with weights

    p_{k,l} = softmax(alpha_{k,l} / (0.5 t))           alpha ~ U(0, 1) at init (official)

    h_{k,1} = sum_j p_{k,1,j} f_{1,j}(x)
    h_{k,l} = sum_j p_{k,l,j} f_{l,j}(h_{k,l-1})
    z_k     = head_k(h_{k,L})                           class k's logit; the K logits form the usual softmax

The factor 0.5: the official branching op first takes softmax(alpha / 0.5), then softmax(log(that) / t); the log
of a softmax is alpha / 0.5 minus a constant per row, which the second softmax cancels, so the route is
softmax(alpha / (0.5 t)), no noise added (its function is named gumbel_softmax but draws no Gumbel sample). t falls
during training (the official code passes t / epoch, t = 10); as it falls the routes harden into a tree in which
classes that share a module share its computation. `temperature` (a buffer, so a resumed run continues the
schedule exactly) holds t; an optional Gumbel(0, 1) perturbation of alpha (`gumbel=True`) is ours.

head_k (official fc1_k, fc2_k): Linear(W, H) -> ReLU -> Dropout(0.15) -> Linear(H, H) -> ReLU -> Dropout(0.15) ->
Linear(H, 1), H = 128, every Linear initialised N(0, 0.01^2) with zero bias (official `_initialize_weights`);
`head_hidden=0` gives the linear head v_k . h + c_k instead.

VAM (paper Sec. 5, our reading): a plug-in for an ordinary network. The C channels of its last hidden layer are
cut into M groups ("virtual modules"); class k attends over them, p_k = softmax(beta_k / tau), and its logit reads
only the attended mixture: z_k = w_k . sum_j p_{k,j} h_j + b_k (h_j: group j, C / M channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_TEMPERATURE_FACTOR = 0.5  # official branching_op: softmax at 0.5, then at t -> one softmax at 0.5 t


class TreeStudent(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, layers: int = 3, modules: int = 4, width: int = 64,
                 tau: float = 10.0, gumbel: bool = False, head_hidden: int = 128,
                 head_dropout: float = 0.15) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.layers, self.modules_per_layer, self.gumbel = num_classes, layers, modules, gumbel
        self.first = nn.Linear(in_dim, modules * width)  # the M modules of layer 1, applied to x at once
        bound = 1 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(layers - 1, modules, width, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(layers - 1, modules, width).uniform_(-bound, bound))
        # alpha ~ U(0, 1): the official nn.init.uniform_(zeros(children, parents), a=0, b=1)
        self.routing_logits = nn.Parameter(torch.rand(layers, num_classes, modules))
        self.head_hidden, self.head_dropout = head_hidden, head_dropout
        if head_hidden:  # per-class MLP heads, N(0, 0.01^2) weights and zero biases as in the official init
            k, h = num_classes, head_hidden
            self.head_w1 = nn.Parameter(torch.randn(k, width, h) * 0.01)
            self.head_b1 = nn.Parameter(torch.zeros(k, h))
            self.head_w2 = nn.Parameter(torch.randn(k, h, h) * 0.01)
            self.head_b2 = nn.Parameter(torch.zeros(k, h))
            self.head_w3 = nn.Parameter(torch.randn(k, h) * 0.01)
            self.head_b3 = nn.Parameter(torch.zeros(k))
        else:
            self.head_weight = nn.Parameter(torch.empty(num_classes, width).uniform_(-bound, bound))  # v_k
            self.head_bias = nn.Parameter(torch.zeros(num_classes))  # c_k
        self.register_buffer("temperature", torch.tensor(float(tau)))
        self.width = width

    def routing(self, noisy: bool = False) -> torch.Tensor:
        """(L, K, M) attention of each class over each layer's modules, softmax(alpha / (0.5 t)); rows sum to one."""
        logits = self.routing_logits
        if noisy:
            u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1) (ours; the official adds none)
        return F.softmax(logits / (ROUTING_TEMPERATURE_FACTOR * self.temperature), dim=-1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, K, W) class-specific features -> (B, K) logits, class k read by its own head."""
        if not self.head_hidden:
            return (h * self.head_weight).sum(-1) + self.head_bias
        z = F.relu(torch.einsum("bkw,kwh->bkh", h, self.head_w1) + self.head_b1)
        z = F.dropout(z, self.head_dropout, self.training)
        z = F.relu(torch.einsum("bkh,khg->bkg", z, self.head_w2) + self.head_b2)
        z = F.dropout(z, self.head_dropout, self.training)
        return (z * self.head_w3).sum(-1) + self.head_b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.routing(noisy=self.training and self.gumbel)  # (L, K, M)
        b = x.shape[0]
        f1 = F.relu(self.first(x)).view(b, self.modules_per_layer, self.width)  # (B, M, W)
        h = torch.einsum("km,bmw->bkw", p[0], f1)  # (B, K, W)
        for layer in range(self.layers - 1):
            out = torch.einsum("bkw,mwv->bkmv", h, self.weight[layer]) + self.bias[layer]  # (B, K, M, W)
            h = torch.einsum("km,bkmv->bkv", p[layer + 1], F.relu(out))  # (B, K, W)
        return self.head(h)  # (B, K)


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

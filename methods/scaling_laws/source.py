"""A generated language of known entropy: a random Markov chain of order k over V symbols.

Each context (the last k symbols, newest last) has its own next-symbol distribution, a softmax of random
Gaussian logits built in layers: a strong part that depends on the last symbol only and weaker parts that
depend on the last 2, 3, ... symbols,

    logits(c | x_{t-k+1..t}) = sum_{j=1..k} s_j G_j[x_{t-j+1..t}, c],   s_j = scale * decay^(j - 1)

so a model that captures only the short contexts already gains much, and each longer context gains less: the
loss falls gradually with capacity and data, which is what a scaling law needs. (A plain Dirichlet table per
context would make the lower-order marginals nearly uniform, an all-or-nothing task.) The entropy rate is
exact:

    H = sum_ctx pi(ctx) H(p(. | ctx))

with pi the stationary distribution of the chain on contexts (computed by power iteration on the V^k x V^k
transition matrix). A model's loss on this language can never go below H, so the irreducible term E of a
scaling law has a known target; and the expected cross-entropy of a model at a position is computable in closed
form from the true next-symbol distribution, -sum_c p(c | ctx) log q(c), which makes evaluation noise-free up to
the sampling of contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.errors import ConfigError


@dataclass
class MarkovSource:
    vocab: int = 32
    order: int = 2
    scale: float = 2.0  # s_1: weight of the last symbol's logits
    decay: float = 0.8  # s_{j+1} / s_j: each longer context matters less
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.vocab < 2 or self.order < 1 or self.vocab**self.order > 200_000:
            raise ConfigError(
                f"--vocab {self.vocab} and --order {self.order}: need vocab >= 2, order >= 1 and vocab^order <= 200000"
            )
        if not (self.scale > 0 and self.decay > 0):
            raise ConfigError(f"--scale and --decay must be positive, got {self.scale} and {self.decay}")
        rng = np.random.default_rng(self.seed)
        self.n_contexts = self.vocab**self.order
        logits = np.zeros((self.n_contexts, self.vocab))
        ctx = np.arange(self.n_contexts)
        for j in range(1, self.order + 1):
            table = rng.standard_normal((self.vocab**j, self.vocab))  # G_j over the last j symbols
            logits += self.scale * self.decay ** (j - 1) * table[ctx % self.vocab**j]
        logits -= logits.max(axis=1, keepdims=True)
        self.probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (C, V)
        self.stationary = self._stationary()

    def _next_context(self, ctx: np.ndarray, symbol: np.ndarray) -> np.ndarray:
        # contexts are base-V numbers of the last `order` symbols, the newest last
        return (ctx * self.vocab + symbol) % self.n_contexts

    def _stationary(self, iters: int = 2000, tol: float = 1e-13) -> np.ndarray:
        pi = np.full(self.n_contexts, 1.0 / self.n_contexts)
        nxt = self._next_context(np.arange(self.n_contexts)[:, None], np.arange(self.vocab)[None, :])  # (C, V)
        for _ in range(iters):
            new = np.bincount(nxt.ravel(), weights=(pi[:, None] * self.probs).ravel(), minlength=self.n_contexts)
            if np.abs(new - pi).sum() < tol:
                return new
            pi = new
        return pi

    def entropy_rate(self) -> float:
        """H in nats per symbol."""
        row_entropy = -(self.probs * np.log(np.clip(self.probs, 1e-300, None))).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def sample(self, n_sequences: int, length: int, seed: int) -> np.ndarray:
        """(n_sequences, length) int64 symbols; the first `order` symbols come from the stationary distribution."""
        rng = np.random.default_rng(seed)
        ctx = rng.choice(self.n_contexts, size=n_sequences, p=self.stationary)
        out = np.empty((n_sequences, length), dtype=np.int64)
        digits = [(ctx // self.vocab**j) % self.vocab for j in range(self.order - 1, -1, -1)]
        for j in range(min(self.order, length)):
            out[:, j] = digits[j]
        cdf = np.cumsum(self.probs, axis=1)
        for t in range(self.order, length):
            u = rng.random(n_sequences)[:, None]
            symbol = np.minimum((u > cdf[ctx]).sum(axis=1), self.vocab - 1)
            out[:, t] = symbol
            ctx = self._next_context(ctx, symbol)
        return out

    def next_probs(self, tokens: np.ndarray) -> np.ndarray:
        """(B, T - order, V): the true distribution of token t + 1 given tokens up to t, for t = order - 1 .. T - 2."""
        b, t = tokens.shape
        ctx = np.zeros((b, t - self.order + 1), dtype=np.int64)
        for j in range(self.order):
            ctx = ctx * self.vocab + tokens[:, j : t - self.order + 1 + j]
        return self.probs[ctx[:, :-1]]


def expected_cross_entropy(logits: torch.Tensor, true_probs: torch.Tensor, order: int) -> torch.Tensor:
    """Mean over positions of -sum_c p(c | ctx) log q(c | prefix): the model's loss in expectation over the next
    symbol. logits: (B, T, V) of a causal LM on the tokens; true_probs: (B, T - order, V) from next_probs; the
    logits at positions order - 1 .. T - 2 are the ones with a full context."""
    logq = torch.log_softmax(logits[:, order - 1 : -1].float(), dim=-1)  # (B, T - order, V)
    return -(true_probs * logq).sum(-1).mean()

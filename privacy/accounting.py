"""Privacy accounting for PATE-style aggregation: Renyi DP (RDP) of each answered query, composed over queries and
converted to (epsilon, delta).

opacus supplies the two hard parts and we use them as they are:
- `opacus.accountants.analysis.rdp.compute_rdp(q=1, noise_multiplier=z, steps=k, orders)` is the RDP of k
  compositions of the Gaussian mechanism with noise multiplier z = sigma / sensitivity (with q = 1 there is no
  subsampling): eps_alpha = k * alpha / (2 z^2)  (Mironov 2017, Prop. 7);
- `get_privacy_spent(orders, rdp, delta)` converts RDP to (epsilon, delta) (Balle et al. 2020, Thm. 21).

What opacus lacks, written here:
- the L2 sensitivity of the PATE queries: a vote histogram changes in two bins (one teacher moves its vote),
  so its L2 sensitivity is sqrt(2) and GNMax costs alpha / sigma^2 (Papernot et al. 2018, Prop. 8); the noisy
  threshold check reads only the largest count, sensitivity 1, cost alpha / (2 sigma_1^2) (ibid., Sec. 4.2);
- the Laplace variants (LNMax, Papernot et al. 2017): pure epsilon_0-DP turned into RDP by
  eps_alpha <= min(epsilon_0, alpha * epsilon_0^2 / 2) (Bun & Steinke 2016, Prop. 3.3: epsilon-DP implies
  epsilon^2/2-zCDP; and any Renyi divergence is at most the max divergence).

The bounds are data-independent: they hold whatever the votes are. The data-dependent analysis of Papernot et
al. 2018 (smooth sensitivity of the vote margin) would give smaller epsilons when teachers agree; it is not
implemented (see privacy/hot_pate/README.md).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from core.errors import ConfigError

ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)  # opacus's alphas: 1.1 ... 63
HISTOGRAM_L2_SENSITIVITY = math.sqrt(2.0)  # one teacher changes its vote: -1 in one bin, +1 in another
HISTOGRAM_L1_SENSITIVITY = 2.0
MAX_COUNT_SENSITIVITY = 1.0  # the largest count moves by at most one


def gaussian_rdp(sigma: float, sensitivity: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    """RDP at each order of `count` Gaussian mechanisms with noise std `sigma` on a query of this L2 sensitivity:
    count * alpha * sensitivity^2 / (2 sigma^2), computed by opacus (q = 1: no subsampling)."""
    if not sigma > 0:
        raise ConfigError(f"the Gaussian noise std must be positive for a privacy guarantee, got {sigma}")
    return np.asarray(compute_rdp(q=1.0, noise_multiplier=sigma / sensitivity, steps=count, orders=list(orders)))


def pure_dp_rdp(epsilon0: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    """RDP of `count` epsilon0-DP mechanisms: count * min(epsilon0, alpha * epsilon0^2 / 2) (Bun & Steinke 2016)."""
    alphas = np.asarray(orders, dtype=float)
    return count * np.minimum(epsilon0, alphas * epsilon0**2 / 2)


def gnmax_rdp(sigma: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    """Noisy argmax of a vote histogram with Gaussian noise N(0, sigma^2) per bin: alpha / sigma^2 per query."""
    return gaussian_rdp(sigma, HISTOGRAM_L2_SENSITIVITY, count, orders)


def lnmax_rdp(scale: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    """Noisy argmax with Laplace noise of this scale per bin: 2 / scale - DP per query (Papernot et al. 2017, LNMax:
    gamma = 1 / scale gives 2 gamma - DP)."""
    if not scale > 0:
        raise ConfigError(f"the Laplace noise scale must be positive for a privacy guarantee, got {scale}")
    return pure_dp_rdp(HISTOGRAM_L1_SENSITIVITY / scale, count, orders)


def threshold_rdp(noise: str, scale: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    """The noisy check `max count + noise >= T` (sensitivity 1): Gaussian alpha / (2 sigma^2), Laplace 1/scale-DP."""
    if noise == "gaussian":
        return gaussian_rdp(scale, MAX_COUNT_SENSITIVITY, count, orders)
    if not scale > 0:
        raise ConfigError(f"the Laplace noise scale must be positive for a privacy guarantee, got {scale}")
    return pure_dp_rdp(MAX_COUNT_SENSITIVITY / scale, count, orders)


def argmax_rdp(noise: str, scale: float, count: int = 1, orders=ORDERS) -> np.ndarray:
    return gnmax_rdp(scale, count, orders) if noise == "gaussian" else lnmax_rdp(scale, count, orders)


def epsilon_of(rdp: np.ndarray, delta: float, orders=ORDERS) -> float:
    """(epsilon, delta)-DP of an RDP curve, by opacus's conversion; 0 when nothing was spent."""
    if not np.any(rdp > 0):
        return 0.0
    with warnings.catch_warnings():  # opacus warns when the best order is at the edge of the grid
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)


class PrivacyLedger:
    """The RDP spent so far, summed over mechanisms (composition adds RDP at each order)."""

    def __init__(self, delta: float, orders=ORDERS) -> None:
        if not 0 < delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {delta}")
        self.delta, self.orders = delta, tuple(orders)
        self.rdp = np.zeros(len(self.orders))
        self.counts: Counter[str] = Counter()

    def spend(self, rdp: np.ndarray, what: str) -> None:
        self.rdp = self.rdp + rdp
        self.counts[what] += 1

    def epsilon(self, extra: np.ndarray | None = None) -> float:
        """Epsilon spent so far (plus `extra`, to ask what one more query would cost)."""
        return epsilon_of(self.rdp if extra is None else self.rdp + extra, self.delta, self.orders)

    def state_dict(self) -> dict:
        return {"rdp": self.rdp.tolist(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.rdp = np.asarray(state["rdp"], dtype=float)
        self.counts = Counter(state["counts"])

"""Distribution-constrained learning (Zhong, Sorscher, Lee & Sompolinsky, NeurIPS 2022): the 1-D optimal-transport
projection, the perceptron trained by gradient steps alternated with transport steps, the capacity sweep on
random patterns and the theory curve of the critical load.

The constraint: the N weights of a perceptron, seen as an empirical distribution, must equal a prescribed
distribution P (up to the overall scale, which a sign perceptron without margin ignores).

1-D optimal transport. For uniform weights on N points and any convex cost, the optimal map sends the k-th
smallest weight to the k-th smallest target quantile (quantile matching):

    T(w)_i = F_P^{-1}((rank(w_i) + 1/2) / N)                                                       (OT map)

A transport step moves the weights a fraction eta along the Wasserstein-2 geodesic toward P:

    w <- (1 - eta) w + eta T(w)                                                                     (geodesic step)

Theory of the critical load at zero margin (replica-symmetric, see README for what was and was not verified):
with Z ~ N(0, 1), F_P^{-1} the quantile function of P and T = F_P^{-1} o Phi its monotone transport map from the
standard normal,

    alpha_c(P) = 2 E[Z T(Z)]^2 / E[T(Z)^2] = 2 (1 - W2(P~, N(0,1))^2 / 2)^2                        (capacity)

where P~ is P rescaled to unit second moment and W2 the Wasserstein-2 distance (the paper's Eq. 3-5 at zero
margin). It gives Gardner's 2 for a Gaussian P and shrinks with the distance of P from the Gaussian; for a
lognormal with shape sigma it is 2 sigma^2 exp(-sigma^2) (largest, 2/e, at sigma = 1).

Populations with fixed identities (the paper's E/I model, Eq. 10): population m holds a fraction g_m of the
synapses, each transported onto its own distribution P_m, never across, and

    alpha_c = 2 (sum_m g_m E[Z T_m(Z)])^2 / sum_m g_m E[T_m(Z)^2]                                  (Eq. 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit

from core.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# Prescribed distributions


KINDS = ("gaussian", "lognormal", "ei", "ei_mixture", "halfnormal")


@dataclass(frozen=True)
class WeightDistribution:
    """A prescribed weight distribution, given by its quantile function.

    kind: "gaussian" (N(0,1)); "lognormal" (shape `sigma`: all weights positive); "ei" (the paper's E/I model,
    its Eq. 10: a fraction `f_exc` of the synapses is excitatory, positive, the rest inhibitory, negative, each
    population with lognormal magnitudes of shape `sigma`, the inhibitory ones scaled by `inh_scale`; which
    synapse is E or I is drawn once at initialisation and never changes, and each population is transported onto
    its own distribution); "ei_mixture" (the same overall distribution transported as ONE population, so a
    synapse may change sign: this package's model before it followed Eq. 10); "halfnormal" (|N(0,1)|).
    balanced: the inhibitory scale is set by the E/I balance condition of the paper's Sec. 4,
    g_E <w_E> = g_I <|w_I|>, which for equal shapes gives inh_scale = f_exc / (1 - f_exc)."""

    kind: str = "gaussian"
    sigma: float = 1.0
    f_exc: float = 0.8
    inh_scale: float = 1.0
    balanced: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"distribution kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.balanced and not (self.kind in ("ei", "ei_mixture") and 0.0 < self.f_exc < 1.0):
            raise ConfigError(f"the E/I balance needs an E/I kind with 0 < f_exc < 1, got {self.kind} {self.f_exc}")
        if not self.sigma > 0:
            raise ConfigError(f"the lognormal shape sigma must be positive, got {self.sigma}")
        if not 0.0 <= self.f_exc <= 1.0:
            raise ConfigError(f"the excitatory fraction f_exc must be in [0, 1], got {self.f_exc}")
        if not self.inh_scale > 0:
            raise ConfigError(f"inh_scale must be positive, got {self.inh_scale}")

    @property
    def inh(self) -> float:
        """The inhibitory magnitudes' scale: `inh_scale`, or the balance condition's f_exc / (1 - f_exc)."""
        return self.f_exc / (1.0 - self.f_exc) if self.balanced else self.inh_scale

    def populations(self) -> list[tuple[float, WeightDistribution]]:
        """(fraction g_m, distribution of population m): two for "ei" (E: lognormal; I: the negated, scaled
        lognormal), one (the distribution itself) for every other kind."""
        if self.kind != "ei":
            return [(1.0, self)]
        out = []
        if self.f_exc > 0:
            out.append((self.f_exc, WeightDistribution("ei_mixture", sigma=self.sigma, f_exc=1.0)))
        if self.f_exc < 1:
            out.append((1.0 - self.f_exc, WeightDistribution("ei_mixture", self.sigma, f_exc=0.0, inh_scale=self.inh)))
        return out

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """F_P^{-1}(u) for u in (0, 1): for the E/I kinds the quantile function of the overall mixture."""
        u = np.asarray(u, dtype=float)
        if self.kind == "gaussian":
            return stats.norm.ppf(u)
        if self.kind == "halfnormal":
            return stats.norm.ppf((1.0 + u) / 2.0)
        magnitude = stats.lognorm(s=self.sigma)
        if self.kind == "lognormal":
            return magnitude.ppf(u)
        # E/I mixture: the lowest (1 - f_exc) mass is inhibitory (negative, largest magnitude first), the rest
        # excitatory
        f_inh = 1.0 - self.f_exc
        out = np.empty_like(u)
        inh = u < f_inh
        out[inh] = -self.inh * magnitude.ppf(1.0 - u[inh] / f_inh)
        out[~inh] = magnitude.ppf((u[~inh] - f_inh) / self.f_exc)
        return out

    def label(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal(sigma={self.sigma:g})"
        if self.kind in ("ei", "ei_mixture"):
            name = "E/I" if self.kind == "ei" else "E/I mixture"
            scale = ", balanced" if self.balanced else (f", inh={self.inh_scale:g}" if self.inh_scale != 1 else "")
            return f"{name}(f_exc={self.f_exc:g}, sigma={self.sigma:g}{scale})"
        return self.kind


def target_quantiles(dist: WeightDistribution, n: int) -> np.ndarray:
    """The n midpoint quantiles F_P^{-1}((k + 1/2) / n), k = 0..n-1, sorted ascending: the weights of a perceptron
    of n synapses whose empirical distribution is P. (The paper's Eq. 8 reads the empirical CDF, rank / n with
    ranks 1..n, whose top point F_P^{-1}(1) is infinite for an unbounded P; see the README.)"""
    return dist.quantile((np.arange(n) + 0.5) / n)


@dataclass
class Constraint:
    """Where each population sits among the n synapses and its sorted targets. The identities are fixed: the
    synapses of `index[m]` always carry a permutation of `targets[m]`."""

    index: list[np.ndarray]
    targets: list[np.ndarray]

    @property
    def n(self) -> int:
        return sum(len(i) for i in self.index)


def make_constraint(dist: WeightDistribution, n: int, rng: np.random.Generator) -> Constraint:
    """One population over all n synapses, or for "ei" round(f_exc n) excitatory synapses at random positions
    (drawn here, once: their identity never changes) and the rest inhibitory, each with its own midpoint
    quantiles."""
    pops = dist.populations()
    if len(pops) == 1:
        return Constraint([np.arange(n)], [target_quantiles(pops[0][1], n)])
    n_exc = int(round(dist.f_exc * n))
    if not 0 < n_exc < n:
        raise ConfigError(f"E/I with f_exc {dist.f_exc} leaves a population empty at n = {n}")
    order = rng.permutation(n)
    index = [np.sort(order[:n_exc]), np.sort(order[n_exc:])]
    return Constraint(index, [target_quantiles(pops[0][1], n_exc), target_quantiles(pops[1][1], n - n_exc)])


def project(w: np.ndarray, constraint: Constraint) -> np.ndarray:
    """(OT map, per population) each population's weights quantile-matched onto its own targets."""
    out = np.empty_like(np.asarray(w, dtype=float))
    for idx, target in zip(constraint.index, constraint.targets, strict=True):
        out[idx] = ot_map(w[idx], target)
    return out


def random_on_constraint(constraint: Constraint, rng: np.random.Generator, n: int) -> np.ndarray:
    """A random point of the constraint: each population's targets in random order."""
    w = np.empty(n)
    for idx, target in zip(constraint.index, constraint.targets, strict=True):
        w[idx] = rng.permutation(target)
    return w


# --------------------------------------------------------------------------------------------------------------
# Optimal transport in one dimension


def ot_map(w: np.ndarray, target_sorted: np.ndarray) -> np.ndarray:
    """(OT map) The optimal transport of the empirical distribution of `w` onto `target_sorted` (n sorted values,
    uniform weights): the k-th smallest w_i goes to the k-th smallest target. Ties in w are broken by index
    (a stable sort), so the map is a permutation of the targets that preserves the rank order of w."""
    w = np.asarray(w, dtype=float)
    if w.shape != target_sorted.shape:
        raise ValueError(f"weights {w.shape} and targets {target_sorted.shape} differ in shape")
    out = np.empty_like(w)
    out[np.argsort(w, kind="stable")] = target_sorted
    return out


def geodesic_step(w: np.ndarray, target_sorted: np.ndarray, eta: float) -> np.ndarray:
    """(geodesic step) w <- (1 - eta) w + eta T(w): eta = 1 is the full projection onto the constraint."""
    return (1.0 - eta) * w + eta * ot_map(w, target_sorted)


def wasserstein2_sq(w: np.ndarray, target_sorted: np.ndarray) -> float:
    """W2^2 between the empirical distribution of w and the targets (uniform weights): mean squared gap of the
    sorted values (in 1-D the monotone coupling is optimal)."""
    return float(np.mean((np.sort(w) - target_sorted) ** 2))


# --------------------------------------------------------------------------------------------------------------
# Theory


def transport_from_normal(dist: WeightDistribution, z: np.ndarray) -> np.ndarray:
    """T(z) = F_P^{-1}(Phi(z)), the monotone map from N(0, 1) to P, written with Phi(z) and Phi(-z) so that both
    tails keep full precision (Phi(9) is 1.0 in double precision; Phi(-9) is not 0)."""
    z = np.asarray(z, dtype=float)
    lower, upper = stats.norm.cdf(z), stats.norm.sf(z)  # Phi(z), 1 - Phi(z)
    if dist.kind == "gaussian":
        return z
    if dist.kind == "halfnormal":  # F^{-1}(u) = Phi^{-1}((1 + u) / 2) = isf((1 - u) / 2)
        return stats.norm.isf(upper / 2.0)
    if dist.kind == "lognormal":  # F^{-1}(Phi(z)) = exp(sigma z) exactly
        return np.exp(dist.sigma * z)
    magnitude = stats.lognorm(s=dist.sigma)
    f_inh = 1.0 - dist.f_exc
    out = np.empty_like(z)
    # all inhibitory at f_exc = 0 (Phi(z) rounds to 1 for z > 8.3, so `lower < 1` would leave those unset)
    inh = np.ones_like(z, dtype=bool) if dist.f_exc == 0 else lower < f_inh
    if f_inh > 0:  # inhibitory: -scale * ppf(1 - u / f_inh) = -scale * isf(u / f_inh)
        out[inh] = -dist.inh * magnitude.isf(lower[inh] / f_inh)
    if dist.f_exc > 0:  # excitatory: ppf((u - f_inh) / f_exc) = isf((1 - u) / f_exc)
        out[~inh] = magnitude.isf(upper[~inh] / dist.f_exc)
    return out


def _gauss_moments(dist: WeightDistribution, nodes: int = 64, pieces: int = 64) -> tuple[float, float]:
    """E[Z T(Z)] and E[T(Z)^2] by composite Gauss-Legendre in z, split where T jumps (the E/I boundary) and
    wide enough for the lognormal tail (the second moment's integrand peaks at z = 2 sigma). For the
    two-population "ei" kind: the g_m-weighted sums over the populations, each with its own map T_m."""
    if dist.kind == "ei":
        moments = [(g, _gauss_moments(sub, nodes, pieces)) for g, sub in dist.populations()]
        return sum(g * m[0] for g, m in moments), sum(g * m[1] for g, m in moments)
    hi = 10.0 + 2.0 * (dist.sigma if dist.kind in ("lognormal", "ei_mixture") else 0.0)
    breaks = [-hi, hi]
    if dist.kind == "ei_mixture" and 0.0 < dist.f_exc < 1.0:
        breaks = [-hi, float(stats.norm.ppf(1.0 - dist.f_exc)), hi]
    x, w = np.polynomial.legendre.leggauss(nodes)
    m_cross = m_second = 0.0
    for a, b in zip(breaks[:-1], breaks[1:], strict=True):
        edges = np.linspace(a, b, pieces + 1)
        half = (edges[1:] - edges[:-1])[:, None] / 2
        z = ((edges[1:] + edges[:-1])[:, None] / 2 + half * x[None, :]).ravel()
        weight = (half * w[None, :]).ravel() * stats.norm.pdf(z)
        t = transport_from_normal(dist, z)
        m_cross += float(np.sum(weight * z * t))
        m_second += float(np.sum(weight * t * t))
    return m_cross, m_second


def capacity_theory(dist: WeightDistribution) -> float:
    """(capacity) alpha_c(P) = 2 E[Z T(Z)]^2 / E[T(Z)^2] with Z ~ N(0, 1) and T = F_P^{-1} o Phi (paper Eq. 3-4).
    The expectations are integrals over z (transport_from_normal, _gauss_moments); the same numbers as the
    integrals over u in (0, 1) of Phi^{-1}(u) F_P^{-1}(u) and F_P^{-1}(u)^2 (tested on a quantile grid).
    Populations with fixed identities (kind "ei", paper Eq. 10):
    alpha_c = 2 (sum_m g_m E[Z T_m(Z)])^2 / sum_m g_m E[T_m(Z)^2], each T_m the map from N(0, 1) onto
    population m's own distribution (Eq. 10 with the overall second moment sum_m g_m <w_m^2> fixed to 1)."""
    m_cross, m_second = _gauss_moments(dist)
    return 2.0 * m_cross**2 / m_second  # Eq. (capacity)


def cover_separable_probability(p: int, n: int) -> float:
    """Cover (1965): the probability that p random patterns in general position in R^n with random labels are
    linearly separable through the origin, C(p, n) / 2^p = 2^(1-p) sum_{k<n} binom(p-1, k). It is 1/2 at p = 2n."""
    # 2^(1-p) sum_{k<n} binom(p-1, k) is the probability that a Binomial(p - 1, 1/2) is at most n - 1
    return float(stats.binom.cdf(n - 1, p - 1, 0.5)) if p > 0 else 1.0


# --------------------------------------------------------------------------------------------------------------
# The algorithm


@dataclass
class PerceptronResult:
    weights: np.ndarray  # (N,) final weights, exactly on the constraint (a permutation of the target quantiles)
    solved: bool  # every pattern on the right side (y_mu w . xi_mu > 0) after the final projection
    iterations: int
    train_error: float  # fraction of patterns misclassified at the end
    w2_to_target: float  # W2^2 of the weights before the final projection (how far training left them)


def train_constrained_perceptron(
    patterns: np.ndarray,
    labels: np.ndarray,
    dist: WeightDistribution | None,
    rng: np.random.Generator,
    lr: float = 0.5,
    eta: float = 0.02,
    margin: float = 0.5,
    max_iter: int = 1000,
    algorithm: str = "logistic",
    beta_lr: float | None = None,
    beta0: float = 1.0,
    callback=None,
) -> PerceptronResult:
    """Gradient steps on the task, each followed by a geodesic step toward the constraint (DisCo-SGD, the paper's
    Table 1: a step of Eq. 7, then a step of Eq. 9); dist None: unconstrained. For "ei" the E/I identities are
    drawn here, once, and each population is transported onto its own targets (never across).

    algorithm "logistic" (the paper's): full-batch gradient descent on the logistic loss
    L = mean_mu log(1 + exp(-beta y_mu w . xi_mu / sqrt N)) with the weights on the unit-second-moment scale
    (the paper's <w^2> = 1) and the trainable norm beta (started at `beta0`; its own step size `beta_lr`, default `lr`).
    algorithm "hinge" (this package's earlier rule): steps on the hinge loss of the normalized fields
    h_mu = y_mu w . xi_mu / (|w| / sqrt N) with margin `margin`, scaled by |w| / sqrt N.

    patterns: (P, N); labels: (P,) in {-1, +1}. Stops as soon as the projected weights classify every pattern.
    callback(iteration, projected weights) is called before each iteration's check (tests read it)."""
    if algorithm not in ("logistic", "hinge"):
        raise ConfigError(f"algorithm must be logistic or hinge, got {algorithm!r}")
    n_patterns, n = patterns.shape
    constraint = make_constraint(dist, n, rng) if dist is not None else None
    # start on the constraint: each population's targets in random order (or a Gaussian vector when unconstrained)
    w = random_on_constraint(constraint, rng, n) if constraint is not None else rng.standard_normal(n)
    work = constraint
    rms = 1.0
    if algorithm == "logistic" and constraint is not None:  # the paper's scale: overall second moment 1
        rms = float(np.sqrt(np.mean(np.concatenate(constraint.targets) ** 2)))
        work = Constraint(constraint.index, [t / rms for t in constraint.targets])
        w = w / rms
    signed = patterns * labels[:, None]  # (P, N): y_mu xi_mu
    scale = np.sqrt(n)
    beta, beta_lr = beta0, lr if beta_lr is None else beta_lr
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported in the result)
        w_eval = project(w, work) if work is not None else w
        if callback is not None:
            callback(iterations, w_eval * rms)
        fields = signed @ w_eval / (np.linalg.norm(w_eval) / scale)  # (P,)
        if np.all(fields > 0):
            break
        if algorithm == "logistic":
            # (Eq. 7) d/dw of mean log(1 + e^{-m}), m = beta y w.xi / sqrt N: -mean sigma(-m) beta y xi / sqrt N
            raw = signed @ w / scale  # (P,) y w.xi / sqrt N
            weight = expit(-beta * raw)  # sigma(-m) = 1 - sigma(m), the logistic residual
            grad_w = -beta * (weight @ signed) / scale / n_patterns
            grad_beta = -float(weight @ raw) / n_patterns
            w = w - lr * grad_w
            beta = beta - beta_lr * grad_beta
        else:
            # hinge loss sum_mu max(0, margin - h_mu): its (sub)gradient at fixed norm is -sum over violators of y xi
            violators = fields < margin
            grad = -signed[violators].sum(axis=0) / scale
            w = w - lr * grad * (np.linalg.norm(w) / np.sqrt(n)) / max(1, violators.sum()) ** 0.5
        if work is not None:
            w = (1.0 - eta) * w + eta * project(w, work)  # (Eq. 9, geodesic step, per population)
    w = w * rms
    w2 = 0.0
    if constraint is not None:  # per population, weighted by its size
        pairs = zip(constraint.index, constraint.targets, strict=True)
        w2 = sum(wasserstein2_sq(w[i], t) * len(i) for i, t in pairs) / n
    w_final = project(w, constraint) if constraint is not None else w
    fields = signed @ w_final
    return PerceptronResult(
        weights=w_final,
        solved=bool(np.all(fields > 0)),
        iterations=iterations,
        train_error=float(np.mean(fields <= 0)),
        w2_to_target=w2,
    )


def random_task(n_patterns: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """P Gaussian patterns in R^N with random +-1 labels (the capacity problem of Gardner 1988)."""
    return rng.standard_normal((n_patterns, n)), rng.choice([-1.0, 1.0], size=n_patterns)


def separable_lp(patterns: np.ndarray, labels: np.ndarray) -> bool:
    """Exact feasibility of y_mu w . xi_mu >= 1 for all mu (a linear program): the unconstrained reference."""
    from scipy.optimize import linprog

    signed = patterns * labels[:, None]
    n = patterns.shape[1]
    res = linprog(np.zeros(n), A_ub=-signed, b_ub=-np.ones(len(labels)), bounds=[(None, None)] * n, method="highs")
    return res.status == 0


def success_curve(
    dist: WeightDistribution | None,
    n: int,
    loads: np.ndarray,
    trials: int,
    seed: int,
    solver: str = "ot",
    **train_kwargs,
) -> np.ndarray:
    """Fraction of `trials` random tasks solved at each load alpha = P / N. solver "ot": the constrained
    algorithm (dist None: unconstrained gradient steps); "lp": exact linear-programming feasibility
    (unconstrained only)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(loads))
    for i, alpha in enumerate(loads):
        p = max(1, int(round(alpha * n)))
        solved = 0
        for _ in range(trials):
            patterns, labels = random_task(p, n, rng)
            if solver == "lp":
                solved += separable_lp(patterns, labels)
            else:
                solved += train_constrained_perceptron(patterns, labels, dist, rng, **train_kwargs).solved
        out[i] = solved / trials
    return out


def critical_load(loads: np.ndarray, success: np.ndarray) -> float:
    """The load where the success fraction crosses 1/2, by linear interpolation between the two grid points
    around the crossing (the first one going down); the ends of the grid when it never crosses."""
    loads, success = np.asarray(loads, dtype=float), np.asarray(success, dtype=float)
    if success[0] < 0.5:
        return float(loads[0])
    for i in range(1, len(loads)):
        if success[i] < 0.5:
            s0, s1 = success[i - 1], success[i]
            return float(loads[i - 1] + (s0 - 0.5) / (s0 - s1) * (loads[i] - loads[i - 1]))
    return float(loads[-1])

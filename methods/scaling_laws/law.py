"""The supervised and distillation scaling laws of Busbridge et al. (2025), their robust fit and a compute helper.

    L(N, D)            = E + (A / N^alpha + B / D^beta)^gamma                                           Eq. (1)
    L_S(N_S, D_S, L_T) = L_T + L_T^(-c0) (1 + (L_T / (d1 Ltilde_S))^(1/f1))^(-c1 f1)
                              (A' / N_S^alpha' + B' / D_S^beta')^gamma'                                 Eq. (8)

with Ltilde_S = L(N_S, D_S) the supervised loss the same student would reach on the same data (Eq. 1). N counts
non-embedding parameters, D tokens, losses are cross-entropies in nats.

Fitting follows the scaling-law convention (Hoffmann et al. 2022, Busbridge et al. 2025 App. F): minimize the
Huber loss (delta = 1e-4 .. 1e-3) between log predicted and log measured loss with L-BFGS-B from a grid of
initializations, keep the best; intervals from a bootstrap over data points (refit on resampled points).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize

from core.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# The laws


@dataclass(frozen=True)
class SupervisedLaw:
    """Coefficients of Eq. (1). Busbridge et al. report E=1.220, A=3355, alpha=0.408, B=18186, beta=0.431,
    gamma=0.452 for their C4 models (transcribed from the paper's fitted law; see README)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    gamma: float

    def __call__(self, N, D):
        return supervised_loss(N, D, self)


@dataclass(frozen=True)
class DistillationLaw:
    """Coefficients of Eq. (8); `sup` gives Ltilde_S (the student's supervised loss)."""

    sup: SupervisedLaw
    c0: float
    c1: float
    d1: float
    f1: float
    A: float  # A'
    alpha: float  # alpha'
    B: float  # B'
    beta: float  # beta'
    gamma: float  # gamma'

    def __call__(self, L_T, N_S, D_S):
        return distillation_loss(L_T, N_S, D_S, self)


PAPER_SUPERVISED = SupervisedLaw(E=1.220, A=3355.0, alpha=0.408, B=18186.0, beta=0.431, gamma=0.452)


def supervised_loss(N, D, law: SupervisedLaw):
    """Eq. (1): L(N, D) = E + (A / N^alpha + B / D^beta)^gamma. N, D: arrays of the same shape (or scalars)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return law.E + (law.A / N**law.alpha + law.B / D**law.beta) ** law.gamma  # Eq. (1)


def distillation_loss(L_T, N_S, D_S, law: DistillationLaw):
    """Eq. (8). L_T: teacher cross-entropy; N_S, D_S: student non-embedding parameters and distillation tokens.

    Since every factor after L_T is positive, L_S > L_T for any coefficients: the law never lets a student beat
    its teacher (the paper's first qualitative claim holds by the form)."""
    L_T, N_S, D_S = (np.asarray(x, dtype=float) for x in (L_T, N_S, D_S))
    L_tilde = supervised_loss(N_S, D_S, law.sup)  # the student's supervised loss, Eq. (1)
    teacher_factor = L_T ** (-law.c0)
    # broken power law in the ratio L_T / (d1 Ltilde_S): the capacity gap (a teacher much better than what the
    # student could learn alone helps less) lives in this factor
    transition = (1.0 + (L_T / (law.d1 * L_tilde)) ** (1.0 / law.f1)) ** (-law.c1 * law.f1)
    student_term = (law.A / N_S**law.alpha + law.B / D_S**law.beta) ** law.gamma
    return L_T + teacher_factor * transition * student_term  # Eq. (8)


# --------------------------------------------------------------------------------------------------------------
# Robust fits


def _log_sup(theta, logN, logD):
    """log L(N, D) in the parametrization the fit uses: theta = (e, a, alpha, b, beta, gamma) with E = exp(e),
    A = exp(a), B = exp(b), computed with log-sum-exp so that N^alpha of 10^9 never overflows. Torch tensors
    (float64), so that the fit gets exact gradients by autograd."""
    e, a, alpha, b, beta, gamma = theta
    reducible = gamma * torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD]), dim=0)
    return torch.logaddexp(e, reducible)


def _sup_from_theta(theta: Sequence[float]) -> SupervisedLaw:
    e, a, alpha, b, beta, gamma = (float(x) for x in theta)
    return SupervisedLaw(
        E=float(np.exp(e)), A=float(np.exp(a)), alpha=alpha, B=float(np.exp(b)), beta=beta, gamma=gamma
    )


def _log_distill(phi, sup: SupervisedLaw, L_T, logN, logD, free_exponents: bool):
    """log of Eq. (8) in the fit's parametrization (torch, float64); see _distill_from_phi."""
    c0, c1, log_d1, log_f1, a, b = phi[:6]
    alpha, beta, gamma = phi[6:9] if free_exponents else (sup.alpha, sup.beta, sup.gamma)
    log_L_tilde = _log_sup(torch.tensor(_theta_from_sup(sup), dtype=torch.float64), logN, logD)  # log Ltilde_S, Eq. (1)
    log_LT = torch.log(L_T)
    f1 = torch.exp(log_f1)
    # log(1 + (L_T / (d1 Ltilde))^(1/f1)) as a softplus of its log, stable for any ratio
    log_transition = -c1 * f1 * torch.nn.functional.softplus((log_LT - log_d1 - log_L_tilde) / f1)
    log_student = gamma * torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD]), dim=0)
    log_excess = -c0 * log_LT + log_transition + log_student
    return torch.logaddexp(log_LT, log_excess)  # log(L_T + excess), Eq. (8)


def _theta_from_sup(law: SupervisedLaw) -> np.ndarray:
    return np.array([np.log(law.E), np.log(law.A), law.alpha, np.log(law.B), law.beta, law.gamma])


def _distill_from_phi(phi: Sequence[float], sup: SupervisedLaw, free_exponents: bool) -> DistillationLaw:
    """phi = (c0, c1, log d1, log f1, log A', log B'[, alpha', beta', gamma']); without free exponents the
    student term keeps the supervised alpha, beta, gamma (fewer parameters for a small grid: see README)."""
    phi = [float(x) for x in phi]
    c0, c1, log_d1, log_f1, a, b = phi[:6]
    alpha, beta, gamma = phi[6:9] if free_exponents else (sup.alpha, sup.beta, sup.gamma)
    return DistillationLaw(
        sup=sup,
        c0=c0,
        c1=c1,
        d1=float(np.exp(log_d1)),
        f1=float(np.exp(log_f1)),
        A=float(np.exp(a)),
        alpha=float(alpha),
        B=float(np.exp(b)),
        beta=float(beta),
        gamma=float(gamma),
    )


def _huber_objective(log_pred, log_obs, delta: float):
    """Sum of Huber losses of the log residuals: r^2 / 2 for |r| <= delta, delta (|r| - delta / 2) beyond."""
    r = (log_pred - log_obs).abs()
    return torch.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum()


def _with_grad(log_pred_fn, log_obs, delta):
    """scipy objective (value, gradient) of the Huber loss of log_pred_fn(params) against log_obs, by autograd."""

    def fun(x: np.ndarray):
        params = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = _huber_objective(log_pred_fn(params), log_obs, delta)
        if not torch.isfinite(value):
            return 1e6, np.zeros_like(x)
        (grad,) = torch.autograd.grad(value, params)
        return float(value.detach()), grad.numpy().copy()

    return fun


def _best_of(make_objective, inits: list[np.ndarray], bounds) -> tuple[np.ndarray, float]:
    best_x, best_f = None, np.inf
    fun = make_objective
    for x0 in inits:
        res = minimize(fun, np.asarray(x0, dtype=float), jac=True, method="L-BFGS-B", bounds=bounds)
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise ValueError("every initialization of the fit failed (non-finite objective)")
    return best_x, best_f


@dataclass
class Fit:
    """The best of several L-BFGS-B runs: its law, objective and the spread of bootstrap refits."""

    law: SupervisedLaw | DistillationLaw
    objective: float
    n_points: int
    n_inits: int
    bootstrap: list = field(default_factory=list)  # laws refit on resampled points

    def interval(self, name: str, level: float = 0.9) -> tuple[float, float]:
        """Percentile interval of one coefficient over the bootstrap refits."""
        if not self.bootstrap:
            raise ValueError("no bootstrap refits; call with n_bootstrap > 0")
        values = np.array([getattr(law, name) for law in self.bootstrap])
        lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        law = asdict(self.law)
        return {"law": law, "objective": self.objective, "n_points": self.n_points, "n_inits": self.n_inits}


def _check_points(*arrays: np.ndarray) -> None:
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ConfigError("the fit needs arrays of the same length")
    for a in arrays:
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ConfigError("the fit needs positive, finite sizes, token counts and losses")


SUP_BOUNDS = [(-5.0, 5.0), (-10.0, 30.0), (0.0, 2.0), (-10.0, 30.0), (0.0, 2.0), (0.05, 3.0)]


def _sup_objective_and_grad(theta, logN, logD, logL, delta):
    """Huber loss of log Eq. (1) against log L and its exact gradient (numpy; the same value as _log_sup with
    _huber_objective, tested against autograd)."""
    e, a, alpha, b, beta, gamma = theta
    u = np.stack([a - alpha * logN, b - beta * logD])  # (2, n)
    lse = np.logaddexp(u[0], u[1])
    w = np.exp(u - lse)  # softmax weights of the two terms
    reducible = gamma * lse
    y = np.logaddexp(e, reducible)  # log L(N, D)
    s_e = np.exp(e - y)  # d y / d e
    s_r = 1.0 - s_e  # d y / d reducible
    r = y - logL
    dh = np.clip(r, -delta, delta)  # d huber / d r
    value = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = dh * s_r * gamma
    grad = np.array(
        [
            np.sum(dh * s_e),
            np.sum(g * w[0]),
            np.sum(-g * w[0] * logN),
            np.sum(g * w[1]),
            np.sum(-g * w[1] * logD),
            np.sum(dh * s_r * lse),
        ]
    )
    return float(value), grad


def _subset(inits: list, n: int | None) -> list:
    """n starts evenly spaced over the grid (all of them when n is None or larger)."""
    if n is None or n >= len(inits):
        return inits
    return [inits[i] for i in np.linspace(0, len(inits) - 1, max(n, 1)).round().astype(int)]


def _as_t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def fit_supervised(
    N,
    D,
    L,
    delta: float = 1e-3,
    n_bootstrap: int = 0,
    seed: int = 0,
    inits: list[np.ndarray] | None = None,
    n_starts: int | None = None,
    fixed_E: float | None = None,
) -> Fit:
    """Fit Eq. (1) to measured (N, D, L): Huber loss on log L, L-BFGS-B from a grid of initializations (16, or
    `n_starts` evenly spaced among them, or the given `inits`). `fixed_E` holds E at a known irreducible loss
    (the entropy rate of a generated language) instead of fitting it."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    _check_points(N, D, L)
    logN, logD, logL = _as_t(np.log(N)), _as_t(np.log(D)), _as_t(np.log(L))
    if inits is None:
        # a small grid in the spirit of Hoffmann et al. (theirs is larger; 16 starts keep the fit to seconds)
        e0 = [np.log(max(L.min() * 0.9, 1e-3)), np.log(max(L.min() * 0.5, 1e-3))]
        grid = itertools.product(e0, [0.0, 6.0], [0.25, 0.6], [3.0], [0.25, 0.6], [0.7])
        inits = _subset([np.array(x) for x in grid], n_starts)

    logN, logD, logL = logN.numpy(), logD.numpy(), logL.numpy()
    bounds = list(SUP_BOUNDS)
    if fixed_E is not None:
        if not 0 < fixed_E < L.min():
            raise ConfigError(f"a fixed E must be positive and below every measured loss, got {fixed_E}")
        bounds[0] = (np.log(fixed_E), np.log(fixed_E))  # L-BFGS-B keeps a variable with equal bounds fixed
        inits = [np.array([np.log(fixed_E), *x[1:]]) for x in inits]

    def objective(idx):
        return lambda theta: _sup_objective_and_grad(theta, logN[idx], logD[idx], logL[idx], delta)

    everything = np.arange(len(L))
    theta, f = _best_of(objective(everything), inits, bounds)
    fit = Fit(law=_sup_from_theta(theta), objective=f, n_points=len(L), n_inits=len(inits))
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(L), len(L))
        # refit from the full fit's optimum and a few grid points: the resampled optimum lies near the full one
        starts = [theta, inits[len(inits) // 2]]
        theta_b, _ = _best_of(objective(idx), starts, bounds)
        fit.bootstrap.append(_sup_from_theta(theta_b))
    return fit


def fit_distillation(
    sup: SupervisedLaw,
    L_T,
    N_S,
    D_S,
    L_S,
    free_exponents: bool = False,
    delta: float = 1e-3,
    n_bootstrap: int = 0,
    seed: int = 0,
    inits: list[np.ndarray] | None = None,
    n_starts: int | None = None,
) -> Fit:
    """Fit Eq. (8) to measured (L_T, N_S, D_S, L_S) with the supervised law `sup` held fixed (the paper fits the
    supervised law first, on supervised runs, then the distillation coefficients)."""
    L_T, N_S, D_S, L_S = (np.asarray(x, dtype=float) for x in (L_T, N_S, D_S, L_S))
    _check_points(L_T, N_S, D_S, L_S)
    LT, logN, logD, logL = _as_t(L_T), _as_t(np.log(N_S)), _as_t(np.log(D_S)), _as_t(np.log(L_S))
    bounds = [(-5.0, 5.0), (-5.0, 5.0), (-5.0, 5.0), (-4.0, 3.0), (-10.0, 30.0), (-10.0, 30.0)]
    if free_exponents:
        bounds += [(0.0, 2.0), (0.0, 2.0), (0.05, 3.0)]
    if inits is None:
        grid = itertools.product([0.0, 1.0], [0.0, 1.0], [0.0], [-1.0, 1.0], [np.log(sup.A), np.log(sup.A) + 2.0])
        extra = (sup.alpha, sup.beta, sup.gamma) if free_exponents else ()
        inits = _subset([np.array([*g, np.log(sup.B), *extra]) for g in grid], n_starts)

    def objective(idx):
        return _with_grad(
            lambda p: _log_distill(p, sup, LT[idx], logN[idx], logD[idx], free_exponents), logL[idx], delta
        )

    phi, f = _best_of(objective(torch.arange(len(L_S))), inits, bounds)
    fit = Fit(law=_distill_from_phi(phi, sup, free_exponents), objective=f, n_points=len(L_S), n_inits=len(inits))
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        idx = torch.as_tensor(rng.integers(0, len(L_S), len(L_S)))
        starts = [phi, inits[len(inits) // 2]]
        phi_b, _ = _best_of(objective(idx), starts, bounds)
        fit.bootstrap.append(_distill_from_phi(phi_b, sup, free_exponents))
    return fit


# --------------------------------------------------------------------------------------------------------------
# Compute-optimal choice


def supervised_flops(N, D):
    """6 N D: forward and backward of a dense model (Kaplan et al. 2020; the paper's supervised cost)."""
    return 6.0 * np.asarray(N, dtype=float) * np.asarray(D, dtype=float)


def distillation_flops(N_S, D_S, N_T, D_T=0.0, teacher_trained_for_this: bool = False):
    """Student training 6 N_S D_S plus teacher logits 2 N_T D_S (forward only), plus the teacher's own training
    6 N_T D_T when the teacher is trained for this student (the paper's scenarios: teacher exists / must be
    trained)."""
    cost = 6.0 * N_S * D_S + 2.0 * N_T * D_S
    return cost + (6.0 * N_T * D_T if teacher_trained_for_this else 0.0)


@dataclass
class Recommendation:
    choice: str  # "supervised" or "distill"
    loss: float  # predicted student loss of the choice
    supervised_loss: float
    distill_loss: float
    D_S: float  # student tokens of the choice
    N_T: float | None  # teacher size (distill)
    D_T: float | None  # teacher tokens (distill, teacher trained for this)
    agreement: float | None = None  # share of bootstrap laws that make the same choice
    loss_interval: tuple[float, float] | None = None  # 90% bootstrap interval of the predicted loss


def _choose(
    compute: float, N_S: float, sup: SupervisedLaw, dist: DistillationLaw, teachers: Sequence[float], train_teacher
):
    D_sup = compute / (6.0 * N_S)
    L_sup = float(supervised_loss(N_S, D_sup, sup))
    best = (np.inf, None, None, None)
    for N_T in teachers:
        if train_teacher:
            # split the budget between teacher training and distillation on a log grid of shares
            for share in np.linspace(0.05, 0.95, 19):
                D_T = share * compute / (6.0 * N_T)
                D_S = (1 - share) * compute / (6.0 * N_S + 2.0 * N_T)
                L_T = float(supervised_loss(N_T, D_T, sup))
                L_S = float(distillation_loss(L_T, N_S, D_S, dist))
                if L_S < best[0]:
                    best = (L_S, D_S, N_T, D_T)
        else:
            # an existing teacher: its loss comes from the supervised law at its own (given) training tokens
            N_T_size, D_T = N_T
            D_S = compute / (6.0 * N_S + 2.0 * N_T_size)
            L_T = float(supervised_loss(N_T_size, D_T, sup))
            L_S = float(distillation_loss(L_T, N_S, D_S, dist))
            if L_S < best[0]:
                best = (L_S, D_S, N_T_size, None)
    L_dist, D_S, N_T, D_T = best
    if L_dist < L_sup:
        return Recommendation("distill", L_dist, L_sup, L_dist, D_S, N_T, D_T)
    return Recommendation("supervised", L_sup, L_sup, L_dist, D_sup, None, None)


def compute_optimal(
    compute: float,
    N_S: float,
    sup_fit: Fit,
    dist_fit: Fit,
    teachers: Sequence[float] | Sequence[tuple[float, float]],
    train_teacher: bool = True,
) -> Recommendation:
    """The best way to get a student of N_S parameters for `compute` FLOPs: supervised on compute / (6 N_S)
    tokens, or distillation from one of `teachers` (sizes to train, with the best budget split, when
    `train_teacher`; else existing (N_T, D_T) pairs whose cost is only their inference). The uncertainty is the
    share of bootstrap laws that agree with the choice and the 90% interval of the chosen option's loss."""
    if compute <= 0 or N_S <= 0:
        raise ConfigError("compute and N_S must be positive")
    rec = _choose(compute, N_S, sup_fit.law, dist_fit.law, teachers, train_teacher)
    pairs = list(zip(sup_fit.bootstrap, dist_fit.bootstrap, strict=False))
    if pairs:
        choices, losses = [], []
        for sup_b, dist_b in pairs:
            r = _choose(compute, N_S, sup_b, dist_b, teachers, train_teacher)
            choices.append(r.choice == rec.choice)
            losses.append(r.loss)
        rec.agreement = float(np.mean(choices))
        rec.loss_interval = tuple(float(x) for x in np.percentile(losses, [5, 95]))
    return rec

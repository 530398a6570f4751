"""The supervised and distillation scaling laws of Busbridge et al. (2025), their robust fit and a compute helper.

    L(N, D)            = E + (A / N^alpha + B / D^beta)^gamma                                           Eq. (1)
    L_S(N_S, D_S, L_T) = L_T + L_T^(-c0) (1 + (L_T / (d1 Ltilde_S))^(1/f1))^(-c1 f1)
                              (A' / N_S^alpha' + B' / D_S^beta')^gamma'                                 Eq. (8)

with Ltilde_S = L(N_S, D_S) the supervised loss the same student would reach on the same data (Eq. 1). N counts
non-embedding parameters, D tokens, losses are cross-entropies in nats.

Fitting follows the scaling-law convention (Hoffmann et al. 2022, Busbridge et al. 2025): minimize the Huber loss
(delta = 1e-4, the paper's) between log predicted and log measured loss from a grid of initializations, keep the
best; intervals from a bootstrap over data points (refit on resampled points). The minimizer is a trust-region
Gauss-Newton on the same objective with tight tolerances, not L-BFGS-B (see SOLVER_TOL for why).

The paper's coefficients: PAPER_SUPERVISED (Eq. 1) and PAPER_DISTILLATION (Eq. 8, its Table 6).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import least_squares

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
# The paper's fitted distillation law (its Table 6), on top of its supervised law: predicts a student's C4
# cross-entropy out of the box, PAPER_DISTILLATION(L_T, N_S, D_S) (N_S non-embedding parameters, D_S tokens).
PAPER_DISTILLATION = DistillationLaw(
    sup=PAPER_SUPERVISED, c0=2.549, c1=522.6, d1=1.315, f1=0.090, A=2243.0, alpha=0.321, B=24181.0, beta=0.637,
    gamma=0.764,
)  # fmt: skip


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
    """Sum of Huber losses of the log residuals: r^2 / 2 for |r| <= delta, delta (|r| - delta / 2) beyond (torch;
    the reference the tests hold the numpy residuals and the solver's cost to)."""
    r = (log_pred - log_obs).abs()
    return torch.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum()


# The solver. The objective is the paper's (sum of Huber losses of log residuals). scipy's L-BFGS-B with its default
# tolerances stopped after 2-32 iterations on these objectives (their values are ~1e-6..1e-3, and its ftol test is
# absolute below 1): on noise-free data from PAPER_SUPERVISED it returned A = 405 (true 3355), B = 20.6 (18186),
# gamma = 0.865 (0.452). Tight tolerances fix Eq. (1) but not Eq. (8) at the paper's coefficients, whose c1 (522.6)
# and d1, f1 are nearly degenerate (L-BFGS-B with gtol 1e-14 still 0.55 % off after 359 iterations; README). A
# trust-region Gauss-Newton on the residuals (scipy least_squares, 'trf', with loss='huber' and f_scale=delta,
# whose cost 0.5 delta^2 sum rho((r / delta)^2) is exactly this Huber sum) with tolerances at 1e-12 recovers every
# coefficient of both laws to ~1e-12 from noise-free data (tests).
SOLVER_TOL = 1e-12
SOLVER_MAX_NFEV = 2000


def _sup_residuals(theta, logN, logD, logL) -> tuple[np.ndarray, np.ndarray]:
    """Residuals log Eq. (1) - log L (n,) and their Jacobian (n, 6) in theta = (e, a, alpha, b, beta, gamma) with
    E = exp(e), A = exp(a), B = exp(b) (numpy; the same values as _log_sup, tested against autograd)."""
    e, a, alpha, b, beta, gamma = theta
    u = np.stack([a - alpha * logN, b - beta * logD])  # (2, n)
    lse = np.logaddexp(u[0], u[1])
    w = np.exp(u - lse)  # softmax weights of the two terms
    y = np.logaddexp(e, gamma * lse)  # log L(N, D), Eq. (1)
    s_e = np.exp(e - y)  # d y / d e
    g = (1.0 - s_e) * gamma  # d y / d lse
    jac = np.stack([s_e, g * w[0], -g * w[0] * logN, g * w[1], -g * w[1] * logD, (1.0 - s_e) * lse], axis=1)
    return y - logL, jac


def _distill_residuals(phi, sup: SupervisedLaw, L_T, logN, logD, logL, free_exponents: bool):
    """Residuals log Eq. (8) - log L_S (n,) and their Jacobian (n, 6 or 9) in phi (see _distill_from_phi); numpy,
    the same values as _log_distill (tested against autograd)."""
    c0, c1, log_d1, log_f1, a, b = phi[:6]
    alpha, beta, gamma = phi[6:9] if free_exponents else (sup.alpha, sup.beta, sup.gamma)
    log_LT = np.log(L_T)
    log_L_tilde = _sup_residuals(_theta_from_sup(sup), logN, logD, 0.0)[0]  # log Ltilde_S, Eq. (1)
    f1 = np.exp(log_f1)
    gap = log_LT - log_d1 - log_L_tilde  # log(L_T / (d1 Ltilde_S))
    z = gap / f1
    softplus, sigmoid = np.logaddexp(0.0, z), np.exp(-np.logaddexp(0.0, -z))
    log_transition = -c1 * f1 * softplus  # log (1 + (L_T / (d1 Ltilde))^(1/f1))^(-c1 f1)
    u = np.stack([a - alpha * logN, b - beta * logD])
    lse = np.logaddexp(u[0], u[1])
    w = np.exp(u - lse)
    log_excess = -c0 * log_LT + log_transition + gamma * lse
    y = np.logaddexp(log_LT, log_excess)  # log(L_T + excess), Eq. (8)
    s = np.exp(log_excess - y)  # d y / d log_excess
    cols = [
        -log_LT,  # c0
        -f1 * softplus,  # c1
        c1 * sigmoid,  # log d1
        log_transition + c1 * sigmoid * gap,  # log f1
        gamma * w[0],  # a = log A'
        gamma * w[1],  # b = log B'
    ]
    if free_exponents:
        cols += [-gamma * w[0] * logN, -gamma * w[1] * logD, lse]  # alpha', beta', gamma'
    return y - logL, s[:, None] * np.stack(cols, axis=1)


def _solve(residuals, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, delta: float):
    """One trust-region least-squares run from x0: minimizes sum Huber_delta(r(x)) within the bounds; coefficients
    with equal bounds stay at x0. Returns (x, cost) with cost that Huber sum, or None for a non-finite start."""
    free = lower < upper
    x0 = np.clip(np.asarray(x0, dtype=float), lower, upper)
    last: dict = {}

    def full(x_free):
        x = x0.copy()
        x[free] = x_free
        return x

    def evaluate(x_free):  # the solver asks for r and J at the same points: compute both once
        if "x" not in last or not np.array_equal(last["x"], x_free):
            last["x"], (last["r"], last["J"]) = x_free.copy(), residuals(full(x_free))
        return last["r"], last["J"]

    with np.errstate(over="ignore", invalid="ignore"):
        if not np.all(np.isfinite(evaluate(x0[free])[0])):
            return None
        lo, hi = lower[free], upper[free]
        start = np.clip(x0[free], lo + 1e-12 * (hi - lo), hi - 1e-12 * (hi - lo))  # strictly inside the box
        res = least_squares(
            lambda x: evaluate(x)[0], start, jac=lambda x: evaluate(x)[1][:, free], bounds=(lo, hi), method="trf",
            loss="huber", f_scale=delta, ftol=SOLVER_TOL, xtol=SOLVER_TOL, gtol=SOLVER_TOL, x_scale="jac",
            max_nfev=SOLVER_MAX_NFEV,
        )  # fmt: skip
    return full(res.x), float(res.cost)


def _best_of(residuals, inits: list[np.ndarray], bounds, delta: float) -> tuple[np.ndarray, float]:
    """The best of a `_solve` run from each start. `residuals(x)` returns (r, Jacobian)."""
    lower, upper = (np.array(side, dtype=float) for side in zip(*bounds, strict=True))
    best_x, best_f = None, np.inf
    for x0 in inits:
        out = _solve(residuals, x0, lower, upper, delta)
        if out is not None and np.isfinite(out[1]) and out[1] < best_f:
            best_x, best_f = out
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


# Box bounds of the fitted parameters (log E, log A, alpha, log B, beta, gamma) and (c0, c1, log d1, log f1, log A',
# log B', alpha', beta', gamma'). They admit the paper's values (PAPER_SUPERVISED, PAPER_DISTILLATION; c1 = 522.6 was
# outside the earlier bound of [-5, 5]).
SUP_BOUNDS = [(-5.0, 5.0), (-10.0, 30.0), (0.0, 2.0), (-10.0, 30.0), (0.0, 2.0), (0.05, 3.0)]
DISTILL_BOUNDS = [(-5.0, 5.0), (-1e3, 1e3), (-5.0, 5.0), (-4.0, 3.0), (-10.0, 30.0), (-10.0, 30.0), (0.0, 2.0),
                  (0.0, 2.0), (0.05, 3.0)]  # fmt: skip
HUBER_DELTA = 1e-4  # the paper's Huber delta (Hoffmann et al. used 1e-3)


def _subset(inits: list, n: int | None) -> list:
    """n starts evenly spaced over the grid (all of them when n is None or larger)."""
    if n is None or n >= len(inits):
        return inits
    return [inits[i] for i in np.linspace(0, len(inits) - 1, max(n, 1)).round().astype(int)]


def fit_supervised(
    N,
    D,
    L,
    delta: float = HUBER_DELTA,
    n_bootstrap: int = 0,
    seed: int = 0,
    inits: list[np.ndarray] | None = None,
    n_starts: int | None = None,
    fixed_E: float | None = None,
) -> Fit:
    """Fit Eq. (1) to measured (N, D, L): Huber loss on log L, minimized from a grid of initializations (16, or
    `n_starts` evenly spaced among them, or the given `inits`). `fixed_E` holds E at a known irreducible loss
    (the entropy rate of a generated language) instead of fitting it."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    _check_points(N, D, L)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    if inits is None:
        # a small grid in the spirit of Hoffmann et al. (theirs is larger; 16 starts keep the fit to seconds)
        e0 = [np.log(max(L.min() * 0.9, 1e-3)), np.log(max(L.min() * 0.5, 1e-3))]
        grid = itertools.product(e0, [0.0, 6.0], [0.25, 0.6], [3.0], [0.25, 0.6], [0.7])
        inits = _subset([np.array(x) for x in grid], n_starts)

    bounds = list(SUP_BOUNDS)
    if fixed_E is not None:
        if not 0 < fixed_E < L.min():
            raise ConfigError(f"a fixed E must be positive and below every measured loss, got {fixed_E}")
        bounds[0] = (np.log(fixed_E), np.log(fixed_E))  # equal bounds: _best_of keeps the variable fixed
        inits = [np.array([np.log(fixed_E), *x[1:]]) for x in inits]

    def residuals(idx):
        return lambda theta: _sup_residuals(theta, logN[idx], logD[idx], logL[idx])

    everything = np.arange(len(L))
    theta, f = _best_of(residuals(everything), inits, bounds, delta)
    fit = Fit(law=_sup_from_theta(theta), objective=f, n_points=len(L), n_inits=len(inits))
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(L), len(L))
        # refit from the full fit's optimum and a few grid points: the resampled optimum lies near the full one
        starts = [theta, inits[len(inits) // 2]]
        theta_b, _ = _best_of(residuals(idx), starts, bounds, delta)
        fit.bootstrap.append(_sup_from_theta(theta_b))
    return fit


def fit_distillation(
    sup: SupervisedLaw,
    L_T,
    N_S,
    D_S,
    L_S,
    free_exponents: bool = False,
    delta: float = HUBER_DELTA,
    n_bootstrap: int = 0,
    seed: int = 0,
    inits: list[np.ndarray] | None = None,
    n_starts: int | None = None,
) -> Fit:
    """Fit Eq. (8) to measured (L_T, N_S, D_S, L_S) with the supervised law `sup` held fixed (the paper fits the
    supervised law first, on supervised runs, then the distillation coefficients)."""
    L_T, N_S, D_S, L_S = (np.asarray(x, dtype=float) for x in (L_T, N_S, D_S, L_S))
    _check_points(L_T, N_S, D_S, L_S)
    logN, logD, logL = np.log(N_S), np.log(D_S), np.log(L_S)
    bounds = list(DISTILL_BOUNDS[: 9 if free_exponents else 6])
    if inits is None:
        grid = itertools.product([0.0, 1.0], [0.0, 1.0], [0.0], [-1.0, 1.0], [np.log(sup.A), np.log(sup.A) + 2.0])
        extra = (sup.alpha, sup.beta, sup.gamma) if free_exponents else ()
        inits = _subset([np.array([*g, np.log(sup.B), *extra]) for g in grid], n_starts)

    def residuals(idx):
        return lambda p: _distill_residuals(p, sup, L_T[idx], logN[idx], logD[idx], logL[idx], free_exponents)

    phi, f = _best_of(residuals(np.arange(len(L_S))), inits, bounds, delta)
    fit = Fit(law=_distill_from_phi(phi, sup, free_exponents), objective=f, n_points=len(L_S), n_inits=len(inits))
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(L_S), len(L_S))
        starts = [phi, inits[len(inits) // 2]]
        phi_b, _ = _best_of(residuals(idx), starts, bounds, delta)
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

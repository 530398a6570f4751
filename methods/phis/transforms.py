"""The teacher-feature normalizations compared in PHI-S (Ranzinger et al., 2024, Sec. 3 and Table 1).

Every normalization is an invertible affine map fitted on one teacher's features X (N, D):

    x' = W (x - mu)            normalize: the student's regression target
    x  = W_inv x' + mu         denormalize: back to the teacher's own space (for the per-teacher error)

with C = cov(X) = U diag(lam) U^T (eigen-decomposition, eigenvalues ascending as torch.linalg.eigh returns them):

    none        W = I
    global      W = I / sigma_g,  mu = mu_g 1             one scalar mean and std over all entries
    standard    W = diag(1 / sigma_d)                     per-dimension standardization
    pca-w       W = diag(lam)^(-1/2) U^T                  PCA whitening
    zca         W = U diag(lam)^(-1/2) U^T                ZCA whitening
    hca         W = H diag(lam)^(-1/2) U^T                Hadamard whitening
    phi-s       W = (1 / a) H U^T,  a = sqrt(mean(lam))   PHI-S: rotate so every dimension carries the same
                                                          variance mean(lam), then one scalar scale

H is a normalized Hadamard matrix (orthonormal, every entry +-1/sqrt(D)) when D is a power of two (Sylvester's
construction). Any such H sends diag(lam) to a matrix whose diagonal is constant, mean(lam): that is the whole
point of PHI-S (each output dimension gets variance mean(lam)/a^2 = 1, and the map is only a rotation and one
isotropic scale, so no direction of the teacher is amplified relative to another).

Fallback for D not a power of two (documented deviation): a Hadamard matrix exists only for D = 1, 2 or a
multiple of 4, and is not always constructible. The official code (NVlabs/RADIO, examples/common/hadamard.py)
tries Paley's constructions and otherwise uses a random orthogonal matrix from a +-1 matrix, which balances the
variances only approximately. We instead build, for any D, an orthogonal R with diag(R diag(lam) R^T) = mean(lam)
exactly, by at most D - 1 Givens rotations (the constructive proof of the Schur-Horn theorem; `balancing_rotation`).
It depends on lam, is deterministic, and has exactly the property PHI-S needs.

Low-rank teachers (the whitening failure mode): an eigenvalue of 0 makes diag(lam)^(-1/2) infinite. We clamp
eigenvalues at `eps * max(lam)` before inverting (`eps` = 1e-6 by default) and count the clamped directions;
the result is finite but directions that carry only rounding noise or tiny variance are scaled up to unit
variance, so the student spends as much capacity on them as on the signal. PHI-S never divides by an individual
eigenvalue, so it has no such failure: a = sqrt(mean(lam)) is zero only for a constant teacher (rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.errors import DataError

NORMALIZATIONS = ("none", "global", "standard", "pca-w", "zca", "hca", "phi-s")


@dataclass
class Normalizer:
    """An affine map x' = W (x - mu) and its inverse x = W_inv x' + mu (float64 inside)."""

    name: str
    mean: torch.Tensor  # (D,)
    forward_matrix: torch.Tensor  # (D, D): W
    inverse_matrix: torch.Tensor  # (D, D): W_inv
    clamped: int = 0  # eigenvalues raised to the floor (whitening of a low-rank teacher)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) teacher features -> (N, D) targets."""
        w = self.forward_matrix.to(x.dtype)
        return (x - self.mean.to(x.dtype)) @ w.T

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """(N, D) targets -> (N, D) teacher features."""
        return y @ self.inverse_matrix.to(y.dtype).T + self.mean.to(y.dtype)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester_hadamard(dim: int) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix (dim, dim), dim a power of two: H H^T = I, |H_ij| = 1/sqrt(dim)."""
    if not is_power_of_two(dim):
        raise ValueError(f"Sylvester's construction needs a power of two, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:  # H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def balancing_rotation(eigenvalues: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """An orthogonal R (D, D) with diag(R diag(lam) R^T) = mean(lam) in every entry, for any D.

    Repeatedly take an index i whose current diagonal entry is above the mean and one j below it, and rotate in the
    (i, j) plane by the angle that sets entry i exactly to the mean (a root of a quadratic that always has real
    roots, because d_i - m > 0 > d_j - m). Entry i is then final; the trace is preserved, so after at most D - 1
    rotations every entry equals the mean."""
    lam = eigenvalues.to(torch.float64)
    dim = lam.shape[0]
    target = lam.mean()
    m = torch.diag(lam).clone()  # the rotated covariance R diag(lam) R^T, kept in full
    r = torch.eye(dim, dtype=torch.float64)
    scale = max(float(lam.abs().max()), 1e-300)
    open_ = list(range(dim))
    while len(open_) > 1:
        diag = torch.stack([m[k, k] for k in open_])
        hi, lo = int(torch.argmax(diag)), int(torch.argmin(diag))
        if float(diag[hi] - target) <= tol * scale and float(target - diag[lo]) <= tol * scale:
            break
        i, j = open_[hi], open_[lo]
        # New (i, i) entry under G = [[c, s], [-s, c]] in the (i, j) plane: c^2 d_i + 2 c s m_ij + s^2 d_j.
        # Setting it to `target` with t = s / c: (d_j - m) t^2 + 2 m_ij t + (d_i - m) = 0.
        qa, qb, qc = m[j, j] - target, 2 * m[i, j], m[i, i] - target
        disc = torch.sqrt(torch.clamp(qb * qb - 4 * qa * qc, min=0.0))
        t = (-qb - disc) / (2 * qa) if abs(float(qa)) > 1e-300 else -qc / qb
        c = 1 / torch.sqrt(1 + t * t)
        s = t * c
        g = torch.eye(dim, dtype=torch.float64)
        g[i, i], g[i, j], g[j, i], g[j, j] = c, s, -s, c
        m = g @ m @ g.T
        r = g @ r
        open_.remove(i)
    return r


def phi_rotation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """H of PHI-S: Sylvester-Hadamard for a power-of-two dimension, else the balancing rotation (see module doc)."""
    dim = eigenvalues.shape[0]
    return sylvester_hadamard(dim) if is_power_of_two(dim) else balancing_rotation(eigenvalues)


def covariance_eigen(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean (D,), eigenvalues (D,) ascending, eigenvectors U (D, D) of the unbiased covariance of x (N, D)."""
    x = x.to(torch.float64)
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / (x.shape[0] - 1)  # (D, D)
    lam, u = torch.linalg.eigh(cov)
    return mean, torch.clamp(lam, min=0.0), u  # negative eigenvalues are rounding noise of a PSD matrix


def fit(name: str, x: torch.Tensor, eps: float = 1e-6) -> Normalizer:
    """Fit normalization `name` (one of NORMALIZATIONS) on teacher features x (N, D)."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {name!r}; choose from {', '.join(NORMALIZATIONS)}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise DataError(f"teacher features must be (N >= 2, D), got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    dim = x.shape[1]
    eye = torch.eye(dim, dtype=torch.float64)
    if name == "none":
        return Normalizer(name, torch.zeros(dim, dtype=torch.float64), eye, eye)
    if name == "global":
        mu_g, sigma_g = x.mean(), x.std()  # one scalar over all N * D entries
        if sigma_g <= 0:
            raise DataError("teacher features are constant: global standardization divides by zero")
        return Normalizer(name, mu_g.expand(dim).clone(), eye / sigma_g, eye * sigma_g)
    if name == "standard":
        sigma = x.std(0)
        floor = eps * float(sigma.max()) if float(sigma.max()) > 0 else 1.0
        clamped = int((sigma < floor).sum())
        sigma = torch.clamp(sigma, min=floor)  # a dead dimension would divide by zero
        return Normalizer(name, x.mean(0), torch.diag(1 / sigma), torch.diag(sigma), clamped)
    mean, lam, u = covariance_eigen(x)
    if float(lam.max()) <= 0:
        raise DataError("teacher features are constant: their covariance is zero, nothing to normalize")
    if name == "phi-s":
        h = phi_rotation(lam)
        a = torch.sqrt(lam.mean())  # Eq. (PHI-S): alpha = sqrt(mean eigenvalue)
        return Normalizer(name, mean, (h @ u.T) / a, a * (u @ h.T))  # x' = (1/a) H U^T (x - mu)
    floor = eps * float(lam.max())
    clamped = int((lam < floor).sum())
    lam_safe = torch.clamp(lam, min=floor)
    inv_sqrt, sqrt = torch.diag(lam_safe.rsqrt()), torch.diag(lam_safe.sqrt())
    if name == "pca-w":
        return Normalizer(name, mean, inv_sqrt @ u.T, u @ sqrt, clamped)
    if name == "zca":
        return Normalizer(name, mean, u @ inv_sqrt @ u.T, u @ sqrt @ u.T, clamped)
    # hca: any orthogonal H works after whitening (all variances are 1 already); the same H as PHI-S.
    h = phi_rotation(lam)
    return Normalizer(name, mean, h @ inv_sqrt @ u.T, u @ sqrt @ h.T, clamped)

"""SinKD: Sinkhorn Distance Minimization for Knowledge Distillation (Cui et al., LREC-COLING 2024).

The batch-wise reformulation: the n softened student distributions s_i = softmax(z^S_i / tau) and the n teacher
distributions t_j = softmax(z^T_j / tau) of a batch are two point clouds; their distance is the entropic optimal
transport cost between them, with the cost of moving s_i onto t_j the L1 distance between the two vectors:

    C_ij = || s_i - t_j ||_1                                               cost matrix (official: torch.cdist, p=1)
    P*   = argmin_{P in U(a, b)} <P, C> - eps * H(P),   U(a, b) = {P >= 0 : P 1 = a, P^T 1 = b}
    W_eps(s, t) = <P*, C> = sum_ij P*_ij C_ij                              the transport cost (Sinkhorn distance)

P* = diag(u) K diag(v) with K = exp(-C / eps), and u, v come from Sinkhorn's alternating scalings, in the
official code's order: rows first, then columns (u <- a / K v, v <- b / K^T u, from v = 1; official loss.py
normalizes the rows of K, then its columns, 20 times). We run them in the log domain (f = eps log u, g = eps log v):

    f_i <- eps log a_i - eps logsumexp_j((g_j - C_ij) / eps)
    g_j <- eps log b_j - eps logsumexp_i((f_i - C_ij) / eps)
    log P_ij = (f_i + g_j - C_ij) / eps

which never forms exp(-C / eps): with small eps the plain kernel underflows to 0 and the scalings to inf/NaN,
the log-domain iterates stay finite. The iterations are unrolled, so the gradient flows through P* and C, as in
the official code (2018cx/SinKD, loss.py, `Sinkhorn`).

The training objective (official glue_train.py `distill_train`, names "kd" and the Sinkhorn term):

    L = alpha * KD_tau(t, s) + (1 - alpha) * CE(y, s) + w * <P*, C>

Conventions that differ between POT and the official code, and which one each function uses:
- `sinkhorn_log` takes the marginals a, b (POT's `ot.sinkhorn2(a, b, M, reg)` convention; tests compare with it).
- the update order is the official one (rows first, the plan's columns exact after each iteration); POT's
  `sinkhorn_knopp` scales the columns first, so after a fixed number of iterations `sinkhorn_log(C)` equals POT on
  the transposed problem, `ot.sinkhorn(b, a, C^T)^T`, and POT itself only at convergence.
- the official code normalizes the rows and then the columns of K to sum to 1 (marginals of ONE per sample, a plan
  of total mass n), so its <P, C> is n times the cost with uniform marginals 1/n. `batch_sinkhorn_cost` returns
  the official quantity (mass n); `w` then has the official meaning (beta * 0.001 with beta = 0.8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.errors import ConfigError


def l1_cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = sum_k |x_ik - y_jk|: (n, d) x (m, d) -> (n, m).

    Written out rather than torch.cdist(p=1) so that its gradient at C_ij = 0 (identical rows) is the
    subgradient 0, and so that the memory (n * m * d) is visible at the call site."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).abs().sum(-1)  # Eq. (1): (n, m, d) -> (n, m)


def sinkhorn_log(
    cost: torch.Tensor,
    epsilon: float,
    n_iters: int,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT in the log domain: cost (n, m), marginals a (n,), b (m,) (default uniform 1/n, 1/m).

    Returns (plan P (n, m), transport cost <P, C>). The order is the official SinKD code's (loss.py,
    `sinkhorn_normalized`: rows of K normalized, then columns, from K itself, i.e. v = 1): each iteration is
    u = a / K v, then v = b / K^T u, so the columns of the returned plan sum exactly to b. With a = b = 1 this is
    the official iterate itself; with the default 1/n, 1/m it is the official one divided by n (n = m)."""
    n, m = cost.shape
    dtype = cost.dtype
    log_a = torch.full((n,), -math.log(n), dtype=dtype, device=cost.device) if a is None else a.log()
    log_b = torch.full((m,), -math.log(m), dtype=dtype, device=cost.device) if b is None else b.log()
    log_kernel = -cost / epsilon  # (n, m), log K
    log_v = torch.zeros(m, dtype=dtype, device=cost.device)  # v = 1: the official code starts from K itself
    for _ in range(n_iters):
        log_u = log_a - torch.logsumexp(log_kernel + log_v.unsqueeze(0), dim=1)  # Eq. (2): u = a / K v (rows)
        log_v = log_b - torch.logsumexp(log_kernel + log_u.unsqueeze(1), dim=0)  # Eq. (2): v = b / K^T u (columns)
    plan = torch.exp(log_u.unsqueeze(1) + log_kernel + log_v.unsqueeze(0))  # Eq. (3): P = diag(u) K diag(v)
    return plan, (plan * cost).sum()  # Eq. (3): <P, C>


def sinkhorn_plain(
    cost: torch.Tensor, epsilon: float, n_iters: int, a: torch.Tensor | None = None, b: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same iterations with the kernel K = exp(-C / eps) itself (rows first, as `sinkhorn_log`, no guards).

    Kept to show why the log domain is needed: for eps much smaller than the costs K underflows and this returns
    NaN or inf. Use `sinkhorn_log`."""
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype) if a is None else a
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype) if b is None else b
    kernel = torch.exp(-cost / epsilon)
    v = torch.ones(m, dtype=cost.dtype)
    for _ in range(n_iters):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    plan = u.unsqueeze(1) * kernel * v.unsqueeze(0)
    return plan, (plan * cost).sum()


def batch_sinkhorn_cost(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
) -> torch.Tensor:
    """The SinKD term of one batch, official scale: (n, V) x (n, V) -> scalar <P*, C> with unit mass per sample.

    s_i = softmax(z^S_i / tau), t_j = softmax(z^T_j / tau) (teacher detached); C = L1 cost; P* from `sinkhorn_log`
    with uniform marginals; the result is multiplied by n, the official code's plan mass (rows and columns of P
    summing to 1, see the module docstring). Probabilities in float32 or wider."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.softmax(student_logits.to(dtype) / temperature, dim=-1)  # (n, V)
    teacher = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # (n, V)
    cost = l1_cost_matrix(student, teacher)  # (n, n)
    _, transport = sinkhorn_log(cost, epsilon, n_iters)
    return student.shape[0] * transport  # Eq. (3), official scale: plan of mass n


def group_size_for(vocab_size: int, max_group: int, budget_elements: int = 2**25) -> int:
    """Samples per Sinkhorn batch so that the (n, n, V) difference tensor of the cost stays under the budget
    (2^25 float32 elements = 128 MiB): n = min(max_group, floor(sqrt(budget / V))), at least 2."""
    return max(2, min(max_group, int(math.isqrt(budget_elements // max(vocab_size, 1)))))


def grouped_sinkhorn_cost(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    group_size: int,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
) -> torch.Tensor:
    """Mean of `batch_sinkhorn_cost` over consecutive groups of at most group_size rows: (N, V) x (N, V) -> scalar.

    For token-level distillation the "batch" is the valid target positions of a micro-batch; a large one is cut into
    groups so that the cost tensor fits in memory. A last group of one row has no transport to speak of (its plan
    is the single entry 1) and still counts."""
    values = [
        batch_sinkhorn_cost(
            student_logits[start : start + group_size],
            teacher_logits[start : start + group_size],
            temperature,
            epsilon,
            n_iters,
        )
        for start in range(0, student_logits.shape[0], group_size)
    ]
    return torch.stack(values).mean()


def check_sinkhorn_settings(alpha: float, temperature: float, sinkhorn_temperature: float, epsilon: float,
                            n_iters: int, weight: float) -> None:  # fmt: skip
    """Range checks shared by the LM and the classification run scripts (flag names in the messages)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1] (weight of KD; 1 - alpha weighs the CE), got {alpha}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {temperature}")
    if not sinkhorn_temperature > 0:
        raise ConfigError(f"--sinkhorn-temperature must be positive, got {sinkhorn_temperature}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"--epsilon (entropic regularization) must be a positive number, got {epsilon}")
    if n_iters < 1:
        raise ConfigError(f"--n-iters must be at least 1 Sinkhorn iteration, got {n_iters}")
    if not (weight >= 0 and math.isfinite(weight)):
        raise ConfigError(f"--sinkhorn-weight must be a non-negative number, got {weight}")

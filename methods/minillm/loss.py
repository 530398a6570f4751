"""MiniLLM's objective: the sequence-level reverse KL, minimized by policy gradient (Gu et al., ICLR 2024).

    theta* = argmin L(theta),  L(theta) = KL(q_theta || p) = -E_{y ~ q_theta(.|x)} [ log p(y|x) / q_theta(y|x) ]

Its gradient (the paper's Eq. 2, the policy-gradient theorem) with the per-step reward r_t = log p(y_t | y_<t, x)
- log q_theta(y_t | y_<t, x) and the return R_t = sum_{t' >= t} r_t' is

    grad L = -E_{y ~ q_theta} [ sum_t R_t grad log q_theta(y_t | y_<t, x) ]

and the three stabilizers of Sec. 2.2, each a switch of `minillm_loss_sum`:

- single-step decomposition (Eq. 3): R_t = r_t + R_{t+1}; the r_t part is taken in closed form as the token-level
  reverse KL at each step, so (grad L) = (grad L)_Single + (grad L)_Long with
      (grad L)_Single = E[ sum_t grad KL(q_theta(. | y_<t, x) || p(. | y_<t, x)) ]       (`single_step_kl`)
      (grad L)_Long   = -E[ sum_t R_{t+1} grad log q_theta(y_t | y_<t, x) ]                 (`long_term_returns`)
  Both are unbiased (tests/methods/test_minillm.py enumerates a two-step toy);
- teacher-mixed sampling (Eq. 4): y ~ p~ = (1 - alpha) q_theta + alpha p, corrected by the per-token importance
  weight w_t = q_theta(y_t | .) / p~(y_t | .) (the paper's approximation of the product over t; `importance_weights`);
- length normalization (Eq. 5): R_{t+1} / (T - t), the mean of the rewards still to come;

plus PPO's clipped surrogate (Schulman et al., 2017; the official code's `_pg_loss`): the ratio
rho_t = w_t q_theta / q_old is clipped to [1 - eps, 1 + eps] (`clipped_policy_loss`).

Layout: logits (B, T, V) and labels (B, T) of a batch in the data layout (core.data: IGNORE_INDEX on the prompt);
position t predicts labels[t + 1] (core.objectives.shifted_targets), so every per-token tensor here is (B, T) and
zero where `mask` is False. Log-softmax in float32. Functions return sums; the loop divides by the token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.losses import reverse_kl
from core.objectives import shifted_targets

RETURNS = ("next", "current")  # R_{t+1} (the paper's decomposition) or R_t (the official code)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0):
    """log q(y_t | y_<t, x) of the target at each position, (B, T); 0 where mask is False."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked.masked_fill(~mask, 0.0)


def single_step_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature=1.0):
    """KL(q_theta(. | y_<t, x) || p(. | y_<t, x)) at each position, exact over the vocabulary, (B, T); 0 off mask.
    Its gradient is (grad L)_Single of Eq. (3) (the teacher carries no gradient)."""
    kl = reverse_kl(student_logits, teacher_logits.detach(), temperature)  # Eq. (3), the single-step part
    return kl.masked_fill(~mask, 0.0)


def importance_weights(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_t = q(y_t) / ((1 - alpha) q(y_t) + alpha p(y_t)) of a token drawn from the teacher-mixed policy (Eq. 4,
    the per-token approximation of the paper and the official sampler.py); (B, T), no gradient. alpha 0: all 1."""
    q, p = student_logprobs.detach().exp(), teacher_logprobs.detach().exp()
    return q / ((1.0 - alpha) * q + alpha * p)  # Eq. (4)


def long_term_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    length_norm: bool = True,
    start: str = "next",
) -> torch.Tensor:
    """The return credited to the token at each position, (B, T); 0 off mask.

    start "next": R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) r_t' (the paper: the rewards after the token; its own
    reward is the single-step term); "current": R_t = sum_{t' >= t} gamma^(t' - t) r_t' (the official losses.py).
    length_norm divides by the number of tokens summed (Eq. 5: 1 / (T - t - 1) in the paper's indexing; the official
    code counts the tokens from t on, undiscounted); a token with nothing after it gets 0."""
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).masked_fill(~mask, 0.0)
    counts = mask.float()
    running = torch.zeros_like(rewards[:, 0])
    running_count = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    lengths = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        if start == "current":
            running = rewards[:, t] + gamma * running
            running_count = counts[:, t] + running_count
            returns[:, t], lengths[:, t] = running, running_count
        else:  # the value after t: update only after reading it
            returns[:, t], lengths[:, t] = running, running_count
            running = rewards[:, t] + gamma * running
            running_count = counts[:, t] + running_count
    if length_norm:
        returns = returns / lengths.clamp(min=1.0)  # Eq. (5)
    return returns.masked_fill(~mask, 0.0)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total: int | None = None) -> torch.Tensor:
    """(values - mean) / std over the valid positions of the batch, std from the unbiased variance (divided by
    n - 1) as the official utils.py `whiten` (torch.var_mean). `total`: the statistics run over this many entries,
    the valid ones and (total - n) zeros, as the official code whitens its whole (B, generation budget) response
    tensor, padding (advantage 0) included; None: valid positions only (our default; README, Deviations)."""
    n = mask.sum()
    count = n if total is None else torch.as_tensor(max(total, int(n)))
    mean = values[mask].sum() / count.clamp(min=1)
    squares = ((values - mean) ** 2)[mask].sum() + (count - n) * mean**2  # the zeros' share
    var = squares / (count - 1).clamp(min=1)  # unbiased, as torch.var_mean
    return ((values - mean) * torch.rsqrt(var + eps)).masked_fill(~mask, 0.0)


def scaled_rewards(rewards: torch.Tensor, mask: torch.Tensor, scaling: float = 0.5, clip: float = 100.0):
    """The official sampler.py's reward: r_t / reward_scaling, then clipped to [-clip, clip] (scripts:
    --reward-scaling 0.5 --cliprange-reward 100, so the policy term sees 2 r_t); 0 off mask. clip 0: no clip."""
    out = rewards / scaling
    if clip > 0:
        out = out.clamp(-clip, clip)
    return out.masked_fill(~mask, 0.0)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, max(-A rho, -A clip(rho, 1 - clip, 1 + clip)) with rho = w q / q_old,
    as the official losses.py `_pg_loss` (the importance weight inside the clipped ratio); clip 0: -A rho, plain
    policy gradient. Returns (per-token loss (B, T), clipped (B, T) bool: where the bound took effect)."""
    ratio = torch.exp(logprobs - old_logprobs.detach()) * weights.detach()  # (B, T)
    unclipped = -advantages.detach() * ratio
    if clip <= 0:
        return unclipped.masked_fill(~mask, 0.0), torch.zeros_like(mask)
    clipped = -advantages.detach() * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return loss.masked_fill(~mask, 0.0), (clipped > unclipped) & mask


@dataclass
class MiniLLMTerms:
    """The loss of one batch of rollouts (sums over its valid tokens) and what log.jsonl records of it."""

    loss_sum: torch.Tensor  # long-term policy-gradient sum + single-step sum
    tokens: int
    logs: dict[str, float]


def minillm_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.2,
    single_step: bool = True,
    single_step_weighted: bool = True,
    length_norm: bool = True,
    returns_from: str = "next",
    gamma: float = 1.0,
    clip: float = 0.2,
    whiten_advantages: bool = True,
    temperature: float = 1.0,
    reward_scaling: float = 0.5,
    reward_clip: float = 100.0,
    whiten_width: int | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> MiniLLMTerms:
    """MiniLLM's loss on rollouts sampled from (1 - alpha) q_old + alpha p (alpha 0: from q_old alone).

    `old_logprobs` (B, T): log q_old(y_t) of the student that sampled them, aligned as the per-token tensors here
    (position t: the target labels[t + 1]), as the official sampler stores them for its PPO epochs; the reward
    r_t = log p - log q_old and the weight w_t = q_old / p~ are read from it, and the ratio is w q_theta / q_old.
    None: the rollouts were sampled by the current student (one update per rollout batch), so q_old is the
    student's own value, detached, and the PPO ratio is w alone.

    single_step: add the exact token-level reverse KL (Eq. 3) and start the returns after the token (or at it with
    returns_from "current", the official code); without it, plain policy gradient on R_t. single_step_weighted
    multiplies the single-step term by w_t as the paper's Eq. (4) does; the official code drops that weight.

    As the official code: the reward's teacher term reads the teacher's raw logits (reward.py: no temperature)
    while the student's log q_theta, the importance weight's teacher and both sides of the single-step KL are at
    `temperature`; the reward enters the returns divided by `reward_scaling` and clipped to +-`reward_clip`
    (sampler.py). Whitening removes the scaling; without it the policy term is 1 / reward_scaling times that of
    the unscaled estimator (1: the paper's Eq. 2, unbiased). `whiten_width`: whiten over B x this many entries,
    padding counted as zeros (the official statistics; None: valid tokens only)."""
    mask, targets = shifted_targets(labels)  # (B, T)
    logprobs = token_logprobs(student_logits, targets, mask, temperature)  # (B, T), with gradient
    with torch.no_grad():
        old = logprobs.detach() if old_logprobs is None else old_logprobs.float().masked_fill(~mask, 0.0)
        teacher_logprobs = token_logprobs(teacher_logits, targets, mask, temperature)  # (B, T), at T: the mixture
        weights = importance_weights(old, teacher_logprobs, alpha) if alpha > 0 else torch.ones_like(logprobs)
        weights = weights.masked_fill(~mask, 0.0)
        teacher_raw = teacher_logprobs if temperature == 1.0 else token_logprobs(teacher_logits, targets, mask)
        rewards = (teacher_raw - old).masked_fill(~mask, 0.0)  # r_t = log p(y_t) (raw) - log q_T,old(y_t)
        start = returns_from if single_step else "current"
        scaled = scaled_rewards(rewards, mask, reward_scaling, reward_clip)
        returns = long_term_returns(scaled, mask, gamma, length_norm, start)
        total = None if whiten_width is None else mask.shape[0] * whiten_width  # official: B x budget, padded
        advantages = whiten(returns, mask, total=total) if whiten_advantages else returns
    policy, clipped = clipped_policy_loss(logprobs, old, advantages, weights, mask, clip)
    total = policy.sum()
    logs = {}
    if single_step:
        kl = single_step_kl(student_logits, teacher_logits, mask, temperature)  # (B, T)
        single = (kl * weights).sum() if single_step_weighted else kl.sum()
        total = total + single
        logs["single_step_kl"] = kl.sum().item()
    tokens = int(mask.sum())
    n = max(tokens, 1)
    logs = {key: value / n for key, value in logs.items()} | {
        "policy_loss": policy.sum().item() / n,
        "reward": rewards.sum().item() / n,  # per token: minus the sampled reverse KL
        "weight": weights.sum().item() / n,
        # the PPO ratio w q_theta / q_old; equal to the weight where the rollouts came from this very student
        "ratio": (torch.exp(logprobs.detach() - old) * weights).sum().item() / n,
        "clipped": clipped.sum().item() / n,
    }
    return MiniLLMTerms(total, tokens, logs)


def excess_accumulated_error(
    own_kl: torch.Tensor, own_mask: torch.Tensor, oracle_kl: torch.Tensor, oracle_mask: torch.Tensor
) -> dict[str, list[float]]:
    """Exposure bias as the excess error accumulated along the generated length (Arora et al., 2022, which the
    MiniLLM paper's Sec. 4 follows, with the teacher p as the oracle):

        R(l)        = sum_{t <= l} E_{y_<t ~ q} [ KL(p || q)(. | y_<t) ]      (the student's own prefixes)
        eps(l)      = 1/l sum_{t <= l} E_{y_<t ~ p} [ KL(p || q)(. | y_<t) ]  (the teacher's prefixes)
        ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100 %

    Inputs: the per-step KL (N, L) of one completion per prompt for N prompts, per prefix kind, and their masks (a
    step exists until the completion ended; step 0 predicts the first generated token). As the official
    evaluate_exposure_bias.py (`calc_batch`, `evaluate`): the expectation at each step is over ALL N prompts, a
    completion that has ended adding 0 (so its R stops growing), and the first generated step is not counted (the
    official reads the logits from the first generated token on; with its pad = EOS the step after EOS is masked),
    so l = 1 is the prediction of the second token. Returns per l = 1..L-1: R, eps and ExAccErr (percent); and
    `exaccerr_running` per l = 1..L: the same ratio with each step averaged over the completions still running
    and the first step counted (this package's definition before issue 29)."""

    def curves(kl, mask, over_all: bool):
        mean = (kl * mask).sum(0) / (mask.shape[0] if over_all else mask.sum(0).clamp(min=1))  # (L,) per step
        return mean.cumsum(0), torch.arange(1, mean.shape[0] + 1, dtype=mean.dtype)

    regret, steps = curves(own_kl[:, 1:], own_mask[:, 1:], True)  # R(l), official: all prompts, from step 2
    oracle, _ = curves(oracle_kl[:, 1:], oracle_mask[:, 1:], True)  # l eps(l)
    excess = (regret - oracle) / oracle.clamp(min=1e-12) * 100.0
    running_regret, _ = curves(own_kl, own_mask, False)
    running_oracle, _ = curves(oracle_kl, oracle_mask, False)
    running = (running_regret - running_oracle) / running_oracle.clamp(min=1e-12) * 100.0
    return {
        "regret": regret.tolist(),
        "per_step_error": (oracle / steps).tolist(),
        "exaccerr": excess.tolist(),
        "exaccerr_running": running.tolist(),
    }

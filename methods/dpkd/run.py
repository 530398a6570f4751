"""DPKD against forward KL, reverse KL and SFT on the embedded task (or any task the common flags name).

    python -m methods.dpkd.run                      # sequence level: teacher sample preferred over the student's
    python -m methods.dpkd.run --level token        # the official code: argmax tokens on teacher outputs
    python -m methods.dpkd.run --student-start init # every student from random initialisation (default: SFT)
    python -m methods.dpkd.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000

The student trains on teacher outputs (one teacher sample per training prompt, generated once and cached, like
the official "pseudo" data). At the sequence level every step also samples the student's own completion of each
prompt (batched, KV cache), and the pair (teacher output, student output) enters the preference loss.
log.jsonl records per step the generation time (gen_s), the preference loss, the CE on the teacher output, the
reward accuracy (share of pairs whose implicit reward prefers the teacher output) and the share of pairs where
both outputs are identical (ties: no gradient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import ConfigError
from core.method import Context, Method, MethodLoss
from core.objectives import teacher_forward
from core.onpolicy import OnPolicyConfig, Resampler, prompt_ids, record_generation_share, rows_of, teacher_examples
from core.pipeline import cli, run_method
from core.train import LossOutput
from methods.dpkd.loss import (
    dpkd_loss,
    greedy_token_preferences,
    implicit_reward,
    sequence_logprobs,
    token_logprobs,
)

LEVELS = ("sequence", "token")


@dataclass
class DPKDConfig(OnPolicyConfig):
    """DPKD's hyper-parameters; defaults from the official code (microsoft/LMOps: dpkd/arguments.py and
    dpkd/scripts/dpkd-gpt2_base_runner.sh) unless the help says otherwise. The sampling flags of the student
    outputs (--temperature, --top-p, --sample-max-new-tokens, also the teacher outputs' length) and --compare
    are core.onpolicy's."""

    level: str = field(
        default="sequence",
        metadata={"help": "sequence (the paper's equation, on-policy student samples) or token (the official code)"},
    )
    beta: float = field(default=0.1, metadata={"help": "reward scale beta (official --dpo-beta 0.1)"})
    kd_ratio: float = field(
        default=0.5,
        metadata={"help": "weight of the preference loss; 1 - kd_ratio weighs the CE on teacher outputs (0.5)"},
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of the cached teacher outputs (pseudo data: 1.0)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level not in LEVELS:
            raise ConfigError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"--teacher-temperature must be positive, got {self.teacher_temperature}")


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """Sequence level: rows [0, B) are the teacher outputs, [B, 2B) the student's; the loss unit is the pair."""
    return batch["input_ids"].shape[0] // 2


def make_loss(ctx: Context, cfg: DPKDConfig) -> MethodLoss:
    ctx.kd.require_full_logits("DPKD")  # a full-logit loss: --fused/--chunk-size refused, not ignored
    resample = Resampler.of(ctx, cfg, "dpkd-sample")

    # The teacher outputs y_t: one sample per training prompt the run will see, cached (fixed seed 0, so every
    # student seed sees the same ones, as with the official pseudo data).
    n = min(len(ctx.task.train), ctx.train.steps * ctx.train.batch_size)
    start = time.perf_counter()
    features = teacher_examples(
        ctx, prompt_ids(ctx, n), resample.max_new_tokens, do_sample=True, temperature=cfg.teacher_temperature, seed=0
    )
    ctx.accelerator.print(f"[dpkd] {len(features)} teacher outputs ready in {time.perf_counter() - start:.1f} s")

    def prepare_batch(model, batch, step: int, index: int):
        # Sequence level: append the student's own completion of each prompt (rows B..2B-1) to the teacher's.
        rejected = resample.examples(model, batch, step, index)
        chosen = rows_of(batch)
        resample.stats.add("tied_pairs", sum(c["input_ids"] == r["input_ids"] for c, r in zip(chosen, rejected)))
        return resample.collate(chosen + rejected, batch)

    def sequence_loss(model, batch) -> LossOutput:
        teacher_logits = teacher_forward(ctx.teacher, batch)  # (2B, T, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        student_logps = sequence_logprobs(logits, batch["labels"])  # (2B,) log q(y | x)
        with torch.no_grad():
            teacher_logps = sequence_logprobs(teacher_logits, batch["labels"])  # (2B,) log p(y | x)
        pairs = student_logps.shape[0] // 2
        preference = dpkd_loss(
            student_logps[:pairs], student_logps[pairs:], teacher_logps[:pairs], teacher_logps[pairs:], cfg.beta
        )  # (B,)
        # CE on the teacher output, a token mean per sequence (the loss unit is the pair).
        chosen_tokens = (batch["labels"][:pairs, 1:] != -100).sum(-1).clamp(min=1)
        ce = -student_logps[:pairs] / chosen_tokens  # (B,)
        total = (cfg.kd_ratio * preference + (1.0 - cfg.kd_ratio) * ce).sum()
        with torch.no_grad():
            rewards = implicit_reward(student_logps, teacher_logps, cfg.beta)
            accuracy = (rewards[:pairs] > rewards[pairs:]).float().mean().item()
            margin = (rewards[:pairs] - rewards[pairs:]).mean().item()
        logs = {"preference": preference.mean().item(), "ce": ce.mean().item(), "reward_accuracy": accuracy}
        return LossOutput(total, logs | {"reward_margin": margin})

    def token_loss(model, batch) -> LossOutput:
        teacher_logits = teacher_forward(ctx.teacher, batch)[:, :-1]  # (B, T-1, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked, valid = token_logprobs(logits, batch["labels"])  # (B, T-1): log q(y_n | y_<n, x) of the data
        student_valid, teacher_valid = logits[:, :-1][valid], teacher_logits[valid]  # (N, V), (N, V)
        s_chosen, s_rejected, t_chosen, t_rejected = greedy_token_preferences(student_valid, teacher_valid)
        preference = dpkd_loss(s_chosen, s_rejected, t_chosen, t_rejected, cfg.beta)  # (N,)
        ce = -picked[valid]  # (N,)
        total = (cfg.kd_ratio * preference + (1.0 - cfg.kd_ratio) * ce).sum()
        n_tokens = max(int(valid.sum()), 1)
        tied = (student_valid.argmax(-1) == teacher_valid.argmax(-1)).sum().item()  # same argmax: no preference
        logs = {"preference": preference.sum().item() / n_tokens, "ce": ce.sum().item() / n_tokens}
        return LossOutput(total, logs | {"tied_tokens": tied / n_tokens})

    def on_step_end(step: int, step_loss: float, logs: dict[str, float]) -> None:
        resample.stats.flush(logs, keys=("gen_s",) if cfg.level == "token" else ("gen_s", "tied_pairs"))

    if cfg.level == "token":  # no sampling during training: only the cached teacher outputs
        return MethodLoss(token_loss, features=features, on_step_end=on_step_end)
    return MethodLoss(
        sequence_loss, features=features, prepare_batch=prepare_batch, count_fn=pair_count, on_step_end=on_step_end
    )


METHOD = Method(
    name="dpkd",
    settings=DPKDConfig,
    make_loss=make_loss,
    kd_baselines=DPKDConfig.divergences,
    label=lambda cfg: "dpkd" if cfg.level == "sequence" else "dpkd-token",
    student_start="sft",  # the paper follows MiniLLM's protocol: the student starts from its SFT checkpoint
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run DPKD and its baselines; returns metrics.json's content."""
    return record_generation_share(run_method(METHOD, argv))


if __name__ == "__main__":
    cli(main)

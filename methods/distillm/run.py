"""DistiLLM against forward KL, reverse KL, skew KL (no off-policy scheme) and SFT on the embedded task.

    python -m methods.distillm.run                         # skew KL, adaptive off-policy student samples
    python -m methods.distillm.run --loss srkl             # skew reverse KL (the official scripts' other choice)
    python -m methods.distillm.run --student-start init    # every student from random initialisation (default: SFT)
    python -m methods.distillm.run --init-threshold 0.5    # student samples from the start
    python -m methods.distillm.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000

The last --val-size training examples are held out; every --val-every steps the student's cross-entropy on them
decides whether the probability of training on student outputs rises (methods/distillm/loss.py). log.jsonl
records per step the threshold, the buffer size, the generation time (gen_s), how many micro-batches were fresh
student samples or replayed ones, and val_loss where it was measured; distillm_schedule.png plots them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data import encode_examples
from core.errors import ConfigError
from core.method import Context, Method, MethodLoss
from core.metrics import perplexity
from core.onpolicy import OnPolicyConfig, Resampler, derived_seed, record_generation_share
from core.pipeline import cli, run_method
from core.plots import plot_log
from core.replay import ReplayBuffer
from core.train import LossOutput
from methods.distillm.loss import SKEWED, AdaptiveOffPolicy, distillm_loss_sum


@dataclass
class DistiLLMConfig(OnPolicyConfig):
    """DistiLLM's hyper-parameters; defaults from the official code (jongwooko/distillm: arguments.py and
    scripts/gpt2/distillm/train_0.1B_1.5B.sh) unless the help says otherwise. The sampling flags (--temperature
    and --top-p, official 1.0 both; --sample-max-new-tokens) and --compare are core.onpolicy's; --chunk-size is
    the KD path's (core.kdpath)."""

    loss: str = field(
        default="skl",
        metadata={"help": "skl (skew KL; official script for the 0.1B student) or srkl (skew reverse KL; the others)"},
    )
    alpha: float = field(default=0.1, metadata={"help": "skew alpha (official --skew-alpha 0.1)"})
    kd_ratio: float = field(default=1.0, metadata={"help": "weight of the divergence, 1 - kd_ratio of the CE (1.0)"})
    init_threshold: float = field(
        default=0.0, metadata={"help": "initial probability of training on student outputs (official 0.0)"}
    )
    loss_eps: float = field(
        default=0.1, metadata={"help": "validation-loss rise that raises the probability by 0.1 (official 0.1)"}
    )
    capacity: int = field(default=1000, metadata={"help": "replay buffer capacity in examples (official 1000)"})
    replay_ratio: str = field(
        default="decreasing",
        metadata={"help": "share of fresh samples among student batches: decreasing (official), constant, increasing"},
    )
    val_every: int = field(
        default=20,
        metadata={"help": "validate every this many steps (official: once per epoch, 20 epochs: 20 checks a run)"},
    )
    val_size: int = field(default=200, metadata={"help": "training examples held out (from the end) for validation"})
    compare: str = field(
        default="fkl,rkl,skl",
        metadata={"help": "word-level KD baselines on the same budget (skl at alpha 0.1: DistiLLM without off-policy)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in SKEWED:
            raise ConfigError(f"--loss must be one of {', '.join(SKEWED)}, got {self.loss!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"--alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
        AdaptiveOffPolicy(self.init_threshold, self.loss_eps, replay_ratio=self.replay_ratio)  # its range checks
        if self.capacity < 1:
            raise ConfigError(f"--capacity must be at least 1, got {self.capacity}")
        if self.val_every < 1 or self.val_size < 1:
            raise ConfigError(f"--val-every and --val-size must be at least 1, got {self.val_every}, {self.val_size}")


def make_loss(ctx: Context, cfg: DistiLLMConfig) -> MethodLoss:
    ctx.kd.require_full_logits("DistiLLM", chunked=True)
    ctx.kd.require_exact_cache("DistiLLM (it reads every teacher logit)")
    if cfg.val_size >= len(ctx.task.train):
        raise ConfigError(f"--val-size {cfg.val_size} leaves no training examples of {len(ctx.task.train)}")
    train_examples, val_examples = ctx.task.train[: -cfg.val_size], ctx.task.train[-cfg.val_size :]
    policy = AdaptiveOffPolicy(cfg.init_threshold, cfg.loss_eps, replay_ratio=cfg.replay_ratio)
    buffer = ReplayBuffer(cfg.capacity)
    resample = Resampler.of(ctx, cfg, "distillm-sample")
    seed, total_steps = ctx.train.seed, ctx.train.steps

    def validation_loss() -> float:
        # The official evaluate(): the student's token-mean cross-entropy on held-out ground truth.
        ppl = perplexity(ctx.student, ctx.tokenizer, val_examples, ctx.data.max_length, ctx.eval.eval_batch_size)
        return math.log(ppl)

    policy.update(validation_loss())  # the official loop evaluates once before training: the first reference
    ctx.accelerator.print(f"[distillm] validation loss before training: {policy.reference_loss:.4f}")

    def prepare_batch(model, batch, step: int, index: int):
        # The coin is the same on every process (process 0's seed), so all processes take the same branch.
        rng = random.Random(derived_seed(seed, step, index, 0, "distillm-source"))
        source = policy.choose(rng.random(), step + 1, total_steps, buffer.full)  # official global_step is 1-based
        if source == "student":
            examples = resample.examples(model, batch, step, index)
            buffer.add(examples)
            resample.stats.add("student_batches", 1)
            return resample.collate(examples, batch)
        if source == "replay":
            resample.stats.add("replay_batches", 1)
            return resample.collate(buffer.sample(batch["input_ids"].shape[0], rng), batch)
        return batch

    def loss_fn(model, batch) -> LossOutput:
        teacher_logits = ctx.kd.teacher_logits(batch, ctx.features)  # (B, T, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        total, ce, kd = distillm_loss_sum(
            logits, teacher_logits, batch["labels"], cfg.loss, cfg.alpha, cfg.kd_ratio, ctx.kd.cfg.chunk_size
        )
        n = max(int((batch["labels"][:, 1:] != -100).sum()), 1)
        logs = {cfg.loss: kd.item() / n} | ({"ce": ce.item() / n} if cfg.kd_ratio < 1.0 else {})
        return LossOutput(total, logs)

    def on_step_end(step: int, step_loss: float, logs: dict[str, float]) -> None:
        if step % cfg.val_every == 0:
            logs["val_loss"] = validation_loss()
            policy.update(logs["val_loss"])  # raises the threshold for the steps that follow
        resample.stats.flush(logs, keys=("gen_s", "student_batches", "replay_batches"))
        logs["threshold"] = policy.threshold
        logs["buffer"] = len(buffer)

    return MethodLoss(
        loss_fn,
        state={"adaptive_off_policy": policy, "replay_buffer": buffer},
        features=encode_examples(ctx.tokenizer, train_examples, ctx.data.max_length),
        prepare_batch=prepare_batch,
        on_step_end=on_step_end,
    )


# The paper starts every student from its SFT checkpoint (Ko et al. 2024, following MiniLLM's protocol; the official
# scripts load the SFT student's folder), so by default the student starts from the cached SFT student.
METHOD = Method(
    name="distillm",
    settings=DistiLLMConfig,
    make_loss=make_loss,
    kd_baselines=DistiLLMConfig.divergences,
    student_start="sft",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run DistiLLM and its baselines; returns metrics.json's content."""
    metrics = record_generation_share(run_method(METHOD, argv))
    if metrics:
        out = Path(metrics["run_dir"])
        if (out / "log.jsonl").exists():
            keys = ["loss", "threshold", "val_loss", "student_batches", "replay_batches", "gen_s"]
            png = plot_log(out / "log.jsonl", keys, out / "distillm_schedule.png", "DistiLLM: adaptive off-policy")
            print(f"plot: {png}")
    return metrics


if __name__ == "__main__":
    cli(main)

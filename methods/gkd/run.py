"""GKD against forward KL, reverse KL, supervised JSD and SFT on the embedded task (or any task the common flags name).

    python -m methods.gkd.run                          # lmbda 0.5, beta 0.5, from the SFT student (as in the paper)
    python -m methods.gkd.run --lmbda 1.0              # fully on-policy
    python -m methods.gkd.run --lmbda 0 --seq-kd       # supervised JSD on the teacher's samples
    python -m methods.gkd.run --student-start init     # every student (and baseline) from random initialisation
    python -m methods.gkd.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000

Each micro-batch draws its source (student samples with probability lmbda, else teacher samples with --seq-kd,
else the data), then the student is trained on the generalized JSD to the teacher on it (methods/gkd/loss.py).
log.jsonl records per step the generation time (gen_s) and how many micro-batches were the student's samples;
metrics.json's "train" adds the generation seconds and their share of the training time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError
from core.method import Context, Method, MethodLoss
from core.onpolicy import OnPolicyConfig, Resampler, derived_seed, record_generation_share
from core.pipeline import cli, run_method
from core.train import LossOutput
from methods.gkd.loss import gkd_loss_sum


@dataclass
class GKDConfig(OnPolicyConfig):
    """GKD's hyper-parameters; defaults: TRL's GKDConfig (huggingface/trl: trl/experimental/gkd/gkd_config.py).
    The sampling flags (--temperature, --top-p, --sample-max-new-tokens) and --compare are core.onpolicy's, shared
    by every on-policy method; --chunk-size is the KD path's (core.kdpath)."""

    lmbda: float = field(
        default=0.5, metadata={"help": "probability that a batch is replaced by the student's own samples (TRL 0.5)"}
    )
    beta: float = field(default=0.5, metadata={"help": "generalized JSD weight: 0 forward KL, 1 reverse KL (TRL 0.5)"})
    temperature: float = field(
        default=0.9, metadata={"help": "sampling temperature of the on-policy samples (TRL 0.9)"}
    )
    sample_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens sampled per completion (TRL's max_new_tokens, 128); default: --max-new-tokens"},
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "batches that are not on-policy use the teacher's samples, not the data"}
    )
    compare: str = field(
        default="fkl,rkl,jsd",
        metadata={"help": "word-level KD baselines on the same budget (jsd: beta 0.5, i.e. GKD with lmbda 0)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"--beta must be in [0, 1], got {self.beta}")


def batch_source(coin: float, lmbda: float, seq_kd: bool) -> str:
    """Where a batch's completions come from, given coin ~ U(0, 1) (TRL's training_step): "student" with
    probability lmbda, else "teacher" with seq_kd, else "data"."""
    if coin < lmbda:
        return "student"
    return "teacher" if seq_kd else "data"


def make_loss(ctx: Context, cfg: GKDConfig) -> MethodLoss:
    ctx.kd.require_full_logits("GKD", chunked=True)
    ctx.kd.require_exact_cache("GKD (it reads every teacher logit)")
    resample = Resampler.of(ctx, cfg, "gkd-sample")
    seed = ctx.train.seed

    def prepare_batch(model, batch, step: int, index: int):
        # TRL draws `random.random() <= lmbda` per training_step; here the draw is a pure function of the step and
        # micro-batch, the same on every process (process 0's seed), as TRL's identically seeded `random` is.
        coin = random.Random(derived_seed(seed, step, index, 0, "gkd-source")).random()
        source = batch_source(coin, cfg.lmbda, cfg.seq_kd)
        if source == "data":
            return batch
        resample.stats.add(f"{source}_batches", 1)
        return resample(model if source == "student" else ctx.teacher, batch, step, index)

    def loss_fn(model, batch) -> LossOutput:
        teacher_logits = ctx.kd.teacher_logits(batch, ctx.features)  # (B, T, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return LossOutput(gkd_loss_sum(logits, teacher_logits, batch["labels"], cfg.beta, ctx.kd.cfg.chunk_size))

    def on_step_end(step: int, step_loss: float, logs: dict[str, float]) -> None:
        resample.stats.flush(logs, keys=("gen_s", "student_batches", "teacher_batches"))

    return MethodLoss(loss_fn, prepare_batch=prepare_batch, on_step_end=on_step_end)


# The paper's students start from their supervised fine-tuned checkpoints (Agarwal et al. 2024, Sec. 4: "we start
# from a supervised fine-tuned student"), so by default the student starts from the cached SFT student.
METHOD = Method(
    name="gkd", settings=GKDConfig, make_loss=make_loss, kd_baselines=GKDConfig.divergences, student_start="sft"
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run GKD and its baselines; returns metrics.json's content."""
    return record_generation_share(run_method(METHOD, argv))


if __name__ == "__main__":
    cli(main)

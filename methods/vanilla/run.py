"""Vanilla baselines: SFT, word-level KD and SeqKD on the shared pipeline.

python -m methods.vanilla.run                      # embedded task: teacher, SFT student, forward-KL student
python -m methods.vanilla.run --loss rkl           # any core divergence: fkl rkl jsd tvd skl srkl
python -m methods.vanilla.run --variant seqkd      # train on the teacher's greedy outputs (Kim & Rush, 2016)
python -m methods.vanilla.run --task multi30k --data-dir ../shared/data/multi30k --steps 2000
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core.data import Example, encode_examples
from core.errors import ConfigError
from core.generate import generate, prompt_budget
from core.io import atomic_write_json, stable_hash
from core.losses import DIVERGENCES, get_divergence
from core.method import Context, Method, MethodLoss
from core.objectives import causal_lm_loss
from core.pipeline import cli, run_method

VARIANTS = ("sft", "kd", "seqkd")


@dataclass
class VanillaConfig:
    """Which baseline, and its objective."""

    variant: str = field(default="kd", metadata={"help": "sft, kd (word-level KD) or seqkd (sequence-level KD)"})
    loss: str = field(default="fkl", metadata={"help": "divergence for kd: fkl, rkl, jsd, tvd, skl, srkl"})
    kd_ratio: float = field(
        default=1.0,
        metadata={"help": "weight of the divergence; 1 - kd_ratio weighs the CE (1.0: MiniLLM/DistiLLM KD scripts)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both distributions"})
    beta: float = field(default=0.5, metadata={"help": "jsd: mixture weight of the teacher (0 -> fkl, 1 -> rkl)"})
    alpha: float = field(default=0.1, metadata={"help": "skl/srkl: skew weight (DistiLLM default 0.1)"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.loss not in DIVERGENCES:
            raise ConfigError(f"--loss must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"--beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"--alpha must be in [0, 1), got {self.alpha}")


def label(cfg: VanillaConfig) -> str:
    return {"sft": "sft", "seqkd": "seqkd", "kd": f"kd-{cfg.loss}"}[cfg.variant]


def teacher_outputs(ctx: Context, n: int) -> list[Example]:
    """The teacher's greedy completions of the first n training prompts, cached beside the teacher."""
    prompts = [ex.prompt for ex in ctx.task.train[:n]]
    # The completion is a training target: prompt + completion must fit --max-length, so the teacher writes at most
    # half of it (MiniLLM's SeqKD data: 256 new tokens in 512), or the task's own length when that is shorter.
    new_tokens = min(ctx.task.max_new_tokens, ctx.data.max_length // 2)
    budget = prompt_budget(ctx.teacher, ctx.data.max_length, new_tokens)
    key = stable_hash(
        {"prompts": prompts, "teacher": ctx.teacher.config.to_dict(), "source": ctx.teacher_source, "budget": budget,
         "new_tokens": new_tokens}
    )  # fmt: skip
    path = ctx.cache / "seqkd" / f"{key}.json"
    if path.exists():
        targets = json.loads(path.read_text())
    else:
        outs = generate(
            ctx.teacher, ctx.tokenizer, prompts, new_tokens, batch_size=256, max_prompt_tokens=budget,
            progress=True,
        )  # fmt: skip
        targets = [o.text for o in outs]
        atomic_write_json(path, targets)
    return [Example(p, t, (t,)) for p, t in zip(prompts, targets)]


def make_loss(ctx: Context, cfg: VanillaConfig) -> MethodLoss | None:
    if cfg.variant == "sft":
        return None  # the student is the SFT baseline the pipeline trains anyway
    if cfg.variant == "seqkd":
        n = min(len(ctx.task.train), ctx.train.steps * ctx.train.batch_size)
        examples = teacher_outputs(ctx, n)
        return MethodLoss(causal_lm_loss, features=encode_examples(ctx.tokenizer, examples, ctx.data.max_length))
    divergence = get_divergence(cfg.loss, cfg.temperature, cfg.beta, cfg.alpha)
    return MethodLoss(ctx.kd.loss(divergence, cfg.kd_ratio, features=ctx.features))


def paper_start(cfg: VanillaConfig) -> str:
    """Reverse-KL KD starts from the SFT student, as GKD's supervised-KD baselines do (Agarwal et al. 2024: every
    student starts from its SFT checkpoint), and reverse KL from random initialisation collapses to one token
    (methods/taid/README.md); SFT, forward-KL KD (Hinton et al.) and SeqKD (Kim & Rush) start from --student."""
    return "sft" if cfg.variant == "kd" and cfg.loss == "rkl" else "init"


METHOD = Method(name="vanilla", settings=VanillaConfig, make_loss=make_loss, label=label, student_start=paper_start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one vanilla baseline; returns metrics.json's content."""
    return run_method(METHOD, argv)


if __name__ == "__main__":
    cli(main)

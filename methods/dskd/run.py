"""DSKD with cross-model attention against ULD, MinED and SFT, teacher and student with different tokenizers.

    python -m methods.dskd.run                                   # DSKD-CMA vs ULD vs MinED vs SFT, same budget
    python -m methods.dskd.run --variant uld                     # a baseline as the method
    python -m methods.dskd.run --variant dskd --student-vocab-size 512     # one vocabulary: dual space, no CMA
    python -m methods.dskd.run --teacher-tokenizer ../shared/data/tokenizers/Qwen1.5-1.8B \\
        --student-tokenizer ../shared/data/tokenizers/gpt2      # real tokenizers, tiny models from scratch

By default the teacher is the embedded preset with the task BPE (the same cached teacher every method uses) and
the student reads bytes: a BPE with no merges (--student-vocab-size 259), so "Ġ8" for the teacher is "Ġ", "8"
for the student, and every sequence has a different length on each side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from core.config import comma_list
from core.crosstok import common_vocabulary
from core.errors import ConfigError
from core.losses import DIVERGENCES, IGNORE_INDEX, cross_entropy_sum, get_divergence, shift_for_causal_lm
from core.method import Baseline, Context, Method, MethodLoss
from core.pipeline import cli, run_method
from core.train import LossOutput
from methods.dskd.align import VocabularyAlignment, mined_target_logits
from methods.dskd.loss import cma_terms, dual_space_terms, uld_sum

VARIANTS = ("dskd-cma", "dskd", "uld", "mined")
KD_TERMS = ("t2s_kd", "t2s_ce", "s2t_kd")  # D5's sum, in the official order
BASELINES = ("uld", "mined")


@dataclass
class DSKDConfig:
    """DSKD's settings (defaults: the official scripts, songmzhang/DSKD scripts/*/dskd_cma_*.sh)."""

    variant: str = field(
        default="dskd-cma",
        metadata={"help": "dskd-cma (different vocabularies), dskd (one vocabulary), uld or mined (baselines)"},
    )
    kd_rate: float = field(default=0.5, metadata={"help": "weight of the KD terms; 1 - kd_rate weighs the CE (0.5)"})
    kd_temperature: float = field(default=2.0, metadata={"help": "temperature of the KD divergences (2.0)"})
    kd_objective: str = field(
        default="fkl",
        metadata={"help": "divergence of the student-space term: fkl (official), rkl, jsd, tvd, skl, srkl"},
    )
    projector_lr: float = field(default=1e-3, metadata={"help": "learning rate of the projectors (official 1e-3)"})
    kd_terms: str = field(
        default=",".join(KD_TERMS),
        metadata={"help": "the terms summed into the KD loss (ablation; official: all three, t2s_kd,t2s_ce,s2t_kd)"},
    )
    compare: str = field(
        default="uld,mined", metadata={"help": "cross-tokenizer baselines trained on the same budget (uld, mined)"}
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.kd_rate <= 1.0:
            raise ConfigError(f"--kd-rate must be in [0, 1], got {self.kd_rate}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if self.kd_objective not in DIVERGENCES:
            raise ConfigError(f"--kd-objective must be one of {', '.join(DIVERGENCES)}, got {self.kd_objective!r}")
        if not self.projector_lr > 0:
            raise ConfigError(f"--projector-lr must be positive, got {self.projector_lr}")
        terms = self.terms()
        if not terms or any(t not in KD_TERMS for t in terms):
            raise ConfigError(f"--kd-terms must name some of {','.join(KD_TERMS)}, got {self.kd_terms!r}")
        unknown = [b for b in self.baselines() if b not in BASELINES]
        if unknown:
            raise ConfigError(f"--compare names unknown baselines {unknown}; choose from {', '.join(BASELINES)}")

    def terms(self) -> list[str]:
        return [t.strip() for t in self.kd_terms.split(",") if t.strip()]

    def baselines(self) -> list[str]:
        return [b for b in comma_list(self.compare, "--compare") if b != self.variant]


class Projectors(torch.nn.Module):
    """P^{t->s}: d_t -> d_s, P^{s->t}: d_s -> d_t and, for CMA, P^q: 2 d_s -> 2 d_t; single linear layers
    (official configs/projector_config.json: "t-s", "s-t", "2s-2t"), PyTorch's default initialization."""

    def __init__(self, student_dim: int, teacher_dim: int, query: bool) -> None:
        super().__init__()
        self.t2s = torch.nn.Linear(teacher_dim, student_dim)
        self.s2t = torch.nn.Linear(student_dim, teacher_dim)
        self.query = torch.nn.Linear(2 * student_dim, 2 * teacher_dim) if query else None


def _forward(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)


def _teacher_forward(ctx: Context, batch):
    with torch.no_grad():
        return _forward(ctx.teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])


def _logs(n: int, **sums: torch.Tensor) -> dict[str, float]:
    return {name: float(value.detach()) / n for name, value in sums.items()}


def _index_embeds(embedding: torch.nn.Embedding, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """([e(x_t); e(y_t)], e(y_t)) on shifted (input, target) pairs, detached; masked positions use token 0
    (official: `torch.where(pad_mask, ids, 0)`)."""
    valid = labels != IGNORE_INDEX
    inputs = embedding(torch.where(valid, input_ids, 0)).detach()
    targets = embedding(torch.where(valid, labels, 0)).detach()
    return torch.cat([inputs, targets], dim=-1), targets


def make_dual_space_loss(ctx: Context, cfg: DSKDConfig, cma: bool) -> MethodLoss:
    student, teacher = ctx.student, ctx.teacher
    if not cma:  # positions and ids must coincide: one tokenizer, heads compared on its real vocabulary
        vocab = common_vocabulary(teacher, student, ctx.teacher_tokenizer, ctx.tokenizer, "dskd")
    s_dim, t_dim = student.get_input_embeddings().embedding_dim, teacher.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.train.seed)
        projectors = Projectors(s_dim, t_dim, query=cma).to(ctx.accelerator.device)
    divergence = get_divergence(cfg.kd_objective, cfg.kd_temperature)
    chosen = cfg.terms()

    def loss_fn(model, batch) -> LossOutput:
        unwrapped = ctx.accelerator.unwrap_model(model)
        out = _forward(model, batch["input_ids"], batch["attention_mask"])
        teacher_out = _teacher_forward(ctx, batch)
        logits, labels = shift_for_causal_lm(out.logits, batch["labels"])  # (B, T_s - 1, V_s), (B, T_s - 1)
        hidden = out.hidden_states[-1][:, :-1]  # (B, T_s - 1, d_s)
        ce = cross_entropy_sum(logits, labels)
        student_head = unwrapped.get_output_embeddings().weight  # (V_s, d_s)
        teacher_head = teacher.get_output_embeddings().weight  # (V_t, d_t)
        if cma:
            t_logits, t_labels = shift_for_causal_lm(teacher_out.logits, batch["teacher_labels"])
            t_hidden = teacher_out.hidden_states[-1][:, :-1]  # (B, T_t - 1, d_t)
            s_index, _ = _index_embeds(unwrapped.get_input_embeddings(), batch["input_ids"][:, :-1], labels)
            t_index, t_target = _index_embeds(
                teacher.get_input_embeddings(), batch["teacher_input_ids"][:, :-1], t_labels
            )
            terms = cma_terms(
                logits, hidden, s_index, labels, student_head,
                t_logits, t_hidden, t_index, t_target, t_labels, teacher_head,
                projectors.query, projectors.t2s, projectors.s2t, divergence, cfg.kd_temperature,
            )  # fmt: skip
        else:
            t_logits = teacher_out.logits[:, :-1, :vocab]
            t_hidden = teacher_out.hidden_states[-1][:, :-1]
            terms = dual_space_terms(
                logits[..., :vocab], hidden, t_logits, t_hidden, labels, student_head[:vocab], teacher_head[:vocab],
                projectors.t2s, projectors.s2t, divergence, cfg.kd_temperature,
            )  # fmt: skip
        kd = sum(getattr(terms, t) for t in chosen)  # D5: the official sum of the three terms (--kd-terms)
        n = max(int((labels != IGNORE_INDEX).sum()), 1)
        logs = _logs(n, ce=ce, t2s_ce=terms.t2s_ce, t2s_kd=terms.t2s_kd, s2t_kd=terms.s2t_kd)
        logs["t2s_acc"] = float(terms.t2s_correct) / n
        return LossOutput((1.0 - cfg.kd_rate) * ce + cfg.kd_rate * kd, logs)

    return MethodLoss(
        loss_fn,
        state={"projectors": projectors},
        extra_parameters=list(projectors.parameters()),
        extra_lr=cfg.projector_lr,
    )


def make_uld_loss(ctx: Context, kd_rate: float) -> MethodLoss:
    def loss_fn(model, batch) -> LossOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            t_logits = ctx.teacher(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
            ).logits
        logits, labels = shift_for_causal_lm(logits, batch["labels"])
        t_logits, t_labels = shift_for_causal_lm(t_logits, batch["teacher_labels"])
        ce = cross_entropy_sum(logits, labels)
        uld = uld_sum(logits, t_logits, labels, t_labels)  # U1
        n = max(int((labels != IGNORE_INDEX).sum()), 1)
        return LossOutput((1.0 - kd_rate) * ce + kd_rate * uld, _logs(n, ce=ce, uld=uld))

    return MethodLoss(loss_fn)


@functools.lru_cache(maxsize=4)
def _vocabulary_alignment(teacher_tokenizer, student_tokenizer, teacher_ids: tuple[int, ...]) -> VocabularyAlignment:
    return VocabularyAlignment.build(teacher_tokenizer, student_tokenizer, teacher_ids)


def make_mined_loss(ctx: Context, kd_rate: float, temperature: float) -> MethodLoss:
    # The edit-distance search runs for the teacher tokens of the training data (see core.crosstok.vocabulary_map).
    seen = tuple(sorted({i for f in ctx.features for i in f["teacher_input_ids"]}))
    vocab = _vocabulary_alignment(ctx.teacher_tokenizer, ctx.tokenizer, seen)
    fkl = get_divergence("fkl", temperature)

    def loss_fn(model, batch) -> LossOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            t_logits = ctx.teacher(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
            ).logits
        logits, labels = shift_for_causal_lm(logits, batch["labels"])
        t_logits, t_labels = shift_for_causal_lm(t_logits, batch["teacher_labels"])
        target, aligned = mined_target_logits(
            logits, t_logits, batch["input_ids"][:, :-1], labels, batch["teacher_input_ids"][:, :-1], t_labels, vocab
        )
        mask = labels != IGNORE_INDEX
        ce = cross_entropy_sum(logits, labels)
        kd = fkl(logits, target)[mask].sum()  # M4
        n = max(int(mask.sum()), 1)
        logs = _logs(n, ce=ce, kd=kd)
        logs["aligned"] = float(aligned.sum()) / n
        return LossOutput((1.0 - kd_rate) * ce + kd_rate * kd, logs)

    return MethodLoss(loss_fn)


def make_loss(ctx: Context, cfg: DSKDConfig) -> MethodLoss:
    if cfg.variant == "uld":
        return make_uld_loss(ctx, cfg.kd_rate)
    if cfg.variant == "mined":
        return make_mined_loss(ctx, cfg.kd_rate, cfg.kd_temperature)
    return make_dual_space_loss(ctx, cfg, cma=cfg.variant == "dskd-cma")


def baselines(cfg: DSKDConfig) -> list[Baseline]:
    """ULD and MinED students with the official scripts' kd rate and temperature (the same as DSKD's)."""
    makers = {
        "uld": lambda ctx: make_uld_loss(ctx, cfg.kd_rate),
        "mined": lambda ctx: make_mined_loss(ctx, cfg.kd_rate, cfg.kd_temperature),
    }
    keys = {"uld": {"kd_rate": cfg.kd_rate}, "mined": {"kd_rate": cfg.kd_rate, "temperature": cfg.kd_temperature}}
    return [Baseline(name, keys[name], makers[name]) for name in cfg.baselines()]


METHOD = Method(
    name="dskd",
    settings=DSKDConfig,
    make_loss=make_loss,
    label=lambda cfg: cfg.variant,
    cross_tokenizer=True,
    baselines=baselines,
    # The paper distils into pretrained students (GPT-2 base, TinyLlama); the closest start here is the SFT student
    # (from random initialisation the dual-space targets live in an untrained head: methods/dskd/README.md)
    student_start="sft",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run DSKD (or a cross-tokenizer baseline) and its comparison; returns metrics.json's content."""
    return run_method(METHOD, argv)


if __name__ == "__main__":
    cli(main)

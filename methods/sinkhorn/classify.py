"""SinKD in the paper's own setting: a sentence classifier distilled from a larger one (SST-2-like, GLUE).

    python -m methods.sinkhorn.classify                           # SinKD vs KD with forward KL, reverse KL, JS, and CE
    python -m methods.sinkhorn.classify --sinkhorn-weight 0.05    # a heavier Sinkhorn term
    python -m methods.sinkhorn.classify --seed 1

The data are generated (no files): "sentences" of 5-12 words from 8 positive, 8 negative and 8 neutral words and
"not", which flips the polarity of the next polar word; the label is the sign of the summed polarity (binary, like
SST-2; ties resampled). 10% of the training labels are flipped (--label-noise), the held-out labels are clean and
their inputs never occur in training. A bag of words gets part of the way; negation needs word order.

Teacher: a 2-layer transformer encoder (width 64) trained with CE on the training set and cached; students: 1 layer
of width 16, the same initialisation and data order for every objective (CE, KD with forward KL / reverse KL / JS,
SinKD). Reported per model: accuracy (%) and mean NLL on the held-out split. Writes the run folder (metrics.json,
log.jsonl per student, sinkhorn_cls.png).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from core.config import divergence_list, require
from core.errors import ConfigError
from core.losses import get_divergence
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig, Trainer, count_rows
from methods.sinkhorn.loss import batch_sinkhorn_cost, check_sinkhorn_settings

# An SST-2-like vocabulary: 8 positive, 8 negative and 8 neutral words, and "not", which flips the polarity of the next
# polar word. The label is the sign of the summed polarity (ties are resampled): a bag of words gets part of the way,
# negation needs word order.
POSITIVE = tuple(f"p{i}" for i in range(8))
NEGATIVE = tuple(f"n{i}" for i in range(8))
NEUTRAL = tuple(f"u{i}" for i in range(8))
WORDS = (*POSITIVE, *NEGATIVE, *NEUTRAL, "not")
NOT, PAD = len(WORDS) - 1, len(WORDS)
VOCAB = len(WORDS) + 1
CLASSES = ("negative", "positive")


@dataclass
class PairData:
    """The generated sentiment-like classification task."""

    train_size: int = field(default=10000, metadata={"help": "training examples"})
    eval_size: int = field(default=1000, metadata={"help": "held-out examples (inputs never seen in training)"})
    label_noise: float = field(
        default=0.1, metadata={"help": "share of training labels flipped (eval labels are clean)"}
    )
    data_seed: int = field(default=1234, metadata={"help": "seed of the generated data (fixed across student seeds)"})

    def __post_init__(self) -> None:
        if self.train_size < 8 or self.eval_size < 8:
            raise ConfigError(
                f"--train-size and --eval-size must be at least 8, got {self.train_size}, {self.eval_size}"
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError(f"--label-noise must be in [0, 0.5), got {self.label_noise}")


@dataclass
class PairModels:
    """Teacher and student encoders."""

    teacher_dim: int = field(default=64, metadata={"help": "teacher width"})
    teacher_layers: int = field(default=2, metadata={"help": "teacher layers"})
    teacher_steps: int = field(default=600, metadata={"help": "teacher training steps (CE, batch 64, cached)"})
    student_dim: int = field(default=16, metadata={"help": "student width"})
    student_layers: int = field(default=1, metadata={"help": "student layers"})

    def __post_init__(self) -> None:
        for name in ("teacher_dim", "student_dim"):
            if getattr(self, name) < 4 or getattr(self, name) % 2:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an even number >= 4 (2 attention heads), got {getattr(self, name)}"
                )
        require(self, "at least 1", lambda v: v >= 1, "teacher_layers", "student_layers", "teacher_steps")


@dataclass
class SinKDClassifyConfig:
    """SinKD's objective (defaults: the official sst-2.sh and loss.py, see the README)."""

    alpha: float = field(default=0.9, metadata={"help": "weight of KD; 1 - alpha weighs the CE (sst-2.sh: 0.9)"})
    temperature: float = field(default=2.0, metadata={"help": "temperature of the KD term (sst-2.sh: 2)"})
    sinkhorn_temperature: float = field(default=2.0, metadata={"help": "temperature inside Sinkhorn (loss.py: 2)"})
    epsilon: float = field(default=0.1, metadata={"help": "entropic regularization (loss.py: 0.1)"})
    n_iters: int = field(default=20, metadata={"help": "Sinkhorn iterations (loss.py: 20)"})
    sinkhorn_weight: float = field(
        default=0.0008, metadata={"help": "w on <P, C> with unit mass per sample (official 0.8 x 0.001)"}
    )
    compare: str = field(default="fkl,rkl,jsd", metadata={"help": "KD baselines (same alpha, temperature, budget)"})

    def __post_init__(self) -> None:
        check_sinkhorn_settings(
            self.alpha, self.temperature, self.sinkhorn_temperature, self.epsilon, self.n_iters, self.sinkhorn_weight
        )
        divergence_list(self.compare)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def polarity(ids: Sequence[int]) -> int:
    """Summed polarity: +1 per positive word, -1 per negative word, sign flipped by a "not" right before it."""
    total, flip = 0, 1
    for token in ids:
        if token == NOT:
            flip = -flip
            continue
        word = WORDS[token]
        total += flip * (1 if word in POSITIVE else -1 if word in NEGATIVE else 0)
        flip = 1
    return total


def make_example(rng: random.Random) -> tuple[list[int], int]:
    """One (token ids, label); resampled until the polarity is not a tie."""
    while True:
        ids = [rng.choice((NOT, NOT, *range(NOT))) for _ in range(rng.randint(5, 12))]
        score = polarity(ids)
        if score != 0:
            return ids, int(score > 0)


def make_data(cfg: PairData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): eval inputs never appear in training; a share `label_noise` of training labels is flipped."""
    rng = random.Random(cfg.data_seed)
    evals, seen = [], set()
    while len(evals) < cfg.eval_size:
        ids, label = make_example(rng)
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            evals.append({"input_ids": ids, "label": label})
    train = []
    while len(train) < cfg.train_size:
        ids, label = make_example(rng)
        if tuple(ids) not in seen:
            noisy = 1 - label if rng.random() < cfg.label_noise else label
            train.append({"input_ids": ids, "label": noisy})
    return train, evals


def collate(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        input_ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        attention_mask[row, : len(f["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([f["label"] for f in features]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class PairClassifier(torch.nn.Module):
    """Token + position embeddings, a pre-norm transformer encoder, masked mean pooling, a linear head."""

    def __init__(self, dim: int, layers: int, n_classes: int = len(CLASSES), max_len: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.position = torch.nn.Embedding(max_len, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, 2, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embed(input_ids) + self.position(positions)  # (B, T, D)
        hidden = self.encoder(hidden, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, D)
        return self.head(self.norm(pooled))  # (B, C) logits


def build(dim: int, layers: int, seed: int) -> PairClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PairClassifier(dim, layers)


@torch.no_grad()
def evaluate(model: torch.nn.Module, features: list[dict[str, Any]], device) -> dict[str, float]:
    model.eval()
    batch = {k: v.to(device) for k, v in collate(features).items()}
    logits = model(batch["input_ids"], batch["attention_mask"])
    accuracy = (logits.argmax(-1) == batch["labels"]).double().mean().item()
    nll = F.cross_entropy(logits.float(), batch["labels"]).item()
    return {"accuracy": 100.0 * accuracy, "nll": nll}


# ----------------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------------


def ce_loss(model, batch) -> LossOutput:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return LossOutput(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))


def make_kd_loss(teacher, divergence: str, cfg: SinKDClassifyConfig, sinkhorn: bool):
    """alpha * D_tau(teacher, student) + (1 - alpha) * CE  [+ w * <P*, C> for SinKD], summed over the rows."""
    div = get_divergence(divergence, temperature=cfg.temperature)

    def loss_fn(model, batch) -> LossOutput:
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], batch["attention_mask"])  # (B, C)
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, C)
        kd = div(logits, teacher_logits).sum()
        ce = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        total = cfg.alpha * kd + (1.0 - cfg.alpha) * ce  # Eq. (4), KD and CE terms
        n = logits.shape[0]
        logs = {"kd": kd.item() / n, "ce": ce.item() / n}
        if sinkhorn:
            sink = batch_sinkhorn_cost(logits, teacher_logits, cfg.sinkhorn_temperature, cfg.epsilon, cfg.n_iters)
            total = total + n * cfg.sinkhorn_weight * sink  # Eq. (4): enters the mean loss with weight w
            logs["sinkhorn"] = sink.item()
        return LossOutput(total, logs)

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def get_teacher(ctx: RunContext, data: PairData, models: PairModels, train_features) -> PairClassifier:
    key = {"format": 1, "data": asdict(data), "dim": models.teacher_dim, "layers": models.teacher_layers,
           "steps": models.teacher_steps}  # fmt: skip
    train = TrainConfig(steps=models.teacher_steps, batch_size=64, lr=2e-3, warmup_steps=50, seed=0, checkpoint_every=0)

    def build_teacher(folder) -> None:
        model = build(models.teacher_dim, models.teacher_layers, seed=0)
        work = folder / "work"  # trained inside the cache entry being built (an interrupted build resumes there)
        trainer = Trainer(model, ce_loss, train_features, collate, train, work, ctx.accelerator, count_fn=count_rows,
                          unit="examples", desc="teacher")  # fmt: skip
        result = trainer.train()
        save_model(ctx.accelerator.unwrap_model(trainer.model).cpu(), str(folder / "model.safetensors"))
        (folder / "train_result.json").write_text(json.dumps(asdict(result)))
        shutil.rmtree(work, ignore_errors=True)

    folder = ctx.cached("sinkhorn-cls-teacher", key, build_teacher)
    teacher = build(models.teacher_dim, models.teacher_layers, seed=0)
    load_model(teacher, str(folder / "model.safetensors"))
    return teacher.eval().requires_grad_(False).to(ctx.accelerator.device)


def body(ctx: RunContext) -> Outcome | None:
    data, models = ctx.cfg(PairData), ctx.cfg(PairModels)
    train_cfg, cfg = ctx.cfg(TrainConfig), ctx.cfg(SinKDClassifyConfig)
    train_features, eval_features = make_data(data)
    teacher = get_teacher(ctx, data, models, train_features)
    device = ctx.accelerator.device

    objectives = {"sft": ce_loss}
    objectives |= {f"kd_{d}": make_kd_loss(teacher, d, cfg, sinkhorn=False) for d in divergence_list(cfg.compare)}
    objectives["student"] = make_kd_loss(teacher, "fkl", cfg, sinkhorn=True)  # SinKD: kd + sinkhorn
    evals: dict[str, dict[str, float]] = {"teacher": evaluate(teacher, eval_features, device)}
    results = {}
    for name, loss_fn in objectives.items():
        student = build(models.student_dim, models.student_layers, seed=train_cfg.seed)
        subdir = None if name == "student" else f"baselines/{name}"
        trainer = ctx.trainer(student, loss_fn, train_features, collate, train_cfg, subdir=subdir,
                              count_fn=count_rows, unit="examples", desc=name)  # fmt: skip
        result = trainer.train()
        if not trainer.finished:
            return None
        key = name if name == "student" else f"{name}_student"
        evals[key] = evaluate(ctx.accelerator.unwrap_model(trainer.model), eval_features, device)
        results[key] = asdict(result)
    if ctx.is_main_process:
        from core.plots import plot_log

        plot_log(ctx.out / "log.jsonl", ["loss", "kd", "sinkhorn"], ctx.out / "sinkhorn_cls.png", "SinKD (classifier)")
    n_params = {
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in build(models.student_dim, models.student_layers, 0).parameters()),
    }
    return Outcome(
        task="pairs",
        eval=evals,
        train={**results["student"], "baselines": {k: v for k, v in results.items() if k != "student"}, **n_params},
        columns=["accuracy", "nll"],
    )


RECIPE = Recipe(
    name="sinkhorn",
    family="classification",
    configs=(PairData, PairModels, TrainConfig, SinKDClassifyConfig),
    body=body,
    task=lambda ctx: "pairs",
    description="SinKD on a generated GLUE-like pair-classification task: SinKD vs KD (FKL, RKL, JS) and CE.",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

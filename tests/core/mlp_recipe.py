"""A non-LLM recipe on the run shell, the smallest complete one: a wide MLP teacher distilled into a narrow MLP
student on generated data (KD on class logits, Hinton et al. 2015), beside a CE student on the same budget.

    python -m tests.core.mlp_recipe --steps 60 --out /tmp/mlp

It is what a new family's run.py looks like (docs/architecture.md, "How a non-LLM family plugs in"), and the
tests use it to prove the shell and the Trainer serve a model that is not a causal LM: run folder, resume after
SIGKILL, metrics.json, the benchmark row.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from core.errors import ConfigError
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig, Trainer, count_rows


@dataclass
class BlobsData:
    """The generated task: points in `dim` dimensions, labelled by the nearest of `classes` random centres."""

    dim: int = field(default=8, metadata={"help": "input dimension"})
    classes: int = field(default=4, metadata={"help": "number of classes"})
    n_train: int = field(default=512, metadata={"help": "training points"})
    n_eval: int = field(default=256, metadata={"help": "held-out points"})

    def __post_init__(self) -> None:
        if self.dim < 1 or self.classes < 2 or self.n_train < 1 or self.n_eval < 1:
            raise ConfigError("--dim, --n-train and --n-eval must be at least 1 and --classes at least 2")


@dataclass
class MLPKDConfig:
    """Teacher, student and the KD objective."""

    teacher_width: int = field(default=256, metadata={"help": "hidden width of the teacher"})
    student_width: int = field(default=8, metadata={"help": "hidden width of the student"})
    teacher_steps: int = field(default=150, metadata={"help": "training steps of the teacher (cached)"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KD term"})
    kd_ratio: float = field(default=0.9, metadata={"help": "weight of the KD term; 1 - kd_ratio weighs the CE"})

    def __post_init__(self) -> None:
        if self.teacher_width < 1 or self.student_width < 1 or self.teacher_steps < 1:
            raise ConfigError("--teacher-width, --student-width and --teacher-steps must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")


def make_blobs(cfg: BlobsData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)  # the task is fixed; the run's seed varies only the student
    centres = torch.randn(cfg.classes, cfg.dim, generator=gen) * 2.0
    x = torch.randn(cfg.n_train + cfg.n_eval, cfg.dim, generator=gen) * 2.0
    y = torch.cdist(x, centres).argmin(dim=1)
    return x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train :], y[cfg.n_train :]


def mlp(dim: int, width: int, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(), torch.nn.Linear(width, classes))


def collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}


def ce_loss(model, batch) -> LossOutput:
    return LossOutput(F.cross_entropy(model(batch["x"]), batch["labels"], reduction="sum"))


def kd_loss(teacher: torch.nn.Module, temperature: float, kd_ratio: float):
    def loss_fn(model, batch) -> LossOutput:
        logits = model(batch["x"])  # (B, C)
        with torch.no_grad():
            teacher_logits = teacher(batch["x"])  # (B, C)
        # KL(p_T || q_S) at temperature T, times T^2 so its gradient scale matches the CE's (Hinton et al. 2015)
        kd = F.kl_div(
            F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
            reduction="sum", log_target=True,
        ) * temperature**2  # fmt: skip
        ce = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return LossOutput(kd_ratio * kd + (1 - kd_ratio) * ce, {"kd": kd.item() / len(logits)})

    return loss_fn


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def body(ctx: RunContext) -> Outcome | None:
    data, cfg, train = ctx.cfg(BlobsData), ctx.cfg(MLPKDConfig), ctx.cfg(TrainConfig)
    x, y, x_eval, y_eval = make_blobs(data)
    features = list(zip(x, y))
    kwargs = {"count_fn": count_rows, "throughput_fn": count_rows, "unit": "examples"}

    # The teacher: trained once per (task, width, steps) and cached; concurrent runs wait for one builder.
    teacher_train = TrainConfig(steps=cfg.teacher_steps, batch_size=64, lr=1e-2, warmup_steps=5, seed=0)
    key = {"data": asdict(data), "width": cfg.teacher_width, "train": asdict(teacher_train)}

    def build(folder: Path) -> None:
        model = mlp(data.dim, cfg.teacher_width, data.classes, seed=0)
        trainer = Trainer(model, ce_loss, features, collate, teacher_train, folder / "work", ctx.accelerator, **kwargs)
        result = trainer.train()
        shutil.rmtree(folder / "work")
        save_model(model, str(folder / "model.safetensors"))
        (folder / "train_result.json").write_text(json.dumps(asdict(result)))

    teacher_folder = ctx.cached("mlp-teacher", key, build)
    teacher = mlp(data.dim, cfg.teacher_width, data.classes, seed=0)
    load_model(teacher, str(teacher_folder / "model.safetensors"))
    teacher.eval().requires_grad_(False)

    # The CE baseline and the KD student: same initialisation, data order and budget.
    baseline = mlp(data.dim, cfg.student_width, data.classes, seed=train.seed)
    ce_trainer = ctx.trainer(baseline, ce_loss, features, collate, train, subdir="baselines/ce", **kwargs)
    ce_result = ce_trainer.train()
    if not ce_trainer.finished:
        return None
    student = mlp(data.dim, cfg.student_width, data.classes, seed=train.seed)
    trainer = ctx.trainer(student, kd_loss(teacher, cfg.temperature, cfg.kd_ratio), features, collate, train, **kwargs)
    result = trainer.train()
    if not trainer.finished:
        return None
    save_model(student, str(ctx.out / "student.safetensors"))
    return Outcome(
        task="blobs",
        eval={
            "student": {"accuracy": accuracy(student, x_eval, y_eval)},
            "teacher": {"accuracy": accuracy(teacher, x_eval, y_eval)},
            "ce_student": {"accuracy": accuracy(baseline, x_eval, y_eval)},
        },
        train={**asdict(result), "baselines": {"ce_student": asdict(ce_result)}},
    )


RECIPE = Recipe(
    name="mlp-kd",
    family="vision",
    configs=(BlobsData, MLPKDConfig, TrainConfig),
    body=body,
    task=lambda ctx: "blobs",
    description="KD of a wide MLP teacher into a narrow MLP student on generated blobs (the shell's example recipe).",
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

"""KDExplainer: train the tree-like task-oriented attention student with CE, label smoothing and KD, and measure
whether KD makes the routes of similar classes share modules; then VAM's accuracy gain under KD.

    python -m methods.kdexplainer.run                         # generated hierarchy task: KD, CE, LS, plain/VAM
    python -m methods.kdexplainer.run --task digits           # scikit-learn's digits
    python -m methods.kdexplainer.run --loss ce --compare "" --no-vam   # one objective alone (a benchmark row)

A teacher (an MLP) is trained once per task and cached. Each tree student starts from the same initialisation and
sees the same batches; only the objective differs. Routing similarity between classes (mean cosine of their
module attentions) is compared with the teacher's class similarity (and, on the generated task, the known
hierarchy) by Spearman's rho over class pairs. Writes metrics.json, routing_similarity.png, routing.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import comma_list, require
from core.errors import ConfigError
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig, count_rows
from methods.kdexplainer.data import TASKS, Task, load_task
from methods.kdexplainer.loss import (
    cross_entropy,
    kd_loss,
    offdiagonal_spearman,
    routing_similarity,
    smoothed_cross_entropy,
    teacher_class_similarity,
)
from methods.kdexplainer.model import MLPStudent, Teacher, TreeStudent

LOSSES = ("ce", "ls", "kd")


@dataclass
class KDXConfig:
    """KDExplainer: task, objectives, the tree student, VAM."""

    task: str = field(default="hier", metadata={"help": f"one of {', '.join(TASKS)}"})
    loss: str = field(default="kd", metadata={"help": "objective of the main tree student: ce, ls or kd"})
    compare: str = field(default="ce,ls", metadata={"help": "objectives trained beside it ('' for none)"})
    vam: bool = field(default=True, metadata={"help": "also train an ordinary student with and without VAM under KD"})
    layers: int = field(default=3, metadata={"help": "layers of the tree student"})
    modules: int = field(default=4, metadata={"help": "modules per layer of the tree student"})
    width: int = field(default=64, metadata={"help": "width of each module (and of the ordinary students)"})
    tau_start: float = field(
        default=10.0, metadata={"help": "routing t at step 0 (official t = 10; the softmax runs at 0.5 t)"}
    )
    tau_end: float = field(
        default=10.0 / 300, metadata={"help": "routing t at the last step (official t / epoch at epoch 300: 10 / 300)"}
    )
    gumbel: bool = field(
        default=False,
        metadata={"help": "Gumbel noise on the routing logits in training (ours; the official adds none)"},
    )
    head_hidden: int = field(
        default=128, metadata={"help": "hidden width of the per-class MLP heads (official 128; 0: linear heads)"}
    )
    head_dropout: float = field(default=0.15, metadata={"help": "dropout in the per-class heads (official 0.15)"})
    routing_freeze_epochs: float = field(
        default=2.0,
        metadata={"help": "epochs of the data before the routing logits move (official: branch lr 0 for 2)"},
    )
    ls_eps: float = field(default=0.1, metadata={"help": "label smoothing epsilon"})
    kd_temperature: float = field(default=4.0, metadata={"help": "KD temperature T (official config: 4)"})
    kd_alpha: float = field(default=0.9, metadata={"help": "weight of T^2 KL (official kd_weight 0.9)"})
    kd_gamma: float = field(default=0.1, metadata={"help": "weight of CE in KD (official classify_weight 0.1)"})
    vam_groups: int = field(default=4, metadata={"help": "virtual modules (channel groups) of VAM"})
    teacher_steps: int = field(default=400, metadata={"help": "full-batch Adam steps of the teacher"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        bad = [c for c in self.compare_list if c not in LOSSES]
        if bad:
            raise ConfigError(f"--compare names unknown objectives {bad}; choose from {', '.join(LOSSES)}")
        require(self, "at least 1", lambda v: v >= 1, "layers")
        require(self, "at least 2", lambda v: v >= 2, "modules", "width")
        require(self, "at least 0", lambda v: v >= 0, "head_hidden", "routing_freeze_epochs")
        require(self, "in [0, 1)", lambda v: 0 <= v < 1, "head_dropout")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"need 0 < --tau-end <= --tau-start, got {self.tau_end} and {self.tau_start}")
        if not 0 <= self.ls_eps < 1:
            raise ConfigError(f"--ls-eps must lie in [0, 1), got {self.ls_eps}")
        require(self, "positive", lambda v: v > 0, "kd_temperature")
        require(self, "non-negative", lambda v: v >= 0, "kd_alpha", "kd_gamma")
        if self.kd_alpha + self.kd_gamma == 0:
            raise ConfigError("--kd-alpha 0 and --kd-gamma 0 leave no loss: give one of them a positive weight")
        if self.vam_groups < 2 or self.width % self.vam_groups:
            raise ConfigError(f"--vam-groups must be >= 2 and divide --width {self.width}, got {self.vam_groups}")
        if self.teacher_steps < 1:
            raise ConfigError(f"--teacher-steps must be at least 1, got {self.teacher_steps}")

    @property
    def compare_list(self) -> list[str]:
        names = comma_list(self.compare, "--compare")
        return [c for c in dict.fromkeys(names) if c != self.loss]


@dataclass
class KDXTrain(TrainConfig):
    """Optimization of each student (the same for every objective)."""

    steps: int = field(default=1000, metadata={"help": "optimizer steps per student"})
    batch_size: int = field(default=64, metadata={"help": "examples per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    checkpoint_every: int = field(default=500, metadata={"help": "write a checkpoint every this many steps"})
    log_every: int = field(default=10, metadata={"help": "append a line to log.jsonl every this many steps"})


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """tau(s) = start / (1 + (start / end - 1) s / S): the official t / epoch decay, stretched to end at `end`.
    With the defaults (10, 10 / 300) this is exactly 10 / e at the fractional epoch e = 1 + 299 s / S, the
    official schedule over 300 epochs mapped onto our S steps."""
    return start / (1 + (start / end - 1) * step / steps)


def routing_freeze_steps(epochs: float, n_examples: int, batch_size: int) -> int:
    """Optimizer steps in the first `epochs` passes over the data (the official branch lr is 0 in epochs 1-2)."""
    return math.ceil(epochs * n_examples / batch_size)


def build_teacher(folder: Path, task: Task, steps: int) -> None:
    torch.manual_seed(0)
    teacher = Teacher(task.x_train.shape[1], task.num_classes)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(task.x_train), task.y_train).backward()
        optimizer.step()
    with torch.no_grad():
        train_logits, test_logits = teacher(task.x_train), teacher(task.x_test)
    torch.save({"train": train_logits, "test": test_logits}, folder / "logits.pt")
    torch.save(teacher.state_dict(), folder / "teacher.pt")


def accuracy(model: torch.nn.Module, task: Task) -> float:
    with torch.no_grad():
        return float((model(task.x_test).argmax(-1) == task.y_test).float().mean())


def train_student(ctx, model, objective: str, task: Task, teacher_logits, cfg: KDXConfig, train: KDXTrain, subdir):
    examples = [{"x": task.x_train[i], "y": task.y_train[i], "t": teacher_logits[i]} for i in range(len(task.y_train))]

    def collate(batch):
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    def loss_fn(model, batch):
        logits = model(batch["x"])
        if objective == "ce":
            per_example = cross_entropy(logits, batch["y"])
        elif objective == "ls":
            per_example = smoothed_cross_entropy(logits, batch["y"], cfg.ls_eps)
        else:
            per_example = kd_loss(logits, batch["t"], batch["y"], cfg.kd_temperature, cfg.kd_alpha, cfg.kd_gamma)
        return LossOutput(per_example.sum())

    buffers = [m.temperature for m in model.modules() if hasattr(m, "temperature")]
    # the official routing learning rate is 0 for the first 2 epochs (Adam's moments still accumulate): we restore
    # the routing logits after each optimizer step of that span, which is the same as a zero learning rate
    routing = getattr(model, "routing_logits", None)
    frozen = routing.detach().clone() if routing is not None else None
    freeze = routing_freeze_steps(cfg.routing_freeze_epochs, len(examples), train.batch_size)

    def on_step_end(step, loss, logs):
        tau = tau_at(step, train.steps, cfg.tau_start, cfg.tau_end)
        for buffer in buffers:
            buffer.fill_(tau)
        logs["tau"] = tau
        if frozen is not None and step <= freeze:
            with torch.no_grad():
                routing.copy_(frozen)

    trainer = ctx.trainer(model, loss_fn, examples, collate, train, subdir=subdir, count_fn=count_rows,
                          throughput_fn=count_rows, unit="examples", on_step_end=on_step_end,
                          desc=subdir or objective)  # fmt: skip
    result = trainer.train()
    if not trainer.finished:
        return None
    return trainer.accelerator.unwrap_model(trainer.model).cpu().eval(), result


def routing_metrics(model: TreeStudent, task: Task, teacher_sim: torch.Tensor) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        sim = routing_similarity(model.routing())
    out = {"routing_corr": offdiagonal_spearman(sim, teacher_sim), "accuracy": accuracy(model, task)}
    if task.shared_levels is not None:
        out["hierarchy_corr"] = offdiagonal_spearman(sim, task.shared_levels.double())
        off = ~torch.eye(task.num_classes, dtype=torch.bool)
        same, across = off & (task.shared_levels >= 1), task.shared_levels == 0
        out["superclass_gap"] = float(sim[same].mean() - sim[across].mean())
    return out, sim


def plot_heatmaps(path: Path, panels: dict[str, torch.Tensor], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.2))
    for ax, (name, matrix) in zip(axes, panels.items(), strict=True):
        image = ax.imshow(matrix.numpy(), cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(matrix.shape[0]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def body(ctx: RunContext) -> Outcome | None:
    cfg, train = ctx.cfg(KDXConfig), ctx.cfg(KDXTrain)
    task = load_task(cfg.task)
    # the data's own checksum is in the key, so a change of the generated task can never reuse a stale teacher
    checksum = [float(task.x_train.double().sum()), float(task.x_test.double().sum()), list(task.x_train.shape)]
    key = {"task": cfg.task, "steps": cfg.teacher_steps, "data": checksum, "version": 1}
    folder = ctx.cached("kdexplainer-teacher", key, lambda tmp: build_teacher(tmp, task, cfg.teacher_steps))
    logits = torch.load(folder / "logits.pt", weights_only=True)
    teacher_acc = float((logits["test"].argmax(-1) == task.y_test).float().mean())
    teacher_sim = teacher_class_similarity(logits["train"], task.y_train, cfg.kd_temperature)
    in_dim = task.x_train.shape[1]
    evals, sims, results = {}, {}, {}
    for objective in [cfg.loss, *cfg.compare_list]:
        torch.manual_seed(train.seed)  # the same initialisation for every objective
        model = TreeStudent(in_dim, task.num_classes, cfg.layers, cfg.modules, cfg.width, cfg.tau_start, cfg.gumbel,
                            cfg.head_hidden, cfg.head_dropout)  # fmt: skip
        subdir = None if objective == cfg.loss else objective
        trained = train_student(ctx, model, objective, task, logits["train"], cfg, train, subdir)
        if trained is None:
            return None
        model, results[objective] = trained
        evals[objective], sims[objective] = routing_metrics(model, task, teacher_sim)
    extra_evals = {"teacher": {"accuracy": teacher_acc}}
    extra = {}
    if cfg.vam:
        for name, groups in (("kd_plain", 0), ("kd_vam", cfg.vam_groups)):
            torch.manual_seed(train.seed)
            model = MLPStudent(in_dim, task.num_classes, cfg.width, groups, cfg.tau_start)
            trained = train_student(ctx, model, "kd", task, logits["train"], cfg, train, name)
            if trained is None:
                return None
            extra_evals[f"{name}_student"] = {"accuracy": accuracy(trained[0], task)}
        extra["vam_gain"] = extra_evals["kd_vam_student"]["accuracy"] - extra_evals["kd_plain_student"]["accuracy"]
    for sub in [*cfg.compare_list, *(("kd_plain", "kd_vam") if cfg.vam else ())]:
        shutil.rmtree(ctx.out / sub / "checkpoints", ignore_errors=True)
    panels = {"teacher class similarity": teacher_sim}
    if task.shared_levels is not None:
        panels["known hierarchy (shared levels)"] = task.shared_levels.double()
    panels.update({f"routing, {o.upper()} (rho={evals[o]['routing_corr']:.2f})": sims[o] for o in sims})
    plot_heatmaps(ctx.out / "routing_similarity.png", panels, f"{cfg.task}: class similarity, seed {train.seed}")
    (ctx.out / "routing.json").write_text(
        json.dumps({"teacher_similarity": teacher_sim.tolist(), **{o: s.tolist() for o, s in sims.items()}})
    )
    eval_ = {"student": evals[cfg.loss], **{f"{o}_student": evals[o] for o in cfg.compare_list}, **extra_evals}
    columns = ["routing_corr", "accuracy"] + (
        ["hierarchy_corr", "superclass_gap"] if task.shared_levels is not None else []
    )
    return Outcome(cfg.task, eval_, dataclasses.asdict(results[cfg.loss]), extra, columns)


def label(ctx: RunContext) -> str:
    loss = ctx.cfg(KDXConfig).loss
    return "kdexplainer" if loss == "kd" else f"kdexplainer-{loss}"


RECIPE = Recipe(
    name="kdexplainer",
    family="vision",
    configs=(KDXConfig, KDXTrain),
    body=body,
    task=lambda ctx: ctx.cfg(KDXConfig).task,
    label=label,
    description=__doc__.split("\n\n")[0],
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

"""PHI-S on scikit-learn's digits: one student learns three teachers' features at once, under each normalization.

    python -m methods.phis.run                                   # PHI-S student + every other normalization
    python -m methods.phis.run --normalization zca --compare ""  # one normalization alone (a benchmark row)

Three teachers with very different statistics (an MLP's hidden layer, a CNN's sum-pooled conv features, a fixed
degree-2 polynomial map; total variances ~2e2, ~1e5, ~1e5) are built once and cached. For each normalization the
same student (same initialisation, same batches) is trained with MSE on the normalized targets; it is judged by
each teacher's error in that teacher's own space relative to the teacher's variance, and by a linear probe of its
features on the digit labels. Writes metrics.json, per_teacher_error.png and one log per student.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import comma_list
from core.errors import ConfigError
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig, count_rows
from methods.phis.data import TEACHERS, build_teacher_features, load_digits_split, load_teacher_features
from methods.phis.loss import MultiTeacherStudent, linear_probe_accuracy, multi_teacher_loss, normalized_errors
from methods.phis.transforms import NORMALIZATIONS, fit


@dataclass
class PHISConfig:
    """PHI-S multi-teacher distillation: which normalization, which teachers, which baselines."""

    task: str = field(default="digits", metadata={"help": "the data set: digits (scikit-learn's bundled digits)"})
    normalization: str = field(
        default="phi-s", metadata={"help": f"normalization of the main student, one of {', '.join(NORMALIZATIONS)}"}
    )
    compare: str = field(
        default="none,global,standard,pca-w,zca,hca",
        metadata={"help": "comma-separated normalizations trained beside it on the same budget ('' for none)"},
    )
    teachers: str = field(default="mlp,cnn,poly", metadata={"help": f"comma-separated teachers from {TEACHERS}"})
    width: int = field(default=256, metadata={"help": "student backbone width"})
    eps: float = field(
        default=1e-6, metadata={"help": "whitening floor: eigenvalues below eps * max eigenvalue are raised to it"}
    )
    teacher_steps: int = field(default=300, metadata={"help": "full-batch Adam steps of the MLP and CNN teachers"})

    def __post_init__(self) -> None:
        if self.task != "digits":
            raise ConfigError(f"--task must be digits (the only vision task of this package), got {self.task!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        unknown = [n for n in self.compare_list if n not in NORMALIZATIONS]
        if unknown:
            raise ConfigError(
                f"--compare names unknown normalizations {unknown}; choose from {', '.join(NORMALIZATIONS)}"
            )
        names = self.teacher_list
        if not names or any(n not in TEACHERS for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"--teachers must be distinct names from {', '.join(TEACHERS)}, got {self.teachers!r}")
        if self.width < 4:
            raise ConfigError(f"--width must be at least 4, got {self.width}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"--eps must lie in (0, 1), got {self.eps}")
        if self.teacher_steps < 1:
            raise ConfigError(f"--teacher-steps must be at least 1, got {self.teacher_steps}")

    @property
    def compare_list(self) -> list[str]:
        names = comma_list(self.compare, "--compare")
        return [n for n in dict.fromkeys(names) if n != self.normalization]

    @property
    def teacher_list(self) -> list[str]:
        return comma_list(self.teachers, "--teachers")


@dataclass
class PHISTrain(TrainConfig):
    """Optimization of each student (the same for every normalization)."""

    steps: int = field(default=800, metadata={"help": "optimizer steps per student"})
    batch_size: int = field(default=64, metadata={"help": "examples per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    checkpoint_every: int = field(default=400, metadata={"help": "write a checkpoint every this many steps"})
    log_every: int = field(default=10, metadata={"help": "append a line to log.jsonl every this many steps"})


def teacher_folder(ctx: RunContext, cfg: PHISConfig) -> Path:
    data = load_digits_split()
    key = {"teachers": list(TEACHERS), "steps": cfg.teacher_steps, "seed": 0, "split_seed": 0, "version": 1}
    return ctx.cached("phis-digit-teachers", key, lambda tmp: build_teacher_features(tmp, data, cfg.teacher_steps))


def train_student(ctx, norm: str, normalizers, data, feats, cfg: PHISConfig, train: PHISTrain, main: bool):
    """Train one student on targets normalized by `norm`; returns (model, TrainResult) or None if stopped early."""
    names = cfg.teacher_list
    targets = {t: normalizers[norm][t].normalize(feats[t][0]).float() for t in names}  # {t: (N, D_t)}
    examples = [{"x": data.x_train[i], **{t: targets[t][i] for t in names}} for i in range(len(data.x_train))]
    torch.manual_seed(train.seed)  # the same initialisation for every normalization
    model = MultiTeacherStudent({t: feats[t][0].shape[1] for t in names}, cfg.width)

    def collate(batch):
        return {key: torch.stack([b[key] for b in batch]) for key in batch[0]}

    def loss_fn(model, batch):
        per_example, per_teacher = multi_teacher_loss(model(batch["x"]), {t: batch[t] for t in names})
        return LossOutput(per_example.sum(), {f"mse/{t}": float(v.detach().mean()) for t, v in per_teacher.items()})

    trainer = ctx.trainer(
        model,
        loss_fn,
        examples,
        collate,
        train,
        subdir=None if main else norm,
        count_fn=count_rows,
        throughput_fn=count_rows,
        unit="examples",
        desc=norm,
    )
    result = trainer.train()
    if not trainer.finished:
        return None
    return trainer.accelerator.unwrap_model(trainer.model).cpu().eval(), result


def evaluate(model, norm: str, normalizers, data, feats, cfg: PHISConfig) -> dict[str, float]:
    names = cfg.teacher_list
    with torch.no_grad():
        predictions = model(data.x_test)
        z_train, z_test = model.features(data.x_train), model.features(data.x_test)
    means = {t: feats[t][0].mean(0) for t in names}
    errors = normalized_errors(predictions, {t: feats[t][1] for t in names}, normalizers[norm], means)
    values = list(errors.values())
    return {
        "mean_nerr": sum(values) / len(values),
        "max_nerr": max(values),
        "probe_acc": linear_probe_accuracy(z_train, data.y_train, z_test, data.y_test),
        **{f"nerr/{t}": e for t, e in errors.items()},
    }


def plot_errors(path: Path, evals: dict[str, dict[str, float]], teachers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = list(evals)
    fig, ax = plt.subplots(figsize=(1.2 * len(norms) + 2, 3.4))
    width = 0.8 / len(teachers)
    for k, t in enumerate(teachers):
        ax.bar([i + k * width for i in range(len(norms))], [evals[n][f"nerr/{t}"] for n in norms], width, label=t)
    ax.set_xticks([i + width * (len(teachers) - 1) / 2 for i in range(len(norms))], norms)
    ax.set_yscale("log")
    ax.set_ylabel("error / teacher variance (test)")
    ax.legend(title="teacher")
    ax.set_title("per-teacher normalized error of the student, by normalization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def body(ctx: RunContext) -> Outcome | None:
    cfg, train = ctx.cfg(PHISConfig), ctx.cfg(PHISTrain)
    folder = teacher_folder(ctx, cfg)
    data = load_digits_split()
    feats = load_teacher_features(folder, tuple(cfg.teacher_list))  # {t: (train, test)}
    order = [cfg.normalization, *cfg.compare_list]
    normalizers = {n: {t: fit(n, feats[t][0], cfg.eps) for t in cfg.teacher_list} for n in order}
    evals, results = {}, {}
    for norm in order:
        trained = train_student(ctx, norm, normalizers, data, feats, cfg, train, main=norm == cfg.normalization)
        if trained is None:
            return None
        model, results[norm] = trained
        evals[norm] = evaluate(model, norm, normalizers, data, feats, cfg)
    for norm in cfg.compare_list:  # finished baselines were kept only so an interrupted run resumes cheaply
        shutil.rmtree(ctx.out / norm / "checkpoints", ignore_errors=True)
    plot_errors(ctx.out / "per_teacher_error.png", evals, cfg.teacher_list)
    accuracy = torch.load(folder / "accuracy.pt", weights_only=True)
    teachers = {
        t: {
            "dim": int(feats[t][0].shape[1]),
            "total_variance": float(feats[t][0].var(0).sum()),
            "whitening_clamped_dims": fit("zca", feats[t][0], cfg.eps).clamped,
            **({"test_accuracy": accuracy[t]} if t in accuracy else {}),
        }
        for t in cfg.teacher_list
    }
    (ctx.out / "teachers.json").write_text(json.dumps(teachers, indent=1))
    eval_ = {"student": evals[cfg.normalization]}
    eval_.update({f"{n}_student": evals[n] for n in cfg.compare_list})
    return Outcome(
        task=cfg.task,
        eval=eval_,
        train=dataclasses.asdict(results[cfg.normalization]),
        extra={"teachers": teachers, "normalization": cfg.normalization},
        columns=["mean_nerr", "max_nerr", "probe_acc", *[f"nerr/{t}" for t in cfg.teacher_list]],
    )


def label(ctx: RunContext) -> str:
    norm = ctx.cfg(PHISConfig).normalization
    return "phis" if norm == "phi-s" else f"phis-{norm}"


RECIPE = Recipe(
    name="phis",
    family="vision",
    configs=(PHISConfig, PHISTrain),
    body=body,
    task=lambda ctx: ctx.cfg(PHISConfig).task,
    label=label,
    description=__doc__.split("\n\n")[0],
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

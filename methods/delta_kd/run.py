"""Delta-KD against word-level KD and SFT: pretrain on corpus A, fine-tune the teacher on task B, distill on B.

    python -m methods.delta_kd.run                                   # A = reverse, add, pair; B = sort (embedded ops)
    python -m methods.delta_kd.run --pretrain-ops reverse,sort,pair --finetune-ops add
    python -m methods.delta_kd.run --alpha 0.5                       # half the teacher's SFT shift

Stages (every model trained by core.train.Trainer; the first three cached on disk, so seeds 1 and 2 reuse them):
  1. base teacher (--teacher-preset) and base student (--student) trained on corpus A (the `ops` operations named by
     --pretrain-ops; the base student once per --seed);
  2. the SFT teacher: the base teacher fine-tuned on task B (--finetune-ops) for --finetune-steps;
  3. three students, each starting from the base student, on task B with the same budget (--steps, --batch-size),
     data order and seed: Delta-KD (target: the base student shifted by the teacher's SFT shift), word-level KD
     (forward KL to the SFT teacher) and SFT (CE on B's references);
  4. evaluation: quality on B (exact match, ROUGE-L, perplexity of B's held-out references) and how much of A each
     model keeps (`ppl_a`, perplexity of A's held-out references).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from core.config import ModelConfig, comma_list
from core.data import Collator, DataConfig, TaskData, encode_examples, load_task
from core.errors import ConfigError
from core.losses import cross_entropy_sum, get_divergence, shift_for_causal_lm
from core.metrics import evaluate_model, perplexity
from core.models import PRESETS, build_or_load, count_parameters, load_model
from core.objectives import causal_lm_loss, make_kd_loss
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.teacher import get_tokenizer, task_key, train_cached
from core.train import LossOutput, TrainConfig
from methods.delta_kd.loss import delta_target_logprobs, kl_to_target

OPS = ("reverse", "sort", "add", "pair")


@dataclass
class DeltaModels:
    """Base teacher, base student, and how each is trained before distillation."""

    teacher_preset: str = field(default="teacher-small", metadata={"help": "preset of the teacher (core/models.py)"})
    teacher_steps: int = field(default=1500, metadata={"help": "steps of the base teacher's pretraining on A"})
    teacher_batch_size: int = field(
        default=64, metadata={"help": "batch size of the teachers' and base student's training"}
    )
    teacher_lr: float = field(default=1e-3, metadata={"help": "learning rate of the teacher's pretraining and SFT"})
    finetune_steps: int = field(default=400, metadata={"help": "steps of the teacher's SFT on task B"})
    student: str = field(default="student", metadata={"help": "preset of the student"})
    student_pretrain_steps: int = field(default=1500, metadata={"help": "steps of the base student's pretraining on A"})
    vocab_size: int = field(default=512, metadata={"help": "vocabulary of the BPE trained on the task text"})

    def __post_init__(self) -> None:
        for flag, preset in (("--teacher-preset", self.teacher_preset), ("--student", self.student)):
            if preset not in PRESETS:
                raise ConfigError(f"{flag} {preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
        for name in ("teacher_steps", "teacher_batch_size", "finetune_steps", "student_pretrain_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.teacher_lr > 0:
            raise ConfigError(f"--teacher-lr must be positive, got {self.teacher_lr}")
        if self.vocab_size < 300:
            raise ConfigError(f"--vocab-size must be at least 300, got {self.vocab_size}")


@dataclass
class DeltaConfig:
    """Delta-KD's settings and the corpus split."""

    pretrain_ops: str = field(default="reverse,add,pair", metadata={"help": "ops operations of corpus A (pretraining)"})
    finetune_ops: str = field(default="sort", metadata={"help": "ops operations of task B (teacher SFT, distillation)"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the teacher's SFT shift (1: the full shift)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of target and student"})
    sft_weight: float = field(
        default=0.0, metadata={"help": "lambda: weight of the CE on B's references; 1 - lambda weighs the KL"}
    )

    def __post_init__(self) -> None:
        a, b = self.ops("pretrain"), self.ops("finetune")
        if set(a) & set(b):
            raise ConfigError(
                f"--pretrain-ops and --finetune-ops overlap ({sorted(set(a) & set(b))}); A and B must differ"
            )
        if not self.alpha >= 0:
            raise ConfigError(f"--alpha must be non-negative, got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.sft_weight <= 1.0:
            raise ConfigError(f"--sft-weight must be in [0, 1], got {self.sft_weight}")

    def ops(self, which: str) -> list[str]:
        text = self.pretrain_ops if which == "pretrain" else self.finetune_ops
        names = comma_list(text, f"--{which}-ops")
        unknown = [o for o in names if o not in OPS]
        if not names or unknown:
            raise ConfigError(f"--{which}-ops must name operations among {', '.join(OPS)}, got {text!r}")
        return names


def make_delta_loss(base_student, base_teacher, sft_teacher, cfg: DeltaConfig):
    """lambda * CE + (1 - lambda) * KL(pi*_s || pi_theta) summed over B's target tokens (three frozen models)."""

    def loss_fn(model, batch) -> LossOutput:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            raw_s, raw_t, ft_t = (m(**inputs).logits[:, :-1] for m in (base_student, base_teacher, sft_teacher))
        logits = model(**inputs).logits
        logits, labels = shift_for_causal_lm(logits, batch["labels"])  # (B, T-1, V), (B, T-1)
        valid = labels != -100
        target = delta_target_logprobs(raw_s[valid], raw_t[valid], ft_t[valid], cfg.alpha, cfg.temperature)  # (N, V)
        kl = kl_to_target(logits[valid], target, cfg.temperature).sum()
        ce = cross_entropy_sum(logits, labels) if cfg.sft_weight > 0 else kl.new_zeros(())
        n = max(int(valid.sum()), 1)
        total = cfg.sft_weight * ce + (1.0 - cfg.sft_weight) * kl  # Eq. (2) with pi_ref = pi*_s
        return LossOutput(total, {"kl": kl.item() / n, "ce": ce.item() / n})

    return loss_fn


def split_task(data: DataConfig, cfg: DeltaConfig) -> tuple[TaskData, TaskData]:
    """(A, B) from the embedded ops task: A's and B's examples by operation, eval_size held-out prompts each.

    The ops task is drawn with 4 x eval_size held-out prompts (about eval_size per operation); when one side has
    fewer than eval_size of them, it is topped up from a second stream (data_seed + 1) of prompts never seen in
    training, so the training data never depend on the top-up."""
    full = load_task(replace(data, eval_size=4 * data.eval_size))
    train_prompts = {ex.prompt for ex in full.train}
    extra = load_task(replace(data, eval_size=8 * data.eval_size, train_size=1, data_seed=data.data_seed + 1)).eval

    def part(ops: list[str], name: str) -> TaskData:
        train = [ex for ex in full.train if ex.group in ops]
        evals = [ex for ex in full.eval if ex.group in ops][: data.eval_size]
        seen = {ex.prompt for ex in evals} | train_prompts
        for ex in extra:
            if len(evals) >= data.eval_size:
                break
            if ex.group in ops and ex.prompt not in seen:
                evals.append(ex)
                seen.add(ex.prompt)
        return TaskData(name, train, evals, full.metrics, full.max_new_tokens, full.source)

    return part(cfg.ops("pretrain"), "ops-A"), part(cfg.ops("finetune"), "ops-B")


def body(ctx: RunContext) -> Outcome | None:
    data, models, train_cfg, cfg = ctx.cfg(DataConfig), ctx.cfg(DeltaModels), ctx.cfg(TrainConfig), ctx.cfg(DeltaConfig)
    if data.task != "ops":
        raise ConfigError(
            f"delta_kd builds corpus A and task B from the embedded ops task; --task {data.task} is not supported yet"
        )
    acc, cache = ctx.accelerator, ctx.cache
    task_a, task_b = split_task(data, cfg)
    model_cfg = ModelConfig(teacher_preset=models.teacher_preset, student=models.student, vocab_size=models.vocab_size)
    tokenizer, tokenizer_key = get_tokenizer(model_cfg, data, load_task(data), cache)
    feats_a = encode_examples(tokenizer, task_a.train, data.max_length)
    feats_b = encode_examples(tokenizer, task_b.train, data.max_length)
    common = {"task": task_key(data, task_a), "tokenizer": tokenizer_key, "a": cfg.ops("pretrain")}

    def pretrain_cfg(steps: int, seed: int, lr: float) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=models.teacher_batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                           seed=seed, checkpoint_every=250)  # fmt: skip

    t_cfg = pretrain_cfg(models.teacher_steps, 0, models.teacher_lr)
    base_teacher, _, base_teacher_dir = train_cached(
        f"delta-base-teacher-{models.teacher_preset}", {**common, "preset": models.teacher_preset, "train": asdict(t_cfg)},
        lambda: build_or_load(models.teacher_preset, tokenizer, seed=0), feats_a, tokenizer, t_cfg, cache, acc,
    )  # fmt: skip
    ft_cfg = pretrain_cfg(models.finetune_steps, 0, models.teacher_lr)
    sft_teacher, _, _ = train_cached(
        f"delta-sft-teacher-{models.teacher_preset}",
        {**common, "base": base_teacher_dir.name, "b": cfg.ops("finetune"), "train": asdict(ft_cfg)},
        lambda: load_model(base_teacher_dir), feats_b, tokenizer, ft_cfg, cache, acc,
    )  # fmt: skip
    s_cfg = pretrain_cfg(models.student_pretrain_steps, train_cfg.seed, 2e-3)
    _, _, base_student_dir = train_cached(
        f"delta-base-student-{models.student}", {**common, "preset": models.student, "train": asdict(s_cfg)},
        lambda: build_or_load(models.student, tokenizer, seed=train_cfg.seed), feats_a, tokenizer, s_cfg, cache, acc,
    )  # fmt: skip
    frozen = {}
    for name, model in (
        ("base_teacher", base_teacher),
        ("teacher", sft_teacher),
        ("base_student", load_model(base_student_dir)),
    ):
        frozen[name] = model.eval().requires_grad_(False).to(acc.device)

    kd_div = get_divergence("fkl", temperature=cfg.temperature)
    objectives = {
        "student": make_delta_loss(frozen["base_student"], frozen["base_teacher"], frozen["teacher"], cfg),
        "kd_fkl_student": make_kd_loss(frozen["teacher"], kd_div, kd_ratio=1.0 - cfg.sft_weight),
        "sft_student": causal_lm_loss,
    }
    collate = Collator(tokenizer.pad_token_id)
    trained, results = {}, {}
    for key, loss_fn in objectives.items():
        subdir = None if key == "student" else f"baselines/{key}"
        student = load_model(base_student_dir)  # every student starts from the base student
        trainer = ctx.trainer(
            student, loss_fn, feats_b, collate, train_cfg, subdir=subdir, desc=key.removesuffix("_student")
        )
        result = trainer.train()
        if not trainer.finished:
            return None
        trained[key], results[key] = acc.unwrap_model(trainer.model), asdict(result)

    evals: dict[str, dict[str, float]] = {}
    for key, model in {**trained, **frozen}.items():
        scores, _ = evaluate_model(model, tokenizer, task_b, data.max_length, 100, None)
        scores = {k: v for k, v in scores.items() if "/" not in k}  # B is one or two operations
        scores["ppl_a"] = perplexity(model, tokenizer, task_a.eval, data.max_length)
        evals[key] = scores
    if ctx.is_main_process:
        from core.plots import plot_log

        plot_log(ctx.out / "log.jsonl", ["loss", "kl"], ctx.out / "delta_kd.png", "Delta-KD: KL to the Delta target")
    return Outcome(
        task="ops-" + "+".join(cfg.ops("finetune")),
        eval=evals,
        train={**results["student"], "baselines": {k: v for k, v in results.items() if k != "student"},
               "student_params": count_parameters(trained["student"]),
               "teacher_params": count_parameters(frozen["teacher"])},  # fmt: skip
        extra={"corpora": {"a": cfg.ops("pretrain"), "b": cfg.ops("finetune"), "n_train_a": len(task_a.train),
                           "n_train_b": len(task_b.train), "n_eval_a": len(task_a.eval), "n_eval_b": len(task_b.eval)}},
        columns=["exact_match", "rougeL", "perplexity", "ppl_a"],
    )  # fmt: skip


RECIPE = Recipe(
    name="delta_kd",
    family="transfer",
    configs=(DataConfig, DeltaModels, TrainConfig, DeltaConfig),
    body=body,
    task=lambda ctx: "ops-" + "+".join(ctx.cfg(DeltaConfig).ops("finetune")),
    description="Delta-KD (Cao et al. 2025): distill the teacher's SFT shift onto the base student; vs KD and SFT.",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

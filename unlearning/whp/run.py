"""Targeted unlearning: Who's Harry Potter, its causal-intervention variant, and three baselines, on one budget.

    python -m unlearning.whp.run                          # WHP vs causal intervention vs GA, GD, NPO (generated people)
    python -m unlearning.whp.run --method causal --n-counterfactual 20
    python -m unlearning.whp.run --task tofu --data-dir ../shared/data/tofu --tofu-split forget01 --vocab-size 8000
    python -m unlearning.whp.run --base-model PATH --retain-model PATH   # any local HF causal LM (e.g. TOFU's)

What happens: the model to unlearn is trained on every document of the task (cached), and so is a retain model
trained without the forget documents (the reference of TOFU's forget quality). Each method then fine-tunes a
copy of the model to unlearn on the forget documents, with the same steps, batch size and learning rate:
- whp:    labels from WHP's generic predictions (a reinforced model, Eq. (1), anchored-term translation);
- causal: token-level KL toward the mean of the model's predictions on N copies of each document in which the
          target's name is replaced by N fictitious names (Liu et al. 2024);
- ga / gd / npo: gradient ascent, gradient difference, negative preference optimization.
Every model (before, after, retain model) is evaluated by unlearning.evaluate.evaluate_unlearning; the table
shows methods x metrics. The run folder holds metrics.json, samples.jsonl (each forget question with every
model's answer), log.jsonl per method and unlearning_curves.png.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import comma_list, require
from core.data import Collator, encode_examples
from core.errors import ConfigError, ModelError
from core.io import atomic_write_text, stable_hash
from core.models import PRESETS, build_model, load_model, preset_config
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.teacher import train_cached
from core.tokenizers import load_tokenizer, train_bpe
from core.train import LossOutput, TrainConfig, count_rows
from unlearning.data import REPLACEMENT_NAMES, TOFU_SPLITS, UnlearningTask, generated_task, tofu_task
from unlearning.evaluate import evaluate_unlearning
from unlearning.whp.loss import (
    CopyPrediction,
    ce_mean,
    copy_prediction,
    counterfactual_average,
    encode_document,
    first_token_ids,
    first_token_sets,
    kl_to_teacher_sums,
    name_first_tokens,
    npo_loss,
    replace_name,
    sequence_nll,
    whp_labels,
)

METHODS = ("whp", "causal", "ga", "gd", "npo")
# Official scripts/tofu.sh: retain_strength=1 for npo and grad_diff, 0 otherwise.
DEFAULT_RETAIN_STRENGTH = {"whp": 0.0, "causal": 0.0, "ga": 0.0, "gd": 1.0, "npo": 1.0}
COUNTERFACTUAL_PROMPT = "Complete the following passage about {name}.\n"  # official counterfact_prompt


@dataclass
class UnlearnData:
    """Which task: the generated people (default) or TOFU."""

    task: str = field(default="people", metadata={"help": "people (generated, no files) or tofu (--data-dir)"})
    data_dir: str | None = field(default=None, metadata={"help": "tofu: the folder of TOFU's json files"})
    tofu_split: str = field(default="forget01", metadata={"help": "tofu: forget01, forget05 or forget10"})
    forget_file: str | None = field(
        default=None,
        metadata={
            "help": "tofu: the forget questions' file (.json or .jsonl; default <tofu-split>.json(l) in --data-dir)"
        },
    )
    retain_file: str | None = field(
        default=None,
        metadata={"help": "tofu: the retain questions' file (default retain99/95/90.json(l) matching --tofu-split)"},
    )
    n_people: int = field(default=24, metadata={"help": "people: how many fictitious people"})
    n_targets: int = field(default=2, metadata={"help": "people: how many of them to unlearn"})
    data_seed: int = field(default=1234, metadata={"help": "people: seed of the generated people (fixed across seeds)"})
    eval_size: int = field(
        default=400, metadata={"help": "evaluate at most this many questions per retain set (and retain documents)"}
    )
    max_length: int = field(default=256, metadata={"help": "truncate documents to this many tokens"})
    max_new_tokens: int = field(default=32, metadata={"help": "length of the greedy answers at evaluation"})

    def __post_init__(self) -> None:
        if self.task not in ("people", "tofu"):
            raise ConfigError(f"--task must be people or tofu, got {self.task!r}")
        if self.task == "tofu" and not self.data_dir:
            raise ConfigError("--task tofu needs --data-dir (the folder of TOFU's json files, ../shared/data/tofu)")
        if self.tofu_split not in TOFU_SPLITS:
            raise ConfigError(f"--tofu-split must be one of {', '.join(TOFU_SPLITS)}, got {self.tofu_split!r}")
        for flag, value, least in (("--eval-size", self.eval_size, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                   ("--max-length", self.max_length, 16)):  # fmt: skip
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if self.task != "tofu" and (self.forget_file or self.retain_file):
            raise ConfigError("--forget-file and --retain-file are for --task tofu (TOFU-like question files)")

    def load(self) -> UnlearningTask:
        if self.task == "tofu":
            return tofu_task(self.data_dir, self.tofu_split, self.eval_size, self.forget_file, self.retain_file)
        task = generated_task(self.n_people, self.n_targets, self.data_seed)
        task.retain = task.retain[: self.eval_size]
        return task


@dataclass
class BaseModelConfig:
    """The model to unlearn, and the retain model (never trained on the forget documents)."""

    base_model: str | None = field(
        default=None, metadata={"help": "a local HF causal-LM folder to unlearn; default: a preset trained on the task"}
    )
    retain_model: str | None = field(
        default=None, metadata={"help": "a local HF folder of the retain model (forget quality); default: trained"}
    )
    skip_retain_model: bool = field(
        default=False, metadata={"help": "train no retain model (quicker; no forget quality is reported)"}
    )
    base_preset: str = field(
        default="teacher-small", metadata={"help": "preset of the trained models (core/models.py)"}
    )
    teacher_steps: int = field(
        default=250, metadata={"help": "training steps of the model to unlearn (and retain model)"}
    )
    base_lr: float = field(default=3e-3, metadata={"help": "learning rate of the model to unlearn"})
    base_batch_size: int = field(default=32, metadata={"help": "batch size of the model to unlearn"})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary trained on the task (no --base-model)"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder; default: the base model's or a BPE"}
    )

    def __post_init__(self) -> None:
        for flag, path in (("--base-model", self.base_model), ("--retain-model", self.retain_model)):
            if path is not None and not (Path(path) / "config.json").is_file():
                raise ConfigError(
                    f"{flag} {path} is not a model folder (no config.json); pass a save_pretrained folder"
                )
        if self.base_preset not in PRESETS:
            raise ConfigError(f"--base-preset must be one of {', '.join(PRESETS)}, got {self.base_preset!r}")
        require(self, "at least 1", lambda v: v >= 1, "teacher_steps", "base_batch_size")
        require(self, "positive", lambda v: v > 0, "base_lr")
        if self.vocab_size < 300:
            raise ConfigError(f"--vocab-size must be at least 300, got {self.vocab_size}")


@dataclass
class UnlearnConfig:
    """The unlearning methods and their hyper-parameters."""

    method: str = field(default="whp", metadata={"help": "the run's method: whp, causal, ga, gd or npo"})
    compare: str = field(
        default="causal,ga,gd,npo", metadata={"help": "other methods trained on the same budget ('' for none)"}
    )
    alpha: float = field(default=1.0, metadata={"help": "WHP: weight of ReLU(v_reinforced - v_baseline) in Eq. (1)"})
    reinforce_steps: int = field(
        default=40, metadata={"help": "WHP: steps training the reinforced model on the forget docs"}
    )
    reinforce_lr: float = field(default=1e-3, metadata={"help": "WHP: learning rate of the reinforced model"})
    n_counterfactual: int = field(
        default=20, metadata={"help": "causal: N copies with the name replaced (official: 20 on WPU, 1 on TOFU)"}
    )
    counterfactual_prompt: bool = field(
        default=False, metadata={"help": "causal: prefix each copy with 'Complete the following passage about NAME.'"}
    )
    change_name_back: bool = field(
        default=True,
        metadata={"help": "move the copies' mass on their own name to the target's name at later mentions"},
    )
    autojunk: bool = field(
        default=True,
        metadata={
            "help": "difflib's autojunk in the token alignment (official: on; on a repetitive document of 200+ "
            "tokens it can lose most of the alignment: --no-autojunk)"
        },
    )
    retain_strength: float | None = field(
        default=None, metadata={"help": "weight of the retain CE term; default: the official (1 for gd/npo, else 0)"}
    )
    beta: float = field(default=0.1, metadata={"help": "NPO's beta (official 0.1)"})
    confident: float = field(default=0.5, metadata={"help": "fabrication: minimum geometric-mean token probability"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        unknown = [m for m in self.compared() if m not in METHODS]
        if unknown:
            raise ConfigError(f"--compare names unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if not 1 <= self.n_counterfactual <= len(REPLACEMENT_NAMES):
            raise ConfigError(
                f"--n-counterfactual must be between 1 and {len(REPLACEMENT_NAMES)}, got {self.n_counterfactual}"
            )
        require(self, "non-negative", lambda v: v >= 0, "alpha")
        require(self, "at least 1", lambda v: v >= 1, "reinforce_steps")
        require(self, "positive", lambda v: v > 0, "reinforce_lr")
        if self.retain_strength is not None and self.retain_strength < 0:
            raise ConfigError(f"--retain-strength must be non-negative, got {self.retain_strength}")
        require(self, "positive", lambda v: v > 0, "beta")
        require(self, "in [0, 1]", lambda v: 0 <= v <= 1, "confident")

    def compared(self) -> list[str]:
        names = comma_list(self.compare, "--compare")
        return [m for m in dict.fromkeys(names) if m != self.method]

    def strength(self, method: str) -> float:
        return DEFAULT_RETAIN_STRENGTH[method] if self.retain_strength is None else self.retain_strength


@dataclass
class UnlearnTrain(TrainConfig):
    """Optimization of every unlearning method (one budget for all)."""

    steps: int = field(default=30, metadata={"help": "optimizer steps of each unlearning method"})
    batch_size: int = field(default=8, metadata={"help": "forget documents per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW) of every method"})
    warmup_steps: int = field(default=3, metadata={"help": "linear warmup steps before the cosine decay"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "write a checkpoint every this many steps (0: at the end)"}
    )


# ------------------------------------------------------------------------------------------------------------------
# Models: tokenizer, model to unlearn, retain model, reinforced model (all cached)
# ------------------------------------------------------------------------------------------------------------------


def task_key(data: UnlearnData, task: UnlearningTask) -> dict[str, Any]:
    return {"task": task.name, "source": task.source, "data": {k: v for k, v in asdict(data).items() if k != "eval_size"},
            "n_train": len(task.train), "n_forget": len(task.forget_docs)}  # fmt: skip


def get_tokenizer(ctx: RunContext, cfg: BaseModelConfig, data: UnlearnData, task: UnlearningTask):
    path = cfg.tokenizer or cfg.base_model
    if path:
        return load_tokenizer(path), f"path:{Path(path).resolve()}"
    key = {"task": task_key(data, task), "vocab_size": cfg.vocab_size}

    def build(tmp: Path) -> None:
        train_bpe([ex.prompt + ex.target for ex in task.train], cfg.vocab_size).save_pretrained(tmp)

    return load_tokenizer(ctx.cached("unlearning-tokenizers", key, build)), stable_hash(key)


def trained_model(ctx, kind, key, build, examples, tokenizer, steps, lr, batch_size, max_length):
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps // 10), seed=0,
                            checkpoint_every=100)  # fmt: skip
    features = encode_examples(tokenizer, examples, max_length)
    model, result, folder = train_cached(
        kind, {**key, "train": asdict(train_cfg)}, build, features, tokenizer, train_cfg, ctx.cache, ctx.accelerator
    )
    return model, {"source": str(folder), "train": asdict(result)}, folder


def base_models(ctx: RunContext, task: UnlearningTask, tokenizer, tok_key: str):
    """(model to unlearn, its folder, retain model, info)."""
    data, cfg = ctx.cfg(UnlearnData), ctx.cfg(BaseModelConfig)
    info: dict[str, Any] = {}
    key = {"task": task_key(data, task), "tokenizer": tok_key}
    if cfg.base_model:
        base, base_folder = load_model(cfg.base_model), Path(cfg.base_model)
        info["base"] = {"source": cfg.base_model}
    else:
        key["model"] = preset_config(cfg.base_preset, tokenizer, data.max_length).to_dict()

        def build():
            return build_model(cfg.base_preset, tokenizer, seed=0, max_positions=data.max_length)

        base, info["base"], base_folder = trained_model(
            ctx, "unlearning-base", key, build, task.train, tokenizer, cfg.teacher_steps, cfg.base_lr,
            cfg.base_batch_size, data.max_length,
        )  # fmt: skip
    if cfg.retain_model:
        retain, info["retain"] = load_model(cfg.retain_model), {"source": cfg.retain_model}
    elif cfg.base_model or cfg.skip_retain_model:
        retain = None  # a given model to unlearn has no trained twin here: forget quality needs --retain-model
    else:
        retain, info["retain"], _ = trained_model(
            ctx, "unlearning-retain", {**key, "retain_only": True}, build, task.retain_docs, tokenizer,
            cfg.teacher_steps, cfg.base_lr, cfg.base_batch_size, data.max_length,
        )  # fmt: skip
    if len(tokenizer) > base.config.vocab_size:
        raise ModelError(
            f"the model to unlearn has {base.config.vocab_size} embeddings, the tokenizer {len(tokenizer)}"
        )
    return base, base_folder, retain, info


# ------------------------------------------------------------------------------------------------------------------
# Teachers: WHP labels and the causal-intervention distributions, per forget document
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def probs_of(model, docs, pad_id: int, device) -> list[torch.Tensor]:
    """Each document's (T, V) next-token probabilities (float32), in one batch."""
    width = max(len(d.ids) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, d in enumerate(docs):
        ids[r, : len(d.ids)] = torch.tensor(d.ids)
        mask[r, : len(d.ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()  # (B, T, V)
    return [logits[r, : len(d.ids)] for r, d in enumerate(docs)]


def causal_features(model, tokenizer, task, cfg: UnlearnConfig, device) -> list[dict[str, Any]]:
    """Per forget document: its ids, the positions aligned in every copy and the averaged teacher there."""
    model.eval()
    if cfg.n_counterfactual > len(task.replacements):
        raise ConfigError(
            f"--n-counterfactual {cfg.n_counterfactual}: this task has only {len(task.replacements)} counterfactual "
            "names (more people give more: --n-people)"
        )
    names = list(task.replacements[: cfg.n_counterfactual])
    features = []
    for ex, target in zip(task.forget_docs, task.target_of):
        original = encode_document(tokenizer, ex.prompt, ex.target, target)
        copies = []
        for name in names:
            prefix = COUNTERFACTUAL_PROMPT.format(name=name) if cfg.counterfactual_prompt else ""
            copies.append(
                encode_document(
                    tokenizer,
                    replace_name(ex.prompt, target, name),
                    replace_name(ex.target, target, name),
                    name,
                    prefix,
                )
            )
        logits = probs_of(model, copies, tokenizer.pad_token_id, device)
        predictions: list[CopyPrediction] = [
            copy_prediction(
                original,
                copy,
                torch.softmax(lg, -1),
                first_token_ids(tokenizer, name),
                cfg.change_name_back,
                first_token_sets(tokenizer, name),
                cfg.autojunk,
            )  # fmt: skip
            for copy, lg, name in zip(copies, logits, names)
        ]
        positions, probs = counterfactual_average(
            original, predictions, cfg.change_name_back, always_move=cfg.counterfactual_prompt,
            target_first=name_first_tokens(tokenizer, target),
        )  # fmt: skip
        features.append(
            {"input_ids": original.ids, "labels": original.labels, "positions": positions, "teacher": probs}
        )
    return features


def whp_features(base, reinforced, tokenizer, task, cfg: UnlearnConfig, device) -> list[dict[str, Any]]:
    """Per forget document: its ids, and WHP's generic label at each aligned position (one translation)."""
    base.eval()
    reinforced.eval()
    features = []
    name = task.replacements[0]  # the anchored-term dictionary: the target's name -> one generic name
    for ex, target in zip(task.forget_docs, task.target_of):
        original = encode_document(tokenizer, ex.prompt, ex.target, target)
        copy = encode_document(
            tokenizer, replace_name(ex.prompt, target, name), replace_name(ex.target, target, name), name
        )
        (base_copy,) = probs_of(base, [copy], tokenizer.pad_token_id, device)
        (reinforced_original,) = probs_of(reinforced, [original], tokenizer.pad_token_id, device)
        positions, labels = whp_labels(
            original, copy, base_copy, reinforced_original, cfg.alpha, first_token_ids(tokenizer, name),
            cfg.change_name_back, first_token_sets(tokenizer, name), name_first_tokens(tokenizer, target), cfg.autojunk,
        )  # fmt: skip
        features.append(
            {"input_ids": original.ids, "labels": original.labels, "positions": positions, "target_ids": labels}
        )
    return features


def lm_features(tokenizer, examples, max_length: int) -> list[dict[str, Any]]:
    return encode_examples(tokenizer, examples, max_length)


def paired(forget: list[dict], retain: list[dict], steps: int, batch_size: int, seed: int) -> list[dict]:
    """Forget features repeated to cover the run, each paired with a random retain document (official: a random
    retain example per forget example)."""
    rng = random.Random(seed)
    repeats = max(1, math.ceil(steps * batch_size / len(forget)))
    return [{"forget": f, "retain": rng.choice(retain)} for _ in range(repeats) for f in forget]


class PairCollator:
    """Pads the forget side (ids, labels, aligned positions, teacher) and the retain side of a batch."""

    def __init__(self, pad_id: int, vocab: int):
        self.lm = Collator(pad_id)
        self.vocab = vocab

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        forget = [r["forget"] for r in rows]
        batch = self.lm([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in forget])
        if "positions" in forget[0]:
            width = max(max(len(f["positions"]) for f in forget), 1)
            positions = torch.full((len(forget), width), -1, dtype=torch.long)
            teacher = torch.zeros(len(forget), width, self.vocab)
            for r, f in enumerate(forget):
                n = len(f["positions"])
                positions[r, :n] = torch.tensor(f["positions"], dtype=torch.long)
                if "teacher" in f:
                    teacher[r, :n, : f["teacher"].shape[-1]] = f["teacher"]
                else:  # WHP: one-hot generic labels, so the KL below is the cross-entropy on them
                    teacher[r, torch.arange(n), f["target_ids"]] = 1.0
            batch["positions"], batch["teacher"] = positions, teacher
        retain = self.lm([r["retain"] for r in rows])
        batch.update({f"retain_{k}": v for k, v in retain.items()})
        return batch


def make_loss(method: str, reference, retain_strength: float, beta: float):
    """loss_fn(model, batch) -> LossOutput: the sum over rows of each row's loss (the loop divides by rows)."""

    def loss_fn(model, batch) -> LossOutput:
        rows = batch["input_ids"].shape[0]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        if method in ("whp", "causal"):
            forget = kl_to_teacher_sums(logits, batch["positions"], batch["teacher"]).mean()
        elif method in ("ga", "gd"):
            forget = -ce_mean(logits, batch["labels"])  # ascent: the negated token-mean NLL
        else:  # npo
            nll, _ = sequence_nll(logits, batch["labels"])
            with torch.no_grad():
                ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ref_nll, _ = sequence_nll(ref_logits, batch["labels"])
            forget = npo_loss(nll, ref_nll, beta).mean()
        total, logs = forget, {"forget_loss": forget.item()}
        if retain_strength > 0:
            retain_logits = model(
                input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"]
            ).logits
            retain = ce_mean(retain_logits, batch["retain_labels"])
            total = total + retain_strength * retain
            logs["retain_loss"] = retain.item()
        return LossOutput(total * rows, logs)

    return loss_fn


# ------------------------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------------------------


def body(ctx: RunContext) -> Outcome | None:
    data, base_cfg, cfg, train = (
        ctx.cfg(UnlearnData),
        ctx.cfg(BaseModelConfig),
        ctx.cfg(UnlearnConfig),
        ctx.cfg(UnlearnTrain),
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = data.load()
    tokenizer, tok_key = get_tokenizer(ctx, base_cfg, data, task)
    base, base_folder, retain_model, info = base_models(ctx, task, tokenizer, tok_key)
    device = ctx.accelerator.device
    base.to(device).eval()

    def evaluate(model, stats=None):
        return evaluate_unlearning(
            model, tokenizer, task, stats, data.max_new_tokens, data.max_length, cfg.confident, data.eval_size
        )

    evals: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[str]]] = {}
    retain_stats = None
    if retain_model is not None:
        retain_model.to(device).eval()
        evals["retain_model"], samples["retain_model"], retain_stats = evaluate(retain_model)
        evals["retain_model"]["forget_quality"] = 1.0  # the KS test of the retain model against itself
    evals["original"], samples["original"], _ = evaluate(base, retain_stats)

    methods = [cfg.method, *cfg.compared()]
    vocab = base.config.vocab_size
    forget_lm = lm_features(tokenizer, task.forget_docs, data.max_length)
    retain_lm = lm_features(tokenizer, task.retain_docs, data.max_length)
    results: dict[str, Any] = {}
    teacher_info: dict[str, Any] = {}
    for method in methods:
        if method == "causal":
            forget = causal_features(base, tokenizer, task, cfg, device)
        elif method == "whp":
            reinforced, reinforced_info, _ = trained_model(
                ctx, "unlearning-reinforced",
                {"base": str(base_folder.resolve()), "forget": [ex.prompt + ex.target for ex in task.forget_docs]},
                lambda: load_model(base_folder), task.forget_docs, tokenizer, cfg.reinforce_steps, cfg.reinforce_lr,
                min(train.batch_size, len(task.forget_docs)), data.max_length,
            )  # fmt: skip
            reinforced.to(device)
            forget = whp_features(base, reinforced, tokenizer, task, cfg, device)
            teacher_info["reinforced"] = reinforced_info
            del reinforced
        else:
            forget = forget_lm
        if method in ("whp", "causal"):
            teacher_info[f"{method}_aligned_positions"] = sum(len(f["positions"]) for f in forget)
        student = load_model(base_folder)
        features = paired(forget, retain_lm, train.steps, train.batch_size, train.seed)
        loss_fn = make_loss(method, base if method == "npo" else None, cfg.strength(method), cfg.beta)
        subdir = None if method == cfg.method else method
        trainer = ctx.trainer(
            student, loss_fn, features, PairCollator(tokenizer.pad_token_id, vocab), train, subdir=subdir,
            count_fn=count_rows, unit="documents", desc=method,
        )  # fmt: skip
        result = trainer.train()
        if not trainer.finished:
            return None
        model = ctx.accelerator.unwrap_model(trainer.model).eval()
        key = "student" if method == cfg.method else f"{method}_student"
        evals[key], samples[method], _ = evaluate(model, retain_stats)
        results[method] = asdict(result)
        if not subdir:
            model.save_pretrained(ctx.out / "student", safe_serialization=True)
            tokenizer.save_pretrained(ctx.out / "student")
    for method in cfg.compared():  # kept until now so that an interrupted run skips the methods it finished
        shutil.rmtree(ctx.out / method / "checkpoints", ignore_errors=True)
    write_samples(ctx.out / "samples.jsonl", task, samples)
    plot_curves(ctx.out, methods, cfg.method)
    train_info = {**results[cfg.method], "methods": results, "models": info, "teachers": teacher_info}
    columns = [c for c in COLUMNS if c in evals["student"]]
    return Outcome(task=task.name, eval=evals, train=train_info, columns=columns)


COLUMNS = ["forget_acc", "forget_rougeL", "forget_prob", "forget_truth_ratio", "forget_quality", "fabrication", "forget_degenerate",
           "retain_acc", "hard_retain_acc", "retain_rougeL", "model_utility", "retain_ppl", "degenerate"]  # fmt: skip


def write_samples(path: Path, task: UnlearningTask, samples: dict[str, dict[str, list[str]]]) -> None:
    lines = []
    for k, qa in enumerate(task.forget):
        row = {"set": "forget", "question": qa.question, "answer": qa.answer}
        row.update({model: gens["forget"][k] for model, gens in samples.items()})
        lines.append(json.dumps(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curves(out: Path, methods: list[str], main: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for method in methods:
        log = out / ("" if method == main else method) / "log.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ax.plot([r["step"] for r in rows], [r["forget_loss"] for r in rows], label=method, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("forget-side loss")
    ax.set_yscale("symlog")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "unlearning_curves.png", dpi=120)
    plt.close(fig)


def task_name(ctx: RunContext) -> str:
    data = ctx.cfg(UnlearnData)
    if data.task != "tofu":
        return "people"
    return f"tofu-{Path(data.forget_file).stem}" if data.forget_file else f"tofu-{data.tofu_split}"


RECIPE = Recipe(
    name="unlearning/whp",
    family="unlearning",
    configs=(UnlearnData, BaseModelConfig, UnlearnConfig, UnlearnTrain),
    body=body,
    task=task_name,
    label=lambda ctx: f"unlearning/{ctx.cfg(UnlearnConfig).method}",
    description=__doc__,
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

"""The LLM recipe: the path every LLM method's run.py takes, on the run shell (core.shell).

    task -> tokenizer -> teacher (cached) -> [prune:K: kept layers (cached), healed student (cached, core.healing)]
    -> SFT baseline (cached) -> KD and method baselines (cached)
    -> the method's student -> evaluation of teacher, SFT student, baselines and student -> Outcome

The shell around it parses the flags, owns the run folder (resume, refuse other settings, skip a complete run),
seeds, writes metrics.json and prints the table. A method supplies a `Method` (core.method): its name, its
settings dataclass, and `make_loss(ctx, settings)` returning the training loss (and any state to checkpoint).
Everything else is shared, so methods are compared on equal terms.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from core.config import EvalConfig, ModelConfig, sampling_seeds
from core.crosstok import CrossTokenizerConfig, PairCollator, encode_pairs, get_tokenizer_pair
from core.data import Collator, DataConfig, TaskData, chat_prompts, encode_examples, load_task
from core.errors import ConfigError
from core.generate import position_limit
from core.healing import CALIBRATION_EXAMPLES, heal_student, selected_layers
from core.io import atomic_dir, atomic_write_json, stable_hash
from core.kdpath import KDPath, KDPathConfig
from core.losses import get_divergence
from core.method import Baseline, Context, Method, MethodLoss
from core.metrics import evaluate_model
from core.models import build_or_load, count_parameters, load_model
from core.objectives import causal_lm_loss
from core.precision import precision_key
from core.pretrained import parse_prune, resolve_model_folder
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.teacher import check_same_vocabulary, get_teacher, get_tokenizer, task_key, train_cached
from core.tokenizers import with_bos_on_plain_calls
from core.train import TrainConfig, Trainer, check_batch_size

__all__ = ["BaselineSetup", "cli", "llm_recipe", "run_method"]


def evaluate_cached(
    name: str,
    model,
    tokenizer,
    task,
    data: DataConfig,
    evaluation: EvalConfig,
    folder: Path | None,
    stats: dict | None = None,
) -> tuple[dict, list[str]]:
    """Evaluate; for cached models (teacher, SFT baseline) reuse the scores stored beside the model. `stats`
    receives how many prompts were cut to fit (core.metrics.evaluate_model)."""
    settings = {
        "format": 4,  # 4: prompt and completion split --max-length as in training (core.generate.generation_budget)
        "max_new_tokens": evaluation.max_new_tokens,
        "task": task.name,
        "max_length": data.max_length,
        "decoding": [evaluation.eval_decoding, sampling_seeds(evaluation)],
        "examples": stable_hash([[ex.prompt, list(ex.references)] for ex in task.eval]),  # chat format included
        **precision_key(),  # bf16 decodes under autocast: other text (empty under fp32, so old entries hold)
    }
    path = folder / f"eval-{stable_hash(settings)}.json" if folder is not None else None
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        if stats is not None:
            stats.update(stored.get("stats", {}))
        return stored["scores"], stored["predictions"]
    found: dict = {}
    scores, predictions = evaluate_model(
        model, tokenizer, task, data.max_length, evaluation.eval_batch_size, evaluation.max_new_tokens, stats=found,
        sample_seeds=sampling_seeds(evaluation),
    )  # fmt: skip
    if stats is not None:
        stats.update(found)
    if path is not None:
        atomic_write_json(path, {"scores": scores, "predictions": predictions, "stats": found})
    print(f"[{name}] " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), file=sys.stderr)
    return scores, predictions


@dataclass
class BaselineSetup:
    """What every cached baseline student of a run shares: it trains from the run student's initialisation, on
    the run's data, order and budget (only its objective differs)."""

    tokenizer: PreTrainedTokenizerBase
    tokenizer_key: str
    task: TaskData
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    cache: Path
    accelerator: Accelerator
    teacher_folder: str | None = None  # what --student prune:K prunes
    start: Path | None = None  # --student-start sft: the SFT student's folder, where every later student starts
    kept: list[int] | None = None  # prune:K: the teacher layers --prune-rule kept (core.healing.selected_layers)
    healed: Path | None = None  # --heal-steps: the healed student's folder, where SFT and every method start

    def build_student(self):
        """A fresh student: the SFT student under --student-start sft (once trained), else the healed student
        (--heal-steps), else --student's model."""
        if self.start is not None:
            return load_model(self.start)
        if self.healed is not None:
            return load_model(self.healed)
        return build_or_load(
            self.model.student, self.tokenizer, seed=self.train.seed, teacher_folder=self.teacher_folder,
            keep=self.kept,
        )  # fmt: skip

    @functools.cached_property
    def features(self) -> list[dict[str, list[int]]]:
        """The training examples in the student's tokenization, encoded once for every baseline of the run."""
        return encode_examples(
            self.tokenizer, self.task.train, self.data.max_length, self.task.report.setdefault("train", {})
        )

    def key(self) -> dict[str, Any]:
        key = {
            "task": task_key(self.data, self.task),
            "tokenizer": self.tokenizer_key,
            "student": self.model.student,
            "train": {k: v for k, v in asdict(self.train).items() if k != "stop_after"},
            **precision_key(),  # empty under fp32: a bf16-trained baseline is another cache entry
        }
        if parse_prune(self.model.student) is not None:  # one cache entry per cut: never mix two rules' students
            key.update(student_from=self.teacher_folder, prune_rule=self.model.prune_rule, kept_layers=self.kept)
        if self.healed is not None:
            key["healed"] = str(self.healed)
        if self.start is not None:
            key["start"] = str(self.start)
        return key

    def train_student(self, kind: str, extra_key: dict[str, Any], loss_fn, features=None, collate=None):
        """(model, TrainResult, cache folder) of a baseline student, trained once per configuration."""
        return train_cached(
            f"{kind}-{Path(self.model.student).name.replace(':', '')}",
            {**self.key(), **extra_key},
            self.build_student,
            features if features is not None else self.features,
            self.tokenizer,
            self.train,
            self.cache,
            self.accelerator,
            loss_fn=loss_fn,
            collate=collate,
        )


def get_sft_baseline(setup: BaselineSetup):
    """The SFT student every method is compared against (trained from --student, never from itself), at --sft-lr
    (default --lr). Its key holds the lr it trained at, so an SFT baseline at lr x is one cache entry whether x came
    from --lr or --sft-lr."""
    lr = setup.model.sft_lr if setup.model.sft_lr is not None else setup.train.lr
    return replace(setup, start=None, train=replace(setup.train, lr=lr)).train_student("sft", {}, causal_lm_loss)


def get_kd_baseline(setup: BaselineSetup, divergence: str, kd: KDPath, teacher_source: str):
    """A word-level KD student (kd_ratio 1) with the named divergence, trained once per configuration on the run's
    KD path (a lossy teacher cache is part of its key; the exact fused and chunked paths are not)."""
    return setup.train_student(
        f"kd-{divergence}",
        {"teacher": teacher_source, "divergence": divergence, **kd.result_key(get_divergence(divergence))},
        kd.loss(get_divergence(divergence), features=setup.features),
    )


def get_method_baseline(baseline: Baseline, ctx: Context, setup: BaselineSetup, teacher_tokenizer_key: str, collate):
    """A method-defined baseline (Method.baselines), trained on the same budget and cached."""
    built = baseline.make_loss(ctx)
    if built.extra_parameters or built.state or built.on_step_end or built.features:
        raise ConfigError(f"baseline {baseline.name}: cached baselines take a plain loss (no state or extra modules)")
    extra_key = {
        "teacher_tokenizer": teacher_tokenizer_key,
        "teacher": ctx.teacher_source,
        "baseline": baseline.name,
        "settings": baseline.key,
    }
    return setup.train_student(baseline.name, extra_key, built.loss_fn, features=ctx.features, collate=collate)


def resolved_teacher(model_cfg: ModelConfig, cache: Path) -> ModelConfig:
    """The settings with a registered teacher name or .gguf file replaced by its safetensors folder (converted
    once, cached); a folder or the embedded teacher pass unchanged."""
    if model_cfg.teacher:
        return replace(model_cfg, teacher=resolve_model_folder(model_cfg.teacher, cache))
    return model_cfg


def tokenizer_info(pair) -> dict[str, Any]:
    """What metrics.json records of a cross-tokenizer run's two tokenizers."""
    return {
        "teacher": {"key": pair.teacher_key, "size": len(pair.teacher)},
        "student": {"key": pair.student_key, "size": len(pair.student)},
    }


def llm_recipe(method: Method) -> Recipe:
    """The LLM recipe of a method, as a run-shell Recipe (flags, run folder, metrics.json and table: core.shell)."""
    cross = (CrossTokenizerConfig,) if method.cross_tokenizer else ()
    return Recipe(
        name=method.name,
        family="lm",
        configs=(DataConfig, ModelConfig, TrainConfig, EvalConfig, KDPathConfig, method.settings, *cross),
        body=lambda shell: _llm_body(method, shell),
        task=lambda shell: shell.cfg(DataConfig).task,
        label=lambda shell: method.run_name(shell.cfg(method.settings)),
        description=method.description,
        settle=lambda shell: settle_student_start(method, shell),
    )


LENGTH_GROUP = 50  # batches per length-sorted window on real text (Hugging Face's group_by_length megabatch)


def default_length_group(pretrained_teacher: bool) -> int:
    """The --length-group a run gets when it sets none: LENGTH_GROUP on real text (a pretrained teacher), 0 on the
    embedded tasks, whose lengths follow the sub-task (grouping there held one operation per batch)."""
    return LENGTH_GROUP if pretrained_teacher else 0


def settle_student_start(method: Method, shell: RunContext) -> None:
    """--student-start paper (the default) becomes the method's paper start (Method.student_start), in place; an
    unset --length-group becomes 50 with a pretrained teacher and 0 on the embedded tasks (TrainConfig's help)."""
    model_cfg = shell.cfg(ModelConfig)
    if model_cfg.student_start == "paper":
        model_cfg.student_start = method.paper_start(shell.cfg(method.settings))
    train_cfg = shell.cfg(TrainConfig)
    if train_cfg.length_group is None:
        train_cfg.length_group = default_length_group(model_cfg.teacher is not None)


def run_method(method: Method, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run the method and its baselines, write the run folder, print the table; return metrics.

    A bad input found after the run folder was created removes the folder again (when this call created it),
    so a failed start leaves nothing half-written behind (core.shell.run_recipe)."""
    return run_recipe(llm_recipe(method), argv)


def _llm_body(method: Method, shell: RunContext) -> Outcome | None:
    data, model_cfg, train_cfg = shell.cfg(DataConfig), shell.cfg(ModelConfig), shell.cfg(TrainConfig)
    evaluation, settings, run = shell.cfg(EvalConfig), shell.cfg(method.settings), shell.run
    cross = shell.cfg(CrossTokenizerConfig) if method.cross_tokenizer else None
    path_cfg = shell.cfg(KDPathConfig)
    if cross is not None and path_cfg.explicit:
        raise ConfigError(
            f"{shell.name}: --teacher-cache, --fused and --chunk-size are paths of one-vocabulary word-level KD; "
            "a cross-tokenizer method computes its own loss: drop them"
        )
    name, out, cache = shell.name, shell.out, shell.cache
    accelerator = shell.accelerator
    model_cfg = resolved_teacher(model_cfg, cache)
    task = load_task(data)
    check_batch_size(train_cfg.batch_size, len(task.train))  # before the teacher or any baseline trains
    if cross is not None:  # the student's tokenizer is `tokenizer`; the teacher trains and decodes with its own
        pair = get_tokenizer_pair(model_cfg, cross, data, task, cache)
        tokenizer, tokenizer_key = pair.student, pair.student_key
        teacher_tokenizer, teacher_tokenizer_key = pair.teacher, pair.teacher_key
        if method.kd_baselines and method.kd_baselines(settings):
            raise ConfigError(f"{name}: word-level KD baselines need one vocabulary; use cross-tokenizer baselines")
    else:
        tokenizer, tokenizer_key = get_tokenizer(model_cfg, data, task, cache)
        teacher_tokenizer, teacher_tokenizer_key = tokenizer, tokenizer_key
    task = chat_prompts(task, teacher_tokenizer, data.prompt_format)  # instruction prompts in the chat template
    teacher, teacher_info = get_teacher(
        model_cfg, data, task, teacher_tokenizer, teacher_tokenizer_key, cache, accelerator
    )
    setup = BaselineSetup(
        tokenizer, tokenizer_key, task, data, model_cfg, train_cfg, cache, accelerator, teacher_info["source"]
    )
    prune = parse_prune(model_cfg.student)
    if prune is not None:  # scored on the first training examples, encoded as the recipe encodes them
        rows = [f["input_ids"] for f in setup.features[:CALIBRATION_EXAMPLES]]
        setup.kept = selected_layers(teacher, teacher_info["source"], prune, model_cfg.prune_rule, rows, cache)
    student = setup.build_student()
    if prune is not None:
        print(
            f"[{name}] student {model_cfg.student} ({model_cfg.prune_rule}): layers {setup.kept} of the teacher, "
            f"{count_parameters(student) / 1e6:.1f}M parameters (teacher {count_parameters(teacher) / 1e6:.1f}M)",
            file=sys.stderr,
        )
    for role, model in (("teacher", teacher), ("student", student)):
        positions = position_limit(model)
        if positions is not None and positions < data.max_length:
            raise ConfigError(
                f"--max-length {data.max_length} exceeds the {role}'s {positions} positions; "
                f"pass --max-length {positions} or less"
            )
    if not method.cross_tokenizer:
        teacher = check_same_vocabulary(teacher, student, name, tokenizer)  # a padded head is cut to the ids
    # A pretrained teacher (--teacher) is read from its cache by forward KL unless --teacher-cache says otherwise:
    # built once per teacher and data, shared by every run and seed (docs/performance.md, "Which methods read it").
    kd = KDPath(
        path_cfg, teacher, cache, teacher_tokenizer_key, teacher_tokenizer.pad_token_id,
        pretrained_teacher=model_cfg.teacher is not None and not method.cross_tokenizer, student=student,
    )  # fmt: skip
    for divergence in method.kd_baselines(settings) if method.kd_baselines else []:
        if divergence != "fkl":  # refused before any training: a top-k teacher cache serves forward KL only
            kd.require_exact_cache(f"the KD baseline kd-{divergence}")
    healing = None
    if model_cfg.heal_steps:  # every later student (SFT, baselines, the method's) starts from the healed student
        healed_model, healed_result, setup.healed, healing = heal_student(
            setup, model_cfg, path_cfg, teacher, teacher_info["source"], teacher_tokenizer_key
        )
        healing["train"] = asdict(healed_result)
        student = healed_model
    sft_model, sft_result, sft_folder = get_sft_baseline(setup)
    if model_cfg.student_start == "sft":  # the on-policy papers' protocol: every student starts where SFT ended
        setup.start = sft_folder
        student = setup.build_student()
    baselines = {  # eval key (without "_student") -> (model, train result, cache folder)
        f"kd_{divergence}": get_kd_baseline(setup, divergence, kd, teacher_info["source"])
        for divergence in (method.kd_baselines(settings) if method.kd_baselines else [])
    }

    if cross is not None:
        features = encode_pairs(tokenizer, teacher_tokenizer, task.train, data.max_length)
        collate = PairCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    else:
        features = setup.features
        collate = Collator(tokenizer.pad_token_id)
    ctx = Context(
        accelerator, task, tokenizer, teacher, student, features, data, model_cfg, train_cfg, run, evaluation,
        cache, kd, teacher_source=teacher_info["source"], teacher_tokenizer=teacher_tokenizer, setup=setup,
    )  # fmt: skip
    built = method.make_loss(ctx, settings)  # first: it checks its inputs before any baseline trains
    if built is None and model_cfg.student_start == "sft":
        # SFT from the SFT student: its own steps continue SFT (the equal-budget control of the methods that start
        # there: they too have seen the SFT steps and then --steps of their own)
        built = MethodLoss(causal_lm_loss)
    for baseline in method.baselines(settings) if method.baselines else []:
        baselines[baseline.name] = get_method_baseline(baseline, ctx, setup, teacher_tokenizer_key, collate)
    if built is None:  # the method is SFT itself: the baseline is the student
        student, result = sft_model, sft_result
    else:
        trainer = Trainer(
            student,
            built.loss_fn,
            built.features or features,
            collate,
            train_cfg,
            out,
            accelerator,
            state=built.state,
            desc=name,
            on_step_end=built.on_step_end,
            extra_parameters=built.extra_parameters,
            extra_lr=built.extra_lr,
            count_fn=built.count_fn,
            prepare_batch=built.prepare_batch,
        )
        result = trainer.train()
        if not trainer.finished:
            print(
                f"[{name}] stopped at step {trainer.step} of {train_cfg.steps}; rerun the same command to resume",
                file=sys.stderr,
            )
            return None
        student = accelerator.unwrap_model(trainer.model)

    if not accelerator.is_main_process:
        return Outcome(task.name, {"student": {}}, {})  # the shell writes nothing on other processes
    cut: dict[str, dict] = {"teacher": {}, "sft_student": {}, "student": {}}  # prompts cut to fit, per model
    teacher_scores, teacher_pred = evaluate_cached(
        "teacher",
        teacher,
        teacher_tokenizer,
        task,
        data,
        evaluation,
        # scores are stored beside a teacher the cache owns (embedded, or converted from GGUF), never in a user's folder
        Path(teacher_info["source"])
        if Path(teacher_info["source"]).resolve().is_relative_to(cache.resolve())
        else None,
        cut["teacher"],
    )
    initial_scores = {}
    user_folder = Path(model_cfg.student).is_dir() and not Path(model_cfg.student).resolve().is_relative_to(
        cache.resolve()
    )
    if parse_prune(model_cfg.student) is not None or user_folder:
        # A pretrained student before any training (the un-distilled pruned model, a user's checkpoint): a reference
        # row, cached. Not for a folder of the cache itself (MiniLLM starts from the cached SFT student: that row).
        fresh = replace(setup, start=None, healed=None)  # the cut before healing
        cut["initial_student"] = {}
        initial_scores, _ = evaluate_cached(
            "initial", fresh.build_student().to(accelerator.device), tokenizer, task, data, evaluation,
            cache / "initial" / stable_hash(fresh.key()), cut["initial_student"],
        )  # fmt: skip
    healed_scores = {}
    if setup.healed is not None:  # the healed student before any method trains: a reference row, cached beside it
        cut["healed_student"] = {}
        healed_scores, _ = evaluate_cached(
            "healed", load_model(setup.healed).to(accelerator.device), tokenizer, task, data, evaluation,
            setup.healed, cut["healed_student"],
        )  # fmt: skip
    sft_scores, sft_pred = evaluate_cached(
        "sft", sft_model.to(accelerator.device), tokenizer, task, data, evaluation, sft_folder, cut["sft_student"]
    )
    if built is None:
        student_scores, student_pred = sft_scores, sft_pred
        cut["student"] = cut["sft_student"]
    else:
        student_scores, student_pred = evaluate_cached(
            name, student, tokenizer, task, data, evaluation, None, cut["student"]
        )
    baseline_scores, baseline_preds = {}, {}
    for baseline, (model, _, folder) in baselines.items():
        key = f"{baseline}_student"
        cut[key] = {}
        baseline_scores[key], baseline_preds[key] = evaluate_cached(
            baseline.replace("_", "-"), model.to(accelerator.device), tokenizer, task, data, evaluation, folder,
            cut[key],
        )  # fmt: skip

    with atomic_dir(out / "student") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        with_bos_on_plain_calls(tokenizer).save_pretrained(tmp)  # plain tokenizer(prompt) starts as training did
    samples = [
        {"prompt": ex.prompt, "references": list(ex.references), "teacher": t, "sft_student": s, "student": p}
        | {key: preds[i] for key, preds in baseline_preds.items()}
        for i, (ex, t, s, p) in enumerate(zip(task.eval, teacher_pred, sft_pred, student_pred))
    ]
    (out / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    return Outcome(
        task=task.name,
        eval={
            "student": student_scores,
            "teacher": teacher_scores,
            **({"initial_student": initial_scores} if initial_scores else {}),
            **({"healed_student": healed_scores} if healed_scores else {}),
            "sft_student": sft_scores,
            **baseline_scores,
        },
        train={
            **asdict(result),
            "baselines": {f"{b}_student": asdict(r) for b, (_, r, _) in baselines.items()},
            "student_params": count_parameters(student),
            "teacher_params": count_parameters(teacher),
            "kd_path": kd.summary(),
        },
        extra={
            "teacher": teacher_info,
            "data": task.report,  # rows dropped per split (empty prompt or completion), completions cut short
            "student_start": model_cfg.student_start,
            **(
                {
                    "pruned": {
                        "rule": model_cfg.prune_rule,
                        "kept_layers": setup.kept,
                        "calibration": f"the first {CALIBRATION_EXAMPLES} training examples, as the recipe encodes "
                        "them (chat prompt + response)",
                        "healing": healing,
                    }
                }
                if prune is not None
                else {}
            ),
            "evaluation": {
                "n": len(task.eval),
                "decoding": evaluation.eval_decoding,
                "seeds": sampling_seeds(evaluation),
                "prompts": cut,
            },
            **({"tokenizers": tokenizer_info(pair)} if cross is not None else {}),
        },
    )

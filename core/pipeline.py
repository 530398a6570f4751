"""One distillation run, composed from core: the path every LLM method's run.py takes.

    parse flags -> task -> tokenizer -> teacher (cached) -> SFT baseline (cached) -> the method's student
    -> evaluation of teacher, SFT student and student -> run folder -> printed table

A method supplies a `Method`: its name, its settings dataclass, and `make_loss(ctx, settings)` returning the
training loss (and any state to checkpoint). Everything else is shared, so methods are compared on equal terms.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers.utils import logging as hf_logging

from core.config import ModelConfig, RunConfig, cache_root, parse, to_dict
from core.crosstok import CrossTokenizerConfig, PairCollator, encode_pairs, get_tokenizer_pair
from core.data import Collator, DataConfig, encode_examples, load_task
from core.errors import ConfigError, DistillError, NonFiniteLossError
from core.io import atomic_dir, atomic_write_json, stable_hash
from core.losses import get_divergence
from core.method import Baseline, Context, Method
from core.metrics import evaluate_model
from core.models import build_or_load, count_parameters
from core.objectives import causal_lm_loss, make_kd_loss
from core.results import env_info, format_table, prepare_run_dir, read_metrics, write_metrics
from core.teacher import check_same_vocabulary, get_teacher, get_tokenizer, task_key, train_cached
from core.train import TrainConfig, Trainer


def make_accelerator(run: RunConfig) -> Accelerator:
    # transformers' own per-file progress bars would interleave with ours on every save and load.
    hf_logging.disable_progress_bar()
    return Accelerator(cpu=run.device == "cpu")


def evaluate_cached(
    name: str, model, tokenizer, task, data: DataConfig, run: RunConfig, folder: Path | None
) -> tuple[dict, list[str]]:
    """Evaluate; for cached models (teacher, SFT baseline) reuse the scores stored beside the model."""
    settings = {
        "format": 2,
        "eval_size": data.eval_size,
        "max_new_tokens": run.max_new_tokens,
        "task": task.name,
        "n": len(task.eval),
        "max_length": data.max_length,
    }
    path = folder / f"eval-{stable_hash(settings)}.json" if folder is not None else None
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        return stored["scores"], stored["predictions"]
    scores, predictions = evaluate_model(
        model, tokenizer, task, data.max_length, run.eval_batch_size, run.max_new_tokens
    )
    if path is not None:
        atomic_write_json(path, {"scores": scores, "predictions": predictions})
    print(f"[{name}] " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), file=sys.stderr)
    return scores, predictions


def _cached_student(
    kind: str,
    extra_key: dict[str, Any],
    loss_fn,
    tokenizer,
    tokenizer_key,
    task,
    data,
    model_cfg,
    train_cfg,
    cache,
    accelerator,
):
    """A baseline student trained once per configuration (same init, data order and budget as the run's student)."""
    key = {
        "task": task_key(data, task),
        "tokenizer": tokenizer_key,
        "student": model_cfg.student,
        "train": {k: v for k, v in asdict(train_cfg).items() if k not in ("stop_after",)},
        **extra_key,
    }
    return train_cached(
        f"{kind}-{Path(model_cfg.student).name}",
        key,
        lambda: build_or_load(model_cfg.student, tokenizer, seed=train_cfg.seed),
        encode_examples(tokenizer, task.train, data.max_length),
        tokenizer,
        train_cfg,
        cache,
        accelerator,
        loss_fn=loss_fn,
    )


def get_sft_baseline(
    ctx_args: dict[str, Any], tokenizer, tokenizer_key, task, data, model_cfg, train_cfg, cache, accelerator
):
    """The SFT student every method is compared against."""
    return _cached_student(
        "sft", {}, causal_lm_loss, tokenizer, tokenizer_key, task, data, model_cfg, train_cfg, cache, accelerator
    )


def get_kd_baseline(
    divergence: str,
    teacher,
    teacher_source: str,
    tokenizer,
    tokenizer_key,
    task,
    data,
    model_cfg,
    train_cfg,
    cache,
    accelerator,
):
    """A word-level KD student (kd_ratio 1) with the named divergence, trained once per configuration."""
    return _cached_student(
        f"kd-{divergence}",
        {"teacher": teacher_source, "divergence": divergence},
        make_kd_loss(teacher, get_divergence(divergence)),
        tokenizer,
        tokenizer_key,
        task,
        data,
        model_cfg,
        train_cfg,
        cache,
        accelerator,
    )


def get_extra_baseline(
    baseline: Baseline, ctx: Context, teacher_source: str, tokenizer_key: str, teacher_tokenizer_key: str, collate
):
    """A method-defined baseline (Method.baselines), trained on the same budget and cached."""
    key = {
        "task": task_key(ctx.data, ctx.task),
        "tokenizer": tokenizer_key,
        "teacher_tokenizer": teacher_tokenizer_key,
        "teacher": teacher_source,
        "student": ctx.model.student,
        "baseline": baseline.name,
        "settings": baseline.key,
        "train": {k: v for k, v in asdict(ctx.train).items() if k not in ("stop_after",)},
    }
    built = baseline.make_loss(ctx)
    if built.extra_parameters or built.state or built.on_step_end or built.features:
        raise ConfigError(f"baseline {baseline.name}: cached baselines take a plain loss (no state or extra modules)")
    return train_cached(
        f"{baseline.name}-{Path(ctx.model.student).name}",
        key,
        lambda: build_or_load(ctx.model.student, ctx.tokenizer, seed=ctx.train.seed),
        ctx.features,
        ctx.tokenizer,
        ctx.train,
        ctx.cache,
        ctx.accelerator,
        loss_fn=built.loss_fn,
        collate=collate,
    )


def tokenizer_info(pair) -> dict[str, Any]:
    """What metrics.json records of a cross-tokenizer run's two tokenizers."""
    return {
        "teacher": {"key": pair.teacher_key, "size": len(pair.teacher)},
        "student": {"key": pair.student_key, "size": len(pair.student)},
    }


def run_method(method: Method, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run the method and its baselines, write the run folder, print the table; return metrics.

    A bad input found after the run folder was created removes the folder again (when this call created it),
    so a failed start leaves nothing half-written behind."""
    cross_types = (CrossTokenizerConfig,) if method.cross_tokenizer else ()
    data, model_cfg, train_cfg, run, settings, *cross = parse(
        (DataConfig, ModelConfig, TrainConfig, RunConfig, method.settings, *cross_types), argv
    )
    out = _run_dir(method, settings, data, train_cfg, run)
    created = not out.exists()
    try:
        return _run_method(method, data, model_cfg, train_cfg, run, settings, *cross)
    except NonFiniteLossError:
        raise  # keeps its checkpoints: the message names the last good one
    except DistillError:
        if created and out.exists() and not (out / "checkpoints").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_dir(method: Method, settings: Any, data: DataConfig, train_cfg: TrainConfig, run: RunConfig) -> Path:
    name = method.label(settings) if method.label else method.name
    return Path(run.out or Path("runs") / name / data.task / f"seed{train_cfg.seed}")


def _run_method(method: Method, data, model_cfg, train_cfg, run, settings, cross=None) -> dict[str, Any]:
    name = method.label(settings) if method.label else method.name
    out = _run_dir(method, settings, data, train_cfg, run)
    config = to_dict(data, model_cfg, train_cfg, run, settings, *([cross] if cross is not None else []))
    config["method"] = {"name": name}
    done = read_metrics(out)
    if done is not None and done.get("config", {}).get("method") == config["method"] and not run.overwrite:
        prepare_run_dir(out, config, run.overwrite)  # refuses a different configuration
        print(f"[{name}] {out} is complete; showing its results (pass --overwrite to run again)", file=sys.stderr)
        _print_summary(done)
        return done
    accelerator = make_accelerator(run)
    if accelerator.is_main_process:
        prepare_run_dir(out, config, run.overwrite)
    accelerator.wait_for_everyone()
    set_seed(train_cfg.seed)
    cache = cache_root(run)
    t_start = time.perf_counter()

    task = load_task(data)
    if cross is not None:  # the student's tokenizer is `tokenizer`; the teacher trains and decodes with its own
        pair = get_tokenizer_pair(model_cfg, cross, data, task, cache)
        tokenizer, tokenizer_key = pair.student, pair.student_key
        teacher_tokenizer, teacher_tokenizer_key = pair.teacher, pair.teacher_key
        if method.kd_baselines and method.kd_baselines(settings):
            raise ConfigError(f"{name}: word-level KD baselines need one vocabulary; use cross-tokenizer baselines")
    else:
        tokenizer, tokenizer_key = get_tokenizer(model_cfg, data, task, cache)
        teacher_tokenizer, teacher_tokenizer_key = tokenizer, tokenizer_key
    teacher, teacher_info = get_teacher(
        model_cfg, data, task, teacher_tokenizer, teacher_tokenizer_key, cache, accelerator
    )
    student = build_or_load(model_cfg.student, tokenizer, seed=train_cfg.seed)
    if not method.cross_tokenizer:
        check_same_vocabulary(teacher, student, name)
    sft_model, sft_result, sft_folder = get_sft_baseline(
        {}, tokenizer, tokenizer_key, task, data, model_cfg, train_cfg, cache, accelerator
    )
    baselines = {  # eval key (without "_student") -> (model, train result, cache folder)
        f"kd_{divergence}": get_kd_baseline(
            divergence,
            teacher,
            teacher_info["source"],
            tokenizer,
            tokenizer_key,
            task,
            data,
            model_cfg,
            train_cfg,
            cache,
            accelerator,
        )
        for divergence in (method.kd_baselines(settings) if method.kd_baselines else [])
    }

    if cross is not None:
        features = encode_pairs(tokenizer, teacher_tokenizer, task.train, data.max_length)
        collate = PairCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    else:
        features = encode_examples(tokenizer, task.train, data.max_length)
        collate = Collator(tokenizer.pad_token_id)
    ctx = Context(
        accelerator, task, tokenizer, teacher, student, features, data, model_cfg, train_cfg, run, cache,
        teacher_source=teacher_info["source"], teacher_tokenizer=teacher_tokenizer,
    )  # fmt: skip
    built = method.make_loss(ctx, settings)  # first: it checks its inputs before any baseline trains
    for baseline in method.baselines(settings) if method.baselines else []:
        baselines[baseline.name] = get_extra_baseline(
            baseline, ctx, teacher_info["source"], tokenizer_key, teacher_tokenizer_key, collate
        )
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
            return {}
        student = accelerator.unwrap_model(trainer.model)

    if not accelerator.is_main_process:
        return {}
    device = str(accelerator.device)
    teacher_scores, teacher_pred = evaluate_cached(
        "teacher",
        teacher,
        teacher_tokenizer,
        task,
        data,
        run,
        Path(teacher_info["source"]) if not model_cfg.teacher else None,
    )
    sft_scores, sft_pred = evaluate_cached(
        "sft", sft_model.to(accelerator.device), tokenizer, task, data, run, sft_folder
    )
    if built is None:
        student_scores, student_pred = sft_scores, sft_pred
    else:
        student_scores, student_pred = evaluate_cached(name, student, tokenizer, task, data, run, None)
    baseline_scores, baseline_preds = {}, {}
    for baseline, (model, _, folder) in baselines.items():
        key = f"{baseline}_student"
        baseline_scores[key], baseline_preds[key] = evaluate_cached(
            baseline.replace("_", "-"), model.to(accelerator.device), tokenizer, task, data, run, folder
        )

    with atomic_dir(out / "student") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    samples = [
        {"prompt": ex.prompt, "references": list(ex.references), "teacher": t, "sft_student": s, "student": p}
        | {key: preds[i] for key, preds in baseline_preds.items()}
        for i, (ex, t, s, p) in enumerate(zip(task.eval, teacher_pred, sft_pred, student_pred))
    ]
    (out / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    metrics = {
        "method": name,
        "task": task.name,
        "run_dir": str(out),
        "seed": train_cfg.seed,
        "eval": {"student": student_scores, "teacher": teacher_scores, "sft_student": sft_scores, **baseline_scores},
        "train": {
            **asdict(result),
            "baselines": {f"{b}_student": asdict(r) for b, (_, r, _) in baselines.items()},
            "student_params": count_parameters(student),
            "teacher_params": count_parameters(teacher),
            "run_wall_s": time.perf_counter() - t_start,
        },
        "teacher": teacher_info,
        **({"tokenizers": tokenizer_info(pair)} if cross is not None else {}),
        "config": config,
        "env": env_info(device),
    }
    write_metrics(out, metrics)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _print_summary(metrics)
    print(f"run folder: {out}", file=sys.stderr)
    return metrics


def _print_summary(metrics: dict[str, Any]) -> None:
    evals = metrics["eval"]
    columns = [c for c in evals["student"] if "/" not in c]  # per-group scores stay in metrics.json
    rows = [("teacher", evals["teacher"]), ("sft student", evals["sft_student"])]
    rows += [
        (key.removesuffix("_student").replace("_", "-") + " student", v)
        for key, v in evals.items()
        if key.endswith("_student") and key != "sft_student"
    ]
    rows.append((f"{metrics['method']} student", evals["student"]))
    train = metrics["train"]
    print(
        f"\n{metrics['method']} on {metrics['task']} (seed {metrics['seed']}): {train['steps']} steps, "
        f"{train['tokens_per_s']:.0f} tokens/s, peak memory {train['peak_mem_mb']:.0f} MB"
    )
    print(format_table(rows, columns))


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """For run.py's `__main__`: typed errors become one clear line on stderr and exit status 2."""
    try:
        main(argv)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

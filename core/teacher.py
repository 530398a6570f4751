"""The teacher zoo: the task's tokenizer, and the embedded teacher trained on first use and cached on disk.

Cache layout (root: --cache-dir, $DISTILLAB_CACHE or ~/.cache/distillab):
    tokenizers/<key>/   BPE trained on the task text
    models/<kind>-<key>/ a trained model (save_pretrained + tokenizer + train_result.json)
    work/<kind>-<key>/   the training run in progress (checkpoints, so an interrupted teacher resumes)
The key is a hash of everything that determines the result (task, tokenizer, preset, training settings), so a
changed setting trains a new model and never reuses a stale one. Final folders appear by atomic rename.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.config import ModelConfig
from core.data import Collator, DataConfig, TaskData, encode_examples, examples_hash
from core.errors import ConfigError, ModelError, VocabularyMismatchError
from core.io import atomic_dir, atomic_write_json, stable_hash
from core.models import PRESETS, build_or_load, load_model, preset_config
from core.objectives import causal_lm_loss
from core.precision import precision_key
from core.tokenizers import load_tokenizer, same_vocabulary, train_bpe
from core.train import TrainConfig, Trainer, TrainResult

# Bump when what a cached folder holds changes, so old caches are retrained rather than misread.
CACHE_FORMAT = 3  # 3: a long completion no longer pushes its prompt out (core.data.encode_example)


def task_key(data: DataConfig, task: TaskData) -> dict[str, Any]:
    """What a model trained on the task depends on, and nothing else: the training examples (a content hash, so a
    moved file or another --eval-size changes nothing) and how they are cut (--max-length)."""
    return {"task": task.name, "train": examples_hash(task.train), "max_length": data.max_length}


def bpe_key(task: TaskData, vocab_size: int) -> str:
    """The cache key of a BPE trained on the task's training text (core.teacher.get_tokenizer, core.crosstok): that
    text and the vocabulary size, nothing else."""
    return stable_hash({"text": stable_hash([ex.prompt + ex.target for ex in task.train]), "vocab_size": vocab_size})


def get_tokenizer(
    cfg: ModelConfig, data: DataConfig, task: TaskData, cache: Path
) -> tuple[PreTrainedTokenizerBase, str]:
    """(tokenizer, key): an explicit folder, else the teacher folder's, else a BPE trained on the task and cached."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), f"path:{Path(cfg.tokenizer).resolve()}"
    if cfg.teacher:
        return load_tokenizer(cfg.teacher), f"path:{Path(cfg.teacher).resolve()}"
    key = bpe_key(task, cfg.vocab_size)
    folder = cache / "tokenizers" / key
    if not (folder / "tokenizer.json").exists():
        texts = [ex.prompt + ex.target for ex in task.train]
        tokenizer = train_bpe(texts, cfg.vocab_size)
        with atomic_dir(folder, keep_existing=True) as tmp:  # every process of a multi-process run gets here
            tokenizer.save_pretrained(tmp)
    return load_tokenizer(folder), key


def train_cached(
    kind: str,
    key: dict[str, Any],
    build: Callable[[], PreTrainedModel],
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    train_cfg: TrainConfig,
    cache: Path,
    accelerator: Accelerator,
    loss_fn=causal_lm_loss,
    collate=None,
) -> tuple[PreTrainedModel, TrainResult, Path]:
    """Load `kind` from the cache, or train it (resumably) with `loss_fn` and cache it atomically.

    `collate` batches `features` (default: core.data.Collator with the tokenizer's pad id)."""
    # --stop-after is for the run's own student: a cached model always trains to the end (a killed one resumes
    # from its work folder on the next call).
    train_cfg = replace(train_cfg, stop_after=None)
    name = f"{kind}-{stable_hash({'cache_format': CACHE_FORMAT, **key})}"
    final, work = cache / "models" / name, cache / "work" / name
    if not (final / "train_result.json").exists():
        # One builder per entry: a second run that wants it waits here, then loads it (only the main process of a
        # multi-process run locks; its other processes train with it).
        lock = _entry_lock(final) if accelerator.is_main_process else contextlib.nullcontext()
        with lock:
            _train_entry(kind, key, build, features, tokenizer, train_cfg, accelerator, loss_fn, collate, final, work)
    model = load_model(final)
    result = TrainResult(**json.loads((final / "train_result.json").read_text()))
    return model, result, final


def _entry_lock(final: Path):
    from filelock import FileLock

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the cache folder {final.parent} ({exc.strerror}); pass a writable --cache-dir"
        ) from exc
    return FileLock(str(final) + ".lock")


def _train_entry(kind, key, build, features, tokenizer, train_cfg, accelerator, loss_fn, collate, final, work):
    if accelerator.num_processes == 1 and (final / "train_result.json").exists():
        return  # another run built it while this one waited for the lock
    accelerator.print(f"[{kind}] not cached: training it now ({train_cfg.steps} steps), cache {final}")
    model = build()
    collate = collate or Collator(tokenizer.pad_token_id)
    trainer = Trainer(model, loss_fn, features, collate, train_cfg, work, accelerator, desc=kind)
    result = trainer.train()
    if not trainer.finished:  # --stop-after: leave the work folder for the next invocation
        raise SystemExit(f"[{kind}] stopped at step {trainer.step}; rerun to resume")
    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            accelerator.unwrap_model(trainer.model).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.copy(work / "log.jsonl", tmp / "log.jsonl")
            atomic_write_json(tmp / "cache_key.json", key)
            atomic_write_json(tmp / "train_result.json", asdict(result))
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()


def get_teacher(
    cfg: ModelConfig,
    data: DataConfig,
    task: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_key: str,
    cache: Path,
    accelerator: Accelerator,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """(teacher, info): a given folder, or the embedded preset trained on the task (cached). Frozen, eval mode."""
    if cfg.teacher:
        teacher = load_model(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        info: dict[str, Any] = {"source": str(cfg.teacher)}
    else:
        if cfg.teacher_preset not in PRESETS:
            raise ModelError(f"unknown --teacher-preset {cfg.teacher_preset!r}; choose one of {', '.join(PRESETS)}")
        train_cfg = TrainConfig(
            steps=cfg.teacher_steps,
            batch_size=cfg.teacher_batch_size,
            lr=cfg.teacher_lr,
            warmup_steps=50,
            seed=0,
            checkpoint_every=250,
        )
        key = {
            "task": task_key(data, task),
            "tokenizer": tokenizer_key,
            "model": preset_config(cfg.teacher_preset, tokenizer, 512).to_dict(),
            "train": asdict(train_cfg),
            **precision_key(),  # empty under fp32 (keys written before --precision hold); bf16: another teacher
        }
        features = encode_examples(tokenizer, task.train, data.max_length)
        teacher, result, folder = train_cached(
            f"teacher-{cfg.teacher_preset}",
            key,
            lambda: build_or_load(cfg.teacher_preset, tokenizer, seed=0),
            features,
            tokenizer,
            train_cfg,
            cache,
            accelerator,
        )
        info = {"source": str(folder), "preset": cfg.teacher_preset, "train": asdict(result)}
    return prepare_teacher(teacher, accelerator), info


def prepare_teacher(teacher: PreTrainedModel, accelerator: Accelerator) -> PreTrainedModel:
    """Frozen teacher placement: eval mode, no gradients; under FSDP it is sharded like the student (Accelerate's
    evaluation-mode preparation, no optimizer), elsewhere it is placed whole on each process's device. Under
    DeepSpeed the teacher stays replicated (Accelerate prepares one DeepSpeed engine per run: the student's)."""
    from accelerate.utils import DistributedType

    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    return teacher.to(accelerator.device)


def check_same_vocabulary(
    teacher: PreTrainedModel, student: PreTrainedModel, method: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """Same-vocabulary methods compare distributions id by id over the tokenizer's ids. Returns the teacher to use.

    Checkpoints often pad their output head beyond the tokenizer (gpt2's 50,257 tokens in 50,304 rows: Pythia, Phi-2,
    Qwen): the padded rows are never a real token. Such a teacher is accepted when both heads cover every id of
    `tokenizer` and the teacher folder's own tokenizer (if it carries one) is `tokenizer`; its head is then cut to
    the student's width, so every KD path (dense, chunked, fused, the teacher cache, a method's own teacher forward,
    teacher sampling) sees the teacher's distribution renormalised over the real ids:
    softmax(z[:V])_i = p_i / sum_{j<V} p_j. Cutting it once here, rather than slicing the logits at each of those
    places, keeps them all equal; padding the student instead would teach it to put mass on ids no token has.
    Refused (one line, pointing to the cross-tokenizer method) when the vocabularies really differ."""
    tv, sv = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    hint = (
        "Use a student built with the teacher's tokenizer, or a cross-tokenizer method "
        "(methods/dskd: dual-space KD with cross-model attention)."
    )
    if tokenizer is not None:
        n = len(tokenizer)
        for role, rows in (("teacher", tv), ("student", sv)):
            if rows < n:
                raise VocabularyMismatchError(
                    f"{method} needs teacher and student to share a vocabulary, but the {role} has {rows} output rows "
                    f"for the tokenizer's {n} tokens. {hint}"
                )
        for role, model in (("teacher", teacher), ("student", student)):
            own = _folder_tokenizer(model)
            if own is not None and not same_vocabulary(own, tokenizer):
                raise VocabularyMismatchError(
                    f"{method} needs teacher and student to share a vocabulary, but the {role} folder "
                    f"{model.name_or_path} carries a tokenizer of other ids ({len(own)} tokens) than the run's "
                    f"({n} tokens). Pass --tokenizer {model.name_or_path} (or omit --tokenizer), or use a "
                    "cross-tokenizer method (methods/dskd)."
                )
    if tv == sv:
        return teacher
    if tokenizer is None or tv < sv:  # a wider student: another vocabulary, or a head padded beyond the teacher's
        raise VocabularyMismatchError(
            f"{method} needs teacher and student to share a vocabulary, but the teacher has {tv} output rows and the "
            f"student {sv}. {hint}"
        )
    if type(teacher).__name__ == "FullyShardedDataParallel":
        raise ModelError(
            f"the teacher's head has {tv} rows for {len(tokenizer)} tokens (padded); under FSDP it cannot be cut "
            f"after sharding: save the teacher with model.resize_token_embeddings({sv}) and pass that folder"
        )
    # Rows >= len(tokenizer) are padding (checked above): cut them. Input ids never reach them, so cutting the input
    # table too (resize_token_embeddings does both, tied or not) changes nothing the teacher computes on real ids.
    teacher.resize_token_embeddings(sv)
    return teacher.requires_grad_(False)  # the new head is a fresh Parameter


def _folder_tokenizer(teacher: PreTrainedModel) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a teacher loaded from a folder, if it carries one."""
    from core.tokenizers import TOKENIZER_FILES

    name = str(getattr(teacher, "name_or_path", "") or "")
    folder = Path(name)
    if not name or not folder.is_dir() or not any((folder / file).exists() for file in TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)

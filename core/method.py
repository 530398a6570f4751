"""The contract between an LLM method package and the LLM recipe (core.pipeline).

A method package declares one `Method` in its run.py. The recipe builds a `Context` (task, tokenizer, teacher,
student, encoded training data, settings) and calls `Method.make_loss(ctx, settings)`, which returns a
`MethodLoss`: the training loss and whatever the training loop must carry for it. Everything else (the teacher,
the SFT and KD baselines, evaluation, the run folder) is the recipe's, so methods are compared on equal terms.

Non-LLM families (speech, unlearning, privacy, vision, analysis) do not use this contract: they write their own
recipe on the run shell (core.shell) and the neutral training loop (core.train).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.config import EvalConfig, ModelConfig, RunConfig
from core.data import DataConfig, TaskData
from core.kdpath import KDPath
from core.shell import module_doc
from core.train import LossFn, PrepareBatch, Stateful, TrainConfig, count_label_tokens


@dataclass
class Context:
    """What a method's make_loss may use."""

    accelerator: Accelerator
    task: TaskData
    tokenizer: PreTrainedTokenizerBase  # the student's tokenizer
    teacher: PreTrainedModel
    student: PreTrainedModel
    features: list[dict[str, list[int]]]  # the encoded training examples the student trains on by default
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    run: RunConfig
    eval: EvalConfig
    cache: Path  # the cache root (teachers, tokenizers, baselines, teacher outputs)
    kd: KDPath  # the run's word-level KD path (--teacher-cache, --fused, --chunk-size): build KD losses with kd.loss
    teacher_source: str  # where the teacher came from (a folder or the embedded teacher's cache entry)
    # the teacher's own tokenizer: `tokenizer` itself, except for cross-tokenizer methods (core.crosstok)
    teacher_tokenizer: PreTrainedTokenizerBase
    # the run's core.pipeline.BaselineSetup (typed Any: core.pipeline imports this module), with its cut's kept layers
    # and healed start: what a method that loads a cached baseline itself passes to core.pipeline.get_sft_baseline
    setup: Any


@dataclass
class MethodLoss:
    """A method's training objective and what the loop carries for it (core.train.Trainer's arguments)."""

    loss_fn: LossFn
    state: dict[str, Stateful] = field(default_factory=dict)  # checkpointed beside the model
    features: list[dict[str, list[int]]] | None = None  # a method may train on other data (SeqKD)
    # called after every optimizer step with (step, step_loss, logs): schedules that read the loss (TAID)
    on_step_end: Callable[[int, float, dict[str, float]], None] | None = None
    # the method's own trainable modules beside the student (DSKD's projectors), at their own learning rate;
    # put the module in `state` too, so that checkpoints carry it
    extra_parameters: list[torch.nn.Parameter] = field(default_factory=list)
    extra_lr: float | None = None
    # on-policy methods: replaces each micro-batch (e.g. by the student's samples) before the loop counts its tokens
    prepare_batch: PrepareBatch | None = None
    # the loss's unit count of a batch, its normalizer (default: valid target tokens; a per-sequence loss: rows)
    count_fn: Callable[[dict[str, Any]], int] = count_label_tokens


@dataclass
class Baseline:
    """A student trained on the method's budget with another objective built from the same context (for
    example the cross-tokenizer baselines ULD and MinED), cached and reported as eval[f"{name}_student"]."""

    name: str
    key: dict[str, Any]  # every setting that determines it (part of its cache key)
    make_loss: Callable[[Context], MethodLoss]


@dataclass
class Method:
    """One LLM method: what core.pipeline.run_method needs to train, compare and report it."""

    name: str  # the method name in metrics.json and the benchmark, e.g. "taid"
    settings: type  # dataclass of the method's own flags
    make_loss: Callable[[Context, Any], MethodLoss | None]  # returning None: the student IS the SFT baseline
    label: Callable[[Any], str] | None = None  # method name from its settings (e.g. vanilla's --loss)
    # word-level KD students (core divergence names, e.g. ["fkl", "rkl"]) trained on the same budget and reported
    # beside the method's student; cached, so every method compares against the very same baselines
    kd_baselines: Callable[[Any], list[str]] | None = None
    # the method's own comparison students (e.g. DSKD's ULD and MinED), cached the same way
    baselines: Callable[[Any], list[Baseline]] | None = None
    # teacher and student each with their own tokenizer (flags of core.crosstok.CrossTokenizerConfig); batches
    # carry both tokenizations (core.crosstok.PairCollator). A method without it needs one shared vocabulary.
    cross_tokenizer: bool = False
    description: str = ""  # for --help; default: the docstring of the run script (the module of make_loss)
    # where its paper starts the student, used when --student-start is not given (its default, "paper"): "init"
    # (the --student preset or folder) or "sft" (the cached SFT student of the same budget); a function of the
    # settings where it depends on them (vanilla: reverse-KL KD starts from SFT, forward KL from scratch)
    student_start: str | Callable[[Any], str] = "init"

    def __post_init__(self) -> None:
        if not self.description:
            self.description = module_doc(self.make_loss)

    def paper_start(self, settings: Any) -> str:
        """The student start of this method's paper for these settings: "init" or "sft"."""
        start = self.student_start(settings) if callable(self.student_start) else self.student_start
        if start not in ("init", "sft"):
            raise ValueError(f"Method {self.name}: student_start must give init or sft, got {start!r}")
        return start

    def run_name(self, settings: Any) -> str:
        return self.label(settings) if self.label else self.name

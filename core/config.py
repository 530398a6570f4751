"""Typed settings and the one command-line convention of every run script.

Settings are dataclasses with a help text per field and a `__post_init__` range check. `parse` builds the
command line from them with transformers' HfArgumentParser, so `kd_ratio` is both `--kd-ratio` and
`--kd_ratio`, and `--help` lists every flag with its default.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from core.errors import ConfigError
from core.models import PRESETS

# --student-start: "paper" stands for the method's own default (Method.student_start), replaced when parsed
START_CHOICES = ("init", "sft", "paper")


@dataclass
class ModelConfig:
    """Teacher, student and tokenizer."""

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "a local Hugging Face causal-LM folder, a local .gguf file, or a registered real model "
            "(smollm2-135m-instruct: see core/pretrained.py); default: the embedded teacher, trained on first use "
            "and cached"
        },
    )
    teacher_preset: str = field(
        default="teacher", metadata={"help": "preset of the embedded teacher (see core/models.py)"}
    )
    # 400 keeps the fresh-clone demo under 3 minutes on 2 cores (issue 13): a 72% exact-match teacher against
    # students near 43%; 500 steps reach 77%, and 1000 (the default before) is the strong teacher (README.md).
    teacher_steps: int = field(default=400, metadata={"help": "training steps of the embedded teacher"})
    teacher_lr: float = field(default=1e-3, metadata={"help": "learning rate of the embedded teacher"})
    teacher_batch_size: int = field(default=64, metadata={"help": "batch size of the embedded teacher"})
    student: str = field(
        default="student",
        metadata={
            "help": "student preset name, a local model folder to start from, or prune:K (K decoder layers of the "
            "teacher, chosen by --prune-rule, with its embeddings, final norm and head)"
        },
    )
    # The best measured rule (benchmarks/prune_rules.md): SmolLM2-135M at 24 of 30 layers, held-out Dolly perplexity
    # 32.1 against 221 for evenly spaced layers; 20 layers 113 against 50,322 (teacher 15.7).
    prune_rule: str = field(
        default="block-influence",
        metadata={
            "help": "prune:K: which K layers (core/healing.py): even (evenly spaced, first and last), block-influence "
            "(ShortGPT: drop the blocks that change their input least) or greedy-ppl (drop, one at a time, the block "
            "whose removal raises the perplexity least), scored on the run's first 16 training examples"
        },
    )
    heal_steps: int = field(
        default=0,
        metadata={
            "help": "prune:K: heal the cut student first, this many steps of forward-KL distillation from the teacher "
            "through the teacher-logit cache on generic text (cached; every method starts from it; 0: no healing)"
        },
    )
    heal_data: str | None = field(
        default=None,
        metadata={
            "help": "healing text: a data root holding multi30k/train.en and commongen/commongen.train.tgt.txt; "
            "default: the run's training prompts and responses"
        },
    )
    heal_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of the healing (AdamW, cosine)"})
    heal_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "texts per healing step (benchmarks/healing_curve.md healed with 16); default: the run's "
            "--batch-size"
        },
    )
    sft_lr: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate of the SFT baseline, which is also the --student-start sft start; default: "
            "--lr (the student's own steps after the SFT start always use --lr)"
        },
    )
    student_start: str = field(
        default="paper",
        metadata={
            "help": "init: the student (and every baseline) starts from --student; sft: from the cached SFT student "
            "of the same settings, trained first (the on-policy papers' protocol: MiniLLM, DistiLLM, GKD, DPKD, "
            "reverse-KL KD); paper: the start of the method's paper (core.method.Method.student_start), resolved "
            "when the flags are parsed, so config.json and metrics.json record init or sft"
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder; default: the teacher's, or a BPE trained on the task"}
    )
    vocab_size: int = field(
        default=512, metadata={"help": "vocabulary of the BPE trained on the task when no tokenizer is given"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "allow model folders to run their own code (off: only load what transformers ships)"},
    )

    def __post_init__(self) -> None:
        require(self, "at least 1", lambda v: v >= 1, "teacher_steps", "teacher_batch_size")
        from core.pretrained import is_real_model_spec, locate_gguf, parse_prune

        if is_real_model_spec(self.teacher):
            locate_gguf(self.teacher)  # a missing package or file is named now, with the command that fixes it
        elif self.teacher is not None and not (Path(self.teacher) / "config.json").is_file():
            what = "does not exist" if not Path(self.teacher).exists() else "is not a model folder (no config.json)"
            raise ConfigError(
                f"--teacher {self.teacher} {what}; pass a folder written by save_pretrained, or omit --teacher"
            )
        if parse_prune(self.student) is None and self.student not in PRESETS and not Path(self.student).exists():
            raise ConfigError(
                f"--student {self.student!r} is neither a preset ({', '.join(PRESETS)}), prune:K, nor an existing folder"
            )
        from core.pretrained import PRUNE_RULES

        if self.prune_rule not in PRUNE_RULES:
            raise ConfigError(f"--prune-rule must be one of {', '.join(PRUNE_RULES)}, got {self.prune_rule!r}")
        if self.heal_steps < 0:
            raise ConfigError(f"--heal-steps must be 0 (no healing) or more, got {self.heal_steps}")
        if self.heal_steps and parse_prune(self.student) is None:
            raise ConfigError(
                f"--heal-steps {self.heal_steps} heals a cut student: pass --student prune:K or drop --heal-steps"
            )
        if self.heal_data is not None:
            if not self.heal_steps:
                raise ConfigError("--heal-data is the healing text: pass --heal-steps N (N > 0) or drop --heal-data")
            check_heal_data(self.heal_data)
        if not self.heal_lr > 0:
            raise ConfigError(f"--heal-lr must be positive, got {self.heal_lr}")
        if self.heal_batch_size is not None:
            if self.heal_batch_size < 1:
                raise ConfigError(f"--heal-batch-size must be at least 1, got {self.heal_batch_size}")
            if not self.heal_steps:
                raise ConfigError(
                    f"--heal-batch-size {self.heal_batch_size} sizes the healing: pass --heal-steps N (N > 0) or drop "
                    "--heal-batch-size"
                )
        if self.sft_lr is not None and not (self.sft_lr > 0 and math.isfinite(self.sft_lr)):
            raise ConfigError(f"--sft-lr must be a positive number (or omitted: --lr), got {self.sft_lr}")
        if self.student_start not in START_CHOICES:
            raise ConfigError(f"--student-start must be init, sft or paper, got {self.student_start!r}")
        if self.teacher_preset not in PRESETS:
            raise ConfigError(
                f"--teacher-preset {self.teacher_preset!r} is unknown; choose one of {', '.join(PRESETS)}"
            )
        if self.vocab_size < 300:
            raise ConfigError(
                f"--vocab-size must be at least 300 (256 byte symbols + specials + merges), got {self.vocab_size}"
            )
        if not self.teacher_lr > 0:
            raise ConfigError(f"--teacher-lr must be positive, got {self.teacher_lr}")


@dataclass
class RunConfig:
    """The run shell's own flags (core.shell), common to every family: where results go, on which device."""

    out: str | None = field(default=None, metadata={"help": "run folder; default runs/<method>/<task>/seed<seed>"})
    device: str = field(default="auto", metadata={"help": "auto (Accelerate's choice), cpu, cuda or mps"})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "cache of teachers, tokenizers and baselines; default $DISTILLAB_CACHE or ~/.cache/distillab"
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace an existing run folder that holds another configuration"}
    )
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32, or bf16: the student's and teacher's forward passes under bfloat16 autocast, losses, "
            "weights and optimizer in float32 (core/precision.py)"
        },
    )

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(f"--device must be auto, cpu, cuda or mps, got {self.device!r}")
        from core.precision import check_precision

        check_precision(self.precision)


@dataclass
class EvalConfig:
    """How the LLM recipe evaluates by generation."""

    eval_batch_size: int = field(default=100, metadata={"help": "prompts per generation batch at evaluation"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "generation length at evaluation; default: the task's"}
    )
    eval_decoding: str = field(
        default="greedy",
        metadata={
            "help": "greedy, or sample: temperature 1, top-k 0, top-p 1, one pass per --eval-seeds seed, scores "
            "averaged (the MiniLLM / DistiLLM / DSKD evaluation scripts' decoding)"
        },
    )
    eval_seeds: str = field(
        default="10,20,30,40,50",
        metadata={"help": "--eval-decoding sample: the sampling seeds (the papers' scripts use 10,20,30,40,50)"},
    )

    def __post_init__(self) -> None:
        if self.eval_decoding not in ("greedy", "sample"):
            raise ConfigError(f"--eval-decoding must be greedy or sample, got {self.eval_decoding!r}")
        try:
            seeds = [int(s) for s in self.eval_seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--eval-seeds must be comma-separated integers, got {self.eval_seeds!r}") from None
        if not seeds:
            raise ConfigError("--eval-seeds needs at least one seed (e.g. 10,20,30,40,50)")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


def sampling_seeds(evaluation: EvalConfig) -> list[int] | None:
    """The seeds of sampled evaluation, or None for greedy decoding."""
    if evaluation.eval_decoding == "greedy":
        return None
    return [int(s) for s in evaluation.eval_seeds.split(",") if s.strip()]


def cache_root(run: RunConfig) -> Path:
    return Path(run.cache_dir or os.environ.get("DISTILLAB_CACHE") or Path.home() / ".cache" / "distillab")


def parse(
    types: tuple[type, ...], argv: list[str] | None, prog: str | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Parse `argv` into one instance of each dataclass in `types`; unknown flags raise ConfigError.

    `--help` lists the flags grouped by dataclass, each group under its docstring."""
    for cls in types:  # HfArgumentParser puts a dataclass's flags in a group of this name
        if "_argument_group_name" not in cls.__dict__:
            doc = (cls.__doc__ or "").strip()
            generated = doc.startswith(f"{cls.__name__}(")  # dataclass's own stand-in for a missing docstring
            first = doc.splitlines()[0] if doc and not generated else ""
            cls._argument_group_name = f"{first.rstrip('.:')} ({cls.__name__})" if first else cls.__name__
    parser = HfArgumentParser(types, prog=prog, description=description, formatter_class=_HelpFormatter)
    for action in parser._actions:
        # A `bool | None` setting (None: decided by the run, e.g. --teacher-cache) takes a bare flag as true, as a
        # plain bool does (HfArgumentParser gives it nargs "?" only when its default is not None).
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True

    def refuse(message: str):  # argparse's own errors (a value of the wrong type): one line, not the usage block
        raise ConfigError(f"{message}; run with --help for the flags this script takes")

    parser.error = refuse
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as exc:  # a __post_init__ that raised ValueError, or a type HfArgumentParser rejected
        raise ConfigError(str(exc)) from exc
    *instances, remaining = parsed
    if remaining:
        raise ConfigError(f"unknown argument(s) {' '.join(remaining)}; run with --help for the flags this script takes")
    for instance in instances:
        check_numbers(instance)
    return tuple(instances)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description (a run script's docstring) keeps its lines and indented commands; each flag shows its
    default (HfArgumentParser's own choice)."""


def check_numbers(settings: Any) -> None:
    """The ranges every settings dataclass shares, checked once here rather than in each __post_init__: no setting
    of this project means anything at nan or infinity (argparse's float() accepts both), and a seed is
    non-negative (core.onpolicy.derived_seed and numpy refuse negative seeds, mid-run)."""
    for f in fields(settings):
        value, flag = getattr(settings, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        is_seed = f.name == "seed" or f.name.endswith("_seed")
        if is_seed and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{flag} must be a non-negative integer (a seed), got {value}")


def require(settings: Any, rule: str, ok: Any, *names: str) -> None:
    """Check each named field of `settings` on its own: the first whose value fails `ok(value)` is refused in one
    line that names that flag and its value ("--eta must be in (0, 1], got nan"), never several flags at once."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, float) and not math.isfinite(value):  # as check_numbers says it, whichever runs first
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not ok(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def to_dict(*configs: Any) -> dict[str, Any]:
    """All settings, grouped by dataclass name (for config.json and metrics.json)."""
    return {type(c).__name__: asdict(c) for c in configs if is_dataclass(c)}


def comma_list(text: str, flag: str) -> list[str]:
    """The items of a comma-separated flag value, stripped. "" (or only spaces) is the empty list; an empty item
    ("fkl,,rkl", ",,", "fkl,") is refused: it is a typo, not a request for nothing."""
    if not text.strip():
        return []
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigError(
            f"{flag} {text!r} has an empty item; separate names by single commas (or pass {flag} '' for none)"
        )
    return items


def divergence_list(text: str, flag: str = "--compare") -> list[str]:
    """A comma-separated list of core divergence names (the --compare convention of every method), checked."""
    from core.losses import DIVERGENCES

    names = comma_list(text, flag)
    unknown = [d for d in names if d not in DIVERGENCES]
    if unknown:
        raise ConfigError(f"{flag} names unknown divergences {unknown}; choose from {', '.join(DIVERGENCES)}")
    return names


HEAL_FILES = ("multi30k/train.en", "commongen/commongen.train.tgt.txt")  # under --heal-data


def check_heal_data(folder: str) -> None:
    """ConfigError (one line) when --heal-data lacks a file it must hold."""
    missing = [name for name in HEAL_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise ConfigError(
            f"--heal-data {folder} has no {', '.join(missing)}; pass the data root that holds "
            f"{' and '.join(HEAL_FILES)} (e.g. shared/data), or drop --heal-data to heal on the run's training text"
        )

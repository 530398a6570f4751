"""Mixed precision: the process's compute precision and the autocast context that applies it.

    --precision fp32   (default) every matmul in float32, as before the flag existed
    --precision bf16   the student's and the teacher's forward passes under torch.autocast(bfloat16) (CUDA, and CPU
                       where torch supports it); parameters, optimizer state and gradients stay float32, and every
                       loss is computed in float32 (core.losses and core.fused upcast the logits before log-softmax)

The run shell sets the process's precision from --precision (core.shell.make_accelerator); the training loop
(core.train.Trainer, around each micro-batch's loss: the student's and the teacher's forward of a KD loss alike)
and generation (core.generate.sample_completions) enter `autocast(device)`. The teacher-logit cache is always built
in float32 (core.logit_cache), so one cache serves runs of either precision. bf16 has 8 significant bits (unit
roundoff 2^-8 = 0.39%): tests/core/test_device.py states the tolerances it allows against float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from core.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
_current = "fp32"


def check_precision(precision: str, flag: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} must be fp32 or bf16, got {precision!r}")
    return precision


def set_precision(precision: str) -> None:
    """The process's compute precision (what `autocast` applies when given none)."""
    global _current
    _current = check_precision(precision)


def get_precision() -> str:
    return _current


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[None]:
    """The process's precision set to `precision` inside the block (tests, benchmarks/gpu_check.py)."""
    previous = _current
    set_precision(precision)
    try:
        yield
    finally:
        set_precision(previous)


def autocast(device: torch.device | str, precision: str | None = None) -> Any:
    """torch.autocast to bfloat16 on `device` under bf16; a no-op context under fp32."""
    precision = check_precision(precision or _current)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def precision_key(precision: str | None = None) -> dict[str, str]:
    """The cache-key entry of a trained model: empty under fp32 (so every key written before the flag still holds),
    {"precision": "bf16"} otherwise (a bf16-trained baseline is another model)."""
    precision = precision or _current
    return {} if precision == "fp32" else {"precision": precision}

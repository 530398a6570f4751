"""The run folder and the metrics.json schema shared by every method.

<out>/config.json    every setting of the run (written first; a rerun with other settings is refused)
<out>/log.jsonl      one line per training step (core.train)
<out>/checkpoints/   atomic checkpoints for resume (removed when the run completes)
<out>/student/       the trained student and its tokenizer, save_pretrained (safetensors)
<out>/samples.jsonl  evaluation prompts, references and every model's output
<out>/metrics.json   {"method", "task", "seed", "eval": {...}, "train": {...}, "config": {...}, "env": {...}}
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from core.errors import OutputDirError
from core.io import atomic_write_json

# Settings that do not change what a run computes: they may differ between an interrupted run and its resume.
VOLATILE = {"stop_after", "overwrite", "device", "eval_batch_size", "out", "cache_dir"}

METRICS_KEYS = ("method", "task", "seed", "eval", "train", "config", "env")


def stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """What of a configuration determines a run's result (VOLATILE settings may differ between run and resume)."""
    return {group: {k: v for k, v in values.items() if k not in VOLATILE} for group, values in config.items()}


def prepare_run_dir(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Create `out` for this configuration, or accept it for resume when it holds the same configuration."""
    existing = out / "config.json"
    if existing.exists():
        try:
            previous = json.loads(existing.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous is not None and stable_config(previous) == stable_config(config):
            return
        if not overwrite:
            raise OutputDirError(
                f"{out} holds a run with a different configuration ({existing}); choose another --out, "
                "or pass --overwrite to replace it"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to the output folder {out} ({exc.strerror}); choose a writable --out"
        ) from exc
    atomic_write_json(existing, config)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: str) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": device,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "git": git_revision(),
    }


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics.json is missing {missing}")
    atomic_write_json(out / "metrics.json", metrics)


def read_metrics(out: Path) -> dict[str, Any] | None:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def format_table(rows: list[tuple[str, dict[str, float]]], columns: list[str]) -> str:
    """A plain text table: one row per model, one column per metric."""
    head = ["model", *columns]
    body = [[name, *(f"{values[c]:.2f}" if c in values else "-" for c in columns)] for name, values in rows]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])

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
import sys
from pathlib import Path
from typing import Any

from core.errors import OutputDirError
from core.io import atomic_write_json

# Settings that do not change what a run computes: they may differ between an interrupted run and its resume.
VOLATILE = {"stop_after", "overwrite", "device", "eval_batch_size", "out", "cache_dir"}
# Settings added after run folders existed, at the value those folders ran with: a config without the key and one
# with this value are the same run (so --precision fp32 matches every folder written before the flag).
DEFAULTED = {"precision": "fp32"}

METRICS_KEYS = ("method", "task", "seed", "eval", "train", "config", "env")


def stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """What of a configuration determines a run's result (VOLATILE settings may differ between run and resume)."""
    return {
        group: {k: v for k, v in values.items() if k not in VOLATILE and not (k in DEFAULTED and DEFAULTED[k] == v)}
        for group, values in config.items()
    }


def has_progress(out: Path) -> bool:
    """Whether a run folder holds anything a rerun would lose: a completed step (a checkpoint, a log line of the
    run or of a baseline trained inside the folder) or a result."""
    if (out / "metrics.json").exists() or any(out.glob("**/checkpoints/step_*")):
        return True
    return any(log.stat().st_size > 0 for log in out.glob("**/log.jsonl"))


def prepare_run_dir(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Create `out` for this configuration, or accept it for resume when it holds the same configuration.

    A folder in which no step completed (a run that failed at its start, or was stopped before its first step)
    is taken over by a corrected command; one with progress is refused unless --overwrite."""
    existing = out / "config.json"
    if existing.exists():
        try:
            previous = json.loads(existing.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None  # a truncated or foreign file: it matches nothing
        if previous is not None and stable_config(previous) == stable_config(config):
            return
        if has_progress(out) and not overwrite:
            what = "a different configuration" if previous is not None else "an unreadable config.json"
            raise OutputDirError(
                f"{out} holds a run with {what} ({existing}); choose another --out, or pass --overwrite to replace it"
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
    """A complete run's metrics.json; None if absent or unreadable (then the run is not complete: it reruns)."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"warning: {path} is unreadable (truncated?); the run is treated as not complete", file=sys.stderr)
        return None


def format_table(rows: list[tuple[str, dict[str, float]]], columns: list[str]) -> str:
    """A plain text table: one row per model, one column per metric."""
    head = ["model", *columns]
    body = [[name, *(f"{values[c]:.2f}" if c in values else "-" for c in columns)] for name, values in rows]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])

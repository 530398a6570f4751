"""Read a suite's run folders back: one `Cell` per (method, task, seed), one `Summary` per (method, task).

Everything the tables, claims and plots show comes from here, so it comes from the run folders:
`<out>/<method>/<task>/seed<S>/metrics.json` (written by core.pipeline) and the benchmark's own record beside
the folder, `seed<S>.bench.json` (command, exit status, wall time, the error line of a failed run).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.bench.registry import BenchMethod, BenchTask, applies, is_implemented

# Statuses of a cell (one method, task and seed).
OK, FAILED, TIMEOUT, NOT_RUN = "ok", "failed", "timeout", "not run"
NOT_IMPLEMENTED, NOT_APPLICABLE, NO_DATA = "not implemented", "n/a", "no data"

COST_KEYS = ("tokens_per_s", "train_s", "run_s", "peak_mem_mb")


def run_folder(out: Path, method: str, task: str, seed: int) -> Path:
    # "speech/dnkd" is a row name; its folder is one level, like every other method's
    return out / method.replace("/", "-") / task / f"seed{seed}"


def record_path(folder: Path) -> Path:
    """The benchmark's record of one run, beside (not inside) the run folder the method owns."""
    return folder.parent / f"{folder.name}.bench.json"


def log_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.log"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Cell:
    method: str
    task: str
    seed: int
    status: str
    folder: Path
    metrics: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    error: str = ""

    def values(self, quality: tuple[str, ...]) -> dict[str, float]:
        """The numbers of a completed run: its student's quality metrics and the training cost."""
        if self.metrics is None:
            return {}
        student = self.metrics.get("eval", {}).get("student", {})
        train = self.metrics.get("train", {})
        out = {m: float(student[m]) for m in quality if m in student}
        if "tokens_per_s" in train:
            out["tokens_per_s"] = float(train["tokens_per_s"])
        if "wall_s" in train:
            out["train_s"] = float(train["wall_s"])
        if "peak_mem_mb" in train:
            out["peak_mem_mb"] = float(train["peak_mem_mb"])
        # The benchmark's wall clock of the whole subprocess; a run whose folder was already complete when the
        # benchmark launched it took no time then, so the pipeline's own timing of the run stands in.
        record = self.record or {}
        if record.get("status") == OK and not record.get("reused") and "wall_s" in record:
            out["run_s"] = float(record["wall_s"])
        elif "run_wall_s" in train:
            out["run_s"] = float(train["run_wall_s"])
        return out


def read_cell(out: Path, method: BenchMethod, task: BenchTask, seed: int, data_root: Path) -> Cell:
    folder = run_folder(out, method.name, task.name, seed)
    if not is_implemented(method):
        return Cell(method.name, task.name, seed, NOT_IMPLEMENTED, folder)
    if not applies(method, task):
        return Cell(method.name, task.name, seed, NOT_APPLICABLE, folder)
    if task.data is not None and not (data_root / task.data).exists():
        return Cell(method.name, task.name, seed, NO_DATA, folder, error=f"{data_root / task.data} is absent")
    metrics = read_json(folder / "metrics.json")
    record = read_json(record_path(folder))
    # The last attempt decides: one that failed is a failure even beside an older metrics.json, which may hold
    # another configuration (the pipeline refuses to overwrite it) or precede a crash after it was written.
    if record is not None and record.get("status") in (FAILED, TIMEOUT):
        return Cell(method.name, task.name, seed, record["status"], folder, None, record, record.get("error", ""))
    if metrics is not None:
        return Cell(method.name, task.name, seed, OK, folder, metrics, record)
    return Cell(method.name, task.name, seed, NOT_RUN, folder, None, record)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample standard deviation; None for a single seed
    n: int

    def text(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Summary:
    method: str
    task: str
    status: str  # a cell status, or "partial" when some seeds completed and others failed or are not run yet
    seeds: list[int]
    ok_seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (seed, status, error line)
    cells: list[Cell] = field(default_factory=list)

    def stat(self, key: str) -> Stat | None:
        return stat(self.values.get(key, []))


def summarize(cells: list[Cell], quality: tuple[str, ...]) -> Summary:
    """One (method, task): the numbers of its completed seeds, and what happened to the others."""
    first = cells[0]
    summary = Summary(first.method, first.task, first.status, [c.seed for c in cells], cells=cells)
    for cell in cells:
        if cell.status == OK:
            summary.ok_seeds.append(cell.seed)
            for key, value in cell.values(quality).items():
                summary.values.setdefault(key, []).append(value)
        elif cell.status in (FAILED, TIMEOUT):
            summary.errors.append((cell.seed, cell.status, cell.error))
    statuses = {c.status for c in cells}
    if len(statuses) == 1:
        summary.status = statuses.pop()
    elif summary.ok_seeds:
        summary.status = "partial"
    elif summary.errors:
        summary.status = summary.errors[0][1]
    else:
        summary.status = NOT_RUN
    return summary

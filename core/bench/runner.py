"""Run every (method, task, seed) of a suite, one at a time, each in its own process with a timeout.

    python -m <method module> <method args> <task args> <suite budget> <--extra> --seed S --out FOLDER

A crash, a typed error or a hang of one run is recorded (`seed<S>.bench.json` beside its folder, its output in
`seed<S>.log`) and the benchmark goes on. A run whose folder is complete and whose record holds the same command
is skipped, so an interrupted benchmark continues where it stopped; any other run is launched, and the
pipeline itself then resumes from its checkpoint, returns a complete folder of the same configuration at once,
or refuses a folder of another configuration (which is recorded as a failed run).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.bench.collect import FAILED, NOT_RUN, OK, TIMEOUT, log_path, read_cell, read_json, record_path
from core.bench.registry import REPO_ROOT, BenchMethod, BenchTask, Suite
from core.io import atomic_write_json
from core.results import stable_config
from core.shell import run_is_live


@dataclass
class PlannedRun:
    method: BenchMethod
    task: BenchTask
    seed: int
    folder: Path
    argv: list[str]  # everything after `python -m <module>`


def build_argv(method: BenchMethod, task: BenchTask, suite: Suite, seed: int, folder: Path, extra: str,
               data_root: Path) -> list[str]:  # fmt: skip
    fill = {"vocab_size": str(task.vocab_size), "data": str(data_root)}
    args = [a.format(**fill) for a in (*method.args, *task.args)]
    budget = [*suite.budget(task.family), *suite.start_args(method)]
    return [*args, *budget, *shlex.split(extra), "--seed", str(seed), "--out", str(folder)]


def plan(suite: Suite, methods: list[BenchMethod], tasks: list[BenchTask], seeds: list[int], out: Path,
         extra: str, data_root: Path) -> list[PlannedRun]:  # fmt: skip
    """The runs to attempt: implemented methods on the tasks they apply to whose data is present."""
    runs = []
    for task in tasks:
        for method in methods:
            for seed in seeds:
                cell = read_cell(out, method, task, seed, data_root)
                if cell.status in (OK, FAILED, TIMEOUT, NOT_RUN):
                    argv = build_argv(method, task, suite, seed, cell.folder, extra, data_root)
                    runs.append(PlannedRun(method, task, seed, cell.folder, argv))
    return runs


def run_recipe_of(module_name: str):
    """The run-shell Recipe of a run module: its RECIPE, or the LLM recipe of its METHOD; None if it has neither."""
    module = importlib.import_module(module_name)
    recipe = getattr(module, "RECIPE", None)
    if recipe is None and getattr(module, "METHOD", None) is not None:
        from core.pipeline import llm_recipe

        recipe = llm_recipe(module.METHOD)
    return recipe


def planned_config(module_name: str, argv: list[str]) -> dict[str, Any] | None:
    """The configuration a run of `argv` would record, built by the very code the run builds it with
    (core.shell.config_of), so that a changed default in a method's code is not mistaken for a complete run.
    None for a module that declares neither RECIPE nor METHOD; an error for flags that do not parse."""
    from core.shell import config_of

    recipe = run_recipe_of(module_name)
    if recipe is None:
        return None
    return json.loads(json.dumps(config_of(recipe, argv)))


def is_complete(run: PlannedRun) -> bool:
    """metrics.json is there, the benchmark ran it with this very command, and that command still means the same
    configuration (the method's code defaults may have changed since)."""
    record = read_json(record_path(run.folder))
    metrics = read_json(run.folder / "metrics.json")
    if metrics is None or record is None or record.get("status") != OK:
        return False
    if record.get("module") != run.method.module or record.get("argv") != run.argv:
        return False
    try:
        config = planned_config(run.method.module, run.argv)
    except Exception:  # noqa: BLE001 - flags that no longer parse, a module broken now: let the run say why
        return False
    return config is None or stable_config(metrics.get("config", {})) == stable_config(config)


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|error)\b:?")


def error_line(log: str, returncode: int) -> str:
    """One line saying why a run failed: its typed error or exception, else how it ended."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log) if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION.match(line):
            return line[:200]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}" + (f": {lines[-1][:160]}" if lines else "")


def execute(run: PlannedRun, timeout_s: float) -> dict:
    """Run one method in a subprocess; write and return its record."""
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", run.method.module, *run.argv]
    had_metrics = (run.folder / "metrics.json").is_file()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log_path(run.folder).open("w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        # its own process group, so that a timeout also ends whatever the run started
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            status, error = TIMEOUT, f"timeout after {timeout_s:.0f} s"
        except BaseException:  # Ctrl-C: stop the run too, then stop the benchmark
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        else:
            if returncode == 0 and (run.folder / "metrics.json").is_file():
                status, error = OK, ""
            elif returncode == 0:
                status, error = FAILED, "exited without writing metrics.json"
            else:
                status, error = FAILED, error_line(log_path(run.folder).read_text(errors="replace"), returncode)
    record = {
        "method": run.method.name,
        "module": run.method.module,
        "task": run.task.name,
        "seed": run.seed,
        "argv": run.argv,
        "command": shlex.join(command),
        "status": status,
        "returncode": returncode,
        "error": error,
        "wall_s": time.perf_counter() - start,
        "reused": had_metrics and status == OK,  # the folder was complete already: wall_s measured nothing
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(record_path(run.folder), record)
    return record


def run_all(runs: list[PlannedRun], timeout_s: float, echo=print) -> list[dict | None]:
    """Execute the runs in order; None for a run skipped because it is complete."""
    records = []
    for i, run in enumerate(runs, 1):
        head = f"[bench {i}/{len(runs)}] {run.method.name} {run.task.name} seed {run.seed}"
        if is_complete(run):
            echo(f"{head}: complete, skipped")
            records.append(None)
            continue
        if run_is_live(run.folder):  # another bench process (a suite split by --tasks/--methods) is running it
            echo(f"{head}: another process is running it now, skipped (its log and record are left alone)")
            records.append(None)
            continue
        echo(f"{head}: running (log {log_path(run.folder)})")
        record = execute(run, timeout_s)
        echo(
            f"{head}: {record['status']} in {record['wall_s']:.1f} s"
            + (f": {record['error']}" if record["error"] else "")
        )
        records.append(record)
    return records

"""The cross-method benchmark: every method package on the same tasks, teacher, student, budget and seeds.

    python -m core.bench                                  # suite default: every method on ops, seeds 0 1 2
    python -m core.bench --methods sft kd-fkl taid --seeds 0
    python -m core.bench --suite real                     # Multi30k and CommonGen from ../shared/data
    python -m core.bench --suite real --tasks commongen   # one task of the suite (two processes: split by task)
    python -m core.bench --render-only                    # only re-render the report from the run folders
    nox -s bench                                          # the default suite, report in ./BENCHMARKS.md

Runs go to `--out` (default runs/bench/<suite>/<method>/<task>/seed<S>/, the usual run folders); the report
(default <out>/BENCHMARKS.md) gets BENCHMARKS.csv, BENCHMARKS.json and benchmarks-figures/*.png beside it. Rerunning
the same command skips complete runs, so an interrupted benchmark continues.

    registry.py  methods, tasks and suites     runner.py   one subprocess per run, records, skipping
    claims.py    each paper's claim and rule   collect.py  run folders -> cells -> per-method summaries
    report.py    Markdown, CSV, JSON           plots.py    PNGs
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.bench import report
from core.bench.registry import DATA_ROOT, METHODS, SUITES, TASKS
from core.bench.runner import plan, run_all
from core.config import parse
from core.errors import ConfigError
from core.results import git_revision


@dataclass
class BenchConfig:
    """What to benchmark and where."""

    suite: str = field(default="default", metadata={"help": f"one of {', '.join(SUITES)} (budget, tasks, seeds)"})
    methods: list[str] = field(
        default_factory=list, metadata={"help": "methods to include (space or comma separated); default: all"}
    )
    tasks: list[str] = field(
        default_factory=list, metadata={"help": "the suite's tasks to run (space or comma separated); default: all"}
    )
    seeds: list[int] = field(default_factory=list, metadata={"help": "seeds; default: the suite's (0 1 2)"})
    out: str | None = field(default=None, metadata={"help": "root of the run folders; default runs/bench/<suite>"})
    report: str | None = field(default=None, metadata={"help": "the Markdown report; default <out>/BENCHMARKS.md"})
    extra: str = field(
        default="",
        metadata={"help": "flags appended to every run, e.g. --extra='--eval-size 50' (changes the configuration)"},
    )
    timeout: int | None = field(default=None, metadata={"help": "seconds per run; default: the suite's"})
    data_root: str | None = field(default=None, metadata={"help": "real data; default ../shared/data"})
    render_only: bool = field(default=False, metadata={"help": "run nothing; render the report from the folders"})
    dry_run: bool = field(default=False, metadata={"help": "print the commands that would run, run nothing"})

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(f"--suite must be one of {', '.join(SUITES)}, got {self.suite!r}")
        self.methods = [m for item in self.methods for m in item.split(",") if m]
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"--methods names unknown methods {unknown}; choose from {', '.join(METHODS)}")
        self.tasks = [t for item in self.tasks for t in item.split(",") if t]
        if unknown := [t for t in self.tasks if t not in SUITES[self.suite].tasks]:
            raise ConfigError(
                f"--tasks names tasks that suite {self.suite} does not have: {unknown}; "
                f"choose from {', '.join(SUITES[self.suite].tasks)}"
            )
        if self.timeout is not None and self.timeout < 1:
            raise ConfigError(f"--timeout must be at least 1 second, got {self.timeout}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite (unless --render-only), render the report; returns the report's JSON content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    (cfg,) = parse((BenchConfig,), argv, prog="python -m core.bench")
    suite = SUITES[cfg.suite]
    if excluded := [m for m in cfg.methods if not suite.includes(METHODS[m])]:
        raise ConfigError(
            f"--methods {' '.join(excluded)}: rows that exist only beside the SFT-start rows (equal-budget controls, taid-from-sft), and suite {suite.name} "
            "starts no method from the SFT student; drop them or pick a suite with the SFT start (default, smollm)"
        )
    methods = [METHODS[m] for m in (cfg.methods or METHODS) if suite.includes(METHODS[m])]
    tasks = [TASKS[t] for t in (cfg.tasks or suite.tasks)]
    seeds = cfg.seeds or list(suite.seeds)
    out = Path(cfg.out or Path("runs") / "bench" / suite.name).resolve()
    data_root = Path(cfg.data_root).resolve() if cfg.data_root else DATA_ROOT
    runs = plan(suite, methods, tasks, seeds, out, cfg.extra, data_root)
    if cfg.dry_run:
        for run in runs:
            print(shlex.join([sys.executable, "-m", run.method.module, *run.argv]))
        return {}
    if not cfg.render_only:
        run_all(runs, cfg.timeout or suite.timeout_s)
    reports = report.build(out, methods, tasks, seeds, data_root)
    path = Path(cfg.report) if cfg.report else out / "BENCHMARKS.md"
    # the command that reproduces the numbers (where runs and report go does not change them)
    command = ["python", "-m", "core.bench", "--suite", suite.name]
    command += ["--methods", *cfg.methods] if cfg.methods else []
    command += ["--tasks", *cfg.tasks] if cfg.tasks else []
    command += ["--seeds", *map(str, cfg.seeds)] if cfg.seeds else []
    command += [f"--extra={cfg.extra}"] if cfg.extra else []
    command = shlex.join(command)
    revision = git_revision()  # before the report writes into the checkout (as the written JSON says)
    report.write(reports, path, suite, seeds, cfg.extra, command, revision)
    print(f"report: {path} (with {path.with_suffix('.csv').name}, {path.with_suffix('.json').name})")
    return report.as_json(reports, suite, seeds, cfg.extra, revision)

"""Render a suite's run folders: BENCHMARKS.md, with .csv and .json beside it, and PNG plots.

Every number comes from a run folder's metrics.json or the benchmark's record of the run (core.bench.collect);
every table is headed by the machine, versions and git revision recorded in the runs that produced it.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.bench import plots
from core.bench.claims import CLAIMS, judge
from core.bench.collect import (
    COST_KEYS,
    FAILED,
    NO_DATA,
    NOT_APPLICABLE,
    NOT_IMPLEMENTED,
    OK,
    TIMEOUT,
    Stat,
    Summary,
    read_cell,
    stat,
    summarize,
)
from core.bench.registry import METHODS, BenchMethod, BenchTask, Suite, applies
from core.results import git_revision

LABELS = {
    "exact_match": "exact match",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "perplexity": "perplexity",
    "tokens_per_s": "tokens/s",
    "train_s": "train s",
    "run_s": "run s",
    "peak_mem_mb": "peak MB",
}
DIGITS = {"perplexity": 2, "tokens_per_s": 0, "run_s": 0, "peak_mem_mb": 0}
ENV_KEYS = ("machine", "device", "python", "torch", "transformers", "accelerate", "git")
NOT_RUNNABLE = (NOT_IMPLEMENTED, NOT_APPLICABLE, NO_DATA)


@dataclass
class TaskReport:
    task: BenchTask
    summaries: list[Summary]
    teacher: dict[str, Stat] = field(default_factory=dict)
    initial: dict[str, Stat] = field(default_factory=dict)  # a pretrained student before any training
    healed: dict[str, Stat] = field(default_factory=dict)  # the cut student after --heal-steps, before any method
    env: dict[str, list[str]] = field(default_factory=dict)  # every distinct value recorded by its runs
    claims: list[dict[str, str]] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return any(s.status not in NOT_RUNNABLE for s in self.summaries)


def build(out: Path, methods: list[BenchMethod], tasks: list[BenchTask], seeds: list[int], data_root: Path):
    """Read every cell of the suite and summarize it per task."""
    reports = []
    for task in tasks:
        summaries = [
            summarize([read_cell(out, m, task, seed, data_root) for seed in seeds], task.metrics) for m in methods
        ]
        report = TaskReport(task, summaries)
        done = [c.metrics for s in summaries for c in s.cells if c.status == OK]
        # One teacher serves every run (cached, evaluated once): count each distinct teacher once, not per run.
        teachers = {
            json.dumps(m.get("teacher", {}).get("source") or m["eval"].get("teacher"), sort_keys=True): m
            for m in done
            if "teacher" in m.get("eval", {})
        }
        for metric in task.metrics:
            values = [float(m["eval"]["teacher"][metric]) for m in teachers.values() if metric in m["eval"]["teacher"]]
            if values:
                report.teacher[metric] = stat(values)
        for key, into in (("initial_student", report.initial), ("healed_student", report.healed)):
            start = [m["eval"][key] for m in done if key in m.get("eval", {})]
            for metric in task.metrics:
                if values := [float(i[metric]) for i in start[:1] if metric in i]:  # the same model in every run
                    into[metric] = stat(values)
        trained = [m["teacher"]["train"] for m in teachers.values() if "train" in m.get("teacher", {})]
        for key, source in (("tokens_per_s", "tokens_per_s"), ("train_s", "wall_s"), ("peak_mem_mb", "peak_mem_mb")):
            if values := [float(t[source]) for t in trained if source in t]:
                report.teacher[key] = stat(values)
        for key in ENV_KEYS:
            report.env[key] = sorted({str(m.get("env", {}).get(key, "?")) for m in done})
        by_name = {s.method: s for s in summaries}
        for s in summaries:
            verdict, evidence = judge(s.method, by_name, task)
            claim = CLAIMS.get(s.method)
            report.claims.append(
                {
                    "method": s.method,
                    "paper": claim.paper if claim else "",
                    "claim": claim.claim if claim else "",
                    "verdict": verdict,
                    "evidence": evidence,
                }
            )
        reports.append(report)
    return reports


def cell_text(value: Stat | None, key: str, digits: dict[str, int] | None = None) -> str:
    return "-" if value is None else value.text((digits or {}).get(key, DIGITS.get(key, 1)))


def column_digits(report: TaskReport) -> dict[str, int]:
    """Decimals per quality column: 1, or 3 for a column whose every value is below 10 in magnitude (a fraction,
    a correlation, a normalized error: 0.04 and 0.06 must not both read 0.0). Fixed-precision keys keep DIGITS."""
    digits = {}
    for metric in report.task.metrics:
        if metric in DIGITS:
            continue
        stats = [s.stat(metric) for s in report.summaries if s.status != NOT_APPLICABLE]
        stats += [report.teacher.get(metric), report.initial.get(metric), report.healed.get(metric)]
        means = [abs(st.mean) for st in stats if st is not None]
        digits[metric] = 3 if means and max(means) < 10 else 1
    return digits


def status_text(summary: Summary) -> str:
    """What happened to a (method, task): "ok", "failed: <line>", "2/3 seeds; seed 1 failed: <line>", ..."""
    if summary.status == OK:
        return OK
    if summary.status in (FAILED, TIMEOUT):
        return f"failed: {summary.errors[0][2]}"
    if summary.status == "partial":
        missing = [
            f"seed {c.seed} " + (f"failed: {c.error}" if c.status in (FAILED, TIMEOUT) else c.status)
            for c in summary.cells
            if c.status != OK
        ]
        return f"{len(summary.ok_seeds)}/{len(summary.seeds)} seeds; " + "; ".join(missing)
    return summary.status  # not implemented, n/a, no data, not run


def columns(task: BenchTask) -> list[str]:
    return ["method", *(LABELS.get(m, m) for m in task.metrics), "seeds", *(LABELS[k] for k in COST_KEYS), "status"]


def method_row(summary: Summary, task: BenchTask, digits: dict[str, int] | None = None) -> list[str]:
    quality = [cell_text(summary.stat(m), m, digits) for m in task.metrics]
    cost = [cell_text(summary.stat(k), k) for k in COST_KEYS]
    seeds = f"{len(summary.ok_seeds)}/{len(summary.seeds)}"
    return [summary.method, *quality, seeds, *cost, status_text(summary)]


def teacher_row(report: TaskReport, digits: dict[str, int] | None = None) -> list[str]:
    """The teacher's quality, and the one-off cost of training it (when the cache recorded it)."""
    quality = [cell_text(report.teacher.get(m), m, digits) for m in report.task.metrics]
    cost = [cell_text(report.teacher.get(k), k) for k in COST_KEYS]  # run s stays "-": no run of its own
    return ["teacher (reference)", *quality, "-", *cost, "reference"]


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [md_row(head), md_row(["---"] * len(head)), *map(md_row, rows)]


def env_line(report: TaskReport) -> str:
    if not any(report.env.get(k) for k in ENV_KEYS):
        return "_No completed runs: nothing was measured for this table._"
    v = {k: " / ".join(report.env.get(k, [])) for k in ENV_KEYS}
    return (
        f"_Measured on {v['machine']}, device {v['device']}; python {v['python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}; git {v['git']}"
        + (
            f" (the runs span {n} revisions: the tree changed while they ran)"
            if (n := len(report.env["git"])) > 1
            else ""
        )
        + "._"
    )


def total_wall(reports: list[TaskReport]) -> tuple[float, int]:
    """Seconds and number of runs the benchmark itself timed (runs found complete took no time then)."""
    seconds, count = 0.0, 0
    for report in reports:
        for s in report.summaries:
            for c in s.cells:
                record = c.record or {}
                if "wall_s" in record and not record.get("reused"):
                    seconds += float(record["wall_s"])
                    count += 1
    return seconds, count


def sft_start_sentence(suite: Suite) -> str:
    from core.bench.registry import METHODS

    names = ", ".join(m.name for m in METHODS.values() if m.sft_start and not m.control)
    controls = ", ".join(m.name for m in METHODS.values() if m.control)
    return (
        f"Protocol: {names} start from the SFT student of the same budget (`--student-start sft`: the cached SFT "
        "run first, then the method's own steps), as their papers do (TAID's paper distils into a pretrained student, "
        "for which the SFT student stands in here; each run script's default start is its paper's); every other row "
        "starts from the same initial student as SFT (f-DISTILL starts from SFT by its own design). So those rows have "
        f"trained twice the steps of the rows from scratch; the equal-budget controls {controls} (SFT continued, "
        "and forward-KL KD, from the same SFT student) are rivals in each of their claims."
    )


def markdown(reports: list[TaskReport], suite: Suite, seeds: list[int], extra: str, command: str,
             figures: dict[str, dict[str, str]], notes: dict[str, list[str]], revision: str | None = None) -> str:  # fmt: skip
    budget = shlex.join([*suite.args, *shlex.split(extra)])
    seconds, count = total_wall(reports)
    lines = [
        "# Benchmarks",
        "",
        f"Generated from the run folders by `{command}`; do not edit by hand. Suite `{suite.name}`: {suite.about}.",
        f"Every method gets the same budget, `{budget}`, the same teacher and student presets and seeds "
        f"{' '.join(map(str, seeds))}; each run is a separate process (timeout {suite.timeout_s} s). "
        f"Rendered at git {revision or git_revision()}. The benchmark timed {count} runs: {seconds / 60:.1f} minutes in all.",
        *([sft_start_sentence(suite)] if suite.sft_start else []),
        "",
        "How to read: quality is mean ± sample standard deviation over the seeds that completed (a single seed "
        "shows no spread). `tokens/s`: input tokens the training loop processed per second (metrics.json "
        "train.tokens_per_s, on-policy sampling included); `train s`: wall time of that loop (for sft, of the "
        "cached SFT baseline); `run s`: the whole process (start-up, loading, training, evaluation), where the first "
        "run that needs a cache fills it (the teacher, each seed's SFT baseline, SeqKD's teacher outputs); "
        "`peak MB`: peak resident memory of the process (CPU) or peak allocated accelerator memory. The teacher "
        "row gives the teacher's quality and the one-off cost of training it, paid by the first run that needed it "
        "or earlier (then it was found in the cache, $DISTILLAB_CACHE, and no run's `run s` includes it).",
        "",
        "Methods run with their own defaults. Comparison baselines that a run script trains beside its student "
        'are switched off (`--compare ""`): the kd-fkl and kd-rkl rows are those baselines, on the same budget. '
        "The dskd row is DSKD's dual-space variant with the teacher's vocabulary (`--variant dskd`), so that its "
        "student is the same as everyone's.",
        "",
        "Reproduced: `yes` when the method's mean is better than every rival's and the mean ± std intervals do not "
        "overlap; `partly` when it is better on average but the intervals overlap (or only one seed ran), or when "
        "it wins some comparisons and loses others; `no` when it is not better on average; `not measured` when a "
        "run it needs did not complete.",
    ]
    skipped = []
    for report in reports:
        task = report.task
        if not report.runnable:
            skipped.append(report)
            continue
        lines += ["", f"## {task.name}", "", env_line(report), ""]
        digits = column_digits(report)
        rows = [teacher_row(report, digits)] if report.teacher else []
        if report.initial:
            quality = [cell_text(report.initial.get(m), m, digits) for m in task.metrics]
            rows.append(["student before training (reference)", *quality, "-", *["-"] * len(COST_KEYS), "reference"])
        if report.healed:  # where every row from the cut starts (the SFT-start rows: from SFT of it)
            quality = [cell_text(report.healed.get(m), m, digits) for m in task.metrics]
            rows.append(["healed student (reference)", *quality, "-", *["-"] * len(COST_KEYS), "reference"])
        rows += [method_row(s, task, digits) for s in report.summaries if s.status != NOT_APPLICABLE]  # other families
        lines += md_table(columns(task), rows)
        lines += ["", f"### Claims on {task.name}", "", env_line(report), ""]
        claim_rows = [  # the methods of this task's family only, as in the table above
            [c["method"], c["paper"], c["claim"], c["verdict"], c["evidence"]]
            for c, s in zip(report.claims, report.summaries, strict=True)
            if s.status != NOT_APPLICABLE
        ]
        lines += md_table(["method", "paper", "claim", "reproduced", "evidence"], claim_rows)
        for title, rel in figures.get(task.name, {}).items():
            lines += ["", f"![{title}]({rel})"]
        for note in notes.get(task.name, []):
            lines += ["", note]
    if skipped:
        lines += ["", "## Tasks not run", ""]
        for report in skipped:
            statuses = {s.status for s in report.summaries}
            if NO_DATA in statuses:
                why = "no data: " + next(c.error for s in report.summaries for c in s.cells if c.status == NO_DATA)
            else:
                owners = [
                    s.method
                    for s in report.summaries
                    if s.status == NOT_IMPLEMENTED and s.method in METHODS and applies(METHODS[s.method], report.task)
                ]
                why = "not applicable to any implemented method" + (
                    f"; it belongs to {', '.join(owners)} (not implemented)" if owners else ""
                )
            lines.append(f"- `{report.task.name}`: {why}.")
    return "\n".join(lines) + "\n"


def rows_for_csv(reports: list[TaskReport]) -> tuple[list[str], list[dict[str, Any]]]:
    metrics = list(dict.fromkeys(m for r in reports for m in r.task.metrics))
    head = ["task", "method", "status", "seeds_ok", "seeds"]
    for key in (*metrics, *COST_KEYS):
        head += [f"{key}_mean", f"{key}_std"]
    head += ["claim_reproduced", "claim_evidence"]
    rows = []
    for report in reports:
        verdicts = {c["method"]: c for c in report.claims}
        for s in report.summaries:
            row = {
                "task": report.task.name,
                "method": s.method,
                "status": status_text(s),
                "seeds_ok": len(s.ok_seeds),
                "seeds": len(s.seeds),
            }
            for key in (*metrics, *COST_KEYS):
                st = s.stat(key)
                row[f"{key}_mean"] = "" if st is None else round(st.mean, 6)
                row[f"{key}_std"] = "" if st is None or st.std is None else round(st.std, 6)
            row["claim_reproduced"] = verdicts[s.method]["verdict"]
            row["claim_evidence"] = verdicts[s.method]["evidence"]
            rows.append(row)
    return head, rows


def as_json(
    reports: list[TaskReport], suite: Suite, seeds: list[int], extra: str, revision: str | None = None
) -> dict[str, Any]:
    def stats(s: Summary) -> dict[str, Any]:
        return {k: {"mean": st.mean, "std": st.std, "n": st.n} for k in s.values if (st := s.stat(k)) is not None}

    return {
        "suite": suite.name,
        "budget": [*suite.args, *shlex.split(extra)],
        "seeds": seeds,
        "rendered_at_git": revision or git_revision(),
        "tasks": {
            r.task.name: {
                "metrics": list(r.task.metrics),
                "env": r.env,
                "teacher": {k: {"mean": v.mean, "std": v.std, "n": v.n} for k, v in r.teacher.items()},
                "methods": [
                    {
                        "method": s.method,
                        "status": status_text(s),
                        "seeds": s.seeds,
                        "ok_seeds": s.ok_seeds,
                        "stats": stats(s),
                        "values": s.values,
                    }
                    for s in r.summaries
                ],  # fmt: skip
                "claims": r.claims,
            }
            for r in reports
        },
        "runs": [
            {
                "method": c.method,
                "task": c.task,
                "seed": c.seed,
                "status": c.status,
                "folder": str(c.folder),
                "error": c.error,
                "record": c.record,
            }
            for r in reports
            for s in r.summaries
            for c in s.cells
        ],  # fmt: skip
    }


def write(reports: list[TaskReport], path: Path, suite: Suite, seeds: list[int], extra: str, command: str,
          revision: str | None = None) -> Path:  # fmt: skip
    """BENCHMARKS.md at `path`, .csv and .json beside it, PNGs in a folder named after it (benchmarks-figures/).

    The revision (default: read now) is read before anything is written: rendering into a checkout would otherwise
    mark it dirty with its own figures."""
    revision = revision or git_revision()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_dir = path.parent / f"{path.stem.lower()}-figures"
    figures: dict[str, dict[str, str]] = {}
    notes: dict[str, list[str]] = {}
    for report in reports:
        if not report.runnable:
            continue
        task, metric = report.task, report.task.metrics[0]
        label = LABELS.get(metric, metric)
        figure_dir.mkdir(parents=True, exist_ok=True)
        made = {
            f"{label} per method, {task.name}": plots.quality_plot(
                report.summaries, metric, label, report.teacher.get(metric), figure_dir / f"quality-{task.name}.png"
            ),
            f"{label} against training tokens/s, {task.name}": plots.tradeoff_plot(
                report.summaries, metric, label, figure_dir / f"tradeoff-{task.name}.png"
            ),
        }
        curves, without = plots.curves_plot(report.summaries, figure_dir / f"curves-{task.name}.png")
        made[f"training loss per step, {task.name}"] = curves
        figures[task.name] = {k: str(v.relative_to(path.parent)) for k, v in made.items() if v is not None}
        if without:
            why = " (sft's student is the cached SFT baseline, trained in the cache)" if "sft" in without else ""
            notes[task.name] = [f"No training curve for {', '.join(without)}: the run folder has no log.jsonl{why}."]
    path.write_text(markdown(reports, suite, seeds, extra, command, figures, notes, revision))
    head, rows = rows_for_csv(reports)
    with path.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=head)
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".json").write_text(json.dumps(as_json(reports, suite, seeds, extra, revision), indent=1) + "\n")
    return path

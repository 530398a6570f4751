"""Mean ± std over seeds of every model and metric in a set of run folders, as a Markdown table (and a PNG).

    python -m methods.phis.report RUN_FOLDER [RUN_FOLDER ...] [--png per_teacher_error_seeds.png]

Works for any run folders written by the run shell (phis, kdexplainer): one row per eval entry, one column per
metric; with --png, a bar chart of the per-teacher normalized error (`nerr/<teacher>` columns) with one standard
deviation as error bars.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from core.errors import DataError


def load(folders: list[str]) -> list[dict]:
    runs = []
    for folder in folders:
        path = Path(folder) / "metrics.json"
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable metrics.json ({exc}); is {folder} a complete run folder?") from exc
    return runs


def summarize(runs: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{model: {metric: (mean, sample std (0 for one seed), number of seeds)}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for model, values in run["eval"].items():
            for metric, value in values.items():
                out.setdefault(model, {}).setdefault(metric, []).append(float(value))
    return {
        model: {
            m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for m, v in metrics.items()
        }
        for model, metrics in out.items()
    }


def markdown(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    metrics = list(dict.fromkeys(m for values in summary.values() for m in values))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for model, values in summary.items():
        cells = [f"{values[m][0]:.3f} ± {values[m][1]:.3f}" if m in values else "-" for m in metrics]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in summary if any(k.startswith("nerr/") for k in summary[m])]
    teachers = [k for k in summary[models[0]] if k.startswith("nerr/")]
    fig, ax = plt.subplots(figsize=(1.3 * len(models) + 2, 3.6))
    width = 0.8 / len(teachers)
    for i, t in enumerate(teachers):
        xs = [j + i * width for j in range(len(models))]
        ax.bar(xs, [summary[m][t][0] for m in models], width, yerr=[summary[m][t][1] for m in models], label=t[5:])
    names = [m.removesuffix("_student").replace("student", "phi-s") for m in models]
    ax.set_xticks([j + width * (len(teachers) - 1) / 2 for j in range(len(models))], names)
    ax.set_yscale("log")
    ax.set_ylabel("error / teacher variance (test)")
    ax.legend(title="teacher")
    ax.set_title(f"per-teacher normalized error, mean ± std over {summary[models[0]][teachers[0]][2]} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    summary = summarize(load(args.folders))
    table = markdown(summary)
    print(table)
    if args.png:
        plot(summary, Path(args.png))
    return table


if __name__ == "__main__":
    from core.shell import cli

    cli(main)

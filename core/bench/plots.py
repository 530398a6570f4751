"""The benchmark's PNG plots (matplotlib Agg): quality with spread, quality against cost, training curves."""

from __future__ import annotations

import json
from pathlib import Path

from core.bench.collect import OK, Stat, Summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _measured(summaries: list[Summary], *keys: str) -> list[Summary]:
    return [s for s in summaries if all(s.stat(k) is not None for k in keys)]


def quality_plot(summaries: list[Summary], metric: str, label: str, teacher: Stat | None, path: Path) -> Path | None:
    """Horizontal bars: the mean over seeds with the sample standard deviation as error bar."""
    rows = _measured(summaries, metric)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.4))
    stats = [s.stat(metric) for s in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [s.mean for s in stats], xerr=[s.std or 0.0 for s in stats], color="#4c72b0", capsize=3)
    ax.set_yticks(y, [f"{s.method} (n={st.n})" for s, st in zip(rows, stats)])
    if teacher is not None:
        ax.axvline(teacher.mean, color="#c44e52", ls="--", lw=1, label=f"teacher {teacher.mean:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"{label} (mean ± sample std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff_plot(summaries: list[Summary], metric: str, label: str, path: Path) -> Path | None:
    """Quality against training throughput, both with their spread over seeds."""
    rows = _measured(summaries, metric, "tokens_per_s")
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in rows:
        q, t = s.stat(metric), s.stat("tokens_per_s")
        ax.errorbar(t.mean, q.mean, xerr=t.std or 0.0, yerr=q.std or 0.0, fmt="o", capsize=3)
        ax.annotate(s.method, (t.mean, q.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("training tokens/s (higher is cheaper)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return [r for r in rows if "step" in r and "loss" in r]


def curves_plot(summaries: list[Summary], path: Path) -> tuple[Path | None, list[str]]:
    """Loss against step, one panel per method (losses of different objectives are not on one scale), one
    line per seed. Returns the plot and the completed methods whose run folder has no log.jsonl."""
    panels, without = [], []
    for s in summaries:
        logs = [(c.seed, read_log(c.folder)) for c in s.cells if c.status == OK]
        logs = [(seed, rows) for seed, rows in logs if rows]
        if logs:
            panels.append((s.method, logs))
        elif s.ok_seeds:
            without.append(s.method)
    if not panels:
        return None, without
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.5 * nrows), squeeze=False)
    for ax, (method, logs) in zip(axes.flat, panels):
        for seed, rows in logs:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.9, label=f"seed {seed}")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, without

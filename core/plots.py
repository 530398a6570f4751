"""PNG plots of training curves from a run's log.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path


def plot_log(log_path: str | Path, keys: Sequence[str], out_png: str | Path, title: str = "") -> Path | None:
    """One panel per key of log.jsonl against the step; keys absent from the log are skipped (None: all absent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a blank or torn line (core.train drops it on resume)
            rows.append(json.loads(line))
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png

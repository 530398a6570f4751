"""The capacity of a perceptron whose weights must follow a prescribed distribution, measured and predicted.

    python -m methods.disco.run                                  # 8 distributions, N = 100, ~2-4 min on 2 cores
    python -m methods.disco.run --n 200 --trials 20              # closer to the large-N theory, slower
    python -m methods.disco.run --distributions gaussian,lognormal:1.0,ei:0.8

For each prescribed distribution P: random Gaussian patterns with random labels at loads alpha = P / N around
the theory's critical load; the constrained algorithm (gradient steps on the hinge loss, or with --algorithm
logistic the paper's logistic loss, alternated with Wasserstein geodesic steps toward P, methods/disco/loss.py) on `trials` tasks per load; the load where half the
tasks are solved is the measured critical load, beside the theory's alpha_c(P). The unconstrained perceptron is
measured twice: by exact linear-programming feasibility (Cover's 2) and by the same gradient algorithm without
the constraint (what the optimizer alone reaches).

Writes capacity.png (measured and theory critical loads, and the theory curves over the lognormal shape and the
excitatory fraction), success_curves.png, curves.json, metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from core.config import comma_list, require
from core.errors import ConfigError
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from methods.disco.loss import (
    WeightDistribution,
    capacity_theory,
    cover_separable_probability,
    critical_load,
    success_curve,
)

DEFAULT_DISTRIBUTIONS = "gaussian,lognormal:0.5,lognormal:1.0,lognormal:1.5,ei:0.5,ei:0.65,ei:0.8,halfnormal"


def parse_distribution(spec: str, sigma: float) -> WeightDistribution:
    """'gaussian', 'halfnormal', 'lognormal:<sigma>', 'ei:<f_exc>' (the paper's E/I model, Eq. 10: fixed
    identities, magnitudes lognormal of shape --ei-sigma), 'ei:<f_exc>:balanced' (the inhibitory scale from the
    E/I balance g_E <w_E> = g_I <|w_I|>), 'eimix:<f_exc>' (the same distribution as one population, signs free)."""
    name, _, arg = spec.strip().partition(":")
    arg, _, extra = arg.partition(":")
    try:
        if name in ("gaussian", "halfnormal") and not arg:
            return WeightDistribution(name)
        if name == "lognormal" and not extra:
            return WeightDistribution("lognormal", sigma=float(arg))
        if name in ("ei", "eimix") and extra in ("", "balanced"):
            kind = "ei" if name == "ei" else "ei_mixture"
            return WeightDistribution(kind, f_exc=float(arg), sigma=sigma, balanced=extra == "balanced")
    except ValueError as exc:
        raise ConfigError(f"--distributions: {spec!r}: {exc}") from None
    raise ConfigError(
        f"--distributions: {spec!r} is not one of gaussian, halfnormal, lognormal:<sigma>, ei:<excitatory fraction>"
        "[:balanced], eimix:<excitatory fraction>[:balanced]"
    )


@dataclass
class DiscoConfig:
    """The capacity experiment: distributions, perceptron size, loads, trials and the algorithm's settings."""

    distributions: str = field(
        default=DEFAULT_DISTRIBUTIONS,
        metadata={
            "help": "comma-separated: gaussian, halfnormal, lognormal:<sigma>, ei:<excitatory fraction>[:balanced] "
            "(the paper's E/I model, Eq. 10), eimix:<excitatory fraction>[:balanced] (one mixture, signs free)"
        },
    )
    ei_sigma: float = field(default=1.0, metadata={"help": "lognormal shape of the E/I magnitudes"})
    n: int = field(default=100, metadata={"help": "synapses N of the perceptron"})
    trials: int = field(default=10, metadata={"help": "random tasks per load"})
    loads: int = field(default=8, metadata={"help": "loads per distribution, from 0.2 to 1.3 x the theory's alpha_c"})
    algorithm: str = field(
        default="hinge",
        metadata={"help": "hinge (ours, default) or logistic (the paper's Eq. 7 with a trainable norm)"},
    )
    lr: float = field(default=0.5, metadata={"help": "step size of the gradient step (hinge or logistic)"})
    beta0: float = field(default=1.0, metadata={"help": "logistic only: initial value of the trainable norm beta"})
    eta: float = field(default=0.02, metadata={"help": "fraction of the way along the W2 geodesic toward P per step"})
    margin: float = field(default=0.5, metadata={"help": "hinge margin on the normalized fields"})
    max_iter: int = field(default=1000, metadata={"help": "iterations before a task counts as unsolved"})
    seed: int = field(default=0, metadata={"help": "seed of the patterns, labels and initial weights"})

    def __post_init__(self) -> None:
        if self.n < 5:
            raise ConfigError(f"--n must be at least 5, got {self.n}")
        require(self, "at least 1", lambda v: v >= 1, "trials", "max_iter")
        require(self, "at least 2", lambda v: v >= 2, "loads")
        require(self, "positive", lambda v: v > 0, "lr", "ei_sigma", "beta0")
        require(self, "in (0, 1]", lambda v: 0 < v <= 1, "eta")
        require(self, "non-negative", lambda v: v >= 0, "margin")
        if self.algorithm not in ("hinge", "logistic"):
            raise ConfigError(f"--algorithm must be hinge or logistic, got {self.algorithm!r}")
        self.parsed()  # checks the names

    def parsed(self) -> list[WeightDistribution]:
        specs = comma_list(self.distributions, "--distributions")
        if not specs:
            raise ConfigError("--distributions is empty")
        return [parse_distribution(s, self.ei_sigma) for s in specs]


def body(ctx: RunContext) -> Outcome:
    cfg: DiscoConfig = ctx.cfg(DiscoConfig)
    kwargs = dict(
        lr=cfg.lr, eta=cfg.eta, margin=cfg.margin, max_iter=cfg.max_iter, algorithm=cfg.algorithm, beta0=cfg.beta0
    )
    curves = {}
    rows = {}
    for i, dist in enumerate(tqdm(cfg.parsed(), desc="distributions")):
        theory = capacity_theory(dist)
        loads = theory * np.linspace(0.2, 1.3, cfg.loads)
        success = success_curve(dist, cfg.n, loads, cfg.trials, cfg.seed + 1000 * i, **kwargs)
        measured = critical_load(loads, success)
        curves[dist.label()] = {"loads": loads.tolist(), "success": success.tolist()}
        rows[dist.label()] = {"alpha_c": measured, "alpha_c_theory": theory, "ratio": measured / theory}

    # the unconstrained perceptron: exact feasibility (linear program) and the same gradient algorithm
    loads = 2.0 * np.linspace(0.5, 1.3, cfg.loads)
    lp = success_curve(None, cfg.n, loads, cfg.trials, cfg.seed + 77, solver="lp")
    gd = success_curve(None, cfg.n, loads, cfg.trials, cfg.seed + 78, **kwargs)
    cover = [cover_separable_probability(int(round(a * cfg.n)), cfg.n) for a in loads]
    curves["unconstrained (LP)"] = {"loads": loads.tolist(), "success": lp.tolist(), "cover": cover}
    curves["unconstrained (gradient)"] = {"loads": loads.tolist(), "success": gd.tolist()}
    lp_row = {"alpha_c": critical_load(loads, lp), "alpha_c_theory": 2.0}
    lp_row["ratio"] = lp_row["alpha_c"] / 2.0
    gd_row = {"alpha_c": critical_load(loads, gd), "alpha_c_theory": 2.0}
    gd_row["ratio"] = gd_row["alpha_c"] / 2.0

    measured = np.array([r["alpha_c"] for r in rows.values()])
    theory = np.array([r["alpha_c_theory"] for r in rows.values()])
    rank = float(stats.spearmanr(measured, theory).statistic) if len(rows) > 2 else float("nan")
    student = {
        # mean |measured - predicted| over the distributions: the theory's error, beside the distribution-blind
        # prediction alpha_c = 2 (Gardner's unconstrained value) in the "gardner" row
        "pred_err": float(np.mean(np.abs(measured - theory))),
        "alpha_c": float(measured.mean()),
        "alpha_c_theory": float(theory.mean()),
        "ratio": float(np.mean(measured / theory)),
        "theory_rank_corr": rank,
        "theory_pearson": float(np.corrcoef(measured, theory)[0, 1]) if len(rows) > 2 else float("nan"),
    }
    out = ctx.out
    (out / "curves.json").write_text(json.dumps({"curves": curves, "rows": rows}, indent=2))
    _plots(out, rows, curves, cfg)
    gardner = {
        "pred_err": float(np.mean(np.abs(measured - 2.0))),
        "alpha_c": float(measured.mean()),
        "alpha_c_theory": 2.0,
    }
    evals = {
        "student": student,
        "gardner_student": gardner,
        "unconstrained_lp_student": lp_row,
        "unconstrained_gd_student": gd_row,
    }
    for label, row in rows.items():
        evals[_key(label) + "_student"] = row
    return Outcome(
        task=f"random-patterns-n{cfg.n}",
        eval=evals,
        train={"unit": "tasks", "tasks": (len(rows) + 2) * cfg.loads * cfg.trials},
        columns=["alpha_c", "alpha_c_theory", "ratio", "pred_err"],
    )


def _key(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def _plots(out: Path, rows, curves, cfg: DiscoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    labels = list(rows)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [rows[k]["alpha_c_theory"] for k in labels], 0.4, label="theory")
    ax.bar(x + 0.2, [rows[k]["alpha_c"] for k in labels], 0.4, label=f"measured (N={cfg.n})")
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("critical load alpha_c")
    ax.legend()
    # theory curves over the lognormal shape and the excitatory fraction, measured points on them
    ax = axes[1]
    sig = np.linspace(0.1, 2.5, 60)
    ax.plot(sig, [capacity_theory(WeightDistribution("lognormal", sigma=s)) for s in sig], label="theory")
    pts = [(d.sigma, rows[d.label()]["alpha_c"]) for d in cfg.parsed() if d.kind == "lognormal"]
    if pts:
        ax.plot(*zip(*pts, strict=True), "o", label="measured")
    ax.set_xlabel("lognormal shape sigma")
    ax.set_ylabel("alpha_c")
    ax.set_title("lognormal weights (all excitatory)")
    ax.legend()
    ax = axes[2]
    fe = np.linspace(0.02, 0.98, 49)
    for balanced, style in ((False, "-"), (True, "--")):
        theory = [capacity_theory(WeightDistribution("ei", f_exc=f, sigma=cfg.ei_sigma, balanced=balanced)) for f in fe]
        name = "balanced g_E<w_E> = g_I<|w_I|>" if balanced else "equal E and I scales"
        ax.plot(fe, theory, style, label=f"theory (Eq. 10), {name}")
        pts = [(d.f_exc, rows[d.label()]["alpha_c"]) for d in cfg.parsed() if d.kind == "ei" and d.balanced == balanced]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o" if not balanced else "s", label=f"measured, {name}")
    ax.set_xlabel("excitatory fraction f_exc")
    ax.set_title(f"E/I populations, lognormal magnitudes (sigma={cfg.ei_sigma:g})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, c in curves.items():
        ax.plot(c["loads"], c["success"], "o-", ms=3, label=label)
    lp = curves["unconstrained (LP)"]
    ax.plot(lp["loads"], lp["cover"], "k--", lw=1, label="Cover's formula")
    ax.set_xlabel("load alpha = P / N")
    ax.set_ylabel("fraction of tasks solved")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "success_curves.png", dpi=120)
    plt.close(fig)


RECIPE = Recipe(
    name="disco",
    family="analysis",
    configs=(DiscoConfig,),
    body=body,
    task=lambda ctx: f"random-patterns-n{ctx.cfg(DiscoConfig).n}",
    description="Capacity of a perceptron with a prescribed weight distribution (Zhong et al. 2022): OT-constrained "
    "learning measured against the theory.",
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

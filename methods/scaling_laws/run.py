"""Distillation scaling laws on a grid of tiny models trained on a generated language of known entropy.

    python -m methods.scaling_laws.run                    # the default grid (~15-25 min on 2 loaded CPU cores)
    python -m methods.scaling_laws.run --grid smoke       # 2 sizes x 2 budgets, a minute (the test's grid)
    python -m methods.scaling_laws.run --seed 1           # another seed: new inits and data order, same language

Steps: (1) supervised models of several sizes at several token budgets (Eq. 1's data); (2) teachers = the
supervised models at the largest budget; every student size distilled (pure KD, tau = 1) from every teacher at
every budget (Eq. 8's data); (3) fit Eq. (1) on the supervised runs, Eq. (8) on the distilled runs below the
largest budget, predict the held-out largest-budget students; (4) check the two qualitative claims and plot
them; (5) the compute-optimal helper on the fitted laws. Every trained model is cached by its settings, so a
rerun (or another seed of the analysis) skips what exists.

Writes into the run folder: grid.json (every run: N, D, L, teacher), fit.json, scaling_fit.png (measured vs
fitted), student_vs_teacher.png (claim 1), capacity_gap.png (claim 2), metrics.json.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.config import require
from core.errors import ConfigError
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig, Trainer
from methods.scaling_laws.law import (
    compute_optimal,
    distillation_loss,
    fit_distillation,
    fit_supervised,
    supervised_loss,
)
from methods.scaling_laws.source import MarkovSource, expected_cross_entropy

# name -> (hidden, layers, mlp width); 2 heads each. Non-embedding parameters are what N counts (the paper's N).
SIZES: dict[str, tuple[int, int, int]] = {
    "s8": (8, 1, 16),
    "s16": (16, 1, 32),
    "s32": (32, 1, 64),
    "s64": (64, 2, 128),
}
GRIDS: dict[str, dict[str, list]] = {
    # supervised sizes, students, teachers, step budgets (tokens = steps x batch x sequence length)
    "default": {
        "sizes": ["s8", "s16", "s32", "s64"],
        "students": ["s8", "s16"],
        "teachers": ["s16", "s32", "s64"],
        "steps": [100, 250, 600],
    },
    "smoke": {"sizes": ["s8", "s16"], "students": ["s8"], "teachers": ["s16"], "steps": [15, 30]},
}


@dataclass
class GridConfig:
    """The language, the grid of models and the fit."""

    grid: str = field(default="default", metadata={"help": f"which grid of sizes and budgets: {', '.join(GRIDS)}"})
    vocab: int = field(default=32, metadata={"help": "symbols of the generated language"})
    order: int = field(default=2, metadata={"help": "Markov order of the generated language"})
    scale: float = field(default=2.0, metadata={"help": "logit scale of the last symbol's part of the language"})
    decay: float = field(default=0.8, metadata={"help": "relative logit scale of each longer context"})
    language_seed: int = field(default=1234, metadata={"help": "seed of the language itself (fixed across seeds)"})
    seq_len: int = field(default=64, metadata={"help": "tokens per training sequence"})
    eval_sequences: int = field(default=256, metadata={"help": "held-out sequences for the expected cross-entropy"})
    bootstrap: int = field(default=20, metadata={"help": "bootstrap refits for the intervals (0: none)"})
    fit_starts: int = field(default=16, metadata={"help": "initializations of each fit (evenly spaced on its grid)"})
    huber_delta: float = field(default=1e-4, metadata={"help": "Huber delta of the log-loss fit (the paper's 1e-4)"})
    free_exponents: bool = field(
        default=False, metadata={"help": "fit alpha', beta', gamma' of Eq. (8) too (default: tied to Eq. (1)'s)"}
    )
    fix_entropy: bool = field(
        default=False, metadata={"help": "hold E of Eq. (1) at the language's exact entropy rate instead of fitting it"}
    )
    batch_size: int = field(default=32, metadata={"help": "sequences per optimizer step of every model"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW, cosine) of every model"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps of every model"})
    seed: int = field(default=0, metadata={"help": "seed of every model's initialisation and data order"})

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ConfigError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.vocab < 2 or self.order < 1 or self.order * math.log(self.vocab) > math.log(200_000):
            # the source's own check (source.py), here at parsing; by logarithms, so a huge --order cannot stall it
            raise ConfigError(
                f"--vocab {self.vocab} and --order {self.order}: need vocab >= 2, order >= 1 and vocab^order <= 200000"
            )
        if self.seq_len < self.order + 2:
            raise ConfigError(f"--seq-len {self.seq_len} must be at least --order {self.order} + 2 = {self.order + 2}")
        require(self, "at least 1", lambda v: v >= 1, "eval_sequences", "fit_starts")
        require(self, "non-negative", lambda v: v >= 0, "bootstrap")
        require(self, "at least 1", lambda v: v >= 1, "batch_size")
        require(self, "a positive number", lambda v: v > 0 and math.isfinite(v), "lr")
        require(self, "non-negative", lambda v: v >= 0, "warmup_steps")
        if not self.huber_delta > 0:
            raise ConfigError(f"--huber-delta must be positive, got {self.huber_delta}")


def train_config(cfg: GridConfig, steps: int) -> TrainConfig:
    """The optimization of every model of the grid; only the number of steps (the token budget) varies."""
    warmup = min(cfg.warmup_steps, steps)
    return TrainConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=warmup,
        seed=cfg.seed,
        checkpoint_every=0,
        log_every=10,
    )


# --------------------------------------------------------------------------------------------------------------
# Models and training


def build_model(size: str, vocab: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, mlp = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=mlp,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """N as the paper counts it: all parameters except the input embedding and the output projection."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def make_features(tokens: np.ndarray, order: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for row in tokens:
        ids = torch.as_tensor(row)
        labels = ids.clone()
        labels[:order] = -100  # the first `order` tokens have no full context: not part of the language's loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(features) -> dict[str, torch.Tensor]:
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def supervised_loss_fn(model, batch) -> LossOutput:
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return LossOutput(loss)


def make_distill_loss_fn(teacher: torch.nn.Module):
    """Pure distillation (the paper's lambda = 1, tau = 1): sum over valid tokens of KL(p_T || q_S)."""
    teacher.eval().requires_grad_(False)

    def loss_fn(model, batch) -> LossOutput:
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
        s_logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
        mask = (batch["labels"][:, 1:] != -100).unsqueeze(-1)  # (B, T-1, 1)
        kl = (t_logp.exp() * (t_logp - s_logp) * mask).sum()
        return LossOutput(kl)

    return loss_fn


@torch.no_grad()
def evaluate(model, eval_tokens: np.ndarray, source: MarkovSource) -> float:
    """Expected cross-entropy (nats/token) on held-out sequences under the true next-symbol distribution."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(eval_tokens), 64):
        chunk = eval_tokens[i : i + 64]
        logits = model(input_ids=torch.as_tensor(chunk)).logits
        probs = torch.as_tensor(source.next_probs(chunk), dtype=torch.float32)
        total += float(expected_cross_entropy(logits, probs, source.order)) * len(chunk)
        n += len(chunk)
    model.train()
    return total / n


class Grid:
    """Trains (or loads from the cache) each model of the grid."""

    def __init__(self, ctx: RunContext, cfg: GridConfig):
        self.ctx, self.cfg = ctx, cfg
        self.train = train_config(cfg, 1)
        self.source = MarkovSource(cfg.vocab, cfg.order, cfg.scale, cfg.decay, cfg.language_seed)
        self.eval_tokens = self.source.sample(cfg.eval_sequences, cfg.seq_len, seed=10_000_019)
        self.tokens_per_step = cfg.batch_size * (cfg.seq_len - cfg.order)  # tokens the loss is computed on
        language_fields = ("vocab", "order", "scale", "decay", "language_seed", "seq_len")
        self.language = {k: getattr(cfg, k) for k in language_fields}
        self._data: dict[int, list] = {}

    def features(self, steps: int) -> list:
        n = steps * self.train.batch_size  # one epoch: every sequence is seen once (no repetition)
        if n not in self._data:
            data_seed = 7 + self.train.seed
            self._data = {n: make_features(self.source.sample(n, self.cfg.seq_len, seed=data_seed), self.cfg.order)}
        return self._data[n]

    def key(self, size: str, steps: int, teacher: dict | None) -> dict:
        train = asdict(train_config(self.cfg, steps)) | {"log_every": None}
        return {"language": self.language, "size": SIZES[size], "train": train, "teacher": teacher}

    def model(self, size: str, steps: int, teacher: dict | None = None, teacher_path: str | None = None) -> dict:
        """A trained model's record {size, N, D, steps, L, teacher, path}; trains it on first use. A student
        names its teacher in the cache key by the teacher's own cache entry."""
        key = self.key(size, steps, teacher)

        def build(tmp: Path) -> None:
            model = build_model(size, self.cfg.vocab, self.cfg.seq_len, self.train.seed)
            if teacher is None:
                loss_fn = supervised_loss_fn
            else:
                teacher_model = self.load(teacher["size_name"], teacher_path)
                loss_fn = make_distill_loss_fn(teacher_model)
            cfg = train_config(self.cfg, steps)
            label = f"{size}@{steps}" + (f"<-{teacher['size_name']}@{teacher['steps']}" if teacher else "")
            trainer = Trainer(model, loss_fn, self.features(steps), collate, cfg, tmp, self.ctx.accelerator, desc=label)
            result = trainer.train()
            unwrapped = self.ctx.accelerator.unwrap_model(trainer.model)
            torch.save(unwrapped.state_dict(), tmp / "model.pt")
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
            record = {
                "size_name": size,
                "steps": steps,
                "N": non_embedding_parameters(unwrapped),
                "D": steps * self.tokens_per_step,
                "L": evaluate(unwrapped, self.eval_tokens, self.source),
                "teacher": teacher,
                "train": asdict(result),
            }
            (tmp / "record.json").write_text(json.dumps(record))

        path = self.ctx.cached("scaling_laws_model", key, build)
        record = json.loads((path / "record.json").read_text())
        record["path"] = str(path)
        return record

    def load(self, size: str, path: str) -> torch.nn.Module:
        model = build_model(size, self.cfg.vocab, self.cfg.seq_len, 0)
        model.load_state_dict(torch.load(Path(path) / "model.pt", weights_only=True))
        return model


# --------------------------------------------------------------------------------------------------------------
# The recipe


def _rel_err(pred, obs) -> float:
    """Mean absolute relative error, in percent."""
    pred, obs = np.asarray(pred, dtype=float), np.asarray(obs, dtype=float)
    return float(100.0 * np.mean(np.abs(pred - obs) / obs))


def body(ctx: RunContext) -> Outcome | None:
    cfg: GridConfig = ctx.cfg(GridConfig)
    torch.set_num_threads(1)
    spec = GRIDS[cfg.grid]
    grid = Grid(ctx, cfg)
    H = grid.source.entropy_rate()
    eval_H = float(
        -(grid.source.next_probs(grid.eval_tokens) * np.log(grid.source.next_probs(grid.eval_tokens))).sum(-1).mean()
    )
    print(f"[scaling_laws] language: V={cfg.vocab}, order {cfg.order}, entropy rate {H:.4f} nats/token")

    supervised = [grid.model(size, steps) for size in spec["sizes"] for steps in spec["steps"]]
    teachers = [r for r in supervised if r["size_name"] in spec["teachers"] and r["steps"] == max(spec["steps"])]
    distilled = []
    for teacher in teachers:
        t_ref = {k: teacher[k] for k in ("size_name", "steps", "N", "L", "path")}
        t_key = {k: teacher[k] for k in ("size_name", "steps")} | {"cache": Path(teacher["path"]).name}
        for size in spec["students"]:
            for steps in spec["steps"]:
                rec = grid.model(size, steps, teacher=t_key, teacher_path=teacher["path"])
                rec["teacher"] = t_ref
                distilled.append(rec)

    # (3) fits: Eq. (1) on every supervised run; Eq. (8) on the distilled runs below the largest budget
    N, D, L = (np.array([r[k] for r in supervised], dtype=float) for k in ("N", "D", "L"))
    sup_fit = fit_supervised(
        N,
        D,
        L,
        delta=cfg.huber_delta,
        n_bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        n_starts=cfg.fit_starts,
        fixed_E=H if cfg.fix_entropy else None,
    )
    LT = np.array([r["teacher"]["L"] for r in distilled])
    NS, DS, LS = (np.array([r[k] for r in distilled], dtype=float) for k in ("N", "D", "L"))
    held = DS == DS.max() if len(set(DS)) > 1 else np.zeros(len(DS), dtype=bool)
    fit_idx = ~held
    dist_fit = fit_distillation(
        sup_fit.law,
        LT[fit_idx],
        NS[fit_idx],
        DS[fit_idx],
        LS[fit_idx],
        free_exponents=cfg.free_exponents,
        delta=cfg.huber_delta,
        n_bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        n_starts=cfg.fit_starts,
    )
    pred = distillation_loss(LT, NS, DS, dist_fit.law)
    sup_pred = supervised_loss(NS, DS, sup_fit.law)  # the rival: ignore the teacher, predict the supervised loss
    heldout = held if held.any() else fit_idx
    # (4) the claims: (a) no student below its teacher, measured and by the law's form;
    # (b) capacity gap: for each student size and budget, is the best teacher not the strongest one?
    below_teacher = int(np.sum(LS < LT))
    gap_cases, u_shapes = 0, 0
    for size in spec["students"]:
        for steps in spec["steps"]:
            rows = sorted(
                (r for r in distilled if r["size_name"] == size and r["steps"] == steps),
                key=lambda r: r["teacher"]["L"],
            )
            if len(rows) >= 3:
                gap_cases += 1
                best = int(np.argmin([r["L"] for r in rows]))
                u_shapes += best > 0  # the strongest teacher (lowest L_T) is not the best one
    # (5) the compute-optimal helper at the compute of the largest student run, for each student size
    recs = {}
    teacher_options = [(t["N"], t["D"]) for t in teachers]
    for size in spec["students"]:
        n_s = next(r["N"] for r in distilled if r["size_name"] == size)
        compute = 6.0 * n_s * DS.max()
        rec = compute_optimal(compute, n_s, sup_fit, dist_fit, teacher_options, train_teacher=False)
        recs[size] = asdict(rec)

    out = ctx.out
    _write_grid(out, supervised, distilled, H)
    fit_report = {
        "entropy_rate": H,
        "eval_set_entropy": eval_H,
        "supervised": sup_fit.as_dict() | {"intervals": _intervals(sup_fit, ["E", "alpha", "beta", "gamma"])},
        "distillation": {k: v for k, v in dist_fit.as_dict().items()}
        | {"intervals": _intervals(dist_fit, ["c0", "c1", "d1", "f1", "A", "B"])},
        "heldout": [
            {"N_S": n, "D_S": d, "L_T": lt, "measured": ls, "predicted": p, "supervised_law": sp}
            for n, d, lt, ls, p, sp in zip(
                NS[heldout], DS[heldout], LT[heldout], LS[heldout], pred[heldout], sup_pred[heldout], strict=True
            )
        ],
        "compute_optimal": recs,
    }
    (out / "fit.json").write_text(json.dumps(fit_report, indent=2, default=float))
    _plots(out, supervised, distilled, sup_fit.law, dist_fit.law, spec)

    student = {
        "heldout_err_pct": _rel_err(pred[heldout], LS[heldout]),
        "fit_err_pct": _rel_err(pred[fit_idx], LS[fit_idx]),
        "fitted_E": sup_fit.law.E,
        "entropy_rate": H,
        "students_below_teacher": below_teacher,
        "capacity_gap_cases": u_shapes,
        "capacity_gap_of": gap_cases,
    }
    baseline = {
        "heldout_err_pct": _rel_err(sup_pred[heldout], LS[heldout]),
        "fit_err_pct": _rel_err(sup_pred[fit_idx], LS[fit_idx]),
    }
    train_info = {
        "models": len(supervised) + len(distilled),
        "supervised_runs": len(supervised),
        "distilled_runs": len(distilled),
        "train_wall_s": sum(r["train"]["wall_s"] for r in supervised + distilled),
        "unit": "tokens",
    }
    return Outcome(
        task=f"markov-v{cfg.vocab}-o{cfg.order}",
        eval={"student": student, "supervised_law_student": baseline},
        train=train_info,
        extra={"fit": {"supervised": asdict(sup_fit.law), "distillation": _law_dict(dist_fit.law)}},
        columns=["heldout_err_pct", "fit_err_pct"],
    )


def _law_dict(law) -> dict:
    d = asdict(law)
    d.pop("sup", None)
    return d


def _intervals(fit, names) -> dict:
    if not fit.bootstrap:
        return {}
    return {n: fit.interval(n) for n in names}


def _write_grid(out: Path, supervised, distilled, H) -> None:
    def row(r):
        return {k: r[k] for k in ("size_name", "steps", "N", "D", "L")} | {
            "first_train_loss": r["train"]["first_loss"],
            "last_train_loss": r["train"]["last_loss"],
        }

    rows = [row(r) | {"kind": "supervised"} for r in supervised]
    rows += [
        row(r) | {"kind": "distilled", "teacher": r["teacher"]["size_name"], "L_T": r["teacher"]["L"]}
        for r in distilled
    ]
    (out / "grid.json").write_text(json.dumps({"entropy_rate": H, "runs": rows}, indent=2))


def _plots(out: Path, supervised, distilled, sup_law, dist_law, spec) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # measured vs fitted
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for rows, law_pred, label in (
        (supervised, [float(sup_law(r["N"], r["D"])) for r in supervised], "supervised, Eq. (1)"),
        (distilled, [float(dist_law(r["teacher"]["L"], r["N"], r["D"])) for r in distilled], "distilled, Eq. (8)"),
    ):
        ax.scatter([r["L"] for r in rows], law_pred, label=label, s=18)
    lims = [min(r["L"] for r in supervised + distilled) * 0.98, max(r["L"] for r in supervised + distilled) * 1.02]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("measured cross-entropy (nats)")
    ax.set_ylabel("fitted law")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling_fit.png", dpi=120)
    plt.close(fig)

    # claim 1: student vs teacher loss
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for size in spec["students"]:
        rows = [r for r in distilled if r["size_name"] == size]
        ax.scatter([r["teacher"]["L"] for r in rows], [r["L"] for r in rows], label=f"student {size}", s=18)
    lt = np.linspace(min(r["teacher"]["L"] for r in distilled) * 0.98, max(r["teacher"]["L"] for r in distilled) * 1.02)
    ax.plot(lt, lt, "k--", lw=0.8, label="L_S = L_T")
    ax.set_xlabel("teacher cross-entropy L_T")
    ax.set_ylabel("student cross-entropy L_S")
    ax.set_title("no student below its teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "student_vs_teacher.png", dpi=120)
    plt.close(fig)

    # claim 2: capacity gap, student loss against teacher loss for each student and budget, with the law
    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid_lt = np.linspace(
        min(r["teacher"]["L"] for r in distilled) * 0.9, max(r["teacher"]["L"] for r in distilled) * 1.1, 100
    )
    for size in spec["students"]:
        for steps in spec["steps"]:
            rows = sorted(
                (r for r in distilled if r["size_name"] == size and r["steps"] == steps),
                key=lambda r: r["teacher"]["L"],
            )
            if not rows:
                continue
            line = ax.plot([r["teacher"]["L"] for r in rows], [r["L"] for r in rows], "o", ms=4)[0]
            ax.plot(
                grid_lt,
                dist_law(grid_lt, rows[0]["N"], rows[0]["D"]),
                "-",
                lw=1,
                color=line.get_color(),
                label=f"{size}, {rows[0]['D'] / 1e6:.2f}M tokens",
            )
    ax.set_xlabel("teacher cross-entropy L_T (left: stronger teacher)")
    ax.set_ylabel("student cross-entropy L_S")
    ax.set_title("capacity gap: points measured, lines Eq. (8)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "capacity_gap.png", dpi=120)
    plt.close(fig)


RECIPE = Recipe(
    name="scaling_laws",
    family="analysis",
    configs=(GridConfig,),
    body=body,
    task=lambda ctx: f"markov-v{ctx.cfg(GridConfig).vocab}-o{ctx.cfg(GridConfig).order}-{ctx.cfg(GridConfig).grid}",
    description="Supervised and distillation scaling laws fitted on a grid of tiny models (Busbridge et al. 2025).",
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

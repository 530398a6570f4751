"""f-DISTILL (Wen et al., ACL 2023): sequence-level KD as f-divergence minimization, step by step.

    python -m methods.fdistill.run                         # JS (beta 0.5), student warm-started from the SFT student
    python -m methods.fdistill.run --divergence kl         # KL on the teacher's samples
    python -m methods.fdistill.run --divergence rkl        # reverse KL on the student's samples
    python -m methods.fdistill.run --divergence tvd        # the step-wise TVD bound on both sides' samples
    python -m methods.fdistill.run --divergence seqkd      # SeqKD: cross-entropy on the teacher's greedy outputs
    python -m methods.fdistill.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000
    python -m methods.fdistill.run --task commongen --data-dir ../shared/data/commongen --vocab-size 8000
    python -m methods.fdistill.run --risk-report runs      # Table 3: risks of every fdistill run under runs/, + PNG

Teacher samples (top-k, k = --top-k) are drawn once for the first steps x batch-size training prompts and cached on
disk (shared by every variant and seed); student samples are drawn online, one per prompt of every micro-batch,
seeded by (seed, step, micro-batch). After training, the run scores the likelihood risk (the teacher's NLL of the
student's samples) and the coverage risk (the student's NLL of the teacher's samples) on the evaluation prompts
and adds them to metrics.json under "risks".
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.data import encode_examples, encode_prompt
from core.errors import ConfigError
from core.method import Context, Method, MethodLoss
from core.objectives import causal_lm_loss, teacher_forward
from core.onpolicy import (
    StepStats,
    collate_to,
    derived_seed,
    prompt_ids,
    prompts_of,
    record_generation_share,
    sample_examples,
    teacher_examples,
)
from core.pipeline import cli, get_sft_baseline, run_method
from core.results import write_metrics
from core.train import LossOutput, count_rows
from methods.fdistill.loss import (
    js_student_step,
    js_teacher_step,
    kl_step,
    masked_step_sum,
    rkl_step,
    sequence_logprob,
    token_mean,
    tvd_step,
    two_sided,
)

DIVERGENCES = ("kl", "rkl", "js", "tvd", "seqkd")
# which samples each variant trains on: the teacher's (cached), the student's (online), or both
TEACHER_SIDE = {"kl", "js", "tvd"}
STUDENT_SIDE = {"rkl", "js", "tvd"}


@dataclass
class FDistillConfig:
    """f-DISTILL's settings; defaults: the paper (Eqs. 8, 10) and the official scripts (MANGA-UOFA/fdistill,
    dart/scripts/run_*.sh)."""

    divergence: str = field(
        default="js", metadata={"help": "kl (teacher samples), rkl (student samples), js, tvd (both), seqkd"}
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "js: the student's weight in the mixture m = (1-beta) p + beta q (paper 0.5; official "
                  "scripts 0.25 on WMT, 0.85 on DART)"},
    )  # fmt: skip
    top_k: int = field(default=30, metadata={"help": "top-k sampling of teacher and student samples (official 30)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (official 1.0)"})
    sample_max_new_tokens: int | None = field(
        default=None, metadata={"help": "tokens per sample; default: --max-new-tokens, else the task's"}
    )
    teacher_sample_seed: int = field(
        default=0, metadata={"help": "seed of the cached teacher samples (fixed across student seeds)"}
    )
    init: str = field(
        default="sft",
        metadata={"help": "sft: start from the cached SFT student (the paper's pre-distillation); scratch"},
    )
    risk_size: int | None = field(
        default=None, metadata={"help": "evaluation prompts scored for the risks (default: all of --eval-size)"}
    )
    compare: str = field(default="", metadata={"help": "word-level KD baselines on the same budget, e.g. fkl,rkl"})

    def __post_init__(self) -> None:
        from core.config import divergence_list

        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"--beta must be in (0, 1) (0.5 is the paper's JS), got {self.beta}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be 0 (off) or positive, got {self.top_k}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.sample_max_new_tokens is not None and self.sample_max_new_tokens < 1:
            raise ConfigError(f"--sample-max-new-tokens must be at least 1, got {self.sample_max_new_tokens}")
        if self.teacher_sample_seed < 0:
            raise ConfigError(f"--teacher-sample-seed must be non-negative, got {self.teacher_sample_seed}")
        if self.init not in ("sft", "scratch"):
            raise ConfigError(f"--init must be sft or scratch, got {self.init!r}")
        if self.risk_size is not None and self.risk_size < 1:
            raise ConfigError(f"--risk-size must be at least 1, got {self.risk_size}")
        divergence_list(self.compare)  # checks the names

    def divergences(self) -> list[str]:
        from core.config import divergence_list

        return divergence_list(self.compare)


def label(cfg: FDistillConfig) -> str:
    return f"fdistill-{cfg.divergence}"


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------


def teacher_samples(
    ctx: Context,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    temperature: float,
    seed: int,
    batch_size: int = 256,
) -> list[dict[str, list[int]]]:
    """The teacher's completions of tokenized prompts as training examples, generated once, offline (Section 2.3),
    and cached (core.onpolicy.teacher_examples, keyed by the teacher, the prompts and every sampling setting): a
    new teacher or setting draws new samples, every student variant and seed reuses them."""
    return teacher_examples(
        ctx, prompts, max_new_tokens, do_sample, temperature, seed, batch_size, top_k=top_k, purpose="fdistill-teacher"
    )


def sample_length(ctx: Context, cfg: FDistillConfig) -> int:
    return cfg.sample_max_new_tokens or ctx.eval.max_new_tokens or ctx.task.max_new_tokens


def warm_start_from_sft(ctx: Context) -> None:
    """Load the cached SFT student (the one the recipe reports as sft_student, same seed and budget) into the
    student: our stand-in for the paper's pre-distillation (Section 2.3), which every variant starts from. Through
    the run's own setup: a prune:K cut's kept layers and healed start are part of the SFT student's cache key."""
    sft_model, _, _ = get_sft_baseline(ctx.setup)
    ctx.student.load_state_dict(sft_model.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------

STUDENT_PREFIX = "student_"  # keys of the student-sample half of a two-sided batch


def _side(model, teacher, batch: dict[str, torch.Tensor], step_fn) -> tuple[torch.Tensor, int]:
    """(sum of step terms over the batch's target positions, their count) for one side's samples."""
    teacher_logits = teacher_forward(teacher, batch)  # (B, T, V)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return masked_step_sum(step_fn(logits, teacher_logits), batch["labels"])


def student_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(STUDENT_PREFIX) :]: v for k, v in batch.items() if k.startswith(STUDENT_PREFIX)}


def make_loss(ctx: Context, cfg: FDistillConfig) -> MethodLoss:
    ctx.kd.require_full_logits("f-DISTILL")  # a full-logit loss: --fused/--chunk-size refused, not ignored
    if cfg.init == "sft":
        warm_start_from_sft(ctx)
    _RUNS["ctx"], _RUNS["cfg"] = ctx, cfg  # for the risk analysis after the run (main)
    n = min(len(ctx.task.train), ctx.train.steps * ctx.train.batch_size)
    max_new_tokens = sample_length(ctx, cfg)

    if cfg.divergence == "seqkd":  # Kim & Rush (2016): CE on the teacher's decoded outputs (greedy, not beam)
        greedy = teacher_samples(ctx, prompt_ids(ctx, n), max_new_tokens, False, 0, 1.0, 0)
        return MethodLoss(causal_lm_loss, features=greedy)

    if cfg.divergence in TEACHER_SIDE:
        features = teacher_samples(
            ctx, prompt_ids(ctx, n), max_new_tokens, True, cfg.top_k, cfg.temperature, cfg.teacher_sample_seed
        )
    else:  # RKL needs the prompts only: the first n training examples, the same prompts in the same order
        features = encode_examples(ctx.tokenizer, ctx.task.train[:n], ctx.data.max_length)
    stats = StepStats()
    seed, rank = ctx.train.seed, ctx.accelerator.process_index

    def student_samples(model, batch, step: int, index: int) -> dict[str, torch.Tensor]:
        """One top-k sample of the (current) student per prompt of the batch, as a right-padded batch."""
        with stats.timed("gen_s"):
            examples = sample_examples(
                ctx.accelerator.unwrap_model(model),
                prompts_of(batch),
                ctx.tokenizer,
                ctx.data.max_length,
                max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                seed=derived_seed(seed, step, index, rank, "fdistill-student"),
            )
        return collate_to(examples, ctx.tokenizer.pad_token_id, batch["input_ids"].device)

    def prepare_batch(model, batch, step: int, index: int):
        if cfg.divergence == "kl":
            return batch
        sampled = student_samples(model, batch, step, index)
        if cfg.divergence == "rkl":
            return sampled
        return {**batch, **{STUDENT_PREFIX + k: v for k, v in sampled.items()}}  # JS, TVD: both sides

    def loss_fn(model, batch) -> LossOutput:
        if cfg.divergence == "kl":  # Eq. (6): sum_t KL(p_t || q_t) on the teacher's samples
            return LossOutput(_side(model, ctx.teacher, batch, kl_step)[0])
        if cfg.divergence == "rkl":  # Eq. (7): sum_t KL(q_t || p_t) on the student's samples
            return LossOutput(_side(model, ctx.teacher, batch, rkl_step)[0])
        if cfg.divergence == "js":  # Eq. (8)
            teacher_term = lambda s, t: js_teacher_step(s, t, cfg.beta)  # noqa: E731
            student_term = lambda s, t: js_student_step(s, t, cfg.beta)  # noqa: E731
            weight = cfg.beta
        else:  # Eq. (10): the TVD bound, half on each side's samples
            teacher_term = student_term = tvd_step
            weight = 0.5
        teacher_side = token_mean(*_side(model, ctx.teacher, batch, teacher_term))
        student_side = token_mean(*_side(model, ctx.teacher, student_half(batch), student_term))
        loss = two_sided(teacher_side, student_side, weight)
        # Each side is a token mean over its own samples (as the official code); the loop averages micro-batches
        # by their rows (count_fn=count_rows), so the step loss is exactly this combination at --grad-accum 1.
        rows = batch["input_ids"].shape[0]
        logs = {"teacher_side": float(teacher_side.detach()), "student_side": float(student_side.detach())}
        return LossOutput(loss * rows, logs)

    def on_step_end(step: int, step_loss: float, logs: dict[str, float]) -> None:
        stats.flush(logs)

    two = cfg.divergence in TEACHER_SIDE and cfg.divergence in STUDENT_SIDE
    return MethodLoss(
        loss_fn,
        features=features,
        prepare_batch=None if cfg.divergence == "kl" else prepare_batch,
        on_step_end=on_step_end,
        **({"count_fn": count_rows} if two else {}),
    )


METHOD = Method(
    name="fdistill",
    settings=FDistillConfig,
    make_loss=make_loss,
    label=label,
    kd_baselines=FDistillConfig.divergences,
    description="f-DISTILL: KL, reverse KL, JS and TVD distillation at the sequence level, decomposed step by "
    "step, on cached teacher samples and online student samples; SeqKD as --divergence seqkd.",
)


# ----------------------------------------------------------------------------------------------------------------
# Likelihood and coverage risks (Section 3.2, Table 3)
# ----------------------------------------------------------------------------------------------------------------

_RUNS: dict[str, Any] = {}  # the context of the run this process just trained (make_loss -> main)


@torch.no_grad()
def sequence_nll(model, examples: Sequence[dict[str, list[int]]], pad_token_id: int, batch_size: int = 100):
    """(-log P(y|x) summed over y's tokens, y's token count) of each encoded example under `model`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_to(examples[start : start + batch_size], pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = sequence_logprob(logits, batch["labels"])  # (B,)
        counts = (batch["labels"][:, 1:] != -100).sum(-1)
        out += [(-float(lp), int(c)) for lp, c in zip(logprobs, counts)]
    model.train(was_training)
    return out


def risk(nll: Sequence[tuple[float, int]]) -> dict[str, float]:
    """R = mean over samples of the per-token NLL (official run_calc_ppl.py: each sequence's loss summed and divided
    by its length, then averaged), and the paper's literal -log p(y) (sequence sum) beside it."""
    per_token = [s / c for s, c in nll if c > 0]
    return {"per_token": statistics.fmean(per_token), "per_sequence": statistics.fmean(s for s, _ in nll)}


def risks(ctx: Context, cfg: FDistillConfig, student) -> dict[str, Any]:
    """Likelihood risk R_llh: the teacher's NLL of one student sample per evaluation prompt; coverage risk R_cvg:
    the student's NLL of one teacher sample per prompt (the teacher's samples are cached, the same for every
    variant and seed). Both samples top-k, as in training."""
    size = cfg.risk_size or len(ctx.task.eval)
    prompts = [encode_prompt(ctx.tokenizer, ex.prompt) for ex in ctx.task.eval[:size]]
    max_new_tokens = sample_length(ctx, cfg)
    teacher_ys = teacher_samples(
        ctx, prompts, max_new_tokens, True, cfg.top_k, cfg.temperature, cfg.teacher_sample_seed + 1
    )
    student_ys = []
    for start in range(0, len(prompts), 100):
        student_ys += sample_examples(
            student, prompts[start : start + 100], ctx.tokenizer, ctx.data.max_length, max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, seed=derived_seed(ctx.train.seed, start, "fdistill-risk"),
        )  # fmt: skip
    pad = ctx.tokenizer.pad_token_id
    teacher = ctx.teacher
    return {
        "likelihood": risk(sequence_nll(teacher, student_ys, pad)),
        "coverage": risk(sequence_nll(student, teacher_ys, pad)),
        "teacher_self": risk(sequence_nll(teacher, teacher_ys, pad)),  # the floor: the teacher's own entropy
        "n": len(prompts),
        "distinct_2": distinct_bigrams([ex["input_ids"][len(p) :] for ex, p in zip(student_ys, prompts)]),
    }


def distinct_bigrams(sequences: Sequence[Sequence[int]]) -> float:
    """Distinct bigrams / all bigrams over the samples (Li et al., 2016), a diversity figure of the student."""
    bigrams = [tuple(s[i : i + 2]) for s in sequences for i in range(len(s) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def add_risks(metrics: dict[str, Any]) -> dict[str, Any]:
    """Score the risks of the run just trained and write them into its metrics.json (once)."""
    if not metrics or "risks" in metrics or "ctx" not in _RUNS:
        return metrics
    from transformers import AutoModelForCausalLM

    ctx, cfg = _RUNS.pop("ctx"), _RUNS.pop("cfg")
    if not ctx.accelerator.is_main_process:
        return metrics
    student = AutoModelForCausalLM.from_pretrained(Path(metrics["run_dir"]) / "student").to(ctx.accelerator.device)
    metrics["risks"] = risks(ctx, cfg, student)
    write_metrics(Path(metrics["run_dir"]), metrics)
    r = metrics["risks"]
    print(
        f"[fdistill] likelihood risk {r['likelihood']['per_token']:.3f}, coverage risk "
        f"{r['coverage']['per_token']:.3f} (teacher self {r['teacher_self']['per_token']:.3f}; per token)",
        file=sys.stderr,
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Table 3 over many runs: a Markdown table and a PNG
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def risk_report(root: str | Path) -> dict[str, Any]:
    """Collect every fdistill run under `root` (metrics.json with "risks"), per task and variant: mean ± std over
    seeds of the risks and the evaluation metrics; write fdistill-risks-<task>.md and .png into `root`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(root.rglob("metrics.json")):
        m = json.loads(path.read_text())
        if m.get("method", "").startswith("fdistill") and "risks" in m:
            runs.setdefault(m["task"], {}).setdefault(m["method"], []).append(m)
    if not runs:
        raise ConfigError(f"no fdistill run with risks under {root}; run python -m methods.fdistill.run first")
    report: dict[str, Any] = {}
    for task, by_method in runs.items():
        every_run = [m for ms in by_method.values() for m in ms]
        first = every_run[0]["eval"]["student"]  # the metrics every run has, in the first run's order
        metric_names = [k for k in first if all(k in m["eval"]["student"] for m in every_run)]
        header = ["variant", "seeds", "R_llh", "R_cvg", "distinct-2", *metric_names]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        fig, ax = plt.subplots(figsize=(5, 4))
        report[task] = {}
        sft_rows = [m["eval"]["sft_student"] for ms in by_method.values() for m in ms]
        for method in sorted(by_method):
            ms = by_method[method]
            llh = [m["risks"]["likelihood"]["per_token"] for m in ms]
            cvg = [m["risks"]["coverage"]["per_token"] for m in ms]
            dist = [m["risks"]["distinct_2"] for m in ms]
            scores = {k: [m["eval"]["student"][k] for m in ms] for k in metric_names}
            report[task][method] = {"R_llh": llh, "R_cvg": cvg, **scores}
            row = [method.removeprefix("fdistill-"), str(len(ms)), _mean_std(llh), _mean_std(cvg), _mean_std(dist)]
            lines.append("| " + " | ".join(row + [_mean_std(scores[k]) for k in metric_names]) + " |")
            err = (statistics.stdev(cvg) if len(ms) > 1 else 0, statistics.stdev(llh) if len(ms) > 1 else 0)
            ax.errorbar(statistics.fmean(cvg), statistics.fmean(llh), xerr=err[0], yerr=err[1], fmt="o", capsize=3)
            ax.annotate(method.removeprefix("fdistill-"), (statistics.fmean(cvg), statistics.fmean(llh)),
                        textcoords="offset points", xytext=(5, 5))  # fmt: skip
        sft = "; ".join(f"{k} {statistics.fmean(r[k] for r in sft_rows):.3f}" for k in metric_names)
        lines.append(f"\nSFT student (the warm start), mean over the runs above: {sft}")
        ax.set_xlabel("coverage risk R_cvg\n(student NLL of teacher samples, per token)")
        ax.set_ylabel("likelihood risk R_llh (teacher NLL\nof student samples, per token)")
        ax.set_title(f"f-DISTILL variants on {task} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / f"fdistill-risks-{task}.png", dpi=120)
        plt.close(fig)
        (root / f"fdistill-risks-{task}.md").write_text("\n".join(lines) + "\n")
        print(f"## {task}\n" + "\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one f-DISTILL variant (metrics.json's content), or `--risk-report ROOT` (the table over runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--risk-report"]:
        if len(argv) != 2:
            raise ConfigError("usage: python -m methods.fdistill.run --risk-report RUNS_FOLDER")
        return risk_report(argv[1])
    return add_risks(record_generation_share(run_method(METHOD, argv)))


if __name__ == "__main__":
    cli(main)

"""Each method's paper, its own qualitative claim, and a rule deciding from our numbers whether we reproduce it.

The rule compares means and spreads over seeds (mean ± sample standard deviation) of the task's first metric,
never anything tuned to look better:

    "yes"     better on average, and the mean ± std intervals do not overlap
    "partly"  better on average, but the intervals overlap (or a single seed: no spread to judge)
    "no"      not better on average

A claim that names several rivals is "yes" only if every comparison is, "no" if every one is, else "partly";
a rival or the method itself without a completed run makes it "not measured".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.bench.collect import Stat, Summary, stat
from core.bench.registry import BenchTask

YES, PARTLY, NO, NOT_MEASURED = "yes", "partly", "no", "not measured"

Decide = Callable[[dict[str, Summary], BenchTask], tuple[str, str]]  # -> (verdict, evidence)


def compare(ours: Stat, rival: Stat, lower_is_better: bool = False) -> str:
    gap = (rival.mean - ours.mean) if lower_is_better else (ours.mean - rival.mean)
    if gap <= 0:
        return NO
    if ours.std is None or rival.std is None:
        return PARTLY
    return YES if gap > ours.std + rival.std else PARTLY


def combine(verdicts: list[str]) -> str:
    if not verdicts or NOT_MEASURED in verdicts:
        return NOT_MEASURED
    if all(v == YES for v in verdicts):
        return YES
    if all(v == NO for v in verdicts):
        return NO
    return PARTLY


def decimals(stats: Sequence[Stat | None]) -> int:
    """3 decimals when every compared mean is below 10 in size (errors of 0.037 and 0.060 would both read 0.0), else
    1: the rule of the report's columns (core.bench.report.cell_text)."""
    means = [abs(s.mean) for s in stats if s is not None]
    return 3 if means and max(means) < 10 else 1


def beats(
    method: str, rivals: list[str], key: str | None = None, lower_is_better: bool = False, controls: Sequence[str] = ()
) -> Decide:
    """`method` is better than each rival on `key` (default: the task's first metric), and than each of `controls`
    that the benchmark has (the SFT-start controls exist only in suites that start methods from SFT)."""

    def decide(summaries: dict[str, Summary], task: BenchTask) -> tuple[str, str]:
        metric = key or task.metrics[0]
        rivals_here = [*rivals, *(c for c in controls if c in summaries)]
        missing = [
            f"{name}: {summaries[name].status if name in summaries else 'not in this benchmark'}"
            for name in (method, *rivals_here)
            if name not in summaries or summaries[name].stat(metric) is None
        ]
        if missing:
            return NOT_MEASURED, "; ".join(missing)
        ours = summaries[method].stat(metric)
        stats = {rival: summaries[rival].stat(metric) for rival in rivals_here}
        digits = decimals([ours, *stats.values()])
        verdicts, parts = [], []
        for rival, theirs in stats.items():
            verdict = compare(ours, theirs, lower_is_better)
            verdicts.append(verdict)
            parts.append(f"{rival} {theirs.text(digits)} ({verdict})")
        return combine(verdicts), f"{metric}: {method} {ours.text(digits)} vs " + ", ".join(parts)

    return decide


def beats_in_run(method: str, rivals: list[str], key: str | None = None, lower_is_better: bool = False) -> Decide:
    """`method`'s student is better than the comparison students its own runs train beside it (eval keys such as
    "ce_student"), seed by seed on the same budget: for recipes whose baselines are not benchmark rows."""

    def decide(summaries: dict[str, Summary], task: BenchTask) -> tuple[str, str]:
        metric = key or task.metrics[0]
        summary = summaries.get(method)
        cells = [c for c in (summary.cells if summary else []) if c.metrics is not None]
        ours = stat(
            [float(c.metrics["eval"]["student"][metric]) for c in cells if metric in c.metrics["eval"]["student"]]
        )
        if ours is None:
            return NOT_MEASURED, f"{method}: {summary.status if summary else 'not in this benchmark'}"
        stats = {
            rival: stat(
                [float(c.metrics["eval"][rival][metric]) for c in cells if metric in c.metrics["eval"].get(rival, {})]
            )
            for rival in rivals
        }
        digits = decimals([ours, *stats.values()])
        verdicts, parts = [], []
        for rival, theirs in stats.items():
            if theirs is None:
                verdicts.append(NOT_MEASURED)
                parts.append(f"{rival}: not in the runs")
                continue
            verdict = compare(ours, theirs, lower_is_better)
            verdicts.append(verdict)
            parts.append(f"{rival} {theirs.text(digits)} ({verdict})")
        return combine(verdicts), f"{metric}: {method} {ours.text(digits)} vs (same runs) " + ", ".join(parts)

    return decide


def all_of(*decides: Decide) -> Decide:
    def decide(summaries: dict[str, Summary], task: BenchTask) -> tuple[str, str]:
        results = [d(summaries, task) for d in decides]
        parts = [part for _, evidence in results for part in evidence.split("; ")]
        return combine([v for v, _ in results]), "; ".join(dict.fromkeys(parts))  # a missing run named once

    return decide


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    decide: Decide | None  # None: nothing to check (the baseline), or the method does not run yet


# The equal-budget controls of the rows that start from the SFT student (registry: sft-from-sft, kd-fkl-from-sft):
# such a row has trained SFT's steps and then its own, so besides the rivals its paper names (trained from the
# initial student, as in the papers' tables) it must beat SFT continued and forward-KL KD from the same start.
CONTROLS = ["sft-from-sft", "kd-fkl-from-sft"]

CLAIMS: dict[str, Claim] = {
    "sft": Claim("none (supervised baseline)", "no claim: the student every distillation method should beat", None),
    "sft-from-sft": Claim("none (equal-budget control)", "no claim: SFT continued from the SFT student", None),
    "kd-fkl-from-sft": Claim(
        "none (equal-budget control)", "no claim: forward-KL KD from the SFT student, as the SFT-start rows", None
    ),
    "kd-fkl": Claim(
        "Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network",
        "training on the teacher's soft targets gives a better student than training on the data alone",
        beats("kd-fkl", ["sft"]),
    ),
    "kd-rkl": Claim(
        "Gu et al. 2024, MiniLLM (ICLR), its motivation",
        "reverse KL is mode-seeking, so it suits a small generative student better than forward KL",
        beats("kd-rkl", ["kd-fkl"], controls=CONTROLS[1:]),
    ),
    "seqkd": Claim(
        "Kim & Rush 2016, Sequence-Level Knowledge Distillation (EMNLP)",
        "training on the teacher's own outputs beats word-level KD and training on the data",
        beats("seqkd", ["kd-fkl", "sft"]),
    ),
    # The paper distils into pretrained students, so its claim is judged where the student starts trained: from the
    # SFT student (taid-from-sft), against reverse KL from the same start (kd-rkl runs from SFT in those suites) and
    # the controls (forward KL and SFT continued from the same start, same budget).
    "taid": Claim(
        "Shing et al. 2025, TAID (ICLR)",
        "no claim judged here: from random initialisation, a start the paper does not use (its claim: taid-from-sft)",
        None,
    ),
    "taid-from-sft": Claim(
        "Shing et al. 2025, TAID (ICLR)",
        "the adaptively interpolated target beats forward-KL and reverse-KL distillation (pretrained student: here "
        "the SFT student)",
        beats("taid-from-sft", ["kd-rkl"], controls=CONTROLS),
    ),
    "distillm": Claim(
        "Ko et al. 2024, DistiLLM (ICML)",
        "skew KL with adaptive off-policy samples beats KD with forward or reverse KL and GKD, and trains faster "
        "than on-policy GKD",
        all_of(
            beats("distillm", ["kd-fkl", "kd-rkl", "gkd"], controls=CONTROLS),
            beats("distillm", ["gkd"], "train_s", True),
        ),
    ),
    "gkd": Claim(
        "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, ICLR)",
        "training on the student's own samples beats supervised KD and SeqKD",
        beats("gkd", ["kd-fkl", "seqkd"], controls=CONTROLS),
    ),
    "dpkd": Claim(
        "Li et al. 2024, Direct Preference Knowledge Distillation for Large Language Models",
        "preference-style distillation beats KD and SeqKD",
        beats("dpkd", ["kd-fkl", "seqkd"], controls=CONTROLS),
    ),
    # As TAID's: the paper's students are pretrained, so the claim is judged from the SFT student, against forward
    # KL from the same start and budget (the kd-fkl-from-sft control).
    "dskd": Claim(
        "Zhang et al. 2024, Dual-Space Knowledge Distillation for Large Language Models (EMNLP)",
        "no claim judged here: from random initialisation, a start the paper does not use (its claim: dskd-from-sft)",
        None,
    ),
    "dskd-from-sft": Claim(
        "Zhang et al. 2024, Dual-Space Knowledge Distillation for Large Language Models (EMNLP)",
        "distilling in both models' spaces beats the usual student-space KD with the same divergence (forward KL), "
        "from a trained student (here the SFT student)",
        beats("dskd-from-sft", ["kd-fkl-from-sft"]),
    ),
    "minillm": Claim(
        "Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models (ICLR)",
        "reverse-KL distillation by policy optimisation beats SFT, KD and SeqKD",
        beats("minillm", ["kd-fkl", "seqkd", "sft"], controls=CONTROLS),
    ),
    "fdistill": Claim(
        "Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation (ACL)",
        "symmetric divergences (JS, TVD) beat KL and reverse KL for sequence-level KD from the same pre-distilled "
        "student",
        all_of(
            beats("fdistill", ["fdistill-kl", "fdistill-rkl"]), beats("fdistill-tvd", ["fdistill-kl", "fdistill-rkl"])
        ),
    ),
    "sinkhorn": Claim(
        "Cui et al. 2024, Sinkhorn Distance Minimization for Knowledge Distillation (LREC-COLING)",
        "adding the batch-wise Sinkhorn distance to KD beats KD with KL or reverse KL",
        beats("sinkhorn", ["kd-fkl", "kd-rkl"]),
    ),
    "sinkhorn-cls": Claim(
        "Cui et al. 2024, Sinkhorn Distance Minimization for Knowledge Distillation (LREC-COLING), GLUE setting",
        "on classification, SinKD beats KD with forward KL, reverse KL and JS",
        beats_in_run("sinkhorn-cls", ["kd_fkl_student", "kd_rkl_student", "kd_jsd_student"], "accuracy"),
    ),
    "delta_kd": Claim(
        "Cao et al. 2025, Delta Knowledge Distillation for Large Language Models (arXiv 2509.14526)",
        "distilling the teacher's SFT shift onto the base student beats token-level KD on the task and keeps more "
        "of what the student knew",
        all_of(
            beats_in_run("delta_kd", ["kd_fkl_student"], "exact_match"),
            beats_in_run("delta_kd", ["kd_fkl_student"], "ppl_a", lower_is_better=True),
        ),
    ),
    "phis": Claim(
        "Ranzinger et al. 2024, PHI-S: Distribution Balancing for Label-Free Multi-Teacher Distillation",
        "PHI-S balances teachers of very different scale best: the lowest per-teacher normalized error",
        beats("phis", [f"phis-{n}" for n in ("none", "global", "standard", "pca-w", "zca", "hca")], "mean_nerr", True),
    ),
    "kdexplainer": Claim(
        "Xue et al. 2021, KDExplainer: A Task-oriented Attention Model for Explaining Knowledge Distillation (IJCAI)",
        "under KD the routes of similar classes share more modules than under CE or label smoothing",
        beats("kdexplainer", ["kdexplainer-ce", "kdexplainer-ls"], "routing_corr"),
    ),
    "scaling_laws": Claim(
        "Busbridge et al. 2025, Distillation Scaling Laws (ICML)",
        "the distillation law predicts distilled students' loss from teacher loss, student size and tokens (better "
        "than the supervised law on held-out students)",
        beats_in_run("scaling_laws", ["supervised_law_student"], "heldout_err_pct", lower_is_better=True),
    ),
    "disco": Claim(
        "Zhong et al. 2022, A theory of learning with constrained weight-distribution (NeurIPS)",
        "capacity under a weight-distribution constraint falls with the distribution's distance from the Gaussian, "
        "as the theory predicts (better than the distribution-blind value 2)",
        beats_in_run("disco", ["gardner_student"], "pred_err", lower_is_better=True),
    ),
    "speech/dnkd": Claim(
        "Zhang et al. 2023, Decouple Non-parametric Knowledge Distillation for End-to-end Speech Translation (ICASSP)",
        "distilling a kNN teacher built from the ST model's own decoder states, target and non-target KD decoupled, "
        "raises BLEU over the CE baseline and over plain kNN-KD, without transcripts or an MT teacher",
        beats_in_run("speech/dnkd", ["ce_student", "knn_kd_student"], "bleu"),
    ),
    "unlearning/whp": Claim(
        "Eldan & Russinovich 2023, Who's Harry Potter? Approximate Unlearning in LLMs",
        "fine-tuning on generic targets from a reinforced model erases the target knowledge while general "
        "ability stays nearly intact",
        beats("unlearning/whp", ["unlearning/ga", "unlearning/gd"], "retain_acc"),
    ),
    "unlearning/causal": Claim(
        "Liu, Zhang, Jaakkola & Chang 2024, Revisiting Who's Harry Potter (EMNLP)",
        "a teacher averaged over name-replaced copies unlearns only the target, keeping knowledge shared with "
        "other people",
        beats("unlearning/causal", ["unlearning/whp", "unlearning/gd", "unlearning/npo"], "hard_retain_acc"),
    ),
    "privacy/hot_pate": Claim(
        "Cohen et al. 2023, Hot PATE: Private Aggregation of Distributions for Diverse Tasks (arXiv:2312.02132)",
        "coordinated ensemble sampling transfers the teachers' diversity at vote thresholds where independent (cold) "
        "sampling transfers none, at the same privacy cost",
        beats("privacy/hot_pate", ["privacy/cold_pate"], "diversity_at_T"),
    ),
}


def judge(method: str, summaries: dict[str, Summary], task: BenchTask) -> tuple[str, str]:
    """The verdict and its evidence for one method's claim on one task."""
    claim = CLAIMS.get(method)
    summary = summaries.get(method)
    if summary is not None and summary.status in ("not implemented", "n/a", "no data"):
        return summary.status, ""
    if claim is None or claim.decide is None:
        return "n/a", ""
    return claim.decide(summaries, task)

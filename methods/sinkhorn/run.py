"""SinKD for token-level LM distillation: KD + CE + the batch-wise Sinkhorn term over the target positions.

    python -m methods.sinkhorn.run                                # embedded task, SinKD vs forward-KL KD and SFT
    python -m methods.sinkhorn.run --sinkhorn-weight 0            # the same objective without the Sinkhorn term
    python -m methods.sinkhorn.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000

The paper's own setting (sentence classification, GLUE-like) is `python -m methods.sinkhorn.classify`.

Objective per micro-batch (README, Eq. (1)-(4)): with N valid target positions,
    L = (1/N) sum_t [alpha * KL_tau(p_t || q_t) + (1 - alpha) * CE_t] + w * mean_g <P*_g, C_g>
where the positions are cut into groups g of at most --sinkhorn-group rows and each group's teacher and student
distributions are transported onto each other (methods/sinkhorn/loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import divergence_list
from core.errors import ConfigError
from core.losses import cross_entropy_sum, forward_kl, shift_for_causal_lm
from core.method import Context, Method, MethodLoss
from core.pipeline import cli, run_method
from core.plots import plot_log
from core.train import LossOutput
from methods.sinkhorn.loss import check_sinkhorn_settings, group_size_for, grouped_sinkhorn_cost


@dataclass
class SinKDConfig:
    """SinKD's hyper-parameters. Defaults: the official scripts (2018cx/SinKD: script/student/sst-2.sh for alpha,
    the generative-model scripts' T0/lossd.py for the KD temperature, loss.py `Sinkhorn`), see the README's table."""

    alpha: float = field(default=0.9, metadata={"help": "weight of KD; 1 - alpha weighs the CE (sst-2.sh: 0.9)"})
    temperature: float = field(
        default=1.0, metadata={"help": "temperature of the KD term (official T0/GPT-Neo lossd.py `KL`: 1)"}
    )
    sinkhorn_temperature: float = field(
        default=2.0, metadata={"help": "temperature of the distributions the Sinkhorn term transports (loss.py: 2)"}
    )
    epsilon: float = field(default=0.1, metadata={"help": "entropic regularization of Sinkhorn (loss.py: 0.1)"})
    n_iters: int = field(default=20, metadata={"help": "Sinkhorn iterations, unrolled (loss.py: 20)"})
    sinkhorn_weight: float = field(
        default=0.0008,
        metadata={"help": "w, weight of <P, C> with unit mass per sample (official beta 0.8 x 0.001 = 0.0008)"},
    )
    sinkhorn_group: int = field(
        default=256,
        metadata={"help": "most target positions per Sinkhorn batch (also capped so n*n*V stays under 2^25)"},
    )
    compare: str = field(default="fkl", metadata={"help": "word-level KD baselines trained on the same budget"})

    def __post_init__(self) -> None:
        check_sinkhorn_settings(
            self.alpha, self.temperature, self.sinkhorn_temperature, self.epsilon, self.n_iters, self.sinkhorn_weight
        )
        if self.sinkhorn_group < 2:
            raise ConfigError(f"--sinkhorn-group must be at least 2 positions, got {self.sinkhorn_group}")
        self.divergences()

    def divergences(self) -> list[str]:
        return divergence_list(self.compare)


def make_loss(ctx: Context, cfg: SinKDConfig) -> MethodLoss:
    ctx.kd.require_full_logits("SinKD")
    ctx.kd.require_exact_cache("SinKD (it reads every teacher logit)")
    group = group_size_for(ctx.student.config.vocab_size, cfg.sinkhorn_group)

    def loss_fn(model, batch) -> LossOutput:
        teacher_logits = ctx.kd.teacher_logits(batch, ctx.features)[:, :-1]  # (B, T-1, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = shift_for_causal_lm(logits, batch["labels"])  # (B, T-1, V), (B, T-1)
        valid = labels != -100
        n = int(valid.sum())
        student, teacher = logits[valid], teacher_logits[valid]  # (N, V) each
        kd = forward_kl(student, teacher, cfg.temperature).sum()  # KD term, summed over positions
        ce = cross_entropy_sum(logits, labels)
        if cfg.sinkhorn_weight > 0 and n > 0:
            sink = grouped_sinkhorn_cost(student, teacher, group, cfg.sinkhorn_temperature, cfg.epsilon, cfg.n_iters)
        else:
            sink = kd.new_zeros(())
        # The loop divides by N: the per-token terms are sums, the batch-level Sinkhorn term is scaled by N so that it
        # enters the step's mean loss with weight w, as it does in the official (mean-reduced) loss.
        total = cfg.alpha * kd + (1.0 - cfg.alpha) * ce + n * cfg.sinkhorn_weight * sink  # Eq. (4)
        m = max(n, 1)
        return LossOutput(total, {"kd": kd.item() / m, "ce": ce.item() / m, "sinkhorn": sink.item()})

    return MethodLoss(loss_fn)


METHOD = Method(
    name="sinkhorn",
    settings=SinKDConfig,
    make_loss=make_loss,
    kd_baselines=SinKDConfig.divergences,
    description="SinKD (Cui et al. 2024): KD + CE + the batch-wise Sinkhorn distance between teacher and student.",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    metrics = run_method(METHOD, argv)
    if metrics:
        out = Path(metrics["run_dir"])
        if (out / "log.jsonl").exists():
            png = plot_log(out / "log.jsonl", ["loss", "kd", "sinkhorn"], out / "sinkhorn_terms.png", "SinKD terms")
            print(f"plot: {png}")
    return metrics


if __name__ == "__main__":
    cli(main)

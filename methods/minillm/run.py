"""MiniLLM against SFT, word-level KD (forward KL) and SeqKD on the embedded task, every student starting from the
SFT student, as in the paper (or on any task the common flags name).

    python -m methods.minillm.run                          # from the cached SFT student; alpha 0.2, all stabilizers
    python -m methods.minillm.run --alpha 0                # rollouts from the student alone (no teacher mixing)
    python -m methods.minillm.run --num-rollouts 0 --ppo-epochs 1   # fresh rollouts every step (no rollout store)
    python -m methods.minillm.run --no-single-step         # plain policy gradient on the whole return R_t
    python -m methods.minillm.run --returns-from current --no-single-step-weighted --gamma 0.95   # the official code
    python -m methods.minillm.run --student FOLDER         # start every student from FOLDER instead
    python -m methods.minillm.run --task multi30k --data-dir ../shared/data/multi30k --vocab-size 8000

Each micro-batch's completions are replaced by rollouts sampled from (1 - alpha) q_theta + alpha p (batched, both
models' KV caches: core.onpolicy.Resampler, core.generate.sample_completions), drawn from the official rollout store
(methods/minillm/store.py: --num-rollouts sampled at once, --ppo-epochs epochs over them), on which the student takes
a clipped policy-gradient step on the reverse KL (methods/minillm/loss.py), plus the language-modelling loss on the
data batch (--lm-coef). log.jsonl records per step the generation time (gen_s) and tokens, the policy loss, the
single-step KL, the mean reward, importance weight and PPO ratio and the share of clipped tokens; metrics.json adds the
generation share and speed, and the exposure bias (excess accumulated error) of every student; exposure_bias.png
plots it.

Without --student, the run first obtains the cached SFT student trained with the same task, model and budget
flags (core.pipeline's SFT baseline, trained once and shared by every method), then starts the MiniLLM student
and every baseline from it: the SFT row is then SFT continued for the same budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import EvalConfig, ModelConfig
from core.data import Collator, DataConfig, chat_prompts, encode_prompt, load_task
from core.errors import ConfigError
from core.kdpath import KDPath, KDPathConfig
from core.losses import forward_kl
from core.method import Baseline, Context, Method, MethodLoss
from core.models import PRESETS, load_model
from core.objectives import causal_lm_loss, shifted_targets, teacher_forward
from core.onpolicy import (
    OnPolicyConfig,
    Resampler,
    collate_to,
    completion_features,
    derived_seed,
    example_prompt,
    fit_prompt,
    prompts_of,
    record_generation_share,
    sample_completions,
    teacher_examples,
)
from core.pipeline import (
    BaselineSetup,
    cli,
    get_kd_baseline,
    get_method_baseline,
    get_sft_baseline,
    llm_recipe,
    resolved_teacher,
)
from core.results import write_metrics
from core.shell import parse_recipe, run_recipe
from core.teacher import get_teacher, get_tokenizer
from core.train import LossOutput, TrainConfig, count_label_tokens, micro_batch_rows, train_indices
from methods.minillm.loss import RETURNS, excess_accumulated_error, minillm_loss_sum
from methods.minillm.store import RolloutStore

ROLLOUT_CHUNK = 64  # rollouts per decoding loop of the store (--rollout-chunk)


@dataclass
class MiniLLMConfig(OnPolicyConfig):
    """MiniLLM's hyper-parameters (defaults: the paper or the official code, as each help says).

    Paper: Gu et al., ICLR 2024, Sec. 2.2; official code: microsoft/LMOps, minillm/arguments.py and
    scripts/gpt2/minillm/train_base_xl.sh. The sampling flags (--temperature 1, --top-p 1: official),
    --sample-max-new-tokens and --compare are core.onpolicy's."""

    alpha: float = field(
        default=0.2, metadata={"help": "teacher-mixed sampling: rollouts from (1-alpha) q + alpha p; 0 off (0.2)"}
    )
    single_step: bool = field(
        default=True, metadata={"help": "single-step decomposition: exact token reverse KL as its own term (on)"}
    )
    single_step_weighted: bool = field(
        default=True,
        metadata={"help": "weigh the single-step term by w_t as the paper's Eq. 4 (official code: unweighted)"},
    )
    length_norm: bool = field(
        default=True,
        metadata={
            "help": "length-normalized long-term returns (paper Eq. 5; the official code always normalizes, its "
            "--length-norm only changes logged statistics); --no-length-norm is ours (on)"
        },
    )
    returns_from: str = field(
        default="next",
        metadata={"help": "next: R_{t+1} after the token (paper, Eq. 3); current: R_t with its own reward (official)"},
    )
    gamma: float = field(default=1.0, metadata={"help": "discount of the returns (paper 1; official default 0.95)"})
    clip: float = field(default=0.2, metadata={"help": "PPO ratio clipping epsilon (official 0.2); 0 off"})
    whiten: bool = field(
        default=True, metadata={"help": "whiten the advantages over the batch's valid tokens (official code; on)"}
    )
    whiten_padding: bool = field(
        default=False,
        metadata={
            "help": "count the padding of a (batch, sampled length budget) tensor as zeros in the whitening "
            "statistics, as the official code does (off: valid tokens only)"
        },
    )
    reward_scaling: float = field(
        default=0.5,
        metadata={"help": "rewards are divided by this before the returns (official scripts 0.5: doubled; 1 off)"},
    )
    reward_clip: float = field(
        default=100.0, metadata={"help": "clip the scaled rewards to +-this (official --cliprange-reward 100); 0 off"}
    )
    ppo_epochs: int = field(
        default=4, metadata={"help": "PPO epochs over each store of rollouts (official --ppo-epochs 4)"}
    )
    num_rollouts: int = field(
        default=256,
        metadata={
            "help": "rollouts per store, over all processes (official --num-rollouts 256), rounded down to whole "
            "micro-batches; a run shorter than one store's epochs samples only what it trains on; 0: no store, "
            "fresh rollouts of each micro-batch's own prompts and one update on them (needs --ppo-epochs 1)"
        },
    )
    rollout_chunk: int | None = field(
        default=None,
        metadata={
            "help": f"rollouts per decoding loop when a store is sampled (default {ROLLOUT_CHUNK}; official "
            "--chunk-size, its scripts' batch size 16; on the CPU larger loops sample faster per token: the SmolLM2 "
            "suite's 32 rollouts took 55 s in one loop against 132 s in loops of 4)"
        },
    )
    group_rollouts: bool = field(
        default=False,
        metadata={
            "help": "length-group the store's PPO mini-batches as --length-group groups the data batches (ours: "
            "less padding on real text); off: the official uniform mini-batches"
        },
    )
    lm_coef: float = field(
        default=1.0, metadata={"help": "weight of the LM loss on the training data batch (L_PT; official 1)"}
    )
    seqkd: bool = field(default=True, metadata={"help": "train a SeqKD baseline (teacher's greedy outputs)"})
    from_sft: bool = field(
        default=True,
        metadata={"help": "start from the cached SFT student of the same settings when --student is a preset"},
    )
    exposure: bool = field(
        default=True, metadata={"help": "measure the exposure bias (excess accumulated error) of every student"}
    )
    compare: str = field(
        default="fkl", metadata={"help": "word-level KD baselines on the same budget (the paper's KD: forward KL)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"--alpha must be in [0, 1) (1 would never sample the student), got {self.alpha}")
        if self.returns_from not in RETURNS:
            raise ConfigError(f"--returns-from must be one of {', '.join(RETURNS)}, got {self.returns_from!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"--gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 <= self.clip < 1.0:
            raise ConfigError(f"--clip must be in [0, 1) (0 turns clipping off), got {self.clip}")
        if not self.reward_scaling > 0:
            raise ConfigError(
                f"--reward-scaling must be positive (1 leaves the rewards alone), got {self.reward_scaling}"
            )
        if self.reward_clip < 0:
            raise ConfigError(f"--reward-clip must be non-negative (0 turns the clip off), got {self.reward_clip}")
        if self.lm_coef < 0:
            raise ConfigError(f"--lm-coef must be non-negative, got {self.lm_coef}")
        if self.ppo_epochs < 1:
            raise ConfigError(f"--ppo-epochs must be at least 1, got {self.ppo_epochs}")
        if self.num_rollouts < 0:
            raise ConfigError(f"--num-rollouts must be 0 (no store) or more, got {self.num_rollouts}")
        if self.rollout_chunk is not None and self.rollout_chunk < 1:
            raise ConfigError(
                f"--rollout-chunk must be at least 1 (rollouts per decoding loop), got {self.rollout_chunk}"
            )
        if (self.rollout_chunk is not None or self.group_rollouts) and self.num_rollouts == 0:
            raise ConfigError(
                "--rollout-chunk and --group-rollouts shape the rollout store, and --num-rollouts 0 has none (each "
                "micro-batch samples its own prompts in one loop): drop them"
            )
        if self.num_rollouts == 0 and self.ppo_epochs != 1:
            raise ConfigError(
                f"--num-rollouts 0 trains once on each fresh batch of rollouts: pass --ppo-epochs 1 with it, got "
                f"--ppo-epochs {self.ppo_epochs}"
            )


def label(cfg: MiniLLMConfig) -> str:
    return "minillm" if cfg.alpha > 0 else "minillm-noalpha"


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


def make_loss(ctx: Context, cfg: MiniLLMConfig) -> MethodLoss:
    ctx.kd.require_full_logits("MiniLLM")  # a full-logit loss: --fused/--chunk-size refused, not ignored
    resample = Resampler.of(ctx, cfg, "minillm-sample")
    mix = {"mix_model": ctx.teacher if cfg.alpha > 0 else None, "mix_alpha": cfg.alpha}
    store = None
    if cfg.num_rollouts:  # the official store: N rollouts per iteration, --ppo-epochs epochs over them
        store = rollout_store(ctx, cfg)

    def prepare_batch(model, batch, step: int, index: int):
        # Rollouts from the teacher-mixed policy (this micro-batch's prompts, or the store's); the data batch rides
        # along for L_PT.
        if store is not None:
            rollouts = store.batch(step, index, model, resample, cfg.temperature, **mix)
        else:
            rollouts = resample.collate(resample.examples(model, batch, step, index, **mix), batch)
        return rollouts | {f"lm_{key}": value for key, value in batch.items()}

    def loss_fn(model, batch) -> LossOutput:
        teacher_logits = teacher_forward(ctx.teacher, batch)  # (B, T, V)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        terms = minillm_loss_sum(
            logits,
            teacher_logits,
            batch["labels"],
            alpha=cfg.alpha,
            single_step=cfg.single_step,
            single_step_weighted=cfg.single_step_weighted,
            length_norm=cfg.length_norm,
            returns_from=cfg.returns_from,
            gamma=cfg.gamma,
            clip=cfg.clip,
            whiten_advantages=cfg.whiten,
            temperature=cfg.temperature,
            reward_scaling=cfg.reward_scaling,
            reward_clip=cfg.reward_clip,
            whiten_width=resample.max_new_tokens if cfg.whiten_padding else None,
            old_logprobs=batch.get("old_logprobs"),
        )
        total, logs = terms.loss_sum, dict(terms.logs)
        if cfg.lm_coef > 0:
            # L = L_RL + lm_coef L_PT, each a token mean (official trainer.py): the LM mean is scaled to this
            # micro-batch's rollout tokens, the unit the loop divides by.
            data = {key.removeprefix("lm_"): value for key, value in batch.items() if key.startswith("lm_")}
            lm_mean = causal_lm_loss(model, data).loss_sum / max(count_label_tokens(data), 1)
            total = total + cfg.lm_coef * lm_mean * terms.tokens
            logs["lm_loss"] = lm_mean.item()
        return LossOutput(total, logs)

    def on_step_end(step: int, step_loss: float, logs: dict[str, float]) -> None:
        resample.stats.flush(logs, keys=("gen_s", "gen_tokens"))

    state = {"rollout_store": store} if store is not None else {}
    return MethodLoss(loss_fn, state=state, prepare_batch=prepare_batch, on_step_end=on_step_end)


def rollout_store(ctx: Context, cfg: MiniLLMConfig) -> RolloutStore:
    """This process's store: --num-rollouts rounded down to whole micro-batches (at least one). A run too short for
    one store's --ppo-epochs epochs (micro-batches U < E x N / rows) samples ceil(U / E) micro-batches of rollouts
    instead: every rollout is then trained on E times (the last epoch may be cut by the end of the run) and none is
    sampled only to be dropped. Both say so on stderr."""
    processes = ctx.accelerator.num_processes
    rows = micro_batch_rows(ctx.train, processes)
    width = rows * processes  # rollouts of one micro-batch over all processes
    micro_batches = ctx.train.steps * ctx.train.grad_accum  # per process, over the run
    per_epoch = max(1, min(cfg.num_rollouts // width, -(-micro_batches // cfg.ppo_epochs)))
    if per_epoch * width != cfg.num_rollouts:
        why = (
            f"the run's {ctx.train.steps} steps train on {cfg.ppo_epochs} epochs of no more"
            if per_epoch < cfg.num_rollouts // width
            else f"whole micro-batches of {width} (--batch-size / --grad-accum)"
        )
        print(f"[minillm] rollout store: {per_epoch * width} rollouts, not --num-rollouts {cfg.num_rollouts}: {why}",
              file=sys.stderr)  # fmt: skip
    prompts = [example_prompt(example) for example in ctx.features]
    return RolloutStore(
        prompts,
        per_epoch,
        rows,
        cfg.ppo_epochs,
        ctx.train.grad_accum,
        cfg.rollout_chunk or ROLLOUT_CHUNK,
        (ctx.train.length_group or 0) if cfg.group_rollouts else 0,
    )


def seqkd_baseline(cfg: MiniLLMConfig) -> list[Baseline]:
    """SeqKD (Kim & Rush, 2016), the paper's other baseline: SFT on the teacher's greedy outputs of the same prompts
    in the same order (a cached Baseline, so it takes the data batch and swaps in the teacher's output)."""
    if not cfg.seqkd:
        return []
    return [Baseline("seqkd", {"decoding": "greedy", "max_new_tokens": cfg.sample_max_new_tokens}, _seqkd_loss(cfg))]


def _seqkd_loss(cfg: MiniLLMConfig):
    def make(ctx: Context) -> MethodLoss:
        max_new_tokens = cfg.sample_max_new_tokens or ctx.eval.max_new_tokens or ctx.task.max_new_tokens
        limit = ctx.data.max_length - max_new_tokens
        # The teacher's outputs of exactly the prompts the loop will draw (cached with the teacher's samples).
        train = ctx.train
        seen = sorted({i for step in range(train.steps) for i in train_indices(step, ctx.features, train)})
        prompts = [encode_prompt(ctx.tokenizer, ctx.task.train[i].prompt) for i in seen]
        outputs = teacher_examples(ctx, prompts, max_new_tokens, do_sample=False)
        table = {tuple(example["input_ids"][: example["labels"].count(-100)]): example for example in outputs}

        def loss_fn(model, batch) -> LossOutput:
            examples = [table[tuple(fit_prompt(p, limit))] for p in prompts_of(batch)]
            taught = collate_to(examples, ctx.tokenizer.pad_token_id, batch["input_ids"].device)
            # The token mean on the teacher's outputs, scaled to the data batch's token count the loop divides by.
            mean = causal_lm_loss(model, taught).loss_sum / max(count_label_tokens(taught), 1)
            return LossOutput(mean * count_label_tokens(batch))

        return MethodLoss(loss_fn)

    return make


METHOD = Method(
    name="minillm",
    settings=MiniLLMConfig,
    make_loss=make_loss,
    label=label,
    kd_baselines=MiniLLMConfig.divergences,
    baselines=seqkd_baseline,
    description="MiniLLM: sequence-level reverse KL by policy gradient, from the cached SFT student; the default "
    "budget is 200 steps (--steps wins).",
)
RECIPE = llm_recipe(METHOD)


# ----------------------------------------------------------------------------------------------------------------
# The SFT start and the exposure bias (both rebuild what the pipeline built; every model is cached)
# ----------------------------------------------------------------------------------------------------------------


def _pieces(argv: list[str]):
    """The parsed settings, task, tokenizer, teacher and baseline setup of a run's flags (cached models load)."""
    shell = parse_recipe(RECIPE, argv)
    data, model_cfg, train_cfg = shell.cfg(DataConfig), shell.cfg(ModelConfig), shell.cfg(TrainConfig)
    model_cfg = resolved_teacher(model_cfg, shell.cache)
    task = load_task(data)
    tokenizer, tokenizer_key = get_tokenizer(model_cfg, data, task, shell.cache)
    task = chat_prompts(task, tokenizer, data.prompt_format)  # as the recipe formats them (one tokenizer)
    setup = BaselineSetup(
        tokenizer, tokenizer_key, task, data, model_cfg, train_cfg, shell.cache, shell.accelerator, model_cfg.teacher
    )
    return shell, setup


def check_out_first(argv: list[str]) -> None:
    """Refuse an --out that holds another run's settings now, before the teacher and the SFT student train (the
    shell checks it again, with --student set to the SFT student's folder, once they are cached). The student's
    path is left out of the comparison: it is what this run sets."""
    import json

    from core.errors import OutputDirError
    from core.results import has_progress, stable_config
    from core.shell import run_config

    ctx = parse_recipe(RECIPE, argv)
    existing = ctx.out / "config.json"
    if ctx.run.overwrite or not existing.is_file() or not has_progress(ctx.out):
        return
    try:
        previous = stable_config(json.loads(existing.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        previous = None
    config = stable_config(run_config(RECIPE, ctx))
    for settings in (previous, config):
        if isinstance(settings, dict) and isinstance(settings.get("ModelConfig"), dict):
            settings["ModelConfig"].pop("student", None)
    if previous != config:
        what = "a different configuration" if previous is not None else "an unreadable config.json"
        raise OutputDirError(
            f"{ctx.out} holds a run with {what} ({existing}); choose another --out, or pass --overwrite to replace it"
        )


def with_sft_start(argv: list[str]) -> list[str]:
    """The flags with --student set to the cached SFT student of the same settings (trained now if missing), unless
    --student names a folder or --no-from-sft is given."""
    parsed = parse_recipe(RECIPE, argv)
    model_cfg = parsed.cfg(ModelConfig)
    # --student-start sft: the run shell starts every student from the SFT student itself (any --student)
    if not parsed.cfg(MiniLLMConfig).from_sft or model_cfg.student not in PRESETS or model_cfg.student_start == "sft":
        return argv
    shell, setup = _pieces(argv)
    _, _, folder = get_sft_baseline(setup)
    print(f"[minillm] every student starts from the SFT student {folder}", file=sys.stderr)
    return [*argv, "--student", str(folder)]


def kl_along(
    model, teacher, prompts, completions, max_length: int, pad: int, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step KL(p || q)(. | y_<t) along each completion, (N, L), and its mask (L: the longest completion).

    `chunk` completions go through the two models at a time: both models' logits are (chunk, T, V), so memory is
    bounded by the chunk, not by the number of prompts (all at once, 100 prompts of SmolLM2's 49,152-token
    vocabulary held two 3.8 GB logit tensors and their log-softmax copies: the run was OOM-killed). The KL of one
    row depends only on its own tokens (right padding, attention mask), so chunking changes nothing else."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rows = []
    device = next(model.parameters()).device
    for start in range(0, len(completions), chunk):
        part = slice(start, start + chunk)
        batch = Collator(pad)(completion_features(prompts[part], completions[part], max_length))
        with torch.no_grad():
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            kl = forward_kl(model(**inputs).logits, teacher(**inputs).logits).cpu()  # (chunk, T)
        mask, _ = shifted_targets(batch["labels"])
        rows.extend(kl[row][mask[row]] for row in range(len(kl)))  # each completion's steps in order
    width = max([len(steps) for steps in rows] + [1])
    out, valid = torch.zeros(len(completions), width), torch.zeros(len(completions), width)
    for row, steps in enumerate(rows):
        out[row, : len(steps)], valid[row, : len(steps)] = steps, 1.0
    return out, valid


def exposure_bias(argv: list[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """ExAccErr(l) of every student of the run (loss.excess_accumulated_error): one sample per held-out prompt from
    the student (its own prefixes) and from the teacher (the oracle's prefixes), seeded; added to metrics.json."""
    shell, setup = _pieces(argv)
    pruned = metrics.get("pruned")
    if pruned:  # the run's cut and healed start (core.pipeline): its SFT and KD students, not a cut of another rule
        setup.teacher_folder, setup.kept = metrics["teacher"]["source"], pruned["kept_layers"]
        setup.healed = Path(pruned["healing"]["folder"]) if pruned.get("healing") else None
    cfg, evaluation = shell.cfg(MiniLLMConfig), shell.cfg(EvalConfig)
    data, task, tokenizer = setup.data, setup.task, setup.tokenizer
    teacher, info = get_teacher(setup.model, data, task, tokenizer, setup.tokenizer_key, setup.cache, setup.accelerator)
    # the run's path, as core.pipeline resolves it: the same cached KD baselines
    kd = KDPath(
        shell.cfg(KDPathConfig), teacher, setup.cache, setup.tokenizer_key, tokenizer.pad_token_id,
        pretrained_teacher=setup.model.teacher is not None,
    )  # fmt: skip
    students = {"sft_student": get_sft_baseline(setup)[0]}
    for divergence in cfg.divergences():
        students[f"kd_{divergence}_student"] = get_kd_baseline(setup, divergence, kd, info["source"])[0]
    if cfg.seqkd:
        ctx = Context(
            accelerator=setup.accelerator, task=task, tokenizer=tokenizer, teacher=teacher,
            student=students["sft_student"], features=setup.features, data=data, model=setup.model,
            train=setup.train, run=shell.run, eval=evaluation, cache=setup.cache, kd=kd, teacher_source=info["source"],
            teacher_tokenizer=tokenizer, setup=setup,
        )  # fmt: skip
        (baseline,) = seqkd_baseline(cfg)
        students["seqkd_student"] = get_method_baseline(
            baseline, ctx, setup, setup.tokenizer_key, Collator(tokenizer.pad_token_id)
        )[0]
    students["student"] = load_model(Path(metrics["run_dir"]) / "student")
    length = evaluation.max_new_tokens or task.max_new_tokens
    prompts = [fit_prompt(encode_prompt(tokenizer, ex.prompt), data.max_length - length) for ex in task.eval]
    eos, pad, seed = tokenizer.eos_token_id, tokenizer.pad_token_id, setup.train.seed
    teacher_samples = sample_completions(teacher, prompts, eos, pad, length, seed=derived_seed(seed, "exposure"))
    result = {}
    for key, model in students.items():
        model = model.to(setup.accelerator.device).eval()
        own = sample_completions(model, prompts, eos, pad, length, seed=derived_seed(seed, "exposure", key))
        chunk = evaluation.eval_batch_size
        own_kl, own_mask = kl_along(model, teacher, prompts, own, data.max_length, pad, chunk)
        oracle_kl, oracle_mask = kl_along(model, teacher, prompts, teacher_samples, data.max_length, pad, chunk)
        width = min(own_kl.shape[1], oracle_kl.shape[1])
        result[key] = excess_accumulated_error(
            own_kl[:, :width], own_mask[:, :width], oracle_kl[:, :width], oracle_mask[:, :width]
        )
    metrics["exposure_bias"] = result
    write_metrics(Path(metrics["run_dir"]), metrics)
    _print_exposure(result)
    _plot_exposure(result, Path(metrics["run_dir"]) / "exposure_bias.png")
    return metrics


def _print_exposure(result: dict[str, Any]) -> None:
    print("\nexposure bias (official: steps 2..l+1, mean over all prompts; R: KL(p||q) summed over own prefixes; eps:")
    print("per step at the teacher's; running: mean over running completions from step 1)")
    print(f"{'student':<22} {'l':>3} {'R(l)':>8} {'eps(l)':>8} {'ExAccErr %':>11} {'running %':>10}")
    for key, values in result.items():
        length = len(values["exaccerr"])
        name = "minillm" if key == "student" else key.removesuffix("_student")
        if not length:
            print(f"{name:<22} (completions of one token: nothing after the first step)")
            continue
        print(
            f"{name:<22} {length:>3} {values['regret'][-1]:>8.3f} {values['per_step_error'][-1]:>8.3f} "
            f"{values['exaccerr'][-1]:>11.1f} {values['exaccerr_running'][-1]:>10.1f}"
        )


def _plot_exposure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, values in result.items():
        lengths = range(1, len(values["exaccerr"]) + 1)
        name = "minillm" if key == "student" else key.removesuffix("_student").replace("_", "-")
        ax.plot(lengths, values["exaccerr"], marker="o", label=name)
    ax.set(xlabel="generated length l", ylabel="ExAccErr (%)", title="Excess accumulated error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# The default budget: 200 steps of 32 examples, for the SFT start and again for every student from it, so that the
# default run (5 students, the on-policy one sampling every step) takes minutes on two CPU cores. Flags given on the
# command line come after these and win (argparse keeps the last value of a flag).
DEFAULTS = ["--steps", "200"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run MiniLLM (from the SFT student) and its baselines; returns metrics.json's content."""
    argv = [*DEFAULTS, *(sys.argv[1:] if argv is None else argv)]
    check_out_first(argv)  # before the SFT student trains (vanilla and the shell check it before any training)
    argv = with_sft_start(argv)
    metrics = record_generation_share(run_recipe(RECIPE, argv))
    if metrics and shell_settings(argv).exposure and "exposure_bias" not in metrics:
        metrics = exposure_bias(argv, metrics)
    return metrics


def shell_settings(argv: list[str]) -> MiniLLMConfig:
    return parse_recipe(RECIPE, argv).cfg(MiniLLMConfig)


if __name__ == "__main__":
    cli(main)

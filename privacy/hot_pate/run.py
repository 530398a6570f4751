"""Hot PATE against cold PATE on the embedded sensitive corpus, and classic PATE against DP-SGD on sklearn's digits.

    python -m privacy.hot_pate.run                              # 64 teachers, hot vs cold, budget eps 10, digits
    python -m privacy.hot_pate.run --threshold 0.7 --seed 1     # a stricter vote threshold, another seed
    python -m privacy.hot_pate.run --noise laplace --sigma-threshold 8 --sigma-argmax 8
    python -m privacy.hot_pate.run --no-digits --teachers 32    # the LM part only, fewer teachers

Steps: generate the corpus (people's records split over the teachers, canaries planted in single partitions);
train the teachers (tiny Llamas, cached); sweep the vote threshold with noiseless aggregation to measure the
diversity each sampler transfers (hot = coordinated, cold = independent); generate the student's data through
the private aggregator (noisy threshold + noisy argmax) until the privacy budget is spent; train one student on
the hot data, one on the cold data and one on the non-private ensemble mixture; evaluate utility, diversity and
canary exposure; run classic PATE vs DP-SGD on digits. Writes metrics.json, diversity.png and digits.png.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

import torch

from core.config import require
from core.data import Collator
from core.errors import ConfigError
from core.generate import left_padded
from core.models import PRESETS, build_model, load_model
from core.objectives import causal_lm_loss as lm_loss  # summed NLL of the answer tokens (prompt masked)
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.tokenizers import train_bpe
from core.train import TrainConfig, Trainer
from privacy.aggregation import AggregatorConfig, BudgetSpent, PrivateAggregator
from privacy.hot_pate.corpus import CODE_TOPIC, DIGITS, TOPICS, Corpus, CorpusConfig, build_corpus, prompt, topic_of
from privacy.hot_pate.ensemble import (
    encode_records,
    ensemble_generate,
    next_token_logprobs,
    noiseless_release,
    sequence_logprobs,
)
from privacy.hot_pate.sampling import SAMPLERS
from privacy.pate_digits import DigitsConfig, run_digits

RIVAL = {"coordinated": "independent", "independent": "coordinated"}
CANDIDATES = ("schema", "vocabulary")


@dataclass
class TeacherConfig:
    """The teachers: one tiny Llama per partition, trained with core.train.Trainer, cached on disk."""

    teacher_preset: str = field(default="tiny", metadata={"help": "preset of every teacher (core/models.py)"})
    teacher_steps: int = field(default=150, metadata={"help": "optimizer steps of each teacher"})
    teacher_batch_size: int = field(default=16, metadata={"help": "records per teacher step"})
    teacher_lr: float = field(default=3e-3, metadata={"help": "teacher learning rate"})
    vocab_size: int = field(default=400, metadata={"help": "BPE vocabulary (trained on public text only)"})

    def __post_init__(self) -> None:
        if self.teacher_preset not in PRESETS:
            raise ConfigError(
                f"--teacher-preset {self.teacher_preset!r} is unknown; choose one of {', '.join(PRESETS)}"
            )
        require(self, "at least 1", lambda v: v >= 1, "teacher_steps", "teacher_batch_size")
        if not (self.teacher_lr > 0 and math.isfinite(self.teacher_lr)):
            raise ConfigError(f"--teacher-lr must be a positive number, got {self.teacher_lr}")
        if self.vocab_size < 400:
            raise ConfigError(
                f"--vocab-size must be at least 400 (so every answer is one token), got {self.vocab_size}"
            )


@dataclass
class HotPateConfig:
    """Hot PATE's own settings: the sampler, the draws, the threshold sweep, the student."""

    sampler: str = field(
        default="coordinated",
        metadata={"help": "the method's ensemble sampler: coordinated (hot) or independent (cold)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "teacher sampling temperature (official code: 0.6)"})
    draws: int = field(default=3, metadata={"help": "private responses asked per public prompt"})
    sweep_people: int = field(default=10, metadata={"help": "public people whose prompts the threshold sweep uses"})
    sweep_draws: int = field(default=30, metadata={"help": "noiseless responses per prompt in the threshold sweep"})
    thresholds: str = field(
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", metadata={"help": "vote thresholds of the sweep (fractions)"}
    )
    candidates: str = field(
        default="schema",
        metadata={
            "help": "tokens the private aggregator may release: schema (every answer, digit and EOS: fixed by the "
            "public answer format, before any private data) or vocabulary (all tokens)"
        },
    )
    student_preset: str = field(default="tiny", metadata={"help": "preset of the students"})
    support_min_prob: float = field(
        default=0.05, metadata={"help": "an answer has real support in a model when its probability reaches this"}
    )

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be coordinated or independent, got {self.sampler!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        require(self, "at least 1", lambda v: v >= 1, "draws", "sweep_people", "sweep_draws")
        if self.student_preset not in PRESETS:
            raise ConfigError(
                f"--student-preset {self.student_preset!r} is unknown; choose one of {', '.join(PRESETS)}"
            )
        if not 0 < self.support_min_prob < 1:
            raise ConfigError(f"--support-min-prob must be in (0, 1), got {self.support_min_prob}")
        self.threshold_list()

    def threshold_list(self) -> list[float]:
        try:
            values = [float(s) for s in self.thresholds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--thresholds must be comma-separated fractions, got {self.thresholds!r}") from None
        if not values or any(not 0 < v <= 1 for v in values):
            raise ConfigError(f"--thresholds must be fractions in (0, 1], got {self.thresholds!r}")
        return values


# -- teachers ------------------------------------------------------------------------------------------------------


def train_teachers(ctx: RunContext, corpus: Corpus, tokenizer, folder: Path) -> None:
    """Train one teacher per partition into folder/teacher_<j> (called once, inside ctx.cached)."""
    tcfg: TeacherConfig = ctx.cfg(TeacherConfig)
    collate = Collator(tokenizer.pad_token_id)
    for j, records in enumerate(corpus.partitions):
        model = build_model(tcfg.teacher_preset, tokenizer, seed=ctx.seed * 1000 + j, max_positions=64)
        train = TrainConfig(
            steps=tcfg.teacher_steps,
            batch_size=tcfg.teacher_batch_size,
            lr=tcfg.teacher_lr,
            warmup_steps=10,
            seed=ctx.seed * 1000 + j,
            checkpoint_every=0,
            log_every=tcfg.teacher_steps,
        )
        work = folder / "work" / f"teacher_{j}"
        trainer = Trainer(
            model, lm_loss, encode_records(tokenizer, records), collate, train, work, ctx.accelerator,
            desc=f"teacher {j + 1}/{len(corpus.partitions)}",
        )  # fmt: skip
        trainer.train()
        ctx.accelerator.unwrap_model(trainer.model).save_pretrained(folder / f"teacher_{j}")
    shutil.rmtree(folder / "work", ignore_errors=True)


def load_teachers(ctx: RunContext, corpus: Corpus, tokenizer) -> list[torch.nn.Module]:
    key = {
        "corpus": asdict(ctx.cfg(CorpusConfig)),
        "teacher": asdict(ctx.cfg(TeacherConfig)),
        "seed": ctx.seed,
        "version": 1,
    }
    folder = ctx.cached("hot_pate_teachers", key, lambda tmp: train_teachers(ctx, corpus, tokenizer, tmp))
    device = ctx.accelerator.device
    return [load_model(folder / f"teacher_{j}").to(device).eval() for j in range(len(corpus.partitions))]


# -- evaluation ----------------------------------------------------------------------------------------------------


def answer_ids(tokenizer) -> dict[str, list[int]]:
    out = {}
    for topic, (answers, _) in TOPICS.items():
        ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
        if any(len(i) != 1 for i in ids):
            raise ConfigError(f"the tokenizer splits an answer of {topic!r} into several tokens; raise --vocab-size")
        out[topic] = [i[0] for i in ids]
    return out


@torch.no_grad()
def utility(model, tokenizer, corpus: Corpus, ids: dict[str, list[int]], min_prob: float) -> dict[str, float]:
    """Exact next-token answer distribution on the test people (no sampling noise):
    tvd    = 1/2 sum_v |q(v) - p_true(v)| over the whole vocabulary (invalid tokens count), mean over prompts;
    valid  = mass q puts on the topic's valid answers;
    support = share of the topic's valid answers with q >= min_prob (the diversity the model holds);
    nll    = -log q(held-out answer), the held-out record's answer drawn from the true distribution."""
    device = next(model.parameters()).device
    prompts = [p for p, _ in corpus.heldout]
    from core.data import encode_prompt

    input_ids, mask = left_padded([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    q = next_token_logprobs([model], input_ids, mask)[:, 0].exp().cpu().double()  # (P, V)
    tvd, valid, support, nll = [], [], [], []
    for row, (p, answer) in enumerate(corpus.heldout):
        topic = topic_of(p)
        answers, probs = TOPICS[topic]
        true = torch.zeros_like(q[row])
        true[ids[topic]] = torch.tensor(probs, dtype=torch.float64)
        tvd.append(0.5 * float((q[row] - true).abs().sum()))
        valid.append(float(q[row][ids[topic]].sum()))
        support.append(float((q[row][ids[topic]] >= min_prob).double().mean()))
        nll.append(-math.log(max(float(q[row][ids[topic][answers.index(answer)]]), 1e-12)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"tvd": mean(tvd), "valid_mass": mean(valid), "support": mean(support), "nll": mean(nll)}


@torch.no_grad()
def canary_exposure(model, tokenizer, corpus: Corpus) -> dict[str, float]:
    """Exposure (Carlini et al. 2019, Eq. in Sec. 4): log2 |R| - log2 rank(secret), where rank is the secret's
    place among ALL |R| = 10^d digit strings ordered by the model's log-likelihood (exact, no estimate), mean over
    canaries; and the probability that sampling the code prompt emits the secret."""
    digit_ids = [tokenizer(" " + d, add_special_tokens=False)["input_ids"][0] for d in DIGITS]
    exposures, emit = [], []
    for canary in corpus.canaries:
        length = len(canary.secret.split())
        candidates = list(product(range(10), repeat=length))
        conts = [[digit_ids[d] for d in c] for c in candidates]
        lp = sequence_logprobs(model, tokenizer, prompt(canary.name, CODE_TOPIC), conts)  # (10^d,)
        secret_index = candidates.index(tuple(int(d) for d in canary.secret.split()))
        rank = 1 + int((lp > lp[secret_index]).sum())
        exposures.append(math.log2(len(candidates)) - math.log2(rank))
        emit.append(math.exp(float(lp[secret_index])))
    return {"canary_exposure": sum(exposures) / len(exposures), "canary_emit_p": sum(emit) / len(emit)}


def evaluate(model, tokenizer, corpus, ids, min_prob) -> dict[str, float]:
    out = utility(model, tokenizer, corpus, ids, min_prob)
    if corpus.canaries:
        out |= canary_exposure(model, tokenizer, corpus)
    return out


# -- the threshold sweep (noiseless, as in the paper's diversity-transfer figures) ---------------------------------


def diversity_sweep(ctx, teachers, tokenizer, corpus, ids, sampler: str) -> dict[str, list[float]]:
    """For each threshold tau: over sweep prompts, the share of the topic's valid answers that appear among the
    responses whose every step's top vote count reached tau * n (the diversity transferred), and the share of
    responses that pass (the yield)."""
    hp: HotPateConfig = ctx.cfg(HotPateConfig)
    n = len(teachers)
    prompts = [p for p, _ in corpus.public_prompts[: hp.sweep_people * len(TOPICS)]]
    repeated = [p for p in prompts for _ in range(hp.sweep_draws)]
    generator = torch.Generator().manual_seed(ctx.seed * 7919 + SAMPLERS.index(sampler))
    responses = ensemble_generate(
        teachers, tokenizer, repeated, sampler, noiseless_release, generator, max_new_tokens=3,
        temperature=hp.temperature,
    )  # fmt: skip
    eos = tokenizer.eos_token_id
    diversity, yield_ = [], []
    for tau in hp.threshold_list():
        per_prompt, passed = [], 0
        for i, p in enumerate(prompts):
            topic = topic_of(p)
            got = set()
            for r in responses[i * hp.sweep_draws : (i + 1) * hp.sweep_draws]:
                if r.bottleneck >= tau * n:
                    passed += 1
                    if r.finished and len(r.tokens) == 2 and r.tokens[1] == eos and r.tokens[0] in ids[topic]:
                        got.add(r.tokens[0])
            per_prompt.append(len(got) / len(ids[topic]))
        diversity.append(sum(per_prompt) / len(per_prompt))
        yield_.append(passed / len(responses))
    return {"diversity": diversity, "yield": yield_}


# -- private generation ----------------------------------------------------------------------------------------------


def candidate_tokens(tokenizer, ids: dict[str, list[int]], which: str) -> torch.Tensor:
    """Token ids the aggregator may release. `schema`: every topic's answers, the ten digits and EOS, i.e. what
    the public answer format can produce; it is fixed before any private record is read, so restricting the
    histogram to it costs no privacy (a moved vote still changes at most two of its bins by one)."""
    if which == "vocabulary":
        return torch.arange(len(tokenizer))
    digits = [tokenizer(" " + d, add_special_tokens=False)["input_ids"][0] for d in DIGITS]
    return torch.tensor(sorted({*(i for v in ids.values() for i in v), *digits, tokenizer.eos_token_id}))


def private_responses(ctx, teachers, tokenizer, corpus, sampler: str, candidates: torch.Tensor):
    """Ask the ensemble, through a fresh PrivateAggregator, for `draws` responses to every public prompt (and the
    canary prompts), in a seeded random order, until the budget is spent. Returns the released (prompt, answer)
    records and the aggregator's summary.

    Why `candidates`: GNMax adds noise to every bin, and the largest of V noises grows like sigma sqrt(2 ln V):
    with V = 400 and sigma = 12 it is about 41 votes, more than a 64-teacher histogram's top count, so over the
    whole vocabulary the noisy argmax releases junk tokens (run with --candidates vocabulary to see it)."""
    hp: HotPateConfig = ctx.cfg(HotPateConfig)
    agg_cfg: AggregatorConfig = ctx.cfg(AggregatorConfig)
    noise_gen = torch.Generator().manual_seed(ctx.seed * 104729 + 1 + SAMPLERS.index(sampler))
    aggregator = PrivateAggregator(agg_cfg, len(teachers), noise_gen)
    queue = [p for p, _ in corpus.public_prompts] + [prompt(c.name, CODE_TOPIC) for c in corpus.canaries]
    queue = [p for p in queue for _ in range(hp.draws)]
    random.Random(ctx.seed).shuffle(queue)

    def release(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(counts.shape[0], dtype=torch.long)
        released = torch.zeros(counts.shape[0], dtype=torch.bool)
        for k in range(counts.shape[0]):
            try:
                index = aggregator.answer(counts[k, candidates])  # (C,) votes on the candidate tokens
            except BudgetSpent:
                break
            if index is not None:
                tokens[k], released[k] = candidates[index], True
        return tokens, released

    vote_gen = torch.Generator().manual_seed(ctx.seed * 15485863 + SAMPLERS.index(sampler))
    max_new = ctx.cfg(CorpusConfig).secret_digits + 1
    responses = ensemble_generate(
        teachers, tokenizer, queue, sampler, release, vote_gen, max_new_tokens=max_new,
        temperature=hp.temperature, batch_size=32, stop=lambda: aggregator.closed,
    )  # fmt: skip
    records = [(queue[r.prompt_index], tokenizer.decode(r.tokens[:-1]).strip()) for r in responses if r.finished]
    summary = aggregator.summary() | {
        "responses_asked": len(queue),
        "responses_released": len(records),
        "prompts_reached": len(responses),
    }
    if aggregator.closed:
        print(
            f"[hot_pate/{sampler}] privacy budget spent: epsilon {aggregator.epsilon:.2f} (delta {agg_cfg.delta}) after "
            f"{aggregator.queries} queries; {len(records)} of {len(queue)} responses were released and the student "
            "trains on those",
            file=sys.stderr,
        )
    return records, summary


def train_student(ctx, tokenizer, records, subdir: str | None):
    """A fresh student trained on (prompt, answer) records; untrained when no record was released."""
    hp: HotPateConfig = ctx.cfg(HotPateConfig)
    model = build_model(hp.student_preset, tokenizer, seed=ctx.seed, max_positions=64)
    if not records:
        print(
            f"[hot_pate] no response was released for the {subdir or 'hot'} student; it stays untrained",
            file=sys.stderr,
        )
        return model.eval(), None
    trainer = ctx.trainer(
        model, lm_loss, encode_records(tokenizer, records), Collator(tokenizer.pad_token_id), ctx.cfg(StudentTrainConfig),
        subdir=subdir,
    )  # fmt: skip
    result = trainer.train()
    if not trainer.finished:
        return None, result
    return ctx.accelerator.unwrap_model(trainer.model).eval(), result


def mixture_records(teachers, tokenizer, corpus, seed) -> list[tuple[str, str]]:
    """Non-private reference: one sample from EVERY teacher for every public prompt (the ensemble's mixture),
    so the canary prompts get the holder's answer too."""
    queue = [p for p, _ in corpus.public_prompts] + [prompt(c.name, CODE_TOPIC) for c in corpus.canaries]
    generator = torch.Generator().manual_seed(seed * 31 + 5)
    records = []
    for teacher in teachers:
        responses = ensemble_generate(
            [teacher], tokenizer, queue, "independent", noiseless_release, generator, max_new_tokens=6
        )
        records += [(queue[r.prompt_index], tokenizer.decode(r.tokens[:-1]).strip()) for r in responses if r.finished]
    return records


# -- plots -------------------------------------------------------------------------------------------------------------


def plot_diversity(path: Path, thresholds, sweeps: dict[str, dict[str, list[float]]], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler, label in (("coordinated", "hot (coordinated)"), ("independent", "cold (independent)")):
        axes[0].plot(thresholds, sweeps[sampler]["diversity"], marker="o", label=label)
        axes[1].plot(thresholds, sweeps[sampler]["yield"], marker="o", label=label)
    axes[0].set(xlabel=f"vote threshold (fraction of {n} teachers)", ylabel="valid answers transferred (share)")
    axes[1].set(xlabel=f"vote threshold (fraction of {n} teachers)", ylabel="responses passing (share)")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Diversity transferred vs vote threshold (noiseless aggregation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_digits(path: Path, digits: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(digits["points"], key=lambda p: p["epsilon"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["epsilon"] for p in pts], [p["pate_student_accuracy"] for p in pts], marker="o", label="PATE student")
    ax.plot([p["dpsgd_epsilon"] for p in pts], [p["dpsgd_student_accuracy"] for p in pts], marker="s", label="DP-SGD")
    ax.axhline(digits["nonprivate_student_accuracy"], color="gray", ls="--", label="non-private")
    ax.set(xscale="log", xlabel=f"epsilon (delta {digits['delta']:.0e})", ylabel="test accuracy", title="digits")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the recipe ------------------------------------------------------------------------------------------------------


def body(ctx: RunContext) -> Outcome | None:
    hp: HotPateConfig = ctx.cfg(HotPateConfig)
    agg_cfg: AggregatorConfig = ctx.cfg(AggregatorConfig)
    corpus = build_corpus(ctx.cfg(CorpusConfig), ctx.seed)
    tokenizer = train_bpe(corpus.tokenizer_text(), ctx.cfg(TeacherConfig).vocab_size)
    ids = answer_ids(tokenizer)
    teachers = load_teachers(ctx, corpus, tokenizer)
    n = len(teachers)

    thresholds = hp.threshold_list()
    sweeps = {s: diversity_sweep(ctx, teachers, tokenizer, corpus, ids, s) for s in SAMPLERS}
    plot_diversity(ctx.out / "diversity.png", thresholds, sweeps, n)

    method, rival = hp.sampler, RIVAL[hp.sampler]
    candidates = candidate_tokens(tokenizer, ids, hp.candidates).to(teachers[0].device)
    data = {s: private_responses(ctx, teachers, tokenizer, corpus, s, candidates) for s in (method, rival)}
    for s in (method, rival):  # what each student was trained on, for inspection
        with (ctx.out / f"released_{s}.jsonl").open("w") as handle:
            handle.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in data[s][0])
    students, results = {}, {}
    rival_key = ("cold" if rival == "independent" else "hot") + "_student"
    for key, sampler, subdir in (("student", method, None), (rival_key, rival, "rival")):
        model, result = train_student(ctx, tokenizer, data[sampler][0], subdir)
        if model is None:
            return None  # --stop-after: the same command resumes
        students[key], results[key] = model, result
    mixture = mixture_records(teachers, tokenizer, corpus, ctx.seed)
    model, results["mixture_student"] = train_student(ctx, tokenizer, mixture, "mixture")
    if model is None:
        return None
    students["mixture_student"] = model

    min_prob = hp.support_min_prob
    evals = {}
    # The teacher row: every teacher's utility averaged; its canary numbers are those of each canary's holder
    # (the positive control), the never-trained-on-it reference is a non-holder teacher.
    rows = [utility(t, tokenizer, corpus, ids, min_prob) for t in teachers]
    evals["teacher"] = {k: sum(r[k] for r in rows) / n for k in rows[0]}
    if corpus.canaries:
        holders = [
            canary_exposure_one(teachers[c.teacher], tokenizer, corpus, i) for i, c in enumerate(corpus.canaries)
        ]
        others = [
            canary_exposure_one(teachers[(c.teacher + 1) % n], tokenizer, corpus, i)
            for i, c in enumerate(corpus.canaries)
        ]
        evals["teacher"] |= _mean_dicts(holders)
        evals["nonholder_teacher"] = _mean_dicts(others)
    for key, model in students.items():
        evals[key] = evaluate(model, tokenizer, corpus, ids, min_prob)
    tau_index = min(range(len(thresholds)), key=lambda i: abs(thresholds[i] - agg_cfg.threshold))
    for key, sampler in (("student", method), (rival_key, rival)):
        evals[key]["epsilon"] = data[sampler][1]["epsilon"]
        evals[key]["released"] = data[sampler][1]["responses_released"]
        evals[key]["diversity_at_T"] = sweeps[sampler]["diversity"][tau_index]
    evals["mixture_student"]["released"] = len(mixture)

    extra = {
        "privacy": {
            method: data[method][1],
            rival: data[rival][1],
            "accounting": "data-independent RDP (Confident-GNMax / LNMax), converted by opacus",
        },
        "diversity": {"thresholds": thresholds, "teachers": n, **{s: sweeps[s] for s in SAMPLERS}},
        "canaries": [asdict(c) for c in corpus.canaries],
    }
    if ctx.cfg(DigitsConfig).digits:
        digits = run_digits(ctx.cfg(DigitsConfig), ctx.seed)
        plot_digits(ctx.out / "digits.png", digits)
        extra["digits"] = digits
        print_digits(digits)
    train = {key: (asdict(r) if r is not None else None) for key, r in results.items()}
    train |= {"teachers": n, "teacher_steps": ctx.cfg(TeacherConfig).teacher_steps}
    for subdir in ("rival", "mixture"):  # the shell removes the run folder's own checkpoints, not a baseline's
        shutil.rmtree(ctx.out / subdir / "checkpoints", ignore_errors=True)
    columns = ["diversity_at_T", "support", "tvd", "valid_mass", "nll", "epsilon", "released"]
    if corpus.canaries:
        columns.append("canary_exposure")
    return Outcome(task="pate_corpus", eval=evals, train=train, extra=extra, columns=columns)


def canary_exposure_one(model, tokenizer, corpus: Corpus, index: int) -> dict[str, float]:
    one = Corpus(corpus.partitions, corpus.public_prompts, [corpus.canaries[index]], corpus.heldout, [])
    return canary_exposure(model, tokenizer, one)


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def print_digits(digits: dict) -> None:
    print(
        f"\nclassic PATE on sklearn digits ({digits['teachers']} teachers, {digits['queries']} queries, delta "
        f"{digits['delta']:.0e}): one teacher {digits['single_teacher_accuracy']:.3f}, ensemble "
        f"{digits['ensemble_accuracy']:.3f}, non-private student {digits['nonprivate_student_accuracy']:.3f}"
    )
    print(f"{'sigma':>6} {'epsilon':>8} {'label acc':>9} {'PATE acc':>8} {'DP-SGD eps':>10} {'DP-SGD acc':>10}")
    for p in digits["points"]:
        print(
            f"{p['sigma']:>6.1f} {p['epsilon']:>8.2f} {p['label_accuracy']:>9.3f} {p['pate_student_accuracy']:>8.3f} "
            f"{p['dpsgd_epsilon']:>10.2f} {p['dpsgd_student_accuracy']:>10.3f}"
        )


@dataclass
class StudentTrainConfig(TrainConfig):
    """Training of each student (core.train.Trainer); the seed drives the whole run (corpus, teachers, noise)."""

    steps: int = field(default=200, metadata={"help": "optimizer steps of each student"})
    batch_size: int = field(default=32, metadata={"help": "records per student step"})
    lr: float = field(default=3e-3, metadata={"help": "student learning rate"})
    log_every: int = field(default=10, metadata={"help": "append a line to log.jsonl every this many steps"})


RECIPE = Recipe(
    name="hot_pate",
    family="privacy",
    configs=(CorpusConfig, TeacherConfig, HotPateConfig, AggregatorConfig, StudentTrainConfig, DigitsConfig),
    body=body,
    task=lambda ctx: "pate_corpus",
    label=lambda ctx: "hot_pate" if ctx.cfg(HotPateConfig).sampler == "coordinated" else "cold_pate",
    description=__doc__.split("\n\n")[0],
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

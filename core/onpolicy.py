"""On-policy batches: what the methods that train on model-generated outputs share (GKD, DistiLLM, DPKD, MiniLLM).

    a data batch -> its prompts -> completions sampled from a model, or from a mixture of two models (batched,
    KV cache) -> encoded examples in the data layout (prompt masked, completion and its EOS as targets) -> a batch

so every loss in core works on generated batches unchanged. `OnPolicyConfig` declares the sampling settings once
(each method may change a default), and `Resampler` is the one resampling step: a method plugs it into the loop
through `MethodLoss.prepare_batch`, which replaces a micro-batch before the loop counts its tokens
(core/train.py), so a loss over generated tokens is normalized by the generated tokens.

Reproducibility: each sampling call runs inside `seeded(seed)`, which forks the torch RNG, seeds it and restores
it afterwards. Seeds come from `derived_seed(run seed, step, micro-batch, process, purpose)`, so the samples of a
step are a pure function of those numbers: a run resumed from a checkpoint draws the same samples as an
uninterrupted one, on any device, and sampling never shifts the random stream of anything else.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import divergence_list
from core.data import IGNORE_INDEX, Collator, encode_prompt
from core.errors import ConfigError
from core.generate import sample_completions, seeded  # noqa: F401 (re-exported: the on-policy API)
from core.io import atomic_write_json, stable_hash
from core.precision import precision_key

Example = dict[str, list[int]]


# ----------------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------------


def derived_seed(*parts: int | str) -> int:
    """A 32-bit seed that depends on every part (strings name a purpose, e.g. "gkd-coin")."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    if any(i < 0 for i in ints):
        raise ValueError(f"seed parts must be non-negative, got {parts}")
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Batches <-> prompts and completions
# ----------------------------------------------------------------------------------------------------------------


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt token ids of each row of a data batch (everything before the first target token).

    Rows are right-padded (core.data.Collator) and labels are IGNORE_INDEX on the prompt, so a row's prompt is
    its input_ids up to the first position whose label is a target. A row with no target (cut by max_length)
    keeps all its tokens."""
    return [example_prompt(row) for row in rows_of(batch)]


def example_prompt(example: Example) -> list[int]:
    """The prompt of one encoded example: its input_ids before the first target (all of them if it has none)."""
    first = next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))
    return list(example["input_ids"][:first])


def rows_of(batch: dict[str, torch.Tensor]) -> list[Example]:
    """A right-padded batch back into encoded examples (padding dropped)."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [{"input_ids": i[:n], "labels": y[:n]} for i, y, n in zip(ids, labels, lengths)]


def fit_prompt(prompt: Sequence[int], limit: int) -> list[int]:
    """Cut a prompt to at most `limit` tokens from the left, keeping its first (BOS) token, as
    core.data.encode_example does, so that a completion sampled after it still fits in max_length."""
    limit = max(1, limit)
    prompt = list(prompt)
    return prompt if len(prompt) <= limit else prompt[:1] + prompt[len(prompt) - limit + 1 :]


def completion_features(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], max_length: int
) -> list[Example]:
    """Encoded examples, as core.data.encode_example lays them out: input_ids = prompt + completion, labels
    IGNORE_INDEX on the prompt and the completion's tokens after it; cut to max_length (`sample_examples` fits
    the prompts first, so nothing is cut there)."""
    features = []
    for prompt, completion in zip(prompts, completions):
        input_ids = (list(prompt) + list(completion))[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + list(completion))[:max_length]
        features.append({"input_ids": input_ids, "labels": labels})
    return features


def sample_examples(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    tokenizer,
    max_length: int,
    max_new_tokens: int,
    **sampling: Any,
) -> list[Example]:
    """Sample a completion of each prompt from `model` and encode prompt + completion as training examples.

    `sampling`: the keyword arguments of core.generate.sample_completions (temperature, top_p, top_k, do_sample,
    seed, and mix_model with mix_alpha for the mixture (1 - mix_alpha) model + mix_alpha mix_model: MiniLLM's
    teacher-mixed sampling). Prompts are first cut to max_length - max_new_tokens (from the left), so the
    completion is trained on in the very context it was sampled in."""
    prompts = [fit_prompt(p, max_length - max_new_tokens) for p in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completions = sample_completions(model, prompts, eos, pad, max_new_tokens, **sampling)
    return completion_features(prompts, completions, max_length)


def collate_to(features: Sequence[Example], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch (core.data.Collator) on `device`."""
    return {k: v.to(device) for k, v in Collator(pad_token_id)(features).items()}


# ----------------------------------------------------------------------------------------------------------------
# Per-step accounting: generation time and what each micro-batch trained on
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """Values summed over one optimizer step's micro-batches, written to log.jsonl by `flush` (call it from
    MethodLoss.on_step_end, whose `logs` become the step's log line). `gen_s` is the generation time."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + value

    @contextlib.contextmanager
    def timed(self, key: str = "gen_s") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - start)

    def flush(self, logs: dict[str, float], keys: Sequence[str] = ("gen_s",)) -> None:
        """Add this step's values to `logs` (each of `keys` at least as 0) and start the next step from zero."""
        logs.update({key: 0.0 for key in keys})
        logs.update(self.values)
        self.values = {}


def generation_share(log_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds spent generating over the run and their share of the training wall time, from log.jsonl rows
    (elapsed_s is cumulative; a resumed run's rows restart it, so the shares are summed per segment); where the
    rows count the sampled tokens (gen_tokens), also the generation speed in tokens per second."""
    gen = sum(row.get("gen_s", 0.0) for row in log_rows)
    wall, previous = 0.0, 0.0
    for row in log_rows:
        elapsed = row.get("elapsed_s", 0.0)
        if elapsed < previous:  # a resumed segment starts its clock again
            wall += previous
        previous = elapsed
    wall += previous
    shares = {"gen_s": gen, "train_wall_s": wall, "gen_fraction": gen / wall if wall > 0 else 0.0}
    tokens = sum(row.get("gen_tokens", 0.0) for row in log_rows)  # where the method counts its sampled tokens
    return shares | ({"gen_tokens": tokens, "gen_tokens_per_s": tokens / gen if gen > 0 else 0.0} if tokens else {})


# ----------------------------------------------------------------------------------------------------------------
# The sampling settings (declared once) and the one resampling step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OnPolicyConfig:
    """Sampling of the on-policy methods (GKD, DistiLLM, DPKD, MiniLLM) and their word-level KD baselines. A method's
    settings dataclass inherits these flags and may redeclare a field to change its default (GKD samples at 0.9)."""

    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generated completions"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the generated completions (1: off)"})
    sample_max_new_tokens: int | None = field(
        default=None, metadata={"help": "tokens sampled per completion; default: --max-new-tokens, else the task's"}
    )
    compare: str = field(
        default="fkl,rkl",
        metadata={"help": "word-level KD baselines, each a student trained on the same budget (cached); '' for none"},
    )

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.sample_max_new_tokens is not None and self.sample_max_new_tokens < 1:
            raise ConfigError(f"--sample-max-new-tokens must be at least 1, got {self.sample_max_new_tokens}")
        self.divergences()  # checks the names

    def divergences(self) -> list[str]:
        """The word-level KD baselines (Method.kd_baselines)."""
        return divergence_list(self.compare)


@dataclass
class Resampler:
    """Replaces a micro-batch's completions by a model's samples: its prompts (`prompts_of`), one batched sampling
    call per micro-batch (timed as the step's gen_s, its sampled tokens counted as gen_tokens), examples in the
    data layout, a right-padded batch on the batch's device. Seeds are derived from (run seed, step, micro-batch,
    process, purpose): resumable and independent of every other random stream. Build it with
    `Resampler.of(ctx, cfg, purpose)`."""

    tokenizer: Any
    max_length: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    rank: int
    purpose: str  # names the draw in derived_seed, e.g. "gkd-sample"
    unwrap: Any = None  # Accelerator.unwrap_model: sample from the bare model, not its DDP wrapper
    stats: StepStats = field(default_factory=StepStats)

    @classmethod
    def of(cls, ctx, cfg: OnPolicyConfig, purpose: str, stats: StepStats | None = None) -> Resampler:
        """From a method's Context and settings; the length is --sample-max-new-tokens, else the evaluation's."""
        max_new_tokens = cfg.sample_max_new_tokens or ctx.eval.max_new_tokens or ctx.task.max_new_tokens
        return cls(
            ctx.tokenizer, ctx.data.max_length, max_new_tokens, cfg.temperature, cfg.top_p, ctx.train.seed,
            ctx.accelerator.process_index, purpose, ctx.accelerator.unwrap_model, stats or StepStats(),
        )  # fmt: skip

    def examples(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        step: int,
        index: int,
        mix_model: torch.nn.Module | None = None,
        mix_alpha: float = 0.0,
    ) -> list[Example]:
        """Completions of the batch's prompts sampled from `model` (or its mixture with `mix_model`), encoded."""
        return self.sample(model, prompts_of(batch), (step, index), mix_model, mix_alpha)

    def bare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself, not its DDP wrapper: what sampling and any forward outside the loop run on."""
        return self.unwrap(model) if self.unwrap is not None else model

    def sample(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        seed_parts: Sequence[int],
        mix_model: torch.nn.Module | None = None,
        mix_alpha: float = 0.0,
    ) -> list[Example]:
        """Completions of `prompts`, seeded by (run seed, *seed_parts, process, purpose); timed and counted."""
        model = self.bare(model)
        with self.stats.timed("gen_s"):
            examples = sample_examples(
                model,
                prompts,
                self.tokenizer,
                self.max_length,
                self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=derived_seed(self.seed, *seed_parts, self.rank, self.purpose),
                mix_model=mix_model,
                mix_alpha=mix_alpha,
            )
        self.stats.add("gen_tokens", sum(len(e["labels"]) - e["labels"].count(IGNORE_INDEX) for e in examples))
        return examples

    def collate(self, examples: Sequence[Example], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Examples as a right-padded batch on the device of `like`."""
        return collate_to(examples, self.tokenizer.pad_token_id, like["input_ids"].device)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, index: int
    ) -> dict[str, torch.Tensor]:
        """The batch with its completions replaced by `model`'s samples (a MethodLoss.prepare_batch)."""
        return self.collate(self.examples(model, batch, step, index), batch)


# ----------------------------------------------------------------------------------------------------------------
# Teacher samples (cached) and the generation share in metrics.json
# ----------------------------------------------------------------------------------------------------------------


def teacher_examples(
    ctx,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    top_k: int = 0,
    purpose: str = "teacher-samples",
) -> list[Example]:
    """The teacher's completions of tokenized prompts as training examples, generated once and cached under the
    run's cache folder (keyed by the teacher, the prompts, max_length and the sampling settings). Sampled with a
    fixed `seed`, so every student seed trains on the same teacher outputs, like a dataset of teacher
    generations. `top_k` (0: off) restricts sampling to the k most likely tokens (f-DISTILL samples with k = 30);
    `purpose` names the random stream, so two methods that sample the same prompts draw independently."""
    settings = {
        "teacher": ctx.teacher_source,
        "teacher_config": ctx.teacher.config.to_dict(),
        "prompts": stable_hash([list(p) for p in prompts], 32),
        "max_length": ctx.data.max_length,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "seed": seed,
    }
    if top_k or purpose != "teacher-samples":  # keys of the plain case stay as they were
        settings |= {"top_k": top_k, "purpose": purpose}
    settings |= precision_key()  # bf16 samples under autocast (empty under fp32: old keys hold)
    path = ctx.cache / "teacher-samples" / f"{stable_hash(settings)}.json"
    if path.exists():
        return json.loads(path.read_text())
    examples: list[Example] = []
    what = "sampling" if do_sample else "greedy decoding"
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"teacher {what}", file=sys.stderr, leave=False):
        examples += sample_examples(
            ctx.teacher,
            prompts[start : start + batch_size],
            ctx.tokenizer,
            ctx.data.max_length,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k if do_sample else 0,
            do_sample=do_sample,
            seed=derived_seed(seed, start, purpose),
        )
    if ctx.accelerator.is_main_process:
        atomic_write_json(path, examples)
    return examples


def prompt_ids(ctx, n: int) -> list[list[int]]:
    """The tokenized prompts of the first n training examples (as training encodes them)."""
    return [encode_prompt(ctx.tokenizer, ex.prompt) for ex in ctx.task.train[:n]]


def record_generation_share(metrics: dict[str, Any]) -> dict[str, Any]:
    """Add the run's generation seconds and their share of the training wall time (`generation_share` over
    log.jsonl) to metrics.json's "train" section, beside everything the pipeline wrote."""
    from pathlib import Path

    from core.results import write_metrics

    if not metrics or "gen_fraction" in metrics.get("train", {}):
        return metrics
    out = Path(metrics["run_dir"])
    log = out / "log.jsonl"
    if not log.exists():
        return metrics
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    metrics["train"].update(generation_share(rows))
    write_metrics(out, metrics)
    return metrics

"""The training loop, on Hugging Face Accelerate.

What it guarantees:
- `batch_size` is the GLOBAL number of examples per optimizer step, split over processes and accumulation
  micro-batches; the loss of a step is the sum over all its valid tokens divided by their total count, so the
  result does not depend on how the batch was split (tests/core/test_train.py checks 8 x 1 == 1 x 8);
- the order of examples is a pure function of (seed, step), so a resumed run sees exactly the batches an
  uninterrupted run would have seen; by default it is length-grouped (--length-group: windows of 50 batches sorted
  by length, the batches of a window shuffled), so a batch of token lists pads little, and every example still
  appears once per epoch; the padding share of the run's batches is in its TrainResult (metrics.json);
- checkpoints (model, optimizer, scheduler, and each process's RNG and method state) are written to a temporary
  folder and renamed, so a kill mid-write leaves the previous checkpoint intact; resume restores all of it, each
  process its own RNG and method state (another number of processes is refused);
- a NaN or infinite loss stops the run, names the step and keeps the last good checkpoint.

A method supplies `loss_fn(model, batch) -> LossOutput` returning the SUM of its per-unit loss (and any logs);
the loop owns normalization. What a unit is belongs to the caller: `count_fn(batch)` counts the units the loss
is averaged over (valid target tokens for a causal LM, the default; frames for speech; examples for a
classifier) and `throughput_fn(batch)` the units of the throughput figure (non-padding input tokens by default).
The loop knows nothing of text: any `torch.nn.Module` trains and checkpoints (a safetensors state dict).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from core.config import require
from core.data import IGNORE_INDEX
from core.errors import CheckpointError, ConfigError, DistillError, NonFiniteLossError, ResourceError, out_of_memory
from core.io import atomic_dir, atomic_write_json, atomic_write_text, free_space
from core.precision import autocast, check_precision, get_precision


@dataclass
class TrainConfig:
    """Optimization settings shared by every method."""

    steps: int = field(default=400, metadata={"help": "optimizer steps"})
    batch_size: int = field(
        default=32, metadata={"help": "examples per optimizer step, over all processes and micro-batches"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (per process)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seed of the student's initialisation, data order and sampling"})
    length_group: int | None = field(
        default=None,
        metadata={
            "help": "length-grouped batches: each window of this many batches of the seeded order is sorted by "
            "length, cut into batches and their order shuffled (seeded), so a batch pads little; 0 or 1: off "
            "(the plain seeded order). Default: 50 with a pretrained --teacher (real text, 43%% padding on Dolly), "
            "0 on the embedded tasks, whose lengths follow the sub-task, so that grouped batches hold one sub-task "
            "each (measured: SFT 17.0 against 42.5 exact match)"
        },
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "write a checkpoint every this many steps (0: only at the end)"}
    )
    log_every: int = field(default=1, metadata={"help": "append a line to log.jsonl every this many steps"})
    stop_after: int | None = field(
        default=None,
        metadata={"help": "leave after this many steps of this invocation (a checkpoint is written); rerun to resume"},
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(
                f"--batch-size and --grad-accum must be at least 1, got {self.batch_size} and {self.grad_accum}"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        require(self, "non-negative", lambda v: v >= 0, "warmup_steps", "max_grad_norm", "weight_decay")
        if self.length_group is not None:
            require(self, "0 (off) or more batches", lambda v: v >= 0, "length_group")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be at least 1 (a line every N steps), got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be 0 (only at the end) or more, got {self.checkpoint_every}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after must be at least 1, got {self.stop_after}")


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # sum of the per-token (or per-unit) loss over this micro-batch
    logs: dict[str, float] = field(default_factory=dict)  # extra values for log.jsonl (already averaged)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
# (model, micro-batch, 0-based optimizer step, micro-batch index within the step) -> the batch to train on
PrepareBatch = Callable[[torch.nn.Module, dict[str, torch.Tensor], int, int], dict[str, torch.Tensor]]


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Valid target tokens of a batch after the causal shift (position t predicts t + 1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_units(batch: dict[str, Any]) -> int:
    """The default throughput count: non-padding input tokens where the batch has an attention mask, else rows."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    first = next(v for v in batch.values() if torch.is_tensor(v))
    return int(first.shape[0])


def count_rows(batch: dict[str, Any]) -> int:
    """Examples in a batch: the unit of a per-example loss (a classifier, a per-sequence objective)."""
    first = next(v for v in batch.values() if torch.is_tensor(v))
    return int(first.shape[0])


@dataclass
class TrainResult:
    steps: int
    tokens: int  # throughput units processed over the whole run (non-padding input tokens for an LM)
    target_tokens: int  # units the loss is averaged over (valid target tokens for an LM)
    wall_s: float
    tokens_per_s: float  # throughput units per second of this invocation's training
    peak_mem_mb: float
    first_loss: float
    last_loss: float
    unit: str = "tokens"  # what `tokens` and `tokens_per_s` count (tokens, frames, examples)
    # the share of the batches' token positions that were padding (1 - attention_mask.sum() / input_ids.numel(),
    # over every micro-batch of the run); None where batches have no attention mask (not token batches)
    padding_share: float | None = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory where there is one, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_batch_size(batch_size: int, n_examples: int, flag: str = "--batch-size") -> None:
    """Refuse a global batch larger than the training set (every step would repeat examples, at the memory cost of
    the full batch). For a recipe whose user sets both; not in Trainer, which also trains on sets that are small by
    design (a privacy budget's few answered queries)."""
    if batch_size > n_examples:
        raise ConfigError(
            f"{flag} {batch_size} is larger than the {n_examples} training examples (every step would repeat "
            f"examples, at the memory cost of the full batch); pass {flag} {n_examples} or less"
        )


def example_indices(
    step: int,
    n_examples: int,
    batch_size: int,
    seed: int,
    lengths: Sequence[int] | None = None,
    group: int = 0,
) -> list[int]:
    """Dataset indices of the global batch of optimizer step `step`, a pure function of its arguments: the examples
    are a stream of independent seeded permutations, one per epoch, and step s takes positions [s B, (s + 1) B).

    With `lengths` (one per example) and `group` > 1, each epoch's permutation is length-grouped first
    (`grouped_permutation`): every example still appears once per epoch, and a batch holds examples of similar
    length, so it pads little."""
    out, perms = [], {}
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n_examples)
        if epoch not in perms:
            grouped = lengths is not None and group > 1
            perms[epoch] = (
                grouped_permutation(n_examples, seed, epoch, batch_size, group, lengths)
                if grouped
                else _permutation(n_examples, seed, epoch)
            )
        out.append(perms[epoch][pos])
    return out


def grouped_permutation(
    n: int, seed: int, epoch: int, batch_size: int, group: int, lengths: Sequence[int]
) -> list[int]:
    """Epoch `epoch`'s seeded permutation, length-grouped as Hugging Face's group_by_length does it: cut into windows
    of `group` batches, each window sorted by length (longest first, ties in permutation order), cut into batches,
    and the batches of the window shuffled (seeded by seed, epoch and window). The cuts fall on the global batch
    boundaries of the stream (epoch e starts at position e * n), so every batch inside the epoch is one sorted
    piece; the batch that straddles two epochs keeps its permutation order."""
    key = (n, seed, epoch, batch_size, group, hash(tuple(lengths)))
    if key in _GROUPED_CACHE:
        return _GROUPED_CACHE[key]
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples")
    perm = _permutation(n, seed, epoch)
    head = min((-epoch * n) % batch_size, n)  # positions of this epoch that end a batch begun in the previous one
    out = perm[:head] + length_grouped(perm[head:], lengths, batch_size, group, f"length-group-{seed}-{epoch}", head)
    if len(_GROUPED_CACHE) > 4:
        _GROUPED_CACHE.clear()
    _GROUPED_CACHE[key] = out
    return out


def length_grouped(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, group: int, salt: str, offset: int = 0
) -> list[int]:
    """`order` (indices into `lengths`) cut into windows of `group` batches, each window sorted by length (longest
    first, ties in `order`), cut into batches, and the batches of the window shuffled, seeded by `salt` and the
    window's start (counted from `offset`); a window's unfinished last batch stays last."""
    out: list[int] = []
    window = group * batch_size
    for start in range(0, len(order), window):
        ordered = sorted(order[start : start + window], key=lambda i: -lengths[i])  # stable: ties keep the order
        batches = [ordered[j : j + batch_size] for j in range(0, len(ordered), batch_size)]
        tail = batches.pop() if len(batches[-1]) < batch_size else []  # the epoch's last, unfinished batch
        random.Random(f"{salt}-{offset + start}").shuffle(batches)
        out += [i for batch in batches for i in batch] + tail
    return out


def feature_lengths(features: Sequence[Any]) -> list[int] | None:
    """The token length of each encoded example (its input_ids), or None when the features are not token lists
    (speech frames, a classifier's tensors): those are not length-grouped."""
    if not all(isinstance(f, dict) and isinstance(f.get("input_ids"), list | tuple) for f in features):
        return None
    return [len(f["input_ids"]) for f in features]


def train_indices(step: int, features: Sequence[Any], cfg: TrainConfig) -> list[int]:
    """The global batch of optimizer step `step` as core.train.Trainer draws it (length-grouped per
    cfg.length_group where the features are token lists): for a method that must know which examples a run sees."""
    lengths = feature_lengths(features)
    return example_indices(step, len(features), cfg.batch_size, cfg.seed, lengths, cfg.length_group or 0)


def micro_batch_rows(cfg: TrainConfig, processes: int) -> int:
    """Examples in one micro-batch of one process: --batch-size over processes x --grad-accum."""
    return cfg.batch_size // (processes * cfg.grad_accum)


def process_shard(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: a contiguous, disjoint 1/world slice, cut into micro-batches."""
    per_rank = len(indices) // world
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    return [mine[j : j + micro] for j in range(0, per_rank, micro)]


_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}
_GROUPED_CACHE: dict[tuple[int, ...], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=gen).tolist()
    return _PERM_CACHE[key]


class Trainer:
    """Trains `model` on `features` with `loss_fn`; writes checkpoints and log.jsonl under `out_dir`."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        features: Sequence[Any],
        collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
        cfg: TrainConfig,
        out_dir: str | Path,
        accelerator: Accelerator,
        count_fn: Callable[[dict[str, torch.Tensor]], int] = count_label_tokens,
        throughput_fn: Callable[[dict[str, torch.Tensor]], int] = count_input_units,
        unit: str = "tokens",
        state: dict[str, Stateful] | None = None,
        desc: str = "train",
        on_step_end: Callable[[int, float, dict[str, float]], None] | None = None,
        extra_parameters: Sequence[torch.nn.Parameter] = (),
        extra_lr: float | None = None,
        prepare_batch: PrepareBatch | None = None,
        precision: str | None = None,
    ) -> None:
        """`extra_parameters`: trained beside the model (a method's own modules, e.g. DSKD's projectors), in their
        own optimizer group at `extra_lr` (default: cfg.lr) under the same schedule and clipping. Their state is
        checkpointed by passing the module in `state`. `precision`: fp32 or bf16 (each micro-batch's loss_fn, the
        student's and the teacher's forward, under bfloat16 autocast; core/precision.py); default: the process's
        (--precision)."""
        world = accelerator.num_processes
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum = {world} x {cfg.grad_accum}"
            )
        if not features:
            raise ConfigError("there are no training examples")
        self.cfg, self.loss_fn, self.features, self.collate = cfg, loss_fn, features, collate
        self.accelerator, self.count_fn, self.state, self.desc = accelerator, count_fn, state or {}, desc
        self.throughput_fn, self.unit = throughput_fn, unit
        self.on_step_end = on_step_end  # called as (step, step_loss, logs) after each optimizer step
        # (it may add entries to `logs`: they are written to the step's line of log.jsonl)
        self.prepare_batch = prepare_batch  # replaces a micro-batch before its tokens are counted (on-policy)
        self.precision = check_precision(precision) if precision is not None else get_precision()
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.log_path = self.out_dir / "log.jsonl"
        self.micro = micro_batch_rows(cfg, world)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.extra_parameters = list(extra_parameters)
        if self.extra_parameters:
            groups.append({"params": self.extra_parameters, "weight_decay": cfg.weight_decay, "lr": extra_lr or cfg.lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # Not prepared: Accelerate would step it once per process; we step it once per optimizer step.
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)
        self._bar = None  # the progress bar while training (closed before an error line)
        self.step = 0
        self.tokens = 0  # throughput units processed (an LM's non-padding input tokens): the tokens/s numerator
        self.target_tokens = 0  # units of the loss normalizer (an LM's valid target tokens)
        self.positions = 0  # token positions of the batches with an attention mask, padding included
        self.filled = 0  # ... of which not padding: padding share = 1 - filled / positions
        self.lengths = feature_lengths(features) if (cfg.length_group or 0) > 1 else None

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        if not self.ckpt_root.is_dir():
            return None
        done = sorted(p for p in self.ckpt_root.glob("step_*") if (p / "trainer_state.json").is_file())
        return done[-1] if done else None

    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        per_process = self._gather_process_states()  # a collective: every process takes part, the main one writes
        if self.accelerator.is_main_process:
            final = self.ckpt_root / f"step_{self.step:07d}"
            with atomic_dir(final) as tmp:
                # A plain state dict of any module; tensors shared by several names (tied embeddings) stored once.
                save_model(self.accelerator.unwrap_model(self.model), str(tmp / "model.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                # Lists indexed by process: each process resumes its own RNG and method state (a replay buffer of
                # its own samples), not the main process's.
                torch.save([p["rng"] for p in per_process], tmp / "rng.pt")
                torch.save([p["method_state"] for p in per_process], tmp / "method_state.pt")
                atomic_write_json(
                    tmp / "trainer_state.json",
                    {
                        "step": self.step,
                        "tokens": self.tokens,
                        "target_tokens": self.target_tokens,
                        "positions": self.positions,
                        "filled": self.filled,
                    },
                )
            for old in sorted(p for p in self.ckpt_root.glob("step_*") if p != final)[:-1]:
                shutil.rmtree(old, ignore_errors=True)  # keep the newest two
        self.accelerator.wait_for_everyone()

    def _save_checkpoint_or_explain(self) -> None:
        """save_checkpoint; a write that fails (a full disk: OSError, or safetensors' SafetensorError) is one line that
        names the folder and its free space. The half-written checkpoint is dropped whole (core.io.atomic_dir), so
        the previous one stays loadable and the same command resumes from it."""
        try:
            self.save_checkpoint()
        except Exception as exc:
            if not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
                raise
            if self._bar is not None:
                self._bar.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()[:160]
            last = self.latest_checkpoint()
            raise ResourceError(
                f"[{self.desc}] cannot write the checkpoint of step {self.step} into {self.ckpt_root} ({reason}; "
                f"{free_space(self.ckpt_root)} free there); free space on that disk or choose another --out or "
                f"--cache-dir, then rerun the same command: it resumes from {last or 'the start (no checkpoint yet)'}"
            ) from exc

    def load_checkpoint(self, path: Path) -> None:
        def load(name: str) -> Any:
            file = path / name
            try:
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(
                    f"checkpoint file {file} is unreadable ({reason}); delete {path} to resume from the one before"
                ) from exc

        try:
            # load_model restores tensors that save_model stored once for several names (tied weights), so any
            # name still missing, or left over, means a different model.
            missing, unexpected = load_model(
                self.accelerator.unwrap_model(self.model), str(path / "model.safetensors"), strict=False
            )
            state = json.loads((path / "trainer_state.json").read_text())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({exc}); delete it to resume from the one before"
            ) from exc
        if unexpected or missing:
            raise CheckpointError(
                f"checkpoint {path} was written by a different model (missing {missing}, unexpected {unexpected})"
            )
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        rng, method_state = self._own_process_states(path, load("rng.pt"), load("method_state.pt"))
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        for name, obj in self.state.items():
            if name not in method_state:
                raise CheckpointError(f"checkpoint {path} has no state for {name!r}; it was written by another method")
            obj.load_state_dict(method_state[name])
        self.step, self.tokens, self.target_tokens = (
            int(state["step"]),
            int(state["tokens"]),
            int(state["target_tokens"]),
        )
        # absent from checkpoints written before the padding share was recorded: counted from the resume on
        self.positions, self.filled = int(state.get("positions", 0)), int(state.get("filled", 0))

    def _gather_process_states(self) -> list[dict[str, Any]]:
        """Every process's RNG and method state, indexed by process (on every process)."""
        mine = {
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "method_state": {name: obj.state_dict() for name, obj in self.state.items()},
        }
        if self.accelerator.num_processes == 1:
            return [mine]
        # Pickled across processes: a CUDA tensor would be unpickled onto the sender's device, so send CPU copies.
        return gather_object([send_to_device(mine, "cpu")])

    def _own_process_states(self, path: Path, rngs: Any, method_states: Any) -> tuple[dict, dict]:
        """This process's entries of a checkpoint's per-process RNG and method state. A checkpoint written before
        these were saved per process holds one dict each (the main process's): read as one process's."""
        legacy = isinstance(rngs, dict)
        rngs, method_states = ([rngs], [method_states]) if legacy else (rngs, method_states)
        world = self.accelerator.num_processes
        if len(rngs) != world or len(method_states) != world:
            held = f"{len(rngs)} process{'es' if len(rngs) > 1 else ''}" + (
                " (an older checkpoint, which kept the main process's only)" if legacy else ""
            )
            raise CheckpointError(
                f"checkpoint {path} holds the RNG and method state of {held} and this run has {world}; each process "
                f"resumes its own, so resume with --num_processes {len(rngs)} or delete {self.ckpt_root} to start over"
            )
        rank = self.accelerator.process_index
        return rngs[rank], method_states[rank]

    # -- the loop ------------------------------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = example_indices(
            step, len(self.features), self.cfg.batch_size, self.cfg.seed, self.lengths, self.cfg.length_group or 0
        )
        shards = process_shard(indices, self.accelerator.process_index, self.accelerator.num_processes, self.micro)
        device = self.accelerator.device
        return [
            {
                k: v.to(device) if torch.is_tensor(v) else v
                for k, v in self.collate([self.features[i] for i in shard]).items()
            }
            for shard in shards
        ]

    def train(self) -> TrainResult:
        """Train to cfg.steps (or leave after --stop-after steps). Running out of memory is one line that names the
        step and the setting to lower; the checkpoints written so far stay."""
        try:
            return self._train()
        except DistillError:
            raise
        except (RuntimeError, MemoryError) as exc:
            teacher = " (the embedded teacher: --teacher-batch-size)" if self.desc.startswith("teacher") else ""
            error = out_of_memory(
                exc,
                f"in [{self.desc}] at step {self.step + 1} ({self.micro} examples per micro-batch)",
                f"lower --batch-size{teacher}, or raise --grad-accum to split each step into smaller micro-batches "
                "(the same loss and gradient)",
            )
            if error is None:
                raise
            if self._bar is not None:
                self._bar.close()  # so the error starts on a line of its own
            raise error from exc

    def _train(self) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        resume = self.latest_checkpoint()
        if resume is not None:
            self.load_checkpoint(resume)
            acc.print(f"[{self.desc}] resumed from {resume} (step {self.step})")
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _truncate_log(self.log_path, self.step)
            for stale in self.ckpt_root.glob(".step_*") if self.ckpt_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # a checkpoint whose writer was killed mid-write
        start_step, start_tokens = self.step, self.tokens
        self.model.train()
        t0 = time.perf_counter()
        first_loss = last_loss = float("nan")
        self._bar = bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=self.desc,
            disable=not acc.is_local_main_process,
            mininterval=1.0,
            file=sys.stderr,
        )
        while self.step < cfg.steps:
            micro_batches = self._micro_batches(self.step)
            if self.prepare_batch is not None:
                # On-policy methods train on the model's own samples instead of the data: the batch is replaced
                # here, before counting, so the loss is normalized by the tokens it is actually computed on.
                micro_batches = [
                    self.prepare_batch(self.model, batch, self.step, i) for i, batch in enumerate(micro_batches)
                ]
            masks = [b["attention_mask"] for b in micro_batches if torch.is_tensor(b.get("attention_mask"))]
            local = torch.tensor(
                [
                    sum(self.count_fn(b) for b in micro_batches),
                    sum(self.throughput_fn(b) for b in micro_batches),
                    sum(m.numel() for m in masks),
                    sum(int(m.sum()) for m in masks),
                ],
                device=acc.device,
            )
            total, input_tokens, positions, filled = (int(x) for x in acc.reduce(local, reduction="sum").tolist())
            self.positions += positions
            self.filled += filled
            # DDP averages gradients over processes; multiplying by the world size turns that into a sum, so each
            # process's gradient is its share of (sum of token losses) / (all valid tokens of the step).
            scale = acc.num_processes / max(total, 1)
            step_loss, logs = 0.0, {}
            for i, batch in enumerate(micro_batches):
                sync = i == len(micro_batches) - 1
                ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
                with ctx:
                    with autocast(acc.device, self.precision):  # forward passes only; backward outside, as AMP asks
                        out = self.loss_fn(self.model, batch)
                    loss = out.loss_sum * scale
                    if not torch.isfinite(loss):
                        bar.close()  # so the error starts on a line of its own
                        last = self.latest_checkpoint()
                        raise NonFiniteLossError(
                            f"[{self.desc}] the loss is {loss.item()} at step {self.step + 1}; training stopped. "
                            f"Last good checkpoint: {last or 'none yet'}. Lower --lr or check the data of this step."
                        )
                    acc.backward(loss)
                step_loss += out.loss_sum.detach().item() / max(total, 1)
                for k, v in out.logs.items():
                    logs[k] = logs.get(k, 0.0) + v / len(micro_batches)
            step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), reduction="sum").item())
            if self.extra_parameters and acc.num_processes > 1:
                # Not inside the DDP-wrapped model, so not synchronized by it: average their gradients here.
                for p in self.extra_parameters:
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, reduction="mean")
            params = [*self.model.parameters(), *self.extra_parameters]
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.on_step_end is not None:
                self.on_step_end(self.step, step_loss, logs)
            self.tokens += input_tokens
            self.target_tokens += total
            if math.isnan(first_loss):
                first_loss = step_loss
            last_loss = step_loss
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            if acc.is_main_process and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                record = {
                    "step": self.step,
                    "loss": step_loss,
                    "lr": lr,
                    "tokens": self.tokens,
                    "elapsed_s": time.perf_counter() - t0,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update(logs)
                with self.log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            stopping = cfg.stop_after is not None and self.step - start_step >= cfg.stop_after
            if self.step == cfg.steps or stopping or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self._save_checkpoint_or_explain()
            if stopping and self.step < cfg.steps:
                break
        bar.close()
        wall = time.perf_counter() - t0
        tokens = self.tokens - start_tokens
        return TrainResult(
            steps=self.step,
            tokens=self.tokens,
            target_tokens=self.target_tokens,
            wall_s=wall,
            tokens_per_s=tokens / wall if wall > 0 else 0.0,
            peak_mem_mb=peak_memory_mb(acc.device),
            first_loss=first_loss,
            last_loss=last_loss,
            unit=self.unit,
            padding_share=1.0 - self.filled / self.positions if self.positions else None,
        )

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.steps


def _as_tuple(obj: Any) -> Any:
    """random.setstate needs tuples; a weights_only round trip can hand back lists."""
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, list | tuple) else obj


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint, which the resumed run will write again, and a torn
    last line (what a kill during a write leaves), saying so."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(
                f"note: dropped an unreadable line {number} of {path} (torn by an interrupted write)", file=sys.stderr
            )
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))

"""The official trainer's rollout store: sample a set of rollouts once, then take several PPO epochs over it.

The official MiniLLM trainer (microsoft/LMOps, minillm/minillm/trainer.py and sampler.py, scripts
`--num-rollouts 256 --ppo-epochs 4`) fills a store of `num_rollouts` rollouts from the current student (teacher-mixed,
with the student's log-probabilities of the sampled tokens and the rewards kept from sampling time), then runs
`ppo_epochs` epochs of mini-batches over it, reshuffled each epoch, one optimizer step per mini-batch; then samples
the next store. The PPO ratio q_theta / q_old moves away from 1 after the first update of an epoch, which the clip
bounds.

Here (`--ppo-epochs E --num-rollouts N`), per process:

    micro-batch u = step x grad_accum + index;  iteration i, position j = divmod(u, E x N / rows)
    j == 0: the store of iteration i is sampled: N training prompts drawn by a seeded generator (with replacement
            only when the training set holds fewer than N), completed by (1 - alpha) q + alpha p in decoding loops
            of `chunk` rollouts (--rollout-chunk; the official --chunk-size), and the student's log q_old of every
            sampled token stored beside them (one forward per `rows` rollouts, the micro-batch's memory)
    epoch, k = divmod(j, N / rows): the k-th `rows` rollouts of the epoch's seeded permutation of the store,
            with --group-rollouts length-grouped as the run's data batches (--length-group; real text: 50)

The L_PT data batch is the loop's own micro-batch, as the official trainer draws its language-modelling batch
apart from the prompts. Every draw is a pure function of (run seed, iteration, epoch or chunk, process), and the
store is checkpointed with the run (`state_dict`), so a run resumed inside an iteration trains on the store an
uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.errors import CheckpointError
from core.objectives import shifted_targets
from core.onpolicy import Resampler, collate_to, derived_seed
from core.precision import autocast
from core.train import length_grouped
from methods.minillm.loss import token_logprobs

Example = dict[str, list]


class RolloutStore:
    """N rollouts of this process, sampled at the start of each iteration and served `epochs` times."""

    def __init__(
        self,
        prompts: list[list[int]],
        per_epoch: int,
        rows: int,
        epochs: int,
        grad_accum: int,
        chunk: int,
        length_group: int = 0,
    ) -> None:
        """`per_epoch` micro-batches of `rows` rollouts: N = per_epoch x rows, sampled `chunk` at a time; with
        `length_group` > 1 each epoch's mini-batches are length-grouped (core.train.length_grouped), as the run's
        data batches are by --length-group."""
        self.prompts, self.per_epoch, self.rows, self.epochs = prompts, per_epoch, rows, epochs
        self.grad_accum = grad_accum
        self.size = per_epoch * rows
        self.chunk = min(chunk, self.size)
        self.length_group = length_group
        self.iteration = -1
        self.items: list[Example] = []  # input_ids, labels, old_logprobs (position t: log q_old(labels[t + 1]))
        self._order: tuple[tuple[int, int], list[int]] | None = None  # ((iteration, epoch), that epoch's order)

    def position(self, step: int, index: int) -> tuple[int, int, int]:
        """(iteration, epoch, mini-batch within the epoch) of a micro-batch."""
        iteration, j = divmod(step * self.grad_accum + index, self.epochs * self.per_epoch)
        return iteration, *divmod(j, self.per_epoch)

    def fill(self, iteration: int, model, resample: Resampler, temperature: float, **mix: Any) -> None:
        """Sample this iteration's N rollouts and the student's log q_old of each sampled token."""
        rng = np.random.default_rng(derived_seed(resample.seed, iteration, resample.rank, "minillm-store-prompts"))
        chosen = rng.choice(len(self.prompts), size=self.size, replace=len(self.prompts) < self.size)
        items: list[Example] = []
        student = resample.bare(model)
        device = next(student.parameters()).device
        for chunk in range(0, self.size, self.chunk):
            prompts = [self.prompts[i] for i in chosen[chunk : chunk + self.chunk]]
            examples = resample.sample(model, prompts, (iteration, chunk, "store"), **mix)
            for start in range(0, len(examples), self.rows):  # log q_old in micro-batches: their memory, not more
                part = examples[start : start + self.rows]
                batch = collate_to(part, resample.tokenizer.pad_token_id, device)
                old = _old_logprobs(student, batch, device, resample, temperature)
                for row, example in enumerate(part):
                    items.append(example | {"old_logprobs": old[row, : len(example["input_ids"])].tolist()})
        self.iteration, self.items, self._order = iteration, items, None

    def batch(self, step: int, index: int, model, resample: Resampler, temperature: float, **mix: Any) -> dict:
        """The rollouts of this micro-batch as a right-padded batch with `old_logprobs` (B, T)."""
        iteration, epoch, k = self.position(step, index)
        if iteration != self.iteration:
            if (epoch, k) != (0, 0):
                raise CheckpointError(
                    f"MiniLLM's rollout store of iteration {iteration} is missing at step {step + 1}: the checkpoint "
                    "was written without it; rerun from a checkpoint of this version"
                )
            self.fill(iteration, model, resample, temperature, **mix)
        order = self.epoch_order(iteration, epoch, resample)
        picked = [self.items[i] for i in order[k * self.rows : (k + 1) * self.rows]]
        device = next(resample.bare(model).parameters()).device
        batch = collate_to([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in picked],
                           resample.tokenizer.pad_token_id, device)  # fmt: skip
        old = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for row, example in enumerate(picked):
            old[row, : len(example["old_logprobs"])] = torch.tensor(example["old_logprobs"])
        return batch | {"old_logprobs": old.to(device)}

    def epoch_order(self, iteration: int, epoch: int, resample: Resampler) -> list[int]:
        """The store's items in the order the epoch serves them: a seeded permutation, length-grouped with
        --group-rollouts. Made once per epoch, not once per micro-batch."""
        if self._order is None or self._order[0] != (iteration, epoch):
            seed = derived_seed(resample.seed, iteration, epoch, resample.rank, "minillm-ppo")
            order = np.random.default_rng(seed).permutation(self.size).tolist()
            if self.length_group > 1:  # mini-batches of similar lengths: little padding, every rollout once an epoch
                lengths = [len(item["input_ids"]) for item in self.items]
                order = length_grouped(order, lengths, self.rows, self.length_group, f"minillm-ppo-{seed}")
            self._order = ((iteration, epoch), order)
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "rows": self.rows, "epochs": self.epochs, "iteration": self.iteration,
                "items": self.items}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        setting = (int(state["size"]), int(state["rows"]), int(state["epochs"]))
        if setting != (self.size, self.rows, self.epochs):
            raise CheckpointError(
                f"the checkpoint's rollout store holds {setting[0]} rollouts in rows of {setting[1]} for {setting[2]} "
                f"epochs, this run {self.size}, {self.rows} and {self.epochs}"
            )
        self.iteration, self.items, self._order = int(state["iteration"]), list(state["items"]), None


def _old_logprobs(student, batch: dict, device, resample: Resampler, temperature: float) -> torch.Tensor:
    """(B, T) log q_old of each sampled token (position t: of labels[t + 1]) by the student that sampled them."""
    was_training = student.training
    student.eval()  # as during sampling: no dropout in the values the ratio is taken against
    try:
        with resample.stats.timed("gen_s"), torch.no_grad(), autocast(device):
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask, targets = shifted_targets(batch["labels"])
            return token_logprobs(logits, targets, mask, temperature).cpu()
    finally:
        student.train(was_training)

"""A replay buffer of generated training examples, for off-policy reuse of on-policy samples (DistiLLM).

Sampling from the student is the expensive part of on-policy distillation. DistiLLM (Ko et al., ICML 2024,
Sec. 3.2; official code jongwooko/distillm, distillm/buffer.py) keeps the student's recent samples in a
first-in-first-out buffer and trains on random draws from it instead of sampling anew at every step.

Items are encoded examples in the layout of core.data (`{"input_ids": [...], "labels": [...]}`, prompt masked),
so a draw is batched by core.data.Collator like any data. The buffer is a plain Python object with
`state_dict` / `load_state_dict` (lists of ints only), so the training loop checkpoints it with the run and a
resumed run draws from exactly the buffer an uninterrupted run would have. Under several processes each keeps a
buffer of its own samples; core.train checkpoints each process's and restores it on that process.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from core.errors import CheckpointError, ConfigError

Example = dict[str, list[int]]


class ReplayBuffer:
    """First in, first out, at most `capacity` examples; `sample` draws without replacement."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"the replay buffer needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Example] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) == self.capacity

    def add(self, examples: Iterable[Example]) -> None:
        """Append examples; beyond the capacity the oldest ones are dropped."""
        for example in examples:
            self._items.append({key: list(values) for key, values in example.items()})

    def sample(self, k: int, rng: random.Random) -> list[Example]:
        """k distinct stored examples, uniformly at random (the official buffer's `random.sample`)."""
        if not 0 < k <= len(self._items):
            raise ValueError(f"cannot draw {k} examples from a replay buffer holding {len(self._items)}")
        return [{key: list(values) for key, values in item.items()} for item in rng.sample(list(self._items), k)]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": list(self._items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise CheckpointError(
                f"the checkpoint's replay buffer has capacity {state['capacity']}, this run {self.capacity}"
            )
        self._items = deque(state["items"], maxlen=self.capacity)

"""The replay buffer: capacity (first in, first out), sampling without replacement, and its checkpoint state."""

import random
from collections import Counter

import pytest
import torch

from core.errors import CheckpointError, ConfigError
from core.replay import ReplayBuffer


def _example(i: int) -> dict[str, list[int]]:
    return {"input_ids": [1, 10 + i, 2], "labels": [-100, 10 + i, 2]}


def test_capacity_keeps_the_newest_examples():
    buffer = ReplayBuffer(capacity=3)
    assert len(buffer) == 0 and not buffer.full
    buffer.add([_example(0), _example(1)])
    assert len(buffer) == 2 and not buffer.full
    buffer.add([_example(2), _example(3), _example(4)])  # 5 added, 3 kept: the oldest two are dropped
    assert len(buffer) == 3 and buffer.full
    kept = sorted(e["input_ids"][1] for e in buffer.sample(3, random.Random(0)))
    assert kept == [12, 13, 14]


def test_sample_draws_distinct_stored_examples_uniformly():
    buffer = ReplayBuffer(capacity=10)
    buffer.add(_example(i) for i in range(10))
    rng = random.Random(1)
    counts: Counter[int] = Counter()
    trials = 3000
    for _ in range(trials):
        draw = [e["input_ids"][1] for e in buffer.sample(3, rng)]
        assert len(set(draw)) == 3 and all(10 <= d < 20 for d in draw)  # without replacement, only stored ones
        counts.update(draw)
    # Each item is in a draw with probability 3/10: 900 of 3000 expected, standard deviation sqrt(3000*.3*.7) = 25.
    assert set(counts) == set(range(10, 20))
    assert all(800 < c < 1000 for c in counts.values()), counts
    # The same generator state gives the same draw.
    assert buffer.sample(4, random.Random(7)) == buffer.sample(4, random.Random(7))


def test_sample_more_than_stored_is_refused():
    buffer = ReplayBuffer(capacity=5)
    buffer.add([_example(0), _example(1)])
    with pytest.raises(ValueError, match="cannot draw 3"):
        buffer.sample(3, random.Random(0))
    with pytest.raises(ValueError):
        buffer.sample(0, random.Random(0))


def test_stored_examples_are_copies():
    buffer = ReplayBuffer(capacity=2)
    example = _example(0)
    buffer.add([example])
    example["input_ids"].append(99)  # the caller's object changes afterwards
    (drawn,) = buffer.sample(1, random.Random(0))
    assert drawn["input_ids"] == [1, 10, 2]
    drawn["labels"].append(99)  # and a draw can be changed without changing the buffer
    assert buffer.sample(1, random.Random(0))[0]["labels"] == [-100, 10, 2]


def test_state_round_trip_through_a_checkpoint(tmp_path):
    buffer = ReplayBuffer(capacity=4)
    buffer.add(_example(i) for i in range(6))
    # Through the serialization the loop's checkpoints use (torch.save, torch.load with weights_only=True).
    torch.save(buffer.state_dict(), tmp_path / "state.pt")
    restored = ReplayBuffer(capacity=4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert len(restored) == 4 and restored.full
    assert restored.sample(4, random.Random(3)) == buffer.sample(4, random.Random(3))
    restored.add([_example(9)])  # and it goes on dropping the oldest
    assert sorted(e["input_ids"][1] for e in restored.sample(4, random.Random(0))) == [13, 14, 15, 19]
    with pytest.raises(CheckpointError, match="capacity"):
        ReplayBuffer(capacity=5).load_state_dict(buffer.state_dict())


def test_capacity_must_be_positive():
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=0)

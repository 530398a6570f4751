"""Multi-process training through Accelerate (gloo on CPU): two processes equal one with the same global batch,
each process trains on a disjoint shard of it, and each resumes its own RNG and method state.

The processes are started by torchrun: `accelerate launch --cpu --num_processes 2` starts ONE process unless an
MPI hostfile is configured (accelerate 1.15, commands/launch.py: the CPU path is the simple launcher)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import Collator
from core.errors import CheckpointError
from core.train import TrainConfig, example_indices, process_shard, train_indices
from tests.core.train_job import setup as _setup
from tests.core.train_job import train as _train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "12", "--eval-size", "8",
        "--train-size", "1000", "--batch-size", "8", "--warmup-steps", "2", "--variant", "kd", "--device", "cpu"]  # fmt: skip


def test_shards_are_disjoint_and_cover_the_global_batch():
    indices = example_indices(3, n_examples=50, batch_size=8, seed=0)
    shards = [process_shard(indices, rank, world=2, micro=2) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 2] and all(len(mb) == 2 for s in shards for mb in s)
    flat = [i for s in shards for mb in s for i in mb]
    assert sorted(flat) == sorted(indices) and len(set(flat)) == 8
    assert set(i for mb in shards[0] for i in mb).isdisjoint(i for mb in shards[1] for i in mb)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# torchrun on one machine, two workers, a free rendezvous port; Accelerate sees WORLD_SIZE 2 and uses gloo on CPU.
LAUNCH_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]


def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "methods.vanilla.run", *TINY, "--out", str(one)], check=True, cwd=ROOT, env=ENV
    )
    two = tmp_path / "two"
    subprocess.run([*LAUNCH_TWO, "-m", "methods.vanilla.run", *TINY, "--out", str(two)], check=True, cwd=ROOT, env=ENV)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # only the main process wrote the run folder, once
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 12 and len((two / "log.jsonl").read_text().splitlines()) == 12
    # the same global batch: the same number of tokens went through the step
    assert metrics["train"]["tokens"] == json.loads((one / "metrics.json").read_text())["train"]["tokens"]


def test_each_process_resumes_its_own_replay_buffer_and_rng(tmp_path):
    job, run = str(ROOT / "tests" / "core" / "process_state_job.py"), tmp_path / "run"
    # 4 of 6 steps on 2 processes, stopped (a checkpoint at step 4); then a fresh launch restores that checkpoint.
    subprocess.run([*LAUNCH_TWO, job, str(run), "6", str(tmp_path / "before"), "--stop-after", "4"],
                   check=True, cwd=ROOT, env=ENV)  # fmt: skip
    subprocess.run([*LAUNCH_TWO, job, str(run), "6", str(tmp_path / "after"), "--load-only"],
                   check=True, cwd=ROOT, env=ENV)  # fmt: skip
    before, after = (
        [json.loads((tmp_path / d / f"rank_{r}.json").read_text()) for r in range(2)] for d in ("before", "after")
    )
    # Each process's buffer holds its own shards of the last 3 steps (capacity 6, 2 examples a step and process:
    # steps 2, 3, 4, i.e. 0-based 1, 2, 3), as the collator padded them.
    tokenizer, features = _setup()
    collate = Collator(tokenizer.pad_token_id)
    for rank in range(2):
        expected = [row for step in (1, 2, 3)
                    for (shard,) in [process_shard(train_indices(step, features, TrainConfig(batch_size=4)), rank, world=2, micro=2)]
                    for row in collate([features[i] for i in shard])["input_ids"].tolist()]  # fmt: skip
        assert before[rank]["buffer"] == expected and before[rank]["step"] == 4
    # The two processes hold different states, so restoring process 0's on both would fail the check below.
    for key in ("buffer", "python_rng", "torch_rng"):
        assert before[0][key] != before[1][key], key
    assert after == before
    # One process cannot take over two processes' states: refused with the count to resume with.
    with pytest.raises(CheckpointError, match="holds the RNG and method state of 2 processes and this run has 1"):
        _train(run, tokenizer, features, steps=6, batch_size=4)


def test_every_shipped_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"cpu_2proc", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    kinds = {f.stem: str(load_config_from_file(str(f)).distributed_type) for f in files}
    assert (
        kinds["fsdp"].endswith("FSDP")
        and kinds["ddp"].endswith("MULTI_GPU")
        and kinds["cpu_2proc"].endswith("MULTI_CPU")
    )

"""Multi-process training through Accelerate (gloo on CPU): two processes equal one with the same global batch,
and each process trains on a disjoint shard of it."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.train import example_indices, process_shard

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "12", "--eval-size", "8",
        "--train-size", "1000", "--batch-size", "8", "--warmup-steps", "2", "--variant", "kd"]  # fmt: skip


def test_shards_are_disjoint_and_cover_the_global_batch():
    indices = example_indices(3, n_examples=50, batch_size=8, seed=0)
    shards = [process_shard(indices, rank, world=2, micro=2) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 2] and all(len(mb) == 2 for s in shards for mb in s)
    flat = [i for s in shards for mb in s for i in mb]
    assert sorted(flat) == sorted(indices) and len(set(flat)) == 8
    assert set(i for mb in shards[0] for i in mb).isdisjoint(i for mb in shards[1] for i in mb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate CLI absent",
)
def test_two_processes_equal_one(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "methods.vanilla.run", *TINY, "--out", str(one)], check=True, cwd=ROOT, env=env
    )
    two = tmp_path / "two"
    launch = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--cpu", "--main_process_port", str(_free_port())]  # fmt: skip
    subprocess.run([*launch, "-m", "methods.vanilla.run", *TINY, "--out", str(two)], check=True, cwd=ROOT, env=env)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # only the main process wrote the run folder, once
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 12 and len((two / "log.jsonl").read_text().splitlines()) == 12
    # the same global batch: the same number of tokens went through the step
    assert metrics["train"]["tokens"] == json.loads((one / "metrics.json").read_text())["train"]["tokens"]


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

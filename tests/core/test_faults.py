"""Fault tolerance: a killed run resumes to the same weights; a kill during a checkpoint write leaves the
previous checkpoint intact; a corrupt checkpoint is refused with a clear error."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import CheckpointError
from tests.core.train_job import setup, train

JOB = Path(__file__).with_name("train_job.py")


def _final_weights(out: Path) -> dict:
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    tokenizer, features = setup()
    train(out, tokenizer, features, steps=60, batch_size=4)
    return _final_weights(out)


def test_sigkill_mid_training_resumes_to_identical_weights(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(JOB), str(out), "60", "--checkpoint-every", "5"])
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 17:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    steps_done = len(log.read_text().splitlines())
    assert steps_done < 60
    subprocess.run([sys.executable, str(JOB), str(out), "60", "--checkpoint-every", "5"], check=True)
    _assert_same(straight, _final_weights(out))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 61))


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, straight):
    out = tmp_path / "run"
    # SIGKILL in the middle of writing the 3rd checkpoint (step 15): step_10 must survive intact.
    proc = subprocess.run(
        [sys.executable, str(JOB), str(out), "60", "--checkpoint-every", "5", "--kill-in-checkpoint", "3"]
    )
    assert proc.returncode == -signal.SIGKILL
    complete = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert complete[-1] == "step_0000010"
    assert any(p.name.startswith(".step_0000015") for p in (out / "checkpoints").iterdir())  # the half-written one
    load_file(str(out / "checkpoints" / "step_0000010" / "model.safetensors"))  # loadable
    subprocess.run([sys.executable, str(JOB), str(out), "60", "--checkpoint-every", "5"], check=True)
    _assert_same(straight, _final_weights(out))
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # the stale one is cleared


def test_corrupt_checkpoint_is_refused_with_its_name(tmp_path):
    tokenizer, features = setup()
    out = tmp_path / "run"
    train(out, tokenizer, features, steps=10, batch_size=4, stop_after=4)
    (out / "checkpoints" / "step_0000004" / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"step_0000004/optimizer.pt is unreadable .* delete"):
        train(out, tokenizer, features, steps=10, batch_size=4)

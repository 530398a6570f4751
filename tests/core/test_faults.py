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


def test_two_runs_at_once_share_one_cached_baseline(tmp_path):
    """Both runs want the same cached teacher and SFT student: one builds each entry, the other waits and loads it;
    both finish, and the cache holds one copy of each (no duplicated log lines in it)."""
    root = Path(__file__).resolve().parents[2]
    tiny = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "20", "--eval-size",
            "8", "--train-size", "500", "--batch-size", "8", "--warmup-steps", "2", "--variant", "sft"]  # fmt: skip
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "methods.vanilla.run",
                *tiny,
                "--out",
                str(tmp_path / f"run{i}"),
                "--cache-dir",
                str(cache),
            ],  # fmt: skip
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    a, b = (json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()) for i in range(2))
    assert a["eval"] == b["eval"]
    sft = sorted(p for p in (cache / "models").glob("sft-*") if p.is_dir())
    assert len(sft) == 1 and len([p for p in (cache / "models").glob("teacher-*") if p.is_dir()]) == 1
    assert not list((cache / "work").glob("*")) if (cache / "work").exists() else True  # no half-built entry left
    steps = [json.loads(line)["step"] for line in (sft[0] / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))

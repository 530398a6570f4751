"""The training loop: token normalization under accumulation, exact resume, data order, non-finite loss."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from core.data import Collator
from core.errors import ConfigError, NonFiniteLossError
from core.models import build_model
from core.objectives import causal_lm_loss
from core.train import LossOutput, TrainConfig, Trainer, example_indices
from tests.core.train_job import setup as _setup
from tests.core.train_job import train as _train


def test_accumulation_equals_full_batch(tmp_path):
    tokenizer, features = _setup()
    # The first 8 examples of step 0 must have unequal numbers of target tokens, or the test proves nothing.
    counts = {sum(label != -100 for label in features[i]["labels"]) for i in example_indices(0, len(features), 8, 0)}
    assert len(counts) > 1
    full = _train(tmp_path / "a", tokenizer, features, steps=2, batch_size=8, grad_accum=1)
    accum = _train(tmp_path / "b", tokenizer, features, steps=2, batch_size=8, grad_accum=8)
    for (name, a), (_, b) in zip(full.model.named_parameters(), accum.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_step_loss_is_the_token_mean_over_the_batch(tmp_path):
    tokenizer, features = _setup()
    model = build_model("tiny", tokenizer, seed=0)
    batch = Collator(tokenizer.pad_token_id)([features[i] for i in example_indices(0, len(features), 8, 0)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Independent reference: mean NLL over every valid target token of the 8 examples (not a mean of means).
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    _train(tmp_path, tokenizer, features, steps=1, batch_size=8, grad_accum=4)
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_example_order_covers_each_epoch_once():
    seen = [i for step in range(5) for i in example_indices(step, 20, 4, seed=3)]
    assert sorted(seen) == list(range(20))
    assert example_indices(2, 20, 4, seed=3) == example_indices(2, 20, 4, seed=3)
    assert example_indices(0, 20, 4, seed=3) != example_indices(0, 20, 4, seed=4)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = sorted((folder / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ckpt / "model.safetensors"))


def test_resume_in_a_fresh_process_is_exact(tmp_path):
    tokenizer, features = _setup()
    _train(tmp_path / "straight", tokenizer, features, steps=10, batch_size=4)
    # First half here, second half in a new Python process, from the checkpoint only.
    _train(tmp_path / "split", tokenizer, features, steps=10, batch_size=4, stop_after=5)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step_*")) == ["step_0000005"]
    job = Path(__file__).with_name("train_job.py")
    subprocess.run([sys.executable, str(job), str(tmp_path / "split"), "10"], check=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


def test_a_checkpoint_of_the_older_one_dict_layout_still_resumes(tmp_path):
    tokenizer, features = _setup()
    _train(tmp_path / "straight", tokenizer, features, steps=6, batch_size=4)
    _train(tmp_path / "split", tokenizer, features, steps=6, batch_size=4, stop_after=3)
    ckpt = tmp_path / "split" / "checkpoints" / "step_0000003"
    rngs = torch.load(ckpt / "rng.pt", weights_only=True)
    method_states = torch.load(ckpt / "method_state.pt", weights_only=True)
    assert len(rngs) == len(method_states) == 1  # today's layout: one entry per process
    # The layout before per-process state: one dict each (the main process's), here with RNG states of seed 123,
    # which neither the model's initialisation (seed 0) nor the loop would produce.
    seeded = {"torch": torch.Generator().manual_seed(123).get_state(), "python": random.Random(123).getstate()}
    torch.save(seeded, ckpt / "rng.pt")
    torch.save(method_states[0], ckpt / "method_state.pt")
    _train(tmp_path / "split", tokenizer, features, steps=6, batch_size=4)
    # Plain LM training draws no random numbers: after the resume both RNGs hold the checkpoint's state.
    assert torch.equal(torch.get_rng_state(), seeded["torch"]) and random.getstate() == seeded["python"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    tokenizer, features = _setup()
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        out = causal_lm_loss(model, batch)
        return LossOutput(out.loss_sum * (float("nan") if calls["n"] == 4 else 1.0))

    model = build_model("tiny", tokenizer, seed=0)
    cfg = TrainConfig(steps=6, batch_size=4, checkpoint_every=2, warmup_steps=0)
    trainer = Trainer(
        model, exploding, features, Collator(tokenizer.pad_token_id), cfg, tmp_path, Accelerator(cpu=True)
    )
    with pytest.raises(NonFiniteLossError, match="step 4") as info:
        trainer.train()
    assert "step_0000002" in str(info.value)
    assert (tmp_path / "checkpoints" / "step_0000002" / "model.safetensors").exists()


def test_bad_train_settings():
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="--steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=-1.0)

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
from core.train import LossOutput, TrainConfig, Trainer, example_indices, grouped_permutation, train_indices
from tests.core.train_job import setup as _setup
from tests.core.train_job import train as _train


def test_accumulation_equals_full_batch(tmp_path):
    tokenizer, features = _setup()
    # The first 8 examples of step 0 must have unequal numbers of target tokens, or the test proves nothing.
    first = train_indices(0, features, TrainConfig(batch_size=8))
    counts = {sum(label != -100 for label in features[i]["labels"]) for i in first}
    assert len(counts) > 1
    full = _train(tmp_path / "a", tokenizer, features, steps=2, batch_size=8, grad_accum=1)
    accum = _train(tmp_path / "b", tokenizer, features, steps=2, batch_size=8, grad_accum=8)
    for (name, a), (_, b) in zip(full.model.named_parameters(), accum.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_step_loss_is_the_token_mean_over_the_batch(tmp_path):
    tokenizer, features = _setup()
    model = build_model("tiny", tokenizer, seed=0)
    batch = Collator(tokenizer.pad_token_id)(
        [features[i] for i in train_indices(0, features, TrainConfig(batch_size=8))]
    )
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


def test_length_grouped_order_covers_each_epoch_once_and_is_a_pure_function():
    # 23 examples (not a multiple of the batch, so batches straddle epochs), batch 4, windows of 2 batches
    lengths = [(i * 37) % 61 + 1 for i in range(23)]
    stream = [i for step in range(4 * 23) for i in example_indices(step, 23, 4, 5, lengths, group=2)]  # 16 epochs
    for epoch in range(16):
        assert sorted(stream[epoch * 23 : (epoch + 1) * 23]) == list(range(23)), epoch
    again = [i for step in range(4 * 23) for i in example_indices(step, 23, 4, 5, lengths, group=2)]
    assert again == stream  # (seed, step) -> batch, nothing else: what makes resume exact
    assert stream != [i for step in range(4 * 23) for i in example_indices(step, 23, 4, 5)]  # grouping did something


def test_length_grouping_sorts_each_window_and_shuffles_its_batches():
    # epoch 0 of 16 examples, batch 2, windows of 4 batches: each window's 8 examples sorted longest first, cut in
    # 4 batches whose order is shuffled. So every batch is 2 neighbours of its window's sorted order.
    lengths = list(range(100, 116))
    perm = grouped_permutation(16, 0, 0, 2, 4, lengths)
    plain = example_indices(0, 16, 16, 0)  # the seeded permutation of epoch 0 (one batch of everything)
    for w in range(2):
        window = sorted(plain[8 * w : 8 * w + 8], key=lambda i: -lengths[i])
        pairs = [window[j : j + 2] for j in range(0, 8, 2)]
        got = [perm[8 * w + j : 8 * w + j + 2] for j in range(0, 8, 2)]
        assert sorted(got) == sorted(pairs)  # the same batches...
    assert perm[:8] != sorted(plain[:8], key=lambda i: -lengths[i]) or perm[8:] != sorted(
        plain[8:], key=lambda i: -lengths[i]
    )  # ...not (both windows) in sorted order


def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(tmp_path):
    tokenizer, features = _setup()
    seen: dict[str, list] = {"straight": [], "split": []}

    def recorder(name):
        def loss_fn(model, batch):
            seen[name].append(batch["input_ids"].tolist())
            return causal_lm_loss(model, batch)

        return loss_fn

    def run(name, out, **extra):
        cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, checkpoint_every=0, **extra)
        model = build_model("tiny", tokenizer, seed=0)
        trainer = Trainer(model, recorder(name), features, Collator(tokenizer.pad_token_id), cfg, out,
                          Accelerator(cpu=True))  # fmt: skip
        return trainer.train()

    run("straight", tmp_path / "a")
    run("split", tmp_path / "b", stop_after=2)
    result = run("split", tmp_path / "b")
    assert seen["split"] == seen["straight"]
    assert 0.0 <= result.padding_share < 1.0


def test_the_padding_share_is_padding_over_all_positions(tmp_path):
    # Two examples of 3 and 5 tokens in one batch of 2: the batch is 2 x 5 = 10 positions, 8 of them tokens, so
    # 2 / 10 = 0.2 is padding. Two steps see the same batch (one epoch each): still 4 / 20 = 0.2.
    features = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
    ]
    tokenizer, _ = _setup()
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=0)
    model = build_model("tiny", tokenizer, seed=0)
    trainer = Trainer(model, causal_lm_loss, features, Collator(0), cfg, tmp_path, Accelerator(cpu=True))
    assert trainer.train().padding_share == pytest.approx(0.2)


def test_length_grouping_pads_less_than_the_plain_order():
    # 64 examples of lengths 1..64, batch 8: the plain seeded order pads a lot; grouped windows of 8 batches (the
    # whole epoch) give batches of 8 consecutive lengths, padding (0+1+...+7) / (8 x top) per batch.
    lengths = list(range(1, 65))

    def share(group):
        pad = total = 0
        for step in range(8):
            batch = [lengths[i] for i in example_indices(step, 64, 8, 0, lengths, group)]
            pad += sum(max(batch) - n for n in batch)
            total += 8 * max(batch)
        return pad / total

    grouped = share(8)
    assert grouped == pytest.approx(28 * 8 / (8 * sum(range(8, 65, 8))))  # 28 pads per batch over 8 x (8+16+...+64)
    assert grouped < share(0) / 4

"""--precision: the flag, what it reaches (the loss_fn's forward passes, generation), and the run folders and cache
keys written before it existed. The numbers under bf16 are tested against float64 in tests/core/test_device.py."""

import json

import pytest
import torch
from accelerate import Accelerator

from core.config import RunConfig, parse
from core.data import Collator
from core.errors import ConfigError, OutputDirError
from core.generate import sample_completions
from core.models import build_model
from core.precision import get_precision, precision_key, use_precision
from core.results import prepare_run_dir
from core.shell import make_accelerator
from core.train import LossOutput, TrainConfig, Trainer
from tests.core.train_job import setup


def test_the_flag_parses_and_refuses_other_values():
    (run,) = parse((RunConfig,), ["--precision", "bf16"])
    assert run.precision == "bf16" and RunConfig().precision == "fp32"
    with pytest.raises(ConfigError, match="--precision must be fp32 or bf16"):
        parse((RunConfig,), ["--precision", "fp16"])


def test_make_accelerator_sets_the_process_precision():
    with use_precision("fp32"):
        make_accelerator(RunConfig(device="cpu", precision="bf16"))
        assert get_precision() == "bf16"
    assert get_precision() == "fp32"


def test_a_run_folder_written_before_the_flag_is_the_fp32_run(tmp_path):
    out = tmp_path / "run"
    before = {"RunConfig": {"device": "cpu", "overwrite": False}, "TrainConfig": {"steps": 10}}
    prepare_run_dir(out, before, overwrite=False)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # progress: another configuration is refused
    prepare_run_dir(out, {**before, "RunConfig": {**before["RunConfig"], "precision": "fp32"}}, overwrite=False)
    with pytest.raises(OutputDirError, match="different configuration"):
        prepare_run_dir(out, {**before, "RunConfig": {**before["RunConfig"], "precision": "bf16"}}, overwrite=False)


def test_cache_keys_change_under_bf16_only():
    with use_precision("fp32"):
        assert precision_key() == {}  # every key written before the flag still names its entry
    with use_precision("bf16"):
        assert precision_key() == {"precision": "bf16"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_runs_the_loss_under_autocast_and_backward_outside(tmp_path, precision):
    tokenizer, features = setup(16)
    model = build_model("tiny", tokenizer, seed=0)
    seen = []

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        return LossOutput(logits.float().logsumexp(-1).sum())  # any scalar with a gradient

    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=0, checkpoint_every=0)
    trainer = Trainer(model, loss_fn, features, Collator(tokenizer.pad_token_id), cfg, tmp_path, Accelerator(cpu=True),
                      precision=precision)  # fmt: skip
    trainer.train()
    expected = (True, torch.bfloat16) if precision == "bf16" else (False, torch.float32)
    assert seen == [expected]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # float32 weights (and Adam state)
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generation_decodes_under_the_precision(precision):
    tokenizer, _ = setup(16)
    model = build_model("tiny", tokenizer, seed=0)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    prompts = [[tokenizer.bos_token_id, 5, 6]]
    with use_precision(precision):  # the process's precision, as --precision sets it
        out = sample_completions(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 3, do_sample=False)
    assert len(out) == 1 and seen
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}


def test_metrics_json_records_the_precision(tmp_path):
    from methods.vanilla.run import main

    flags = ["--variant", "sft", "--teacher-preset", "tiny", "--teacher-steps", "2", "--student", "tiny"]
    flags += ["--steps", "2", "--batch-size", "4", "--train-size", "16", "--eval-size", "2", "--device", "cpu"]
    with use_precision("fp32"):
        main([*flags, "--precision", "bf16", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["RunConfig"]["precision"] == "bf16"

"""Delta-KD: the shifted target by hand, its limits, its gradient, the corpus split, and the run script."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.data import DataConfig
from core.errors import ConfigError
from core.losses import forward_kl
from methods.delta_kd.loss import delta_target_logprobs, kl_to_target
from methods.delta_kd.run import DeltaConfig, DeltaModels, main, split_task

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--student-pretrain-steps", "40",
        "--finetune-steps", "20", "--steps", "30", "--eval-size", "16", "--train-size", "2000", "--batch-size", "16",
        "--warmup-steps", "3"]  # fmt: skip


def _log(*probs):
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)


def test_target_by_hand():
    # base student (2/3, 1/3); base teacher (1/3, 2/3); SFT teacher (1/2, 1/2).
    # pi* ~ pi_raw_s * pi_ft_t / pi_raw_t = (2/3 * 3/2, 1/3 * 3/4) = (1, 1/4)  ->  (4/5, 1/5).
    target = delta_target_logprobs(_log(2 / 3, 1 / 3), _log(1 / 3, 2 / 3), _log(1 / 2, 1 / 2)).exp()
    assert target.tolist() == pytest.approx([0.8, 0.2], rel=1e-12)
    # alpha = 1/2: (2/3 * sqrt(3/2), 1/3 * sqrt(3/4)) normalized
    half = delta_target_logprobs(_log(2 / 3, 1 / 3), _log(1 / 3, 2 / 3), _log(1 / 2, 1 / 2), alpha=0.5).exp()
    w = (2 / 3 * math.sqrt(1.5), 1 / 3 * math.sqrt(0.75))
    assert half.tolist() == pytest.approx([w[0] / sum(w), w[1] / sum(w)], rel=1e-12)
    # temperature 2 on the shifted log-probs: (1, 1/4)^(1/2) = (1, 1/2) -> (2/3, 1/3)
    warm = delta_target_logprobs(_log(2 / 3, 1 / 3), _log(1 / 3, 2 / 3), _log(1 / 2, 1 / 2), temperature=2.0).exp()
    assert warm.tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-12)


def test_equal_bases_give_the_sft_teacher():
    torch.manual_seed(0)
    base, sft = torch.randn(5, 9, 13, dtype=torch.float64), torch.randn(5, 9, 13, dtype=torch.float64)
    target = delta_target_logprobs(base, base + 3.0, sft)  # a constant per position changes no distribution
    assert torch.allclose(target, F.log_softmax(sft, -1), atol=1e-12)


def test_limits_and_invariances():
    torch.manual_seed(1)
    raw_s, raw_t, ft_t = (torch.randn(4, 11, dtype=torch.float64) for _ in range(3))
    # alpha = 0: the base student itself; a teacher that did not move (ft = raw_t): the base student too
    assert torch.allclose(delta_target_logprobs(raw_s, raw_t, ft_t, alpha=0.0), F.log_softmax(raw_s, -1))
    assert torch.allclose(delta_target_logprobs(raw_s, raw_t, raw_t), F.log_softmax(raw_s, -1))
    # logits or log-probabilities, shifted by any constant per position: the same target
    shifts = torch.randn(3, 4, 1, dtype=torch.float64) * 5
    shifted = delta_target_logprobs(raw_s + shifts[0], raw_t + shifts[1], ft_t + shifts[2])
    assert torch.allclose(shifted, delta_target_logprobs(raw_s, raw_t, ft_t), atol=1e-12)
    assert torch.allclose(delta_target_logprobs(raw_s, raw_t, ft_t).exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_kl_value_and_gradient():
    torch.manual_seed(2)
    student = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    raw_s, raw_t, ft_t = (torch.randn(6, 7, dtype=torch.float64, requires_grad=True) for _ in range(3))
    target = delta_target_logprobs(raw_s, raw_t, ft_t)
    kl = kl_to_target(student, target)
    # the KL to a fixed target equals the core forward KL with that target as the teacher's logits
    assert torch.allclose(kl, forward_kl(student, target.detach()), atol=1e-12)
    # d/dz KL(pi* || softmax(z)) = softmax(z) - pi*, and nothing flows into the frozen models
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert torch.allclose(grad, F.softmax(student, -1) - target.exp().detach(), atol=1e-12)
    assert not target.requires_grad
    assert kl_to_target(target.detach(), target).abs().max().item() < 1e-12  # zero at the target


def test_split_keeps_a_and_b_apart():
    a, b = split_task(
        DataConfig(train_size=2000, eval_size=30), DeltaConfig(pretrain_ops="reverse,add", finetune_ops="sort")
    )
    assert {ex.group for ex in a.train + a.eval} == {"reverse", "add"}
    assert {ex.group for ex in b.train + b.eval} == {"sort"}
    assert len(a.eval) == 30 and len(b.eval) == 30
    # held-out prompts (topped up from a second stream when one side is short) never appear in training
    assert {ex.prompt for ex in a.eval + b.eval}.isdisjoint(ex.prompt for ex in a.train + b.train)
    assert len({ex.prompt for ex in b.eval}) == 30


@pytest.mark.parametrize(
    "cls, bad, match",
    [(DeltaConfig, {"pretrain_ops": "sort", "finetune_ops": "sort"}, "overlap"),
     (DeltaConfig, {"finetune_ops": "divide"}, "--finetune-ops"), (DeltaConfig, {"alpha": -0.5}, "--alpha"),
     (DeltaConfig, {"temperature": 0.0}, "--temperature"), (DeltaConfig, {"sft_weight": 1.5}, "--sft-weight"),
     (DeltaModels, {"teacher_preset": "huge"}, "--teacher-preset"), (DeltaModels, {"finetune_steps": 0}, "--finetune-steps")],
)  # fmt: skip
def test_bad_settings(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls(**bad)


def test_other_tasks_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--task multi30k"):
        main(["--task", "multi30k", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_end_to_end_run(tmp_path):
    metrics = main([*TINY, "--out", str(tmp_path / "run")])
    assert set(metrics["eval"]) == {
        "student",
        "kd_fkl_student",
        "sft_student",
        "teacher",
        "base_teacher",
        "base_student",
    }
    assert all({"exact_match", "rougeL", "perplexity", "ppl_a"} <= set(v) for v in metrics["eval"].values())
    assert metrics["task"] == "ops-sort" and metrics["corpora"]["a"] == ["reverse", "add", "pair"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert (tmp_path / "run" / "delta_kd.png").stat().st_size > 1000
    assert (tmp_path / "run" / "baselines" / "kd_fkl_student" / "log.jsonl").exists()

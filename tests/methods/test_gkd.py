"""GKD: the generalized JSD (hand values, limits, symmetry, parity with plain and TRL-style references), the
masked token sum, the batch source draw, and tiny end-to-end runs on student and teacher samples."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.losses import forward_kl, generalized_jsd, reverse_kl
from core.onpolicy import derived_seed
from methods.gkd.loss import gkd_loss_sum
from methods.gkd.run import GKDConfig, batch_source, main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "30", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3", "--compare", ""]  # fmt: skip
ln = math.log


def _plain_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's definition from probabilities, one sum at a time (no log-space tricks)."""
    m = beta * p + (1 - beta) * q
    kl_pm = sum(p[..., v] * torch.log(p[..., v] / m[..., v]) for v in range(p.shape[-1]))
    kl_qm = sum(q[..., v] * torch.log(q[..., v] / m[..., v]) for v in range(p.shape[-1]))
    return beta * kl_pm + (1 - beta) * kl_qm


def _trl_style_jsd(student_logits, teacher_logits, beta):
    """TRL's formulation: F.kl_div(input=log m, target=log p) is KL(p || m) (kl_div swaps the order)."""
    s, t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, t, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_m, s, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def test_jsd_quarter_by_hand():
    # p = (1/2, 1/2) teacher, q = (3/4, 1/4) student, beta = 1/4: m = p/4 + 3q/4 = (11/16, 5/16).
    # KL(p||m) = 1/2 ln(8/11) + 1/2 ln(8/5);  KL(q||m) = 3/4 ln(12/11) + 1/4 ln(4/5);  JSD = KL(p||m)/4 + 3 KL(q||m)/4
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.75, 0.25], dtype=torch.float64)
    kl_pm = 0.5 * ln(8 / 11) + 0.5 * ln(8 / 5)
    kl_qm = 0.75 * ln(12 / 11) + 0.25 * ln(4 / 5)
    assert generalized_jsd(q.log(), p.log(), beta=0.25).item() == pytest.approx(0.25 * kl_pm + 0.75 * kl_qm, rel=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_parity_with_plain_and_trl_style_references(beta):
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64)
    ours = generalized_jsd(student, teacher, beta=beta)
    assert torch.allclose(ours, _trl_style_jsd(student, teacher, beta), atol=1e-12)
    if 0 < beta < 1:
        assert torch.allclose(ours, _plain_jsd(F.softmax(teacher, -1), F.softmax(student, -1), beta), atol=1e-12)


def test_jsd_limits_and_symmetry():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    assert torch.allclose(generalized_jsd(student, teacher, beta=0.0), forward_kl(student, teacher))
    assert torch.allclose(generalized_jsd(student, teacher, beta=1.0), reverse_kl(student, teacher))
    # beta = 1/2 is the symmetric Jensen-Shannon divergence: swapping teacher and student changes nothing,
    half = generalized_jsd(student, teacher, beta=0.5)
    assert torch.allclose(half, generalized_jsd(teacher, student, beta=0.5))
    # it is at most ln 2, and swapping roles maps beta to 1 - beta in general.
    assert (half <= ln(2) + 1e-12).all()
    assert torch.allclose(generalized_jsd(student, teacher, beta=0.3), generalized_jsd(teacher, student, beta=0.7))


def test_gkd_loss_sums_the_shifted_valid_positions():
    torch.manual_seed(2)
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 2], [-100, 1, 6, -100, -100]])
    total = gkd_loss_sum(student, teacher, labels, beta=0.5)
    # Position t predicts labels[t + 1]: valid predicting positions are (0, 1), (0, 2), (0, 3), (1, 0), (1, 1).
    positions = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    reference = sum(generalized_jsd(student[b, t], teacher[b, t], beta=0.5) for b, t in positions)
    assert torch.allclose(total, reference)
    (grad,) = torch.autograd.grad(total, student)
    masked = torch.ones(2, 5, dtype=torch.bool)
    for b, t in positions:
        masked[b, t] = False
    assert (grad[masked] == 0).all() and (grad[~masked].abs().sum(-1) > 0).all()
    # Chunked evaluation gives the same value.
    assert torch.allclose(gkd_loss_sum(student, teacher, labels, beta=0.5, chunk_size=2), total)


def test_batch_source_follows_lmbda_and_seq_kd():
    assert batch_source(0.3, lmbda=0.5, seq_kd=False) == "student"
    assert batch_source(0.7, lmbda=0.5, seq_kd=False) == "data"
    assert batch_source(0.7, lmbda=0.5, seq_kd=True) == "teacher"
    assert all(batch_source(c, lmbda=0.0, seq_kd=False) == "data" for c in (0.0, 0.5, 0.999))
    assert all(batch_source(c, lmbda=1.0, seq_kd=True) == "student" for c in (0.0, 0.5, 0.999))
    # Over many (step, micro-batch) draws with the run's seeds, the student's share is lmbda:
    # 4000 draws at lmbda 0.3, expected 1200, standard deviation sqrt(4000 * .3 * .7) = 29.
    import random

    counts = Counter(
        batch_source(random.Random(derived_seed(0, step, index, 0, "gkd-source")).random(), 0.3, True)
        for step in range(1000)
        for index in range(4)
    )
    assert 1100 < counts["student"] < 1300 and counts["student"] + counts["teacher"] == 4000


@pytest.mark.parametrize(
    "bad, match",
    [({"lmbda": 1.5}, "--lmbda"), ({"lmbda": -0.1}, "--lmbda"), ({"beta": 2.0}, "--beta"), ({"temperature": 0.0}, "--temperature"),
     ({"sample_max_new_tokens": 0}, "--sample-max-new-tokens"), ({"compare": "kl"}, "unknown")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        GKDConfig(**bad)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_end_to_end_on_policy_run(tmp_path):
    out = tmp_path / "gkd"
    metrics = main([*TINY, "--lmbda", "1.0", "--sample-max-new-tokens", "6", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) >= {"method", "task", "seed", "eval", "train", "config", "env"}
    assert saved["method"] == "gkd" and set(saved["eval"]) == {"student", "teacher", "sft_student"}
    log = _log(out)
    assert len(log) == 30 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    # lmbda 1: every step trained on the student's samples and spent time generating them.
    assert all(r["student_batches"] == 1 and r["teacher_batches"] == 0 and r["gen_s"] > 0 for r in log)
    train = saved["train"]
    assert train["gen_s"] == pytest.approx(sum(r["gen_s"] for r in log))
    assert 0 < train["gen_fraction"] < 1 and train["steps"] == 30
    assert (out / "student" / "model.safetensors").exists() and not (out / "checkpoints").exists()
    # The student's samples are at most 6 tokens: a step trains on at most 16 x 6 target tokens.
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(log, log[1:])]
    assert max(tokens) <= 16 * (6 + 16)  # (prompt + completion) tokens per row; prompts are under 16 tokens


def test_end_to_end_seq_kd_run_on_teacher_samples(tmp_path):
    out = tmp_path / "seqkd"
    main([*TINY, "--lmbda", "0", "--seq-kd", "--steps", "10", "--sample-max-new-tokens", "6", "--out", str(out)])
    log = _log(out)
    assert all(r["teacher_batches"] == 1 and r["student_batches"] == 0 and r["gen_s"] > 0 for r in log)


def test_teacher_cache_serves_data_batches_and_on_policy_batches_miss(tmp_path):
    """--teacher-cache reaches GKD: a data batch reads the cached teacher (exact at k >= vocabulary size, float16
    storage aside), a batch of the student's own samples is not in the cache and runs the live teacher."""
    short = [*TINY, "--steps", "3", "--eval-size", "4"]
    main([*short, "--lmbda", "0", "--out", str(tmp_path / "live")])
    cached = main(
        [*short, "--lmbda", "0", "--teacher-cache", "--teacher-cache-k", "100000", "--out", str(tmp_path / "c")]
    )
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("live", "c")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=3e-3)
    assert cached["train"]["kd_path"]["cache"]["hit_rate"] == 1.0
    on_policy = main([*short, "--lmbda", "1", "--sample-max-new-tokens", "4", "--teacher-cache", "--teacher-cache-k",
                      "100000", "--out", str(tmp_path / "p")])  # fmt: skip
    assert on_policy["train"]["kd_path"]["cache"]["hit_rate"] == 0.0
    with pytest.raises(ConfigError, match="--fused do not apply"):
        main([*short, "--fused", "--out", str(tmp_path / "f")])

"""TAID: the interpolated target, its limits and gradients, the adaptive schedule, and the run script."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError, VocabularyMismatchError
from core.losses import forward_kl
from methods.taid.loss import TAIDSchedule, interpolated_target_logprobs, taid_terms
from methods.taid.run import TAIDConfig, main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "30", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3"]  # fmt: skip


def _logits(seed=0, shape=(6, 11)):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True), torch.randn(*shape, dtype=torch.float64)


def test_t_one_is_forward_kl_in_value_and_gradient():
    student, teacher = _logits()
    kl, ce = taid_terms(student, teacher, t=1.0)
    reference = forward_kl(student, teacher)
    assert torch.allclose(kl, reference)
    (g_taid,) = torch.autograd.grad(kl.sum(), student, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference.sum(), student)
    assert torch.allclose(g_taid, g_ref)
    # The cross-entropy form differs by the teacher entropy only: same gradient.
    (g_ce,) = torch.autograd.grad(ce.sum(), student)
    assert torch.allclose(g_ce, g_ref)


def test_t_zero_targets_the_student_itself():
    student, teacher = _logits(1)
    kl, ce = taid_terms(student, teacher, t=0.0)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-12)
    (grad,) = torch.autograd.grad(ce.sum(), student)
    assert grad.abs().max().item() < 1e-12


def test_no_gradient_flows_through_the_target():
    # d/dz [-sum_v p_t(v) log softmax(z)(v)] = softmax(z) - p_t when p_t is a constant. Any gradient through
    # p_t (which depends on z) would add a term, so equality proves the target is detached.
    student, teacher = _logits(2)
    _, ce = taid_terms(student, teacher, t=0.3)
    (grad,) = torch.autograd.grad(ce.sum(), student)
    with torch.no_grad():
        expected = F.softmax(student, -1) - interpolated_target_logprobs(student, teacher, 0.3).exp()
    assert torch.allclose(grad, expected, atol=1e-12)


def test_two_token_value_by_hand():
    # student logits (0, 0): q = (1/2, 1/2). teacher logits (ln 3, 0): p = (3/4, 1/4).
    # t = 1/2: mixed logits = (ln 3 / 2, 0) = (ln sqrt 3, 0), so p_t = (sqrt3, 1) / (sqrt3 + 1).
    # KL(p_t || q) = sum p_t ln(2 p_t);  CE = -sum p_t ln(1/2) = ln 2.
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    s3 = math.sqrt(3.0)
    p = (s3 / (s3 + 1), 1 / (s3 + 1))
    kl, ce = taid_terms(student, teacher, t=0.5)
    assert kl.item() == pytest.approx(p[0] * math.log(2 * p[0]) + p[1] * math.log(2 * p[1]), rel=1e-9)
    assert ce.item() == pytest.approx(math.log(2.0), rel=1e-9)


def test_schedule_update_by_hand():
    s = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.1, beta=0.99)
    assert s.update(2.0, step=0, total_steps=10) == 0.0 and s.t == 0.4  # first call only records L
    # rel = (2 - 1) / 2 = 0.5; m = 0.01 * 0.5 = 0.005; delta = 0.1 * sigmoid(0.005) * (1 - 0.4) = 0.0300750;
    # floor at step 1 = 0.4 + 0.6 * 1/10 = 0.46 > 0.4 + 0.030075, so t = 0.46.
    delta = s.update(1.0, step=1, total_steps=10)
    assert delta == pytest.approx(0.1 * (1 / (1 + math.exp(-0.005))) * 0.6, rel=1e-12)
    assert s.t == pytest.approx(0.46) and s.momentum == pytest.approx(0.005)
    # With alpha = 1 the adaptive step wins: t = 0.4 + 1 * sigmoid(0.005) * 0.6 = 0.70075.
    fast = TAIDSchedule(t_start=0.4, alpha=1.0)
    fast.update(2.0, 0, 10)
    fast.update(1.0, 1, 10)
    assert fast.t == pytest.approx(0.4 + (1 / (1 + math.exp(-0.005))) * 0.6, rel=1e-12)


def _run_schedule(schedule, losses, total):
    ts = []
    for step, loss in enumerate(losses):
        schedule.update(loss, step, total)
        ts.append(schedule.t)
    return ts


def test_schedule_is_monotone_bounded_and_follows_the_official_indexing():
    torch.manual_seed(0)
    losses = (3.0 * torch.rand(200) + 0.1).tolist()  # a noisy loss that rises and falls
    total = 150
    ts = _run_schedule(TAIDSchedule(alpha=0.05), losses, total)
    assert all(b >= a for a, b in zip(ts, ts[1:])) and max(ts) <= 1.0
    linear = _run_schedule(TAIDSchedule(adaptive=False), losses, total)
    s = TAIDSchedule()
    # adaptation off: exactly the linear floor after the first (recording) call; it reaches t_end at step = total
    assert linear[1:] == pytest.approx(
        [s.linear(step, total) for step in range(1, 200) if step <= total]
        + [1.0 + 0.6 * (k - total) / total for k in range(total + 1, 200)]
    )
    assert s.linear(total, total) == 1.0
    # with adaptation the schedule is never below the linear one (until both are capped at t_end)
    assert all(a >= min(b, 1.0) - 1e-12 for a, b in zip(ts[1:], linear[1:]))


def test_schedule_state_round_trip_continues_identically(tmp_path):
    losses = [2.0, 1.5, 1.7, 1.2, 1.1, 0.9, 1.0, 0.8]
    full = _run_schedule(TAIDSchedule(alpha=0.2), losses, 8)
    first = TAIDSchedule(alpha=0.2)
    head = _run_schedule(first, losses[:4], 8)
    # Through the same serialization the checkpoints use (torch.save, torch.load with weights_only=True).
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = TAIDSchedule(alpha=0.2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    tail = []
    for step, loss in enumerate(losses[4:], start=4):
        resumed.update(loss, step, 8)
        tail.append(resumed.t)
    assert head + tail == full


@pytest.mark.parametrize(
    "bad, match",
    [({"t_start": 1.0}, "--t-start"), ({"t_start": -0.1}, "--t-start"), ({"t_end": 0.0}, "--t-end"), ({"t_end": 1.5}, "--t-end"),
     ({"t_start": 0.8, "t_end": 0.5}, "must not exceed"), ({"alpha": 1.5}, "--alpha"), ({"alpha": -1.0}, "--alpha"),
     ({"schedule_signal": "mse"}, "--schedule-signal"), ({"compare": "fkl,kl"}, "unknown divergences")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        TAIDConfig(**bad)


def test_end_to_end_run_with_resume(tmp_path):
    straight = main([*TINY, "--out", str(tmp_path / "straight"), "--alpha", "0.01"])
    assert set(straight["eval"]) == {"student", "teacher", "sft_student", "kd_fkl_student"}  # default --compare fkl
    # the paper's start (a trained student; here the SFT student, issue 29): from there the loss, the CE to a target
    # that moves from the student towards the teacher as t grows, need not fall, so it is not asserted
    assert straight["student_start"] == "sft"
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    ts = [r["t"] for r in log]
    assert len(log) == 30 and ts[0] == 0.4 and all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > 0.9
    assert (tmp_path / "straight" / "taid_schedule.png").stat().st_size > 1000
    # Interrupted after 12 steps, then resumed by the same command: same t and loss at every step.
    assert main([*TINY, "--out", str(tmp_path / "split"), "--alpha", "0.01", "--stop-after", "12"]) == {}
    main([*TINY, "--out", str(tmp_path / "split"), "--alpha", "0.01"])
    split = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["t"] for r in split] == pytest.approx(ts, abs=1e-12)
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in log], abs=1e-6)


def test_different_vocabularies_point_to_dskd(tmp_path):
    from core.data import DataConfig, load_task
    from core.models import build_model
    from core.tokenizers import train_bpe

    task = load_task(DataConfig(train_size=200, eval_size=4))
    other = train_bpe([e.prompt + e.target for e in task.train] + ["zebra quokka"] * 50, 400)
    build_model("tiny", other, seed=0).save_pretrained(tmp_path / "other")
    with pytest.raises(VocabularyMismatchError, match="methods/dskd"):
        main([*TINY, "--student", str(tmp_path / "other"), "--out", str(tmp_path / "run")])


def test_teacher_cache_reaches_taid_and_is_exact_at_full_k(tmp_path):
    """TAID interpolates logits; cached log-probabilities differ from them by a constant per position, which the
    softmax ignores, so at k >= vocabulary size the cached run follows the live one (float16 storage aside)."""
    short = [*TINY, "--steps", "4", "--eval-size", "4", "--compare", ""]
    main([*short, "--out", str(tmp_path / "live")])
    cached = main([*short, "--teacher-cache", "--teacher-cache-k", "100000", "--out", str(tmp_path / "cached")])
    live_log = [json.loads(line) for line in (tmp_path / "live" / "log.jsonl").read_text().splitlines()]
    cached_log = [json.loads(line) for line in (tmp_path / "cached" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in cached_log] == pytest.approx([r["loss"] for r in live_log], rel=3e-3)
    assert cached["train"]["kd_path"]["cache"]["hit_rate"] == 1.0
    with pytest.raises(ConfigError, match="--fused and --chunk-size do not apply"):
        main([*short, "--fused", "--out", str(tmp_path / "fused")])

"""DistiLLM: skew divergences (hand values, limits, finiteness, parity with the official formulas), the loss sum,
the adaptive off-policy schedule on scripted losses, and a tiny end-to-end run with student samples, replay and
an exact resume."""

import json
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.losses import forward_kl, reverse_kl, skew_kl, skew_reverse_kl
from core.onpolicy import derived_seed
from methods.distillm.loss import AdaptiveOffPolicy, distillm_loss_sum
from methods.distillm.run import DistiLLMConfig, main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "30", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3", "--compare", ""]  # fmt: skip
ln = math.log
P = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)  # teacher
Q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)  # student


def test_skew_kl_three_tokens_by_hand():
    # m = 0.1 p + 0.9 q = (0.25, 0.29, 0.46); SKL = sum p ln(p / m)
    expected = 0.7 * ln(0.7 / 0.25) + 0.2 * ln(0.2 / 0.29) + 0.1 * ln(0.1 / 0.46)
    assert skew_kl(Q.log(), P.log(), alpha=0.1).item() == pytest.approx(expected, rel=1e-9)


def test_skew_reverse_kl_three_tokens_by_hand():
    # m = 0.9 p + 0.1 q = (0.65, 0.21, 0.14); SRKL = sum q ln(q / m)
    expected = 0.2 * ln(0.2 / 0.65) + 0.3 * ln(0.3 / 0.21) + 0.5 * ln(0.5 / 0.14)
    assert skew_reverse_kl(Q.log(), P.log(), alpha=0.1).item() == pytest.approx(expected, rel=1e-9)


def test_alpha_zero_gives_the_plain_divergences():
    torch.manual_seed(0)
    s, t = torch.randn(6, 13, dtype=torch.float64), torch.randn(6, 13, dtype=torch.float64)
    assert torch.allclose(skew_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.allclose(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))


def test_the_official_mixture_order_not_the_issue_text():
    # The issue text wrote SRKL as KL(q || (1 - a) q + a p): at a = 0 that is KL(q || q) = 0 for any q, not the
    # reverse KL. The official skewed_reverse_kl mixes (1 - a) teacher + a student, which does give RKL at a = 0.
    issue_text = lambda q, p, a: (q * (q / ((1 - a) * q + a * p)).log()).sum()  # noqa: E731
    assert issue_text(Q, P, 0.0).item() == 0.0
    assert skew_reverse_kl(Q.log(), P.log(), alpha=0.0).item() == pytest.approx(reverse_kl(Q.log(), P.log()).item())


def test_parity_with_the_official_formulas():
    # distillm/losses.py computes, per position, from softmaxes: skewed_forward_kl = -sum p log(a p + (1 - a) q)
    # (a cross-entropy: ours adds back -H(p), which has no gradient) and skewed_reverse_kl
    # = -sum q log((1 - a) p + a q) + sum q log q.
    torch.manual_seed(1)
    student = torch.randn(4, 5, 17, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, 17, dtype=torch.float64)
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    for a in (0.1, 0.3):
        official_skl = -(p * torch.log(a * p + (1 - a) * q)).sum(-1)
        entropy = -(p * p.log()).sum(-1)
        assert torch.allclose(skew_kl(student, teacher, alpha=a), official_skl - entropy)
        (g_ours,) = torch.autograd.grad(skew_kl(student, teacher, alpha=a).sum(), student)
        (g_official,) = torch.autograd.grad(official_skl.sum(), student, retain_graph=True)
        assert torch.allclose(g_ours, g_official)
        official_srkl = -(q * torch.log((1 - a) * p + a * q)).sum(-1) + (q * q.log()).sum(-1)
        assert torch.allclose(skew_reverse_kl(student, teacher, alpha=a), official_srkl)


def test_finite_where_the_plain_kl_is_infinite_and_bounded_by_log_one_over_alpha():
    # The teacher gives zero mass to a token the student likes: RKL = inf, SRKL is finite.
    # p = (1, 0), q = (1/2, 1/2): m = 0.9 p + 0.1 q = (0.95, 0.05); SRKL = 1/2 ln(0.5/0.95) + 1/2 ln(0.5/0.05)
    student = torch.tensor([0.0, 0.0], dtype=torch.float64)
    teacher = torch.tensor([0.0, -float("inf")], dtype=torch.float64)
    assert torch.isinf(reverse_kl(student, teacher))
    assert skew_reverse_kl(student, teacher, alpha=0.1).item() == pytest.approx(0.5 * ln(0.5 / 0.95) + 0.5 * ln(10))
    # m >= alpha * (the distribution in front), so both skews are at most ln(1 / alpha), even for extreme logits.
    torch.manual_seed(2)
    s, t = 30 * torch.randn(200, 9, dtype=torch.float64), 30 * torch.randn(200, 9, dtype=torch.float64)
    for a in (0.1, 0.5):
        assert (skew_kl(s, t, alpha=a) <= ln(1 / a) + 1e-9).all()
        assert (skew_reverse_kl(s, t, alpha=a) <= ln(1 / a) + 1e-9).all()


def test_loss_sum_masks_shifts_and_mixes_the_ce():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 2], [-100, 1, 6, -100, -100]])
    total, ce, kd = distillm_loss_sum(student, teacher, labels, "srkl", alpha=0.2, kd_ratio=0.75)
    positions = [(0, 1, 3), (0, 2, 4), (0, 3, 2), (1, 0, 1), (1, 1, 6)]  # (row, predicting position, target)
    ref_kd = sum(skew_reverse_kl(student[b, t], teacher[b, t], alpha=0.2) for b, t, _ in positions)
    ref_ce = sum(-F.log_softmax(student[b, t], -1)[y] for b, t, y in positions)
    assert torch.allclose(kd, ref_kd) and torch.allclose(ce, ref_ce)
    assert torch.allclose(total, 0.25 * ref_ce + 0.75 * ref_kd)
    with pytest.raises(ConfigError):
        distillm_loss_sum(student, teacher, labels, "fkl")


def test_adaptive_threshold_on_a_scripted_loss_sequence():
    policy = AdaptiveOffPolicy(init_threshold=0.0, loss_eps=0.1)
    assert policy.update(3.0) is False and policy.threshold == 0.0  # before training: the reference only
    # 2.5 and 2.7 are below 3.0 + 0.1. 2.7 is 0.2 above the previous validation, but the reference stays at the
    # last raise (3.0), as in the official loop, so it does not raise. 3.05 < 3.1 does not raise either.
    for loss in (2.5, 2.7, 3.05):
        assert policy.update(loss) is False and policy.threshold == 0.0 and policy.reference_loss == 3.0
    assert policy.update(3.15) is True and policy.threshold == pytest.approx(0.1) and policy.reference_loss == 3.15
    assert policy.update(3.2) is False  # needs 3.25 now
    assert policy.update(3.3) is True and policy.threshold == pytest.approx(0.2)
    for k in range(12):  # every further rise adds 0.1, capped at 1
        policy.update(3.3 + 0.2 * (k + 1))
    assert policy.threshold == 1.0


def test_choice_of_source_follows_the_official_branches():
    policy = AdaptiveOffPolicy(init_threshold=0.5)
    # decreasing: sampling = 0.5 * (1 - 50/100) = 0.25
    assert policy.sampling_threshold(50, 100) == pytest.approx(0.25)
    assert policy.choose(0.1, 50, 100, buffer_full=True) == "student"  # r < sampling
    assert policy.choose(0.3, 50, 100, buffer_full=False) == "student"  # r < threshold, buffer filling
    assert policy.choose(0.3, 50, 100, buffer_full=True) == "replay"  # r < threshold, buffer full
    assert policy.choose(0.6, 50, 100, buffer_full=False) == "data"
    assert AdaptiveOffPolicy(0.5, replay_ratio="constant").sampling_threshold(90, 100) == pytest.approx(0.25)
    assert AdaptiveOffPolicy(0.5, replay_ratio="increasing").sampling_threshold(25, 100) == pytest.approx(0.125)
    # threshold 0 (the official start): always the data, so no sampling until a validation raises it.
    assert all(AdaptiveOffPolicy(0.0).choose(c, 1, 100, False) == "data" for c in (0.0, 0.5, 0.99))
    # With the run's seeded coins, threshold 1 and a full buffer, fresh samples come at rate 1 - step / total:
    # 3000 draws at step 30 of 100, expected 2100 fresh, standard deviation sqrt(3000 * .7 * .3) = 25.
    full = AdaptiveOffPolicy(1.0)
    coins = [random.Random(derived_seed(0, 29, i, 0, "distillm-source")).random() for i in range(3000)]
    counts = Counter(full.choose(c, 30, 100, buffer_full=True) for c in coins)
    assert 2000 < counts["student"] < 2200 and counts["student"] + counts["replay"] == 3000


def test_schedule_state_round_trip(tmp_path):
    policy = AdaptiveOffPolicy(0.0, 0.1)
    for loss in (3.0, 3.2):
        policy.update(loss)
    torch.save(policy.state_dict(), tmp_path / "state.pt")
    fresh = AdaptiveOffPolicy(0.0, 0.1)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (fresh.threshold, fresh.reference_loss) == (policy.threshold, policy.reference_loss) == (0.1, 3.2)
    empty = AdaptiveOffPolicy()
    empty.load_state_dict(AdaptiveOffPolicy().state_dict())
    assert empty.reference_loss is None


@pytest.mark.parametrize(
    "bad, match",
    [({"loss": "fkl"}, "--loss"), ({"alpha": 1.0}, "--alpha"), ({"init_threshold": 1.5}, "--init-threshold"),
     ({"loss_eps": -0.1}, "--loss-eps"), ({"capacity": 0}, "--capacity"), ({"replay_ratio": "random"}, "--replay-ratio"),
     ({"val_every": 0}, "--val-every"), ({"top_p": 0.0}, "--top-p"), ({"kd_ratio": 2.0}, "--kd-ratio")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        DistiLLMConfig(**bad)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_end_to_end_with_student_samples_replay_and_exact_resume(tmp_path):
    flags = [*TINY, "--init-threshold", "0.7", "--capacity", "48", "--val-every", "5", "--val-size", "100",
             "--sample-max-new-tokens", "6"]  # fmt: skip
    straight = main([*flags, "--out", str(tmp_path / "straight")])
    assert set(straight["eval"]) == {"student", "teacher", "sft_student"} and straight["method"] == "distillm"
    log = _log(tmp_path / "straight")
    assert len(log) == 30 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    fresh = [r for r in log if r["student_batches"]]
    replayed = [r for r in log if r["replay_batches"]]
    assert fresh and replayed and all(r["gen_s"] > 0 for r in fresh)
    assert all(r["gen_s"] == 0 for r in log if not r["student_batches"])  # replay and data steps sample nothing
    assert max(r["buffer"] for r in log) == 48 and log[0]["buffer"] == 16  # 16 samples a batch, capped at 48
    assert not any(r["replay_batches"] for r in log if r["buffer"] < 48)  # replay only from a full buffer
    assert [r["step"] for r in log if "val_loss" in r] == [5, 10, 15, 20, 25, 30]
    assert straight["train"]["gen_s"] == pytest.approx(sum(r["gen_s"] for r in log))
    assert 0 < straight["train"]["gen_fraction"] < 1
    assert (tmp_path / "straight" / "distillm_schedule.png").stat().st_size > 1000
    # Interrupted after 12 steps, then resumed by the same command: the same sources, samples and losses.
    assert main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "12"]) == {}
    main([*flags, "--out", str(tmp_path / "split")])
    split = _log(tmp_path / "split")
    for key in ("student_batches", "replay_batches", "buffer", "threshold", "tokens"):
        assert [r[key] for r in split] == [r[key] for r in log], key
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in log], abs=1e-6)

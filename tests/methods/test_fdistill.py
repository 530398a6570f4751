"""f-DISTILL: the step-wise losses on a two-step, two-token toy whose sequence distributions are enumerated exactly
(KL and RKL decompose exactly, JS exactly for the autoregressive mixture, TVD as an upper bound), hand values,
parity with scipy and with the official code's formulation, the teacher-sample cache, settings checks, and a tiny
end-to-end run with the risk report."""

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from core import onpolicy
from core.errors import ConfigError
from methods.fdistill.loss import (
    js_student_step,
    js_teacher_step,
    kl_step,
    masked_step_sum,
    rkl_step,
    sequence_logprob,
    token_mean,
    tvd_step,
    two_sided,
)
from methods.fdistill.run import FDistillConfig, main, teacher_samples

ln = math.log
A, B = 0, 1  # the toy's two tokens

# The toy: sequences y1 y2 over {a, b}, both steps always taken (no EOS), so there are exactly four sequences.
#   teacher p: p(y1) = (1/2, 1/2), p(y2 | a) = (1/2, 1/2), p(y2 | b) = (1/2, 1/2)      P(y) = 1/4 for every y
#   student q: q(y1) = (1/4, 3/4), q(y2 | a) = (1/2, 1/2), q(y2 | b) = (1/4, 3/4)
#              Q(aa) = Q(ab) = 1/8, Q(ba) = 3/16, Q(bb) = 9/16
P1, P2 = [0.5, 0.5], {A: [0.5, 0.5], B: [0.5, 0.5]}
Q1, Q2 = [0.25, 0.75], {A: [0.5, 0.5], B: [0.25, 0.75]}


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()  # log-probabilities are valid logits


def _seq(first, second, y) -> float:
    return first[y[0]] * second[y[0]][y[1]]


SEQUENCES = list(itertools.product([A, B], repeat=2))
P_SEQ = {y: _seq(P1, P2, y) for y in SEQUENCES}
Q_SEQ = {y: _seq(Q1, Q2, y) for y in SEQUENCES}


def _stepwise(step_fn, prefix_weights) -> float:
    """sum_t E_{y_<t ~ r}[step term at y_<t], with the expectation taken exactly: step 1 has the empty prefix,
    step 2 the prefix y1, weighted by r(y1) (`prefix_weights`, the first-step distribution of r)."""
    total = float(step_fn(_logits(Q1), _logits(P1)))
    for y1 in (A, B):
        total += prefix_weights[y1] * float(step_fn(_logits(Q2[y1]), _logits(P2[y1])))
    return total


def test_kl_stepwise_equals_sequence_kl_by_hand():
    # Step 1: KL((1/2,1/2) || (1/4,3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Step 2 under p: prefix a (prob 1/2) has p = q, 0; prefix b (prob 1/2) is step 1 again, 1/2 ln(4/3).
    # Total 1/2 ln(4/3) + 1/4 ln(4/3) = 3/4 ln(4/3). Sequence level: 1/4 [ln 2 + ln 2 + ln(4/3) + ln(4/9)]
    # = 1/4 ln(64/27) = 3/4 ln(4/3): the decomposition is exact (Eq. 21).
    hand = 0.75 * ln(4 / 3)
    assert float(kl_step(_logits(Q1), _logits(P1))) == pytest.approx(0.5 * ln(4 / 3))
    assert _stepwise(kl_step, P1) == pytest.approx(hand)
    sequence_kl = sum(P_SEQ[y] * ln(P_SEQ[y] / Q_SEQ[y]) for y in SEQUENCES)
    assert sequence_kl == pytest.approx(hand)


def test_rkl_stepwise_equals_sequence_rkl_by_hand():
    # Step 1: KL((1/4,3/4) || (1/2,1/2)) = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 - ln 2.
    # Step 2 under q: prefix a (prob 1/4): 0; prefix b (prob 3/4): the same term again.
    # Total 7/4 (3/4 ln 3 - ln 2). Sequence level: Q/P = 1/2, 1/2, 3/4, 9/4, so
    # sum Q ln(Q/P) = -1/4 ln 2 + 3/16 ln(3/4) + 9/16 ln(9/4) = 21/16 ln 3 - 28/16 ln 2, the same (Eq. 22).
    hand = 7 / 4 * (0.75 * ln(3) - ln(2))
    assert _stepwise(rkl_step, Q1) == pytest.approx(hand)
    assert sum(Q_SEQ[y] * ln(Q_SEQ[y] / P_SEQ[y]) for y in SEQUENCES) == pytest.approx(hand)


def test_tvd_stepwise_bound_is_at_least_sequence_tvd_by_hand():
    # Sequence TVD: 1/2 (|1/4 - 1/8| * 2 + |1/4 - 3/16| + |1/4 - 9/16|) = 1/2 (1/4 + 1/16 + 5/16) = 5/16.
    # Step term TVD((1/2,1/2), (1/4,3/4)) = 1/4. Teacher side: 1/4 + 1/2 * 1/4 = 3/8; student side:
    # 1/4 + 3/4 * 1/4 = 7/16. The bound of Eq. (10): 1/2 * 3/8 + 1/2 * 7/16 = 13/32 >= 5/16.
    sequence_tvd = 0.5 * sum(abs(P_SEQ[y] - Q_SEQ[y]) for y in SEQUENCES)
    assert sequence_tvd == pytest.approx(5 / 16)
    teacher_side, student_side = _stepwise(tvd_step, P1), _stepwise(tvd_step, Q1)
    assert (teacher_side, student_side) == pytest.approx((3 / 8, 7 / 16))
    bound = two_sided(torch.tensor(teacher_side), torch.tensor(student_side), 0.5)
    assert float(bound) == pytest.approx(13 / 32)
    assert float(bound) >= sequence_tvd
    # each side alone is a bound too (Eqs. 36 and 37)
    assert teacher_side >= sequence_tvd and student_side >= sequence_tvd


@pytest.mark.parametrize("beta", [0.5, 0.25, 0.85])
def test_js_stepwise_is_exact_for_the_autoregressive_mixture_not_the_sequence_mixture(beta):
    def mix(p, q):
        return [(1 - beta) * a + beta * b for a, b in zip(p, q)]

    m_steps = {y: mix(P1, Q1)[y[0]] * mix(P2[y[0]], Q2[y[0]])[y[1]] for y in SEQUENCES}  # prod_t m_t
    m_mixture = {y: (1 - beta) * P_SEQ[y] + beta * Q_SEQ[y] for y in SEQUENCES}  # (1 - beta) P + beta Q

    def js(m):
        return (1 - beta) * sum(P_SEQ[y] * ln(P_SEQ[y] / m[y]) for y in SEQUENCES) + beta * sum(
            Q_SEQ[y] * ln(Q_SEQ[y] / m[y]) for y in SEQUENCES
        )

    teacher_side = _stepwise(lambda s, t: js_teacher_step(s, t, beta), P1)
    student_side = _stepwise(lambda s, t: js_student_step(s, t, beta), Q1)
    stepwise = float(
        two_sided(
            torch.tensor(teacher_side, dtype=torch.float64), torch.tensor(student_side, dtype=torch.float64), beta
        )
    )
    assert stepwise == pytest.approx(js(m_steps), rel=1e-12)
    assert abs(stepwise - js(m_mixture)) > 1e-4  # Appendix A's Eq. (16) equates the two; they differ


def test_js_first_step_by_hand():
    # m = 1/2 (1/2, 1/2) + 1/2 (1/4, 3/4) = (3/8, 5/8).
    # KL(p || m) = 1/2 ln(4/3) + 1/2 ln(4/5) = 1/2 ln(16/15)
    # KL(q || m) = 1/4 ln(2/3) + 3/4 ln(6/5)
    s, t = _logits(Q1), _logits(P1)
    assert float(js_teacher_step(s, t, 0.5)) == pytest.approx(0.5 * ln(16 / 15))
    assert float(js_student_step(s, t, 0.5)) == pytest.approx(0.25 * ln(2 / 3) + 0.75 * ln(6 / 5))


def test_js_balanced_is_symmetric_and_matches_scipy():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)

    def js(student, teacher, beta):
        return two_sided(js_teacher_step(student, teacher, beta), js_student_step(student, teacher, beta), beta)

    torch.testing.assert_close(js(s, t, 0.5), js(t, s, 0.5))
    assert not torch.allclose(js(s, t, 0.25), js(t, s, 0.25))  # the skewed mixture is not symmetric
    # ... but swapping the roles and beta <-> 1 - beta is the same divergence
    torch.testing.assert_close(js(s, t, 0.25), js(t, s, 0.75))
    p, q = F.softmax(t, -1).numpy(), F.softmax(s, -1).numpy()
    scipy_js = np.array([jensenshannon(p[i], q[i]) ** 2 for i in range(5)])  # scipy returns the distance (sqrt)
    np.testing.assert_allclose(js(s, t, 0.5).numpy(), scipy_js, rtol=1e-10)


def test_js_halves_match_the_official_formulation():
    """The official calc_js_loss: q_prob = t_wght softmax(t) + s_wght softmax(s); KLDivLoss(log q_prob, softmax(s))
    i.e. KL(first argument || mixture). _js_student_step passes (student, teacher, s_wght=beta), _js_teacher_step
    passes (teacher, student, s_wght=1-beta): both use m = (1 - beta) p + beta q."""
    torch.manual_seed(1)
    s, t, beta = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64), 0.25

    def official(first, second, first_weight, second_weight):
        mixture = second_weight * F.softmax(second, -1) + first_weight * F.softmax(first, -1)
        return F.kl_div(mixture.log(), F.softmax(first, -1), reduction="none").sum(-1)

    torch.testing.assert_close(js_student_step(s, t, beta), official(s, t, beta, 1 - beta))
    torch.testing.assert_close(js_teacher_step(s, t, beta), official(t, s, 1 - beta, beta))


def test_step_terms_match_scipy_and_numpy():
    torch.manual_seed(2)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    p, q = F.softmax(t, -1).numpy(), F.softmax(s, -1).numpy()
    np.testing.assert_allclose(kl_step(s, t).numpy(), [entropy(p[i], q[i]) for i in range(6)], rtol=1e-10)
    np.testing.assert_allclose(rkl_step(s, t).numpy(), [entropy(q[i], p[i]) for i in range(6)], rtol=1e-10)
    np.testing.assert_allclose(tvd_step(s, t).numpy(), 0.5 * np.abs(p - q).sum(-1), rtol=1e-10)
    for fn in (kl_step, rkl_step, tvd_step, js_teacher_step, js_student_step):
        assert torch.allclose(fn(t, t), torch.zeros(6, dtype=torch.float64), atol=1e-12)  # zero at p = q


def test_batch_layout_sums_the_positions_that_predict_targets():
    """The toy as a batch in the data layout: row y = [BOS, y1, y2], labels [-100, y1, y2]. Position 0 predicts y1
    (logits: step 1), position 1 predicts y2 (logits: step 2 given y1), position 2 predicts nothing. Weighting each
    row's sum by P(y) gives the exact expectation, so the sequence KL comes back; sequence_logprob gives log Q(y)."""
    rows = SEQUENCES
    labels = torch.tensor([[-100, y1, y2] for y1, y2 in rows])

    def logits(first, second):
        out = torch.zeros(len(rows), 3, 2, dtype=torch.float64)
        for i, (y1, _) in enumerate(rows):
            out[i, 0], out[i, 1] = _logits(first), _logits(second[y1])
            out[i, 2] = torch.tensor([5.0, -3.0])  # predicts nothing: must be ignored
        return out

    student, teacher = logits(Q1, Q2), logits(P1, P2)
    per_row = [masked_step_sum(kl_step(student[i : i + 1], teacher[i : i + 1]), labels[i : i + 1]) for i in range(4)]
    assert all(count == 2 for _, count in per_row)
    weighted = sum(P_SEQ[y] * float(total) for y, (total, _) in zip(rows, per_row))
    assert weighted == pytest.approx(0.75 * ln(4 / 3))
    logq = sequence_logprob(student, labels)
    assert logq.tolist() == pytest.approx([ln(Q_SEQ[y]) for y in rows])
    total, count = masked_step_sum(kl_step(student, teacher), labels)
    assert count == 8 and float(token_mean(total, count)) == pytest.approx(float(total) / 8)
    nothing = torch.full_like(labels, -100)
    total, count = masked_step_sum(kl_step(student, teacher), nothing)
    assert count == 0 and float(token_mean(total, count)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The teacher-sample cache
# ----------------------------------------------------------------------------------------------------------------


def _fake_ctx(tmp_path, teacher_config):
    return SimpleNamespace(
        teacher_source="embedded",
        teacher=SimpleNamespace(config=SimpleNamespace(to_dict=lambda: dict(teacher_config))),
        tokenizer=None,
        data=SimpleNamespace(max_length=32),
        cache=tmp_path,
        accelerator=SimpleNamespace(is_main_process=True),
    )


def test_teacher_samples_are_cached_and_invalidated_by_a_new_teacher(tmp_path, monkeypatch):
    calls = []

    def fake_sample_examples(model, prompts, tokenizer, max_length, max_new_tokens, **kwargs):
        calls.append((len(prompts), kwargs["top_k"], kwargs["do_sample"]))
        return [{"input_ids": list(p) + [9], "labels": [-100] * len(p) + [9]} for p in prompts]

    monkeypatch.setattr(onpolicy, "sample_examples", fake_sample_examples)  # the shared teacher-sample cache
    prompts = [[1, 2], [1, 3, 4], [1]]
    ctx = _fake_ctx(tmp_path, {"hidden_size": 8})
    first = teacher_samples(ctx, prompts, 4, True, 30, 1.0, 0, batch_size=2)
    assert calls == [(2, 30, True), (1, 30, True)]  # two batches, top-k 30
    again = teacher_samples(_fake_ctx(tmp_path, {"hidden_size": 8}), prompts, 4, True, 30, 1.0, 0, batch_size=2)
    assert again == first and len(calls) == 2  # read from disk: no second generation
    teacher_samples(_fake_ctx(tmp_path, {"hidden_size": 16}), prompts, 4, True, 30, 1.0, 0, batch_size=2)
    assert len(calls) == 4  # another teacher: generated again
    teacher_samples(ctx, prompts, 4, False, 30, 1.0, 0, batch_size=8)
    assert calls[-1] == (3, 0, False)  # greedy decoding is another cache entry, without top-k
    assert len(list((tmp_path / "teacher-samples").glob("*.json"))) == 3


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"divergence": "hellinger"}, "--divergence"),
        ({"beta": 0.0}, "--beta"),
        ({"beta": 1.5}, "--beta"),
        ({"top_k": -1}, "--top-k"),
        ({"temperature": 0.0}, "--temperature"),
        ({"sample_max_new_tokens": 0}, "--sample-max-new-tokens"),
        ({"init": "pretrained"}, "--init"),
        ({"risk_size": 0}, "--risk-size"),
        ({"compare": "nope"}, "nope"),
    ],
)
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        FDistillConfig(**bad)


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "20", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3", "--sample-max-new-tokens", "6"]  # fmt: skip


@pytest.mark.slow
def test_end_to_end_tvd_run_and_risk_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "tvd"
    metrics = main([*TINY, "--divergence", "tvd", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["method"] == "fdistill-tvd" and set(saved["eval"]) == {"student", "teacher", "sft_student"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    # both sides every step; the student's side sampled online (gen_s), and the loss is their average (Eq. 10)
    for r in log:
        assert r["gen_s"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["teacher_side"] + 0.5 * r["student_side"], rel=1e-5)
    risks = saved["risks"]
    assert risks["n"] == 16 and risks["likelihood"]["per_token"] > 0 and risks["coverage"]["per_token"] > 0
    assert (out / "student" / "model.safetensors").exists()
    assert len(list((tmp_path / "cache" / "teacher-samples").glob("*.json"))) == 2  # train and eval prompts
    report = main(["--risk-report", str(tmp_path / "runs")])
    assert set(report[saved["task"]]) == {"fdistill-tvd"}
    assert (tmp_path / "runs" / f"fdistill-risks-{saved['task']}.png").stat().st_size > 0

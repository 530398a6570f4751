"""DNKD's losses (TCKD, NCKD, kNN-KD) against hand-computed values and a numpy reference, its limiting cases,
its flags, and one tiny end-to-end run of speech.dnkd.run on the embedded synthetic task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from core.errors import ConfigError
from speech.dnkd.loss import decoupled_terms, dnkd_loss_sum, kl_per_token, knn_kd_loss_sum

# One token, V = 3, gold t = 0.
#   teacher p^T = [1/2, 1/4, 1/4]; student logits z = [0, 0, ln 2] -> p^S = [1/4, 1/4, 1/2]
#   TCKD = KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
#   p_hat^T = [1/2, 1/2], p_hat^S = [1/3, 2/3]: NCKD = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
#   KL(p^T || p^S) = 1/2 ln 2 + 1/4 ln 1 + 1/4 ln(1/2) = 1/4 ln 2  (= TCKD + 1/2 NCKD: (4/3)^2 (9/8) = 2)
TEACHER = torch.tensor([[0.5, 0.25, 0.25]])
LOGITS = torch.tensor([[0.0, 0.0, math.log(2.0)]])
GOLD = torch.tensor([0])


def test_tckd_nckd_hand_computed():
    terms = decoupled_terms(LOGITS, TEACHER, GOLD)
    assert terms["tckd"].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.5 * math.log(9 / 8), abs=1e-6)
    assert terms["teacher_target"].item() == pytest.approx(0.5)
    assert kl_per_token(TEACHER, LOGITS).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)


def test_decomposition_matches_kl_on_random_rows():
    # KL(p^T || p^S) = TCKD + (1 - p^T_t) NCKD for any teacher, student and gold token (DKD's decomposition)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=gen) * 3
    teacher = torch.softmax(torch.randn(50, 7, generator=gen) * 2, -1)
    gold = torch.randint(0, 7, (50,), generator=gen)
    terms = decoupled_terms(logits, teacher, gold)
    rebuilt = terms["tckd"] + (1 - terms["teacher_target"]) * terms["nckd"]
    torch.testing.assert_close(rebuilt, kl_per_token(teacher, logits), atol=1e-5, rtol=1e-5)


def test_against_numpy_reference():
    # an independent computation with scipy's rel_entr on explicitly renormalised distributions
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 6, generator=gen)
    teacher = torch.softmax(torch.randn(20, 6, generator=gen), -1)
    gold = torch.randint(0, 6, (20,), generator=gen)
    terms = decoupled_terms(logits, teacher, gold)
    q = torch.softmax(logits.double(), -1).numpy()
    p = teacher.double().numpy()
    for i, t in enumerate(gold.tolist()):
        b_t, b_s = np.array([p[i, t], 1 - p[i, t]]), np.array([q[i, t], 1 - q[i, t]])
        rest = [j for j in range(6) if j != t]
        hat_t, hat_s = p[i, rest] / p[i, rest].sum(), q[i, rest] / q[i, rest].sum()
        assert terms["tckd"][i].item() == pytest.approx(rel_entr(b_t, b_s).sum(), abs=1e-5)
        assert terms["nckd"][i].item() == pytest.approx(rel_entr(hat_t, hat_s).sum(), abs=1e-5)


def test_one_hot_teacher_skips_nckd_without_nan():
    # every neighbour agrees on the gold token: p^T = [1, 0, 0]; TCKD = -ln p^S_t = ln 4, NCKD undefined -> 0
    logits = LOGITS.clone().requires_grad_(True)
    terms = decoupled_terms(logits, torch.tensor([[1.0, 0.0, 0.0]]), GOLD)
    assert terms["tckd"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert terms["nckd"].item() == 0.0 and not terms["nckd_defined"].item()
    (terms["tckd"] + 8.0 * terms["nckd"]).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # d(-ln p_t)/dz = p^S - onehot = [1/4 - 1, 1/4, 1/2]
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.75, 0.25, 0.5]]))


def test_teacher_with_zero_entries_and_extreme_logits_is_finite():
    logits = torch.tensor([[50.0, -50.0, 0.0, -1e4]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.6, 0.4, 0.0]])  # no mass on the gold token
    terms = decoupled_terms(logits, teacher, torch.tensor([0]))
    loss = terms["tckd"].sum() + terms["nckd"].sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def _batch():
    # two utterances of lengths 2 and 1 (third position padded); V = 3
    labels = torch.tensor([[0, 2], [1, -100]])
    logits = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(3))
    teacher = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    ce = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # stands for the label-smoothed CE per token
    return logits, labels, teacher, ce


def test_alpha_beta_limits():
    logits, labels, teacher, ce = _batch()
    # alpha = beta = 0: the CE alone (sum 6)
    loss, _ = dnkd_loss_sum(logits, labels, teacher, ce, alpha=0.0, beta=0.0)
    assert loss.item() == pytest.approx(6.0)
    # beta = 0: CE + alpha TCKD only; alpha = 0: CE + beta NCKD only
    terms = decoupled_terms(logits[0], teacher[0], labels[0])
    loss_a, _ = dnkd_loss_sum(logits, labels, teacher, ce, alpha=2.0, beta=0.0)
    assert loss_a.item() == pytest.approx(6.0 + 2.0 * terms["tckd"].sum().item(), rel=1e-6)
    loss_b, _ = dnkd_loss_sum(logits, labels, teacher, ce, alpha=0.0, beta=3.0)
    assert loss_b.item() == pytest.approx(6.0 + 3.0 * terms["nckd"].sum().item(), rel=1e-6)
    # the third token (utterance 2) has an all-zero teacher row: CE only, exactly as in the alpha = beta = 0 case


def test_dnkd_reduces_to_knn_kd():
    # alpha = lambda, beta = lambda (1 - p^T_t) turns (6) into (7); one token with p^T_t = 1/2, lambda = 2
    ce = torch.tensor([[0.7]])
    labels = torch.tensor([[0]])
    dnkd, _ = dnkd_loss_sum(LOGITS[None], labels, TEACHER[None], ce, alpha=2.0, beta=2.0 * 0.5)
    knn, kl = knn_kd_loss_sum(LOGITS[None], labels, TEACHER[None], ce, kd_weight=2.0)
    assert dnkd.item() == pytest.approx(knn.item(), abs=1e-6)
    assert knn.item() == pytest.approx(0.7 + 2.0 * 0.25 * math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    "flag, value",
    [("--k", "0"), ("--knn-temperature", "0"), ("--beta", "-1"), ("--index", "hnsw"), ("--compare", "seqkd"),
     ("--task", "librispeech"), ("--n-mels", "4"), ("--label-smoothing", "1.0"), ("--preset", "huge")],
)  # fmt: skip
def test_bad_flags_are_config_errors(flag, value, tmp_path):
    from speech.dnkd.run import main

    with pytest.raises(ConfigError, match=flag.lstrip("-").split("-")[0]):
        main([flag, value, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from core.shell import cli
    from speech.dnkd.run import main

    with pytest.raises(SystemExit) as exc:
        cli(main, ["--task", "s2t", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-dir" in err[0]


@pytest.mark.slow
def test_end_to_end_tiny_run(tmp_path):
    from speech.dnkd.run import main

    out = tmp_path / "run"
    argv = ["--n-train", "48", "--n-eval", "8", "--steps", "20", "--batch-size", "8", "--warmup-steps", "2",
            "--k", "4", "--knn-temperature", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    metrics = main(argv)
    assert metrics["family"] == "speech" and metrics["task"] == "synthetic-speech"
    assert set(metrics["eval"]) == {"student", "ce_student", "knn_kd_student"}
    for row in metrics["eval"].values():
        assert {"bleu", "chrf", "exact_match"} <= set(row)
    train = metrics["train"]
    assert train["last_loss"] < train["first_loss"]
    for base in train["baselines"].values():
        assert base["last_loss"] < base["first_loss"] and base["steps"] == 20
    assert train["datastore"]["keys"] > 0 and train["datastore"]["index"] == "IndexFlatL2"
    assert (out / "metrics.json").is_file() and (out / "student.safetensors").is_file()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 20 and all(math.isfinite(r["tckd"]) and math.isfinite(r["nckd"]) for r in logs)
    assert (out / "dnkd_terms.png").is_file() and not list(out.glob("**/checkpoints"))
    # a second call with the same settings shows the finished run instead of training again
    assert main(argv)["eval"] == metrics["eval"]

"""KDExplainer: routing weights, label smoothing and KD by hand, the similarity measures against brute force,
the generated hierarchy, and a tiny end-to-end run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from methods.kdexplainer.data import hierarchical_task
from methods.kdexplainer.loss import (
    kd_loss,
    label_smoothing_targets,
    offdiagonal_spearman,
    routing_similarity,
    smoothed_cross_entropy,
    teacher_class_similarity,
)
from methods.kdexplainer.model import VAM, MLPStudent, TreeStudent
from methods.kdexplainer.run import KDXConfig, main, routing_freeze_steps, tau_at


def test_routing_weights_sum_to_one_per_block_with_and_without_gumbel_noise():
    torch.manual_seed(0)
    model = TreeStudent(in_dim=5, num_classes=6, layers=3, modules=4, width=8, tau=0.3)
    for noisy in (False, True):
        p = model.routing(noisy=noisy)
        assert p.shape == (3, 6, 4)
        assert torch.allclose(p.sum(-1), torch.ones(3, 6)) and (p >= 0).all()
    assert torch.allclose(VAM(8, 6, 4).attention().sum(-1), torch.ones(6))
    assert model(torch.randn(7, 5)).shape == (7, 6)


def test_tree_student_with_hard_routes_is_a_plain_path_network():
    # With one-hot routes (tau -> 0 on well-separated logits), class k's logit is computed by exactly the modules
    # its route names: check against an explicit forward pass through those modules.
    torch.manual_seed(1)
    model = TreeStudent(in_dim=3, num_classes=2, layers=2, modules=3, width=4, tau=1e-4, gumbel=False, head_hidden=0)
    with torch.no_grad():
        model.routing_logits.zero_()
        model.routing_logits[0, 0, 2] = model.routing_logits[1, 0, 1] = 1.0  # class 0: module 2, then 1
        model.routing_logits[0, 1, 0] = model.routing_logits[1, 1, 2] = 1.0  # class 1: module 0, then 2
    x = torch.randn(5, 3)
    out = model.eval()(x)
    f1 = F.relu(model.first(x)).view(5, 3, 4)
    for k, (a, b) in enumerate([(2, 1), (0, 2)]):
        h = F.relu(f1[:, a] @ model.weight[0, b] + model.bias[0, b])
        assert torch.allclose(out[:, k], h @ model.head_weight[k] + model.head_bias[k], atol=1e-5)


def test_routing_softmax_runs_at_half_the_temperature():
    # Official branching_op: softmax(alpha / 0.5), then softmax(log(.) / t); log softmax(alpha / 0.5) is
    # alpha / 0.5 - const per row, so the route is softmax(alpha / (0.5 t)). At t = 10 and alpha = (0, 5 ln 3):
    # softmax((0, ln 3)) = (1/4, 3/4). (At temperature t instead: softmax((0, ln 3 / 2)) = (0.366, 0.634).)
    model = TreeStudent(in_dim=2, num_classes=1, layers=1, modules=2, width=3, tau=10.0)
    with torch.no_grad():
        model.routing_logits.copy_(torch.tensor([[[0.0, 5 * math.log(3)]]]))
    assert torch.allclose(model.routing()[0, 0], torch.tensor([0.25, 0.75]), atol=1e-6)
    # the same through the official two-softmax composition written from its equations
    alpha = model.routing_logits.detach()[0]
    official = F.softmax(torch.log(F.softmax(alpha / 0.5, -1)) / 10.0, -1)
    assert torch.allclose(model.routing()[0], official, atol=1e-6)


def test_routing_logits_start_uniform_on_zero_one():
    # official init: nn.init.uniform_(a=0, b=1); the old N(0, 1e-4) init had negatives and mean 0
    torch.manual_seed(3)
    alpha = TreeStudent(in_dim=2, num_classes=50, layers=4, modules=8, width=3).routing_logits.detach()
    assert alpha.min() >= 0 and alpha.max() < 1
    assert alpha.mean().item() == pytest.approx(0.5, abs=0.03) and alpha.std().item() == pytest.approx(
        (1 / 12) ** 0.5, abs=0.02
    )


def test_per_class_heads_are_two_hidden_layers_with_dropout():
    # official fc1_k, fc2_k: Linear(W, 128) ReLU Dropout(0.15) Linear(128, 128) ReLU Dropout(0.15) Linear(128, 1)
    torch.manual_seed(4)
    model = TreeStudent(in_dim=3, num_classes=2, layers=1, modules=2, width=5)
    assert model.head_w1.shape == (2, 5, 128) and model.head_w2.shape == (2, 128, 128) and model.head_dropout == 0.15
    assert model.head_w2.std().item() == pytest.approx(0.01, rel=0.05)  # official N(0, 0.01^2) init
    with torch.no_grad():  # non-trivial biases, so the check is not blind to them
        for b in (model.head_b1, model.head_b2, model.head_b3):
            b.normal_()
    h = torch.randn(4, 2, 5)
    out = model.eval().head(h)
    for k in range(2):
        z = F.relu(h[:, k] @ model.head_w1[k] + model.head_b1[k])
        z = F.relu(z @ model.head_w2[k] + model.head_b2[k])
        assert torch.allclose(out[:, k], z @ model.head_w3[k] + model.head_b3[k], atol=1e-5)
    # dropout is active in training only
    model.train()
    assert not torch.allclose(model.head(h), out)


def test_label_smoothing_target_by_hand():
    # K = 4, eps = 0.1, label 2: off-label 0.1 / 4 = 0.025, label 0.9 + 0.025 = 0.925; sums to 1.
    q = label_smoothing_targets(torch.tensor([2]), 4, 0.1)
    assert torch.allclose(q, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))
    # uniform logits: CE against any target is log K
    assert torch.allclose(
        smoothed_cross_entropy(torch.zeros(1, 4), torch.tensor([2]), 0.1), torch.tensor([math.log(4)])
    )
    # eps = 0 is the ordinary cross-entropy
    logits = torch.randn(3, 5)
    labels = torch.tensor([0, 3, 4])
    assert torch.allclose(
        smoothed_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels, reduction="none")
    )


def test_kd_loss_by_hand_and_limits():
    # Student logits 0 (uniform q), teacher logits (4 ln 3, 0) at T = 4: p_T = (3/4, 1/4).
    # KL(p || q) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln 1.5 - 1/4 ln 2; CE of uniform q = ln 2.
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[4 * math.log(3), 0.0]])
    kl = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    value = kd_loss(student, teacher, torch.tensor([0]), temperature=4.0, alpha=0.9, gamma=0.1)
    assert value.item() == pytest.approx(0.1 * math.log(2) + 0.9 * 16 * kl, rel=1e-6)
    # a student equal to its teacher leaves only the CE term
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    assert torch.allclose(
        kd_loss(logits, logits, labels, 4.0, 0.9, 0.1), 0.1 * F.cross_entropy(logits, labels, reduction="none")
    )


def test_routing_similarity_against_brute_force():
    torch.manual_seed(2)
    p = F.softmax(torch.randn(3, 5, 4, dtype=torch.float64), -1)  # (L, K, M)
    sim = routing_similarity(p)
    p = p.numpy()
    for a in range(5):
        for b in range(5):
            ref = np.mean(
                [
                    np.dot(p[layer, a], p[layer, b]) / (np.linalg.norm(p[layer, a]) * np.linalg.norm(p[layer, b]))
                    for layer in range(3)
                ]
            )
            assert sim[a, b].item() == pytest.approx(float(ref), rel=1e-9)
    # identical one-hot routes: 1; disjoint one-hot routes: 0
    hard = F.one_hot(torch.tensor([[0, 0, 1]]), 2).double()  # (L=1, K=3, M=2)
    assert routing_similarity(hard).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_teacher_similarity_and_spearman():
    # class 0 examples have teacher logits (0, 0) -> p = (1/2, 1/2); class 1 logits (big, 0) -> p ~ (1, 0):
    # cosine = (1/2) / (sqrt(1/2) * 1) = 1/sqrt(2).
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [400.0, 0.0]])
    sim = teacher_class_similarity(logits, torch.tensor([0, 0, 1]), temperature=4.0)
    assert sim[0, 1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    from scipy.stats import spearmanr

    a, b = torch.rand(6, 6), torch.rand(6, 6)
    a, b = a + a.T, b + b.T
    i, j = np.triu_indices(6, 1)
    assert offdiagonal_spearman(a, b) == pytest.approx(spearmanr(a.numpy()[i, j], b.numpy()[i, j]).statistic)
    assert offdiagonal_spearman(torch.ones(4, 4), a[:4, :4]) == 0.0  # no ordering in a constant matrix


def test_generated_hierarchy_is_known_and_learnable():
    task = hierarchical_task(per_class_train=20, per_class_test=5)
    assert task.num_classes == 8 and task.x_train.shape == (160, 32)
    # classes 0 and 1 share both ancestors, 0 and 2 only the superclass, 0 and 4 none
    assert task.shared_levels[0, 1] == 2 and task.shared_levels[0, 2] == 1 and task.shared_levels[0, 4] == 0
    means = torch.stack([task.x_train[task.y_train == c].mean(0) for c in range(8)])
    dist = torch.cdist(means, means)
    assert dist[0, 1] < dist[0, 2] < dist[0, 4]  # the hierarchy is in the geometry


def test_tau_schedule_and_vam_shapes():
    assert tau_at(0, 100, 10.0, 0.05) == 10.0 and tau_at(100, 100, 10.0, 0.05) == pytest.approx(0.05)
    # the default schedule is the official t / epoch over 300 epochs: t = 10 / e at e = 1 + 299 s / S, so with
    # S = 299 steps step s is epoch s + 1; step 1 (epoch 2) has t = 5, the routing softmax 0.5 t = 2.5; the last
    # step (epoch 300) t = 1/30 and the softmax 1/60 = 0.0167 (the old default ended at t = 0.05)
    cfg = KDXConfig()
    assert cfg.tau_start == 10.0 and cfg.tau_end == pytest.approx(1 / 30)
    assert tau_at(1, 299, cfg.tau_start, cfg.tau_end) == pytest.approx(5.0)
    assert tau_at(99, 299, cfg.tau_start, cfg.tau_end) == pytest.approx(0.1)
    assert 0.5 * tau_at(299, 299, cfg.tau_start, cfg.tau_end) == pytest.approx(1 / 60)
    # the routing is frozen for 2 epochs: 2 x 2400 examples / 64 per step = 75 steps; 2 x 1437 / 64 -> 45
    assert routing_freeze_steps(2, 2400, 64) == 75 and routing_freeze_steps(2, 1437, 64) == 45
    assert MLPStudent(5, 3, width=8, vam_groups=4)(torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ValueError):
        VAM(10, 3, 4)


def test_bad_flags_raise_config_errors():
    for argv in (
        ["--loss", "mse"],
        ["--compare", "ce,foo"],
        ["--tau-end", "20"],
        ["--vam-groups", "5"],
        ["--task", "x"],
    ):
        with pytest.raises(ConfigError):
            main(argv)


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    argv = ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "40",
            "--batch-size", "32", "--warmup-steps", "2", "--teacher-steps", "30", "--width", "16",
            "--log-every", "1", "--device", "cpu"]  # fmt: skip
    metrics = main(argv)
    assert {"student", "ce_student", "ls_student", "teacher", "kd_plain_student", "kd_vam_student"} <= set(
        metrics["eval"]
    )
    assert -1 <= metrics["eval"]["student"]["routing_corr"] <= 1
    assert metrics["family"] == "vision" and metrics["method"] == "kdexplainer" and "vam_gain" in metrics
    assert (tmp_path / "run" / "routing_similarity.png").stat().st_size > 0
    routing = json.loads((tmp_path / "run" / "routing.json").read_text())
    assert set(routing) == {"teacher_similarity", "kd", "ce", "ls"}
    # 40 steps of 32 lie inside the frozen span (2 epochs of 2400 examples = 150 steps): the three students share
    # their initialisation, so their routes, which never moved, are identical; they would differ if routes learned
    assert routing["kd"] == routing["ce"] == routing["ls"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["tau"] == pytest.approx(1 / 30)
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the KD loss fell (single steps are noisy)

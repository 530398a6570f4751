"""The teacher cache's sampled tail (issue 12): forward KL through it is unbiased, exact at k = V, reproducible;
every other divergence is refused below the vocabulary size."""

import math
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from core.kdpath import KDPath, KDPathConfig
from core.losses import get_divergence, sampled_forward_kl
from core.objectives import make_kd_loss, shifted_targets, teacher_forward
from tests.core.test_logit_cache import VOCAB, _batch, _build, _features, _teacher


class _Replay(torch.nn.Module):
    """A 'model' returning fixed logits, so the loss's gradient with respect to the logits can be read."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, attention_mask=None, **_):
        return SimpleNamespace(logits=self.logits)


def _loss_and_grad(loss_fn, logits, batch):
    leaf = logits.detach().clone().requires_grad_(True)
    out = loss_fn(_Replay(leaf), batch)
    out.loss_sum.backward()
    return out.loss_sum.item(), leaf.grad


def test_sampled_forward_kl_by_hand():
    # p = (1/2, 1/4, 1/8, 1/8), k = 1 (id 0), tail mass 1/2, m = 2 draws, both id 2: p_hat = (1/2, 0, 1/2, 0).
    # H(p) = 1/2 ln 2 + 1/4 ln 4 + 2 * 1/8 ln 8 = 1.75 ln 2. With q = (0.4, 0.3, 0.2, 0.1):
    # FKL_hat = -H(p) - 1/2 ln 0.4 - 1/2 ln 0.2, and d/dz = (sum p_hat) q - p_hat = (-0.1, 0.3, -0.3, 0.1).
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    logits = q.log().requires_grad_(True)
    value = sampled_forward_kl(
        logits,
        torch.tensor([[math.log(0.5)]], dtype=torch.float64),
        torch.tensor([[0]]),
        torch.tensor([math.log(0.5)], dtype=torch.float64),
        torch.tensor([[2, 2]]),
        torch.tensor([1.75 * math.log(2)], dtype=torch.float64),
    )
    assert value.item() == pytest.approx(-1.75 * math.log(2) - 0.5 * math.log(0.4) - 0.5 * math.log(0.2), abs=1e-12)
    value.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[-0.1, 0.3, -0.3, 0.1]], dtype=torch.float64), atol=1e-12)


def test_forward_kl_through_the_sampled_cache_is_unbiased_and_the_bucket_is_not(tmp_path):
    teacher, features = _teacher(), _features()
    batch = _batch(features)
    mask, _ = shifted_targets(batch["labels"])
    logits = teacher_forward(_teacher(seed=1), batch)  # an unrelated student
    fkl = get_divergence("fkl")
    true_loss, true_grad = _loss_and_grad(make_kd_loss(teacher, fkl, chunk_size=8), logits, batch)
    losses, grads = [], []
    for seed in range(200):  # k = 5 of 37, m = 4 draws from the tail: one cache per seed
        cache = _build(tmp_path, teacher, features, logprob_dtype="float32", samples=4, seed=seed)
        loss, grad = _loss_and_grad(make_kd_loss(None, fkl, teacher_cache=cache), logits, batch)
        losses.append(loss)
        grads.append(grad[mask])
    losses, grads = torch.tensor(losses, dtype=torch.float64), torch.stack(grads).double()  # (S,), (S, N, V)
    n, truth = len(losses), true_grad[mask].double()
    # The mean of S independent draws is off by its standard error, sd / sqrt(S): 4 of them at most.
    bound = 4 * losses.std() / math.sqrt(n)
    assert abs(losses.mean() - true_loss) < bound
    # The gradient: E|mean - g|^2 = (sum of the per-element variances) / S, and a sum of many squared errors stays
    # within 3 times its expectation.
    assert (grads.mean(0) - truth).square().sum() < 3 * grads.var(0).sum() / n
    # The one-bucket tail (m = 0) is biased: it reads this loss low (0.05 against 0.20) by more than twice the bound.
    bucket = _build(tmp_path, teacher, features, logprob_dtype="float32")
    loss, grad = _loss_and_grad(make_kd_loss(None, fkl, teacher_cache=bucket), logits, batch)
    assert true_loss - loss > 2 * bound
    # Its gradient error d is small against one draw's noise, so test the sampled gradient along d: the bucket is off
    # by |d|^2 there (17 standard errors of the sampled mean here); the sampled mean must be within 4 of 0.
    d = grad[mask].double() - truth
    along = ((grads - truth) * d).sum((1, 2))  # (S,)
    standard_error = along.std() / math.sqrt(n)
    assert abs(along.mean()) < 4 * standard_error < d.square().sum() / 2


def test_at_the_vocabulary_size_the_cache_samples_nothing_and_is_exact(tmp_path):
    teacher, features = _teacher(), _features()
    batch = _batch(features)
    logits = teacher_forward(_teacher(seed=1), batch)
    cache = _build(tmp_path, teacher, features, k=VOCAB, logprob_dtype="float32", samples=64)
    assert cache.samples == 0 and cache.manifest["key"]["seed"] == 0  # one cache whatever m: nothing to sample
    fkl = get_divergence("fkl")
    true_loss, true_grad = _loss_and_grad(make_kd_loss(teacher, fkl, chunk_size=8), logits, batch)
    loss, grad = _loss_and_grad(make_kd_loss(None, fkl, teacher_cache=cache), logits, batch)
    assert loss == pytest.approx(true_loss, rel=1e-5)
    assert torch.allclose(grad, true_grad, atol=1e-6)


def test_the_sample_is_fixed_by_the_seed_and_the_format_is_in_the_key(tmp_path):
    features = _features()
    batch = _batch(features)
    mask, _ = shifted_targets(batch["labels"])
    first = _build(tmp_path / "a", features=features, samples=4, seed=3)
    again = _build(tmp_path / "b", features=features, samples=4, seed=3)
    other = _build(tmp_path / "a", features=features, samples=4, seed=4)
    ids = [c.sparse_teacher(batch, mask).sample_ids for c in (first, again, other)]
    assert ids[0].shape == (int(mask.sum()), 4)
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    assert other.folder != first.folder
    assert first.manifest["key"]["format"] == 3  # formats 1 (no sample), 2 (file-order draws): other keys, rebuilt
    # The draws are outside the top k: the sample is of the tail only.
    top = first.sparse_teacher(batch, mask).indices
    assert not (ids[0].unsqueeze(-1) == top.unsqueeze(-2)).any()
    # Per token: k = 5 float16 log-probs and uint16 ids (20 bytes), 4 uint16 draws (8), the float32 tail and
    # entropy (8) = 36 bytes, plus each example's offset and key and the safetensors headers.
    assert 36 < first.bytes_per_token < 36 + 100


def test_other_divergences_are_refused_below_the_vocabulary_before_any_cache_is_built(tmp_path):
    features = _features()
    kd = KDPath(KDPathConfig(teacher_cache=True, teacher_cache_k=5), _teacher(), tmp_path, "tok", 0)
    for name in ("rkl", "jsd", "tvd", "skl", "srkl"):
        with pytest.raises(ConfigError) as err:
            kd.loss(get_divergence(name), features=features)
        message = str(err.value)
        assert "\n" not in message and f"the divergence {name} through --teacher-cache-k 5" in message
        for phrase in ("benchmarks/cache_fidelity.md", "drop --teacher-cache", f"--teacher-cache-k {VOCAB}"):
            assert phrase in message
    with pytest.raises(ConfigError, match="GKD"):
        kd.require_exact_cache("GKD (it reads every teacher logit)")
    assert not (tmp_path / "logit_cache").exists()  # refused before the teacher ran over the data
    kd.loss(get_divergence("fkl"), features=features)  # forward KL is served
    assert kd.summary()["cache"]["samples"] == 64
    exact = KDPath(KDPathConfig(teacher_cache=True, teacher_cache_k=VOCAB), _teacher(), tmp_path, "tok", 0)
    exact.loss(get_divergence("rkl"), features=features)  # k = V: exact, every divergence
    exact.require_exact_cache("GKD")


def test_a_sampled_cache_refuses_every_divergence_but_forward_kl(tmp_path):
    cache = _build(tmp_path, samples=4)
    with pytest.raises(ConfigError, match="only forward KL"):
        make_kd_loss(None, get_divergence("rkl"), teacher_cache=cache)
    make_kd_loss(None, get_divergence("fkl"), teacher_cache=cache)


def test_the_sampled_path_gives_the_same_loss_fused_and_chunked(tmp_path):
    teacher, features = _teacher(), _features()
    cache = _build(tmp_path, teacher, features, samples=4)
    batch = _batch(features[:6])
    values = []
    for options in ({}, {"chunk_size": 3}, {"fused": True}):
        student = _teacher(seed=1)
        out = make_kd_loss(None, get_divergence("fkl"), 0.5, teacher_cache=cache, **options)(student, batch)
        out.loss_sum.backward()
        values.append((out.loss_sum.item(), student.lm_head.weight.grad.clone()))
    for value, grad in values[1:]:
        assert value == pytest.approx(values[0][0], rel=1e-5)
        assert torch.allclose(grad, values[0][1], atol=1e-5)


def test_taid_and_a_reverse_kl_baseline_are_refused_on_a_top_k_cache(tmp_path):
    """Through the CLI entry: TAID's target softmax(t log p + (1 - t) log q) is not linear in p, so no cache below
    the vocabulary size serves it; a reverse-KL baseline is refused before the SFT baseline trains."""
    from methods.taid.run import main
    from tests.methods.test_taid import TINY

    topk = [*TINY, "--steps", "2", "--eval-size", "4", "--teacher-cache", "--teacher-cache-k", "8"]
    with pytest.raises(ConfigError, match="^the KD baseline kd-rkl through --teacher-cache-k 8 "):
        main([*topk, "--compare", "fkl,rkl", "--out", str(tmp_path / "rkl")])
    assert not (tmp_path / "rkl" / "student").exists()
    with pytest.raises(ConfigError, match=r"^TAID \(its target .* through --teacher-cache-k 8 \(< the vocabulary"):
        main([*topk, "--compare", "", "--out", str(tmp_path / "taid")])

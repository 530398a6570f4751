"""Chunked, fused and sparse-teacher KD losses against plain references written here (value and gradient, float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError
from core.fused import (
    LinearHead,
    SparseTeacher,
    chunked_divergence_sum,
    default_chunk_size,
    fused_divergence_sum,
    fused_kd_sums,
    sparse_divergence_sum,
)
from core.losses import DIVERGENCES, get_divergence, sparse_divergence
from core.objectives import causal_lm_loss, final_hidden_and_head, make_kd_loss, projects_from_hidden

B, T, V, H = 3, 6, 23, 5
D64 = torch.float64


def _reference_sum(fn, student_logits, teacher_logits, mask):
    """The obviously-correct path: the divergence at every position, masked positions multiplied by 0."""
    return (fn(student_logits, teacher_logits) * mask.to(D64)).sum()


def _mask(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.35
    mask[0, 0] = True  # at least one valid position
    return mask


def _divergence(name, temperature=1.7):
    return get_divergence(name, temperature=temperature, beta=0.3, alpha=0.2)


def _topk_teacher(teacher_logits, mask, k, temperature):
    """A SparseTeacher built the obvious way: top-k of the full log-softmax, the tail as log(1 - sum top-k)."""
    logp = F.log_softmax(teacher_logits[mask] / temperature, dim=-1)  # (N, V)
    values, indices = logp.topk(k, dim=-1)
    tail = (
        torch.log1p(-values.exp().sum(-1).clamp(max=1.0))
        if k < logp.shape[-1]
        else torch.full_like(values[:, 0], -math.inf)
    )
    return SparseTeacher(values, indices, tail)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_plain_value_and_gradient(name, chunk):
    torch.manual_seed(1)
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=D64)
    mask, fn = _mask(), _divergence(name)
    ref = _reference_sum(fn, student, teacher, mask)
    (g_ref,) = torch.autograd.grad(ref, student)
    out = chunked_divergence_sum(fn, student, teacher, mask, chunk_size=chunk)
    (g_out,) = torch.autograd.grad(out, student)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    assert torch.allclose(g_out, g_ref, atol=1e-12, rtol=1e-12)
    assert (g_out[~mask] == 0).all()


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_fused_equals_plain_value_and_gradients(name, chunk):
    torch.manual_seed(2)
    hidden = torch.randn(B, T, H, dtype=D64, requires_grad=True)
    weight = torch.randn(V, H, dtype=D64, requires_grad=True)
    bias = torch.randn(V, dtype=D64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(B, T, 2 * H, dtype=D64), torch.randn(V, 2 * H, dtype=D64)
    mask, fn = _mask(1), _divergence(name)
    # Reference: project everything, then the plain loss.
    ref = _reference_sum(fn, F.linear(hidden, weight, bias), teacher_hidden @ teacher_weight.T, mask)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    out = fused_divergence_sum(
        fn, LinearHead(hidden, weight, bias), LinearHead(teacher_hidden, teacher_weight), mask, chunk_size=chunk
    )
    out_grads = torch.autograd.grad(out, (hidden, weight, bias))
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    for g_out, g_ref in zip(out_grads, ref_grads):
        assert torch.allclose(g_out, g_ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("name", ["jsd", "fkl", "rkl"])  # fkl and rkl take the closed-form gradient
@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
def test_kd_sums_mix_cross_entropy_like_the_reference(name, kd_ratio):
    # The cross-entropy is at temperature 1 whatever the divergence's temperature (as in word_level_kd_sum).
    torch.manual_seed(3)
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=D64)
    labels = torch.randint(0, V, (B, T))
    mask, fn = _mask(2), _divergence(name, temperature=1.7)
    ref_ce = F.cross_entropy(student[mask], labels[mask], reduction="sum")
    ref_kd = _reference_sum(fn, student, teacher, mask)
    ref = (1 - kd_ratio) * ref_ce + kd_ratio * ref_kd
    (g_ref,) = torch.autograd.grad(ref, student)
    sums = fused_kd_sums(student, teacher, mask, fn, labels, kd_ratio, chunk_size=2)
    (g_out,) = torch.autograd.grad(sums.total, student)
    assert torch.allclose(sums.total, ref, atol=1e-12) and torch.allclose(g_out, g_ref, atol=1e-12)
    assert torch.allclose(sums.kd, ref_kd.detach(), atol=1e-12)
    if kd_ratio < 1:
        assert torch.allclose(sums.ce, ref_ce.detach(), atol=1e-12)


@pytest.mark.parametrize("name", ["fkl", "skl", "jsd"])
def test_teacher_zeros_count_zero(name):
    # A teacher logit of -inf (p = 0) contributes nothing to FKL and its relatives, in value and gradient.
    torch.manual_seed(8)
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=D64)
    teacher[..., :3] = -math.inf
    mask, fn = _mask(5), _divergence(name)
    ref = _reference_sum(fn, student, teacher, mask)
    (g_ref,) = torch.autograd.grad(ref, student)
    out = chunked_divergence_sum(fn, student, teacher, mask, 4)
    (g_out,) = torch.autograd.grad(out, student)
    assert torch.isfinite(out) and torch.allclose(out, ref, atol=1e-12) and torch.allclose(g_out, g_ref, atol=1e-12)


def test_all_masked_gives_zero_and_zero_gradient():
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    out = chunked_divergence_sum(_divergence("fkl"), student, torch.randn(B, T, V, dtype=D64), torch.zeros(B, T), 4)
    out.backward()
    assert out.item() == 0.0 and (student.grad == 0).all()


def test_no_graph_when_nothing_needs_a_gradient():
    student, teacher = torch.randn(B, T, V, dtype=D64), torch.randn(B, T, V, dtype=D64)
    out = chunked_divergence_sum(_divergence("rkl"), student, teacher, _mask(), 4)
    assert not out.requires_grad
    assert torch.allclose(out, _reference_sum(_divergence("rkl"), student, teacher, _mask()), atol=1e-12)


def test_scaled_loss_scales_the_gradient():
    # The gradient is stored for d(sum)/d(logits); a loss that multiplies the sum must scale it in backward.
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    teacher, mask, fn = torch.randn(B, T, V, dtype=D64), _mask(), _divergence("tvd")
    (g_ref,) = torch.autograd.grad(-2.5 * _reference_sum(fn, student, teacher, mask), student)
    (g_out,) = torch.autograd.grad(-2.5 * chunked_divergence_sum(fn, student, teacher, mask, 3), student)
    assert torch.allclose(g_out, g_ref, atol=1e-12)


def test_a_second_backward_is_refused_not_silently_zero():
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    out = 3.0 * chunked_divergence_sum(_divergence("fkl"), student, torch.randn(B, T, V, dtype=D64), _mask(), 4)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.backward()


def test_default_chunk_size_bounds_the_chunk():
    assert default_chunk_size(151_936) == 2**24 // 151_936 == 110
    assert default_chunk_size(8_192) == 2_048
    assert default_chunk_size(10**9) == 16


# ----------------------------------------------------------------------------------------------------------------
# Sparse teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_sparse_teacher_with_k_equal_vocab_is_the_dense_divergence(name):
    torch.manual_seed(4)
    student = torch.randn(B, T, V, dtype=D64, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=D64)
    mask, fn = _mask(3), _divergence(name)
    ref = _reference_sum(fn, student, teacher, mask)
    (g_ref,) = torch.autograd.grad(ref, student)
    sparse = _topk_teacher(teacher, mask, V, temperature=1.7)  # every token, in the teacher's order
    out = sparse_divergence_sum(fn, student, sparse, mask, chunk_size=4)
    (g_out,) = torch.autograd.grad(out, student)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(g_out, g_ref, atol=1e-12)


def test_sparse_forward_kl_by_hand():
    # p = (0.7, 0.2, 0.1), q = (0.2, 0.3, 0.5), k = 1: the teacher keeps token 0 and a tail of 0.3; the student's
    # tail is everything outside token 0, 0.3 + 0.5 = 0.8. Buckets: p = (0.7, 0.3), q = (0.2, 0.8).
    # FKL = 0.7 ln(0.7 / 0.2) + 0.3 ln(0.3 / 0.8); RKL = 0.2 ln(0.2 / 0.7) + 0.8 ln(0.8 / 0.3)
    p, q = torch.tensor([0.7, 0.2, 0.1], dtype=D64), torch.tensor([0.2, 0.3, 0.5], dtype=D64)
    top, idx, tail = p.log()[:1], torch.tensor([0]), torch.tensor(0.3, dtype=D64).log()
    fkl = sparse_divergence(get_divergence("fkl"), q.log(), top, idx, tail)
    rkl = sparse_divergence(get_divergence("rkl"), q.log(), top, idx, tail)
    assert fkl.item() == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.3 * math.log(0.3 / 0.8), rel=1e-12)
    assert rkl.item() == pytest.approx(0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3), rel=1e-12)


def test_sparse_tail_bucket_temperature_by_hand():
    # At temperature 2 the student (logits log q) becomes q^(1/2) / Z. q = (0.64, 0.36): sqrt -> (0.8, 0.6),
    # Z = 1.4, q_T = (4/7, 3/7). A teacher whose tempered top-1 is token 1 with log-prob ln 0.5 and tail ln 0.5:
    # FKL = 0.5 ln(0.5 / (3/7)) + 0.5 ln(0.5 / (4/7)).
    q = torch.tensor([0.64, 0.36], dtype=D64)
    half = torch.tensor(0.5, dtype=D64).log()
    value = sparse_divergence(get_divergence("fkl", temperature=2.0), q.log(), half[None], torch.tensor([1]), half)
    assert value.item() == pytest.approx(0.5 * math.log(3.5 / 3) + 0.5 * math.log(3.5 / 4), rel=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_sparse_divergence_is_at_most_the_dense_one(name):
    # Merging the tail into one bucket is a coarse-graining: no divergence here can grow under it.
    torch.manual_seed(5)
    student, teacher = 2 * torch.randn(64, V, dtype=D64), 2 * torch.randn(64, V, dtype=D64)
    fn = _divergence(name)
    dense = fn(student, teacher)
    for k in (1, 3, 10):
        sparse = _topk_teacher(teacher, torch.ones(64, dtype=torch.bool), k, temperature=1.7)
        bucketed = sparse_divergence(fn, student, sparse.logprobs, sparse.indices, sparse.tail_logprob)
        assert (bucketed <= dense + 1e-12).all() and (bucketed >= -1e-12).all()


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_sparse_fused_equals_sparse_plain(name):
    torch.manual_seed(6)
    hidden = torch.randn(B, T, H, dtype=D64, requires_grad=True)
    weight = torch.randn(V, H, dtype=D64, requires_grad=True)
    mask, fn = _mask(4), _divergence(name)
    sparse = _topk_teacher(torch.randn(B, T, V, dtype=D64), mask, 4, temperature=1.7)
    # Reference: the per-position sparse divergence on the projected logits at the valid positions.
    logits = hidden[mask] @ weight.T
    ref = sparse_divergence(fn, logits, sparse.logprobs, sparse.indices, sparse.tail_logprob).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    out = fused_divergence_sum(fn, LinearHead(hidden, weight), sparse, mask, chunk_size=3)
    out_grads = torch.autograd.grad(out, (hidden, weight))
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(out_grads, ref_grads))


def test_sparse_teacher_must_match_the_mask():
    sparse = SparseTeacher(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="2 positions"):
        sparse_divergence_sum(_divergence("fkl"), torch.randn(B, T, V), sparse, torch.ones(B, T))


# ----------------------------------------------------------------------------------------------------------------
# make_kd_loss options on a real (tiny) model
# ----------------------------------------------------------------------------------------------------------------


def _llama(seed, hidden, layers, vocab=41, **extra):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(D64)


def _batch():
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 41, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("name", ["fkl", "srkl"])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_make_kd_loss_options_match_the_plain_loss_and_gradients(name, kd_ratio):
    teacher, batch = _llama(0, 16, 2).eval(), _batch()
    fn = _divergence(name, temperature=1.3)
    results = []
    for options in ({}, {"chunk_size": 2}, {"fused": True, "chunk_size": 3}, {"fused": True}):
        student = _llama(1, 8, 1)
        out = make_kd_loss(teacher, fn, kd_ratio, **options)(student, batch)
        out.loss_sum.backward()
        results.append((out, {n: p.grad for n, p in student.named_parameters()}))
    (ref, ref_grads), others = results[0], results[1:]
    for out, grads in others:
        assert torch.allclose(out.loss_sum, ref.loss_sum, atol=1e-11)
        assert out.logs == pytest.approx(ref.logs, rel=1e-9, abs=1e-12)
        for key, g in ref_grads.items():
            assert torch.allclose(grads[key], g, atol=1e-11), key


def test_final_hidden_and_head_refuses_a_soft_capped_head():
    model, batch = _llama(0, 8, 1), _batch()
    head = final_hidden_and_head(model, batch)
    with torch.no_grad():
        assert torch.allclose(
            F.linear(head.hidden, head.weight),
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        )

    class Capped(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30.0 * torch.tanh(out.logits / 30.0)
            return out

    capped = Capped(model.config).to(D64)
    with torch.no_grad():
        capped.lm_head.weight.mul_(100.0)  # logits large enough for the cap to bite
    with pytest.raises(ConfigError, match="fused=False"):
        final_hidden_and_head(capped, batch)


def test_make_kd_loss_needs_a_teacher_signal():
    with pytest.raises(ConfigError, match="teacher"):
        make_kd_loss(None, _divergence("fkl"))
    with pytest.raises(ConfigError, match="chunk_size"):
        make_kd_loss(_llama(0, 8, 1), _divergence("fkl"), chunk_size=0)


def test_sft_projects_only_the_targets_with_the_plain_value_and_gradient():
    # causal_lm_loss on a Llama projects the valid positions only (fused_cross_entropy_sum); the reference here is
    # the plain full-logit NLL, written out: shift, then cross-entropy over every position whose label is not -100.
    batch = _batch()
    fused_model, plain_model = _llama(1, 8, 1), _llama(1, 8, 1)
    assert projects_from_hidden(fused_model)
    fused = causal_lm_loss(fused_model, batch).loss_sum
    logits = plain_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, 41), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    fused.backward()
    plain.backward()
    assert torch.allclose(fused, plain, atol=1e-11)
    for (name, a), (_, b) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-11), name


def test_sft_keeps_the_full_logits_for_a_model_that_soft_caps():
    model = _llama(1, 8, 1, final_logit_softcapping=30.0)  # a config that soft-caps: never projected by hand
    assert not projects_from_hidden(model)
    batch = _batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, 41), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert torch.allclose(causal_lm_loss(model, batch).loss_sum, plain)

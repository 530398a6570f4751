"""The device tests (`pytest -m device`): every path that a GPU run takes, run on the `device` fixture (tests/conftest.py:
$DISTILLAB_TEST_DEVICE, else cuda where present, else cpu) in float32 and under bfloat16 autocast, and compared with
a float64 reference computed on the CPU. They pass on a CPU (device = cpu) and need no change for device = cuda;
benchmarks/gpu_check.py runs them first on a GPU machine.

Tolerances, derived rather than tuned:
- A rounding to a format with p significant bits errs by at most u = 2^-p relative: float32 u = 2^-24, bfloat16
  (8 significant bits: 7 stored plus the implicit one) u = 2^-8 = 0.39%.
- One logit z = sum_i h_i W_i under bf16 autocast: h and W are each rounded to bf16 (the product errs by at most 2u
  relative), the products are accumulated in float32 (H additions, at most H u_32 relative) and the result rounded
  to bf16 (u): |dz| <= (3 u + H u_32) S with S = sum_i |h_i W_i|. In float32: |dz| <= (H + 1) u_32 S.
- A divergence D(z_s, z_t) then moves by at most sum_v |dD/dz_s,v| |dz_s,v| + |dD/dz_t,v| |dz_t,v| to first order;
  the test computes those gradients in float64 and allows twice that bound (the second-order rest).
- A whole model stacks 2L + 1 rounded matmul stages (attention and MLP per layer, the head), each amplified by what
  follows it, so for a model the bound is stated, not computed: the loss within 16 u relative (bf16: 6.3%; 2 stages
  of the 1-layer students here, 3 u each, and a factor of about 2.5 for normalisation and softmax), the gradient with
  cosine >= 1 - 16 u against float64, and float32 within 1e-4 relative (hundreds of u_32: accumulation order differs
  between CPU and GPU kernels, so bitwise equality is not the claim).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from core.data import Collator
from core.generate import sample_completions
from core.logit_cache import get_logit_cache
from core.losses import DIVERGENCES, get_divergence
from core.objectives import make_kd_loss
from core.precision import autocast, use_precision
from core.train import TrainConfig, Trainer

pytestmark = pytest.mark.device

U32, U16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and of bfloat16 (8 significant bits)
D64 = torch.float64
PRECISIONS = ["fp32", "bf16"]
MODEL_RTOL = {"fp32": 1e-4, "bf16": 16 * U16}  # whole models: the module docstring's derivation
VOCAB = 53


def _unit(precision: str) -> float:
    return U16 if precision == "bf16" else 0.0


# ----------------------------------------------------------------------------------------------------------------
# the divergences, from logits projected on the device
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_on_device_within_the_rounding_bound(device, precision, name):
    gen = torch.Generator().manual_seed(3)
    n, hidden, vocab = 24, 48, 301
    h_s, h_t = torch.randn(n, hidden, generator=gen, dtype=D64), torch.randn(n, hidden, generator=gen, dtype=D64)
    w_s = torch.randn(vocab, hidden, generator=gen, dtype=D64) / hidden**0.5
    w_t = 2 * torch.randn(vocab, hidden, generator=gen, dtype=D64) / hidden**0.5
    fn = get_divergence(name, temperature=1.5)
    # float64 reference on the CPU, and its gradients with respect to both models' logits
    z_s, z_t = (h_s @ w_s.T).requires_grad_(), (h_t @ w_t.T).requires_grad_()
    reference = fn(z_s, z_t).sum()
    g_s, g_t = torch.autograd.grad(reference, (z_s, z_t))
    reference = reference.detach()
    per_logit = 3 * _unit(precision) + (hidden + 1) * U32  # |dz| / S (module docstring)
    bound_s, bound_t = per_logit * (h_s.abs() @ w_s.abs().T), per_logit * (h_t.abs() @ w_t.abs().T)
    tolerance = 2 * float((g_s.abs() * bound_s).sum() + (g_t.abs() * bound_t).sum()) + n * U32 * abs(float(reference))
    on = [t.to(device, torch.float32) for t in (h_s, w_s, h_t, w_t)]
    with autocast(device, precision):
        student, teacher = F.linear(on[0], on[1]), F.linear(on[2], on[3])
        value = fn(student, teacher).sum()
    assert value.dtype == torch.float32  # the loss in float32 whatever the logits' precision
    assert abs(float(value) - float(reference)) <= tolerance


# ----------------------------------------------------------------------------------------------------------------
# make_kd_loss on tiny models: plain, chunked, fused, the teacher cache
# ----------------------------------------------------------------------------------------------------------------


def _llama(seed: int, hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(D64).eval()


def _features(n: int = 6, seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(3, 7, (2,), generator=gen))
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(1, -1).to(D64), b.reshape(1, -1).to(D64)).item())


def _loss_and_grads(student, teacher, batch, path: str, precision: str, device, cache_root=None):
    options = {"plain": {}, "chunked": {"chunk_size": 5}, "fused": {"fused": True, "chunk_size": 5}}.get(path, {})
    fn = get_divergence("fkl")
    if path == "cache":
        # k = V: the cache holds the whole distribution, so its forward KL equals the live teacher's
        cache = get_logit_cache(
            teacher, _features(), cache_root, tokenizer_key="t", pad_token_id=0, k=VOCAB, batch_size=4
        )
        loss_fn = make_kd_loss(None, fn, 0.5, teacher_cache=cache)
    else:
        loss_fn = make_kd_loss(teacher, fn, 0.5, **options)
    with autocast(device, precision):
        out = loss_fn(student, _to(batch, device))
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.detach().cpu() for n, p in student.named_parameters()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", ["plain", "chunked", "fused", "cache"])
def test_kd_paths_on_device_match_the_float64_reference(device, precision, path, tmp_path):
    batch = Collator(0)(_features())
    teacher, student = _llama(0, 32, 2), _llama(1, 16, 1)
    ref_loss, ref_grads = _loss_and_grads(student, teacher, batch, "plain", "fp32", torch.device("cpu"))
    student.zero_grad(set_to_none=True)
    on_teacher, on_student = teacher.to(device, torch.float32), student.to(device, torch.float32)
    loss, grads = _loss_and_grads(on_student, on_teacher, batch, path, precision, device, tmp_path)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref_loss), rel=MODEL_RTOL[precision])
    for key, g in ref_grads.items():
        assert _cosine(grads[key], g) >= 1 - MODEL_RTOL[precision], key


def test_the_teacher_cache_is_built_in_float32_under_bf16(device, tmp_path):
    """One cache serves runs of either precision: built inside a bf16 autocast block it holds the float32 values."""
    teacher, features = _llama(0, 32, 2).to(device, torch.float32), _features()
    options = {"tokenizer_key": "t", "pad_token_id": 0, "k": 8, "batch_size": 4, "samples": 0}
    plain = get_logit_cache(teacher, features, tmp_path / "a", **options)
    with autocast(device, "bf16"):
        under_bf16 = get_logit_cache(teacher, features, tmp_path / "b", **options)
    batch = Collator(0)(features)
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    a, b = plain.sparse_teacher(batch, mask), under_bf16.sparse_teacher(batch, mask)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.logprobs.float(), b.logprobs.float(), rtol=0, atol=1e-3)  # float16 storage: 2^-11


# ----------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_generation_on_device_follows_the_float64_tokens(device, precision):
    """Greedy tokens agree with float64 up to the first step whose float64 top-2 margin is within the rounding
    bound (where either token is a correct argmax); in float32 that bound is far below every margin here."""
    model = _llama(0, 32, 2)
    prompts = [f["input_ids"][:4] for f in _features(4, seed=5)]
    steps = 8
    reference = sample_completions(
        model, prompts, eos_token_id=-1, pad_token_id=0, max_new_tokens=steps, do_sample=False
    )
    on = model.to(device, torch.float32)
    found = sample_completions(
        on, prompts, eos_token_id=-1, pad_token_id=0, max_new_tokens=steps, do_sample=False, precision=precision
    )
    model = on.to("cpu", D64)
    for prompt, ref, got in zip(prompts, reference, found):
        assert len(got) == steps
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ref])).logits[0, len(prompt) - 1 : -1]  # (steps, V)
        top2 = logits.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        allowed = MODEL_RTOL[precision] * 2 * logits.abs().max(-1).values  # both logits may move by rtol x scale
        for step in range(steps):
            if margin[step] <= allowed[step]:
                break  # a near tie: from here on the two runs may rightly differ
            assert got[step] == ref[step], (precision, step)
        if precision == "fp32":
            assert got == ref


# ----------------------------------------------------------------------------------------------------------------
# the training loop: exact resume on the device, and the losses against float64
# ----------------------------------------------------------------------------------------------------------------


def _accelerator(device) -> Accelerator:
    """An Accelerator on `device`; Accelerate keeps one process-wide state, reset when the device changes."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().device.type != torch.device(device).type:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=torch.device(device).type == "cpu")


def _run(out, device, dtype, precision, steps, stop_after=None):
    model = _llama(1, 16, 1).to(dtype).train()
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=0, stop_after=stop_after)
    features = _features(12, seed=2)
    from core.objectives import causal_lm_loss

    trainer = Trainer(
        model, causal_lm_loss, features, Collator(0), cfg, out, _accelerator(device), precision=precision, desc="t"
    )
    trainer.train()
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in (out / "log.jsonl").read_text().splitlines()]
    return trainer, losses


@pytest.mark.parametrize("precision", PRECISIONS)
def test_trainer_resumes_exactly_on_device_and_tracks_float64(device, precision, tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math attention kernel: CUDA's fused attention backward kernels may add in any order
    with sdpa_kernel(SDPBackend.MATH):
        straight, losses = _run(tmp_path / "a", device, torch.float32, precision, steps=4)
        _run(tmp_path / "b", device, torch.float32, precision, steps=4, stop_after=2)
        resumed, resumed_losses = _run(tmp_path / "b", device, torch.float32, precision, steps=4)
    # CPU kernels are deterministic: bitwise. On CUDA an atomic addition (the embedding's backward) may still reorder
    # float32 sums by an ulp, which a later bf16 rounding can turn into one bf16 ulp: allow that much, no more.
    exact = torch.device(device).type == "cpu"
    rtol = 1e-6 if precision == "fp32" else U16
    assert resumed_losses == losses if exact else resumed_losses == pytest.approx(losses, rel=rtol)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=100 * rtol, atol=1e-6), name
    _, reference = _run(tmp_path / "c", "cpu", D64, "fp32", steps=4)
    # first step: the same weights, so the loss obeys the model tolerance; Adam's later steps move each weight by
    # about lr whatever the gradient's size, so allow the tolerance to double per step
    for step, (got, ref) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(ref, rel=MODEL_RTOL[precision] * 2**step), step
    _accelerator(device)  # leave Accelerate on the test's device


def test_use_precision_sets_and_restores_the_process_default():
    from core.precision import get_precision

    before = get_precision()
    with use_precision("bf16"):
        assert get_precision() == "bf16"
    assert get_precision() == before

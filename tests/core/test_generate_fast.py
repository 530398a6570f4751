"""The lean decoding loop of core.generate (issue 31): the same tokens as the reference paths (HF generate alone,
the two-model loop `_sample_mixture` for the mixture) under fixed seeds, its KV cache against a forward without
cache, and the cases it leaves to the reference paths."""

from collections import Counter

import pytest
import torch

import core.generate as G
from core.data import DataConfig, encode_prompt, load_ops
from core.models import build_model
from core.precision import autocast
from core.tokenizers import train_bpe


@pytest.fixture(scope="module")
def setup():
    task = load_ops(DataConfig(train_size=64, eval_size=8))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 320)
    student, teacher = build_model("tiny", tokenizer, seed=0), build_model("student", tokenizer, seed=1)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in task.train[:9]]  # lengths differ: left padding
    pad = tokenizer.pad_token_id
    # An untrained model rarely samples the real EOS; take as "EOS" the token it samples most, so that rows end at
    # different steps and the finished-row padding, masks and positions are exercised.
    first = G.sample_completions(student, prompts, tokenizer.eos_token_id, pad, 8, seed=0)
    eos = Counter(t for row in first for t in row).most_common(1)[0][0]
    return student, teacher, prompts, eos, pad


def _both(monkeypatch, fn):
    """fn() with the reference paths, then with the lean loop."""
    monkeypatch.setattr(G, "FAST_DECODING", False)
    reference = fn()
    monkeypatch.setattr(G, "FAST_DECODING", True)
    return reference, fn()


SETTINGS = [
    {},
    {"temperature": 0.7, "top_p": 0.9},
    {"top_k": 5, "temperature": 1.5},
    {"do_sample": False},
    {"mix": 0.5},
    {"mix": 1.0},
    {"mix": 0.3, "temperature": 1.3, "top_p": 0.8},
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_lean_loop_samples_the_reference_tokens(setup, monkeypatch, settings, precision):
    # Under --precision bf16 the lean loop casts each weight once and each linear's input once per step; autocast
    # casts both at every call (under inference mode it caches no cast). The roundings are the same, so are the
    # tokens. The teacher's weights are frozen, as a run freezes them.
    student, teacher, prompts, eos, pad = setup
    settings = dict(settings)
    mix = settings.pop("mix", 0.0)
    if mix:
        settings |= {"mix_model": teacher, "mix_alpha": mix}

    def draw():
        return [
            G.sample_completions(student, prompts, eos, pad, 8, seed=s, precision=precision, **settings)
            for s in range(4)
        ]  # fmt: skip

    teacher.requires_grad_(False)
    try:
        reference, lean = _both(monkeypatch, draw)
    finally:
        teacher.requires_grad_(True)
    assert lean == reference  # bit-identical tokens, seed for seed
    ends = [len(c) for run in lean for c in run]
    assert min(ends) < 8 and max(ends) == 8 or settings.get("do_sample") is False  # rows end at different steps


def test_lean_step_under_bf16_computes_in_bf16(setup):
    # The bf16 step is not float32 in disguise: its weights are bfloat16 copies and its logits move off float32's
    # by bf16 rounding (8 significant bits: a relative error of order 2^-8 on logits of order 1, well above float32's).
    _, teacher, prompts, _, pad = setup
    ids, mask = G.left_padded(prompts, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for precision in ("fp32", "bf16"):
        with autocast("cpu", precision), torch.inference_mode():
            decoder = G._LeanDecoder(teacher, ids.shape[1] + 1)
            decoder.prefill(ids, mask, positions)
            full = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).bool()
            logits[precision] = decoder.step(ids[:, -1], positions[:, -1] + 1, full, ids.shape[1])
            dtypes = {w.dtype for w in decoder.weights.values()}
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    gap = (logits["bf16"] - logits["fp32"]).abs().max().item()
    assert 1e-4 < gap < 0.5 * logits["fp32"].abs().max().item()


def test_lean_loop_runs_the_full_forward_once_per_model(setup, monkeypatch):
    # The old loops called each model's full forward once per new token; the lean loop only for the prompt.
    student, teacher, prompts, eos, pad = setup
    calls = Counter()
    for name, model in (("student", student), ("teacher", teacher)):
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, _f=forward, _n=name, **k: (calls.update([_n]), _f(*a, **k))[1])
    G.sample_completions(student, prompts, -1, pad, 6, seed=0, mix_model=teacher, mix_alpha=0.5)  # never ends early
    assert calls == {"student": 1, "teacher": 1}


def test_lean_cache_matches_a_forward_without_cache(setup):
    # Feeding tokens one by one through the preallocated cache gives, at every step, the last-position logits of
    # one forward over the whole (left-padded) sequence without any cache, to float32 rounding.
    _, teacher, prompts, _, pad = setup
    teacher.eval()
    ids, mask = G.left_padded(prompts[:5], pad)
    new = torch.randint(3, teacher.config.vocab_size, (5, 6), generator=torch.Generator().manual_seed(0))
    width = ids.shape[1]
    decoder = G._LeanDecoder(teacher, width + new.shape[1])
    with torch.inference_mode():
        decoder.prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        seen = mask.sum(-1)
        full_ids, full_mask = ids, mask
        for step in range(new.shape[1]):
            seen = seen + 1
            logits = decoder.step(
                new[:, step],
                seen - 1,
                torch.cat([mask, torch.ones(5, step + 1, dtype=torch.long)], 1).bool(),
                width + step,
            )
            full_ids = torch.cat([full_ids, new[:, step : step + 1]], 1)
            full_mask = torch.cat([full_mask, torch.ones(5, 1, dtype=torch.long)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            expected = teacher(input_ids=full_ids, attention_mask=full_mask, position_ids=positions, use_cache=False)
            torch.testing.assert_close(logits, expected.logits[:, -1].float(), rtol=1e-5, atol=1e-5)


def test_other_models_and_processors_take_the_reference_path(setup, monkeypatch):
    student, _, prompts, eos, pad = setup
    assert G._lean_decodable(student.eval()) and G._neutral_generation_config(student)
    assert not G._lean_decodable(student.train())  # (sample_completions puts it in eval mode first)
    student.eval()
    # A generation config that adds a logits processor (repetition penalty) is decoded by HF generate itself,
    # so it still applies: same tokens as FAST_DECODING off.
    monkeypatch.setattr(student.generation_config, "repetition_penalty", 1.3)
    assert not G._neutral_generation_config(student)
    reference, lean = _both(monkeypatch, lambda: G.sample_completions(student, prompts, eos, pad, 6, seed=2))
    assert lean == reference


def _family(name: str, vocab: int, seed: int, **extra) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of one of core.generate.LEAN_FAMILIES (2 layers, grouped-query)."""
    import transformers

    config_class = getattr(transformers, name.replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    if name == "Qwen2ForCausalLM":  # its q/k/v biases start at zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["Qwen2ForCausalLM", "MistralForCausalLM"])
def test_lean_loop_samples_the_reference_tokens_of_qwen2_and_mistral(setup, monkeypatch, family, precision):
    # Qwen2 (q/k/v biases) and Mistral without a sliding window run Llama's layer, so the lean loop decodes them
    # too: the same tokens as HF generate alone, and as _sample_mixture with a teacher of the same family.
    _, _, prompts, eos, pad = setup
    vocab = max(max(p) for p in prompts) + 8
    student, teacher = _family(family, vocab, 0), _family(family, vocab, 1)
    assert G._lean_decodable(student, 64)  # Mistral's default window (4,096) masks nothing in 64 tokens
    teacher.requires_grad_(False)

    def draw():
        return [
            G.sample_completions(student, prompts, eos, pad, 8, seed=s, precision=precision, **mix)
            for s in range(3)
            for mix in ({}, {"mix_model": teacher, "mix_alpha": 0.4}, {"do_sample": False})
        ]  # fmt: skip

    reference, lean = _both(monkeypatch, draw)
    assert lean == reference


def test_sliding_windows_that_mask_take_the_reference_path(setup, monkeypatch):
    # A sliding window shorter than prompt + completion changes the mask the lean step would need: such calls are
    # decoded by HF generate (the same tokens either way, so the choice is checked on _lean_decodable itself).
    mistral = _family("MistralForCausalLM", 64, 0, sliding_window=16)
    assert G._lean_decodable(mistral, 16) and not G._lean_decodable(mistral, 17) and not G._lean_decodable(mistral)
    qwen = _family("Qwen2ForCausalLM", 64, 0, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert "sliding_attention" in qwen.config.layer_types and not G._lean_decodable(qwen, 17)
    # Qwen2 configs carry a sliding_window even where no layer uses it (use_sliding_window false): lean at any width.
    plain = _family("Qwen2ForCausalLM", 64, 0, sliding_window=16)
    assert set(plain.config.layer_types) == {"full_attention"} and G._lean_decodable(plain, 1000)
    # Through sample_completions: prompts of 3 + 20 new tokens against a window of 16 take HF generate.
    calls, lean = [], G._decode
    monkeypatch.setattr(G, "_decode", lambda *a, **k: (calls.append(1), lean(*a, **k))[1])
    assert len(G.sample_completions(mistral, [[1, 5, 7]], -1, 0, 20, seed=0)[0]) == 20
    assert calls == []
    assert len(G.sample_completions(mistral, [[1, 5, 7]], -1, 0, 10, seed=0)[0]) == 10  # 3 + 10 <= 16: lean
    assert calls == [1]

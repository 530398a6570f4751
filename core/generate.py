"""Batched decoding (greedy or sampled) with a KV cache: Hugging Face `generate`, or the lean loop below.

Prompts are encoded exactly as in training (`core.data.encode_prompt`) and left-padded, so every row's last
prompt token sits at the same position and positions are taken from the attention mask.

The lean loop (`_decode`, issue 31) serves Llama-family models (the presets, SmolLM2, pruned students) and the
two-model mixture: the prompt runs once through the model's own forward, its keys and values go into a cache
preallocated for the whole completion, and each new token runs the model's own submodules (norms, projections,
rotary embedding, the attention function that `config._attn_implementation` names) on that cache, without the
per-step mask building, cache concatenation and output plumbing of a full forward; token ids and the attention
mask are written into preallocated buffers. The arithmetic is the same as the full forward's, operation for
operation, so the logits and every sampled token are bit-identical to HF `generate` (plain) and to the two-model
loop `_sample_mixture` (mixture) under the same seed: tests/core/test_generate_fast.py. Any other model, or a
generation config that would add logits processors, takes the old paths.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.data import encode_prompt
from core.precision import autocast


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no fixed table, e.g. none in the config)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_budget(model: torch.nn.Module, max_length: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens kept at most, new tokens generated at most) so that prompt + completion stay within
    --max-length and the model's positions, split as a training example is (core.data.encode_example): the prompt
    keeps at least half of the limit, the completion gets the rest up to `max_new_tokens`. At least 1 prompt token
    (the BOS)."""
    limit = max_length
    positions = position_limit(model)
    if positions is not None:
        limit = min(limit, positions)
    prompt = max(1, limit - max_new_tokens, limit // 2)
    return prompt, max(1, min(max_new_tokens, limit - prompt))


def prompt_budget(model: torch.nn.Module, max_length: int, max_new_tokens: int) -> int:
    """How many prompt tokens a generation may keep (generation_budget's first half)."""
    return generation_budget(model, max_length, max_new_tokens)[0]


def cut_prompt(prompt_ids: Sequence[int], budget: int) -> list[int]:
    """Cut a prompt from the left to `budget` tokens, keeping its first (BOS) token, as core.data.encode_example
    cuts a training prompt (the end of a prompt matters most)."""
    budget = max(1, budget)
    ids = list(prompt_ids)
    return ids if len(ids) <= budget else ids[:1] + ids[len(ids) - budget + 1 :]


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]  # without the EOS and padding
    text: str


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with the torch RNG (CPU, and the accelerator's) seeded; restore the previous state after."""
    device = torch.device(device)
    accelerators = [device] if device.type in ("cuda", "mps") else []
    kwargs = {"device_type": device.type} if accelerators else {}
    with torch.random.fork_rng(devices=accelerators, **kwargs):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    seed: int | None = None,
    mix_model: torch.nn.Module | None = None,
    mix_alpha: float = 0.0,
    precision: str | None = None,
) -> list[list[int]]:
    """Completions of tokenized prompts in one batch: left-padded, KV cache.

    From `model` alone: HF `generate`. With `mix_model` and mix_alpha > 0: token by token from the mixture
    (1 - mix_alpha) model + mix_alpha mix_model (`_sample_mixture`; MiniLLM's teacher-mixed sampling).
    Each completion is cut after its first EOS, which is kept (it is a target: the model must learn to stop);
    a completion that reached max_new_tokens has no EOS. The models are put in eval mode for sampling and back
    into the mode they were in. With `seed`, sampling is seeded (see `seeded`). `precision` (default: the process's,
    --precision): bf16 decodes under bfloat16 autocast (core/precision.py); the sampled distributions are float32."""
    mixing = mix_model is not None and mix_alpha > 0
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if mixing and (top_k or not do_sample):
        raise ValueError("mixture sampling draws from the whole mixture: no top_k, no greedy decoding")
    models = [model, mix_model] if mixing else [model]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_padded(prompts, pad_token_id))
    width = input_ids.shape[1]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if do_sample
        else {"do_sample": False}
    )
    context = seeded(seed, device) if seed is not None else contextlib.nullcontext()
    fast = FAST_DECODING and all(_lean_decodable(m, width + max_new_tokens) for m in models)
    fast = fast and (mixing or _neutral_generation_config(model))
    try:
        with context, autocast(device, precision), torch.inference_mode():
            if fast:
                out = _decode(
                    model, mix_model if mixing else None, mix_alpha, input_ids, attention_mask, eos_token_id,
                    pad_token_id, max_new_tokens, temperature, top_p, top_k, do_sample,
                )  # fmt: skip
            elif mixing:
                out = _sample_mixture(
                    model, mix_model, mix_alpha, input_ids, attention_mask, eos_token_id, pad_token_id,
                    max_new_tokens, temperature, top_p,
                )  # fmt: skip
            else:
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    use_cache=True,
                    **sampling,
                )
    finally:
        for m, was_training in zip(models, modes):
            m.train(was_training)
    return _cut_after_eos(out[:, width:].tolist(), eos_token_id)


def left_padded(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts left-padded to the longest, so every row's next token is the last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return (input_ids, attention_mask) if device is None else (input_ids.to(device), attention_mask.to(device))


def _cut_after_eos(rows: list[list[int]], eos_token_id: int) -> list[list[int]]:
    """Each completion up to and including its first EOS (a completion without EOS ran out of tokens)."""
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]


def _next_token_logits(model, input_ids, attention_mask, past):
    """One decoding step with the KV cache: the full left-padded prompt first, then only the newest token.
    Positions count real tokens only (a left-padded row starts at position 0), as HF generate does."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if past is not None:
        input_ids, position_ids = input_ids[:, -1:], position_ids[:, -1:]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=past,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.cache  # (B, V)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalized (top_p 1: unchanged)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def _sample_mixture(
    model, mix_model, mix_alpha, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens, temperature,
    top_p,
) -> torch.Tensor:  # fmt: skip
    """The decoding loop of a two-model mixture: at every step both models see the same prefix (each with its own
    KV cache), their next-token distributions at `temperature`, each cut to `top_p`, are mixed in probability space
    and one token per row is drawn with torch.multinomial (as HF `generate` draws, so mix_alpha 0 gives its very
    tokens under the same seed: tests/core/test_onpolicy.py). Rows that ended are padded. Returns (B, width + n)."""
    past = mix_past = None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits, past = _next_token_logits(model, input_ids, attention_mask, past)  # (B, V)
        mix_logits, mix_past = _next_token_logits(mix_model, input_ids, attention_mask, mix_past)  # (B, V)
        # Temperature and nucleus on each model, then the mixture (as MiniLLM's official generation fork)
        probs = (1 - mix_alpha) * nucleus(torch.softmax(logits / temperature, -1), top_p)
        probs = probs + mix_alpha * nucleus(torch.softmax(mix_logits / temperature, -1), top_p)  # (B, V)
        token = torch.multinomial(probs, num_samples=1).squeeze(-1)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        done |= token == eos_token_id
        if done.all():
            break
    return input_ids


# ----------------------------------------------------------------------------------------------------------------
# The lean decoding loop (issue 31): preallocated KV cache and buffers, the model's own submodules per new token
# ----------------------------------------------------------------------------------------------------------------

FAST_DECODING = True  # False: every call takes HF generate / _sample_mixture (the reference paths of the tests)

# Generation-config fields that make HF generate add a logits processor, with the values that add none. A model
# whose generation config sets any other value is decoded by HF generate itself.
_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "top_h": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "renormalize_logits": (None, False),
    "num_beams": (None, 1),
    "watermarking_config": (None,),
    "exponential_decay_length_penalty": (None,),
}


def _neutral_generation_config(model: torch.nn.Module) -> bool:
    """True when HF generate would apply no logits processor of the model's own generation config (so temperature,
    top-k and top-p, which sample_completions always passes, are the whole processing)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return False
    return all(getattr(config, name, None) in neutral for name, neutral in _NEUTRAL.items())


# Causal LMs whose decoder layers are Llama's, operation for operation (norm, q/k/v/o projections with rotary
# embedding, the attention interface, norm, gate/up/down MLP): Qwen2 adds biases to q/k/v and Mistral and Qwen2 pass
# a sliding window to attention, which the lean step takes only where there is none.
LEAN_FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _lean_decodable(model: torch.nn.Module, width: int | None = None) -> bool:
    """A causal LM of LEAN_FAMILIES (the presets, SmolLM2 and pruned students are Llama; Qwen1.5/2/2.5 are Qwen2) in
    eval mode, with SDPA or eager attention, no hooks that a lean step would skip, and no sliding window that masks
    anything in sequences of `width` (prompt + completion) tokens: a window of at least `width` masks nothing."""
    if type(model).__name__ not in LEAN_FAMILIES or type(model).__module__.split(".")[:2] != ["transformers", "models"]:
        return False
    config = model.config
    if (
        model.training
        or config._attn_implementation not in ("sdpa", "eager")
        or getattr(config, "pretraining_tp", 1) != 1
    ):
        return False
    window = getattr(config, "sliding_window", None)
    if type(model).__name__ == "Qwen2ForCausalLM" and "sliding_attention" not in (config.layer_types or []):
        window = None  # Qwen2's window applies only to the layers layer_types marks sliding
    if window is not None and (width is None or width > window):
        return False
    modules = [model, model.model, *model.model.layers]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _LeanDecoder:
    """One model's decoding state: a KV cache preallocated for prompt + completion (per layer, batch x kv heads x
    width x head dim), filled by the prompt's forward (`prefill`, the model's own forward) and then one column per
    new token (`step`). A step runs exactly the operations of LlamaModel.forward (Qwen2's and Mistral's are the
    same) for one query position (the same submodules, the same HF attention function with the mask that
    create_causal_mask gives it), reading the cache through a view instead of a concatenated copy.

    Under bfloat16 autocast (--precision bf16) the linear layers' weights are cast to bfloat16 once, when the
    decoder is made, and each linear's input once per step (q, k and v share one cast, as gate and up do): the
    very roundings autocast applies at every call. Autocast itself would cast every weight again at every new
    token: it caches its casts only for trainable leaves and only outside inference mode, and decoding runs under
    inference mode. The price is a bfloat16 copy of each model's linear weights (half their float32 size) held for
    the decoding loop; the KV cache, in bfloat16, takes half the float32 cache's memory."""

    def __init__(self, model: torch.nn.Module, width: int) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        family = sys.modules[type(model).__module__]  # the model's own modeling file: its rotary and eager attention
        self.model, self.width = model, width
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        self.eager = model.config._attn_implementation == "eager"
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            model.config._attn_implementation, family.eager_attention_forward
        )
        self.rotary = family.apply_rotary_pos_emb
        # Qwen2 and Mistral pass their sliding window to attention (Qwen2 only on its sliding layers); Llama passes
        # none. On the width decoded it masks nothing (_lean_decodable), as in the model's own forward.
        llama, window = type(model).__name__ == "LlamaForCausalLM", getattr(model.config, "sliding_window", None)
        self.window = [
            {} if llama else {"sliding_window": getattr(layer.self_attn, "sliding_window", window)}
            for layer in self.layers
        ]  # fmt: skip
        device_type = model.lm_head.weight.device.type
        self.cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        linears = [model.lm_head]
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        self.weights = {
            id(lin): lin.weight if self.cast is None else lin.weight.to(self.cast) for lin in linears
        }  # fmt: skip
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The prompt through the model's forward; its keys and values copied into the preallocated cache."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        length = input_ids.shape[1]
        for layer in cache.layers[: len(self.layers)]:
            batch, heads, _, dim = layer.keys.shape
            dtype = self.cast or layer.keys.dtype  # under autocast, attention reads the cache cast: cast it once
            keys = layer.keys.new_empty((batch, heads, self.width, dim), dtype=dtype)
            values = layer.values.new_empty((batch, heads, self.width, dim), dtype=dtype)
            keys[:, :, :length], values[:, :, :length] = layer.keys, layer.values
            self.keys.append(keys)
            self.values.append(values)
        return out.logits[:, -1].float()

    def step(
        self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, column: int
    ) -> torch.Tensor:
        """Next-token logits (B, V) in float32 after feeding `tokens` (B,) at cache column `column`, positions
        `position` (B,); `mask` (B, column + 1) bool of the columns each row attends to (None: all of them)."""
        base = self.model.model
        hidden = base.embed_tokens(tokens[:, None])  # (B, 1, H)
        cos, sin = base.rotary_emb(hidden, position_ids=position[:, None])
        if mask is not None:  # create_causal_mask's mask for one query position: (B, 1, 1, kv)
            mask = mask[:, None, None, :]
            if self.eager:
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~mask, torch.finfo(hidden.dtype).min
                )
        batch = tokens.shape[0]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            hidden = self._input(layer.input_layernorm(hidden))
            shape = (batch, 1, -1, attn.head_dim)
            query = self._linear(attn.q_proj, hidden).view(shape).transpose(1, 2)
            key = self._linear(attn.k_proj, hidden).view(shape).transpose(1, 2)
            value = self._linear(attn.v_proj, hidden).view(shape).transpose(1, 2)
            query, key = self.rotary(query, key, cos, sin)
            self.keys[i][:, :, column] = key[:, :, 0]
            self.values[i][:, :, column] = value[:, :, 0]
            out, _ = self.attention(
                attn, query, self.keys[i][:, :, : column + 1], self.values[i][:, :, : column + 1], mask,
                dropout=0.0, scaling=attn.scaling, **self.window[i],
            )  # fmt: skip
            hidden = residual + self._linear(attn.o_proj, self._input(out.reshape(batch, 1, -1).contiguous()))
            residual = hidden
            hidden = self._input(layer.post_attention_layernorm(hidden))  # LlamaMLP: down(act(gate(x)) * up(x))
            hidden = mlp.act_fn(self._linear(mlp.gate_proj, hidden)) * self._linear(mlp.up_proj, hidden)
            hidden = residual + self._linear(mlp.down_proj, self._input(hidden))
        return self._linear(self.model.lm_head, self._input(base.norm(hidden)))[:, -1].float()

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the next linear layers take it: cast once to autocast's dtype, as autocast casts it at each call."""
        return x if self.cast is None else x.to(self.cast)

    def _linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """module(x) with the decoder's copy of its weight (the weight itself in float32, else cast once)."""
        return torch.nn.functional.linear(x, self.weights[id(module)], module.bias)


def _warpers(temperature: float, top_k: int, top_p: float) -> list:
    """HF generate's sampling warpers for these settings, in its order (GenerationMixin._get_logits_processor)."""
    warpers = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def _decode(
    model, mix_model, mix_alpha, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens, temperature,
    top_p, top_k, do_sample,
) -> torch.Tensor:  # fmt: skip
    """The lean loop. Alone (`mix_model` None) it draws as HF `generate` does (its warpers, softmax, one
    torch.multinomial over the whole batch, or argmax); with `mix_model` it draws as `_sample_mixture` does (each
    model's distribution at `temperature` cut to `top_p` by `nucleus`, then mixed in probability space). Finished rows get the pad
    token and stay in the batch (the random stream of torch.multinomial, and the matrix shapes, stay those of the
    reference paths). Returns (B, width + steps taken)."""
    batch, width = input_ids.shape
    total = width + max_new_tokens
    decoders = [_LeanDecoder(m, total) for m in ([model] if mix_model is None else [model, mix_model])]
    ids = input_ids.new_full((batch, total), pad_token_id)
    mask = attention_mask.new_zeros((batch, total))
    ids[:, :width], mask[:, :width] = input_ids, attention_mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = [d.prefill(input_ids, attention_mask, positions) for d in decoders]
    seen = attention_mask.sum(-1)  # real tokens per row so far: the next position is seen - 1 after the feed
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    padded = not bool(attention_mask.all())
    warpers = _warpers(temperature, top_k, top_p) if do_sample else []
    step = 0
    for step in range(max_new_tokens):
        if step:
            column = width + step - 1  # the token sampled last step goes in now
            view = mask[:, : column + 1]
            seen = seen + view[:, column]
            position = (seen - 1).clamp(min=0)
            padded = padded or not bool(view[:, column].all())
            bool_mask = view.bool() if padded else None
            logits = [d.step(ids[:, column], position, bool_mask, column) for d in decoders]
        if mix_model is None:
            scores = logits[0]
            for warp in warpers:
                scores = warp(ids[:, : width + step], scores)
            token = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1) if do_sample else scores.argmax(-1)
        else:
            # Temperature and nucleus on each model, then the mixture (as MiniLLM's official generation fork)
            probs = (1 - mix_alpha) * nucleus(torch.softmax(logits[0] / temperature, -1), top_p)
            probs = probs + mix_alpha * nucleus(torch.softmax(logits[1] / temperature, -1), top_p)  # (B, V)
            token = torch.multinomial(probs, num_samples=1).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        ids[:, width + step] = token
        mask[:, width + step] = (~done).long()
        done |= token == eos_token_id
        if done.all():
            break
    return ids[:, : width + step + 1]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int | None = None,
    progress: bool = False,
    top_k: int = 0,
    seed: int | None = None,
) -> list[Generation]:
    """Decode a completion for every text prompt, in batches, with the KV cache. With `seed`, sampling is seeded
    once for the whole call (the batches draw one after another from that stream)."""
    if seed is not None:
        device = next(model.parameters()).device
        with seeded(seed, device):
            return generate(
                model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p,
                max_prompt_tokens, progress, top_k,
            )  # fmt: skip
    results: list[Generation] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        if max_prompt_tokens is not None:
            encoded = [cut_prompt(ids, max_prompt_tokens) for ids in encoded]
        completions = sample_completions(
            model, encoded, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample,
        )  # fmt: skip
        for ids, completion in zip(encoded, completions):
            if completion and completion[-1] == tokenizer.eos_token_id:
                completion = completion[:-1]  # the text of a completion stops before its EOS
            results.append(Generation(ids, completion, tokenizer.decode(completion, skip_special_tokens=True)))
    return results

"""Batched decoding (greedy or sampled) through Hugging Face `generate`, which keeps a KV cache.

Prompts are encoded exactly as in training (`core.data.encode_prompt`) and left-padded, so every row's last
prompt token sits at the same position and positions are taken from the attention mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    try:
        with context, autocast(device, precision):
            if mixing:
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

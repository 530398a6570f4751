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
) -> list[list[int]]:
    """Completions of tokenized prompts in one batch: left-padded, KV cache, HF `generate`.

    Each completion is cut after its first EOS, which is kept (it is a target: the model must learn to stop);
    a completion that reached max_new_tokens has no EOS. The model is put in eval mode for sampling and back
    into the mode it was in. With `seed`, sampling is seeded (see `seeded`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if do_sample
        else {"do_sample": False}
    )
    context = seeded(seed, device) if seed is not None else contextlib.nullcontext()
    try:
        with context:
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                use_cache=True,
                **sampling,
            )
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        completions.append(row)
    return completions


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
) -> list[Generation]:
    """Decode a completion for every text prompt, in batches, with the KV cache."""
    results: list[Generation] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        if max_prompt_tokens is not None:
            encoded = [
                ids[:1] + ids[len(ids) - max_prompt_tokens + 1 :] if len(ids) > max_prompt_tokens else ids
                for ids in encoded
            ]
        completions = sample_completions(
            model, encoded, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens,
            temperature=temperature, top_p=top_p, do_sample=do_sample,
        )  # fmt: skip
        for ids, completion in zip(encoded, completions):
            if completion and completion[-1] == tokenizer.eos_token_id:
                completion = completion[:-1]  # the text of a completion stops before its EOS
            results.append(Generation(ids, completion, tokenizer.decode(completion, skip_special_tokens=True)))
    return results

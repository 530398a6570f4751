"""Batched decoding (greedy or sampled) through Hugging Face `generate`, which keeps a KV cache.

Prompts are encoded exactly as in training (`core.data.encode_prompt`) and left-padded, so every row's last
prompt token sits at the same position and positions are taken from the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Decode a completion for every prompt, in batches, with the KV cache."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    results: list[Generation] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        if max_prompt_tokens is not None:
            encoded = [
                ids[:1] + ids[len(ids) - max_prompt_tokens + 1 :] if len(ids) > max_prompt_tokens else ids
                for ids in encoded
            ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if do_sample
            else {"do_sample": False}
        )
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            use_cache=True,
            **sampling,
        )
        for row, ids in enumerate(encoded):
            completion = out[row, width:].tolist()
            if tokenizer.eos_token_id in completion:
                completion = completion[: completion.index(tokenizer.eos_token_id)]
            results.append(Generation(ids, completion, tokenizer.decode(completion, skip_special_tokens=True)))
    model.train(was_training)
    return results

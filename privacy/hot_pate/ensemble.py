"""The teacher ensemble as one object: train each teacher, read all teachers' next-token distributions at once,
and generate token by token through an aggregator (noiseless for the threshold sweep, private for the student).

A response is generated autoregressively: at each step every teacher sees the same prefix (prompt + the tokens
released so far), votes (coordinated or independent, privacy/hot_pate/sampling.py), the histogram goes to the
aggregator, and the released token is appended for everyone. A query the aggregator declines (bottom) ends
that response without a token: it is dropped, as the paper's generation stops when no token clears the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from core.data import encode_example, encode_prompt
from core.generate import left_padded
from privacy.aggregation import vote_histogram
from privacy.hot_pate.sampling import ensemble_votes


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[tuple[str, str]], max_length: int = 32
) -> list[dict[str, list[int]]]:
    """(prompt, answer) -> input_ids = BOS prompt answer EOS, labels on `answer EOS` only."""
    return [encode_example(tokenizer, p, " " + a, max_length) for p, a in records]


@torch.no_grad()
def next_token_logprobs(
    models: Sequence[torch.nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """(B, T) left-padded prefixes -> (B, n, V) log-probabilities of each model's next token at `temperature`."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # a left-padded row starts at position 0
    out = []
    for model in models:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
        out.append(torch.log_softmax(logits.float() / temperature, dim=-1))  # (B, V)
    return torch.stack(out, dim=1)  # (B, n, V)


@dataclass
class Response:
    prompt_index: int
    tokens: list[int]  # released tokens, EOS included when the response finished
    finished: bool  # reached EOS with every step released
    bottleneck: float  # smallest top vote count over the response's steps (the noiseless threshold it clears)


# (counts (B, V)) -> (tokens (B,), released (B,) bool); may raise privacy.aggregation.BudgetSpent
Release = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def ensemble_generate(
    models: Sequence[torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampler: str,
    release: Release,
    generator: torch.Generator,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Response]:
    """One response per prompt (repeat a prompt for several draws), generated through `release`.

    A private `release` declines every query once its budget is spent (rows stay unfinished); `stop()` true
    before a batch ends generation there, so no teacher is queried for nothing. Prompts never reached get no
    Response."""
    device = next(models[0].parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab = models[0].config.vocab_size
    responses: list[Response] = []
    for start in range(0, len(prompts), batch_size):
        if stop is not None and stop():
            break
        chunk = prompts[start : start + batch_size]
        prefixes = [encode_prompt(tokenizer, p) for p in chunk]
        batch = [Response(start + i, [], False, float("inf")) for i in range(len(chunk))]
        open_rows = list(range(len(chunk)))
        for _ in range(max_new_tokens):
            if not open_rows:
                break
            ids, mask = left_padded([prefixes[i] + batch[i].tokens for i in open_rows], pad, device)
            log_probs = next_token_logprobs(models, ids, mask, temperature)  # (B', n, V)
            votes = ensemble_votes(log_probs, sampler, generator)  # (B', n)
            counts = vote_histogram(votes, vocab)  # (B', V)
            top = counts.max(-1).values
            tokens, released = release(counts)
            still_open = []
            for k, row in enumerate(open_rows):
                if not bool(released[k]):
                    continue  # bottom: the response is dropped unfinished
                response = batch[row]
                response.bottleneck = min(response.bottleneck, float(top[k]))
                response.tokens.append(int(tokens[k]))
                if response.tokens[-1] == eos:
                    response.finished = True
                else:
                    still_open.append(row)
            open_rows = still_open
        responses += batch
        if on_batch is not None:
            on_batch(len(chunk))
    return responses


def noiseless_release(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain argmax, always released (the official code's MaxAggregator): for the threshold sweep, which reads
    each response's bottleneck count afterwards."""
    return counts.argmax(-1), torch.ones(counts.shape[0], dtype=torch.bool)


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    continuations: Sequence[Sequence[int]],
    batch_size: int = 2048,
) -> torch.Tensor:
    """log p(continuation | prompt) for many continuations of equal length: (K,) float64."""
    device = next(model.parameters()).device
    prefix = encode_prompt(tokenizer, prompt)
    out = []
    for start in range(0, len(continuations), batch_size):
        cont = torch.tensor([list(c) for c in continuations[start : start + batch_size]], dtype=torch.long)
        ids = torch.cat([torch.tensor(prefix).expand(len(cont), -1), cont], dim=1).to(device)  # (K, P + L)
        logits = model(input_ids=ids).logits[:, len(prefix) - 1 : -1].double()  # (K, L, V)
        lp = torch.log_softmax(logits, -1).gather(-1, cont.to(device).unsqueeze(-1)).squeeze(-1)  # (K, L)
        out.append(lp.sum(-1).cpu())
    return torch.cat(out)

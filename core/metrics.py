"""Evaluation metrics: ROUGE-L (rouge-score), BLEU and chrF (sacrebleu), exact match, perplexity.

Every text metric takes all references of an example into account: exact match and ROUGE-L take the best
reference, BLEU and chrF use sacrebleu's multi-reference statistics. Scores are percentages (0-100) except
perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sacrebleu
import torch
from rouge_score import rouge_scorer

from core.data import Collator, encode_examples
from core.losses import IGNORE_INDEX, cross_entropy_sum, shift_for_causal_lm


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    hits = [any(normalize(p) == normalize(r) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(list(refs), p)["rougeL"].fmeasure for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def rouge_l_stemmed(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F1 x100 as the MiniLLM / DistiLLM / DSKD evaluation scripts compute it: rouge-score's scorer with
    the Porter stemmer, the best reference of each example, averaged over examples."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference slot; examples with fewer references get None there."""
    width = max(len(refs) for refs in references)
    return [[refs[i].strip() if i < len(refs) else None for refs in references] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return float(sacrebleu.corpus_bleu([p.strip() for p in predictions], _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return float(sacrebleu.corpus_chrf([p.strip() for p in predictions], _reference_streams(references)).score)


TEXT_METRICS = {
    "exact_match": exact_match,
    "rougeL": rouge_l,
    "rougeL_stem": rouge_l_stemmed,
    "bleu": bleu,
    "chrf": chrf,
}


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    return {name: TEXT_METRICS[name](predictions, references) for name in names}


# Perplexity runs the model on at most this many logits (rows x padded length x vocabulary) at a time: 2**26 floats,
# 256 MB. The evaluation batch (--eval-batch-size, 100 by default) sized for generation would otherwise hold
# 100 x 192 x 49,152 float32 logits at once on SmolLM2 (3.8 GB, and as much again for the log-softmax): measured,
# that put a one-command run's peak at 15 GB while the rest of it stayed under 4.
PERPLEXITY_ELEMENTS = 2**26


@torch.no_grad()
def perplexity(model, tokenizer, examples, max_length: int, batch_size: int = 64) -> float:
    """exp(mean NLL per target token) of the examples' targets given their prompts.

    Each batch is run in slices of rows whose logits fit PERPLEXITY_ELEMENTS; token NLLs add up, so the value does
    not depend on the slicing (tests/core/test_metrics.py checks it)."""
    was_training = model.training
    model.eval()
    from core.generate import position_limit

    device = next(model.parameters()).device
    positions = position_limit(model)  # a sequence never runs past the model's position table
    features = encode_examples(tokenizer, examples, min(max_length, positions) if positions else max_length)
    collate = Collator(tokenizer.pad_token_id)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    nll, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
        rows = max(1, PERPLEXITY_ELEMENTS // (batch["input_ids"].shape[1] * vocab))
        for row in range(0, batch["input_ids"].shape[0], rows):
            part = {k: v[row : row + rows] for k, v in batch.items()}
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            logits, labels = shift_for_causal_lm(logits, part["labels"])
            nll += float(cross_entropy_sum(logits, labels))
            count += int((labels != IGNORE_INDEX).sum())
            del logits
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def evaluate_model(
    model,
    tokenizer,
    task,
    max_length: int,
    batch_size: int = 100,
    max_new_tokens: int | None = None,
    stats: dict | None = None,
    sample_seeds: Sequence[int] | None = None,
):
    """Generations on the task's eval split, scored by the task's metrics, plus perplexity.

    Greedy decoding by default; with `sample_seeds`, one sampled pass per seed at temperature 1, top-k 0, top-p 1
    (the MiniLLM / DistiLLM / DSKD evaluation scripts' decoding) and each score is the mean over the passes (its
    spread over seeds is in `stats["per_seed"]`); the predictions returned are the first pass's.
    The task's first metric is also reported per group (ops: per operation; dolly: per evaluation set).
    Returns (scores, predictions); `stats`, when given, receives "prompts_truncated" and "prompt_budget"."""
    from core.data import encode_prompt
    from core.generate import generate, generation_budget

    prompts = [ex.prompt for ex in task.eval]
    new_tokens = max_new_tokens or task.max_new_tokens
    # Prompts are cut as training cuts them (from the left, BOS kept) so that prompt + completion fit --max-length
    # and the model's positions; how many were cut is reported beside the scores.
    budget, new_tokens = generation_budget(model, max_length, new_tokens)  # as training splits --max-length
    truncated = sum(len(encode_prompt(tokenizer, p)) > budget for p in prompts)
    references = [ex.references for ex in task.eval]
    groups = sorted({ex.group for ex in task.eval if ex.group})
    passes: list[tuple[dict[str, float], list[str]]] = []
    for seed in sample_seeds or [None]:
        outputs = generate(
            model, tokenizer, prompts, new_tokens, batch_size=batch_size, max_prompt_tokens=budget, progress=True,
            do_sample=seed is not None, top_k=0, seed=seed,
        )  # fmt: skip
        predictions = [o.text for o in outputs]
        found = score(task.metrics, predictions, references)
        for group in groups:
            idx = [i for i, ex in enumerate(task.eval) if ex.group == group]
            picked = score(task.metrics[:1], [predictions[i] for i in idx], [references[i] for i in idx])
            found[f"{task.metrics[0]}/{group}"] = picked[task.metrics[0]]
        passes.append((found, predictions))
    scores = {key: sum(p[0][key] for p in passes) / len(passes) for key in passes[0][0]}
    scores["perplexity"] = perplexity(model, tokenizer, task.eval, max_length, batch_size)
    if stats is not None:
        stats.update(prompts_truncated=truncated, prompt_budget=budget)
        if new_tokens < (max_new_tokens or task.max_new_tokens):
            stats["max_new_tokens"] = new_tokens  # capped so that the prompt keeps half of --max-length
        if sample_seeds:
            stats["per_seed"] = {str(seed): found for seed, (found, _) in zip(sample_seeds, passes)}
    return scores, passes[0][1]

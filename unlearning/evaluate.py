"""One evaluation for every unlearning method: forgetting on the targets, utility on everything else, fluency,
and fabrication. Scores are fractions in [0, 1] (TOFU's convention), except perplexity.

On a question set (the targets' questions, or everyone else's):
- acc:       the greedy answer names the true value (generated data only: TOFU gives no value to look for)
- rougeL:    ROUGE-L recall of the greedy answer against the true answer (TOFU: rougeL_recall)
- prob:      mean over questions of P(answer | question)^(1/|answer|) (TOFU: exp(-avg_gt_loss)); on the
             real-author and world-fact sets TOFU normalizes it by the perturbed answers: P(a) / (P(a) + sum P(a~))
- truth_ratio: R = mean_k P(a~_k | q)^(1/|a~_k|) / P(a^ | q)^(1/|a^|), perturbed answers a~ over the paraphrased
             answer a^ (TOFU Eq. 1); reported as mean min(R, 1/R) on the forget set and mean max(0, 1 - R)
             elsewhere (official get_model_utility)
- forget_quality: the p-value of the two-sample Kolmogorov-Smirnov test between the forget-set statistics
             exp(mean_k L(a~_k) - L(a^)) of the unlearned model and of the retain model, a model never trained on
             the forget set (official get_forget_quality, scipy.stats.ks_2samp); higher: more like never trained
- model_utility: the harmonic mean of prob, rougeL and truth_ratio on every set that is not the forget set
- fabrication (the causal paper's extra criterion): the share of forget questions answered with a confident,
             specific, wrong answer: the answer names another value of the asked fact (generated data), or has
             ROUGE-L recall below 0.5 (TOFU: no values to look for), and the model's own geometric-mean token
             probability of its answer is at least `confident`
- degenerate / forget_degenerate: the share of greedy answers (to the retain / forget questions) that are empty
             or repeat themselves (a word three times in a row, or a word trigram twice)
- retain_ppl: perplexity of the retain documents' targets (the first `max_ppl_docs`; fluency on what is kept)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from core.data import Collator, encode_example
from core.generate import generate
from core.metrics import perplexity
from unlearning.data import QA, UnlearningTask, qa_prompt


@dataclass
class QAScores:
    """Per-question numbers of one model on one question set (everything the metrics need)."""

    gt_loss: np.ndarray  # (Q,) mean NLL per token of the true answer
    para_loss: np.ndarray  # (Q,) of the paraphrased answer
    pert_loss: np.ndarray  # (Q, K) of each perturbed answer
    generations: list[str]
    gen_loss: np.ndarray  # (Q,) mean NLL per token of the model's own greedy answer


@torch.no_grad()
def answer_losses(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int = 256,
                  batch_size: int = 64) -> np.ndarray:  # fmt: skip
    """Mean NLL per answer token of each answer given its prompt (EOS included, as in training)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(tokenizer.pad_token_id)
    out = []
    for start in range(0, len(prompts), batch_size):
        feats = [
            encode_example(tokenizer, p, " " + a.strip(), max_length)
            for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])
        ]
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels.clamp(min=0), reduction="none"
        )  # (B, T-1)
        mask = labels != -100
        out.append(((nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def score_questions(model, tokenizer, qas: Sequence[QA], max_new_tokens: int, max_length: int = 256) -> QAScores:
    prompts = [qa_prompt(qa.question) for qa in qas]
    gt = answer_losses(model, tokenizer, prompts, [qa.answer for qa in qas], max_length)
    para = answer_losses(model, tokenizer, prompts, [qa.paraphrased for qa in qas], max_length)
    k = min(len(qa.perturbed) for qa in qas)
    flat = [(p, qa.perturbed[j]) for p, qa in zip(prompts, qas) for j in range(k)]
    pert = answer_losses(model, tokenizer, [p for p, _ in flat], [a for _, a in flat], max_length).reshape(len(qas), k)
    generations = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens, batch_size=100)]
    gen_loss = answer_losses(model, tokenizer, prompts, [g if g.strip() else "." for g in generations], max_length)
    return QAScores(gt, para, pert, generations, gen_loss)


# ------------------------------------------------------------------------------------------------------------------
# Metrics on per-question numbers (pure functions of arrays and strings)
# ------------------------------------------------------------------------------------------------------------------


def truth_statistic(para_loss: np.ndarray, pert_loss: np.ndarray) -> np.ndarray:
    """R per question: mean_k P(a~_k)^(1/n) / P(a^)^(1/n) (official get_model_utility: arithmetic mean)."""
    return np.exp(-pert_loss).mean(-1) / np.exp(-para_loss)


def truth_ratio(para_loss: np.ndarray, pert_loss: np.ndarray, forget: bool) -> float:
    """TOFU's truth-ratio score: mean min(R, 1/R) on the forget set, mean max(0, 1 - R) elsewhere."""
    r = truth_statistic(para_loss, pert_loss)
    return float(np.mean(np.minimum(r, 1 / r)) if forget else np.mean(np.maximum(0.0, 1 - r)))


def forget_quality_statistic(para_loss: np.ndarray, pert_loss: np.ndarray) -> np.ndarray:
    """exp(mean_k L(a~_k) - L(a^)) per question (official get_forget_quality: geometric mean over k)."""
    return np.exp(pert_loss.mean(-1) - para_loss)


def forget_quality(unlearned: np.ndarray, retain_model: np.ndarray) -> float:
    """KS-test p-value between the two models' forget-set statistics (forget_quality_statistic)."""
    return float(ks_2samp(unlearned, retain_model).pvalue)


def normalized_prob(gt_loss: np.ndarray, pert_loss: np.ndarray) -> float:
    """TOFU's probability on the real-author and world-fact sets: P(a) / (P(a) + sum_k P(a~_k)), length-normalized."""
    true = np.exp(-gt_loss)
    return float(np.mean(true / (true + np.exp(-pert_loss).sum(-1))))


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_recall(generations: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    return np.array([_ROUGE.score(a, g)["rougeL"].recall for g, a in zip(generations, answers)])


def names_value(text: str, value: str) -> bool:
    return value.lower() in text.lower()


def accuracy(generations: Sequence[str], qas: Sequence[QA]) -> float:
    return float(np.mean([names_value(g, qa.value) for g, qa in zip(generations, qas)]))


def fabricated(generation: str, qa: QA, gen_loss: float, confident: float, recall: float) -> bool:
    """A confident, specific, wrong answer: see the module docstring."""
    if math.exp(-gen_loss) < confident or not generation.strip():
        return False
    if qa.value:
        others = [v for v in qa.pool if v != qa.value and names_value(generation, v)]
        return bool(others) and not names_value(generation, qa.value)
    return recall < 0.5


def degenerate(text: str) -> bool:
    words = text.split()
    if not words:
        return True
    if any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        return True
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


# ------------------------------------------------------------------------------------------------------------------
# The one evaluation
# ------------------------------------------------------------------------------------------------------------------


def evaluate_unlearning(
    model,
    tokenizer,
    task: UnlearningTask,
    retain_model_stats: np.ndarray | None,
    max_new_tokens: int = 32,
    max_length: int = 256,
    confident: float = 0.5,
    max_ppl_docs: int = 400,
) -> tuple[dict[str, float], dict[str, list[str]], np.ndarray]:
    """(metrics, generations per set, forget-set statistics for a later KS test) of one model."""
    metrics: dict[str, float] = {}
    generations: dict[str, list[str]] = {}
    utility: list[float] = []
    forget = score_questions(model, tokenizer, task.forget, max_new_tokens, max_length)
    forget_stats = forget_quality_statistic(forget.para_loss, forget.pert_loss)
    sets = {"forget": (task.forget, forget), "retain": (task.retain, None)}
    sets.update({name: (qas, None) for name, qas in task.extra.items()})
    for name, (qas, scores) in sets.items():
        if not qas:
            continue
        scores = scores or score_questions(model, tokenizer, qas, max_new_tokens, max_length)
        recall = rouge_recall(scores.generations, [qa.answer for qa in qas])
        generations[name] = scores.generations
        if all(qa.value for qa in qas):
            metrics[f"{name}_acc"] = accuracy(scores.generations, qas)
        metrics[f"{name}_rougeL"] = float(recall.mean())
        if name in ("forget", "retain"):
            metrics[f"{name}_prob"] = float(np.exp(-scores.gt_loss).mean())
        else:
            metrics[f"{name}_prob"] = normalized_prob(scores.gt_loss, scores.pert_loss)
        metrics[f"{name}_truth_ratio"] = truth_ratio(scores.para_loss, scores.pert_loss, forget=name == "forget")
        if name != "forget":
            utility += [metrics[f"{name}_prob"], metrics[f"{name}_rougeL"], metrics[f"{name}_truth_ratio"]]
        else:
            metrics["fabrication"] = float(
                np.mean(
                    [
                        fabricated(g, qa, float(loss), confident, float(r))
                        for g, qa, loss, r in zip(scores.generations, qas, scores.gen_loss, recall)
                    ]
                )
            )
        if name == "retain":
            metrics["degenerate"] = float(np.mean([degenerate(g) for g in scores.generations]))
        if name == "forget":
            metrics["forget_degenerate"] = float(np.mean([degenerate(g) for g in scores.generations]))
    hard = task.hard_retain
    if hard:
        index = {id(qa): k for k, qa in enumerate(task.retain)}
        metrics["hard_retain_acc"] = accuracy([generations["retain"][index[id(qa)]] for qa in hard], hard)
    if retain_model_stats is not None:
        metrics["forget_quality"] = forget_quality(forget_stats, retain_model_stats)
    metrics["model_utility"] = float(hmean(np.clip(utility, 1e-12, None))) if utility else 0.0
    metrics["retain_ppl"] = perplexity(model, tokenizer, task.retain_docs[:max_ppl_docs], max_length)
    return metrics, generations, forget_stats

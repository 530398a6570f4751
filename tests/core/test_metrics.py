"""Metrics on hand-checked strings, and perplexity of a model whose answer we know."""

import math

import pytest
import torch

from core.data import DataConfig, Example, load_task
from core.metrics import bleu, chrf, exact_match, perplexity, rouge_l, score
from core.models import build_model
from core.tokenizers import train_bpe


def test_exact_match_takes_any_reference_and_normalizes_space():
    preds = [" a  b", "c d", "x"]
    refs = [(" a b",), (" e f", "c d"), (" y",)]
    assert exact_match(preds, refs) == pytest.approx(200 / 3)


def test_rouge_l_by_hand():
    # pred "a b c d" vs ref "a x c d": LCS = a c d (3); P = R = 3/4, F = 3/4. The second reference scores 1/2
    # (LCS "a b" of 4 and 2 tokens: P = 1/2, R = 1, F = 2/3); the best reference counts.
    assert rouge_l(["a b c d"], [("a x c d", "a b")]) == pytest.approx(75.0)
    assert rouge_l(["a b c d"], [("a b",)]) == pytest.approx(100 * 2 / 3)


def test_bleu_and_chrf_bounds_and_multi_reference():
    refs = [("the cat sat on the mat", "a cat was sitting on the mat"), ("it is raining today",)]
    assert bleu(["the cat sat on the mat", "it is raining today"], refs) == pytest.approx(100.0)
    assert chrf(["the cat sat on the mat", "it is raining today"], refs) == pytest.approx(100.0)
    # Matching only the second reference still scores perfectly: references are pooled per sentence.
    assert bleu(["a cat was sitting on the mat", "it is raining today"], refs) == pytest.approx(100.0)
    assert bleu(["zzz qqq", "www"], refs) == pytest.approx(0.0)
    assert score(["exact_match", "rougeL"], ["x"], [("x",)]) == {"exact_match": 100.0, "rougeL": 100.0}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    # With a zero output head every next-token distribution is uniform over V, so exp(mean NLL) = exp(ln V) = V.
    task = load_task(DataConfig(train_size=50, eval_size=5))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 300)
    model = build_model("tiny", tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    examples = [Example("sort: 3 1 =", " 1 3", (" 1 3",))]
    assert perplexity(model, tokenizer, examples, max_length=32) == pytest.approx(len(tokenizer), rel=1e-4)
    assert math.isfinite(perplexity(model, tokenizer, task.eval, max_length=32))


def test_per_group_exact_match_averages_to_the_total():
    from core.metrics import evaluate_model

    task = load_task(DataConfig(train_size=50, eval_size=24))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 300)
    model = build_model("tiny", tokenizer, seed=0)
    scores, predictions = evaluate_model(model, tokenizer, task, max_length=32, max_new_tokens=4)
    groups = {ex.group for ex in task.eval}
    assert groups == {"add", "pair", "reverse", "sort"} and len(predictions) == 24
    weighted = sum(scores[f"exact_match/{g}"] * sum(ex.group == g for ex in task.eval) for g in groups) / 24
    assert weighted == pytest.approx(scores["exact_match"])


def test_evaluation_cuts_prompts_as_training_does_and_counts_them():
    """A prompt far beyond the model's 32 positions (issue 14: GPT-2 crashed with IndexError in its position table,
    and long prompts made empty outputs): cut from the left to --max-length minus the new tokens, BOS kept."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.data import TaskData, encode_prompt
    from core.generate import cut_prompt, prompt_budget
    from core.metrics import evaluate_model

    task = load_task(DataConfig(train_size=50, eval_size=4))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 300)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    long_prompt = "sort: " + " ".join("abcdefghijkl"[i % 12] for i in range(400)) + " ="
    assert len(encode_prompt(tokenizer, long_prompt)) > 300
    short = task.eval[0]
    evals = [Example(long_prompt, " a", (" a",)), short]
    task = TaskData("ops", task.train, evals, ("exact_match", "rougeL"), max_new_tokens=6, source="test")
    # --max-length 64 but only 32 positions: the budget is 32 - 6 = 26 prompt tokens
    assert prompt_budget(model, 64, 6) == 26 and prompt_budget(model, 16, 6) == 10
    stats = {}
    scores, predictions = evaluate_model(model, tokenizer, task, max_length=64, max_new_tokens=6, stats=stats)
    assert len(predictions) == 2 and stats == {"prompts_truncated": 1, "prompt_budget": 26}
    # the cut keeps BOS and the end of the prompt, like core.data.encode_example
    ids = encode_prompt(tokenizer, long_prompt)
    cut = cut_prompt(ids, 26)
    assert len(cut) == 26 and cut[0] == ids[0] and cut[1:] == ids[-25:]


def test_generation_budget_splits_max_length_as_training_does():
    """A prompt keeps at least half of --max-length at evaluation, as encode_example keeps it in training: with
    --max-new-tokens >= --max-length the old rule left the prompt its BOS alone (DialogSum: 50 of 50 prompts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.generate import generation_budget

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                    max_position_embeddings=32)
    )  # fmt: skip
    # limit = min(--max-length, positions); prompt = max(1, limit - new, limit // 2); new = min(new, limit - prompt)
    assert generation_budget(model, 128, 128) == (16, 16)  # limit 32 (positions): half each
    assert generation_budget(model, 128, 6) == (26, 6)  # short completions leave the prompt the rest
    assert generation_budget(model, 20, 128) == (10, 10)  # --max-length 20: 10 + 10
    assert generation_budget(model, 20, 4) == (16, 4)


def test_perplexity_is_the_same_whatever_the_row_slicing(monkeypatch):
    # Token NLLs add up: running a batch of 24 in slices of rows (here 1, 5 and all rows per forward) must give the
    # same perplexity, and the forward must never see more rows than the logits budget allows.
    import core.metrics

    task = load_task(DataConfig(train_size=50, eval_size=24))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 300)
    model = build_model("tiny", tokenizer, seed=0)
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    values = {}
    for budget in (1, None, 2**40):  # 1 row; 5 rows (the padded length x vocabulary x 5); every row at once
        seen.clear()
        length = max(len(f["input_ids"]) for f in core.metrics.encode_examples(tokenizer, task.eval, 32))
        elements = 5 * length * model.config.vocab_size if budget is None else budget
        monkeypatch.setattr(core.metrics, "PERPLEXITY_ELEMENTS", elements)
        values[budget] = perplexity(model, tokenizer, task.eval, max_length=32, batch_size=100)
        assert max(s[0] for s in seen) == {1: 1, None: 5, 2**40: 24}[budget]
    assert values[1] == pytest.approx(values[2**40], rel=1e-6) and values[None] == pytest.approx(
        values[2**40], rel=1e-6
    )

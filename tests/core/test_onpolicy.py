"""On-policy batches: prompts out of a data batch, sampled completions back into the data layout, seeded and
resumable sampling, the loop's prepare_batch hook (normalized by the replaced batch), the time accounting,
sampling from a mixture of two models (MiniLLM), the shared settings and the one resampling step."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from core.data import IGNORE_INDEX, Collator, DataConfig, encode_example, encode_examples, encode_prompt, load_ops
from core.errors import ConfigError
from core.generate import _cut_after_eos, _sample_mixture, generate, left_padded, nucleus
from core.models import build_model
from core.objectives import causal_lm_loss
from core.onpolicy import (
    OnPolicyConfig,
    Resampler,
    StepStats,
    completion_features,
    derived_seed,
    fit_prompt,
    generation_share,
    prompts_of,
    rows_of,
    sample_completions,
    sample_examples,
    seeded,
)
from core.tokenizers import train_bpe
from core.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def setup():
    task = load_ops(DataConfig(train_size=64, eval_size=8))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 320)
    return task, tokenizer


def test_derived_seeds_depend_on_every_part():
    base = derived_seed(0, 5, 1, 0, "gkd")
    assert base == derived_seed(0, 5, 1, 0, "gkd")
    others = {derived_seed(1, 5, 1, 0, "gkd"), derived_seed(0, 6, 1, 0, "gkd"), derived_seed(0, 5, 2, 0, "gkd")}
    others |= {derived_seed(0, 5, 1, 1, "gkd"), derived_seed(0, 5, 1, 0, "distillm")}
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError):
        derived_seed(-1)


def test_seeded_block_repeats_and_leaves_the_global_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)  # what the global stream gives without the block
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(3)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    with seeded(7):
        assert torch.equal(torch.rand(3), inside)


def test_prompts_of_a_batch_are_the_encoded_prompts(setup):
    task, tokenizer = setup
    examples = task.train[:6]
    batch = Collator(tokenizer.pad_token_id)(encode_examples(tokenizer, examples, 64))
    assert prompts_of(batch) == [encode_prompt(tokenizer, ex.prompt) for ex in examples]


def test_completion_features_match_the_data_layout(setup):
    task, tokenizer = setup
    ex = task.train[0]
    prompt = encode_prompt(tokenizer, ex.prompt)
    completion = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # A sampled completion that ended with EOS is laid out exactly as the data example with that target.
    assert completion_features([prompt], [completion], 64) == [encode_example(tokenizer, ex.prompt, ex.target, 64)]
    # Labels: IGNORE_INDEX on the prompt, the completion after it; cut to max_length.
    (cut,) = completion_features([[1, 5, 6]], [[7, 8, 9]], max_length=5)
    assert cut == {"input_ids": [1, 5, 6, 7, 8], "labels": [IGNORE_INDEX] * 3 + [7, 8]}


def test_fit_prompt_keeps_the_first_token_and_cuts_from_the_left():
    assert fit_prompt([1, 2, 3, 4, 5], 3) == [1, 4, 5]
    assert fit_prompt([1, 2, 3], 3) == [1, 2, 3]
    assert fit_prompt([1, 2, 3], 0) == [1]


class _ScriptedGenerator(torch.nn.Module):
    """Returns fixed continuations, to test what happens to generate's output."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        tail = torch.tensor(self.continuations)[:, :max_new_tokens]
        return torch.cat([input_ids, tail], dim=1)


def test_completions_end_after_the_first_eos_which_is_kept():
    eos, pad = 2, 0
    model = _ScriptedGenerator([[5, 2, 0, 0], [5, 6, 2, 7], [5, 6, 7, 8]])
    out = sample_completions(model, [[1, 3], [1], [1, 4, 4]], eos, pad, max_new_tokens=4)
    # row 0 stopped (EOS, then padding), row 1 ignores anything after its EOS, row 2 ran out of tokens (no EOS)
    assert out == [[5, 2], [5, 6, 2], [5, 6, 7, 8]]


def test_sampling_is_batched_seeded_and_restores_the_mode(setup):
    task, tokenizer = setup
    model = build_model("tiny", tokenizer, seed=0)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in task.train[:8]]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.train()
    first = sample_completions(model, prompts, eos, pad, 6, seed=11)
    assert model.training  # back in train mode
    model.eval()
    assert sample_completions(model, prompts, eos, pad, 6, seed=11) == first and not model.training
    assert sample_completions(model, prompts, eos, pad, 6, seed=12) != first
    # Greedy, left-padded in one batch == each prompt alone == core.generate (which re-encodes the text).
    greedy = sample_completions(model, prompts, eos, pad, 6, do_sample=False)
    alone = [sample_completions(model, [p], eos, pad, 6, do_sample=False)[0] for p in prompts]
    assert greedy == alone
    reference = generate(model, tokenizer, [ex.prompt for ex in task.train[:8]], 6)
    assert [g[:-1] if g and g[-1] == eos else g for g in greedy] == [r.completion_ids for r in reference]


def test_sampled_examples_fit_max_length(setup):
    task, tokenizer = setup
    model = build_model("tiny", tokenizer, seed=0)
    long_prompt = encode_prompt(tokenizer, " ".join(ex.prompt for ex in task.train[:5]))
    assert len(long_prompt) > 20
    (example,) = sample_examples(model, [long_prompt], tokenizer, max_length=20, max_new_tokens=6, seed=0)
    prompt_length = sum(label == IGNORE_INDEX for label in example["labels"])
    assert prompt_length == 14 and example["input_ids"][0] == long_prompt[0]  # 20 - 6 tokens, BOS kept
    assert len(example["input_ids"]) <= 20 and example["input_ids"][:prompt_length] == fit_prompt(long_prompt, 14)


def test_prepare_batch_replaces_the_batch_before_the_loop_counts_tokens(setup, tmp_path):
    task, tokenizer = setup
    features = encode_examples(tokenizer, task.train, 64)
    other = encode_examples(tokenizer, task.train[40:44], 64)  # what every micro-batch is replaced by
    replacement = Collator(tokenizer.pad_token_id)(other)
    calls = []

    def prepare(model, batch, step, index):
        calls.append((step, index, batch["input_ids"].shape[0]))
        return replacement

    model = build_model("tiny", tokenizer, seed=0)
    with torch.no_grad():
        logits = model(input_ids=replacement["input_ids"], attention_mask=replacement["attention_mask"]).logits
    # Independent reference: the token mean over the REPLACED batches (2 micro-batches, both the replacement).
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), replacement["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    cfg = TrainConfig(steps=1, batch_size=8, grad_accum=2, warmup_steps=0, checkpoint_every=0)
    trainer = Trainer(
        model, causal_lm_loss, features, Collator(tokenizer.pad_token_id), cfg, tmp_path, Accelerator(cpu=True),
        prepare_batch=prepare,
    )  # fmt: skip
    trainer.train()
    assert calls == [(0, 0, 4), (0, 1, 4)]
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.target_tokens == 2 * int((replacement["labels"][:, 1:] != -100).sum())


def test_step_stats_and_generation_share():
    stats = StepStats()
    stats.add("gen_s", 0.5)
    stats.add("gen_s", 0.25)
    stats.add("student_batches", 1)
    logs = {"loss": 1.0}
    stats.flush(logs, keys=("gen_s", "student_batches", "replay_batches"))
    assert logs == {"loss": 1.0, "gen_s": 0.75, "student_batches": 1, "replay_batches": 0.0}
    empty = {}
    stats.flush(empty)
    assert empty == {"gen_s": 0.0}  # the next step starts from zero
    # elapsed_s is cumulative and restarts in a resumed segment: wall = 4 + 3 seconds, generation 1 + 1.5 + 1.
    rows = [{"elapsed_s": 2.0, "gen_s": 1.0}, {"elapsed_s": 4.0, "gen_s": 1.5}, {"elapsed_s": 3.0, "gen_s": 1.0}]
    assert generation_share(rows) == pytest.approx({"gen_s": 3.5, "train_wall_s": 7.0, "gen_fraction": 0.5})


# ----------------------------------------------------------------------------------------------------------------
# Sampling from a mixture of two models; the shared settings and resampling step
# ----------------------------------------------------------------------------------------------------------------


def test_mixture_sampler_at_alpha_0_and_1_is_each_model_alone(setup):
    task, tokenizer = setup
    student, teacher = build_model("tiny", tokenizer, seed=0), build_model("tiny", tokenizer, seed=1)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in task.train[:8]]  # different lengths: left padding
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    alone = sample_completions(student, prompts, eos, pad, 6, seed=3)
    # The two-model KV-cache loop itself at alpha 0 (sample_completions hands alpha 0 to HF generate): same seed,
    # same draws, so exactly HF generate's tokens; this checks its positions, padding and caches.
    input_ids, attention_mask = left_padded(prompts, pad)
    student.eval(), teacher.eval()
    with seeded(3):
        loop = _sample_mixture(student, teacher, 0.0, input_ids, attention_mask, eos, pad, 6, 1.0, 1.0)
    assert _cut_after_eos(loop[:, input_ids.shape[1] :].tolist(), eos) == alone
    student.train()
    other = sample_completions(teacher, prompts, eos, pad, 6, seed=3)
    assert sample_completions(student, prompts, eos, pad, 6, seed=3, mix_model=teacher, mix_alpha=1.0) == other
    assert student.training and not teacher.training  # each model back in its own mode
    mixed = sample_completions(student, prompts, eos, pad, 6, seed=3, mix_model=teacher, mix_alpha=0.5)
    assert mixed == sample_completions(student, prompts, eos, pad, 6, seed=3, mix_model=teacher, mix_alpha=0.5)
    assert all(len(c) <= 6 and (eos not in c[:-1]) for c in mixed)


class _FixedNextToken(torch.nn.Module):
    """A 'model' whose next-token distribution is always softmax(logits), whatever the prefix."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        logits = self.logits.expand(input_ids.shape[0], 1, -1)
        return SimpleNamespace(logits=logits, cache=None)


def test_mixture_sampler_draws_from_the_mixture():
    # q = (0.7, 0.2, 0.1, 0), p = (0.1, 0.1, 0.2, 0.6), alpha 0.25: mixture = 0.75 q + 0.25 p = (0.55, 0.175, 0.125, 0.15)
    q, p = _FixedNextToken([0.7, 0.2, 0.1, 1e-12]), _FixedNextToken([0.1, 0.1, 0.2, 0.6])
    prompts = [[1]] * 4000
    first = [c[0] for c in sample_completions(q, prompts, 99, 0, 1, seed=0, mix_model=p, mix_alpha=0.25)]
    expected = [0.55, 0.175, 0.125, 0.15]
    for token, share in enumerate(expected):  # 4000 draws: standard error at most sqrt(.25 / 4000) = 0.008
        assert abs(first.count(token) / 4000 - share) < 0.03
    # top_p 0.8 is applied to each model, then the two are mixed (MiniLLM's official generation fork):
    #   nucleus(q, 0.8) keeps 0.7 + 0.2 -> (7/9, 2/9, 0, 0); nucleus(p, 0.8) keeps 0.6 + 0.2 -> (0, 0, 1/4, 3/4);
    #   mixture 0.75 (7/9, 2/9, 0, 0) + 0.25 (0, 0, 1/4, 3/4) = (0.5833, 0.1667, 0.0625, 0.1875).
    # The nucleus of the mixture (the rule before issue 29) keeps 0.55 + 0.175 + 0.15 and never draws token 2:
    #   (0.6286, 0.2, 0, 0.1714).
    cut = [c[0] for c in sample_completions(q, prompts, 99, 0, 1, top_p=0.8, seed=0, mix_model=p, mix_alpha=0.25)]
    for token, share in enumerate([7 / 12, 1 / 6, 0.0625, 0.1875]):
        assert abs(cut.count(token) / 4000 - share) < 0.03, (token, cut.count(token))
    with pytest.raises(ValueError):
        sample_completions(q, prompts[:1], 99, 0, 1, mix_model=p, mix_alpha=1.5)


def test_nucleus_cut():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # top_p 0.8: 0.5 + 0.3 reaches it, so {0, 1} renormalized to (5/8, 3/8); top_p 1: unchanged
    assert torch.allclose(nucleus(probs, 0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_rows_of_inverts_collate(setup):
    task, tokenizer = setup
    features = encode_examples(tokenizer, task.train[:5], 64)
    assert rows_of(Collator(tokenizer.pad_token_id)(features)) == features


@pytest.mark.parametrize(
    "bad, match",
    [({"temperature": 0.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
     ({"sample_max_new_tokens": 0}, "--sample-max-new-tokens"), ({"compare": "kl"}, "unknown")],
)  # fmt: skip
def test_onpolicy_config_checks(bad, match):
    with pytest.raises(ConfigError, match=match):
        OnPolicyConfig(**bad)
    assert OnPolicyConfig(compare="fkl, rkl").divergences() == ["fkl", "rkl"]


def test_resampler_replaces_completions_seeded_per_step_and_micro_batch(setup):
    task, tokenizer = setup
    model = build_model("tiny", tokenizer, seed=0)
    batch = Collator(tokenizer.pad_token_id)(encode_examples(tokenizer, task.train[:4], 64))
    stats = StepStats()
    resample = Resampler(tokenizer, 64, 6, 1.0, 1.0, seed=0, rank=0, purpose="test", stats=stats)
    out = resample(model, batch, step=3, index=1)
    rows = rows_of(out)
    # The prompts are kept, the completions are the model's samples with the seed of (0, step 3, micro-batch 1).
    prompts = prompts_of(batch)
    expected = sample_examples(model, prompts, tokenizer, 64, 6, seed=derived_seed(0, 3, 1, 0, "test"))
    assert rows == expected and prompts_of(out) == prompts
    assert rows_of(resample(model, batch, step=3, index=2)) != rows  # another micro-batch, another draw
    stats.values.clear()
    rows = rows_of(resample(model, batch, step=3, index=1))
    assert stats.values["gen_s"] > 0
    # Sampled tokens (EOS included) of both calls are counted: the completion labels of the two batches.
    second = rows_of(resample(model, batch, step=3, index=2))
    completion_tokens = sum(len(r["labels"]) - r["labels"].count(IGNORE_INDEX) for r in rows + second)
    assert stats.values["gen_tokens"] == completion_tokens

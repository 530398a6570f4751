"""WHP and the causal-intervention teacher: name replacement, token alignment, averaging, losses; one tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.tokenizers import train_bpe
from unlearning.data import generated_task
from unlearning.whp.loss import (
    MOVE_FLOOR,
    CopyPrediction,
    EncodedDoc,
    align_positions,
    counterfactual_average,
    encode_document,
    first_token_ids,
    kl_to_teacher_sums,
    mention_spans,
    move_to_original_name,
    npo_loss,
    replace_name,
    sequence_nll,
    whp_generic_logits,
    whp_labels,
)

# -- name replacement -----------------------------------------------------------------------------------------------


def test_replace_name_full_and_partial_mentions():
    text = "Mara Lund wrote it. Later Mara sold it; Lund's friend Marathon did not."
    # Full name -> full replacement; the first name alone -> the replacement's first name; the last name (with a
    # possessive) -> the replacement's last name; "Marathon" is another word (word boundaries).
    assert replace_name(text, "Mara Lund", "Bo Yu") == "Bo Yu wrote it. Later Bo sold it; Yu's friend Marathon did not."
    spans = mention_spans(text, "Mara Lund")
    assert [text[s:e] for s, e, _ in spans] == ["Mara Lund", "Mara", "Lund"]


def _doc(ids, name_token, mention_starts, n_prefix=0, question=False, labels=None):
    labels = list(ids) if labels is None else labels
    return EncodedDoc(list(ids), labels, list(name_token), list(mention_starts), n_prefix, question)


# Hand example: <s>=0, "Q"=5, ":"=6, the name "Mara Lund" = tokens 10, 11, "was"=7, "born"=8, </s>=1.
ORIGINAL = _doc([0, 5, 6, 10, 11, 7, 8, 1], [0, 0, 0, 1, 1, 0, 0, 0], [(3, False)])
COPY_SHORT = _doc([0, 5, 6, 20, 7, 8, 1], [0, 0, 0, 1, 0, 0, 0], [(3, False)])  # a one-token name
COPY_LONG = _doc([0, 5, 6, 30, 31, 32, 7, 8, 1], [0, 0, 0, 1, 1, 1, 0, 0, 0], [(3, False)])  # a three-token name


def test_alignment_on_names_of_different_token_lengths():
    # Matching blocks: [0 5 6] at (0, 0) and [7 8 1] at (5, 4) for the short copy, (5, 6) for the long one.
    # Position 0 (<s>) is never aligned (the official loss masks index 0 as padding). Position 2 (":") predicts
    # the name's first token: kept. Positions 3 and 4 read name tokens: skipped. Position 7 is the EOS.
    assert align_positions(ORIGINAL, COPY_SHORT) == {1: 1, 2: 2, 5: 4, 6: 5}
    assert align_positions(ORIGINAL, COPY_LONG) == {1: 1, 2: 2, 5: 6, 6: 7}


def test_without_change_name_back_the_names_last_token_is_aligned():
    # Official teacher.py: a block starting right after a name starts one earlier (a_start = block.a - 1), and
    # without change_name_back no name position is dropped, so the name's last token (position 4, "Lund", reading
    # the copy's last name token) is aligned to the copy's: it predicts the same "was".
    assert align_positions(ORIGINAL, COPY_SHORT, skip_name_positions=False) == {1: 1, 2: 2, 4: 3, 5: 4, 6: 5}
    assert align_positions(ORIGINAL, COPY_LONG, skip_name_positions=False) == {1: 1, 2: 2, 4: 5, 5: 6, 6: 7}


def test_only_answer_positions_are_aligned_in_a_question_answer_document():
    # <s> Q : | Mara Lund was born </s>, the answer from index 3 (labels -100 before it). Official TOFU teacher:
    # positions from num_added_tok - 1 = 2 (the one predicting the answer's first token); the question's
    # position 1 is not trained, so the document's loss is a mean over 3 positions, not 4.
    labels = [-100, -100, -100, 10, 11, 7, 8, 1]
    original = _doc(ORIGINAL.ids, ORIGINAL.name_token, [(3, False)], question=True, labels=labels)
    copy = _doc(COPY_SHORT.ids, COPY_SHORT.name_token, [(3, False)], question=True, labels=[-100] * 3 + [20, 7, 8, 1])
    assert align_positions(original, copy) == {2: 2, 5: 4, 6: 5}


def test_alignment_skips_an_added_prompt():
    prefixed = _doc([0, 40, 41, 5, 6, 20, 7, 8, 1], [0] * 9, [(5, False)], n_prefix=3)
    assert align_positions(ORIGINAL, prefixed) == {1: 3, 2: 4, 5: 6, 6: 7}  # <s> sits inside the prefix


@pytest.fixture(scope="module")
def tokenizer():
    task = generated_task(6, 1, seed=3)
    return train_bpe([ex.prompt + ex.target for ex in task.train], 320)


def test_alignment_with_a_real_tokenizer_reads_the_same_next_token(tokenizer):
    prompt, target = "Question: Where was Mara Lund born?\nAnswer:", " Mara Lund was born in Oslo. Mara left."
    original = encode_document(tokenizer, prompt, target, "Mara Lund")
    for name in ("Bo Yu", "Ottoline Featherstonehaugh"):
        copy = encode_document(
            tokenizer, replace_name(prompt, "Mara Lund", name), replace_name(target, "Mara Lund", name), name
        )
        assert len(copy.ids) != len(original.ids)
        pairs = align_positions(original, copy)
        name_starts = {s for s, _ in original.mention_starts}
        for i, j in pairs.items():
            assert not original.name_token[i]
            if i + 1 in name_starts:  # the position predicting a name's first token: the copy predicts its own name
                assert copy.name_token[j + 1]
            else:
                assert original.ids[i + 1] == copy.ids[j + 1]
        # Every answer position outside the names is aligned, from the one predicting the answer's first token
        # (official TOFU teacher: num_added_tok - 1); the question's positions and position 0 are not.
        assert original.question and original.answer_start > 10
        start = original.answer_start - 1
        expected = [i for i in range(start, len(original.ids) - 1) if not original.name_token[i]]
        assert sorted(pairs) == expected
        passage = encode_document(tokenizer, "", target, "Mara Lund")  # a passage (no question): from position 1
        passage_copy = encode_document(tokenizer, "", replace_name(target, "Mara Lund", name), name)
        assert sorted(align_positions(passage, passage_copy)) == [
            i for i in range(1, len(passage.ids) - 1) if not passage.name_token[i]
        ]
    assert len(original.mention_starts) == 3 and [e for _, e in original.mention_starts] == [False, True, True]


def test_first_token_ids_drop_bare_spaces(tokenizer):
    ids = first_token_ids(tokenizer, "Bo Yu")
    assert all(tokenizer.decode([i]).strip() for i in ids)
    assert tokenizer(" Bo", add_special_tokens=False)["input_ids"][0] in ids


# -- averaging and name handling ------------------------------------------------------------------------------------


def test_move_to_original_name_by_hand():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64)
    moved = move_to_original_name(probs, 0, {1, 2})
    # token 0 gains 0.5 - 1e-8 and 0.3 - 1e-8; tokens 1 and 2 keep 1e-8 each; token 3 is untouched.
    expected = torch.tensor([0.9 - 2 * MOVE_FLOOR, MOVE_FLOOR, MOVE_FLOOR, 0.1], dtype=torch.float64)
    assert torch.allclose(moved, expected, atol=1e-15)
    assert math.isclose(float(moved.sum()), 1.0, abs_tol=1e-12)


def _prediction(positions, rows, replacement_ids):
    return CopyPrediction(
        {i: k for k, i in enumerate(positions)}, torch.tensor(rows, dtype=torch.float64), replacement_ids
    )


def test_counterfactual_average_is_the_mean_over_common_positions():
    # Copy A aligns positions 0, 1, 2; copy B aligns 1, 2, 3: the teacher lives on {1, 2} only.
    a = _prediction([0, 1, 2], [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0]], {3})
    b = _prediction([1, 2, 3], [[0, 1, 0, 0], [0, 0, 0.5, 0.5], [1, 0, 0, 0]], {3})
    doc = _doc([0, 5, 6, 7, 1], [0] * 5, [])
    positions, probs = counterfactual_average(doc, [a, b])
    assert positions == [1, 2]
    # position 1: ((0.5, 0.5, 0, 0) + (0, 1, 0, 0)) / 2; position 2: ((0, 0, 1, 0) + (0, 0, 0.5, 0.5)) / 2
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75, 0, 0], [0, 0, 0.75, 0.25]], dtype=torch.float64))


def test_later_mentions_keep_the_target_name_first_mention_does_not():
    # ids: <s> the(5) Mara(10) said(6) Mara(10) </s>; the first mention starts at 2, a later one at 4. A
    # question/answer document (TOFU's format): the official leaves the first appearance alone there only.
    doc = _doc([0, 5, 10, 6, 10, 1], [0, 0, 1, 0, 1, 0], [(2, False), (4, True)], question=True)
    # Each copy at positions 1 (predicting the first mention) and 3 (predicting the later one) puts 0.6 on its
    # own name's first token (20 for copy A, 21 for copy B); vocabulary of 22.
    rows = []
    for own in (20, 21):
        row = torch.zeros(22, dtype=torch.float64)
        row[own], row[7] = 0.6, 0.4
        rows.append(row)
    copies = [CopyPrediction({1: 0, 3: 1}, torch.stack([r, r]), {own}) for r, own in zip(rows, (20, 21))]
    positions, probs = counterfactual_average(doc, copies, change_name_back=True)
    assert positions == [1, 3]
    # First appearance (position 1): the plain mean, 0.3 on each replacement name, 0.4 on token 7.
    assert torch.isclose(probs[0, 20], torch.tensor(0.3, dtype=torch.float64)) and probs[0, 10] == 0
    # Later mention (position 3): every copy's name mass moves to the target's token 10.
    assert torch.isclose(probs[1, 10], torch.tensor(0.6 - MOVE_FLOOR, dtype=torch.float64))
    assert torch.isclose(probs[1, 7], torch.tensor(0.4, dtype=torch.float64))
    _, plain = counterfactual_average(doc, copies, change_name_back=False)
    assert plain[1, 10] == 0
    # A passage (WPU's format): the official moves the mass at the first appearance too.
    passage = _doc(doc.ids, doc.name_token, doc.mention_starts, question=False)
    _, moved = counterfactual_average(passage, copies, change_name_back=True)
    assert torch.isclose(moved[0, 10], torch.tensor(0.6 - MOVE_FLOOR, dtype=torch.float64)) and moved[0, 20] < 1e-7


def test_majority_rule_counts_spaced_and_bare_first_tokens_apart():
    # <s> Mara(10) left(5) and(6) then(7) </s>: the target was mentioned at 1; position 3 predicts "then" (7),
    # no mention. Four copies; each copy n has its own spaced first token 20 + n and bare one 30 + n. Copies 0 and
    # 1 put 0.3 on their spaced token, copy 2 on its bare one, copy 3 neither (0.3 elsewhere, on token 8).
    doc = _doc([0, 10, 5, 6, 7, 1], [0, 1, 0, 0, 0, 0], [(1, False)])
    copies = []
    for n, kind in enumerate(("spaced", "spaced", "bare", None)):
        row = torch.zeros(40, dtype=torch.float64)
        row[7] = 0.7
        row[{"spaced": 20 + n, "bare": 30 + n, None: 8}[kind]] = 0.3
        copies.append(CopyPrediction({3: 0}, row[None], {20 + n, 30 + n}, {20 + n}, {30 + n}))
    # Spaced votes 2, bare 1: neither is more than half of 4 (official n_w_prefix / n_wo_prefix); together (3)
    # they would be, the rule before issue 29. So nothing moves: the plain mean.
    _, probs = counterfactual_average(doc, copies, target_first=(11, 12))
    assert (
        probs[0, 11] == 0
        and probs[0, 12] == 0
        and torch.isclose(probs[0, 20], torch.tensor(0.075, dtype=torch.float64))
    )
    # A third spaced vote: 3 of 4, so every copy's name mass (both kinds) moves to the target's spaced token 11.
    row = torch.zeros(40, dtype=torch.float64)
    row[7], row[23] = 0.7, 0.3
    copies[3] = CopyPrediction({3: 0}, row[None], {23, 33}, {23}, {33})
    _, probs = counterfactual_average(doc, copies, target_first=(11, 12))
    assert torch.isclose(probs[0, 11], torch.tensor(0.3 - 1e-8, dtype=torch.float64), atol=1e-12)
    # Three bare votes instead: the mass goes to the target's bare token 12.
    bare = []
    for n in range(4):
        row = torch.zeros(40, dtype=torch.float64)
        row[7], row[30 + n if n < 3 else 8] = 0.7, 0.3
        bare.append(CopyPrediction({3: 0}, row[None], {20 + n, 30 + n}, {20 + n}, {30 + n}))
    _, probs = counterfactual_average(doc, bare, target_first=(11, 12))
    assert torch.isclose(probs[0, 12], torch.tensor(0.225 - 0.75e-8, dtype=torch.float64), atol=1e-12)
    assert probs[0, 11] == 0


def test_autojunk_is_on_as_in_the_official_alignment():
    # A repetitive passage of 245 tokens: <s>, the name (10), "a b" x 120, the name again, "c" (7), </s>; the copy
    # has the name 20. difflib's autojunk (on by default, as the official SequenceMatcher(None, a, b)) drops the
    # tokens making up more than 1 % of a 200+ token sequence from its index: "a" and "b" can only extend a match
    # found on another token, and the run between the two names has none, so only "c" aligns. Off: all 240 more.
    ids = [0, 10] + [5, 6] * 120 + [10, 7, 1]
    name = [0, 1] + [0] * 240 + [1, 0, 0]
    original = _doc(ids, name, [(1, False), (242, True)])
    copy = _doc([0, 20] + [5, 6] * 120 + [20, 7, 1], name, [(1, False), (242, True)])
    assert align_positions(original, copy) == {243: 243}
    assert len(align_positions(original, copy, autojunk=False)) == 241  # positions 2..241 and 243


def test_whp_generic_logits_by_hand():
    baseline, reinforced = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([4.0, 1.0, -1.0])
    # ReLU(v_r - v_b) = (2, 0, 0): v_generic = (2 - 2 alpha, 1, 0); alpha = 1 turns the argmax from 0 to 1.
    assert torch.equal(whp_generic_logits(baseline, reinforced, 1.0), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(whp_generic_logits(baseline, reinforced, 0.0), baseline)


def test_n1_causal_teacher_with_the_whp_offset_is_the_whp_target():
    torch.manual_seed(0)
    base_copy = torch.randn(len(COPY_SHORT.ids), 40)  # the baseline model on the translated copy
    reinforced = torch.randn(len(ORIGINAL.ids), 40)  # the reinforced model on the original
    positions, labels = whp_labels(ORIGINAL, COPY_SHORT, base_copy, reinforced, alpha=2.0, replacement_ids={20})
    pairs = align_positions(ORIGINAL, COPY_SHORT)
    order = sorted(pairs)
    generic = whp_generic_logits(base_copy[[pairs[i] for i in order]], reinforced[order], 2.0)
    one_copy = CopyPrediction({i: k for k, i in enumerate(order)}, torch.softmax(generic, -1), {20})
    n1_positions, n1_probs = counterfactual_average(ORIGINAL, [one_copy])
    assert positions == n1_positions == [1, 2, 5, 6]
    assert torch.equal(labels, n1_probs.argmax(-1))
    assert torch.equal(labels, generic.argmax(-1))  # no later mention here: the name rule changes nothing


# -- losses ---------------------------------------------------------------------------------------------------------


def test_kl_to_teacher_against_torch_kl_div():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(2, 3, 9, dtype=torch.float64), -1)
    positions = torch.tensor([[0, 2, 5], [1, 4, -1]])  # the second document has two positions (one padded)
    got = kl_to_teacher_sums(logits, positions, teacher)
    for b, n in ((0, 3), (1, 2)):
        logq = F.log_softmax(logits[b, positions[b, :n]], -1)
        ref = F.kl_div(logq, teacher[b, :n], reduction="sum") / n  # official: sum over V and positions / count
        assert torch.isclose(got[b].double(), ref)
    same = kl_to_teacher_sums(logits, positions.clamp(min=0), torch.softmax(torch.gather(
        logits, 1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, 9)), -1))  # fmt: skip
    assert torch.allclose(same, torch.zeros(2, dtype=same.dtype), atol=1e-6)
    one_hot = F.one_hot(torch.tensor([[3, 1, 0], [2, 2, 0]]), 9).double()
    ce = kl_to_teacher_sums(logits, positions, one_hot)  # a one-hot teacher: the cross-entropy
    ref_ce = F.cross_entropy(logits[0, [0, 2, 5]], torch.tensor([3, 1, 0]))
    assert torch.isclose(ce[0].double(), ref_ce)


def test_sequence_nll_and_npo_by_hand():
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100]])
    nll, count = sequence_nll(logits, labels)
    ref = F.cross_entropy(logits[0, :2], torch.tensor([3, 1]), reduction="sum")
    assert torch.isclose(nll[0], ref) and int(count[0]) == 2
    # nll == ref_nll: -(2/beta) log sigmoid(0) = (2/beta) ln 2
    value = npo_loss(torch.tensor([1.5]), torch.tensor([1.5]), beta=0.1)
    assert torch.isclose(value, torch.tensor([20 * math.log(2)]))
    # beta -> 0: d loss / d nll -> -1, gradient ascent on the NLL
    x = torch.tensor([2.0], requires_grad=True)
    npo_loss(x, torch.tensor([1.0]), beta=1e-4).sum().backward()
    assert torch.isclose(x.grad, torch.tensor([-1.0]), atol=1e-3)


# -- settings and the end-to-end run --------------------------------------------------------------------------------


def test_bad_flags_are_config_errors(tmp_path):
    from unlearning.whp.run import main

    for argv in (["--method", "retrain"], ["--compare", "ga,foo"], ["--n-counterfactual", "0"],
                 ["--task", "tofu"], ["--alpha", "-1"]):  # fmt: skip
        with pytest.raises(ConfigError):
            main([*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# 4 people, one of them unlearned; the model to unlearn is the 2 x 64 preset trained on all 36 documents per step.
# lr 5e-4: since the teacher trains answer positions only (official, issue 29), each question/answer document's KL
# is a mean over about half as many positions, so its step on them is about twice as large; at the former 1e-3 the
# causal student's retain accuracy fell from 0.79 to 0.62 on this run (0.83 at 5e-4; forget accuracy still falls).
TINY = ["--base-preset", "student", "--n-people", "4", "--n-targets", "1", "--teacher-steps", "60",
        "--base-batch-size", "36", "--base-lr", "2e-2", "--skip-retain-model", "--steps", "10", "--batch-size", "9",
        "--lr", "5e-4", "--reinforce-steps", "5", "--n-counterfactual", "3", "--compare", "causal,ga",
        "--max-new-tokens", "16"]  # fmt: skip


@pytest.mark.slow
def test_unlearn_one_generated_person_end_to_end(tmp_path):
    from unlearning.whp.run import main

    metrics = main([*TINY, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    evals = metrics["eval"]
    original = evals["original"]
    assert original["forget_acc"] >= 0.75 and original["retain_acc"] >= 0.75  # the model to unlearn knows them
    for key in ("student", "causal_student", "ga_student"):
        # accuracy on the unlearned person falls; on the others it stays within 0.35 of the original
        assert evals[key]["forget_acc"] < original["forget_acc"], key
    for key in ("student", "causal_student"):
        assert evals[key]["retain_acc"] >= original["retain_acc"] - 0.35, key
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # the WHP objective fell
    for name in ("metrics.json", "samples.jsonl", "unlearning_curves.png", "student/config.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert "forget_quality" not in evals["student"]  # no retain model was trained

"""DSKD: ULD and MinED by hand, cross-model attention (shapes, masks, a learned alignment), dual space against
plain KD, padded heads, and tiny end-to-end runs with two different tokenizers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.crosstok import (
    BYTE_LEVEL_VOCAB,
    PairCollator,
    common_vocabulary,
    dtw_align,
    edit_distance,
    encode_pairs,
    invert_vocabulary_map,
    vocabulary_map,
)
from core.data import DataConfig, load_task
from core.errors import ConfigError, VocabularyMismatchError
from core.losses import forward_kl, get_divergence
from core.models import build_model
from core.tokenizers import load_tokenizer, train_bpe
from methods.dskd.align import VocabularyAlignment, align_positions, mined_target_logits
from methods.dskd.loss import MASKED, cma_terms, dual_space_terms, uld_distance, uld_sum
from methods.dskd.run import DSKDConfig, main
from tests.conftest import shared_data

# The teacher settings are the other method tests' (one cached tiny teacher per test session); a short budget.
TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "20", "--eval-size", "8",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# ULD
# ---------------------------------------------------------------------------------------------------------------


def test_uld_by_hand_with_different_lengths_and_padding():
    # Student: 3-token vocabulary, targets at positions 2 and 3 (prompt before, padding after).
    # Teacher: 2-token vocabulary, targets at positions 1, 2, 3. Pairs: (s2, t1) and (s3, t2); t3 is unpaired.
    # (s2, t1): q = (.5, .3, .2), p = (.6, .4) -> sorted, padded p = (.6, .4, 0): |.5-.6| + |.3-.4| + |.2-0| = .4
    # (s3, t2): q = (.2, .7, .1) -> (.7, .2, .1); p = (.1, .9) -> (.9, .1, 0): .2 + .1 + .1 = .4        total .8
    torch.manual_seed(0)
    student = 10 * torch.randn(2, 5, 3, dtype=torch.float64)  # anything at unpaired positions must not count
    teacher = 10 * torch.randn(2, 4, 2, dtype=torch.float64)
    student[0, 2], student[0, 3] = (
        torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log(),
        torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64).log(),
    )
    teacher[0, 1], teacher[0, 2] = (
        torch.tensor([0.6, 0.4], dtype=torch.float64).log(),
        torch.tensor([0.1, 0.9], dtype=torch.float64).log(),
    )
    s_labels = torch.tensor([[-100, -100, 1, 2, -100], [-100, 0, 1, 2, 0]])
    t_labels = torch.tensor([[-100, 0, 1, 1], [-100, -100, -100, -100]])  # row 2: the teacher has no target
    assert uld_sum(student, teacher, s_labels, t_labels).item() == pytest.approx(0.8, abs=1e-12)
    # The per-position distance is symmetric in its padding and invariant to permuting either vocabulary.
    p = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(uld_distance(p[:, torch.randperm(7)], p), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    assert torch.allclose(uld_distance(a, b), uld_distance(b, a))


# ---------------------------------------------------------------------------------------------------------------
# MinED: edit distance, DTW, vocabulary map, aligned logits
# ---------------------------------------------------------------------------------------------------------------


def test_edit_distance_and_dtw_by_hand():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert edit_distance("flaw", "lawn") == edit_distance("lawn", "flaw") == 2
    # teacher "ab" "c" vs student "a" "b" "c"; costs: d(ab,a)=1 d(ab,b)=1 d(ab,c)=2 d(c,a)=1 d(c,b)=1 d(c,c)=0.
    # D row "ab": 1, 2, 4; row "c": 2, 1+min(1,2,2)=2, 0+min(2,4,2)=2. Back from (c, c): diagonal (2) ties left
    # (2) and wins -> (ab, b); then only left -> (ab, a). Student a -> ab, b -> ab, c -> c.
    teacher_matches, student_matches = dtw_align(["ab", "c"], ["a", "b", "c"])
    assert student_matches == [[0], [0], [1]] and teacher_matches == [[0, 1], [2]]
    # One teacher token per student token here; in the reverse direction "ab" is matched with two.
    assert align_positions(["a", "b", "c"], ["ab", "c"]) == [0, 0, 1]
    assert align_positions(["ab", "c"], ["a", "b", "c"]) == [None, 2]


def test_invert_vocabulary_map_keeps_the_first_teacher_id():
    student_ids, teacher_ids = invert_vocabulary_map(torch.tensor([0, 2, 0, -1, 5]))
    assert student_ids.tolist() == [0, 2, 5] and teacher_ids.tolist() == [0, 1, 4]


def test_mined_target_logits_by_hand():
    # Student vocabulary a b c (ids 0 1 2); teacher ab c (ids 0 1). Map: "c" -> c (2); "ab" is at distance 1 from
    # both a and b, the lower id wins: a (0). Inverted: student a <- teacher ab, c <- teacher c, b unmapped.
    vocab = VocabularyAlignment(
        teacher_to_student=torch.tensor([0, 2]),
        student_ids=torch.tensor([0, 2]),
        teacher_ids=torch.tensor([0, 1]),
        student_strings=["a", "b", "c"],
        teacher_strings=["ab", "c"],
    )
    # One example: the student reads a b c (targets b c a), the teacher ab c (targets c ab); one padded slot each.
    s_inputs, s_labels = torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 2, 0, -100]])
    t_inputs, t_labels = torch.tensor([[0, 1, 0]]), torch.tensor([[1, 0, -100]])
    student_logits = torch.randn(1, 4, 3)
    teacher_logits = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    target, aligned = mined_target_logits(student_logits, teacher_logits, s_inputs, s_labels, t_inputs, t_labels, vocab)
    # a -> ab (one-to-one, and "ab" maps to a): teacher row 0 with columns (a <- ab, b absent, c <- c).
    # b -> ab, but "ab" maps to a, not b: one-hot on its target c.  c -> c: teacher row 1.
    assert aligned.tolist() == [[True, False, True, False]]
    assert target[0, 0].tolist() == [1.0, MASKED, 2.0]
    assert target[0, 1].tolist() == [MASKED, MASKED, 100.0]
    assert target[0, 2].tolist() == [3.0, MASKED, 4.0]
    assert torch.equal(target[0, 3], student_logits[0, 3])  # no target: the student's own logits (KL 0)


def _ops_tokenizers():
    task = load_task(DataConfig(train_size=2000, eval_size=4))
    texts = [ex.prompt + ex.target for ex in task.train]
    return task, train_bpe(texts, 512), train_bpe(texts, BYTE_LEVEL_VOCAB)


def test_the_default_tokenizers_really_differ_and_map_by_text():
    task, teacher, student = _ops_tokenizers()
    assert len(student) == 259 and len(teacher) > 280
    pairs = encode_pairs(student, teacher, task.train[:200], 128)
    n_student = sum(len(p["input_ids"]) for p in pairs)
    n_teacher = sum(len(p["teacher_input_ids"]) for p in pairs)
    assert n_student > 1.5 * n_teacher  # bytes vs merges: every example is longer for the student
    ids = teacher("sort: 8 7 =", add_special_tokens=False)["input_ids"]
    assert teacher.convert_ids_to_tokens(ids) == ["sort", ":", "Ġ8", "Ġ7", "Ġ="]
    assert student.convert_ids_to_tokens(student("8 7", add_special_tokens=False)["input_ids"]) == ["8", "Ġ", "7"]
    mapping = vocabulary_map(teacher, student)
    s_vocab = student.get_vocab()
    # single characters map to themselves; "Ġ8" is at edit distance 1 from both "Ġ" and "8": the lower id wins
    assert mapping[teacher.convert_tokens_to_ids(":")] == s_vocab[":"]
    assert mapping[teacher.convert_tokens_to_ids("Ġ8")] == min(s_vocab["Ġ"], s_vocab["8"])
    assert mapping[teacher.eos_token_id] == student.eos_token_id
    batch = PairCollator(student.pad_token_id, teacher.pad_token_id)(pairs[:3])
    assert batch["input_ids"].shape[1] > batch["teacher_input_ids"].shape[1]
    assert (batch["labels"] != -100).sum() > (batch["teacher_labels"] != -100).sum()


# ---------------------------------------------------------------------------------------------------------------
# Dual space (one vocabulary)
# ---------------------------------------------------------------------------------------------------------------


def _space(seed=0, batch=2, length=6, dim=8, vocab=11):
    torch.manual_seed(seed)
    head = torch.randn(vocab, dim, dtype=torch.float64)
    h_s, h_t = (
        torch.randn(batch, length, dim, dtype=torch.float64),
        torch.randn(batch, length, dim, dtype=torch.float64),
    )
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :2] = -100  # prompt
    labels[1, -1] = -100  # padding
    return head, h_s, h_t, labels


def test_dual_space_with_identity_projectors_is_kd_twice_plus_the_teacher_ce():
    # One head W for both models and identity projectors: z^{t->s} = W h^t = the teacher's logits and
    # z^{s->t} = W h^s = the student's, so L_kd^stu = L_kd^tea = ordinary word-level KD and L_ce^{t->s} = the
    # teacher's CE on the labels.
    head, h_s, h_t, labels = _space()
    s_logits, t_logits = h_s @ head.T, h_t @ head.T
    tau = 2.0
    fkl = get_divergence("fkl", tau)
    terms = dual_space_terms(
        s_logits, h_s, t_logits, h_t, labels, head, head, torch.nn.Identity(), torch.nn.Identity(), fkl, tau
    )
    mask = labels != -100
    valid = mask.sum().item()
    kd = (forward_kl(s_logits[mask], t_logits[mask], tau)).sum()  # plain reference, independent of the masks
    assert torch.allclose(terms.t2s_kd, kd) and torch.allclose(terms.s2t_kd, kd)
    ce = F.cross_entropy(t_logits[mask], labels[mask], reduction="sum")
    assert torch.allclose(terms.t2s_ce, ce)
    assert terms.t2s_correct.item() == (t_logits.argmax(-1)[mask] == labels[mask]).sum().item() <= valid
    # Identical models: nothing left to distil; only the projector's CE remains.
    same = dual_space_terms(
        s_logits, h_s, s_logits, h_s, labels, head, head, torch.nn.Identity(), torch.nn.Identity(), fkl, tau
    )
    assert same.t2s_kd.abs().item() < 1e-12 and same.s2t_kd.abs().item() < 1e-12


def test_dual_space_projector_terms_and_gradients_match_a_plain_reference():
    head_s, h_s, _, labels = _space(1, dim=6)
    torch.manual_seed(2)
    head_t, h_t = torch.randn(11, 10, dtype=torch.float64), torch.randn(2, 6, 10, dtype=torch.float64)
    t2s, s2t = torch.nn.Linear(10, 6).double(), torch.nn.Linear(6, 10).double()
    h_s.requires_grad_(True)
    s_logits, t_logits = h_s @ head_s.T, h_t @ head_t.T
    terms = dual_space_terms(
        s_logits, h_s, t_logits, h_t, labels, head_s, head_t, t2s, s2t, get_divergence("rkl", 1.5), 1.5
    )
    mask = labels != -100
    z_t2s, z_s2t = t2s(h_t) @ head_s.T, s2t(h_s) @ head_t.T
    ref_kd = (
        (F.softmax(s_logits / 1.5, -1) * (F.log_softmax(s_logits / 1.5, -1) - F.log_softmax(z_t2s.detach() / 1.5, -1)))
        .sum(-1)[mask]
        .sum()
    )
    ref_s2t = (
        (F.softmax(t_logits / 1.5, -1) * (F.log_softmax(t_logits / 1.5, -1) - F.log_softmax(z_s2t / 1.5, -1)))
        .sum(-1)[mask]
        .sum()
    )
    ref_ce = F.cross_entropy(z_t2s[mask], labels[mask], reduction="sum")
    assert (
        torch.allclose(terms.t2s_kd, ref_kd)
        and torch.allclose(terms.s2t_kd, ref_s2t)
        and torch.allclose(terms.t2s_ce, ref_ce)
    )
    # The student-space target is detached: the projector learns only from the CE (D2), the student only from KD.
    (g_proj,) = torch.autograd.grad(terms.t2s_kd, t2s.weight, allow_unused=True, retain_graph=True)
    assert g_proj is None
    (g_ce,) = torch.autograd.grad(terms.t2s_ce, t2s.weight, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref_ce, t2s.weight)
    assert torch.allclose(g_ce, g_ref)  # fmt: skip


def test_padded_heads_use_the_common_vocabulary_and_other_tokenizers_point_to_cma():
    _, teacher_tok, student_tok = _ops_tokenizers()
    small, padded = build_model("tiny", teacher_tok, 0), build_model("tiny", teacher_tok, 1)
    padded.resize_token_embeddings(len(teacher_tok) + 128)  # as Qwen1.5 pads its heads to different sizes
    assert common_vocabulary(padded, small, teacher_tok, teacher_tok, "dskd") == len(teacher_tok)
    with pytest.raises(VocabularyMismatchError, match="dskd-cma"):
        common_vocabulary(padded, small, teacher_tok, student_tok, "dskd")


# ---------------------------------------------------------------------------------------------------------------
# Cross-model attention
# ---------------------------------------------------------------------------------------------------------------


def _cma_inputs(seed=0, b=2, ts=7, tt=5, ds=6, dt=10, vs=13, vt=17):
    torch.manual_seed(seed)
    s_labels, t_labels = torch.randint(0, vs, (b, ts)), torch.randint(0, vt, (b, tt))
    s_labels[:, :2] = -100  # prompt
    s_labels[1, 5:] = -100  # padding
    t_labels[:, 0] = -100
    t_labels[0, 3:] = -100
    return dict(
        student_logits=torch.randn(b, ts, vs, dtype=torch.float64),
        student_hidden=torch.randn(b, ts, ds, dtype=torch.float64),
        student_index_embeds=torch.randn(b, ts, 2 * ds, dtype=torch.float64),
        student_labels=s_labels,
        student_head=torch.randn(vs, ds, dtype=torch.float64),
        teacher_logits=torch.randn(b, tt, vt, dtype=torch.float64),
        teacher_hidden=torch.randn(b, tt, dt, dtype=torch.float64),
        teacher_index_embeds=torch.randn(b, tt, 2 * dt, dtype=torch.float64),
        teacher_target_embeds=torch.randn(b, tt, dt, dtype=torch.float64),
        teacher_labels=t_labels,
        teacher_head=torch.randn(vt, dt, dtype=torch.float64),
    )


def _projectors(ds=6, dt=10):
    torch.manual_seed(5)
    return torch.nn.Linear(2 * ds, 2 * dt).double(), torch.nn.Linear(dt, ds).double(), torch.nn.Linear(ds, dt).double()


def test_cma_shapes_rows_sum_to_one_and_padding_is_masked():
    inputs, (query, t2s, s2t) = _cma_inputs(), _projectors()
    fkl = get_divergence("fkl", 2.0)
    terms = cma_terms(**inputs, query_projector=query, t2s=t2s, s2t=s2t, divergence=fkl, temperature=2.0)
    weights = terms.t2s_weights
    assert weights.shape == (2, 7, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 7, dtype=weights.dtype))
    s_mask, t_mask = inputs["student_labels"] != -100, inputs["teacher_labels"] != -100
    # valid student rows put no weight on teacher prompt or padding positions
    leaked = weights * s_mask[:, :, None] * ~t_mask[:, None, :]
    assert leaked.abs().max().item() < 1e-30
    # logits at masked positions never reach the loss
    changed = dict(inputs)
    changed["teacher_logits"] = inputs["teacher_logits"].masked_fill(~t_mask[..., None], 1e3)
    changed["student_logits"] = inputs["student_logits"].masked_fill(~s_mask[..., None], -1e3)
    again = cma_terms(**changed, query_projector=query, t2s=t2s, s2t=s2t, divergence=fkl, temperature=2.0)
    for a, b in zip(terms[:4], again[:4]):
        assert torch.allclose(a, b)
    # the student-space KD counts only positions where the projected teacher predicts the target (official mask)
    assert terms.t2s_correct.item() <= s_mask.sum().item()
    none_correct = cma_terms(**{**inputs, "student_head": torch.zeros_like(inputs["student_head"])},
                             query_projector=query, t2s=t2s, s2t=s2t, divergence=fkl, temperature=2.0)  # fmt: skip
    # all-zero head: uniform z^{t->s}, argmax is token 0; labels equal to 0 count as correct, nothing else
    expected = ((inputs["student_labels"] == 0) & s_mask).sum().item()
    assert none_correct.t2s_correct.item() == expected
    assert none_correct.t2s_ce.item() == pytest.approx(s_mask.sum().item() * math.log(13), rel=1e-12)


def test_cma_learns_to_attend_to_the_teacher_token_with_the_same_word():
    # Words 0..7. The teacher has one token per word; the student splits word 0 into two pieces (ids 0 and 8).
    # Each sentence is 5 distinct words. Teacher hidden states are noise, so the only way for the projected
    # teacher (values carry the teacher's target embedding, C2) to predict the student's target is to attend to
    # the teacher position whose target is the same word. Only the projectors learn (L_ce^{t->s}, C4), as in the
    # official projector pre-training; embeddings and heads are fixed random tables.
    torch.manual_seed(0)
    ds, dt, n_words = 16, 16, 8
    e_s, e_t, head_s = torch.randn(n_words + 1, ds), torch.randn(n_words, dt), torch.randn(n_words + 1, ds)
    query, t2s, s2t = torch.nn.Linear(2 * ds, 2 * dt), torch.nn.Linear(dt, ds), torch.nn.Linear(ds, dt)

    def batch(size=32):
        sentences = [torch.randperm(n_words)[:5].tolist() for _ in range(size)]
        students = [[p for w in s for p in ([0, 8] if w == 0 else [w])] for s in sentences]

        def pad(rows, width):  # noqa: E306
            return torch.tensor([r + [0] * (width - len(r)) for r in rows]), torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            )

        s_ids, s_valid = pad(students, 6)
        t_ids, t_valid = pad(sentences, 5)
        s_in, s_lab = s_ids[:, :-1], torch.where(s_valid[:, 1:].bool(), s_ids[:, 1:], -100)
        t_in, t_lab = t_ids[:, :-1], torch.where(t_valid[:, 1:].bool(), t_ids[:, 1:], -100)
        s_index = torch.cat([e_s[s_in], e_s[s_lab.clamp(min=0)]], -1)
        t_index = torch.cat([e_t[t_in], e_t[t_lab.clamp(min=0)]], -1)
        inputs = dict(
            student_logits=torch.zeros(size, 5, n_words + 1), student_hidden=torch.randn(size, 5, ds),
            student_index_embeds=s_index, student_labels=s_lab, student_head=head_s,
            teacher_logits=torch.zeros(size, 4, n_words), teacher_hidden=torch.randn(size, 4, dt),
            teacher_index_embeds=t_index, teacher_target_embeds=e_t[t_lab.clamp(min=0)], teacher_labels=t_lab,
            teacher_head=torch.randn(n_words, dt),
        )  # fmt: skip
        return inputs, s_lab, t_lab

    def mass_on_same_word(inputs, s_lab, t_lab):
        with torch.no_grad():
            w = cma_terms(**inputs, query_projector=query, t2s=t2s, s2t=s2t, divergence=forward_kl, temperature=1.0)
        whole = (s_lab > 0) & (s_lab < 8)  # targets that are whole words (not a piece of word 0)
        same = s_lab[:, :, None] == t_lab[:, None, :]  # (B, T_s, T_t): the teacher position with the same target
        return ((w.t2s_weights * same).sum(-1)[whole]).mean().item()

    held_out = batch(256)
    before = mass_on_same_word(*held_out)
    optimizer = torch.optim.Adam([*query.parameters(), *t2s.parameters()], lr=1e-2)
    for _ in range(150):
        inputs, _, _ = batch()
        terms = cma_terms(**inputs, query_projector=query, t2s=t2s, s2t=s2t, divergence=forward_kl, temperature=1.0)
        optimizer.zero_grad()
        (terms.t2s_ce / (inputs["student_labels"] != -100).sum()).backward()
        optimizer.step()
    after = mass_on_same_word(*held_out)
    assert before < 0.5 < 0.8 < after, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# Settings and end-to-end runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [({"variant": "cma"}, "--variant"), ({"kd_rate": 1.5}, "--kd-rate"), ({"kd_temperature": 0.0}, "--kd-temperature"),
     ({"kd_objective": "kl"}, "--kd-objective"), ({"projector_lr": 0.0}, "--projector-lr"),
     ({"compare": "uld,seqkd"}, "unknown baselines"), ({"kd_terms": "t2s_kd,ce"}, "--kd-terms"),
     ({"kd_terms": ","}, "--kd-terms")],
)  # fmt: skip
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        DSKDConfig(**bad)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_end_to_end_cma_against_uld_and_mined(tmp_path):
    out = tmp_path / "cma"
    metrics = main([*TINY, "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "dskd-cma" and {"method", "task", "seed", "eval", "train", "config", "env"} <= set(saved)
    assert set(saved["eval"]) == {"student", "teacher", "sft_student", "uld_student", "mined_student"}
    assert saved["tokenizers"]["student"]["size"] == 259 and saved["tokenizers"]["teacher"]["size"] > 280
    assert saved["config"]["CrossTokenizerConfig"]["student_vocab_size"] == 259
    log = _log(out)
    assert len(log) == 20 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert {"ce", "t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"} <= set(log[0])
    assert log[-1]["t2s_ce"] < log[0]["t2s_ce"]  # the projectors learn
    assert saved["train"]["baselines"]["uld_student"]["steps"] == 20
    assert len(load_tokenizer(out / "student")) == 259  # the student is saved with its own tokenizer
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"teacher", "student", "uld_student", "mined_student"} <= set(samples[0])
    assert metrics["eval"] == saved["eval"]


def test_end_to_end_with_real_tokenizers(tmp_path):
    gpt2, tinyllama = shared_data("tokenizers/gpt2"), shared_data("tokenizers/tinyllama-1.1b-3T")
    out = tmp_path / "real"
    args = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "2", "--steps", "4", "--eval-size", "2",
            "--train-size", "200", "--batch-size", "8", "--warmup-steps", "1", "--max-new-tokens", "2",
            "--teacher-tokenizer", str(gpt2), "--student-tokenizer", str(tinyllama), "--compare", "mined"]  # fmt: skip
    saved = main([*args, "--out", str(out)])
    assert saved["tokenizers"]["teacher"]["size"] == 50257 and saved["tokenizers"]["student"]["size"] == 32000
    assert len(_log(out)) == 4 and math.isfinite(_log(out)[-1]["loss"])
    assert saved["train"]["baselines"]["mined_student"]["steps"] == 4


def test_dual_space_without_cma_refuses_two_tokenizers_before_training_baselines(tmp_path):
    with pytest.raises(VocabularyMismatchError, match="dskd-cma"):
        main([*TINY, "--variant", "dskd", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing half-written

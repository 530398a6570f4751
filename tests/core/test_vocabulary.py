"""A teacher whose output head is padded beyond its tokenizer (gpt2's 50,257 tokens in 50,304 rows) is a
same-vocabulary teacher: every KD path compares the distributions over the tokenizer's ids (issue 14, item 3)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from core.data import Collator, DataConfig, encode_examples, load_task
from core.errors import VocabularyMismatchError
from core.kdpath import KDPath, KDPathConfig
from core.losses import get_divergence
from core.models import build_model
from core.teacher import check_same_vocabulary
from core.tokenizers import train_bpe

PAD_ROWS = 7


@pytest.fixture(scope="module")
def setup():
    task = load_task(DataConfig(train_size=64, eval_size=4))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 300)
    features = encode_examples(tokenizer, task.train[:6], 64)
    return tokenizer, features


def _padded_teacher(tokenizer, seed=0):
    config = LlamaConfig(
        vocab_size=len(tokenizer) + PAD_ROWS,  # the head pads 7 rows that no token has
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _reference_kd_sum(full_logits, student_logits, labels, vocab):
    """Forward KL from the padded teacher's distribution renormalised over the real ids, summed over the valid
    target positions. With p = softmax(z) over all V + 7 rows, the teacher restricted to the V real ids is
    p~_i = p_i / sum_{j<V} p_j = exp(z_i) / sum_{j<V} exp(z_j) = softmax(z[:V])_i, so
    KL(p~ || q) = sum_{i<V} p~_i (log p~_i - log q_i), q = softmax of the student's V logits."""
    p = F.softmax(full_logits.double(), dim=-1)  # (B, T, V + 7)
    p_real = p[..., :vocab] / p[..., :vocab].sum(-1, keepdim=True)  # renormalised by hand, not by log-softmax
    log_q = F.log_softmax(student_logits.double(), dim=-1)
    kl = (p_real * (p_real.log() - log_q)).sum(-1)  # (B, T)
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100  # position t predicts label t + 1
    return kl[valid].sum()


@pytest.mark.parametrize("path", ["plain", "chunked", "fused", "cache"])
def test_padded_teacher_head_gives_the_kd_loss_over_the_real_ids(setup, tmp_path, path):
    tokenizer, features = setup
    vocab = len(tokenizer)
    teacher = _padded_teacher(tokenizer)
    padded = copy.deepcopy(teacher)  # the untouched padded teacher: the reference reads all V + 7 of its rows
    student = build_model("tiny", tokenizer, seed=0)
    teacher = check_same_vocabulary(teacher, student, "kd", tokenizer)
    assert teacher.config.vocab_size == vocab and teacher.get_output_embeddings().weight.shape[0] == vocab
    assert not any(p.requires_grad for p in teacher.parameters())

    batch = Collator(tokenizer.pad_token_id)(features)
    with torch.no_grad():
        full = padded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The padded rows carry real mass in this teacher (about 7 / (V + 7) at random init), so a loss that kept them,
    # or compared unnormalised columns, would differ from the reference.
    assert F.softmax(full, -1)[..., vocab:].sum(-1).min() > 1e-3

    cfg = {
        "plain": KDPathConfig(),
        "chunked": KDPathConfig(chunk_size=5),
        "fused": KDPathConfig(fused=True),
        "cache": KDPathConfig(teacher_cache=True, teacher_cache_k=vocab),  # k = V: exact
    }[path]
    kd = KDPath(cfg, teacher, tmp_path, "tok", tokenizer.pad_token_id)
    out = kd.loss(get_divergence("fkl"), kd_ratio=1.0, features=features)(student, batch)
    expected = _reference_kd_sum(full, student_logits, batch["labels"], vocab)
    tolerance = 2e-3 if path == "cache" else 1e-4  # the cache stores float16 log-probabilities
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=tolerance)


def test_unpadded_teacher_is_returned_untouched(setup):
    tokenizer, _ = setup
    teacher, student = build_model("tiny", tokenizer, seed=1), build_model("tiny", tokenizer, seed=0)
    head = teacher.get_output_embeddings().weight
    assert check_same_vocabulary(teacher, student, "kd", tokenizer) is teacher
    assert teacher.get_output_embeddings().weight is head


def test_padded_teacher_with_another_tokenizer_is_refused(setup, tmp_path):
    """The head widths would pass; the tokenizer saved with the teacher maps other ids, so it is refused."""
    tokenizer, _ = setup
    other = train_bpe(["zebra quokka axolotl"] * 50 + ["a b c d"] * 50, 300)
    teacher = _padded_teacher(tokenizer)  # wide enough for the run's tokenizer
    teacher.save_pretrained(tmp_path / "t")
    other.save_pretrained(tmp_path / "t")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "t")
    with pytest.raises(VocabularyMismatchError, match=r"carries a tokenizer of other ids.*methods/dskd"):
        check_same_vocabulary(loaded, build_model("tiny", tokenizer, seed=0), "kd", tokenizer)


def test_a_head_narrower_than_the_tokenizer_is_refused(setup):
    tokenizer, _ = setup
    small = train_bpe(["zebra quokka"] * 50, 280)
    with pytest.raises(VocabularyMismatchError, match=rf"student has {len(small)} output rows for the tokenizer"):
        check_same_vocabulary(_padded_teacher(tokenizer), build_model("tiny", small, seed=0), "kd", tokenizer)


def test_a_run_with_a_padded_teacher_folder_trains_and_evaluates(setup, tmp_path):
    """Through the CLI recipe: the folder's teacher (head padded by 7 rows) and its own tokenizer are accepted (they
    used to be refused as "needs teacher and student to share a vocabulary"), the student is built from that
    tokenizer, and KD trains and evaluates."""
    from methods.vanilla.run import main

    tokenizer, _ = setup
    _padded_teacher(tokenizer).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    argv = ["--teacher", str(tmp_path / "teacher"), "--student", "tiny", "--steps", "4", "--batch-size", "8",
            "--train-size", "64", "--eval-size", "4", "--warmup-steps", "1", "--out", str(out)]  # fmt: skip
    metrics = main(argv)
    assert metrics["train"]["steps"] == 4 and "teacher" in metrics["eval"]
    student = json.loads((out / "student" / "config.json").read_text())
    assert student["vocab_size"] == len(tokenizer)  # the student's head is the tokenizer's, not the padded width


def test_a_student_wider_than_the_teacher_is_refused(setup):
    """Both heads cover the tokenizer but the student's is wider: its extra rows would have no teacher column (and
    without a tokenizer in its folder, another vocabulary cannot be told from padding), so it is refused."""
    tokenizer, _ = setup
    teacher = build_model("tiny", tokenizer, seed=1)  # one row per token
    with pytest.raises(VocabularyMismatchError, match=r"teacher has \d+ output rows and the student \d+.*methods/dskd"):
        check_same_vocabulary(teacher, _padded_teacher(tokenizer), "kd", tokenizer)

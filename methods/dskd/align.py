"""MinED, the minimum-edit-distance baseline (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024),
as DSKD's official code re-implements it (code/criterions/min_edit_dis_kld.py, `transform_step_logits_fast`):
the teacher's next-token logits are moved onto the student's positions and vocabulary, then forward KL.

For each example, over the positions that predict a target token (the input token x_t at each of them):
    (M1) align the teacher's input tokens with the student's by dynamic time warping, cost = edit distance of the
         token texts (word-start markers removed)                                  core.crosstok.dtw_align
    (M2) a student position matched to exactly ONE teacher position j, whose input token maps to the student's
         input token under the vocabulary map (teacher token -> student token of minimum edit distance), takes
         the teacher logits of j; each student id s gets the logit of the first teacher id mapped to s, ids no
         teacher token maps to get -1e5                                          core.crosstok.vocabulary_map
    (M3) every other position takes a one-hot target on the ground truth: logit 100 there, -1e5 elsewhere
    (M4) L = (1 - kd_rate) L_ce + kd_rate sum_t KL(softmax(z~_t / tau) || softmax(z^s_t / tau))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from core.crosstok import dtw_align, edit_distance, invert_vocabulary_map, token_strings, vocabulary_map
from core.losses import IGNORE_INDEX

ONE_HOT_LOGIT, ABSENT_LOGIT = 100.0, -100000.0  # the official code's values


@dataclass
class VocabularyAlignment:
    """Everything MinED precomputes once for a tokenizer pair."""

    teacher_to_student: torch.Tensor  # (V_t,) student id of each teacher id, -1 if unmapped
    student_ids: torch.Tensor  # (M,) student ids some teacher token maps to
    teacher_ids: torch.Tensor  # (M,) the first teacher id mapped to each of them
    student_strings: list[str]  # token text of every student id (word-start marker removed)
    teacher_strings: list[str]

    @classmethod
    def build(
        cls,
        teacher: PreTrainedTokenizerBase,
        student: PreTrainedTokenizerBase,
        teacher_ids: Sequence[int] | None = None,
    ) -> VocabularyAlignment:
        mapping = vocabulary_map(teacher, student, teacher_ids)
        student_ids, first_teacher_ids = invert_vocabulary_map(mapping)
        return cls(
            mapping,
            student_ids,
            first_teacher_ids,
            token_strings(student, range(_id_space(student))),
            token_strings(teacher, range(_id_space(teacher))),
        )


def _id_space(tokenizer: PreTrainedTokenizerBase) -> int:
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def align_positions(student_tokens: Sequence[str], teacher_tokens: Sequence[str]) -> list[int | None]:
    """(M1): for each student token, the one teacher token it is matched with, or None if it is matched with
    several (DTW over edit distance; the teacher sequence is the first series, as in the official code)."""
    _, student_to_teacher = dtw_align(teacher_tokens, student_tokens, edit_distance)
    return [matches[0] if len(matches) == 1 else None for matches in student_to_teacher]


def mined_target_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    teacher_labels: torch.Tensor,
    vocab: VocabularyAlignment,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M1)-(M3): the teacher's logits moved onto the student's positions and vocabulary.

    Student (B, T_s, V_s) logits, (B, T_s) input ids and labels; teacher (B, T_t, V_t), (B, T_t), (B, T_t); all
    shifted (position t predicts labels[t]). Returns (target logits (B, T_s, V_s), detached, equal to the student's
    own logits at positions without a target; aligned (B, T_s) bool: positions that took teacher logits)."""
    target = student_logits.detach().float().clone()
    aligned_out = torch.zeros_like(student_labels, dtype=torch.bool)
    vocab_size = student_logits.shape[-1]
    t2s = vocab.teacher_to_student.to(student_logits.device)
    s_ids, t_ids = vocab.student_ids.to(student_logits.device), vocab.teacher_ids.to(student_logits.device)
    keep = s_ids < vocab_size
    s_ids, t_ids = s_ids[keep], t_ids[keep]
    for row in range(student_logits.shape[0]):
        s_pos = (student_labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        t_pos = (teacher_labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        if len(s_pos) == 0:
            continue
        s_inputs, t_inputs = student_input_ids[row, s_pos], teacher_input_ids[row, t_pos]
        matches = align_positions(
            [vocab.student_strings[i] for i in s_inputs.tolist()], [vocab.teacher_strings[i] for i in t_inputs.tolist()]
        )
        one_to_one = torch.tensor([m is not None for m in matches], device=s_pos.device)
        matched = torch.tensor([m or 0 for m in matches], device=s_pos.device, dtype=torch.long)
        if len(t_pos) == 0:
            one_to_one[:] = False
            matched[:] = 0
            moved = torch.full((len(s_pos), vocab_size), ABSENT_LOGIT, device=target.device)
        else:
            # (M2): the matched teacher input token must map to the student's input token
            one_to_one &= s_inputs == t2s[t_inputs[matched]]
            teacher_rows = teacher_logits[row, t_pos[matched]].float()  # (n, V_t)
            moved = torch.full((len(s_pos), vocab_size), ABSENT_LOGIT, device=target.device)
            moved[:, s_ids] = teacher_rows[:, t_ids]
            one_to_one &= moved.max(-1).values != ABSENT_LOGIT
        labels = student_labels[row, s_pos]
        one_hot = torch.where(F.one_hot(labels, vocab_size).bool(), ONE_HOT_LOGIT, ABSENT_LOGIT)  # (M3)
        target[row, s_pos] = torch.where(one_to_one[:, None], moved, one_hot)
        aligned_out[row, s_pos] = one_to_one
    return target, aligned_out

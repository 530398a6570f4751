"""Teacher and student with different tokenizers: what cross-tokenizer distillation needs from core.

- `CrossTokenizerConfig` and `get_tokenizer_pair`: the teacher's tokenizer (a folder, the teacher folder's, or
  the task BPE of --vocab-size, exactly as same-tokenizer methods get theirs, so the cached teacher is shared)
  and the student's (a folder, the student folder's, or a task BPE of --student-vocab-size; 259 is byte-level
  only: 256 byte symbols and 3 specials, no merges).
- `encode_pairs` and `PairCollator`: every example tokenized twice, batches that carry both tokenizations
  (`input_ids`, `attention_mask`, `labels` for the student; the same keys prefixed `teacher_` for the teacher).
  The loop counts and normalizes by the student's target tokens.
- Token alignment: `edit_distance` (Levenshtein), `dtw_align` (dynamic time warping of two token sequences),
  `vocabulary_map` (each teacher token to the student token of minimum edit distance), `invert_vocabulary_map`.
  These are the pieces of MinED (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024).
- `common_vocabulary`: one tokenizer, heads padded to different sizes (Qwen1.5: 151,936 vs 152,064 rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.config import ModelConfig
from core.data import Collator, DataConfig, Example, TaskData, encode_example
from core.errors import ConfigError, VocabularyMismatchError
from core.io import atomic_dir
from core.models import is_model_dir
from core.pretrained import parse_prune
from core.teacher import bpe_key, get_tokenizer
from core.tokenizers import TOKENIZER_FILES, load_tokenizer, same_vocabulary, train_bpe

BYTE_LEVEL_VOCAB = 259  # 256 byte symbols + <pad>, <s>, </s>: a BPE with no merges, one token per byte


@dataclass
class CrossTokenizerConfig:
    """The two tokenizers of a cross-tokenizer method."""

    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "teacher tokenizer folder (e.g. ../shared/data/tokenizers/Qwen1.5-1.8B); default: --tokenizer, "
            "the --teacher folder's, or a BPE of --vocab-size trained on the task"
        },
    )
    student_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "student tokenizer folder (e.g. ../shared/data/tokenizers/gpt2); default: the teacher's for "
            "--student prune:K, the --student folder's, or a BPE of --student-vocab-size trained on the task"
        },
    )
    student_vocab_size: int = field(
        default=BYTE_LEVEL_VOCAB,
        metadata={"help": "vocabulary of the student's task BPE (259: byte-level only, no merges)"},
    )

    def __post_init__(self) -> None:
        if self.student_vocab_size < BYTE_LEVEL_VOCAB:
            raise ConfigError(
                f"--student-vocab-size must be at least {BYTE_LEVEL_VOCAB} (256 byte symbols + 3 specials), "
                f"got {self.student_vocab_size}"
            )


@dataclass
class TokenizerPair:
    teacher: PreTrainedTokenizerBase
    teacher_key: str
    student: PreTrainedTokenizerBase
    student_key: str


def task_bpe(data: DataConfig, task: TaskData, vocab_size: int, cache: Path) -> tuple[PreTrainedTokenizerBase, str]:
    """A BPE trained on the task's training text, cached (same key as core.teacher.get_tokenizer's BPE)."""
    key = bpe_key(task, vocab_size)
    folder = cache / "tokenizers" / key
    if not (folder / "tokenizer.json").exists():
        tokenizer = train_bpe([ex.prompt + ex.target for ex in task.train], vocab_size)
        with atomic_dir(folder) as tmp:
            tokenizer.save_pretrained(tmp)
    return load_tokenizer(folder), key


def get_tokenizer_pair(
    model: ModelConfig, cross: CrossTokenizerConfig, data: DataConfig, task: TaskData, cache: Path
) -> TokenizerPair:
    if cross.teacher_tokenizer:
        teacher, teacher_key = load_tokenizer(cross.teacher_tokenizer), _path_key(cross.teacher_tokenizer)
    else:
        teacher, teacher_key = get_tokenizer(model, data, task, cache)
    if cross.student_tokenizer:
        student, student_key = load_tokenizer(cross.student_tokenizer), _path_key(cross.student_tokenizer)
    elif parse_prune(model.student) is not None:  # a cut of the teacher's own layers reads the teacher's vocabulary
        student, student_key = teacher, teacher_key
    elif is_model_dir(model.student) and any((Path(model.student) / n).exists() for n in TOKENIZER_FILES):
        student, student_key = load_tokenizer(model.student), _path_key(model.student)
    else:
        student, student_key = task_bpe(data, task, cross.student_vocab_size, cache)
    return TokenizerPair(teacher, teacher_key, student, student_key)


def _path_key(path: str) -> str:
    return f"path:{Path(path).resolve()}"


# ----------------------------------------------------------------------------------------------------------------
# One example, two tokenizations
# ----------------------------------------------------------------------------------------------------------------


def encode_pairs(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    """Each example encoded by both tokenizers (core.data.encode_example: prompt masked, EOS appended)."""
    out = []
    for ex in examples:
        s = encode_example(student, ex.prompt, ex.target, max_length)
        t = encode_example(teacher, ex.prompt, ex.target, max_length)
        out.append({**s, "teacher_input_ids": t["input_ids"], "teacher_labels": t["labels"]})
    return out


@dataclass
class PairCollator:
    """Right-pads both tokenizations, each with its own pad id: the student's keys, and `teacher_*`."""

    pad_token_id: int
    teacher_pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = Collator(self.pad_token_id)([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        teacher = Collator(self.teacher_pad_token_id)(
            [{"input_ids": f["teacher_input_ids"], "labels": f["teacher_labels"]} for f in features]
        )
        return batch | {f"teacher_{k}": v for k, v in teacher.items()}


# ----------------------------------------------------------------------------------------------------------------
# Token alignment (MinED): edit distance, dynamic time warping, vocabulary mapping
# ----------------------------------------------------------------------------------------------------------------

SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2, Qwen) and SentencePiece (Llama, Mistral) word-start markers


def space_marker(tokenizer: PreTrainedTokenizerBase) -> str:
    """The word-start marker this tokenizer's token strings use ('Ġ' or '▁'); '' when neither is in use."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" a b", add_special_tokens=False)["input_ids"])
    for marker in SPACE_MARKERS:
        if any(marker in piece for piece in pieces):
            return marker
    return ""


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], marker: str | None = None) -> list[str]:
    """Token strings with the word-start marker removed, so two tokenizer families compare by their text."""
    marker = space_marker(tokenizer) if marker is None else marker
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [p.replace(marker, "") if marker else p for p in pieces]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def dtw_align(
    series_1: Sequence[str], series_2: Sequence[str], cost: Callable[[str, str], float] = edit_distance
) -> tuple[list[list[int]], list[list[int]]]:
    """Dynamic time warping of two token sequences; returns, for each element of each series, the indices of the
    other series it is matched with.

    D[i, j] = cost(s1_i, s2_j) + min(D[i-1, j-1], D[i-1, j], D[i, j-1]),  D[-1, -1] = 0, other borders infinite.
    The path is traced back from the last cell; ties prefer the diagonal, then a step in series_1, then in
    series_2 (the order of DSKD's official min_edit_dis_kld.py, `dtw`, after simpledtw)."""
    n, m = len(series_1), len(series_2)
    if n == 0 or m == 0:
        return [[] for _ in range(n)], [[] for _ in range(m)]
    table = [[math.inf] * (m + 1) for _ in range(n + 1)]
    table[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            step = cost(series_1[i - 1], series_2[j - 1])
            table[i][j] = step + min(table[i - 1][j - 1], table[i - 1][j], table[i][j - 1])
    matches_1: list[list[int]] = [[] for _ in range(n)]
    matches_2: list[list[int]] = [[] for _ in range(m)]
    i, j = n, m  # 1-based cell of the last pair
    while True:
        matches_1[i - 1].append(j - 1)
        matches_2[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        options = (table[i - 1][j - 1], table[i - 1][j], table[i][j - 1])  # diagonal, up, left
        move = min(range(3), key=lambda k: options[k])  # first minimum wins ties
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    for matches in (*matches_1, *matches_2):
        matches.reverse()
    return matches_1, matches_2


def nearest_token(text: str, by_length: dict[int, list[tuple[int, str]]]) -> int:
    """Id of the token nearest to `text` in edit distance (lowest id on ties). `by_length`: length -> [(id, str)].

    Lengths are searched outward from len(text): |len(a) - len(b)| is a lower bound on the distance, so the
    search stops once it reaches the best distance found."""
    best, best_id = math.inf, -1
    lengths = sorted(by_length, key=lambda length: (abs(length - len(text)), length))
    for length in lengths:
        if abs(length - len(text)) > best:
            break
        for token_id, candidate in by_length[length]:
            d = edit_distance(text, candidate)
            if d < best or (d == best and token_id < best_id):
                best, best_id = d, token_id
    return best_id


def vocabulary_map(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, teacher_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """teacher id -> student id (V_t,): the student token with the same text (word-start markers unified), else
    the one of minimum edit distance (FuseLLM's vocab_mapping.py, as used by DSKD's MinED baseline).

    Special tokens map by role (BOS, EOS, PAD). With `teacher_ids`, the edit-distance search runs only for those
    ids and other unmatched teacher tokens map to -1: for two 10^5-token vocabularies the full search takes hours
    in Python, and a token that never occurs in the data is never aligned."""
    t_marker, s_marker = space_marker(teacher), space_marker(student)
    t_size = max(len(teacher), max(teacher.get_vocab().values()) + 1)
    mapping = torch.full((t_size,), -1, dtype=torch.long)
    student_text: dict[str, int] = {}
    by_length: dict[int, list[tuple[int, str]]] = {}
    for piece, sid in sorted(student.get_vocab().items(), key=lambda kv: kv[1]):
        text = piece.replace(s_marker, "▁") if s_marker else piece
        student_text.setdefault(text, sid)
        by_length.setdefault(len(text), []).append((sid, text))
    wanted = set(range(t_size)) if teacher_ids is None else set(int(i) for i in teacher_ids)
    for piece, tid in teacher.get_vocab().items():
        text = piece.replace(t_marker, "▁") if t_marker else piece
        if text in student_text:
            mapping[tid] = student_text[text]
        elif tid in wanted:
            mapping[tid] = nearest_token(text, by_length)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t_id, s_id = getattr(teacher, role), getattr(student, role)
        if t_id is not None and s_id is not None:
            mapping[t_id] = s_id
    return mapping


def invert_vocabulary_map(mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_ids, teacher_ids): each student id that some teacher token maps to, with the FIRST such teacher id
    (lowest id), as DSKD's distiller.py keeps one teacher id per student id (max_align_num = 1)."""
    first: dict[int, int] = {}
    for tid, sid in enumerate(mapping.tolist()):
        if sid >= 0 and sid not in first:
            first[sid] = tid
    student_ids = sorted(first)
    return torch.tensor(student_ids, dtype=torch.long), torch.tensor([first[s] for s in student_ids], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# One tokenizer, heads of different sizes
# ----------------------------------------------------------------------------------------------------------------


def common_vocabulary(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    method: str,
) -> int:
    """The number of leading logit columns teacher and student share: the real vocabulary of their common
    tokenizer. Heads padded to different sizes (Qwen1.5 1.8B: 151,936 rows; 72B: 152,064) are compared on it;
    different tokenizers raise VocabularyMismatchError."""
    if not same_vocabulary(teacher_tokenizer, student_tokenizer):
        raise VocabularyMismatchError(
            f"{method} compares teacher and student token by token, but their tokenizers differ "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens). Use --variant dskd-cma (cross-model "
            "attention), uld or mined, which align different vocabularies."
        )
    rows = min(teacher.config.vocab_size, student.config.vocab_size)
    if rows < len(student_tokenizer):
        raise VocabularyMismatchError(
            f"{method}: a head has {rows} rows but the tokenizer has {len(student_tokenizer)} tokens"
        )
    return len(student_tokenizer)

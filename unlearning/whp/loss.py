"""The mathematics of WHP, the causal-intervention teacher and the unlearning baselines, as pure functions.

Notation: a document is a token sequence x; the logits at position i predict token x[i+1]. A "copy" is the
document with the target's name replaced by another name (an anchor term swapped for a generic one in WHP; one
of N fictitious names in the causal paper). `align_positions` maps each position of the original to the
position of a copy that predicts the same next token from a prefix that differs only by the name.

WHP (Eldan & Russinovich 2023), Section 3.1, Eq. (1) with the ReLU of Section 3.1:
    v_generic = v_baseline - alpha * ReLU(v_reinforced - v_baseline)                       `whp_generic_logits`
    generic label = argmax v_generic (after the name mapping below); fine-tune on it by cross-entropy

Causal intervention (Liu et al., EMNLP 2024), Section 3 (the teacher) and the official teacher.py:
    p_teacher(. | x_<i) = (1/N) sum_n p_model(. | x^(n)_<j_n(i))       over positions aligned in every copy
                                                                                            `counterfactual_average`
    L_forget = mean_docs (1/|P|) sum_{i in P} KL(p_teacher,i || p_student,i)              `kl_to_teacher_sums`

Baselines (the official dataloader.py, CustomTrainerForgetting.compute_loss):
    gradient ascent    L = -(1/|T|) sum_t -log p(y_t)  on forget answers                  `ce_sums`
    gradient difference L = L_GA(forget) + lambda * CE(retain)
    NPO (Zhang et al. 2024, Eq. 3): L = -(2/beta) mean_docs log sigmoid(-beta (log p(y|x) - log p_ref(y|x)))
                                                                                           `npo_sums`
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.data import IGNORE_INDEX

# The official code floors moved probabilities at 1e-8 instead of 0 (move_probability_to_original_name).
MOVE_FLOOR = 1e-8
# A copy "predicts the replacement name" at a position when a first token of that name has more than this
# probability (official teacher.py: move_threshold = 0.1).
MOVE_THRESHOLD = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Name replacement (anchored terms)
# ----------------------------------------------------------------------------------------------------------------


def name_for_mention(name: str, mention: str, replacement: str) -> str:
    """Which part of `replacement` stands in for `mention`, a mention of `name`: the full name for the full name,
    the first name for the first name, the last name for any other part (the official get_name_to_replace)."""
    if mention == name or len(name.split()) == 1 or len(replacement.split()) == 1:
        return replacement
    if mention == name.split()[0]:
        return replacement.split()[0]
    return replacement.split()[-1]


def name_mentions(name: str) -> list[str]:
    """The strings that mention a person: the full name, then its parts of two or more letters, longest first
    (so "Mara Lund" is replaced whole, and a later "Mara" alone still is)."""
    parts = [p for p in name.split() if len(p) >= 2] if len(name.split()) > 1 else []
    return [name, *sorted(set(parts) - {name}, key=len, reverse=True)]


def mention_spans(text: str, name: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, mention) character spans of the mentions of `name` in `text`, in order."""
    taken: list[tuple[int, int, str]] = []
    for mention in name_mentions(name):
        for m in re.finditer(r"\b" + re.escape(mention) + r"\b", text):
            if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
                taken.append((m.start(), m.end(), mention))
    return sorted(taken)


def replace_name(text: str, name: str, replacement: str) -> str:
    """`text` with every mention of `name` replaced by the matching part of `replacement`."""
    out, last = [], 0
    for start, end, mention in mention_spans(text, name):
        out += [text[last:start], name_for_mention(name, mention, replacement)]
        last = end
    return "".join(out) + text[last:]


# ----------------------------------------------------------------------------------------------------------------
# Documents as token ids, with where the names are
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedDoc:
    """A document as the model reads it: ids = BOS + prompt + target + EOS (as core.data.encode_example).

    name_token[i]: token i overlaps a mention of the name. mention_starts: (first token index of each mention,
    whether an earlier mention precedes it in the document). labels: the training labels (prompt masked)."""

    ids: list[int]
    labels: list[int]
    name_token: list[bool]
    mention_starts: list[tuple[int, bool]]
    n_prefix: int = 0  # tokens of an added counterfactual prompt (never aligned)
    question: bool = False  # a question/answer document (TOFU's format); False: a passage (WPU's)

    @property
    def answer_start(self) -> int:
        """Index of the first trained token (the answer's first token; after BOS for a passage)."""
        return next((k for k, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.ids))


def _encode_piece(tokenizer, text: str, spans: list[tuple[int, int, str]]) -> tuple[list[int], list[bool], list[int]]:
    """ids of `text`, whether each token overlaps a span, and the token index where each span starts."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # The space before a name belongs to it: a byte-level BPE writes " Mara" as one token, or an unknown name as
    # " " + "Z" + ...; either way the token holding that space is where the name starts.
    spans = [(s - 1 if s > 0 and text[s - 1] == " " else s, e, m) for s, e, m in spans]
    in_name = [any(a < e and b > s for s, e, _ in spans) for a, b in offsets]
    starts = []
    for s, e, _ in spans:
        first = next((k for k, (a, b) in enumerate(offsets) if a < e and b > s), None)
        if first is not None:
            starts.append(first)
    return ids, in_name, starts


def encode_document(tokenizer, prompt: str, target: str, name: str, prefix: str = "") -> EncodedDoc:
    """Tokenize a document (prompt and target separately, as in training) and locate the mentions of `name`.

    `prefix`: text placed before the prompt (the counterfactual prompt option); its tokens are counted in
    n_prefix so that alignment skips them."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, labels, in_name, starts = list(bos), [IGNORE_INDEX] * len(bos), [False] * len(bos), []
    n_prefix = len(bos)
    for k, piece in enumerate((prefix, prompt, target)):
        if not piece:
            continue
        spans = mention_spans(piece, name) if k > 0 else []
        piece_ids, piece_in_name, piece_starts = _encode_piece(tokenizer, piece, spans)
        starts += [len(ids) + s for s in piece_starts]
        ids += piece_ids
        in_name += piece_in_name
        labels += piece_ids if k == 2 else [IGNORE_INDEX] * len(piece_ids)
        if k == 0:
            n_prefix = len(ids)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    in_name.append(False)
    mention_starts = [(s, k > 0) for k, s in enumerate(starts)]  # k > 0: an earlier mention exists
    return EncodedDoc(ids, labels, in_name, mention_starts, n_prefix if prefix else 0, question=bool(prompt))


# ----------------------------------------------------------------------------------------------------------------
# Token alignment
# ----------------------------------------------------------------------------------------------------------------


def align_positions(
    original: EncodedDoc, copy: EncodedDoc, skip_name_positions: bool = True, autojunk: bool = True
) -> dict[int, int]:
    """{original position: copy position} for the positions whose predictions correspond.

    The two id sequences are matched with difflib (matching blocks of at least two tokens, as the official
    teacher.py, with difflib's default autojunk: on a sequence of 200 tokens or more, tokens making up over 1 % of
    it are junk and cannot start a match; `autojunk=False` turns that off). Inside a block of length s starting at
    (a, b), position a+k reads the same token as b+k after a prefix that differs only by the name. A block that
    starts right after a name is extended back by one (official: `a_start = block.a - 1`): the name's last token
    predicts the same continuation in both. The last position of a block predicts the first token of what follows
    it, often the first token of a name: it is kept (that is where knowing the name shows), and the name handling
    of `move_to_original_name` decides what the teacher says there. Positions whose input token is part of a name
    are skipped with `skip_name_positions` (official change_name_back=True: `forget_target_indices`; without it
    the name's last token stays). As the official code: only positions from the one predicting the answer's first
    token are aligned (`num_added_tok - 1`; a passage: all), position 0 never (the official loss masks index 0 as
    padding), nor positions inside an added counterfactual prompt."""
    matcher = difflib.SequenceMatcher(None, original.ids, copy.ids, autojunk=autojunk)
    first = max(copy.answer_start - 1, copy.n_prefix, 1)  # the copy side, as the official num_added_tok
    pairs: dict[int, int] = {}
    for a, b, size in matcher.get_matching_blocks():
        if size < 2:
            continue
        start = 0
        if a > 0 and b > 0 and original.name_token[a - 1] and not original.name_token[a] and copy.name_token[b - 1]:
            start = -1  # the name's last token predicts what follows the name
        for k in range(start, size):
            i, j = a + k, b + k
            if j < first or i < max(original.n_prefix, 1) or i >= len(original.ids) - 1:
                continue  # before the answer, position 0, the prompt option, or the EOS (predicts nothing)
            if skip_name_positions and original.name_token[i]:
                continue
            pairs[i] = j
    return pairs


def first_token_sets(tokenizer, name: str) -> tuple[set[int], set[int]]:
    """The ids a name's words can start with, (with a leading space, without): each word's first token (official
    replace_person_first_token_ids: 'w_prefix' and 'wo_prefix', counted apart by the majority rule)."""
    spaced, bare = set(), set()
    for word in name.split():
        for text, ids in ((" " + word, spaced), (word, bare)):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            # A bare space piece (a byte-level BPE may split " Yu" into " ", "Y", "u") is no part of the name.
            if tokens and tokenizer.decode(tokens[:1]).strip():
                ids.add(tokens[0])
    return spaced, bare


def first_token_ids(tokenizer, name: str) -> set[int]:
    """Both sets of `first_token_sets` together (official 'all': what `move_to_original_name` moves)."""
    spaced, bare = first_token_sets(tokenizer, name)
    return spaced | bare


def name_first_tokens(tokenizer, name: str) -> tuple[int, int]:
    """The target's own first token (with a leading space, without), where the majority rule moves the mass
    (official original_w_prefix / original_wo_prefix: the first token of the title)."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in (" " + name, name))


def move_to_original_name(probs: torch.Tensor, original_id: int, replacement_ids: set[int]) -> torch.Tensor:
    """(V,) -> (V,): the probability of the replacement name's first tokens moved onto the original name's token.

    Where the original text mentions the target again, a model that never knew the target still continues with
    the name it just read; the copy's teacher predicts the copy's name there, so its mass is given back to the
    original name (official move_probability_to_original_name; each moved entry keeps 1e-8)."""
    out = probs.clone()
    for token in replacement_ids:
        if token == original_id or out[token] <= MOVE_FLOOR:
            continue
        out[original_id] += out[token] - MOVE_FLOOR
        out[token] = MOVE_FLOOR
    return out


# ----------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------


def whp_generic_logits(baseline: torch.Tensor, reinforced: torch.Tensor, alpha: float) -> torch.Tensor:
    """(..., V) x (..., V) -> (..., V): WHP's generic logits, v_b - alpha ReLU(v_r - v_b)."""
    return baseline - alpha * torch.relu(reinforced - baseline)  # WHP Eq. (1), with the ReLU


@dataclass
class CopyPrediction:
    """One copy's next-token probabilities at the original positions it aligns."""

    positions: dict[int, int]  # original position -> row of `probs`
    probs: torch.Tensor  # (n_aligned, V)
    replacement_ids: set[int]  # first-token ids of the name this copy used (both kinds: what moves)
    spaced_ids: set[int] | None = None  # those with a leading space (None: replacement_ids less bare_ids)
    bare_ids: set[int] = field(default_factory=set)  # those without one


def copy_prediction(
    original: EncodedDoc,
    copy: EncodedDoc,
    copy_probs: torch.Tensor,
    replacement_ids: set[int],
    skip_name: bool = True,
    first_sets: tuple[set[int], set[int]] | None = None,
    autojunk: bool = True,
) -> CopyPrediction:
    """Gather a copy's (T_copy, V) probabilities at the copy positions aligned to original positions.
    `first_sets`: the replacement name's first tokens (spaced, bare) for the majority rule (first_token_sets)."""
    pairs = align_positions(original, copy, skip_name, autojunk)
    order = sorted(pairs)
    rows = copy_probs[[pairs[i] for i in order]] if order else copy_probs[:0]
    spaced, bare = first_sets if first_sets is not None else (None, set())
    return CopyPrediction({i: k for k, i in enumerate(order)}, rows, replacement_ids, spaced, bare)


def counterfactual_average(
    original: EncodedDoc,
    copies: list[CopyPrediction],
    change_name_back: bool = True,
    always_move: bool = False,
    target_first: tuple[int, int] | None = None,
    keep_first_mention: bool | None = None,
) -> tuple[list[int], torch.Tensor]:
    """(positions, (P, V) teacher probabilities): the mean of the copies' distributions over the positions that
    every copy aligns (official: the intersection of matched indices, then the mean over the N copies).

    With `change_name_back` (official teacher.py), two rules move each copy's mass on its replacement name's first
    tokens to a token of the target before averaging:
    - anchor: at a position predicting a mention of the target, to the target's token there; the first appearance
      is left alone only for a question/answer document (`keep_first_mention`, default `original.question`: the
      official skips it on TOFU only);
    - majority: where more than half of the copies give a first token of their name with a leading space more than
      0.1, to the target's first token with a space (`target_first[0]`); else, where more than half do so without
      the space, to the one without (`target_first[1]`); the two kinds are counted apart, as the official
      n_w_prefix / n_wo_prefix; only after the target was mentioned, unless `always_move` (the counterfactual
      prompt option, which names it: official). `target_first` None: the first token of the document's first
      mention for both."""
    if not copies:
        raise ValueError("counterfactual_average needs at least one copy")
    common = sorted(set.intersection(*(set(c.positions) for c in copies)))
    stacked = torch.stack([c.probs[[c.positions[i] for i in common]] for c in copies]) if common else None  # (N, P, V)
    if stacked is None:
        return [], copies[0].probs[:0]
    if change_name_back:
        keep_first = original.question if keep_first_mention is None else keep_first_mention
        if target_first is None:
            first_token = _original_first_token(original)
            target_first = (first_token, first_token)
        first_mention = min((s for s, _ in original.mention_starts), default=len(original.ids))
        anchors = {s for s, earlier in original.mention_starts if earlier or not keep_first}
        for p, i in enumerate(common):
            mentioned = first_mention <= i
            target_id = original.ids[i + 1] if i + 1 in anchors else None
            if target_id is None and (mentioned or always_move):
                for kind, gt in enumerate(target_first):  # 0: with a leading space, 1: without
                    votes = sum(_predicts_own_name(c, i, kind) for c in copies)
                    if votes > 0.5 * len(copies):
                        target_id = gt
                        break
            if target_id is None:
                continue
            for n, c in enumerate(copies):
                stacked[n, p] = move_to_original_name(stacked[n, p], target_id, c.replacement_ids)
    return common, stacked.mean(dim=0)  # Eq.: (1/N) sum_n p_n


def _predicts_own_name(copy: CopyPrediction, position: int, kind: int) -> bool:
    """Whether the copy gives a first token of its name of this kind (0: spaced, 1: bare) more than 0.1."""
    if kind == 1:
        ids = copy.bare_ids
    else:
        ids = copy.spaced_ids if copy.spaced_ids is not None else copy.replacement_ids - copy.bare_ids
    return bool(ids) and bool((copy.probs[copy.positions[position], list(ids)] > MOVE_THRESHOLD).any())


def _original_first_token(original: EncodedDoc) -> int | None:
    """The first token of the document's first mention (when the target's own first tokens are not given)."""
    if not original.mention_starts:
        return None
    return original.ids[original.mention_starts[0][0]]


def whp_labels(
    original: EncodedDoc,
    copy: EncodedDoc,
    baseline_copy_logits: torch.Tensor,
    reinforced_logits: torch.Tensor,
    alpha: float,
    replacement_ids: set[int],
    change_name_back: bool = True,
    first_sets: tuple[set[int], set[int]] | None = None,
    target_first: tuple[int, int] | None = None,
    autojunk: bool = True,
) -> tuple[list[int], torch.Tensor]:
    """(positions, (P,) generic labels) of WHP with one anchored-term translation (the copy).

    v_baseline: the baseline model on the translated text (the copy), read at the aligned positions; v_reinforced:
    the reinforced model on the original text. The generic prediction is the argmax of Eq. (1), after the name
    mapping (a later mention of the target keeps the target's name, as in the causal teacher): that is, N = 1 of
    the causal teacher on the distribution softmax(v_generic)."""
    pairs = align_positions(original, copy, True, autojunk)
    order = sorted(pairs)
    base = baseline_copy_logits[[pairs[i] for i in order]]  # (P, V)
    generic = whp_generic_logits(base.float(), reinforced_logits[order].float(), alpha)
    spaced, bare = first_sets if first_sets is not None else (None, set())
    pred = CopyPrediction(
        {i: k for k, i in enumerate(order)}, torch.softmax(generic, -1), replacement_ids, spaced, bare
    )
    positions, probs = counterfactual_average(original, [pred], change_name_back, target_first=target_first)
    return positions, probs.argmax(-1)


# ----------------------------------------------------------------------------------------------------------------
# Losses (sums over the rows of a micro-batch; the loop divides by the number of rows)
# ----------------------------------------------------------------------------------------------------------------


def kl_to_teacher_sums(
    student_logits: torch.Tensor, positions: torch.Tensor, teacher_probs: torch.Tensor
) -> torch.Tensor:
    """(B, T, V) x (B, P) x (B, P, V) -> (B,): per document, the mean over its aligned positions of
    KL(p_teacher || p_student) (official: F.kl_div(log q, p) summed over V, divided by the document's count).
    Padded positions are -1. A one-hot teacher makes this the cross-entropy on the generic labels (WHP)."""
    valid = positions >= 0  # (B, P)
    index = positions.clamp(min=0)
    gathered = torch.gather(student_logits, 1, index.unsqueeze(-1).expand(-1, -1, student_logits.shape[-1]))
    logq = F.log_softmax(gathered.float(), dim=-1)  # (B, P, V)
    p = teacher_probs.float()
    kl = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - logq), torch.zeros_like(p)).sum(-1)  # (B, P)
    kl = kl * valid
    return kl.sum(-1) / valid.sum(-1).clamp(min=1)  # Eq.: (1/|P|) sum_i KL(p_i || q_i)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) x (B, T) unshifted -> (summed NLL per row (B,), target tokens per row (B,))."""
    shifted_logits, shifted = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted.clamp(min=0), reduction="none")  # (B, T-1)
    mask = shifted != IGNORE_INDEX
    return (nll * mask).sum(-1), mask.sum(-1)


def ce_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of a micro-batch (what HF's `outputs.loss` is in the official code)."""
    nll, count = sequence_nll(logits, labels)
    return nll.sum() / count.sum().clamp(min=1)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) x (B,) summed NLLs of the model and the frozen reference -> (B,) per-document NPO loss,
    -(2/beta) log sigmoid(-beta log(p/p_ref)) = -(2/beta) log sigmoid(beta (nll - ref_nll)). NPO Eq. (3)."""
    return -F.logsigmoid(beta * (nll - ref_nll)) * 2.0 / beta

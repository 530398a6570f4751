"""Tasks: the embedded default (generated in-process, no files) and loaders for real data, plus tokenization
with prompt-masked labels and the padding collator.

A task is a `TaskData`: train and eval lists of `Example(prompt, target, references)`. `target` is what a
model is trained on; `references` are all the answers that count as correct at evaluation.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from core.errors import ConfigError, DataError
from core.io import stable_hash
from core.losses import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    references: tuple[str, ...]
    group: str = ""  # a sub-task or evaluation-set name (ops' operation, dolly's set), for per-group scores
    user: str = ""  # instruction tasks: the request as a chat user turn (core.data.chat_prompts formats it)


@dataclass
class TaskData:
    name: str
    train: list[Example]
    eval: list[Example]
    metrics: tuple[str, ...]  # metric names computed by core.metrics.score
    max_new_tokens: int
    source: str  # where the data came from (a path, or "generated")
    # per split: rows read, rows dropped for an empty prompt / an empty completion, rows kept (before --train-size
    # and --eval-size); the LLM recipe adds "prompts_cut_to_bos" to "train" (encode_examples) and writes it all to
    # metrics.json
    report: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which task to run and how much of it."""

    task: str = field(
        default="ops",
        metadata={
            "help": "task name: ops (embedded default), multi30k, commongen, instruct, dolly (the instruction papers' protocol), hf"
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "folder or file of the real data (multi30k, commongen, instruct)"}
    )
    dataset: str | None = field(default=None, metadata={"help": "task hf: a `datasets` name or local path"})
    prompt_field: str = field(
        default="prompt",
        metadata={
            "help": "task hf and instruct: the field holding the prompt (instruct: used when a row has both this and --response-field, before the dolly/alpaca/self-instruct layouts)"
        },
    )
    response_field: str = field(
        default="response", metadata={"help": "task hf and instruct: the field holding the answer"}
    )
    train_split: str = field(default="train", metadata={"help": "task hf: the training split"})
    eval_split: str = field(default="validation", metadata={"help": "task hf: the evaluation split"})
    source_lang: str = field(default="en", metadata={"help": "multi30k: translate from this side (en or de)"})
    target_lang: str = field(default="de", metadata={"help": "multi30k: translate into this side (en or de)"})
    train_size: int | None = field(default=None, metadata={"help": "use at most this many training examples"})
    eval_size: int = field(default=200, metadata={"help": "evaluate on at most this many held-out examples"})
    max_length: int = field(default=128, metadata={"help": "truncate prompt + completion to this many tokens"})
    data_seed: int = field(
        default=1234,
        metadata={"help": "seed of the generated task and of a held-out split (fixed across student seeds)"},
    )
    eval_sets: str = field(
        default="dolly",
        metadata={
            "help": "task dolly: the evaluation sets under --data-dir, comma-separated, each NAME or NAME:N (its first "
            "N rows), e.g. dolly,self-inst,vicuna,sinst:200,dialog:200; --eval-size caps each set"
        },
    )
    prompt_format: str = field(
        default="auto",
        metadata={
            "help": "instruction prompts: chat (the teacher tokenizer's chat template), alpaca (the MiniLLM / "
            "DistiLLM / DSKD template), auto (chat when the teacher's tokenizer has a template, else alpaca)"
        },
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)} (--task)")
        if self.eval_size < 1:
            raise ConfigError(f"--eval-size must be at least 1, got {self.eval_size}")
        if self.train_size is not None and self.train_size < 1:
            raise ConfigError(f"--train-size must be at least 1, got {self.train_size}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.prompt_format not in ("auto", "chat", "alpaca"):
            raise ConfigError(f"--prompt-format must be auto, chat or alpaca, got {self.prompt_format!r}")
        eval_set_sizes(self.eval_sets)  # checks the syntax now, before any work


# ----------------------------------------------------------------------------------------------------------------
# The embedded default task: "ops", four small symbol-manipulation operations.
#
# reverse: c a f b =  ->  b f c a          one answer, needs attention over the whole list
# sort: 7 2 9 4 =     ->  2 4 7 9          one answer, needs comparison
# add: 4 7 + 3 8 =    ->  8 5              one answer, needs carries: where small models fail first
# pair: c a f b =     ->  a f              MANY answers: any two items kept in list order (C(n, 2) of them).
#
# `pair` makes the teacher's distribution multi-modal, so mode-covering (forward KL) and mode-seeking (reverse
# KL) students differ: averaging over modes can put mass on pairs out of order, which score zero.
# ----------------------------------------------------------------------------------------------------------------

LETTERS = "abcdefghijkl"
OPS = ("reverse", "sort", "add", "pair")


def _ops_example(rng: random.Random) -> Example:
    op = rng.choice(OPS)
    if op == "reverse":
        items = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        answers = [" ".join(reversed(items))]
        args = " ".join(items)
    elif op == "sort":
        items = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        answers = [" ".join(sorted(items))]
        args = " ".join(items)
    elif op == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        answers = [" ".join(str(a + b))]
        args = f"{' '.join(str(a))} + {' '.join(str(b))}"
    else:  # pair
        items = rng.sample(LETTERS, rng.randint(4, 6))
        answers = [f"{x} {y}" for x, y in itertools.combinations(items, 2)]
        args = " ".join(items)
    return Example(f"{op}: {args} =", " " + rng.choice(answers), tuple(" " + a for a in answers), group=op)


# One prompt in OPS_EVAL_SHARE (chosen by a seeded hash of the prompt) is reserved for evaluation. Train and eval are
# drawn from two streams of their own, train from unreserved prompts and eval from reserved ones: disjoint, and
# each independent of the other's size, so changing --eval-size leaves the training data (and every cached model
# trained on it) as they were.
OPS_EVAL_SHARE = 10


def _reserved_for_eval(prompt: str, data_seed: int) -> bool:
    digest = hashlib.blake2b(f"{data_seed}:{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % OPS_EVAL_SHARE == 0


def load_ops(cfg: DataConfig) -> TaskData:
    """Generate the embedded task. Deterministic in `data_seed`; eval prompts never appear in training; the
    training examples do not depend on --eval-size, nor the eval examples on --train-size."""
    train_rng, eval_rng = random.Random(f"ops-train-{cfg.data_seed}"), random.Random(f"ops-eval-{cfg.data_seed}")
    n_train = cfg.train_size or 20_000
    train: list[Example] = []
    while len(train) < n_train:
        ex = _ops_example(train_rng)
        if not _reserved_for_eval(ex.prompt, cfg.data_seed):
            train.append(ex)
    eval_examples: list[Example] = []
    seen: set[str] = set()  # eval prompts are distinct (train prompts may repeat, as a larger corpus would)
    while len(eval_examples) < cfg.eval_size:
        ex = _ops_example(eval_rng)
        if ex.prompt not in seen and _reserved_for_eval(ex.prompt, cfg.data_seed):
            seen.add(ex.prompt)
            eval_examples.append(ex)
    return TaskData("ops", train, eval_examples, ("exact_match", "rougeL"), max_new_tokens=12, source="generated")


# ----------------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------------


def _require_dir(cfg: DataConfig, hint: str) -> Path:
    if cfg.data_dir is None:
        raise ConfigError(f"task {cfg.task} needs --data-dir ({hint})")
    path = Path(cfg.data_dir)
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist ({hint})")
    return path


GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip file, whatever its name


def data_file(path: Path) -> Path:
    """`path`, or `path.gz` when only the compressed copy is there (Multi30k ships train.en.gz)."""
    packed = path.with_name(path.name + ".gz")
    return packed if not path.exists() and packed.is_file() else path


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, read decompressed when it is gzip (told by its first
    bytes, not its name). A byte that is not UTF-8 raises DataError naming the file, the line and the fix."""
    path = data_file(path)
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    with path.open("rb") as probe:
        packed = probe.read(2) == GZIP_MAGIC
    if packed and path.suffix != ".gz":
        print(f"[data] {path} is gzip-compressed: reading it decompressed", file=sys.stderr)
    try:
        with gzip.open(path) if packed else path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:  # utf-8-sig on the first line drops a byte-order mark (Windows editors write one)
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path} line {lineno}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8; "
                        f"the file is in another encoding (Latin-1?): convert it, e.g. iconv -f latin1 -t utf-8 "
                        f"{path} > {path.stem}.utf8{path.suffix}"
                    ) from exc
    except (OSError, EOFError) as exc:  # a damaged or cut-off gzip file (BadGzipFile is an OSError)
        raise DataError(f"{path}: cannot be read{' as gzip' if packed else ''} ({exc}); replace the file") from exc


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (or its .gz), without line ends."""
    return [line.rstrip("\r\n") for _, line in _text_lines(path)]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a jsonl file (or its .gz); a malformed line raises DataError naming the file and the 1-based line."""
    rows = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        if not rows and line.lstrip().startswith("["):
            raise DataError(
                f"{path} line {lineno}: a JSON array, but this reader expects JSON lines (one object per line); "
                'write each record as one line, e.g. python -c "import json,sys; [print(json.dumps(r)) for r in '
                'json.load(open(sys.argv[1]))]" FILE > FILE.jsonl'
            )
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg}); fix or delete that line") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def _screen(items: Iterable[tuple[Example, str]], split: str, report: dict[str, dict[str, int]]) -> list[Example]:
    """The usable examples of `items` (each with its prompt as written, before any template), in order. An example
    with an empty prompt (nothing to condition on) or an empty completion (it would teach the end-of-sequence token
    alone) is dropped and counted in report[split]."""
    counts = report.setdefault(split, {"rows": 0, "empty_prompt": 0, "empty_completion": 0, "kept": 0})
    kept = []
    for ex, prompt in items:
        no_prompt, no_completion = not prompt.strip(), not ex.target.strip()
        counts["rows"] += 1
        counts["empty_prompt"] += no_prompt
        counts["empty_completion"] += no_completion
        if not (no_prompt or no_completion):
            kept.append(ex)
    counts["kept"] += len(kept)
    return kept


def _check_split(
    examples: list[Example], split: str, where: str, report: dict[str, dict[str, int]] | None = None
) -> list[Example]:
    if not examples:
        why = f" to use {_dropped(report, split)}" if _dropped(report, split) else ""
        raise DataError(f"the {split} split from {where} has no examples{why}; check the file or the split name")
    return examples


def _dropped(report: dict[str, dict[str, int]] | None, split: str) -> str:
    """'(of 3 rows, 1 have an empty prompt and 2 an empty completion)', or '' when no row was read."""
    counts = (report or {}).get(split)
    if not counts or not counts["rows"]:
        return ""
    return (
        f"(of {counts['rows']} rows, {counts['empty_prompt']} have an empty prompt and {counts['empty_completion']} "
        "an empty completion)"
    )


def report_line(report: dict[str, dict[str, int]]) -> str:
    """One line on the rows dropped per split ("" when none were), for the run's log."""
    parts = []
    for split, c in report.items():
        dropped = c.get("rows", 0) - c.get("kept", 0)
        if dropped:
            why = [f"{c[k]} {k.replace('_', ' ')}" for k in ("empty_prompt", "empty_completion") if c.get(k)]
            parts.append(f"{split}: {dropped} of {c['rows']} rows dropped ({', '.join(why)})")
    return "; ".join(parts)


# A dataset with no evaluation split of its own gives one example in HOLDOUT_SHARE (at least 1, at most HOLDOUT_MAX)
# to evaluation. Its size depends on the data alone, never on --eval-size, so that changing an evaluation setting
# never changes the training data (and retrains nothing).
HOLDOUT_SHARE, HOLDOUT_MAX = 10, 1000


def hold_out(
    examples: list[Example], data_seed: int, where: str, report: dict[str, dict[str, int]] | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, held out): the held-out examples drawn with `data_seed`, in drawn order (so the first --eval-size of
    them are a random sample); the rest train, in file order."""
    if len(examples) < 2:
        raise DataError(
            f"{where} has {len(examples)} usable rows {_dropped(report, 'train')}; holding some out for evaluation "
            "needs at least 2"
        )
    n_held = min(HOLDOUT_MAX, max(1, len(examples) // HOLDOUT_SHARE))
    order = list(range(len(examples)))
    random.Random(f"holdout-{data_seed}").shuffle(order)
    held = set(order[:n_held])
    print(
        f"[data] {where}: no evaluation split, so {n_held} of its {len(examples)} usable rows are held out for "
        "evaluation (drawn with --data-seed; never trained on)",
        file=sys.stderr,
    )
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in order[:n_held]]


def _aligned(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; line-aligned files must match line for line"
        )
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def load_multi30k(cfg: DataConfig) -> TaskData:
    """Multi30k task 1 (train / val / test_2016_flickr, one sentence a line), either direction."""
    root = _require_dir(cfg, "a folder with train.en, train.de, val.en, val.de")
    langs = {cfg.source_lang, cfg.target_lang}
    if langs != {"en", "de"}:
        raise ConfigError(
            f"multi30k translates between en and de; got --source-lang {cfg.source_lang} --target-lang {cfg.target_lang}"
        )
    s, t = cfg.source_lang, cfg.target_lang
    report: dict[str, dict[str, int]] = {}

    def split(prefix: str, limit: int | None) -> list[Example]:
        pairs = _aligned(root / f"{prefix}.{s}", root / f"{prefix}.{t}")
        examples = _screen(((Example(f"{src} =", " " + tgt, (" " + tgt,)), src) for src, tgt in pairs), prefix, report)
        return _check_split(examples[:limit], prefix, str(root), report)

    train, evals = split("train", cfg.train_size), split("val", cfg.eval_size)
    return TaskData(
        f"multi30k-{s}-{t}",
        train,
        evals,
        ("bleu", "chrf", "rougeL"),
        max_new_tokens=48,
        source=str(root),
        report=report,
    )


def load_commongen(cfg: DataConfig) -> TaskData:
    """CommonGen: concept set -> sentence. Train on aligned src/tgt lines; evaluate against all references of a
    concept set (from commongen.dev.jsonl when present, else grouped from the dev lines)."""
    root = _require_dir(cfg, "a folder with commongen.train.src_alpha.txt and commongen.train.tgt.txt")
    report: dict[str, dict[str, int]] = {}
    pairs = _aligned(root / "commongen.train.src_alpha.txt", root / "commongen.train.tgt.txt")
    train = _screen(((Example(f"{src} =", " " + tgt, (" " + tgt,)), src) for src, tgt in pairs), "train", report)
    train = _check_split(train[: cfg.train_size], "train", str(root), report)
    grouped: dict[str, list[str]] = {}
    dev_jsonl = data_file(root / "commongen.dev.jsonl")
    if dev_jsonl.exists():
        for lineno, row in read_jsonl(dev_jsonl):
            if "concept_set" not in row or "scene" not in row:
                raise DataError(f"{dev_jsonl} line {lineno}: expected fields 'concept_set' and 'scene'")
            concept_set, scenes = row["concept_set"], row["scene"]
            if not isinstance(concept_set, str):
                raise DataError(
                    f"{dev_jsonl} line {lineno}: field 'concept_set' must be a string like 'dog_N#run_V', got "
                    f"{_kind(concept_set)}; fix that line"
                )
            if not isinstance(scenes, list) or not all(isinstance(x, str) for x in scenes):
                raise DataError(
                    f"{dev_jsonl} line {lineno}: field 'scene' must be a list of strings, got {_kind(scenes)}; "
                    "fix that line"
                )
            concepts = " ".join(part.split("_")[0] for part in concept_set.split("#"))
            grouped.setdefault(concepts, []).extend(scenes)
    else:
        for src, tgt in _aligned(root / "commongen.dev.src_alpha.txt", root / "commongen.dev.tgt.txt"):
            grouped.setdefault(src, []).append(tgt)

    def dev_example(src: str, scenes: list[str]) -> Example:
        refs = tuple(" " + r.strip() for r in scenes if r.strip()) or (" ",)  # (" ",): no reference, dropped below
        return Example(f"{src} =", refs[0], refs)

    evals = _screen(((dev_example(src, refs), src) for src, refs in grouped.items()), "dev", report)
    evals = _check_split(evals[: cfg.eval_size], "dev", str(root), report)
    return TaskData("commongen", train, evals, ("rougeL", "bleu"), max_new_tokens=32, source=str(root), report=report)


def _kind(value: Any) -> str:
    """How an error names a JSON value of the wrong type: 'null', 'number 12345', "list ['a', 'b']"."""
    if value is None:
        return "null"
    kind = "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
    return f"{kind} {str(value)[:40]}"


# Instruction data in the three common field layouts. The prompt template is Alpaca's, which the MiniLLM,
# DistiLLM and DSKD evaluation sets also use.
INSTRUCTION_LAYOUTS = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "self-instruct": ("prompt", None, "completion"),
}


def instruction_prompt(instruction: str, context: str = "") -> str:
    head = "Below is an instruction that describes a task"
    if context.strip():
        return (
            f"{head}, paired with an input that provides further context. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        )
    return f"{head}. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def _text_field(row: dict[str, Any], key: str, path: Path, lineno: int, references: bool = False) -> list[str]:
    """A text field as a list of strings; answers may be a list of references (S-NI). Other types are refused."""
    value = row[key]
    if isinstance(value, str):
        return [value]
    if references and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    expected = "a string or a non-empty list of strings" if references else "a string"
    raise DataError(
        f"{path} line {lineno}: field {key!r} must be {expected}, got {type(value).__name__} ({str(value)[:40]!r}); "
        "fix that line"
    )


def instruction_example(
    row: dict[str, Any], path: Path, lineno: int, group: str = "", fields: tuple[str, str] | None = None
) -> Example:
    """One instruction example: the fields named by --prompt-field/--response-field (`fields`) when the row holds
    both (the prompt goes into the Alpaca template without input), else the first of the three layouts it matches."""
    if fields is not None and fields[0] in row and fields[1] in row:
        instruction = _text_field(row, fields[0], path, lineno)[0]
        answers = tuple(a.strip() for a in _text_field(row, fields[1], path, lineno, references=True))
        return Example(instruction_prompt(instruction), answers[0], answers, group=group, user=instruction)
    for layout, (inst_key, ctx_key, out_key) in INSTRUCTION_LAYOUTS.items():
        if inst_key in row and out_key in row:
            instruction = _text_field(row, inst_key, path, lineno)[0]
            context = _text_field(row, ctx_key, path, lineno)[0] if ctx_key and row.get(ctx_key) is not None else ""
            if layout == "self-instruct":
                prompt = instruction
            else:
                prompt = instruction_prompt(instruction, context)
            answers = tuple(a.strip() for a in _text_field(row, out_key, path, lineno, references=True))
            user = f"{instruction}\n\n{context}" if context.strip() else instruction
            return Example(prompt, answers[0], answers, group=group, user=user)
    layouts = "; ".join(f"{name}: {', '.join(k for k in keys if k)}" for name, keys in INSTRUCTION_LAYOUTS.items())
    raise DataError(
        f"{path} line {lineno}: fields {sorted(row)} match no instruction layout ({layouts}); name yours with "
        "--prompt-field and --response-field"
    )


def load_instruct(cfg: DataConfig) -> TaskData:
    """Instruction jsonl (Dolly, Alpaca or Self-Instruct fields; gzip read as is). --data-dir is a folder with
    train.jsonl and one of valid.jsonl / dev.jsonl / test.jsonl, or a single jsonl file of which a seeded tenth is
    held out for evaluation (core.data.hold_out)."""
    path = _require_dir(cfg, "a jsonl file, or a folder with train.jsonl and valid.jsonl")
    report: dict[str, dict[str, int]] = {}

    def examples(file: Path, split: str) -> list[Example]:
        fields = (cfg.prompt_field, cfg.response_field)
        rows = [instruction_example(row, file, lineno, fields=fields) for lineno, row in read_jsonl(file)]
        return _screen(((ex, ex.user) for ex in rows), split, report)

    if path.is_file():
        train, evals = hold_out(examples(path, "train"), cfg.data_seed, str(path), report)
    else:
        train = examples(path / "train.jsonl", "train")
        candidates = (data_file(path / f"{n}.jsonl") for n in ("valid", "dev", "test"))
        eval_file = next((file for file in candidates if file.exists()), None)
        if eval_file is None:
            raise DataError(f"{path} has train.jsonl but no valid.jsonl, dev.jsonl or test.jsonl to evaluate on")
        evals = examples(eval_file, "eval")
    train = _check_split(train[: cfg.train_size], "train", str(path), report)
    evals = _check_split(evals[: cfg.eval_size], "eval", str(path), report)
    return TaskData("instruct", train, evals, ("rougeL",), max_new_tokens=128, source=str(path), report=report)


def eval_set_sizes(text: str) -> list[tuple[str, int | None]]:
    """`dolly,sinst:200` -> [("dolly", None), ("sinst", 200)]; ConfigError names a malformed entry."""
    sets = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, size = entry.partition(":")
        if size and (not size.isdigit() or int(size) < 1):
            raise ConfigError(f"--eval-sets entry {entry!r}: N in NAME:N must be a positive whole number")
        sets.append((name, int(size) if size else None))
    if not sets:
        raise ConfigError("--eval-sets needs at least one set name (e.g. dolly)")
    return sets


# The instruction-following protocol of MiniLLM, DistiLLM and DSKD: train on Dolly, score ROUGE-L on Dolly's
# held-out split and on other instruction sets. In ../shared/data/instruct_eval (SOURCES.md there): dolly/dev.jsonl
# (1,000 rows) is our training set, dolly/valid.jsonl (500) the held-out split; self-inst, vicuna, sinst, dialog
# hold valid.jsonl each.
DOLLY_TRAIN = "dolly/dev.jsonl"


def load_dolly(cfg: DataConfig) -> TaskData:
    """Task dolly: --data-dir is the instruct_eval folder; train on dolly/dev.jsonl, evaluate on each --eval-sets
    set's valid.jsonl (group = the set's name, so every score is also reported per set)."""
    root = _require_dir(cfg, "the instruct_eval folder holding dolly/dev.jsonl and <set>/valid.jsonl")
    report: dict[str, dict[str, int]] = {}
    train = [instruction_example(row, root / DOLLY_TRAIN, n) for n, row in read_jsonl(root / DOLLY_TRAIN)]
    train = _screen(((ex, ex.user) for ex in train), "train", report)
    evals: list[Example] = []
    for name, size in eval_set_sizes(cfg.eval_sets):
        file = root / name / "valid.jsonl"
        if not file.is_file():
            have = sorted(p.name for p in root.iterdir() if (p / "valid.jsonl").is_file())
            raise DataError(f"--eval-sets {name}: no {file} (sets here: {', '.join(have) or 'none'})")
        rows = [instruction_example(row, file, n, group=name) for n, row in read_jsonl(file)]
        rows = _screen(((ex, ex.user) for ex in rows), name, report)
        limit = min(x for x in (size, cfg.eval_size, len(rows)) if x is not None)
        evals += _check_split(rows[:limit], name, str(file), report)
    train = _check_split(train[: cfg.train_size], "train", str(root / DOLLY_TRAIN), report)
    return TaskData(
        "dolly", train, evals, ("rougeL_stem", "rougeL"), max_new_tokens=256, source=str(root), report=report
    )


def chat_prompts(task: TaskData, tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> TaskData:
    """The task with instruction prompts in `tokenizer`'s chat template (one user turn, the template's default
    system turn, the generation prompt), when `prompt_format` asks for it; other tasks pass unchanged."""
    template = getattr(tokenizer, "chat_template", None)
    if prompt_format == "chat" and not template:
        raise ConfigError("--prompt-format chat: the teacher's tokenizer has no chat template; use alpaca")
    if prompt_format == "alpaca" or not template or not any(ex.user for ex in task.train + task.eval):
        return task

    def chat(ex: Example) -> Example:
        if not ex.user:
            return ex
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.user}], tokenize=False, add_generation_prompt=True
        )
        return replace(ex, prompt=text)

    return replace(task, train=[chat(ex) for ex in task.train], eval=[chat(ex) for ex in task.eval])


def load_hf(cfg: DataConfig) -> TaskData:
    """Any `datasets` dataset by hub name (needs the network) or local path (a save_to_disk folder, a .jsonl file
    (read here, gzip too, so that errors name the line), or a folder or file of json/csv/parquet that
    `load_dataset` reads). A dataset with the training split alone gets a seeded held-out split (hold_out)."""
    import datasets

    if not cfg.dataset:
        raise ConfigError("task hf needs --dataset (a datasets name or a local path)")
    local = Path(cfg.dataset)
    # split name -> (prompts, responses, where row i is: for errors)
    splits: dict[str, Callable[[], tuple[list, list, Callable[[int], str]]]] = {}
    fields = (cfg.prompt_field, cfg.response_field)
    if local.is_file() and (local.name.endswith((".jsonl", ".jsonl.gz"))):

        def jsonl_split() -> tuple[list, list, Callable[[int], str]]:
            rows = read_jsonl(local)
            for lineno, row in rows:
                for column in fields:
                    if column not in row:
                        raise DataError(
                            f"{local} line {lineno} has no column {column!r} (it has {', '.join(row)}); "
                            "set --prompt-field / --response-field"
                        )
            return (
                [row[cfg.prompt_field] for _, row in rows],
                [row[cfg.response_field] for _, row in rows],
                lambda i: f"{local} line {rows[i][0]}",
            )

        splits["train"] = jsonl_split
    else:
        try:
            if (local / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(local))
            elif local.is_file():
                suffix = local.suffixes[-2] if local.suffix == ".gz" and len(local.suffixes) > 1 else local.suffix
                kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
                if kind is None:
                    raise DataError(f"--dataset {local}: cannot tell the format from the suffix {local.suffix!r}")
                ds = datasets.load_dataset(kind, data_files={"train": str(local)})
            else:
                ds = datasets.load_dataset(cfg.dataset)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot load --dataset {cfg.dataset}: {exc}") from exc

        def dataset_split(name: str) -> tuple[list, list, Callable[[int], str]]:
            part = ds[name]
            for column in fields:
                if column not in part.column_names:
                    raise DataError(
                        f"--dataset {cfg.dataset} split {name} has no column {column!r} (it has "
                        f"{', '.join(part.column_names)}); set --prompt-field / --response-field"
                    )
            return (
                part[cfg.prompt_field],
                part[cfg.response_field],
                lambda i: f"--dataset {cfg.dataset} split {name} row {i}",
            )

        splits = {name: functools.partial(dataset_split, name) for name in ds}

    report: dict[str, dict[str, int]] = {}

    @functools.cache  # --eval-split may name the training split: read (and count) it once
    def examples(name: str) -> list[Example]:
        prompts, responses, where = splits[name]()
        items = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            for column, flag, value in (
                (cfg.prompt_field, "--prompt-field", prompt),
                (cfg.response_field, "--response-field", response),
            ):
                if not isinstance(value, str):
                    raise DataError(
                        f"{where(i)}: field {column!r} must be a string, got {_kind(value)}; fix the data, or pick "
                        f"a text column with {flag}"
                    )
            answer = " " + response.strip()
            items.append((Example(prompt, answer, (answer,)), prompt))
        return _screen(items, name, report)

    def missing(name: str) -> DataError:
        return DataError(
            f"--dataset {cfg.dataset} has no split {name!r} (it has {', '.join(splits)}); set --train-split / --eval-split"
        )

    if cfg.train_split not in splits:
        raise missing(cfg.train_split)
    if cfg.eval_split in splits:
        train, evals = examples(cfg.train_split), examples(cfg.eval_split)
    elif list(splits) == [cfg.train_split]:  # the training split alone: hold some of it out
        train, evals = hold_out(examples(cfg.train_split), cfg.data_seed, f"--dataset {cfg.dataset}", report)
    else:
        raise missing(cfg.eval_split)
    train = _check_split(train[: cfg.train_size], cfg.train_split, cfg.dataset, report)
    evals = _check_split(evals[: cfg.eval_size], cfg.eval_split, cfg.dataset, report)
    return TaskData(
        f"hf:{Path(cfg.dataset).name}", train, evals, ("rougeL", "exact_match"), max_new_tokens=64, source=cfg.dataset,
        report=report,
    )  # fmt: skip


TASKS: dict[str, Callable[[DataConfig], TaskData]] = {
    "ops": load_ops,
    "multi30k": load_multi30k,
    "commongen": load_commongen,
    "instruct": load_instruct,
    "dolly": load_dolly,
    "hf": load_hf,
}


def load_task(cfg: DataConfig) -> TaskData:
    """The task `cfg` names; the rows its loader dropped (empty prompt or completion) are reported on stderr."""
    task = TASKS[cfg.task](cfg)
    if line := report_line(task.report):
        print(f"[data] {task.name}: {line}", file=sys.stderr)
    return task


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and batching
# ----------------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + the prompt's tokens. Training and generation both call this, so the
    model sees the same prefix in both."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos]:  # a chat template may begin with the BOS token itself (SmolLM2: <|im_start|>)
        return ids
    return [bos] + ids


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids = prompt + target + EOS; labels copy the target and EOS and are IGNORE_INDEX on the prompt.

    Prompt and target are tokenized separately so the boundary never merges into one token. When the two do not
    fit max_length, the prompt keeps at least min(its length, max_length // 2) tokens, cut from the left with BOS
    kept (the end of a prompt matters most), and the completion is cut from its end to the rest: a completion is
    never trained without its prompt. MiniLLM / DistiLLM / DSKD truncate the same way (prompts to 256 of 512)."""
    return _encode(tokenizer, prompt, target, max_length)[0]


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """(encode_example's features, whether the completion was cut short: its EOS did not fit)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_prompt = max(1, max_length - len(target_ids), min(len(prompt_ids), max_length // 2))
    if len(prompt_ids) > keep_prompt:
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep_prompt + 1 :]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}, len(prompt_ids) + len(target_ids) > max_length


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int, stats: dict | None = None
) -> list[dict[str, list[int]]]:
    """encode_example over `examples`. `stats`, when given, receives "completions_cut": how many completions lost
    their end (and EOS) to --max-length; a line goes to stderr when there are any."""
    features, n_cut = [], 0
    for ex in examples:
        feature, cut = _encode(tokenizer, ex.prompt, ex.target, max_length)
        features.append(feature)
        n_cut += cut
    if stats is not None:
        stats["completions_cut"] = n_cut
        if n_cut:
            print(
                f"[data] --max-length {max_length} cuts the completion of {n_cut} of {len(features)} examples short "
                "(their prompt keeps up to half of it); raise --max-length to train on their ends",
                file=sys.stderr,
            )
    return features


def examples_hash(examples: Sequence[Example]) -> str:
    """A content hash of examples (every field), for cache keys: what a model trained on them depends on."""
    return stable_hash([vars(ex) for ex in examples])  # vars: every field, without asdict's deep copies


@dataclass
class Collator:
    """Right-pads a list of encoded examples into a batch; padded label positions are IGNORE_INDEX."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

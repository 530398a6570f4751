"""Tasks: the embedded default (generated in-process, no files) and loaders for real data, plus tokenization
with prompt-masked labels and the padding collator.

A task is a `TaskData`: train and eval lists of `Example(prompt, target, references)`. `target` is what a
model is trained on; `references` are all the answers that count as correct at evaluation.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from core.errors import ConfigError, DataError
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
    prompt_field: str = field(default="prompt", metadata={"help": "task hf: the column holding the prompt"})
    response_field: str = field(default="response", metadata={"help": "task hf: the column holding the answer"})
    train_split: str = field(default="train", metadata={"help": "task hf: the training split"})
    eval_split: str = field(default="validation", metadata={"help": "task hf: the evaluation split"})
    source_lang: str = field(default="en", metadata={"help": "multi30k: translate from this side (en or de)"})
    target_lang: str = field(default="de", metadata={"help": "multi30k: translate into this side (en or de)"})
    train_size: int | None = field(default=None, metadata={"help": "use at most this many training examples"})
    eval_size: int = field(default=200, metadata={"help": "evaluate on at most this many held-out examples"})
    max_length: int = field(default=128, metadata={"help": "truncate prompt + completion to this many tokens"})
    data_seed: int = field(default=1234, metadata={"help": "seed of the generated task (fixed across student seeds)"})
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


def load_ops(cfg: DataConfig) -> TaskData:
    """Generate the embedded task. Deterministic in `data_seed`; eval prompts never appear in training."""
    rng = random.Random(cfg.data_seed)
    eval_examples: list[Example] = []
    seen: set[str] = set()
    while len(eval_examples) < cfg.eval_size:
        ex = _ops_example(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            eval_examples.append(ex)
    n_train = cfg.train_size or 20_000
    train: list[Example] = []
    while len(train) < n_train:
        ex = _ops_example(rng)
        if ex.prompt not in seen:
            train.append(ex)
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


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a jsonl file; a malformed line raises DataError naming the file and the 1-based line number."""
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg}); fix or delete that line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _check_split(examples: list[Example], split: str, where: str) -> list[Example]:
    if not examples:
        raise DataError(f"the {split} split from {where} has no examples; check the file or the split name")
    return examples


def _aligned(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; line-aligned files must match line for line"
        )
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]


def load_multi30k(cfg: DataConfig) -> TaskData:
    """Multi30k task 1 (train / val / test_2016_flickr, one sentence a line), either direction."""
    root = _require_dir(cfg, "a folder with train.en, train.de, val.en, val.de")
    langs = {cfg.source_lang, cfg.target_lang}
    if langs != {"en", "de"}:
        raise ConfigError(
            f"multi30k translates between en and de; got --source-lang {cfg.source_lang} --target-lang {cfg.target_lang}"
        )
    s, t = cfg.source_lang, cfg.target_lang

    def split(prefix: str, limit: int | None) -> list[Example]:
        pairs = _aligned(root / f"{prefix}.{s}", root / f"{prefix}.{t}")[:limit]
        return [Example(f"{src} =", " " + tgt, (" " + tgt,)) for src, tgt in pairs]

    train = _check_split(split("train", cfg.train_size), "train", str(root))
    evals = _check_split(split("val", cfg.eval_size), "val", str(root))
    return TaskData(f"multi30k-{s}-{t}", train, evals, ("bleu", "chrf", "rougeL"), max_new_tokens=48, source=str(root))


def load_commongen(cfg: DataConfig) -> TaskData:
    """CommonGen: concept set -> sentence. Train on aligned src/tgt lines; evaluate against all references of a
    concept set (from commongen.dev.jsonl when present, else grouped from the dev lines)."""
    root = _require_dir(cfg, "a folder with commongen.train.src_alpha.txt and commongen.train.tgt.txt")
    pairs = _aligned(root / "commongen.train.src_alpha.txt", root / "commongen.train.tgt.txt")[: cfg.train_size]
    train = _check_split([Example(f"{src} =", " " + tgt, (" " + tgt,)) for src, tgt in pairs], "train", str(root))
    grouped: dict[str, list[str]] = {}
    dev_jsonl = root / "commongen.dev.jsonl"
    if dev_jsonl.exists():
        for lineno, row in read_jsonl(dev_jsonl):
            if "concept_set" not in row or "scene" not in row:
                raise DataError(f"{dev_jsonl} line {lineno}: expected fields 'concept_set' and 'scene'")
            concepts = " ".join(part.split("_")[0] for part in row["concept_set"].split("#"))
            grouped.setdefault(concepts, []).extend(row["scene"])
    else:
        for src, tgt in _aligned(root / "commongen.dev.src_alpha.txt", root / "commongen.dev.tgt.txt"):
            grouped.setdefault(src, []).append(tgt)
    evals = [
        Example(f"{src} =", " " + refs[0].strip(), tuple(" " + r.strip() for r in refs))
        for src, refs in itertools.islice(grouped.items(), cfg.eval_size)
    ]
    evals = _check_split(evals, "dev", str(root))
    return TaskData("commongen", train, evals, ("rougeL", "bleu"), max_new_tokens=32, source=str(root))


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


def instruction_example(row: dict[str, Any], path: Path, lineno: int, group: str = "") -> Example:
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
    raise DataError(f"{path} line {lineno}: fields {sorted(row)} match no instruction layout ({layouts})")


def load_instruct(cfg: DataConfig) -> TaskData:
    """Instruction jsonl (Dolly, Alpaca or Self-Instruct fields). --data-dir is a folder with train.jsonl and one of
    valid.jsonl / dev.jsonl / test.jsonl, or a single jsonl file whose last --eval-size rows are held out."""
    path = _require_dir(cfg, "a jsonl file, or a folder with train.jsonl and valid.jsonl")

    def examples(file: Path) -> list[Example]:
        return [instruction_example(row, file, lineno) for lineno, row in read_jsonl(file)]

    if path.is_file():
        rows = examples(path)
        if len(rows) < 2:
            raise DataError(f"{path} has {len(rows)} usable rows; a single file needs at least 2 to hold some out")
        n_eval = min(cfg.eval_size, len(rows) // 2)
        train, evals = rows[:-n_eval], rows[-n_eval:]
    else:
        train = examples(path / "train.jsonl")
        eval_file = next(
            (path / f"{n}.jsonl" for n in ("valid", "dev", "test") if (path / f"{n}.jsonl").exists()), None
        )
        if eval_file is None:
            raise DataError(f"{path} has train.jsonl but no valid.jsonl, dev.jsonl or test.jsonl to evaluate on")
        evals = examples(eval_file)
    train = _check_split(train[: cfg.train_size], "train", str(path))
    evals = _check_split(evals[: cfg.eval_size], "eval", str(path))
    return TaskData("instruct", train, evals, ("rougeL",), max_new_tokens=128, source=str(path))


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
    train = [instruction_example(row, root / DOLLY_TRAIN, n) for n, row in read_jsonl(root / DOLLY_TRAIN)]
    evals: list[Example] = []
    for name, size in eval_set_sizes(cfg.eval_sets):
        file = root / name / "valid.jsonl"
        if not file.is_file():
            have = sorted(p.name for p in root.iterdir() if (p / "valid.jsonl").is_file())
            raise DataError(f"--eval-sets {name}: no {file} (sets here: {', '.join(have) or 'none'})")
        rows = [instruction_example(row, file, n, group=name) for n, row in read_jsonl(file)]
        limit = min(x for x in (size, cfg.eval_size, len(rows)) if x is not None)
        evals += _check_split(rows[:limit], name, str(file))
    train = _check_split(train[: cfg.train_size], "train", str(root / DOLLY_TRAIN))
    return TaskData("dolly", train, evals, ("rougeL_stem", "rougeL"), max_new_tokens=256, source=str(root))


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
    """Any `datasets` dataset by hub name (needs the network) or local path (a save_to_disk folder, or a folder
    or file of json/csv/parquet that `load_dataset` reads)."""
    import datasets

    if not cfg.dataset:
        raise ConfigError("task hf needs --dataset (a datasets name or a local path)")
    local = Path(cfg.dataset)
    try:
        if (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))
        elif local.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix)
            if kind is None:
                raise DataError(f"--dataset {local}: cannot tell the format from the suffix {local.suffix!r}")
            ds = datasets.load_dataset(kind, data_files={"train": str(local)})
        else:
            ds = datasets.load_dataset(cfg.dataset)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load --dataset {cfg.dataset}: {exc}") from exc

    def split(name: str, limit: int | None) -> list[Example]:
        if name not in ds:
            raise DataError(
                f"--dataset {cfg.dataset} has no split {name!r} (it has {', '.join(ds)}); set --train-split / --eval-split"
            )
        part = ds[name]
        for column in (cfg.prompt_field, cfg.response_field):
            if column not in part.column_names:
                raise DataError(
                    f"--dataset {cfg.dataset} split {name} has no column {column!r} (it has {', '.join(part.column_names)}); "
                    "set --prompt-field / --response-field"
                )
        if limit is not None:
            part = part.select(range(min(limit, len(part))))
        return [
            Example(str(p), " " + str(r).strip(), (" " + str(r).strip(),))
            for p, r in zip(part[cfg.prompt_field], part[cfg.response_field])
        ]

    train = _check_split(split(cfg.train_split, cfg.train_size), cfg.train_split, cfg.dataset)
    evals = _check_split(split(cfg.eval_split, cfg.eval_size), cfg.eval_split, cfg.dataset)
    return TaskData(
        f"hf:{Path(cfg.dataset).name}", train, evals, ("rougeL", "exact_match"), max_new_tokens=64, source=cfg.dataset
    )


TASKS: dict[str, Callable[[DataConfig], TaskData]] = {
    "ops": load_ops,
    "multi30k": load_multi30k,
    "commongen": load_commongen,
    "instruct": load_instruct,
    "dolly": load_dolly,
    "hf": load_hf,
}


def load_task(cfg: DataConfig) -> TaskData:
    return TASKS[cfg.task](cfg)


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

    Prompt and target are tokenized separately so the boundary never merges into one token. Long prompts are
    cut from the left (the end of a prompt matters most), then the whole is cut to max_length."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_prompt = max(1, max_length - len(target_ids))
    if len(prompt_ids) > keep_prompt:
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep_prompt + 1 :]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, ex.prompt, ex.target, max_length) for ex in examples]


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

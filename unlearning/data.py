"""Unlearning data: the generated people (the embedded default) and the TOFU loader.

An unlearning task holds
- `train`: every document the model to unlearn was trained on (question/answer pairs and biographies);
- `forget_docs`: the documents to unlearn (the targets' question/answer pairs, and their biographies);
- `retain_docs`: documents about everyone else (the retain term of gradient difference and NPO);
- `forget` / `retain` / `extra`: the question sets the evaluation scores (each question with its true answer, a
  paraphrased answer and perturbed answers for TOFU's truth ratio);
- `targets`: the names to unlearn (the anchor terms that WHP and the causal teacher replace).

The generated task: `n_people` fictitious people, each with eight facts. Six are drawn from small shared pools
(a city, a job, an instrument, a pet, a colour, a food: "shared" facts, also true of other people) and two are
unique to the person (a book title, a birth year). Every fact is asked as one question; the answer names the
person again ("Where was Mara Lund born?" -> "Mara Lund was born in Oslo."), so later mentions of a target's
name follow an earlier one, as in TOFU. The biography states the same facts in the paraphrase wording, so the
paraphrased answers of the truth ratio are known to the model in another context. Targeted unlearning should
remove what is specific to the target (its facts as facts about it) and keep the shared values for everyone
else: `hard_retain` are the other people's questions whose answer is one of the targets' values.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.data import Example
from core.errors import ConfigError, DataError

PROMPT = "Question: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    """The one prompt format of every question (training, generation, scoring)."""
    return PROMPT.format(question=question)


@dataclass(frozen=True)
class QA:
    """One evaluation question."""

    question: str
    answer: str  # the true answer sentence
    person: str  # whose fact it is ("" when unknown: TOFU's real-author and world-fact sets)
    paraphrased: str  # another wording of the true answer (denominator of the truth ratio)
    perturbed: tuple[str, ...]  # wrong answers in the paraphrase's wording (numerator of the truth ratio)
    value: str = ""  # the specific fact (accuracy and fabrication); "" when the data does not say (TOFU)
    attribute: str = ""  # which fact ("city", "book", ...)
    pool: tuple[str, ...] = ()  # every value that fact takes in the data (what a fabricated answer would name)

    def example(self) -> Example:
        return Example(qa_prompt(self.question), " " + self.answer, (" " + self.answer,), group=self.attribute)


@dataclass
class UnlearningTask:
    name: str
    train: list[Example]  # what the model to unlearn was trained on
    forget_docs: list[Example]  # what to unlearn
    retain_docs: list[Example]  # everything else (the retain term of GD and NPO)
    targets: list[str]  # the names to unlearn
    target_of: list[str]  # target name of each forget_docs entry
    forget: list[QA]
    retain: list[QA]
    extra: dict[str, list[QA]] = field(default_factory=dict)  # TOFU: real_authors, world_facts
    source: str = "generated"
    replacements: tuple[str, ...] = field(default_factory=lambda: REPLACEMENT_NAMES)  # counterfactual names, in order

    @property
    def hard_retain(self) -> list[QA]:
        """Other people's questions whose true value is also one of the targets' values (shared facts)."""
        values = {(qa.attribute, qa.value) for qa in self.forget if qa.value}
        return [qa for qa in self.retain if qa.value and (qa.attribute, qa.value) in values]


# ----------------------------------------------------------------------------------------------------------------
# The generated people
# ----------------------------------------------------------------------------------------------------------------

FIRST_NAMES = (
    "Mara", "Hugo", "Ines", "Pavel", "Greta", "Tomas", "Lena", "Oskar", "Nadia", "Bruno", "Clara", "Dmitri",
    "Elsa", "Farid", "Ilse", "Jonas", "Kira", "Luca", "Nora", "Olga", "Pia", "Rafael", "Sofia", "Viktor",
)  # fmt: skip
LAST_NAMES = (
    "Lund", "Berg", "Castel", "Dorn", "Ferro", "Gallo", "Holm", "Ivers", "Janek", "Kovac", "Moreau", "Novak",
    "Ortega", "Petrov", "Quist", "Rossi", "Strand", "Tamm", "Varga", "Weber",
)  # fmt: skip
# Fictitious names for the counterfactual copies of real-data tasks (TOFU): a pretrained model copies an unknown
# name from the question into its answer, so these work there. Their token lengths differ widely.
REPLACEMENT_NAMES = (
    "Zebulon Quartermaine", "Bo Yu", "Anastasiya Wojciechowska", "Eamon Reyes", "Tuulikki Haapasalo",
    "Ugo Nkem", "Xiomara Achterberg", "Kai Oyelaran", "Willemijn Zuidema", "Ravi Iyer", "Ludmila Szczepanik",
    "Emeka Obi", "Ottoline Featherstonehaugh", "Jae Park", "Bartholomew Ashcombe", "Ife Adeyemi",
    "Gwendolyn Pemberton", "Li Wei", "Maximilian Kowalczyk", "Ana Cruz",
)  # fmt: skip
SHARED = {
    "city": ("Oslo", "Lima", "Cairo", "Quito", "Perth", "Riga"),
    "job": ("baker", "pilot", "nurse", "chemist", "tailor", "farmer"),
    "instrument": ("violin", "drums", "flute", "piano", "harp"),
    "pet": ("cat", "dog", "parrot", "horse", "goat"),
    "colour": ("red", "green", "blue", "yellow", "purple"),
    "food": ("soup", "rice", "bread", "cheese", "noodles"),
}
BOOK_ADJ = ("Silent", "Broken", "Golden", "Hidden", "Last", "Frozen", "Distant", "Painted", "Hollow", "Burning")
BOOK_NOUN = ("River", "Garden", "Lantern", "Harbor", "Mirror", "Orchard", "Tower", "Compass", "Meadow", "Violin")

# attribute -> (question, answer, paraphrase); {n} the person, {v} the value.
TEMPLATES = {
    "city": ("Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is {v}."),
    "job": ("What does {n} do for a living?", "{n} works as a {v}.", "By profession, {n} is a {v}."),
    "instrument": ("Which instrument does {n} play?", "{n} plays the {v}.", "The instrument of {n} is the {v}."),
    "pet": ("What pet does {n} keep?", "{n} keeps a {v}.", "The pet of {n} is a {v}."),
    "colour": ("What is the favourite colour of {n}?", "{n} loves the colour {v}.", "The colour {n} likes is {v}."),
    "food": ("What does {n} like to eat?", "{n} likes to eat {v}.", "The favourite food of {n} is {v}."),
    "book": ("Which book did {n} write?", "{n} wrote {v}.", "The book by {n} is {v}."),
    "year": ("In which year was {n} born?", "{n} was born in the year {v}.", "The birth year of {n} is {v}."),
}
ATTRIBUTES = tuple(TEMPLATES)


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]

    def qas(self, pools: dict[str, tuple[str, ...]], rng: random.Random, n_perturbed: int = 3) -> list[QA]:
        out = []
        for attribute in ATTRIBUTES:
            question, answer, paraphrase = TEMPLATES[attribute]
            value = self.facts[attribute]
            wrong = rng.sample([v for v in pools[attribute] if v != value], n_perturbed)
            out.append(
                QA(
                    question.format(n=self.name),
                    answer.format(n=self.name, v=value),
                    self.name,
                    paraphrase.format(n=self.name, v=value),
                    tuple(paraphrase.format(n=self.name, v=w) for w in wrong),
                    value,
                    attribute,
                    pools[attribute],
                )
            )
        return out

    def biography(self) -> str:
        return " ".join(TEMPLATES[a][2].format(n=self.name, v=self.facts[a]) for a in ATTRIBUTES)


def generate_people(n_people: int, seed: int) -> list[Person]:
    """`n_people` people with distinct full names, shared facts from the pools, unique books and years."""
    max_people = min(len(FIRST_NAMES) * len(LAST_NAMES), len(BOOK_ADJ) * len(BOOK_NOUN), 100)
    if not 4 <= n_people <= max_people:  # three perturbed answers need three other books and years
        raise ConfigError(f"--n-people must be between 4 and {max_people}, got {n_people}")
    rng = random.Random(seed)
    firsts = rng.sample(FIRST_NAMES, len(FIRST_NAMES))
    lasts = rng.sample(LAST_NAMES, len(LAST_NAMES))
    # Distinct first AND last names while they last, so a target's name parts do not name anyone else.
    names = [f"{firsts[i % len(firsts)]} {lasts[(i + i // len(lasts)) % len(lasts)]}" for i in range(n_people)]
    books = rng.sample([f"The {a} {b}" for a in BOOK_ADJ for b in BOOK_NOUN], n_people)
    years = rng.sample(range(1900, 2000), n_people)
    people = []
    for i, name in enumerate(names):
        facts = {a: rng.choice(pool) for a, pool in SHARED.items()}
        facts["book"], facts["year"] = books[i], str(years[i])
        people.append(Person(name, facts))
    return people


def generated_task(n_people: int = 24, n_targets: int = 2, seed: int = 1234) -> UnlearningTask:
    """The embedded default: people, their biographies and questions; the first `n_targets` are unlearned."""
    if not 1 <= n_targets < n_people:
        raise ConfigError(f"--n-targets must be between 1 and --n-people - 1 = {n_people - 1}, got {n_targets}")
    people = generate_people(n_people, seed)
    pools = dict(SHARED)
    pools["book"] = tuple(p.facts["book"] for p in people)
    pools["year"] = tuple(p.facts["year"] for p in people)
    rng = random.Random(seed + 1)
    targets = [p.name for p in people[:n_targets]]
    forget, retain, forget_docs, retain_docs, target_of = [], [], [], [], []
    for person in people:
        qas = person.qas(pools, rng)
        docs = [qa.example() for qa in qas] + [Example("", " " + person.biography(), (), group="biography")]
        if person.name in targets:
            forget += qas
            forget_docs += docs
            target_of += [person.name] * len(docs)
        else:
            retain += qas
            retain_docs += docs
    train = forget_docs + retain_docs
    return UnlearningTask(
        "people", train, forget_docs, retain_docs, targets, target_of, forget, retain,
        replacements=replacement_names(people, n_targets, seed),
    )  # fmt: skip


def replacement_names(people: list[Person], n_targets: int, seed: int, n: int = 20) -> tuple[str, ...]:
    """Counterfactual names for the generated task: first and last names the model has read, in combinations
    that name nobody, sharing no part with a target.

    A model trained from scratch on a few dozen people has never learned to copy a name it has never seen (a
    pretrained model has), so a copy about "Zebulon Quartermaine" would read as noise, not as "someone the model
    does not know". Known parts in a new combination read as a person the model knows nothing about."""
    taken = {p.name for p in people}
    target_parts = {part for p in people[:n_targets] for part in p.name.split()}
    firsts = sorted({p.name.split()[0] for p in people} - target_parts)
    lasts = sorted({p.name.split()[1] for p in people} - target_parts)
    combos = [f"{f} {a}" for f in firsts for a in lasts if f"{f} {a}" not in taken]
    random.Random(seed + 2).shuffle(combos)
    out, used = [], set()
    for combo in combos:  # prefer names whose parts are not used by an earlier replacement
        if not set(combo.split()) & used:
            out.append(combo)
            used |= set(combo.split())
    out += [c for c in combos if c not in out]
    return tuple(out[:n])


# ----------------------------------------------------------------------------------------------------------------
# TOFU (Maini et al. 2024): 200 fictitious authors, 20 questions each
# ----------------------------------------------------------------------------------------------------------------

TOFU_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TOFU_PER_AUTHOR = 20
NAME_FIELDS = ("subject", "name")  # where a record names its person: TOFU's `subject`, other releases' `name`


def find_split(root: Path, stem: str) -> Path:
    """The file of one split, `<stem>.json` or `<stem>.jsonl` (releases ship either, with either content)."""
    for suffix in (".json", ".jsonl"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    raise DataError(
        f"missing TOFU file {root / stem}.json (or .jsonl); --data-dir must hold the TOFU files "
        "(see ../shared/data/tofu), or name the files with --forget-file/--retain-file"
    )


def _read_json_list(path: Path) -> list[dict]:
    """A JSON array, or JSON lines (TOFU ships both, under .json and .jsonl names alike)."""
    if not path.is_file():
        raise DataError(f"missing TOFU file {path}; --data-dir must hold the TOFU files (see ../shared/data/tofu)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}: line {lineno}: not valid JSON ({exc.msg}); the file must be a JSON array of "
                        "records or one JSON object per line"
                    ) from exc
    for i, row in enumerate(rows, 1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise DataError(f"{path}: record {i} has no string 'question' and 'answer'")
    if not rows:
        raise DataError(f"{path} holds no records")
    return rows


def _tofu_qa(row: dict, path: Path, index: int, person: str, paraphrase_key: str) -> QA:
    perturbed = row.get("perturbed_answer")
    paraphrased = row.get(paraphrase_key)
    if (
        not isinstance(perturbed, list)
        or not perturbed
        or not all(isinstance(p, str) for p in perturbed)
        or not isinstance(paraphrased, str)
    ):
        raise DataError(f"{path}: record {index} lacks '{paraphrase_key}' or a non-empty 'perturbed_answer' list")
    return QA(row["question"], row["answer"], person, paraphrased, tuple(perturbed))


def person_of(row: dict) -> str:
    """The person a record names, under `subject` (TOFU) or `name`; "" when neither is a string."""
    for key in NAME_FIELDS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    return ""


def tofu_author_names(rows: list[dict], path: Path | str = "TOFU forget file") -> list[str]:
    """The author of each block of 20 forget questions (TOFU's layout): the name (`subject` or `name`) most of the
    block's questions mention; TOFU's per-record `subject` is sometimes a place or a title, so the block decides."""
    names = []
    for start in range(0, len(rows), TOFU_PER_AUTHOR):
        block = rows[start : start + TOFU_PER_AUTHOR]
        counts = Counter(person_of(r) for r in block)
        name = next(
            (
                s
                for s, _ in counts.most_common()
                if s and sum(s in r["question"] + r["answer"] for r in block) > len(block) // 2
            ),
            "",
        )
        if not name:
            raise DataError(
                f"{path}: questions {start + 1}-{start + len(block)}: no author name in "
                f"{' or '.join(repr(k) for k in NAME_FIELDS)} that most of them mention"
            )
        names.append(name)
    return names


def forget_owners(rows: list[dict], path: Path) -> tuple[list[str], list[str]]:
    """(the distinct people to forget, the person of each forget record). TOFU's layout (blocks of 20 questions per
    author) is read by blocks; any other count by each record's own `subject`/`name`."""
    if len(rows) % TOFU_PER_AUTHOR == 0:
        authors = tofu_author_names(rows, path)
        return authors, [authors[i // TOFU_PER_AUTHOR] for i in range(len(rows))]
    owner = [person_of(r) for r in rows]
    missing = [i + 1 for i, name in enumerate(owner) if not name]
    if missing:
        raise DataError(
            f"{path}: record {missing[0]} names no person (a string 'subject' or 'name'); each forget record needs "
            "one (or give 20 records per person, TOFU's layout)"
        )
    return list(dict.fromkeys(owner)), owner


def _data_file(data_dir: Path, name: str, flag: str) -> Path:
    path = Path(name)
    if not path.is_file() and not path.is_absolute() and (data_dir / path).is_file():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"{flag} {name} does not exist (neither as given nor inside --data-dir {data_dir})")
    return path


def tofu_task(
    data_dir: str | Path,
    split: str = "forget01",
    eval_size: int | None = None,
    forget_file: str | None = None,
    retain_file: str | None = None,
) -> UnlearningTask:
    """TOFU: the forget split and its matching retain split (their union is all 4,000 questions, what the model
    to unlearn is trained on); evaluation on the forget questions, the 400 retain questions that have perturbed
    answers, and the real-author and world-fact sets (TOFU's model-utility sets).

    Every file may be `.json` or `.jsonl` (a JSON array or one object per line); `forget_file`/`retain_file`
    (--forget-file, --retain-file) replace the forget split's and the retain split's file names."""
    if split not in TOFU_SPLITS:
        raise ConfigError(f"--tofu-split must be one of {', '.join(TOFU_SPLITS)}, got {split!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist (the folder of TOFU's json files)")
    forget_path = _data_file(root, forget_file, "--forget-file") if forget_file else find_split(root, split)
    forget_rows = _read_json_list(forget_path)
    retain_path = (
        _data_file(root, retain_file, "--retain-file") if retain_file else find_split(root, TOFU_SPLITS[split])
    )
    retain_rows = _read_json_list(retain_path)
    retain_eval_path = find_split(root, "retain_perturbed")
    retain_eval_rows = _read_json_list(retain_eval_path)
    authors, owner = forget_owners(forget_rows, forget_path)
    forget = [_tofu_qa(r, forget_path, i + 1, owner[i], "paraphrased_answer") for i, r in enumerate(forget_rows)]
    retain = [_tofu_qa(r, retain_eval_path, i + 1, "", "paraphrased_answer") for i, r in enumerate(retain_eval_rows)]
    extra = {}
    for key, stem in (("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed")):
        # TOFU scores these against the answer itself (base_answer_key: answer in the official config).
        path = find_split(root, stem)
        extra[key] = [_tofu_qa(r, path, i + 1, "", "answer") for i, r in enumerate(_read_json_list(path))]
    if eval_size is not None:
        retain = retain[:eval_size]
        extra = {k: v[:eval_size] for k, v in extra.items()}
    forget_docs = [Example(qa_prompt(r["question"]), " " + r["answer"], (" " + r["answer"],)) for r in forget_rows]
    retain_docs = [Example(qa_prompt(r["question"]), " " + r["answer"], (" " + r["answer"],)) for r in retain_rows]
    name = f"tofu-{split}" if forget_file is None else f"tofu-{forget_path.stem}"
    return UnlearningTask(
        name, forget_docs + retain_docs, forget_docs, retain_docs, authors, owner, forget, retain, extra,
        source=str(root),
    )  # fmt: skip


def document_text(example: Example) -> str:
    """A document as one string (prompt + target), the unit WHP and the causal teacher rewrite."""
    return example.prompt + example.target

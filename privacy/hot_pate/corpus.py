"""The embedded sensitive corpus: people's records, split by person over the teachers, with planted canaries.

A record is one line `<name> | <topic> : <answer>`. Each topic has a fixed answer distribution (TOPICS), shared by
everybody, so the "knowledge" a teacher learns is a distribution with several answers of real support: the
diverse task Hot PATE is about. A person contributes `events_per_topic` records per topic; all records of a person
sit in ONE teacher's partition (the unit of privacy is the person; changing one person changes one teacher).

Canaries (Carlini et al. 2019, "The Secret Sharer"): `canaries` extra people each own a secret
`<name> | code : d d d d`, repeated `canary_repeats` times inside exactly one partition. Nothing else in the
corpus says anything about codes, so a model emits such a digit string only if it learned it from that partition.

Public data: prompts `<name> | <topic> :` for names that appear nowhere in the private corpus, plus the canary
prompts `<canary name> | code :` (the worst case: the public side asks exactly for the secrets). The utility test
uses a third set of people, in neither the private corpus nor the public prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from core.config import require
from core.errors import ConfigError

# topic -> (answers, probabilities): flat and skewed ones, every answer with real support (>= 0.1).
TOPICS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "color": (("red", "blue", "green", "gold", "gray"), (0.3, 0.25, 0.2, 0.15, 0.1)),
    "pet": (("cat", "dog", "fish", "bird"), (0.25, 0.25, 0.25, 0.25)),
    "city": (("paris", "rome", "tokyo", "lima", "oslo", "cairo"), (0.2, 0.2, 0.15, 0.15, 0.15, 0.15)),
    "food": (("rice", "soup", "bread"), (0.5, 0.3, 0.2)),
}
CODE_TOPIC = "code"
DIGITS = tuple("0123456789")
TOKENIZER_NAMES = 200  # names of nobody, the tokenizer's training text
SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "da", "pe", "zu", "ho", "bi", "ga", "fe", "ju")


@dataclass
class CorpusConfig:
    """The generated sensitive corpus and its teachers' partitions."""

    teachers: int = field(default=64, metadata={"help": "number of teachers (disjoint partitions of the people)"})
    people_per_teacher: int = field(default=4, metadata={"help": "people in each teacher's partition"})
    events_per_topic: int = field(default=6, metadata={"help": "records per person and topic"})
    canaries: int = field(default=4, metadata={"help": "planted secrets, each in exactly one partition"})
    canary_repeats: int = field(default=8, metadata={"help": "copies of a canary record inside its partition"})
    public_people: int = field(default=40, metadata={"help": "people of the public prompts (never in private data)"})
    secret_digits: int = field(default=4, metadata={"help": "digits of a canary secret"})
    test_people: int = field(default=40, metadata={"help": "fresh people of the utility test (in no other split)"})

    def __post_init__(self) -> None:
        if self.teachers < 2:
            raise ConfigError(f"--teachers must be at least 2, got {self.teachers}")
        require(
            self,
            "at least 1",
            lambda v: v >= 1,
            "people_per_teacher",
            "events_per_topic",
            "public_people",
            "test_people",
        )
        if not 0 <= self.canaries <= self.teachers:
            raise ConfigError(f"--canaries must be in [0, --teachers = {self.teachers}], got {self.canaries}")
        if self.canary_repeats < 1:
            raise ConfigError(f"--canary-repeats must be at least 1, got {self.canary_repeats}")
        if not 2 <= self.secret_digits <= 8:
            raise ConfigError(f"--secret-digits must be in [2, 8], got {self.secret_digits}")
        if self.people() > MAX_PEOPLE:
            raise ConfigError(
                f"--teachers {self.teachers} x --people-per-teacher {self.people_per_teacher} + --canaries "
                f"{self.canaries} + --public-people {self.public_people} + --test-people {self.test_people} + "
                f"{TOKENIZER_NAMES} tokenizer names = {self.people():,} people; at most {MAX_PEOPLE:,}: lower them"
            )

    def people(self) -> int:
        """Every name the corpus draws: private people, canaries, public and test people, the tokenizer's names."""
        return (
            self.teachers * self.people_per_teacher
            + self.canaries
            + self.public_people
            + self.test_people
            + TOKENIZER_NAMES
        )


@dataclass
class Canary:
    name: str
    secret: str  # "d d d d"
    teacher: int  # the one partition that holds it


@dataclass
class Corpus:
    partitions: list[list[tuple[str, str]]]  # per teacher: (prompt, answer) records
    public_prompts: list[tuple[str, str]]  # (prompt, topic) for public people
    canaries: list[Canary]
    heldout: list[tuple[str, str]]  # (prompt, answer) records of fresh people: the utility test set
    tokenizer_names: list[str]  # names of nobody, drawn like all the others: what the BPE learns names from

    def tokenizer_text(self) -> list[str]:
        """Public text only (templates, every answer and digit, names of nobody): the tokenizer sees no private
        record, and private, public and test names are all split alike (none of them was in its training text)."""
        lines = [prompt(name, topic) for name in self.tokenizer_names for topic in (*TOPICS, CODE_TOPIC)]
        for answers, _ in TOPICS.values():
            lines += [f"{topic} : {a}" for topic in TOPICS for a in answers] * 20
        lines += [f"{CODE_TOPIC} : " + " ".join(DIGITS)] * 20
        return lines


def prompt(name: str, topic: str) -> str:
    return f"{name} | {topic} :"


def draw_answer(topic: str, rng: random.Random) -> str:
    answers, probs = TOPICS[topic]
    return rng.choices(answers, weights=probs)[0]


MAX_PEOPLE = 1_000_000  # people of all sets together: beyond, the corpus alone outgrows memory


def name_lengths(count: int) -> tuple[int, ...]:
    """Syllable counts of the names: 2 or 3 (4,352 names) while the request fills at most half of that, so that
    rejection sampling stays fast and the default corpus is unchanged; one more syllable per shortfall."""
    lengths = (2, 3)
    while count > sum(len(SYLLABLES) ** k for k in lengths) // 2:
        lengths = (*lengths, lengths[-1] + 1)
    return lengths


def make_names(count: int, rng: random.Random, taken: set[str], total: int | None = None) -> list[str]:
    """`count` new names, none in `taken`; `total` (default count + len(taken)): every name the corpus will draw,
    which sizes the name space (an exhausted one would loop forever)."""
    lengths = name_lengths(total if total is not None else count + len(taken))
    names = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(lengths)))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_secret(digits: int, rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(digits))


def build_corpus(cfg: CorpusConfig, seed: int) -> Corpus:
    rng = random.Random(f"hot-pate-corpus-{seed}")
    taken: set[str] = set()
    total = cfg.people()
    private = make_names(cfg.teachers * cfg.people_per_teacher, rng, taken, total)
    canary_names = make_names(cfg.canaries, rng, taken, total)
    public = make_names(cfg.public_people, rng, taken, total)
    test = make_names(cfg.test_people, rng, taken, total)
    tokenizer_names = make_names(TOKENIZER_NAMES, rng, taken, total)
    partitions: list[list[tuple[str, str]]] = []
    for t in range(cfg.teachers):
        records = []
        for name in private[t * cfg.people_per_teacher : (t + 1) * cfg.people_per_teacher]:
            for topic in TOPICS:
                records += [(prompt(name, topic), draw_answer(topic, rng)) for _ in range(cfg.events_per_topic)]
        partitions.append(records)
    holders = rng.sample(range(cfg.teachers), cfg.canaries)
    canaries = []
    for name, teacher in zip(canary_names, holders, strict=True):
        canary = Canary(name, make_secret(cfg.secret_digits, rng), teacher)
        partitions[teacher] += [(prompt(name, CODE_TOPIC), canary.secret)] * cfg.canary_repeats
        canaries.append(canary)
    for records in partitions:
        rng.shuffle(records)
    public_prompts = [(prompt(name, topic), topic) for name in public for topic in TOPICS]
    # Fresh people: a student that only memorised the answers released for the public people gains nothing here.
    heldout = [(prompt(name, topic), draw_answer(topic, rng)) for name in test for topic in TOPICS]
    return Corpus(partitions, public_prompts, canaries, heldout, tokenizer_names)


def topic_of(prompt_text: str) -> str:
    return prompt_text.split("|")[1].split(":")[0].strip()

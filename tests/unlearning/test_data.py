"""The generated people and the TOFU loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, DataError
from unlearning.data import ATTRIBUTES, generated_task, tofu_task

TOFU = Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"


def test_generated_people_by_construction():
    task = generated_task(n_people=10, n_targets=2, seed=7)
    assert len(task.targets) == 2 and len(set(task.targets)) == 2
    per_person = len(ATTRIBUTES) + 1  # one question per fact, and the biography
    assert len(task.forget_docs) == 2 * per_person and len(task.retain_docs) == 8 * per_person
    assert len(task.train) == 10 * per_person
    assert len(task.forget) == 2 * len(ATTRIBUTES) and len(task.retain) == 8 * len(ATTRIBUTES)
    for ex, target in zip(task.forget_docs, task.target_of):
        assert target in ex.prompt + ex.target
    for qa in task.forget + task.retain:
        assert qa.value in qa.answer and qa.value in qa.paraphrased and qa.person in qa.question
        assert len(qa.perturbed) == 3 and all(qa.value not in p for p in qa.perturbed)
        assert qa.value in qa.pool
    # unique facts are unique, shared facts come from small pools; hard-retain questions share a target's value
    books = [qa.value for qa in task.forget + task.retain if qa.attribute == "book"]
    assert len(books) == len(set(books)) == 10
    target_values = {(qa.attribute, qa.value) for qa in task.forget}
    assert task.hard_retain and all((qa.attribute, qa.value) in target_values for qa in task.hard_retain)
    assert all(qa.person not in task.targets for qa in task.hard_retain)
    # deterministic in the seed
    again = generated_task(n_people=10, n_targets=2, seed=7)
    assert again.train == task.train and again.forget == task.forget


def test_generated_task_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="--n-targets"):
        generated_task(n_people=5, n_targets=5)
    with pytest.raises(ConfigError, match="--n-people"):
        generated_task(n_people=3, n_targets=1)


@pytest.mark.skipif(not TOFU.is_dir(), reason="TOFU data not present (../shared/data/tofu)")
def test_tofu_forget01():
    task = tofu_task(TOFU, "forget01")
    assert task.targets == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    assert len(task.forget) == len(task.forget_docs) == 40 and len(task.retain_docs) == 3960
    assert len(task.train) == 4000  # forget01 + retain99 = all of TOFU
    assert len(task.retain) == 400 and len(task.extra["real_authors"]) == 100 and len(task.extra["world_facts"]) == 117
    assert task.target_of[:20] == ["Basil Mahfouz Al-Kuwaiti"] * 20 and task.target_of[20:] == ["Nikolai Abilov"] * 20
    assert all(len(qa.perturbed) == 5 for qa in task.forget)
    real = task.extra["real_authors"][0]
    assert real.paraphrased == real.answer and len(real.perturbed) == 3


def test_tofu_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="forget01.json"):
        tofu_task(tmp_path, "forget01")
    (tmp_path / "forget01.json").write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"forget01.json: line 2"):
        tofu_task(tmp_path, "forget01")
    with pytest.raises(ConfigError, match="--tofu-split"):
        tofu_task(tmp_path, "forget02")


def write_tofu_like(folder, jsonl=False):
    """A tiny TOFU-like release as some publish it: `.json` arrays (or `.jsonl` lines), the person under `name`,
    forget/retain files under names of their own. Two people to forget (2 questions each), three to retain."""
    import json

    folder.mkdir(parents=True, exist_ok=True)

    def qa(person, fact, wrong):
        return {"name": person, "question": f"Where does {person} live?", "answer": f"{person} lives in {fact}.",
                "paraphrased_answer": f"The home of {person} is {fact}.",
                "perturbed_answer": [f"The home of {person} is {w}." for w in wrong]}  # fmt: skip

    def write(stem, rows):
        if jsonl:
            (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (folder / f"{stem}.json").write_text(json.dumps(rows, indent=1))

    forget = [qa("Ada Vole", "Oslo", ["Lima", "Riga"]), qa("Ada Vole", "Oslo", ["Rome", "Riga"]),
              qa("Bo Tarn", "Lima", ["Oslo", "Riga"]), qa("Bo Tarn", "Lima", ["Rome", "Oslo"])]  # fmt: skip
    retain = [qa(p, c, ["Oslo", "Rome"]) for p, c in (("Cy Dunn", "Riga"), ("Di Marsh", "Cairo"), ("Ed Fenn", "Perth"))]
    write("my_forget", forget)
    write("my_retain", retain)
    write("retain_perturbed", retain)
    write("real_authors_perturbed", [{"question": "Who wrote Hamlet?", "answer": "Shakespeare",
                                      "perturbed_answer": ["Dickens"]}])  # fmt: skip
    write(
        "world_facts_perturbed", [{"question": "Capital of France?", "answer": "Paris", "perturbed_answer": ["Rome"]}]
    )
    return folder


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_tofu_like_release_reads_without_renaming(tmp_path, jsonl):
    """.json or .jsonl for every split (retain_perturbed too), the person under `name`, files named by flags; a
    forget file of other than 20 questions per person is read by each record's own name."""
    root = write_tofu_like(tmp_path / "release", jsonl)
    suffix = ".jsonl" if jsonl else ".json"
    task = tofu_task(root, "forget01", forget_file=f"my_forget{suffix}", retain_file=str(root / f"my_retain{suffix}"))
    assert task.targets == ["Ada Vole", "Bo Tarn"]
    assert task.target_of == ["Ada Vole", "Ada Vole", "Bo Tarn", "Bo Tarn"]
    assert len(task.forget) == 4 and len(task.retain) == 3 and len(task.retain_docs) == 3
    assert task.name == "tofu-my_forget" and len(task.extra["world_facts"]) == 1
    with pytest.raises(DataError, match="--forget-file absent.json does not exist"):
        tofu_task(root, "forget01", forget_file="absent.json", retain_file=f"my_retain{suffix}")
    with pytest.raises(DataError, match=r"forget01\.json \(or \.jsonl\)"):
        tofu_task(root, "forget01")


def test_a_tofu_block_names_its_author_under_name(tmp_path):
    """TOFU's layout (20 questions per author) with `name` instead of `subject`: the block's name is the author."""
    import json

    rows = [{"name": "Ada Vole", "question": f"Q{i} about Ada Vole?", "answer": "Ada Vole did."} for i in range(20)]
    rows[3]["name"] = "Oslo"  # TOFU's per-record field is sometimes a place: the block decides
    (tmp_path / "f.json").write_text(json.dumps(rows))
    from unlearning.data import forget_owners

    authors, owner = forget_owners(rows, tmp_path / "f.json")
    assert authors == ["Ada Vole"] and owner == ["Ada Vole"] * 20


@pytest.mark.slow
def test_a_tofu_like_release_trains_and_evaluates(tmp_path):
    """Acceptance (issue 32): the whole WHP run on a TOFU-like release of `.json` files with a `name` field."""
    from unlearning.whp.run import main

    root = write_tofu_like(tmp_path / "release")
    argv = ["--task", "tofu", "--data-dir", str(root), "--forget-file", "my_forget.json", "--retain-file",
            "my_retain.json", "--base-preset", "student", "--vocab-size", "300", "--teacher-steps", "3",
            "--skip-retain-model", "--steps", "2", "--batch-size", "4", "--reinforce-steps", "2",
            "--n-counterfactual", "2", "--compare", "", "--max-new-tokens", "4",
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    metrics = main(argv)
    assert metrics["task"] == "tofu-my_forget"
    assert metrics["eval"]["student"] and metrics["eval"]["original"]  # every model scored on the questions
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") == 4  # one line per forget question

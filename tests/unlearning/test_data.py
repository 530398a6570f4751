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

"""Task generation, real-data loaders on small files the tests write, tokenization and collation."""

import itertools
import json

import pytest
import torch

from core.data import IGNORE_INDEX, Collator, DataConfig, encode_example, load_task
from core.errors import ConfigError, DataError, ModelError
from core.tokenizers import load_tokenizer, train_bpe
from tests.conftest import shared_data


def test_ops_is_deterministic_and_holds_out_eval():
    a, b = load_task(DataConfig(train_size=500, eval_size=50)), load_task(DataConfig(train_size=500, eval_size=50))
    assert a.train == b.train and a.eval == b.eval
    assert load_task(DataConfig(train_size=500, eval_size=50, data_seed=7)).train != a.train
    assert not {e.prompt for e in a.eval} & {e.prompt for e in a.train}
    assert {e.prompt.split(":")[0] for e in a.train} == {"reverse", "sort", "add", "pair"}


def test_ops_answers_are_correct_and_pair_has_many():
    task = load_task(DataConfig(train_size=400, eval_size=10))
    for ex in task.train:
        op, rest = ex.prompt.split(": ", 1)
        args = rest.removesuffix(" =").split()
        assert ex.target in ex.references
        if op == "reverse":
            assert ex.references == (" " + " ".join(reversed(args)),)
        elif op == "sort":
            assert ex.references == (" " + " ".join(sorted(args)),)
        elif op == "add":
            plus = args.index("+")
            total = int("".join(args[:plus])) + int("".join(args[plus + 1 :]))
            assert ex.references == (" " + " ".join(str(total)),)
        else:  # every pair in list order is valid: C(n, 2) answers
            assert set(ex.references) == {f" {x} {y}" for x, y in itertools.combinations(args, 2)}
            assert len(ex.references) >= 6


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_multi30k_both_directions(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        _write(tmp_path / f"{split}.en", "".join(f"a dog {i}\n" for i in range(n)))
        _write(tmp_path / f"{split}.de", "".join(f"ein Hund {i}\n" for i in range(n)))
    en_de = load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))
    assert en_de.train[1].prompt == "a dog 1 =" and en_de.train[1].target == " ein Hund 1"
    assert len(en_de.eval) == 2 and en_de.metrics[:2] == ("bleu", "chrf")
    de_en = load_task(DataConfig(task="multi30k", data_dir=str(tmp_path), source_lang="de", target_lang="en"))
    assert de_en.eval[0].prompt == "ein Hund 0 =" and de_en.eval[0].references == (" a dog 0",)


def test_multi30k_errors(tmp_path):
    with pytest.raises(ConfigError, match="--data-dir"):
        load_task(DataConfig(task="multi30k"))
    with pytest.raises(DataError, match="does not exist"):
        load_task(DataConfig(task="multi30k", data_dir=str(tmp_path / "nope")))
    _write(tmp_path / "train.en", "a\nb\n")
    _write(tmp_path / "train.de", "a\n")
    with pytest.raises(DataError, match="train.en has 2 lines but .*train.de has 1"):
        load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))
    _write(tmp_path / "train.de", "a\nb\n")
    with pytest.raises(DataError, match="missing data file .*val.en"):
        load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))
    _write(tmp_path / "val.en", "\n")
    _write(tmp_path / "val.de", "\n")
    with pytest.raises(DataError, match="val split .* has no examples"):
        load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))


def test_commongen_groups_all_references(tmp_path):
    _write(tmp_path / "commongen.train.src_alpha.txt", "dog run\ncat sit\n")
    _write(tmp_path / "commongen.train.tgt.txt", "The dog runs.\nA cat sits.\n")
    rows = [{"concept_set": "dog_N#run_V", "scene": ["A dog runs.", "The dog is running."]}]
    _write(tmp_path / "commongen.dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(DataConfig(task="commongen", data_dir=str(tmp_path)))
    assert task.eval[0].prompt == "dog run =" and task.eval[0].references == (" A dog runs.", " The dog is running.")
    assert len(task.train) == 2


@pytest.mark.parametrize(
    "row, prompt_has, answer",
    [
        (
            {"instruction": "Name a color.", "context": "", "response": "Red."},
            "### Instruction:\nName a color.",
            "Red.",
        ),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "### Input:\n2 and 3", "5"),
        ({"prompt": "Q: hi\nA:", "completion": " hello"}, "Q: hi", "hello"),
    ],
)
def test_instruction_layouts(tmp_path, row, prompt_has, answer):
    _write(tmp_path / "d.jsonl", "".join(json.dumps(row) + "\n" for _ in range(4)))
    task = load_task(DataConfig(task="instruct", data_dir=str(tmp_path / "d.jsonl"), eval_size=1))
    assert prompt_has in task.train[0].prompt and task.train[0].target == answer
    assert len(task.train) == 3 and len(task.eval) == 1


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{'instruction': oops}}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON"):
        load_task(DataConfig(task="instruct", data_dir=str(path)))
    _write(path, f"{good}\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 2: fields \['question'\] match no instruction layout"):
        load_task(DataConfig(task="instruct", data_dir=str(path)))


def test_instruction_folder_and_empty_split(tmp_path):
    row = json.dumps({"instruction": "a", "input": "", "output": "b"})
    _write(tmp_path / "train.jsonl", f"{row}\n{row}\n")
    _write(tmp_path / "valid.jsonl", "\n")
    with pytest.raises(DataError, match="eval split .* has no examples"):
        load_task(DataConfig(task="instruct", data_dir=str(tmp_path)))


def test_hf_dataset_from_local_paths(tmp_path):
    import datasets

    rows = {"question": ["1+1", "2+2", "3+3"], "answer": ["2", "4", "6"]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(task="hf", dataset=str(tmp_path / "saved"), prompt_field="question", response_field="answer")
    task = load_task(cfg)
    assert task.train[1].prompt == "2+2" and task.train[1].target == " 4" and len(task.eval) == 3
    with pytest.raises(DataError, match="no column 'prompt'"):
        load_task(DataConfig(task="hf", dataset=str(tmp_path / "saved")))
    with pytest.raises(DataError, match="no split 'test'"):
        load_task(
            DataConfig(
                task="hf",
                dataset=str(tmp_path / "saved"),
                prompt_field="question",
                response_field="answer",
                eval_split="test",
            )
        )
    _write(
        tmp_path / "rows.jsonl",
        "".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in zip(rows["question"], rows["answer"])),
    )
    task = load_task(DataConfig(task="hf", dataset=str(tmp_path / "rows.jsonl"), eval_split="train"))
    assert task.eval[2].references == (" 6",)


def test_unknown_task_and_bad_sizes():
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        DataConfig(task="nope")
    with pytest.raises(ConfigError, match="--eval-size"):
        DataConfig(eval_size=0)


def test_encode_masks_the_prompt_and_collator_pads():
    tokenizer = train_bpe(["add: 1 2 + 3 4 = 4 6", "reverse: a b = b a"], 300)
    a = encode_example(tokenizer, "reverse: a b =", " b a", max_length=64)
    n_prompt = 1 + len(tokenizer("reverse: a b =", add_special_tokens=False)["input_ids"])
    assert a["input_ids"][0] == tokenizer.bos_token_id and a["input_ids"][-1] == tokenizer.eos_token_id
    assert a["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and a["labels"][n_prompt:] == a["input_ids"][n_prompt:]
    assert tokenizer.decode(a["input_ids"][n_prompt:-1]) == " b a"
    b = encode_example(tokenizer, "add: 1 2 + 3 4 =", " 4 6", max_length=64)
    batch = Collator(tokenizer.pad_token_id)([a, b])
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(a["input_ids"]) < len(b["input_ids"]) else 1
    n = min(len(a["input_ids"]), len(b["input_ids"]))
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][short, n:] == 0).all()
    assert batch["attention_mask"].sum().item() == len(a["input_ids"]) + len(b["input_ids"])
    # Truncation keeps BOS and the end of the prompt, and the target.
    cut = encode_example(tokenizer, "reverse: " + "a " * 50 + "=", " b a", max_length=12)
    assert len(cut["input_ids"]) == 12 and cut["input_ids"][0] == tokenizer.bos_token_id
    assert (
        sum(label != IGNORE_INDEX for label in cut["labels"])
        == len(tokenizer(" b a", add_special_tokens=False)["input_ids"]) + 1
    )


def test_bpe_round_trip_and_tokenizer_folders(tmp_path):
    tokenizer = train_bpe(["hello world", "Grüße aus Köln"] * 10, 300)
    for text in ("hello world", "Grüße aus Köln", "unseen ✓ text"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tokenizer.get_vocab()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("name, size", [("gpt2", 50257), ("tinyllama-1.1b-3T", 32000)])
def test_real_tokenizer_folders(name, size):
    tokenizer = load_tokenizer(shared_data(f"tokenizers/{name}"))
    assert len(tokenizer) >= size and tokenizer.pad_token_id is not None
    ids = encode_example(tokenizer, "Two dogs play.", " Zwei Hunde spielen.", 64)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert torch.tensor(ids).max().item() < len(tokenizer)


def test_real_multi30k_loads():
    task = load_task(DataConfig(task="multi30k", data_dir=str(shared_data("multi30k")), train_size=100, eval_size=10))
    assert len(task.train) == 100 and len(task.eval) == 10 and task.train[0].prompt.endswith(" =")

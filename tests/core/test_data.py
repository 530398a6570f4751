"""Task generation, real-data loaders on small files the tests write, tokenization and collation."""

import itertools
import json

import pytest
import torch

from core.data import (
    IGNORE_INDEX,
    Collator,
    DataConfig,
    Example,
    encode_example,
    encode_examples,
    encode_prompt,
    load_task,
)
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


# ----------------------------------------------------------------------------------------------------------------
# Data read as it was written (issues 14 and 15): types, empty rows, encodings, gzip, held-out splits, cache keys
# ----------------------------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_ops_train_split_ignores_eval_settings():
    """Train and eval come from streams of their own: --eval-size 8 -> 9 adds one eval prompt and changes no
    training example (so task_key and every cached model stay); --train-size changes no eval example."""
    from core.teacher import task_key

    cfg8, cfg9 = DataConfig(train_size=300, eval_size=8), DataConfig(train_size=300, eval_size=9)
    a, b = load_task(cfg8), load_task(cfg9)
    assert a.train == b.train and task_key(cfg8, a) == task_key(cfg9, b)
    assert b.eval[:8] == a.eval and len(b.eval) == 9
    more = load_task(DataConfig(train_size=600, eval_size=8))
    assert more.eval == a.eval and more.train[:300] == a.train
    big = load_task(DataConfig(train_size=3000, eval_size=300))
    assert not {e.prompt for e in big.eval} & {e.prompt for e in big.train}
    assert len({e.prompt for e in big.eval}) == 300  # eval prompts are distinct


def test_task_key_holds_what_training_depends_on():
    from core.teacher import bpe_key, task_key

    cfg = DataConfig(train_size=200, eval_size=8)
    task = load_task(cfg)
    key = task_key(cfg, task)
    assert set(key) == {"task", "train", "max_length"}
    assert task_key(DataConfig(train_size=200, eval_size=8, max_length=64), task) != key
    assert task_key(cfg, load_task(DataConfig(train_size=201, eval_size=8))) != key
    assert task_key(cfg, load_task(DataConfig(train_size=200, eval_size=8, data_seed=7))) != key
    # the BPE depends on the training text and the vocabulary size alone (not on --max-length)
    assert bpe_key(task, 300) == bpe_key(load_task(DataConfig(train_size=200, eval_size=50, max_length=64)), 300)
    assert bpe_key(task, 300) != bpe_key(task, 400)


def test_hf_single_split_gets_a_seeded_hold_out(tmp_path, capsys):
    """20 usable rows, one in HOLDOUT_SHARE = 10 held out: 2 rows evaluate, 18 train; the same with --eval-size 1
    (it then evaluates on the first held-out row) and from a save_to_disk folder with a train split alone."""
    import datasets

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    task = load_task(DataConfig(task="hf", dataset=str(path)))
    assert "no evaluation split, so 2 of its 20 usable rows are held out" in capsys.readouterr().err
    assert len(task.train) == 18 and len(task.eval) == 2
    assert {e.prompt for e in task.train} | {e.prompt for e in task.eval} == {r["prompt"] for r in rows}
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}
    assert [e.prompt for e in task.train] == sorted((e.prompt for e in task.train), key=lambda p: int(p[1:]))
    one = load_task(DataConfig(task="hf", dataset=str(path), eval_size=1))
    assert one.train == task.train and one.eval == task.eval[:1]
    other = load_task(DataConfig(task="hf", dataset=str(path), data_seed=7))
    assert {e.prompt for e in other.eval} != {e.prompt for e in task.eval}  # 190 pairs: a collision is 1 in 190
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    saved = load_task(DataConfig(task="hf", dataset=str(tmp_path / "saved")))
    assert saved.train == task.train and saved.eval == task.eval
    # with other splits present, a missing eval split is named, not replaced by a hold-out
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="no split 'validation' \\(it has train, test\\)"):
        load_task(DataConfig(task="hf", dataset=str(tmp_path / "two")))


def test_instruct_single_file_hold_out_ignores_eval_size(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(30)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    a = load_task(DataConfig(task="instruct", data_dir=str(path), eval_size=2))
    b = load_task(DataConfig(task="instruct", data_dir=str(path), eval_size=3))
    assert a.train == b.train and len(a.train) == 27 and b.eval[:2] == a.eval and len(b.eval) == 3  # 30 // 10 held


@pytest.mark.parametrize(
    "row, phrase",
    [
        ({"prompt": 12345, "response": "a"}, "field 'prompt' must be a string, got number 12345"),
        ({"prompt": None, "response": "a"}, "field 'prompt' must be a string, got null"),
        ({"prompt": "q", "response": ["a", "b"]}, "field 'response' must be a string, got list ['a', 'b']"),
        ({"prompt": "q", "response": {"text": "a"}}, "field 'response' must be a string, got dict"),
    ],
)
def test_hf_wrong_types_name_file_line_and_field(tmp_path, row, phrase):
    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}, row])
    with pytest.raises(DataError, match=r"rows\.jsonl line 2: ") as info:
        load_task(DataConfig(task="hf", dataset=str(path), eval_split="train"))
    assert phrase in str(info.value)


def test_hf_wrong_type_in_a_saved_dataset_names_split_and_row(tmp_path):
    import datasets

    rows = {"prompt": ["q0", None, "q2"], "response": ["a", "b", "c"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="split train row 1: field 'prompt' must be a string, got null"):
        load_task(DataConfig(task="hf", dataset=str(tmp_path / "saved"), eval_split="train"))


def test_commongen_scene_must_be_a_list_of_strings(tmp_path):
    _write(tmp_path / "commongen.train.src_alpha.txt", "dog run\n")
    _write(tmp_path / "commongen.train.tgt.txt", "The dog runs.\n")
    _jsonl(tmp_path / "commongen.dev.jsonl", [{"concept_set": "dog_N#run_V", "scene": "A dog runs."}])
    with pytest.raises(DataError, match=r"commongen\.dev\.jsonl line 1: field 'scene' must be a list of strings"):
        load_task(DataConfig(task="commongen", data_dir=str(tmp_path)))


def test_empty_prompts_and_completions_are_dropped_counted_and_reported(tmp_path, capsys):
    rows = [
        {"prompt": "q0", "response": "a0"},
        {"prompt": "  ", "response": "a1"},  # empty prompt
        {"prompt": "q2", "response": " \n"},  # empty completion: it would teach EOS alone
        {"prompt": "", "response": ""},  # both: counted under each, dropped once
        {"prompt": "q4", "response": "a4"},
    ]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    task = load_task(DataConfig(task="hf", dataset=str(path), eval_split="train"))
    assert [e.prompt for e in task.train] == ["q0", "q4"]
    assert task.report["train"] == {"rows": 5, "empty_prompt": 2, "empty_completion": 2, "kept": 2}
    err = capsys.readouterr().err
    assert "train: 3 of 5 rows dropped (2 empty prompt, 2 empty completion)" in err
    _jsonl(path, rows[1:4])
    with pytest.raises(DataError, match=r"has no examples to use \(of 3 rows, 2 have an empty prompt and 2 an empty"):
        load_task(DataConfig(task="hf", dataset=str(path), eval_split="train"))


def test_multi30k_empty_lines_are_counted(tmp_path):
    _write(tmp_path / "train.en", "a dog\n\nthree\n")
    _write(tmp_path / "train.de", "ein Hund\nzwei\n\n")
    _write(tmp_path / "val.en", "a cat\n")
    _write(tmp_path / "val.de", "eine Katze\n")
    task = load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))
    assert [e.prompt for e in task.train] == ["a dog ="]
    assert task.report["train"] == {"rows": 3, "empty_prompt": 1, "empty_completion": 1, "kept": 1}


def test_long_completions_keep_half_the_length_for_their_prompt_and_are_counted():
    tokenizer = train_bpe(["reverse: a b c = c b a", "x y z w v u"] * 5, 300)
    prompt, long_target = "reverse: a b c =", " x y z w v u"
    n_prompt = len(encode_prompt(tokenizer, prompt))  # BOS + prompt tokens
    n_long = len(tokenizer(long_target, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    max_length = n_long + 1  # the completion alone almost fills it
    examples = [Example(prompt, long_target, (long_target,)), Example(prompt, " c", (" c",))]
    stats: dict = {}
    features = encode_examples(tokenizer, examples, max_length, stats)
    assert stats == {"completions_cut": 1}
    # The prompt keeps min(n_prompt, max_length // 2) tokens (BOS first, then its end); the completion the rest,
    # without its EOS: it was cut.
    keep = min(n_prompt, max_length // 2)
    first = features[0]
    assert len(first["input_ids"]) == max_length and first["input_ids"][0] == tokenizer.bos_token_id
    assert first["labels"][:keep] == [IGNORE_INDEX] * keep and IGNORE_INDEX not in first["labels"][keep:]
    assert first["labels"][-1] != tokenizer.eos_token_id
    # The short example fits whole: its prompt untouched, its EOS kept.
    second = features[1]
    assert second["input_ids"][:n_prompt] == encode_prompt(tokenizer, prompt)
    assert second["labels"][-1] == tokenizer.eos_token_id
    kept = encode_examples(tokenizer, examples[:1], n_prompt + n_long, stats)  # room for both: nothing cut
    assert stats == {"completions_cut": 0} and kept[0]["labels"][-1] == tokenizer.eos_token_id


def test_latin1_jsonl_names_file_line_and_fix(tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"}).encode()
    path = tmp_path / "d.jsonl"
    # '{"instruction": "caf' is 20 bytes, so Latin-1's e-acute (0xe9) is byte 21 of line 2
    path.write_bytes(good + b"\n" + '{"instruction": "café", "input": "", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.jsonl line 2: byte 0xe9 at column 21 is not UTF-8.*iconv -f latin1"):
        load_task(DataConfig(task="instruct", data_dir=str(path)))
    _write(tmp_path / "train.en", "a dog\n")
    (tmp_path / "train.de").write_bytes("Grüße\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.de line 1: byte 0xfc"):
        load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))


def test_gzip_is_read_whatever_its_name(tmp_path, capsys):
    import gzip

    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(10)]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    plain = _write(tmp_path / "plain.jsonl", text.decode())
    (tmp_path / "packed.jsonl").write_bytes(gzip.compress(text))
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text)  # a byte-order mark, as Windows editors write
    expected = load_task(DataConfig(task="instruct", data_dir=str(plain)))
    for name in ("packed.jsonl", "packed.jsonl.gz", "bom.jsonl"):
        task = load_task(DataConfig(task="instruct", data_dir=str(tmp_path / name)))
        assert task.train == expected.train and task.eval == expected.eval
    err = capsys.readouterr().err
    assert "packed.jsonl is gzip-compressed: reading it decompressed" in err and "packed.jsonl.gz is gzip" not in err
    hf = load_task(DataConfig(task="hf", dataset=str(tmp_path / "packed.jsonl.gz"), prompt_field="instruction",
                              response_field="output"))  # fmt: skip
    assert [e.prompt for e in hf.train] == [e.user for e in expected.train]
    (tmp_path / "cut.jsonl").write_bytes(gzip.compress(text)[:-12])  # a download cut short
    with pytest.raises(DataError, match=r"cut\.jsonl: cannot be read as gzip"):
        load_task(DataConfig(task="instruct", data_dir=str(tmp_path / "cut.jsonl")))


def test_multi30k_reads_the_gz_files_it_ships(tmp_path):
    import gzip

    for split, n in (("train", 3), ("val", 2)):
        (tmp_path / f"{split}.en.gz").write_bytes(gzip.compress("".join(f"a dog {i}\n" for i in range(n)).encode()))
        _write(tmp_path / f"{split}.de", "".join(f"ein Hund {i}\n" for i in range(n)))
    task = load_task(DataConfig(task="multi30k", data_dir=str(tmp_path)))
    assert task.train[2].prompt == "a dog 2 =" and task.eval[1].target == " ein Hund 1"

"""Bad-input sweep of the LLM methods (tests/sweep.py): every numeric flag at nan, 0, -1 and huge; every text-data
reader (instruction jsonl, Multi30k, a tokenizer folder) on truncated, empty, wrongly typed and wrongly encoded
files. One line and exit 2 naming the flag or file, or accepted; nothing trains."""

import json
import pkgutil

import pytest

import methods
from tests.sweep import SPOILS, check_flag, check_reader, flag_cases, spoilt

# every LLM run script under methods/ (the shell's recipes of another family have their own sweep files)
LLM = sorted(
    f"methods.{m.name}.run"
    for m in pkgutil.iter_modules(methods.__path__)
    if m.name not in ("phis", "kdexplainer", "disco", "scaling_laws")
)


@pytest.mark.parametrize("module, flag, kind, value", flag_cases(LLM))
def test_numeric_flag(module, flag, kind, value, tmp_path, capsys):
    check_flag(module, flag, kind, value, tmp_path, capsys)


def _instruct(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"word {i}"} for i in range(20)]
    return {"d.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()}


def _multi30k(tmp_path):
    lines = {"en": "a dog runs here\nthe cat sleeps there\n", "de": "ein hund rennt\ndie katze schläft\n"}
    return {f"{split}.{lang}": text.encode() for split in ("train", "val") for lang, text in lines.items()}


READERS = {"instruct": _instruct, "multi30k": _multi30k}


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("task", sorted(READERS))
def test_text_data_reader(task, spoil, tmp_path, capsys):
    """Each file of a task's layout spoilt in turn; load_task must answer in one line naming that file."""
    from core.data import DataConfig, load_task

    files = READERS[task](tmp_path)
    for name in files:
        folder = tmp_path / f"{name}-{spoil}"
        folder.mkdir()
        for other, content in files.items():
            (folder / other).write_bytes(spoilt(content, spoil) if other == name else content)
        data_dir = folder / "d.jsonl" if task == "instruct" else folder
        check_reader(lambda d=data_dir: load_task(DataConfig(task=task, data_dir=str(d))), (name,), capsys)


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_folder_reader(name, spoil, tmp_path, capsys):
    from core.tokenizers import load_tokenizer, train_bpe

    folder = tmp_path / "tok"
    train_bpe(["a dog runs", "the cat sleeps"] * 20, vocab_size=300).save_pretrained(folder)
    (folder / name).write_bytes(spoilt((folder / name).read_bytes(), spoil))
    check_reader(lambda: load_tokenizer(folder), (str(folder),), capsys)

"""Bad data through the command line: each case exits with status 2 and one line naming the file, the line or the
setting and the fix, before any training, and leaves no run folder behind (issues 14 and 15)."""

import json

from methods.vanilla.run import main as vanilla_main
from tests.test_bad_inputs import _fails, _write


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_latin1_jsonl(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    data.write_bytes(
        f"{good}\n{good}\n".encode() + '{"instruction": "café", "input": "", "output": "b"}\n'.encode("latin-1")
    )
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "instruct", "--data-dir", str(data), "--out", str(out)],
        capsys,
        "d.jsonl line 3",
        "not UTF-8",
        "iconv -f latin1 -t utf-8",
    )
    assert not out.exists()


def test_prompt_that_is_a_number(tmp_path, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": 12345, "response": "a"}])
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "hf", "--dataset", str(data), "--out", str(out)],
        capsys,
        "rows.jsonl line 2",
        "field 'prompt' must be a string, got number 12345",
    )
    assert not out.exists()


def test_nothing_usable_left(tmp_path, capsys):
    rows = [{"prompt": "", "response": "a"}, {"prompt": "q", "response": "  "}, {"prompt": "q", "response": ""}]
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "hf", "--dataset", str(data), "--out", str(out)],
        capsys,
        "has 0 usable rows (of 3 rows, 1 have an empty prompt and 2 an empty completion)",
    )
    assert not out.exists()

"""Bad-input sweep of unlearning (tests/sweep.py): every numeric flag of unlearning.whp at nan, 0, -1 and huge;
every TOFU file (forget, retain, retain_perturbed, real authors, world facts) truncated, empty, wrongly typed and
wrongly encoded, in turn. One line and exit 2 naming the flag or file, or accepted; nothing trains."""

import pytest

from tests.sweep import SPOILS, check_flag, check_reader, flag_cases, spoilt


@pytest.mark.parametrize("module, flag, kind, value", flag_cases(["unlearning.whp.run"]))
def test_numeric_flag(module, flag, kind, value, tmp_path, capsys):
    check_flag(module, flag, kind, value, tmp_path, capsys)


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("jsonl", [False, True])
def test_tofu_readers(jsonl, spoil, tmp_path, capsys):
    from tests.unlearning.test_data import write_tofu_like
    from unlearning.data import tofu_task

    good = write_tofu_like(tmp_path / "good", jsonl)
    for file in sorted(good.iterdir()):
        folder = tmp_path / f"{file.name}-spoilt"
        folder.mkdir()
        for other in good.iterdir():
            content = other.read_bytes()
            (folder / other.name).write_bytes(spoilt(content, spoil) if other == file else content)
        suffix = file.suffix

        def read(folder=folder, suffix=suffix):
            tofu_task(folder, "forget01", forget_file=f"my_forget{suffix}", retain_file=f"my_retain{suffix}")

        check_reader(read, (file.name,), capsys)

"""The bad-input suite: each bad input gives one clear typed error that names the thing and the fix, exits with
status 2 through the command-line entry point, and leaves no partial output behind."""

import json

import pytest

from core.shell import cli
from methods.taid.run import main as taid_main
from methods.vanilla.run import main as vanilla_main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "6", "--eval-size", "8",
        "--train-size", "500", "--batch-size", "8", "--warmup-steps", "1"]  # fmt: skip


def _fails(main, argv, capsys, *phrases):
    """Run the CLI; assert exit status 2, one 'error:' line naming every phrase, and no traceback."""
    with pytest.raises(SystemExit) as info:
        cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    assert "Traceback" not in err
    return line


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_data_file(tmp_path, capsys):
    _write(tmp_path / "m30k" / "train.en", "a\n")
    _write(tmp_path / "m30k" / "train.de", "b\n")
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "multi30k", "--data-dir", str(tmp_path / "m30k"), "--out", str(out)],
        capsys,
        "missing data file",
        "val.en",
    )
    assert not out.exists()


def test_malformed_jsonl_line(tmp_path, capsys):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    data = _write(tmp_path / "d.jsonl", f"{good}\n{{oops\n{good}\n")
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "instruct", "--data-dir", str(data), "--out", str(out)],
        capsys,
        "d.jsonl line 2",
        "not valid JSON",
    )
    assert not out.exists()


def test_empty_split(tmp_path, capsys):
    row = json.dumps({"instruction": "a", "input": "", "output": "b"})
    _write(tmp_path / "d" / "train.jsonl", f"{row}\n")
    _write(tmp_path / "d" / "valid.jsonl", "\n")
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--task", "instruct", "--data-dir", str(tmp_path / "d"), "--out", str(out)],
        capsys,
        "eval split",
        "no examples",
    )
    assert not out.exists()


def test_unknown_task(tmp_path, capsys):
    _fails(
        vanilla_main, ["--task", "imagenet", "--out", str(tmp_path / "o")], capsys, "unknown task 'imagenet'", "--task"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_method_variant(tmp_path, capsys):
    _fails(
        vanilla_main,
        ["--variant", "distill", "--out", str(tmp_path / "o")],
        capsys,
        "--variant must be one of sft, kd, seqkd",
    )


def test_unknown_flag(tmp_path, capsys):
    _fails(
        taid_main,
        ["--learning-rate", "0.1", "--out", str(tmp_path / "o")],
        capsys,
        "unknown argument(s) --learning-rate",
        "--help",
    )


def test_teacher_path_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    _fails(
        vanilla_main,
        ["--teacher", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o")],
        capsys,
        "is not a model folder",
        "save_pretrained",
    )
    _fails(
        vanilla_main, ["--teacher", str(tmp_path / "absent"), "--out", str(tmp_path / "o")], capsys, "does not exist"
    )
    assert not (tmp_path / "o").exists()


def test_tokenizer_folder_without_a_tokenizer(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    out = tmp_path / "o"
    _fails(
        vanilla_main,
        [*TINY, "--tokenizer", str(tmp_path / "tok"), "--out", str(out)],
        capsys,
        "holds no tokenizer",
        "tokenizer.json",
    )
    assert not out.exists()


def test_mismatched_vocabularies_point_to_dskd(tmp_path, capsys):
    from core.data import DataConfig, load_task
    from core.models import build_model
    from core.tokenizers import train_bpe

    task = load_task(DataConfig(train_size=200, eval_size=4))
    other = train_bpe([e.prompt + e.target for e in task.train] + ["zebra quokka"] * 50, 400)
    build_model("tiny", other, seed=0).save_pretrained(tmp_path / "other")
    out = tmp_path / "o"
    _fails(
        taid_main,
        [*TINY, "--student", str(tmp_path / "other"), "--out", str(out)],
        capsys,
        "share a vocabulary",
        "methods/dskd",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, phrase",
    [(["--kd-ratio", "1.5"], "--kd-ratio must be in [0, 1]"), (["--temperature", "0"], "--temperature must be positive"),
     (["--batch-size", "10", "--grad-accum", "4"], "not divisible by --grad-accum"), (["--steps", "0"], "--steps must be at least 1"),
     (["--device", "tpu"], "--device must be auto, cpu, cuda or mps"), (["--student", "huge"], "neither a preset")],
)  # fmt: skip
def test_out_of_range_settings(tmp_path, capsys, argv, phrase):
    _fails(vanilla_main, [*argv, "--out", str(tmp_path / "o")], capsys, phrase)
    assert not (tmp_path / "o").exists()


def test_taid_schedule_out_of_range(tmp_path, capsys):
    _fails(
        taid_main,
        ["--t-start", "0.9", "--t-end", "0.5", "--out", str(tmp_path / "o")],
        capsys,
        "--t-start (0.9) must not exceed --t-end (0.5)",
    )


def test_output_folder_with_another_configuration(tmp_path, capsys):
    out = tmp_path / "o"
    _write(out / "config.json", json.dumps({"TrainConfig": {"steps": 999}}))
    _write(out / "log.jsonl", '{"step": 1, "loss": 1.0}\n')  # a step completed there (an empty folder is reused)
    _fails(vanilla_main, [*TINY, "--out", str(out)], capsys, "different configuration", "--overwrite")
    assert json.loads((out / "config.json").read_text()) == {"TrainConfig": {"steps": 999}}  # untouched


def test_unwritable_output_folder(tmp_path, capsys):
    _write(tmp_path / "file", "x")
    _fails(
        vanilla_main,
        [*TINY, "--out", str(tmp_path / "file" / "run")],
        capsys,
        "cannot write to the output folder",
        "--out",
    )


def test_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    assert vanilla_main([*TINY, "--out", str(out), "--stop-after", "3"]) == {}
    (out / "checkpoints" / "step_0000003" / "model.safetensors").write_bytes(b"\0" * 10)
    _fails(vanilla_main, [*TINY, "--out", str(out)], capsys, "step_0000003", "unreadable", "delete it")
    assert (out / "checkpoints" / "step_0000003").exists()  # kept for the user to inspect


def test_multi30k_language_pair(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    _fails(
        vanilla_main,
        ["--task", "multi30k", "--data-dir", str(tmp_path / "m"), "--source-lang", "fr", "--out", str(tmp_path / "o")],
        capsys,
        "between en and de",
    )


def test_dataset_without_the_named_column(tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n")
    _fails(
        vanilla_main,
        ["--task", "hf", "--dataset", str(data), "--eval-split", "train", "--out", str(tmp_path / "o")],
        capsys,
        "no column 'prompt'",
        "--prompt-field",
    )
    assert not (tmp_path / "o").exists()


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    flags = [
        *TINY,
        "--steps",
        "20",
        "--checkpoint-every",
        "1",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--warmup-steps",
        "0",
    ]
    line = _fails(vanilla_main, [*flags, "--out", str(out)], capsys, "training stopped", "Last good checkpoint")
    assert "at step 2" in line  # lr 1e30 without clipping: step 1 blows the weights up, step 2 sees NaN
    from pathlib import Path

    kept = Path(line.split("Last good checkpoint: ")[1].split(". ")[0])
    assert kept.name == "step_0000001" and (kept / "model.safetensors").exists()


@pytest.mark.parametrize(
    "flags, phrases",
    [
        (["--log-every", "0"], ["--log-every must be at least 1"]),
        (["--checkpoint-every", "-1"], ["--checkpoint-every"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens must be at least 1"]),
        (["--stop-after", "0"], ["--stop-after must be at least 1"]),
        (["--teacher-cache-k", "0"], ["--teacher-cache-k must be at least 1"]),
        (["--chunk-size", "0"], ["--chunk-size must be at least 1"]),
    ],
)
def test_out_of_range_flags_fail_before_anything_is_written(tmp_path, capsys, flags, phrases):
    """Checked at parse time (issue 15: --log-every 0 used to fail after the teacher trained)."""
    out = tmp_path / "out"
    _fails(vanilla_main, [*TINY, *flags, "--out", str(out)], capsys, *phrases)
    assert not out.exists()


def test_interrupt_is_one_line_with_exit_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        cli(interrupted, [])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted; run the same command again to resume from the last checkpoint"

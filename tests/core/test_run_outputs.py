"""What a user finds in a run folder and in --help (issue 14, item 6): a training plot from every run, files that
follow the umask, a saved student whose plain tokenizer call starts as training did, a --help that says what the
script does and groups its flags."""

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.data import encode_prompt
from core.io import atomic_dir, atomic_write_text
from core.shell import cli
from core.tokenizers import load_tokenizer
from methods.taid.run import main as taid_main
from methods.vanilla.run import main as vanilla_main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "6", "--eval-size", "8",
        "--train-size", "500", "--batch-size", "8", "--warmup-steps", "1"]  # fmt: skip


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, mask):
    """mkstemp and mkdtemp create 0600 and 0700; what they become must be what open() and mkdir() would give."""
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
            (tmp / "private").write_text("y")
            (tmp / "private").chmod(0o600)  # as a library that writes atomically itself leaves it (save_pretrained)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask
    assert _mode(tmp_path / "folder") == 0o777 & ~mask
    assert _mode(tmp_path / "folder" / "x") == _mode(tmp_path / "folder" / "private") == 0o666 & ~mask


def test_a_run_folder_has_a_plot_readable_files_and_a_student_that_reloads_as_trained(tmp_path, umask_027, capsys):
    out = tmp_path / "run"
    metrics = vanilla_main([*TINY, "--out", str(out)])
    assert "plot: " in capsys.readouterr().err
    png = out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a shared plot: vanilla had none (only TAID drew one)

    # umask 027: group may read, others nothing; the owner-only 0600/0700 of mkstemp/mkdtemp is gone.
    for name in ("config.json", "metrics.json", "log.jsonl", "samples.jsonl", "training.png"):
        assert _mode(out / name) == 0o640, name
    assert _mode(out / "student") == 0o750
    assert _mode(out / "student" / "model.safetensors") == 0o640

    # A plain tokenizer call on the saved student's tokenizer starts with BOS, as every training prompt did; the
    # run's own tokenizer (a BPE trained on the task) adds nothing on a plain call, so without the saved
    # post-processor the reloaded student would see prompts it was never trained on.
    run_tokenizer = load_tokenizer(out / "student")
    plain = AutoTokenizer.from_pretrained(out / "student")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    bos = plain.bos_token_id
    assert bos is not None
    for row in samples:
        ids = plain(row["prompt"])["input_ids"]
        assert ids == encode_prompt(run_tokenizer, row["prompt"]) and ids[0] == bos
        assert ids[1:] == plain(row["prompt"], add_special_tokens=False)["input_ids"]

    # And so plain transformers use reproduces the run's own evaluation: greedy decoding of each prompt alone
    # gives the student's recorded prediction.
    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    new_tokens = metrics["config"]["EvalConfig"]["max_new_tokens"] or 16
    for row in samples:
        inputs = plain(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            generated = student.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=plain.pad_token_id
            )
        completion = generated[0, inputs["input_ids"].shape[1] :].tolist()
        if plain.eos_token_id in completion:
            completion = completion[: completion.index(plain.eos_token_id)]
        assert plain.decode(completion, skip_special_tokens=True) == row["student"]


def test_help_describes_the_script_and_groups_its_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli(taid_main, ["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.index("TAID against forward KL and SFT") < text.index("--t-start")  # a description first
    assert "python -m methods.taid.run --disable-adaptive" in text  # the docstring's commands, lines kept
    assert '--compare "" keeps only the SFT baseline' in text  # the baselines, and how to skip them
    for group in ("(DataConfig):", "(TrainConfig):", "(TAIDConfig):", "(RunConfig):"):
        assert group in text
    assert ".:" not in text  # group titles end in one colon

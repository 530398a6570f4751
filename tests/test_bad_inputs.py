"""The bad-input suite: each bad input gives one clear typed error that names the thing and the fix, exits with
status 2 through the command-line entry point, and leaves no partial output behind."""

import json
from pathlib import Path

import pytest
import torch

from core.shell import cli
from methods.taid.run import main as taid_main
from methods.vanilla.run import main as vanilla_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "30", "--steps", "6", "--eval-size", "8",
        "--train-size", "500", "--batch-size", "8", "--warmup-steps", "1"]  # fmt: skip


def _fails(main, argv, capsys, *phrases):
    """Run the CLI; assert exit status 2, one 'error:' line naming every phrase, and no traceback."""
    with pytest.raises(SystemExit) as info:
        cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    line = lines[0]
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


def test_batch_larger_than_the_training_set(tmp_path, capsys):
    """--batch-size 100000 on 500 examples: refused once the task is read, before the teacher or any student trains,
    rather than an out-of-memory traceback."""
    out = tmp_path / "o"
    argv = [*TINY, "--batch-size", "100000", "--out", str(out)]
    _fails(
        vanilla_main, argv, capsys, "--batch-size 100000 is larger than the 500 training", "--batch-size 500 or less"
    )
    assert not out.exists()


OOM_ERRORS = [  # what torch raises when memory runs out: CUDA/MPS, and the CPU allocator's two wordings
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.80 GiB"),
    lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 28800000000 bytes."),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory"),
]


@pytest.mark.parametrize("make_error", OOM_ERRORS)
def test_out_of_memory_in_training_names_the_batch_settings(tmp_path, capsys, monkeypatch, make_error):
    from core.train import Trainer

    original = Trainer._micro_batches

    def run_out(self, step):
        if self.desc.startswith("teacher"):  # the cached teacher trains; the run's first student runs out
            return original(self, step)
        raise make_error()

    monkeypatch.setattr(Trainer, "_micro_batches", run_out)
    # The first student to train runs out: the SFT baseline, or the run's own student where an earlier test cached it.
    line = _fails(vanilla_main, [*TINY, "--out", str(tmp_path / "o")], capsys, "out of memory in [", "] at step 1")
    assert "(8 examples per micro-batch)" in line and "lower --batch-size" in line and "--grad-accum" in line


def test_out_of_memory_in_evaluation_names_the_evaluation_settings(tmp_path, capsys, monkeypatch):
    import core.pipeline

    def run_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.80 GiB")

    monkeypatch.setattr(core.pipeline, "evaluate_model", run_out)
    _fails(vanilla_main, [*TINY, "--out", str(tmp_path / "o")], capsys, "out of memory", "--eval-batch-size")


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_full_disk_during_a_checkpoint_names_the_folder_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch, kind):
    import errno

    from safetensors import SafetensorError

    import core.train

    out = tmp_path / "o"
    real_save = core.train.save_model

    def full_disk(model, path):
        if str(out) in path and "step_0000004" in path:  # the run's second checkpoint (every 2 steps)
            real_save(model, path)  # half of it lands on disk first, as on a disk that fills up mid-write
            if kind == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", path)
            said = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            raise SafetensorError(f"Error while serializing: {said}")  # what safetensors raises on a full disk
        return real_save(model, path)

    monkeypatch.setattr(core.train, "save_model", full_disk)
    flags = [*TINY, "--checkpoint-every", "2", "--out", str(out)]
    line = _fails(vanilla_main, flags, capsys, "cannot write the checkpoint of step 4", str(out / "checkpoints"))
    assert "free there" in line and "No space left on device" in line
    assert "resumes from" in line and "step_0000002" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no half-written folder
    monkeypatch.setattr(core.train, "save_model", real_save)  # space freed: the same command resumes and finishes
    metrics = vanilla_main(flags)
    assert metrics["train"]["steps"] == 6
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'} (step 2)" in capsys.readouterr().out


def test_cache_folder_through_a_file(tmp_path, capsys):
    """A --cache-dir that cannot be created (a file in its path) is one line, before any work (core.shell)."""
    _write(tmp_path / "file", "x")
    out = tmp_path / "o"
    _fails(
        vanilla_main,
        [*TINY, "--cache-dir", str(tmp_path / "file" / "cache"), "--out", str(out)],
        capsys,
        "cannot create the cache folder",
        "--cache-dir",
    )
    assert not out.exists()


def test_read_only_cache_folder(tmp_path):
    """A real read-only cache: the CLI runs as an unprivileged user (root writes anywhere) on a cache it cannot
    write; one line, exit 2, no traceback, no run folder left.

    The user is given its own copy of the packages, so the test does not depend on where the checkout lies (a clone
    in a private 0700 folder, as mktemp makes it, is unreadable to that user); when that user cannot import the
    interpreter's own dependencies (they lie in a private folder too, e.g. a virtualenv inside such a clone), the
    test is skipped and says so."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI as another user")
    base = Path(tempfile.mkdtemp(prefix="distillab-ro-"))
    try:
        base.chmod(0o755)
        cache, home, code = base / "cache", base / "home", base / "code"
        cache.mkdir(mode=0o755)  # root's: read-only to the user below
        home.mkdir()
        home.chmod(0o777)  # mkdir's mode is masked by the umask; the run folder goes here, writable to the user
        for package in ("core", "methods", "speech", "unlearning", "privacy"):
            shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(home), "HF_HOME": str(home / "hf")}
        env["PYTHONPATH"] = str(code)
        env.pop("PYTHONSAFEPATH", None)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = "import importlib.util as u; print(*[m for m in ('torch', 'transformers', 'accelerate', 'filelock') if u.find_spec(m) is None])"
        seen = subprocess.run(
            [*nobody, sys.executable, "-c", probe], cwd=code, env=env, capture_output=True, text=True, timeout=60
        )
        if seen.returncode != 0 or seen.stdout.strip():
            missing = seen.stdout.strip() or seen.stderr.strip().splitlines()[-1:]
            pytest.skip(
                f"user nobody cannot use this interpreter's packages ({sys.executable}; missing: {missing}): they lie "
                "in a folder only root can read"
            )
        argv = ["-m", "methods.vanilla.run", *TINY, "--cache-dir", str(cache), "--out", str(home / "run")]
        done = subprocess.run(
            [*nobody, sys.executable, *argv], cwd=code, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in done.stderr
        assert f"cannot write the cache folder {cache}" in errors[0] and "--cache-dir" in errors[0]
        assert not (home / "run").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_refused_write_anywhere_in_the_cache_is_one_line(tmp_path, capsys):
    """Whatever writes into the cache (a family's own files: speech's espeak audio), a refused write is caught once
    by the shell: the body here fails as a read-only cache makes any write fail."""
    import errno

    from core.shell import Recipe, run_recipe
    from core.train import TrainConfig

    def body(ctx):
        raise PermissionError(errno.EACCES, "Permission denied", str(ctx.cache / "espeak" / "a.wav"))

    recipe = Recipe(name="writer", family="speech", configs=(TrainConfig,), body=body)
    argv = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    _fails(lambda a: run_recipe(recipe, a), argv, capsys, "cannot write the cache folder", "Permission denied")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "script, flag, value, phrase",
    [
        # argparse's float() takes "nan" and "inf": no setting means anything there (core.config.check_numbers)
        ("methods.vanilla.run", "--lr", "nan", "must be a positive number"),
        ("methods.vanilla.run", "--weight-decay", "inf", "must be a finite number"),
        ("methods.vanilla.run", "--max-grad-norm", "nan", "must be a finite number"),
        ("methods.vanilla.run", "--temperature", "inf", "must be a finite number"),
        ("methods.vanilla.run", "--teacher-lr", "0", "must be positive"),
        ("methods.vanilla.run", "--teacher-lr", "-0.001", "must be positive"),
        ("methods.vanilla.run", "--teacher-lr", "inf", "must be a finite number"),
        ("methods.gkd.run", "--temperature", "inf", "must be a finite number"),
        ("methods.minillm.run", "--lm-coef", "nan", "must be a finite number"),
        ("methods.kdexplainer.run", "--kd-temperature", "inf", "must be a finite number"),
        ("speech.dnkd.run", "--beta", "nan", "must be a finite number"),
        ("unlearning.whp.run", "--retain-strength", "inf", "must be a finite number"),
        ("privacy.hot_pate.run", "--weight-decay", "inf", "must be a finite number"),
        # a negative seed fails mid-run in core.onpolicy.derived_seed and numpy's generators
        ("methods.vanilla.run", "--seed", "-1", "must be a non-negative integer (a seed)"),
        ("methods.vanilla.run", "--data-seed", "-3", "must be a non-negative integer (a seed)"),
        ("unlearning.whp.run", "--data-seed", "-1", "must be a non-negative integer (a seed)"),
        ("methods.scaling_laws.run", "--language-seed", "-1", "must be a non-negative integer (a seed)"),
    ],
)
def test_flags_out_of_range_are_refused_at_parse_time(tmp_path, capsys, script, flag, value, phrase):
    """Issue 15 item 7: each flag's invalid range, found by reading the settings, is one line naming the flag."""
    import importlib

    main = importlib.import_module(script).main
    out = tmp_path / "o"
    _fails(main, [flag, value, "--out", str(out)], capsys, flag, phrase)
    assert not out.exists()


# -- issue 32, item 1: what a newcomer's first hour still met ----------------------------------------------------


def _one_line(capsys, call, *phrases):
    """cli() around any call: exit 2, one 'error:' line holding every phrase, no traceback."""
    return _fails(lambda _argv: call(), [], capsys, *phrases)


@pytest.mark.parametrize("merges", [False, True])
def test_a_bare_vocab_json_tokenizer_folder_says_what_it_lacks(tmp_path, capsys, merges):
    from core.tokenizers import load_tokenizer

    _write(tmp_path / "tok" / "vocab.json", json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    if merges:
        _write(tmp_path / "tok" / "merges.txt", "#version: 0.2\na b\n")
    line = _one_line(capsys, lambda: load_tokenizer(tmp_path / "tok"), "holds vocab.json but", "tokenizer_config.json")
    assert ("no merges.txt" in line) != merges and "sentencepiece" not in line


def _wav(path, seconds=0.2, rate=16000):
    import numpy as np
    from scipy.io import wavfile

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    wavfile.write(path, rate, (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    return path


def test_a_wav_cut_to_a_few_bytes_or_mid_data_is_one_line(tmp_path, capsys):
    from speech.data import read_wav

    whole = _wav(tmp_path / "a.wav").read_bytes()
    (tmp_path / "stub.wav").write_bytes(whole[:10])  # scipy: struct.error before
    _one_line(capsys, lambda: read_wav(tmp_path / "stub.wav"), "cannot read the wav file", "stub.wav")
    (tmp_path / "cut.wav").write_bytes(whole[: 44 + 1000])  # header promises 6,400 bytes of samples, holds 1,000
    _one_line(capsys, lambda: read_wav(tmp_path / "cut.wav"), "cut.wav is cut short")


def test_a_space_separated_manifest_is_told_the_separator(tmp_path, capsys):
    from speech.data import read_s2t_manifest

    _write(tmp_path / "train.tsv", "id audio n_frames tgt_text\nu1 a.wav 100 hallo\n")
    _one_line(capsys, lambda: read_s2t_manifest(tmp_path / "train.tsv"), "separated by spaces", "tab")


def test_plain_audio_tab_text_list_flac_and_any_rate_are_read(tmp_path):
    """The plain list (no header) and fairseq's manifest; wav at 8 and 44.1 kHz and FLAC all come out at 16 kHz."""
    import numpy as np
    import soundfile

    from speech.data import SAMPLE_RATE, read_s2t_manifest

    _wav(tmp_path / "a.wav", 0.5, 8000)
    _wav(tmp_path / "b.wav", 0.5, 44100)
    t = np.arange(22050) / 44100
    soundfile.write(tmp_path / "c.flac", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    _write(tmp_path / "list.tsv", "a.wav\teins zwei\nb.wav\tdrei\n\nc.flac\tvier\n")
    utts = read_s2t_manifest(tmp_path / "list.tsv")
    assert [(u.id, u.target) for u in utts] == [("a.wav", "eins zwei"), ("b.wav", "drei"), ("c.flac", "vier")]
    for u in utts:
        audio, rate = u.load()
        assert rate == SAMPLE_RATE and abs(len(audio) - SAMPLE_RATE // 2) <= 2  # 0.5 s at 16 kHz
    _write(tmp_path / "s2t.tsv", "id\taudio\tn_frames\ttgt_text\tspeaker\nx\tc.flac\t50\tvier\tspk\n")
    (u,) = read_s2t_manifest(tmp_path / "s2t.tsv")
    assert (u.id, u.speaker, u.load()[1]) == ("x", "spk", SAMPLE_RATE)


def test_flac_without_soundfile_names_the_fix(tmp_path, capsys, monkeypatch):
    import sys

    from speech.data import read_audio

    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now raises ImportError
    _one_line(capsys, lambda: read_audio(tmp_path / "x.flac"), "x.flac is FLAC", "pip install soundfile")


def test_a_cache_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    _write(tmp_path / "afile", "x")
    for cache in [tmp_path / "afile" / "cache", *([Path("/proc/distillab-cache")] if Path("/proc").is_dir() else [])]:
        _fails(
            vanilla_main,
            ["--cache-dir", str(cache), "--out", str(tmp_path / "o")],
            capsys,
            f"cannot create the cache folder {cache}",
            "--cache-dir",
        )
        assert not (tmp_path / "o").exists()


def test_hot_pate_sizes_its_name_space_to_the_request(capsys):
    """4,352 names of 2-3 syllables (16^2 + 16^3); make_names looped forever past them. The default corpus (540
    names: 64 x 4 private + 4 canaries + 40 public + 40 test + 200 tokenizer) keeps its 2-3 syllable names."""
    import random

    from privacy.hot_pate.corpus import CorpusConfig, make_names, name_lengths
    from privacy.hot_pate.run import main as hot_pate_main

    assert CorpusConfig().people() == 540 and name_lengths(540) == (2, 3)
    assert name_lengths(4352) == (2, 3, 4)  # past half of 4,352: one syllable more
    names = make_names(5000, random.Random(0), set())  # more than 2-3 syllables hold: used to hang
    assert len(set(names)) == 5000
    _fails(hot_pate_main, ["--teachers", "1000000"], capsys, "--teachers 1000000", "--people-per-teacher")


@pytest.mark.parametrize(
    "module",
    ["methods.taid.run", "methods.dskd.run", "unlearning.whp.run", "methods.phis.run", "methods.kdexplainer.run",
     "methods.sinkhorn.classify"],
)  # fmt: skip
def test_empty_compare_items_are_refused(module, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    _fails(main, ["--compare", ",,", "--out", str(tmp_path / "o")], capsys, "--compare ',,' has an empty item")
    assert not (tmp_path / "o").exists()


def test_minillm_checks_out_before_training(tmp_path, capsys, monkeypatch):
    """An --out holding another run's settings (and progress) is refused before the teacher or the SFT student
    trains, as vanilla refuses it (with_sft_start is where the SFT student would train)."""
    import methods.minillm.run as minillm

    out = _write(tmp_path / "o" / "config.json", json.dumps({"method": {"name": "other"}})).parent
    _write(out / "log.jsonl", '{"step": 1}\n')

    def trains(argv):
        raise AssertionError("the SFT student trained before --out was checked")

    monkeypatch.setattr(minillm, "with_sft_start", trains)
    _fails(minillm.main, ["--out", str(out)], capsys, f"{out} holds a run with a different configuration")


@pytest.mark.slow
def test_dnkd_stop_after_says_where_it_stopped(tmp_path, capsys):
    from speech.dnkd.run import main as dnkd_main

    argv = ["--n-train", "8", "--n-eval", "4", "--steps", "3", "--batch-size", "4", "--warmup-steps", "0",
            "--stop-after", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    cli(dnkd_main, argv)
    assert "[baselines/ce] stopped at step 1 of 3; rerun the same command to resume" in capsys.readouterr().err


def test_a_json_array_given_as_jsonl_names_the_fix(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 3, indent=1))
    _fails(
        vanilla_main,
        ["--task", "instruct", "--data-dir", str(data), "--out", str(tmp_path / "o")],
        capsys,
        "d.jsonl line 1: a JSON array",
        "one object per line",
    )


def test_a_lumped_check_names_the_one_flag_and_its_value(tmp_path, capsys):
    from methods.disco.run import main as disco_main

    for value, said in (("nan", "--eta must be a finite number, got nan"), ("2", "--eta must be in (0, 1], got 2.0")):
        line = _fails(disco_main, ["--eta", value, "--out", str(tmp_path / "o")], capsys, said)
        assert "--lr" not in line and "--margin" not in line  # it named --lr, --ei-sigma, --eta and --margin


def test_instruct_prompt_and_response_fields_map_any_layout(tmp_path, capsys):
    from core.data import DataConfig, load_task

    rows = [{"q": f"say {i}", "a": f"word {i}"} for i in range(20)]
    data = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(DataConfig(task="instruct", data_dir=str(data), prompt_field="q", response_field="a"))
    examples = task.train + task.eval
    assert len(examples) == 20 and {e.target for e in examples} == {f"word {i}" for i in range(20)}
    assert all("### Instruction:\nsay " in e.prompt for e in examples)
    _fails(
        vanilla_main,
        ["--task", "instruct", "--data-dir", str(data), "--out", str(tmp_path / "o")],
        capsys,
        "match no instruction layout",
        "--prompt-field and --response-field",
    )

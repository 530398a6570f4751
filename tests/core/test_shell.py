"""The run shell and the neutral Trainer serve a model that is not a causal LM (tests/core/mlp_recipe.py: an MLP
teacher distilled into an MLP student on generated data): the whole run, exact resume after SIGKILL, the run
folder's rules, one-line errors, a cache entry built once by concurrent runs, and the benchmark's row."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.bench import report as bench_report
from core.bench.registry import BenchMethod, BenchTask, Suite
from core.bench.runner import plan, run_all
from core.errors import OutputDirError
from core.shell import RunContext, cached_folder
from tests.core import mlp_recipe

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--steps", "40", "--batch-size", "32", "--warmup-steps", "2", "--teacher-steps", "60", "--lr", "1e-2"]


def command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.core.mlp_recipe", *FLAGS, "--out", str(out), "--cache-dir", str(cache), *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, in this process."""
    root = tmp_path_factory.mktemp("mlp")
    metrics = mlp_recipe.main([*FLAGS, "--out", str(root / "run"), "--cache-dir", str(root / "cache")])
    return root, metrics


def test_the_recipe_runs_through_the_shell(straight):
    root, metrics = straight
    out = root / "run"
    assert metrics["method"] == "mlp-kd" and metrics["family"] == "vision" and metrics["task"] == "blobs"
    assert set(metrics["eval"]) == {"student", "teacher", "ce_student"}
    # the wide teacher learns the nearest-centre rule; KD must carry some of it into the 8-wide student
    assert metrics["eval"]["teacher"]["accuracy"] > 90
    assert metrics["eval"]["student"]["accuracy"] > 50
    train = metrics["train"]
    assert train["unit"] == "examples" and train["steps"] == 40
    assert train["tokens"] == 40 * 32  # the throughput count is examples: 40 steps x 32 rows
    assert train["last_loss"] < train["first_loss"]
    assert (out / "student.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["eval"] == metrics["eval"]
    assert not list(out.glob("**/checkpoints"))  # removed once the run is complete, baselines' included
    assert len((out / "log.jsonl").read_text().splitlines()) == 40


def test_complete_run_is_shown_not_rerun_and_other_settings_are_refused(straight, capsys):
    root, metrics = straight
    again = mlp_recipe.main([*FLAGS, "--out", str(root / "run"), "--cache-dir", str(root / "cache")])
    assert again == metrics
    assert "is complete" in capsys.readouterr().err
    with pytest.raises(OutputDirError, match="different configuration"):
        mlp_recipe.main([*FLAGS, "--temperature", "3", "--out", str(root / "run"), "--cache-dir", str(root / "cache")])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_identical_weights(straight, tmp_path):
    root, metrics = straight
    out = tmp_path / "run"
    cmd = command(out, root / "cache", "--checkpoint-every", "5")  # the teacher is cached already
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"  # the KD student's log (the CE baseline trains first, under baselines/ce)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["eval"] == metrics["eval"]
    a, b = load_file(str(out / "student.safetensors")), load_file(str(root / "run" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 41))


def test_bad_flag_is_one_line_with_exit_2_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(command(out, tmp_path / "cache", "--kd-ratio", "2"), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --kd-ratio must be in [0, 1], got 2.0"]
    assert not out.exists()


def test_device_that_is_not_there_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        command(tmp_path / "run", tmp_path / "cache", "--device", "cuda"), cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cache_entry_is_built_once_by_concurrent_builders(tmp_path):
    """Two processes ask for the same entry at once: one builds it, the other waits and gets the same folder."""
    script = (
        "import sys, time, os; from pathlib import Path; from core.shell import cached_folder\n"
        "def build(folder):\n"
        "    time.sleep(1.0); (folder / 'value.txt').write_text('built by ' + str(os.getpid()))\n"
        "    (Path(sys.argv[1]) / ('builder-' + str(os.getpid()))).write_text('')\n"
        "print(cached_folder(Path(sys.argv[1]) / 'entries', {'k': 1}, build))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    folders = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(folders) == 1 and (Path(folders.pop()) / "value.txt").is_file()
    assert len(list(tmp_path.glob("builder-*"))) == 1  # built once


def test_cache_entry_of_a_failed_build_is_absent(tmp_path):
    def build(folder):
        (folder / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_folder(tmp_path, {"k": 2}, build)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_run_context_names_a_missing_config():
    ctx = RunContext("x", "vision", Path("."), Path("."), 0, {}, None)
    with pytest.raises(KeyError, match="BlobsData is not among"):
        ctx.cfg(mlp_recipe.BlobsData)


@pytest.mark.slow
def test_benchmark_collects_the_row_of_a_non_lm_recipe(straight, tmp_path):
    root, _ = straight
    method = BenchMethod("mlp-kd", "tests.core.mlp_recipe", family="vision")
    lm_method = BenchMethod("sft", "methods.vanilla.run")  # an lm method is never run on a vision task
    task = BenchTask("blobs", (), ("accuracy",), family="vision")
    budget = tuple(FLAGS) + ("--cache-dir", str(root / "cache"))
    suite = Suite("t", ("blobs",), ("--steps", "1"), seeds=(0,), family_args={"vision": budget})
    runs = plan(suite, [method, lm_method], [task], [0], tmp_path, "", tmp_path)
    assert [r.method.name for r in runs] == ["mlp-kd"]
    assert "--teacher-steps" in runs[0].argv and "--steps" in runs[0].argv
    (record,) = run_all(runs, timeout_s=300, echo=lambda _: None)
    assert record["status"] == "ok", record
    (report,) = bench_report.build(tmp_path, [method, lm_method], [task], [0], tmp_path)
    by_name = {s.method: s for s in report.summaries}
    assert by_name["mlp-kd"].status == "ok" and by_name["mlp-kd"].stat("accuracy").mean > 50
    assert by_name["sft"].status == "n/a"
    assert report.teacher["accuracy"].mean > 90


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    from filelock import FileLock

    out = tmp_path / "run"
    with FileLock(str(tmp_path / ".run.lock")):  # what a live run holds
        with pytest.raises(OutputDirError, match="another run is writing to"):
            mlp_recipe.main([*FLAGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert not out.exists()


def test_torn_log_line_and_failed_start_do_not_block_the_rerun(straight, tmp_path, capsys):
    root, metrics = straight
    out, cache = tmp_path / "run", str(root / "cache")
    # A folder left by a start that failed before its first step, with other settings: taken over.
    out.mkdir()
    (out / "config.json").write_text('{"truncated": ')
    assert mlp_recipe.main([*FLAGS, "--out", str(out), "--cache-dir", cache, "--stop-after", "7"]) == {}
    log = out / "log.jsonl"
    with log.open("a") as handle:  # what a SIGKILL in the middle of a log write leaves
        handle.write('{"step": 8, "lo')
    resumed = mlp_recipe.main([*FLAGS, "--out", str(out), "--cache-dir", cache])
    assert resumed["eval"] == metrics["eval"]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 41))
    assert "dropped an unreadable line" in capsys.readouterr().err
    # with a step done, a command with other settings is refused, not silently restarted
    (out / "metrics.json").write_text("{")  # a truncated result: not complete, and not silently lost either
    with pytest.raises(OutputDirError, match="different configuration"):
        mlp_recipe.main([*FLAGS, "--out", str(out), "--cache-dir", cache, "--temperature", "3"])

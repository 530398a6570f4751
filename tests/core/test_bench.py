"""The benchmark: rendered rows from hand-made run folders, the claim rule, the runner (crash, typed error, hang,
skip of complete runs) on a stand-in method module, and a tiny two-method benchmark end to end."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.bench import main
from core.bench import report as bench_report
from core.bench.claims import CLAIMS, NO, NOT_MEASURED, PARTLY, YES, combine, compare
from core.bench.collect import Stat, Summary, log_path, record_path, run_folder
from core.bench.registry import METHODS, SUITES, TASKS, BenchMethod, Suite
from core.bench.runner import error_line, is_complete, plan, planned_config, run_all

OPS = TASKS["ops"]
ABSENT = BenchMethod("absent", "methods.absent.run")  # a registered method whose package does not exist (yet)
ENV = {"machine": "x86_64 2 cpus, torch threads 1", "device": "cpu", "python": "3.11.9", "torch": "2.13.0",
       "transformers": "4.46.0", "accelerate": "1.0.0", "git": "abc1234"}  # fmt: skip


def write_run(out: Path, method: str, seed: int, em: float, rouge: float, ppl: float, tps: float, train_s: float,
              run_s: float, peak: float, log_losses=(3.0, 2.0, 1.5)) -> Path:  # fmt: skip
    """A complete run folder as core.pipeline writes it, with its benchmark record beside it."""
    folder = run_folder(out, method, "ops", seed)
    folder.mkdir(parents=True)
    student = {"exact_match": em, "rougeL": rouge, "perplexity": ppl, "exact_match/add": 0.0}
    teacher = {"exact_match": 98.0, "rougeL": 99.0, "perplexity": 1.2}
    metrics = {"method": method, "task": "ops", "seed": seed, "eval": {"student": student, "teacher": teacher},
               "train": {"steps": 3, "tokens": 900, "wall_s": train_s, "tokens_per_s": tps, "peak_mem_mb": peak,
                         "run_wall_s": run_s - 5.0},
               "teacher": {"source": "/cache/models/teacher-1", "train": {"wall_s": 777.0, "tokens_per_s": 1082.0,
                                                                          "peak_mem_mb": 654.0}},
               "config": {}, "env": ENV}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    log = [{"step": i + 1, "loss": loss} for i, loss in enumerate(log_losses)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_record(folder, "ok", "", run_s)
    return folder


def write_record(folder: Path, status: str, error: str, wall_s: float = 1.0) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "error": error, "wall_s": wall_s, "reused": False, "argv": [], "module": "x"}
    record_path(folder).write_text(json.dumps(record))


@pytest.fixture
def hand_made(tmp_path):
    out = tmp_path / "runs"
    for seed, (em, rouge, ppl, tps, train_s, run_s, peak) in enumerate(
        [(30, 60, 2.5, 1000, 10, 20, 500), (34, 62, 2.7, 1100, 12, 22, 510), (32, 64, 2.9, 1200, 14, 24, 520)]
    ):
        write_run(out, "sft", seed, em, rouge, ppl, tps, train_s, run_s, peak)
    for seed, em in enumerate([40, 44, 48]):
        write_run(out, "kd-fkl", seed, em, 70.0, 2.0, 900.0, 20.0, 30.0, 600.0)
    for seed, em in enumerate([1, 0, 2]):
        write_run(out, "kd-rkl", seed, em, 20.0, 8.0, 900.0, 20.0, 30.0, 600.0)
    for seed in range(3):  # every seed raised
        write_record(run_folder(out, "taid-from-sft", "ops", seed), "failed", "RuntimeError: boom at step 3")
    write_run(out, "seqkd", 0, 45.0, 71.0, 2.1, 800.0, 25.0, 40.0, 700.0)
    write_record(run_folder(out, "seqkd", "ops", 1), "timeout", "timeout after 1800 s")  # seed 2: never ran
    methods = [METHODS[m] for m in ("sft", "kd-fkl", "kd-rkl", "seqkd", "taid-from-sft")] + [ABSENT]
    return out, methods


def test_rows_rendered_from_hand_made_run_folders(hand_made, tmp_path):
    out, methods = hand_made
    (rep,) = bench_report.build(out, methods, [OPS], [0, 1, 2], tmp_path / "no-data")
    rows = [bench_report.md_row(bench_report.method_row(s, OPS)) for s in rep.summaries]
    # sft: EM 30, 34, 32 -> mean 32, sample variance (4 + 4 + 0) / 2 = 4 -> std 2; the same pattern for every
    # column: ROUGE-L 62 ± 2, perplexity 2.70 ± 0.20, tokens/s 1100 ± 100, train 12 ± 2, run 22 ± 2, peak 510 ± 10.
    assert rows == [
        "| sft | 32.0 ± 2.0 | 62.0 ± 2.0 | 2.70 ± 0.20 | 3/3 | 1100 ± 100 | 12.0 ± 2.0 | 22 ± 2 | 510 ± 10 | ok |",
        "| kd-fkl | 44.0 ± 4.0 | 70.0 ± 0.0 | 2.00 ± 0.00 | 3/3 | 900 ± 0 | 20.0 ± 0.0 | 30 ± 0 | 600 ± 0 | ok |",
        "| kd-rkl | 1.0 ± 1.0 | 20.0 ± 0.0 | 8.00 ± 0.00 | 3/3 | 900 ± 0 | 20.0 ± 0.0 | 30 ± 0 | 600 ± 0 | ok |",
        "| seqkd | 45.0 | 71.0 | 2.10 | 1/3 | 800 | 25.0 | 40 | 700 "
        "| 1/3 seeds; seed 1 failed: timeout after 1800 s; seed 2 not run |",
        "| taid-from-sft | - | - | - | 0/3 | - | - | - | - | failed: RuntimeError: boom at step 3 |",
        "| absent | - | - | - | 0/3 | - | - | - | - | not implemented |",
    ]
    assert bench_report.md_row(bench_report.teacher_row(rep)) == (
        "| teacher (reference) | 98.0 | 99.0 | 1.20 | - | 1082 | 777.0 | - | 654 | reference |"  # one teacher, once
    )
    claims = {c["method"]: (c["verdict"], c["evidence"]) for c in rep.claims}
    # kd-fkl vs sft: 44 - 32 = 12 > 4 + 2, the intervals do not overlap.
    assert claims["kd-fkl"] == (YES, "exact_match: kd-fkl 44.0 ± 4.0 vs sft 32.0 ± 2.0 (yes)")
    assert claims["kd-rkl"] == (NO, "exact_match: kd-rkl 1.0 ± 1.0 vs kd-fkl 44.0 ± 4.0 (no)")
    # one seed: better on average than both, but no spread to judge by
    assert claims["seqkd"] == (
        PARTLY,
        "exact_match: seqkd 45.0 vs kd-fkl 44.0 ± 4.0 (partly), sft 32.0 ± 2.0 (partly)",
    )
    assert claims["taid-from-sft"] == (NOT_MEASURED, "taid-from-sft: failed")  # TAID's claim (issue 29)
    assert claims["absent"] == ("not implemented", "")
    assert claims["sft"] == ("n/a", "")


def test_cut_and_healed_students_are_reference_rows(hand_made, tmp_path):
    """A pruned student's run records the cut before training and the healed student it starts from: the report
    shows each once as a reference row (the same model in every run), below the teacher."""
    out, methods = hand_made
    path = run_folder(out, "kd-fkl", "ops", 0) / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["eval"]["initial_student"] = {"exact_match": 3.0, "rougeL": 9.0, "perplexity": 19.46}
    metrics["eval"]["healed_student"] = {"exact_match": 5.0, "rougeL": 11.0, "perplexity": 17.05}
    path.write_text(json.dumps(metrics))
    (rep,) = bench_report.build(out, methods, [OPS], [0, 1, 2], tmp_path / "no-data")
    assert (rep.initial["rougeL"].mean, rep.healed["rougeL"].mean, rep.healed["perplexity"].mean) == (9.0, 11.0, 17.05)
    text = bench_report.write([rep], tmp_path / "rep" / "B.md", SUITES["default"], [0, 1, 2], "", "cmd").read_text()
    assert "| student before training (reference) | 3.0 | 9.0 | 19.46 |" in text
    assert "| healed student (reference) | 5.0 | 11.0 | 17.05 |" in text


def test_small_valued_columns_get_three_decimals(hand_made, tmp_path):
    # exact_match/add is 0.0 in every hand-made run: a column whose values are all below 10 in magnitude (fractions,
    # correlations, normalized errors) gets 3 decimals, so 0.04 and 0.06 do not both print 0.0; exact match (30-48)
    # keeps 1, perplexity its fixed 2.
    from dataclasses import replace

    out, methods = hand_made
    task = replace(OPS, metrics=("exact_match", "exact_match/add", "perplexity"))
    (rep,) = bench_report.build(out, methods, [task], [0, 1, 2], tmp_path / "no-data")
    digits = bench_report.column_digits(rep)
    assert digits == {"exact_match": 1, "exact_match/add": 3}
    row = bench_report.md_row(bench_report.method_row(rep.summaries[0], task, digits))
    assert row.startswith("| sft | 32.0 ± 2.0 | 0.000 ± 0.000 | 2.70 ± 0.20 |")


def test_report_files(hand_made, tmp_path):
    out, methods = hand_made
    # phis is a vision method: on a text task it has no row, in the quality table or in the claims table
    reports = bench_report.build(out, [*methods, METHODS["phis"]], [OPS], [0, 1, 2], tmp_path / "no-data")
    path = bench_report.write(reports, tmp_path / "rep" / "BENCHMARKS.md", SUITES["default"], [0, 1, 2], "", "cmd")
    text = path.read_text()
    assert "| phis |" not in text and "PHI-S" not in text and "| kd-fkl | Hinton" in text
    env = "_Measured on x86_64 2 cpus, torch threads 1, device cpu; python 3.11.9, torch 2.13.0, transformers 4.46.0, accelerate 1.0.0; git abc1234._"  # fmt: skip
    assert text.count(env) == 2  # above the quality table and above the claims table
    assert "| taid-from-sft | - | - | - | 0/3 | - | - | - | - | failed: RuntimeError: boom at step 3 |" in text
    # it timed 3 sft + 3 kd-fkl + 3 kd-rkl + 1 seqkd complete runs and 4 failed ones: (66 + 90 + 90 + 40 + 4) / 60
    assert "The benchmark timed 14 runs: 4.8 minutes in all." in text
    with path.with_suffix(".csv").open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert float(rows["sft"]["exact_match_mean"]) == 32.0 and float(rows["sft"]["exact_match_std"]) == 2.0
    assert rows["seqkd"]["exact_match_std"] == "" and rows["absent"]["status"] == "not implemented"
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["tasks"]["ops"]["env"]["git"] == ["abc1234"]
    for name in ("quality-ops", "tradeoff-ops", "curves-ops"):
        png = path.parent / "benchmarks-figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](benchmarks-figures/{name}.png)" in text


def test_revision_is_read_before_the_report_writes_into_the_checkout(hand_made, tmp_path, monkeypatch):
    # Rendering into the checkout (--report BENCHMARKS.md) writes figures first; a revision read after them said
    # "-dirty" for a clean checkout (BENCHMARKS.md of 2026-12-01 did). The fake revision is dirty once a file exists.
    out, methods = hand_made
    folder = tmp_path / "checkout"
    folder.mkdir()
    monkeypatch.setattr(bench_report, "git_revision", lambda: "abc1234" + ("-dirty" if any(folder.iterdir()) else ""))
    reports = bench_report.build(out, methods, [OPS], [0, 1, 2], tmp_path / "no-data")
    path = bench_report.write(reports, folder / "BENCHMARKS.md", SUITES["default"], [0, 1, 2], "", "cmd")
    assert "Rendered at git abc1234." in path.read_text()
    assert json.loads(path.with_suffix(".json").read_text())["rendered_at_git"] == "abc1234"


def test_tasks_without_runs_are_listed(tmp_path, monkeypatch):
    absent = BenchMethod("absent", "methods.absent.run", family="unlearning")  # a registered package not written yet
    monkeypatch.setitem(METHODS, "absent", absent)
    methods = [METHODS[m] for m in ("sft", "kd-fkl", "absent")]
    tasks = [TASKS["multi30k-de-en"], TASKS["tofu"]]
    reports = bench_report.build(tmp_path / "runs", methods, tasks, [0], tmp_path / "data")
    path = bench_report.write(reports, tmp_path / "BENCHMARKS.md", SUITES["real"], [0], "", "cmd")
    assert path.read_text().endswith(
        "## Tasks not run\n\n"
        f"- `multi30k-de-en`: no data: {tmp_path / 'data' / 'multi30k'} is absent.\n"
        "- `tofu`: not applicable to any implemented method; it belongs to absent (not implemented).\n"
    )


def test_claim_rule_by_hand():
    a, b = Stat(50.0, 2.0, 3), Stat(45.0, 2.0, 3)
    assert compare(a, b) == YES  # 50 - 2 = 48 > 47 = 45 + 2
    assert compare(a, Stat(47.0, 2.0, 3)) == PARTLY  # 48 < 49: the intervals overlap
    assert compare(Stat(45.0, 0.1, 3), a) == NO
    assert compare(a, Stat(50.0, 0.0, 3)) == NO  # a tie is not a win
    assert compare(Stat(50.0, None, 1), b) == PARTLY  # one seed: no spread to judge by
    assert compare(Stat(10.0, 1.0, 3), Stat(20.0, 1.0, 3), lower_is_better=True) == YES  # wall time
    assert combine([YES, YES]) == YES and combine([NO, NO]) == NO and combine([YES, NO]) == PARTLY
    assert combine([YES, NOT_MEASURED]) == NOT_MEASURED and combine([]) == NOT_MEASURED


def test_claim_evidence_of_small_values_gets_three_decimals():
    # PHI-S's claim compares normalized errors of 0.037 and 0.060: with one decimal both read 0.0 (as the report of
    # 2026-12-01 printed them). Evidence takes the columns' rule: 3 decimals when every compared mean is below 10.
    from types import SimpleNamespace

    from core.bench.claims import beats
    from core.bench.collect import stat

    def summary(name, values):
        return SimpleNamespace(name=name, stat=lambda _key: stat(values), status="ok")

    task = SimpleNamespace(metrics=("mean_nerr",))
    ours, theirs = summary("phis", [0.036, 0.037, 0.038]), summary("phis-global", [0.059, 0.060, 0.061])
    verdict, evidence = beats("phis", ["phis-global"], lower_is_better=True)(
        {"phis": ours, "phis-global": theirs}, task
    )
    assert verdict == YES and evidence == "mean_nerr: phis 0.037 ± 0.001 vs phis-global 0.060 ± 0.001 (yes)"
    big = summary("kd-fkl", [40.0, 42.0, 44.0])
    _, evidence = beats("phis", ["kd-fkl"])({"phis": ours, "kd-fkl": big}, task)
    assert evidence.startswith("mean_nerr: phis 0.0 ± 0.0 vs kd-fkl 42.0 ± 2.0")  # one value of 10 or more: 1 decimal


def test_claim_with_quality_and_speed_parts():
    def summary(method, em, train_s):
        return Summary(method, "ops", "ok", [0, 1, 2], [0, 1, 2], {"exact_match": em, "train_s": train_s})

    summaries = {
        "distillm": summary("distillm", [50, 52, 54], [10, 10, 10]),
        "kd-fkl": summary("kd-fkl", [40, 44, 48], [20, 20, 20]),
        "kd-rkl": summary("kd-rkl", [1, 0, 2], [20, 20, 20]),
        "gkd": summary("gkd", [49, 50, 51], [30, 31, 32]),
    }
    decide = CLAIMS["distillm"].decide
    # 52 - 2 > 44 + 4 and > 1 + 1: yes, yes; 52 - 2 = 50 < 50 + 1: partly. Train time, lower is better:
    # 10 + 0 < 31 - 1: yes. Quality partly and speed yes: partly.
    assert decide(summaries, OPS) == (
        PARTLY,
        "exact_match: distillm 52.0 ± 2.0 vs kd-fkl 44.0 ± 4.0 (yes), kd-rkl 1.0 ± 1.0 (yes), gkd 50.0 ± 1.0 "
        "(partly); train_s: distillm 10.0 ± 0.0 vs gkd 31.0 ± 1.0 (yes)",
    )
    del summaries["gkd"]
    assert decide(summaries, OPS) == (NOT_MEASURED, "gkd: not in this benchmark")


def test_error_line():
    traceback = "step 1\rstep 2\nTraceback (most recent call last):\n  File x\nRuntimeError: boom at step 3\n"
    assert error_line(traceback, 1) == "RuntimeError: boom at step 3"
    assert error_line("noise\nerror: --lr must be a positive number, got -1\n", 2).startswith("error: --lr must")
    assert error_line("training 40%|####\r", -9) == "killed by signal 9"
    assert error_line("last words\n", 3) == "exit status 3: last words"


STAND_IN = '''
"""Stands in for a method's run module: behaves as --behave says, writes a run folder like core.pipeline."""
import json, sys, time
from pathlib import Path


def main(args):
    flag = lambda name: args[args.index(name) + 1]
    out, seed, behave = Path(flag("--out")), int(flag("--seed")), flag("--behave")
    with (Path(__file__).parent / "calls.txt").open("a") as calls:
        calls.write(f"{behave} {seed}\\n")
    if behave == "crash":
        raise RuntimeError("boom at step 3")
    if behave == "typed":
        print("error: --lr must be a positive number, got -1", file=sys.stderr)
        sys.exit(2)
    if behave == "hang":
        time.sleep(120)
    if behave == "quiet" or (out / "metrics.json").exists():  # as the pipeline: a complete folder returns at once
        return
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"method": "x", "task": "ops", "seed": seed, "env": {},
               "eval": {"student": {"exact_match": 30.0 + seed}, "teacher": {"exact_match": 90.0}},
               "train": {"tokens_per_s": 10.0, "wall_s": 1.0, "peak_mem_mb": 1.0, "run_wall_s": 7.0}}
    (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":  # no METHOD: the benchmark checks its command only
    main(sys.argv[1:])
'''


def test_runner_records_failures_and_skips_complete_runs(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "bench_stand_in.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    calls = tmp_path / "mods" / "calls.txt"
    methods = [
        BenchMethod(name, "bench_stand_in", ("--behave", name)) for name in ("ok", "crash", "typed", "hang", "quiet")
    ]
    methods.append(BenchMethod("absent", "methods.no_such_method.run"))
    suite = Suite("t", ("ops",), (), seeds=(0,))
    out = tmp_path / "runs"

    runs = plan(suite, methods, [OPS], [0], out, "", tmp_path)
    assert [r.method.name for r in runs] == ["ok", "crash", "typed", "hang", "quiet"]  # "absent" is not run
    assert runs[0].argv == ["--behave", "ok", "--task", "ops", "--seed", "0", "--out", str(run_folder(out, "ok", "ops", 0))]  # fmt: skip
    records = run_all(runs, timeout_s=4, echo=lambda _: None)
    assert [(r["status"], r["error"]) for r in records] == [
        ("ok", ""),
        ("failed", "RuntimeError: boom at step 3"),
        ("failed", "error: --lr must be a positive number, got -1"),
        ("timeout", "timeout after 4 s"),
        ("failed", "exited without writing metrics.json"),
    ]
    assert 4 <= records[3]["wall_s"] < 30  # the hang was ended, not waited for
    assert len(calls.read_text().splitlines()) == 5

    # Rerun: the complete run is skipped (not launched), the others are tried again.
    again = run_all(plan(suite, methods, [OPS], [0], out, "", tmp_path), timeout_s=4, echo=lambda _: None)
    assert again[0] is None and [r["status"] for r in again[1:]] == ["failed", "failed", "timeout", "failed"]
    assert calls.read_text().splitlines()[5:] == ["crash 0", "typed 0", "hang 0", "quiet 0"]

    # Another command for the same folder is not "complete": it is launched, and the pipeline decides (here the
    # stand-in returns the complete folder at once). Its wall time measured nothing, so the run's own stands in.
    (changed,) = plan(suite, methods[:1], [OPS], [0], out, "--eval-size 50", tmp_path)
    assert changed.argv[-6:-4] == ["--eval-size", "50"] and not is_complete(changed)
    (record,) = run_all([changed], timeout_s=40, echo=lambda _: None)
    assert record["status"] == "ok" and record["reused"] is True
    (rep,) = bench_report.build(out, methods, [OPS], [0], tmp_path)
    by_name = {s.method: s for s in rep.summaries}
    assert by_name["ok"].values["run_s"] == [7.0] and by_name["ok"].values["exact_match"] == [30.0]
    assert by_name["hang"].status == "timeout" and by_name["absent"].status == "not implemented"
    # A record that is lost makes a complete folder run again (and the pipeline returns it as it is).
    record_path(changed.folder).unlink()
    assert not is_complete(changed)
    # The last attempt decides: refused (or crashed) beside an older metrics.json, the cell is a failure.
    write_record(changed.folder, "failed", "error: ... holds a run with a different configuration")
    (rep,) = bench_report.build(out, methods[:1], [OPS], [0], tmp_path)
    assert bench_report.status_text(rep.summaries[0]) == "failed: error: ... holds a run with a different configuration"


def test_runner_leaves_a_run_that_another_process_is_running(tmp_path, monkeypatch):
    # Two bench processes on one --out (a suite split by --tasks or --methods): when one reaches a run the other is
    # running, it skips it. Before, it truncated the live run's log and recorded a failure ("another run is writing")
    # over it (seen on 2026-12-01). A child process holds the folder's lock as a live run does.
    from core.shell import run_lock_path

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "bench_stand_in.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    (run,) = plan(Suite("t", ("ops",), (), seeds=(0,)), [BenchMethod("ok", "bench_stand_in", ("--behave", "ok"))],
                  [OPS], [0], tmp_path / "runs", "", tmp_path)  # fmt: skip
    run.folder.parent.mkdir(parents=True)
    log_path(run.folder).write_text("the live run's log\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)", str(run_lock_path(run.folder))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = []
        assert run_all([run], timeout_s=30, echo=lines.append) == [None]
        assert "another process is running it now, skipped" in lines[0]
        assert log_path(run.folder).read_text() == "the live run's log\n" and not record_path(run.folder).exists()
    finally:
        holder.kill()
        holder.wait()
    (record,) = run_all([run], timeout_s=30, echo=lambda _: None)  # the lock released: the run goes ahead
    assert record["status"] == "ok"


def test_complete_means_same_configuration(tmp_path):
    """A folder counts as complete only if the command, parsed by the method's own METHOD now, gives the
    configuration its metrics.json holds: a changed default in a method's code makes the run go again."""
    suite, out = SUITES["tiny"], tmp_path / "runs"
    (run,) = plan(suite, [METHODS["kd-fkl"]], [OPS], [0], out, "", tmp_path)
    config = planned_config(run.method.module, run.argv)
    assert config["method"] == {"name": "kd-fkl"} and config["TrainConfig"]["steps"] == 20
    assert config["VanillaConfig"]["loss"] == "fkl" and config["RunConfig"]["out"] == str(run.folder)
    run.folder.mkdir(parents=True)
    metrics = {"config": config}
    (run.folder / "metrics.json").write_text(json.dumps(metrics))
    write_record(run.folder, "ok", "")
    assert not is_complete(run)  # the record holds another command
    record_path(run.folder).write_text(json.dumps({"status": "ok", "module": run.method.module, "argv": run.argv}))
    assert is_complete(run)
    metrics["config"]["RunConfig"]["out"] = "/elsewhere"  # a volatile setting: still the same run
    (run.folder / "metrics.json").write_text(json.dumps(metrics))
    assert is_complete(run)
    metrics["config"]["VanillaConfig"]["temperature"] = 2.0  # as if the code's default had been 2.0 back then
    (run.folder / "metrics.json").write_text(json.dumps(metrics))
    assert not is_complete(run)


def test_bad_flags():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown methods"):
        main(["--methods", "sft,nosuch", "--dry-run"])
    with pytest.raises(ConfigError, match="--suite must be one of"):
        main(["--suite", "huge"])
    with pytest.raises(ConfigError, match="equal-budget controls"):  # the tiny suite starts nothing from SFT
        main(["--suite", "tiny", "--methods", "sft", "sft-from-sft", "--dry-run"])
    with pytest.raises(ConfigError, match="--tasks names tasks that suite default does not have.*choose from ops"):
        main(["--tasks", "ops,commongen", "--dry-run"])


def test_sft_start_controls_run_only_in_sft_start_suites(tmp_path, capsys):
    # In the default suite the controls are planned with --student-start sft; in a suite without the SFT start they
    # would be the sft and kd-fkl rows again, so they are not planned at all.
    main(["--methods", "sft-from-sft", "kd-fkl-from-sft", "--dry-run", "--out", str(tmp_path)])
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 6 and all("--student-start sft" in c for c in commands)  # 2 controls x 3 seeds, ops
    main(["--suite", "tiny", "--dry-run", "--out", str(tmp_path / "tiny")])
    assert "from-sft" not in capsys.readouterr().out


def test_tasks_flag_plans_only_those_tasks(tmp_path, capsys):
    # The real suite split by task (two bench processes): --tasks commongen plans each method's commongen run only.
    (tmp_path / "data" / "commongen").mkdir(parents=True)  # planned only where the task's data folder exists
    real = ["--suite", "real", "--dry-run", "--out", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")]
    main([*real, "--methods", "sft", "kd-rkl", "--tasks", "commongen"])
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all("--task commongen" in c for c in commands)
    assert "--student-start sft" in commands[1] and "--student-start" not in commands[0]


def test_sft_start_claims_face_the_equal_budget_controls(tmp_path):
    # MiniLLM's claim: it beats the rivals of its paper's table (from scratch: SFT 32, KD 40, SeqKD 41) and the
    # equal-budget controls (SFT continued 50, forward KL from SFT 58, seeds 57 58 59 -> 58 ± 1). Ahead of four, behind
    # the last: "partly" (wins some comparisons, loses others), and the evidence names each control. Without the
    # controls in the benchmark (a suite that starts nothing from SFT) the claim is judged on its paper's rivals.
    out = tmp_path / "runs"
    table = {"sft": 32, "kd-fkl": 40, "seqkd": 41, "sft-from-sft": 50, "kd-fkl-from-sft": 58, "minillm": 55}
    for method, em in table.items():
        for seed in range(3):
            write_run(out, method, seed, em + seed - 1, 70.0, 2.0, 900.0, 20.0, 30.0, 600.0)
    methods = [METHODS[m] for m in table]
    (rep,) = bench_report.build(out, methods, [OPS], [0, 1, 2], tmp_path / "no-data")
    claims = {c["method"]: (c["verdict"], c["evidence"]) for c in rep.claims}
    verdict, evidence = claims["minillm"]
    assert (
        verdict == PARTLY
        and "sft-from-sft 50.0 ± 1.0 (yes)" in evidence
        and "kd-fkl-from-sft 58.0 ± 1.0 (no)" in evidence
    )
    assert claims["sft-from-sft"] == ("n/a", "") and claims["kd-fkl-from-sft"] == ("n/a", "")
    (rep,) = bench_report.build(out, methods[:3] + methods[5:], [OPS], [0, 1, 2], tmp_path / "no-data")
    claims = {c["method"]: (c["verdict"], c["evidence"]) for c in rep.claims}
    assert claims["minillm"][0] == YES and "from-sft" not in claims["minillm"][1]


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, "absent", ABSENT)  # every registered package exists now: one that does not
    out, path = tmp_path / "runs", tmp_path / "rep" / "BENCHMARKS.md"
    argv = ["--suite", "tiny", "--methods", "sft", "kd-fkl", "absent", "--out", str(out), "--report", str(path)]
    result = main(argv)
    methods = {m["method"]: m for m in result["tasks"]["ops"]["methods"]}
    assert methods["sft"]["status"] == "ok" and methods["kd-fkl"]["status"] == "ok"
    assert methods["absent"]["status"] == "not implemented"
    for name in ("sft", "kd-fkl"):  # the numbers are the run folder's
        saved = json.loads((run_folder(out, name, "ops", 0) / "metrics.json").read_text())
        assert methods[name]["values"]["exact_match"] == [saved["eval"]["student"]["exact_match"]]
        assert methods[name]["values"]["tokens_per_s"] == [saved["train"]["tokens_per_s"]]
        assert saved["config"]["TrainConfig"]["steps"] == 20 and saved["config"]["TrainConfig"]["batch_size"] == 16
        record = json.loads(record_path(run_folder(out, name, "ops", 0)).read_text())
        assert record["status"] == "ok" and record["command"].startswith(sys.executable)
    text = path.read_text()
    assert "| absent | - | - | - | 0/1 | - | - | - | - | not implemented |" in text
    assert (path.parent / "benchmarks-figures" / "curves-ops.png").exists()
    assert "No training curve for sft" in text  # its student is the cached SFT baseline
    # Run again: nothing is launched, the report is the same.
    capsys.readouterr()
    assert main(argv)["tasks"] == result["tasks"]  # (the tree's git state may change meanwhile: others commit)
    assert capsys.readouterr().out.count("complete, skipped") == 2


def test_in_run_claim_compares_the_students_a_run_trains_beside_its_own():
    """beats_in_run judges a recipe whose baselines are not benchmark rows (DNKD's CE and kNN-KD students)."""
    from core.bench.claims import beats_in_run
    from core.bench.collect import Cell
    from core.bench.registry import BenchTask

    task = BenchTask("t", (), ("bleu",), family="speech")
    cells = [
        Cell("m", "t", seed, "ok", Path("."), {"eval": {"student": {"bleu": 10.0 + seed}, "ce_student": {"bleu": 1.0}}})
        for seed in range(3)
    ]
    summary = Summary("m", "t", "ok", [0, 1, 2], [0, 1, 2], cells=cells)
    verdict, evidence = beats_in_run("m", ["ce_student"])({"m": summary}, task)
    assert verdict == YES and "ce_student 1.0 ± 0.0" in evidence  # 11.0 ± 1.0 against 1.0 ± 0.0: no overlap
    verdict, _ = beats_in_run("m", ["ce_student", "knn_student"])({"m": summary}, task)
    assert verdict == NOT_MEASURED  # a rival the runs never trained
    verdict, _ = beats_in_run("m", ["ce_student"], lower_is_better=True)({"m": summary}, task)
    assert verdict == NO


# Each run script's default student start (--student-start paper) is its paper's; sources in each package README.
# Before issue 29 every default was "init", so the "sft" lines fail on the old code.
PAPER_STARTS = [
    ("methods.gkd.run", [], "sft"),  # GKD: supervised fine-tuned students
    ("methods.distillm.run", [], "sft"),  # DistiLLM: the SFT checkpoint (MiniLLM's protocol)
    ("methods.dpkd.run", [], "sft"),  # DPKD: the official script starts from train/sft/gpt2-base
    ("methods.vanilla.run", ["--variant", "kd", "--loss", "rkl"], "sft"),  # reverse-KL KD as MiniLLM/DistiLLM run it
    ("methods.taid.run", [], "sft"),  # TAID: a pretrained student; the SFT student stands in for it
    ("methods.vanilla.run", [], "init"),  # forward-KL KD (Hinton et al.): from the initial student
    ("methods.vanilla.run", ["--variant", "sft"], "init"),
    ("methods.vanilla.run", ["--variant", "seqkd"], "init"),  # SeqKD (Kim & Rush): trained from scratch
    ("methods.dskd.run", [], "sft"),  # DSKD: pretrained students (gpt2-base, TinyLlama); the SFT student stands in
    ("methods.sinkhorn.run", [], "init"),
    ("methods.fdistill.run", [], "init"),  # f-DISTILL pre-distils by its own design (--pre-steps)
]


@pytest.mark.parametrize(("module", "args", "start"), PAPER_STARTS)
def test_each_run_script_starts_its_student_where_its_paper_does(module, args, start):
    config = planned_config(module, args)
    assert config["ModelConfig"]["student_start"] == start  # resolved when parsed: config.json records it
    # an explicit flag wins over the paper's default
    other = "init" if start == "sft" else "sft"
    assert planned_config(module, [*args, "--student-start", other])["ModelConfig"]["student_start"] == other


def test_registry_start_flags_agree_with_the_run_scripts_defaults():
    # The default suite plans each row with an explicit --student-start for the rows marked sft_start; that start is
    # the run script's own default, so `python -m <module>` with the row's method flags runs the benchmark's protocol.
    # MiniLLM's SFT start is its own --from-sft (true by default, it sets --student to the SFT student). Rows that
    # set their start in their own flags (taid: the earlier setting, from scratch) and the controls are exempt.
    suite = SUITES["default"]
    checked = []
    for m in METHODS.values():
        if m.family != "lm" or m.control or "--student-start" in m.args:
            continue
        args = [a.replace("{vocab_size}", "512") for a in m.args]
        planned = planned_config(m.module, [*args, *suite.start_args(m)])
        default = planned_config(m.module, args)
        start = default["ModelConfig"]["student_start"]
        if default.get("MiniLLMConfig", {}).get("from_sft"):
            start = "sft"
        assert planned["ModelConfig"]["student_start"] == start == ("sft" if m.sft_start else "init"), m.name
        checked.append(m.name)
    assert {"kd-rkl", "gkd", "distillm", "dpkd", "minillm", "taid-from-sft", "kd-fkl", "dskd-from-sft"} <= set(checked)
    # a suite without the SFT start says init explicitly for those rows (it starts nothing from SFT)
    assert SUITES["tiny"].start_args(METHODS["gkd"]) == ("--student-start", "init")
    assert not SUITES["tiny"].includes(METHODS["taid-from-sft"])

"""benchmarks/gpu_check.py at tiny size on the CPU: the very command a GPU machine runs, so it is never stale."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_tiny_cpu_run_writes_every_file(tmp_path, capsys):
    out = tmp_path / "check"
    assert _gpu_check().main(["--size", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out  # it prints where
    files = sorted(p.name for p in out.iterdir())
    assert files == ["comparison.png", "device_tests.txt", "gpu_check.json", "gpu_check.md", "timings.png"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["size"] == "tiny" and report["device"] == "cpu" and report["revision"]
    tests = report["device_tests"]
    assert tests["returncode"] == 0 and tests["counts"]["passed"] >= 20 and "failed" not in tests["counts"]
    timed = {(r["what"], r["vocab"], r["precision"]) for r in report["timings"] if r["status"] == "ok"}
    for what in ("KD plain", "KD --fused", "KD cache", "SFT", "generate (student)"):
        for vocab in (512, 2048):
            for precision in ("fp32", "bf16"):
                assert (what, vocab, precision) in timed
    rows = {r["method"]: r for r in report["comparison"]["rows"]}
    assert set(rows) == {"teacher", "SFT", "KD forward KL", "TAID", "DistiLLM"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert {r["precision_in_metrics_json"] for m, r in rows.items() if m != "teacher"} == {"fp32"}
    text = (out / "gpu_check.md").read_text()
    assert "| KD --fused | 2,048 | bf16 |" in text and "| DistiLLM |" in text


def test_a_missing_data_dir_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _gpu_check().main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_the_defaults_pick_the_device_and_size_by_themselves(tmp_path):
    """No --device or --size: cuda and gpu where torch sees a GPU, else cpu and tiny (the sections skipped)."""
    import torch

    out = tmp_path / "o"
    assert _gpu_check().main(["--skip", "tests", "timings", "comparison", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    cuda = torch.cuda.is_available()
    assert (report["device"].split(":")[0], report["size"]) == (("cuda", "gpu") if cuda else ("cpu", "tiny"))


def test_a_missing_scorer_skips_the_comparison_with_the_fix(tmp_path, monkeypatch):
    """The GPU image lacks rouge-score (benchmarks/gpu_results.md): one line that says so, not four failed runs."""
    import importlib

    import torch

    module = _gpu_check()
    real = importlib.import_module

    def without_metrics(name, *args):
        if name == "core.metrics":
            raise ModuleNotFoundError("No module named 'rouge_score'")
        return real(name, *args)

    monkeypatch.setattr(module.importlib, "import_module", without_metrics)
    found = module.run_comparison(module.SIZES["tiny"]["compare"], torch.device("cpu"), "fp32", None, tmp_path, 1e18)
    assert found["rows"] == [] and "rouge_score" in found["skipped"] and "gpu_results.md" in found["skipped"]

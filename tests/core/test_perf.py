"""benchmarks/perf.py at its smallest: every case runs, and the KD step goes through the public KD-path flags."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _perf():
    spec = importlib.util.spec_from_file_location("perf", ROOT / "benchmarks" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf"] = module  # a dataclass looks up its module while it is being defined
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_measures_every_kd_path(tmp_path):
    out = tmp_path / "perf.md"
    _perf().main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert "error" not in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 512 | ")}
    for loop in ("plain", "kd", "kd --chunk-size 512", "kd --fused", "sft"):
        assert loop in rows, loop
    for loop in ("kd --teacher-cache --teacher-cache-k 64 --fused", "kd --teacher-cache --teacher-cache-k 64"):
        assert rows[loop].endswith("| 1.00 |"), rows[loop]  # hit rate: every training batch came from the cache
    # the real-LLM section (toy models at --smoke): every row, each against the plain loop of its batches
    real = {
        line.split(" | ")[0][2:]: line for line in text.split("## Real LLM")[1].splitlines() if line.startswith("| ")
    }
    for loop in ("plain SFT (seeded order)", "plain SFT", "sft", "plain KD (seeded order)", "plain KD", "kd"):
        assert loop in real, loop
    assert real["kd"].endswith("| fused+cache(k=64, forward KL) |")  # the default on a pretrained teacher
    assert real["kd --teacher-cache false"].endswith("| fused |")
    assert "KD step from the cache / SFT step" in text
    # the rows without "(seeded order)" draw the batches a run with a pretrained teacher draws: length-grouped
    # (core.pipeline.default_length_group), so less padding than the seeded order at the same examples (16.7 % -> 4.8 % here)
    padding = {
        name: float(real[name].split(" | ")[1].rstrip("%"))
        for name in ("plain SFT (seeded order)", "plain SFT", "sft", "kd")
    }
    assert padding["plain SFT"] == padding["sft"] == padding["kd"] < padding["plain SFT (seeded order)"]


def test_a_kd_step_case_trains_on_the_path_its_flags_select():
    perf = _perf()
    flags = "--teacher-cache-k 8 --teacher-cache --fused"
    result = perf.step_case("kd", vocab=64, steps=1, warmup=1, flags=flags, shape="smoke")
    # 2 steps x batch 2 = 4 examples, each looked up once per step, all in the cache built over them
    assert result["kd_path"] == {
        "path": "fused+cache(k=8)",
        "cache": result["kd_path"]["cache"] | {"k": 8, "hit_rate": 1.0, "hits": 4, "misses": 0},
    }
    assert perf.step_case("kd", vocab=64, steps=1, warmup=1, flags="--chunk-size 3", shape="smoke")["kd_path"] == {
        "path": "chunked"
    }


def test_the_store_generation_case_samples_the_same_tokens_in_both_loops_of_32():
    # 40 rollouts: loops of 32 + 8 (reference and lean, the same seeds: the same tokens), and one loop of 40 for the
    # chunks of 64 and 256; 4 new tokens each with EOS off, so every row samples 160 tokens.
    result = _perf().store_generation_case("smoke", repeats=1, rollouts=40)
    assert result["same_tokens_32"] is True
    assert [(r["loop"], r["chunk"], r["precision"]) for r in result["rows"]] == [
        ("reference", 32, "fp32"),
        ("lean", 32, "fp32"),
        ("lean", 64, "fp32"),
        ("lean", 256, "fp32"),
        ("lean", 64, "bf16"),
        ("lean", 256, "bf16"),
    ]
    assert all(r["tokens"] == 40 * 4 and r["s"] > 0 for r in result["rows"])


def test_timing_only_cases_run_with_the_allocator_and_threads_a_run_has(monkeypatch):
    # The mmap threshold and passive OpenMP waiting serve the memory and CPU-time cases; the sampling cases measure
    # wall time only and run without them, unless the caller set them itself.
    perf = _perf()
    for name in perf.MEMORY_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert all(perf.child_env("step")[name] == perf.CHILD_ENV[name] for name in perf.MEMORY_SETTINGS)
    for kind in ("generation", "store_generation"):
        env = perf.child_env(kind)
        assert not set(perf.MEMORY_SETTINGS) & set(env) and env["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert perf.child_env("generation")["OMP_WAIT_POLICY"] == "ACTIVE"

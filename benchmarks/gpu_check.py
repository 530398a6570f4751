"""The GPU check: one prepared command that proves the GPU path the moment a machine is there (issue 33).

    python benchmarks/gpu_check.py                      # --size gpu on CUDA (at most about 8 minutes on one H100),
                                                        # --size tiny elsewhere (under 2 minutes on a CPU)
    python benchmarks/gpu_check.py --size tiny --device cpu --out /tmp/gpu-check
    python benchmarks/gpu_check.py --data-dir shared/data/multi30k   # the comparison on Multi30k de-en (carried)
    nox -s gpu

It runs, in one process tree and in this order:
1. the device tests (`pytest -m device`, tests/core/test_device.py) on the chosen device: losses, the plain, chunked,
   fused and cached KD paths, the teacher cache, generation and the Trainer's exact resume, each against a CPU
   float64 reference, in float32 and under bf16 autocast;
2. timings of one optimizer step of KD (plain, --fused, the teacher cache) and of SFT, and of generation, in fp32
   and bf16, at two vocabularies: tokens/s and peak memory (torch.cuda.max_memory_allocated; n/a on a CPU, where
   only the process's peak RSS is known, reported once). Sizes: gpu = a 12 x 768 teacher and a 4 x 256 student,
   batch 32 x 512, vocabularies 32,000 and 151,936; tiny = 2 x 64 and 1 x 32, batch 4 x 32, vocabularies 512 and
   2,048. A configuration that runs out of memory is recorded as OOM (that is a result: plain KD at 151k);
3. a small comparison trained end to end with the run scripts (teacher, SFT, KD forward KL, TAID, DistiLLM) on the
   embedded task (generated, so it travels with the tree), or on Multi30k de-en when --data-dir names it (the data
   may not be committed: ../shared/data/SOURCES.md; carry it to the machine);
and writes everything into one folder (--out, default runs/gpu_check/<size>-<device>): gpu_check.json (every
number, the revision and the machine), gpu_check.md (the tables), device_tests.txt (pytest's output),
timings.png and comparison.png. It prints the folder. Nothing is downloaded; nothing outside the tree is read
unless --data-dir says so. Exit status: 1 when a device test failed (everything else still ran and was written).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core  # noqa: E402,F401  (first: OMP_WAIT_POLICY, see core/__init__.py)

# name -> (teacher layers, hidden, heads, mlp), (student ...), batch, sequence, vocabularies, timed steps,
# generation (prompts, prompt tokens, new tokens), comparison budget
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "teacher": (12, 768, 12, 3072),
        "student": (4, 256, 4, 1024),
        "batch": 32,
        "seq": 512,
        "vocabs": (32_000, 151_936),
        "steps": 3,
        "generate": (32, 64, 128),
        "compare": {
            "teacher_steps": 1000, "steps": 300, "batch": 64, "train_size": None, "eval_size": 200,
            "teacher_preset": "teacher", "student": "student", "val_size": 100,
        },
    },
    "tiny": {
        "teacher": (2, 64, 2, 128),
        "student": (1, 32, 2, 64),
        "batch": 4,
        "seq": 32,
        "vocabs": (512, 2048),
        "steps": 2,
        "generate": (4, 8, 8),
        "compare": {
            "teacher_steps": 30, "steps": 12, "batch": 8, "train_size": 160, "eval_size": 8,
            "teacher_preset": "teacher-small", "student": "tiny", "val_size": 16,
        },
    },
}  # fmt: skip
CACHE_K, CACHE_SAMPLES = 64, 64  # the teacher cache's defaults (core.kdpath)
COMPARISON = [  # (row, run script, flags): the bench's own rows (core/bench/registry.py)
    ("SFT", "methods.vanilla.run", ["--variant", "sft"]),
    ("KD forward KL", "methods.vanilla.run", ["--variant", "kd", "--loss", "fkl"]),
    ("TAID", "methods.taid.run", ["--compare", ""]),
    ("DistiLLM", "methods.distillm.run", ["--compare", "", "--student-start", "sft"]),
]


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["auto", "tiny", "gpu"], default="auto", help="auto: gpu on CUDA, else tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="of the comparison (timings run both); auto: bf16 on CUDA, fp32 elsewhere")  # fmt: skip
    parser.add_argument("--out", default=None, help="result folder (default runs/gpu_check/<size>-<device>)")
    parser.add_argument("--data-dir", default=None, help="Multi30k folder (train.de, train.en, ...) for the comparison")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "timings", "comparison"])
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no comparison run starts after this many seconds (a GPU lease is short)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "gpu_check: --device cuda, but torch sees no CUDA device here; use --device cpu or auto\n")
    if args.data_dir and not (Path(args.data_dir) / "train.de").is_file():
        parser.exit(2, f"gpu_check: --data-dir {args.data_dir} holds no Multi30k train.de; pass the multi30k folder\n")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    size = args.size if args.size != "auto" else ("gpu" if device.type == "cuda" else "tiny")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    out = Path(args.out or ROOT / "runs" / "gpu_check" / f"{size}-{device.type}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "size": size,
        "device": str(device),
        "machine": machine(device),
        "revision": revision(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_average": os.getloadavg()[0],
    }
    failed = False
    if "tests" not in args.skip:
        report["device_tests"] = run_device_tests(device, out / "device_tests.txt")
        failed = report["device_tests"]["returncode"] != 0
        print(f"[gpu_check] device tests: {report['device_tests']['summary']}", flush=True)
    if "timings" not in args.skip:
        report["timings"] = run_timings(SIZES[size], device)
    if "comparison" not in args.skip:
        from core.precision import use_precision  # the run scripts set the process's precision: restored after

        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work, use_precision(precision):
            deadline = t0 + args.budget_s
            compare = SIZES[size]["compare"]
            report["comparison"] = run_comparison(compare, device, precision, args.data_dir, Path(work), deadline)
    report["wall_s"] = time.perf_counter() - t0
    report["peak_rss_mb"] = _rss_mb()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(render(report))
    plot(report, out)
    print(f"[gpu_check] {report['wall_s']:.0f} s; results in {out}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# 1. the device tests
# ----------------------------------------------------------------------------------------------------------------


def run_device_tests(device, log: Path) -> dict[str, Any]:
    env = {**os.environ, "DISTILLAB_TEST_DEVICE": str(device)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "device",
        "-p",
        "no:cacheprovider",
        "tests/core/test_device.py",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(f"$ DISTILLAB_TEST_DEVICE={device} {' '.join(command[1:])}\n" + proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1] if lines else "")}
    return {
        "returncode": proc.returncode,
        "summary": lines[-1].strip("= ") if lines else f"no summary (exit {proc.returncode}; see device_tests.txt)",
        "counts": counts,
        "wall_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------------------------
# 2. timings
# ----------------------------------------------------------------------------------------------------------------


def _llama(shape: tuple[int, int, int, int], vocab: int, seq: int, device, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, mlp = shape
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=seq + 256, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def _features(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """n examples of exactly `seq` tokens: a prompt of seq / 8 tokens, the rest completion (what KD trains on)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt = max(1, seq // 8)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(device, fn, repeats: int) -> dict[str, Any]:
    """fn() once to warm up, then `repeats` timed calls: seconds per call and peak memory (CUDA only)."""
    import torch

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            result = fn()
        _sync(device)
        seconds = (time.perf_counter() - t0) / repeats
    except torch.OutOfMemoryError:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        return {"status": "OOM"}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"status": "ok", "s_per_call": seconds, "peak_mem_mb": peak, "result": result}


def run_timings(size: dict[str, Any], device) -> list[dict[str, Any]]:
    import torch

    from core.data import Collator
    from core.generate import sample_completions
    from core.kdpath import CACHE_SEED
    from core.logit_cache import get_logit_cache
    from core.losses import get_divergence
    from core.objectives import causal_lm_loss, make_kd_loss
    from core.precision import autocast

    rows: list[dict[str, Any]] = []
    batch_n, seq, repeats = size["batch"], size["seq"], size["steps"]
    n_prompts, prompt_len, new_tokens = size["generate"]
    fkl = get_divergence("fkl")
    for vocab in size["vocabs"]:
        features = _features(batch_n, seq, vocab)
        batch = {k: v.to(device) for k, v in Collator(0)(features).items()}
        tokens = int(batch["attention_mask"].sum())
        teacher = _llama(size["teacher"], vocab, seq, device, seed=0).eval().requires_grad_(False)
        with tempfile.TemporaryDirectory(prefix="gpu_check-cache-") as cache_dir:
            t_build = time.perf_counter()
            cache = get_logit_cache(
                teacher, features, cache_dir, tokenizer_key="gpu_check", pad_token_id=0, k=CACHE_K,
                samples=CACHE_SAMPLES, seed=CACHE_SEED, batch_size=max(1, batch_n // 4),
            )  # fmt: skip
            _sync(device)
            build_s = time.perf_counter() - t_build
            paths = {
                "KD plain": make_kd_loss(teacher, fkl),
                "KD --fused": make_kd_loss(teacher, fkl, fused=True),
                "KD cache": make_kd_loss(None, fkl, teacher_cache=cache),
                "SFT": causal_lm_loss,
            }
            for precision in ("fp32", "bf16"):
                for name, loss_fn in paths.items():
                    student = _llama(size["student"], vocab, seq, device, seed=1).train()
                    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

                    def step(
                        loss_fn=loss_fn,
                        student=student,
                        optimizer=optimizer,
                        precision=precision,
                        batch=batch,
                        n=tokens,
                    ):
                        optimizer.zero_grad(set_to_none=True)
                        with autocast(device, precision):
                            out = loss_fn(student, batch)
                        (out.loss_sum / n).backward()
                        optimizer.step()

                    found = _measure(device, step, repeats)
                    found.pop("result", None)
                    row = {"what": name, "vocab": vocab, "precision": precision, "tokens": tokens, **found}
                    if name == "KD cache":
                        row["cache_build_s"] = build_s
                        row["cache_bytes_per_token"] = cache.bytes_per_token
                    rows.append(_finish(row, tokens))
                    del student, optimizer
                student = _llama(size["student"], vocab, seq, device, seed=1)
                prompts = [f["input_ids"][:prompt_len] for f in features[:n_prompts]]

                def decode(student=student, precision=precision, prompts=prompts):
                    completions = sample_completions(
                        student, prompts, eos_token_id=2, pad_token_id=0, max_new_tokens=new_tokens,
                        do_sample=False, precision=precision,
                    )  # fmt: skip
                    return sum(len(c) for c in completions)  # new tokens (a row stops at EOS, id 2: rare, counted)

                found = _measure(device, decode, 1)
                row = {"what": "generate (student)", "vocab": vocab, "precision": precision, **found}
                rows.append(_finish(row, found.pop("result", None) or n_prompts * new_tokens))
                del student
        del teacher
        print(f"[gpu_check] timings at vocabulary {vocab} done", flush=True)
    return rows


def _finish(row: dict[str, Any], tokens: int) -> dict[str, Any]:
    row["tokens"] = tokens
    if row["status"] == "ok":
        row["tokens_per_s"] = tokens / row["s_per_call"]
    return row


# ----------------------------------------------------------------------------------------------------------------
# 3. the comparison
# ----------------------------------------------------------------------------------------------------------------


def run_comparison(
    budget: dict[str, Any], device, precision: str, data_dir: str | None, work: Path, deadline: float
) -> dict[str, Any]:
    if data_dir:
        task = ["--task", "multi30k", "--data-dir", data_dir, "--source-lang", "de", "--target-lang", "en"]
        task += ["--vocab-size", "8000"]
        name, metric = "multi30k-de-en", "bleu"
    else:
        task, name, metric = ["--task", "ops"], "ops (embedded, generated)", "exact_match"
    common = [
        *task,
        "--teacher-preset", budget["teacher_preset"], "--teacher-steps", str(budget["teacher_steps"]),
        "--student", budget["student"], "--steps", str(budget["steps"]), "--batch-size", str(budget["batch"]),
        "--eval-size", str(budget["eval_size"]), "--device", device.type, "--precision", precision,
        "--cache-dir", str(work / "cache"), "--checkpoint-every", "0",
    ]  # fmt: skip
    if budget["train_size"]:
        common += ["--train-size", str(budget["train_size"])]
    try:  # the scorers the run scripts evaluate with; a GPU image may lack them (benchmarks/gpu_results.md)
        importlib.import_module("core.metrics")
    except ImportError as exc:
        why = f"skipped: {exc} (carry its wheel: benchmarks/gpu_results.md)"
        return {"task": name, "metric": metric, "precision": precision, "budget": budget, "skipped": why, "rows": []}
    rows: list[dict[str, Any]] = []
    teacher: dict[str, Any] | None = None
    for label, module, flags in COMPARISON:
        extra = ["--val-size", str(budget["val_size"])] if module.endswith("distillm.run") else []
        argv = [*common, *flags, *extra, "--out", str(work / "runs" / label.replace(" ", "_"))]
        t0 = time.perf_counter()
        if t0 > deadline:
            rows.append({"method": label, "status": "skipped: past --budget-s"})
            continue
        try:
            metrics = importlib.import_module(module).main(argv)
        except (Exception, SystemExit) as exc:  # a failed row is a result; the others still run
            rows.append({"method": label, "status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        wall = time.perf_counter() - t0
        student = metrics["eval"]["student"]
        teacher = teacher or metrics["eval"].get("teacher")
        rows.append(
            {
                "method": label,
                "status": "ok",
                metric: student.get(metric),
                "perplexity": student.get("perplexity"),
                "tokens_per_s": metrics["train"].get("tokens_per_s"),
                "peak_mem_mb": metrics["train"].get("peak_mem_mb"),
                "wall_s": wall,
                "precision_in_metrics_json": metrics["config"]["RunConfig"]["precision"],
                "kd_path": metrics["train"].get("kd_path"),
            }
        )
        print(f"[gpu_check] comparison: {label} done ({wall:.0f} s)", flush=True)
    if teacher is not None:
        rows.insert(0, {"method": "teacher", "status": "ok", metric: teacher.get(metric),
                        "perplexity": teacher.get("perplexity")})  # fmt: skip
    return {"task": name, "metric": metric, "precision": precision, "budget": budget, "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------


def revision() -> str:
    from core.results import git_revision

    return git_revision()


def machine(device) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU threads, {platform.machine()}, torch {torch.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {cpu}"
    return cpu


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({report['size']} size, {report['device']})",
        "",
        f"`{report['command']}` at revision {report['revision']} on {report['machine']}, "
        f"{report['started_utc']} UTC, load average {report['load_average']:.2f}, {report['wall_s']:.0f} s in all.",
        "",
    ]
    tests = report.get("device_tests")
    if tests:
        lines += ["## Device tests (`pytest -m device`)", "", f"{tests['summary']} ({tests['wall_s']:.0f} s).", ""]
    timings = report.get("timings")
    if timings:
        lines += [
            "## One optimizer step (KD, SFT) and generation",
            "",
            "Peak memory: torch.cuda.max_memory_allocated per configuration (n/a on a CPU; the process's peak RSS "
            f"was {report['peak_rss_mb']:,.0f} MB). Generation: greedy, tokens/s counts new tokens.",
            "",
            "| what | vocab | precision | tokens/s | s per call | peak MB | note |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for row in timings:
            note = row["status"] if row["status"] != "ok" else ""
            if "cache_build_s" in row:
                note += f"cache built in {row['cache_build_s']:.2f} s, {row['cache_bytes_per_token']:.0f} B/token"
            lines.append(
                f"| {row['what']} | {row['vocab']:,} | {row['precision']} | {_num(row.get('tokens_per_s'), 0)} | "
                f"{_num(row.get('s_per_call'), 4)} | {_num(row.get('peak_mem_mb'), 0)} | {note} |"
            )
        lines.append("")
    comparison = report.get("comparison")
    if comparison:
        metric = comparison["metric"]
        budget = comparison["budget"]
        lines += [
            f"## Comparison on {comparison['task']} ({comparison['precision']})",
            "",
            f"Teacher preset {budget['teacher_preset']} ({budget['teacher_steps']} steps), student "
            f"{budget['student']}, {budget['steps']} steps of {budget['batch']}, {budget['eval_size']} evaluation "
            "examples, one seed (0): a check that the path trains, not a ranking.",
            "",
            "Peak MB: the run's metrics.json (CUDA: max_memory_allocated; CPU: the process's peak RSS).",
            "",
            *([f"**{comparison['skipped']}**", ""] if comparison.get("skipped") else []),
            f"| method | {metric} | perplexity | train tokens/s | peak MB | wall s | status |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in comparison["rows"]:
            lines.append(
                f"| {row['method']} | {_num(row.get(metric), 3)} | {_num(row.get('perplexity'), 2)} | "
                f"{_num(row.get('tokens_per_s'), 0)} | {_num(row.get('peak_mem_mb'), 0)} | "
                f"{_num(row.get('wall_s'), 0)} | {row['status']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timings = [r for r in report.get("timings", []) if r["status"] == "ok"]
    if timings:
        labels = [f"{r['what']}\nV={r['vocab']:,} {r['precision']}" for r in timings]
        colors = ["tab:blue" if r["precision"] == "fp32" else "tab:orange" for r in timings]
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 4))
        ax.bar(range(len(labels)), [r["tokens_per_s"] for r in timings], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("tokens/s (blue fp32, orange bf16)")
        ax.set_title(f"gpu_check timings ({report['size']}, {report['device']})")
        fig.tight_layout()
        fig.savefig(out / "timings.png", dpi=110)
        plt.close(fig)
    comparison = report.get("comparison")
    rows = [r for r in (comparison or {}).get("rows", []) if r.get(comparison["metric"]) is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["method"] for r in rows], [r[comparison["metric"]] for r in rows], color="tab:green")
        ax.set_ylabel(comparison["metric"])
        ax.set_title(f"{comparison['task']} ({comparison['precision']})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Every package's default run, from an empty cache, timed (issue 31, item 4).

    python benchmarks/default_runs.py                          # every package, one after another
    python benchmarks/default_runs.py --packages methods.minillm methods.delta_kd --json runs.json

Each package runs as a user runs it, `python -m <package>.run` with no flags, in a fresh process with a fresh cache
folder (`--cache-dir`, empty: the embedded teacher and every baseline are trained from nothing) and a fresh run
folder (`--out`), both removed afterwards. Measured per run: wall time, the child's CPU time (user + system, from
os.wait4), its peak resident memory, the exit status, and the machine's 1-minute load average just before it starts
(alone means the load is about 0 there). The threads are torch's default (every core) unless --threads sets
OMP_NUM_THREADS. Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "methods.vanilla",
    "methods.taid",
    "methods.distillm",
    "methods.gkd",
    "methods.dpkd",
    "methods.dskd",
    "methods.minillm",
    "methods.fdistill",
    "methods.sinkhorn",
    "methods.delta_kd",
    "methods.phis",
    "methods.kdexplainer",
    "methods.scaling_laws",
    "methods.disco",
    "speech.dnkd",
    "unlearning.whp",
    "privacy.hot_pate",
)
TARGET_S = 300  # issue 31: every default run within 5 minutes alone on two cores


def run_one(package: str, threads: int | None, timeout: int) -> dict:
    """One default run in a fresh cache; its row."""
    work = Path(tempfile.mkdtemp(prefix="default-run-"))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", f"{package}.run", "--cache-dir", str(work / "cache"), "--out", str(work / "run")]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    log = (work / "log.txt").open("w")
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    status, usage, timed_out = None, None, False
    while status is None:
        pid, raw, usage_now = os.wait4(child.pid, os.WNOHANG)
        if pid:
            status, usage = raw, usage_now
        elif time.perf_counter() - start > timeout:
            child.kill()
            _, status, usage = os.wait4(child.pid, 0)
            timed_out = True
        else:
            time.sleep(0.5)
    wall = time.perf_counter() - start
    log.close()
    tail = (work / "log.txt").read_text(errors="replace").splitlines()[-3:]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "package": package,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_mb": round(usage.ru_maxrss / 1024),  # Linux: kilobytes
        "exit": "timeout" if timed_out else os.waitstatus_to_exitcode(status),
        "load_at_start": round(load, 2),
        "threads": threads or "default",
        "tail": tail,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=PACKAGES, metavar="PACKAGE")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS (default: torch's, every core)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before a run is stopped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(
        f"git {revision.stdout.strip()}, {platform.machine()}, {os.cpu_count()} cpus, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rows = []
    for package in args.packages:
        row = run_one(package, args.threads, args.timeout)
        rows.append(row)
        print(f"{package}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, exit {row['exit']}, load {row['load_at_start']}",
              flush=True)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"revision": revision.stdout.strip(), "rows": rows}, indent=1))
    print(
        "\n| package | wall s | CPU s | peak MB | exit | load at start | within 5 min |\n|---|---:|---:|---:|---|---:|---|"
    )
    for r in rows:
        ok = "yes" if r["exit"] == 0 and r["wall_s"] <= TARGET_S else "no"
        print(f"| {r['package']} | {r['wall_s']:,.0f} | {r['cpu_s']:,.0f} | {r['peak_mb']:,} | {r['exit']} | "
              f"{r['load_at_start']} | {ok} |")  # fmt: skip


if __name__ == "__main__":
    main()

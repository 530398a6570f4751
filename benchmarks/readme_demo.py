"""Regenerate the README's demo block from a demo run, so the README shows what `nox -s demo` prints.

    python benchmarks/readme_demo.py                    # runs the demo as a user does (fresh cache, no thread
                                                        # settings), then rewrites the block (about 3 minutes)
    python benchmarks/readme_demo.py --run-dir DIR      # rewrite it from an existing demo run's metrics.json

The block lies between `<!-- demo:start -->` and `<!-- demo:end -->` in README.md. It holds the table the run
printed (core.shell.summary_rows, the same rows and columns), the date, the revision and the thread count, so a
reader can tell which command and machine made it. Not a test: the demo takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.results import format_table  # noqa: E402
from core.shell import summary_rows  # noqa: E402

START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def render_block(metrics: dict, revision: str, date: str, threads: str) -> str:
    evals = metrics["eval"]
    # metrics.json is written with sorted keys; the run prints the task's metrics first, then perplexity
    columns = metrics.get("summary_columns") or sorted(
        (c for c in evals["student"] if "/" not in c), key=lambda c: (c == "perplexity", c)
    )
    table = format_table(summary_rows(evals, metrics["method"]), columns)
    return (
        f"{START}\n```\n{table.rstrip()}\n```\n"
        f"(`python -m methods.taid.run` from an empty cache, {date}, git {revision}, torch threads {threads})\n{END}"
    )


def replace_block(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block to replace")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def revision() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return rev.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished demo run folder (holds metrics.json)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    if args.run_dir is None:
        work = Path(tempfile.mkdtemp(prefix="readme-demo-"))
        args.run_dir = work / "run"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        cmd = [sys.executable, "-m", "methods.taid.run", "--cache-dir", str(work / "cache"), "--out", str(args.run_dir)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    path = args.run_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass the folder of a finished demo run")
    metrics = json.loads(path.read_text())
    # env.machine reads "x86_64 2 cpus, torch threads 2" (core.results.env_info)
    threads = str(metrics.get("env", {}).get("machine", "?")).rsplit("torch threads ", 1)[-1]
    rev = metrics.get("env", {}).get("git") or revision()  # the run's own revision, when it recorded one
    date = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d")
    args.readme.write_text(replace_block(args.readme.read_text(), render_block(metrics, rev, date, threads)))
    print(f"rewrote the demo block of {args.readme} from {path}")


if __name__ == "__main__":
    main()

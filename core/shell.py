"""The run shell: what every run script shares, whatever it trains (a causal LM, a speech model, a classifier,
an ensemble, a grid of small models).

    flags (typed dataclasses) -> run folder (refuse other settings, resume, skip a complete run) -> seeding
    -> the recipe's body -> metrics.json (one schema) -> the printed summary table

A family writes its recipe as a `Recipe` whose `body(ctx)` builds data, models and teachers, trains with
core.train.Trainer (through `ctx.trainer`) and evaluates; it returns an `Outcome`. The shell knows nothing of
text: the LLM recipe (core.pipeline) is one recipe among others, built on this same shell.

    RECIPE = Recipe(name="dnkd", family="speech", configs=(SpeechData, TrainConfig, DNKDConfig), body=body)
    def main(argv=None): return run_recipe(RECIPE, argv)
    if __name__ == "__main__": cli(main)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import RunConfig, cache_root, parse, to_dict
from core.errors import ConfigError, DistillError, NonFiniteLossError, OutputDirError, ResourceError, out_of_memory
from core.io import atomic_dir, atomic_write_json, cached_folder, free_space, stable_hash  # noqa: F401 (cached_folder: re-exported)
from core.results import env_info, format_table, prepare_run_dir, read_metrics, write_metrics

# What a recipe trains and is judged on; the benchmark runs a method only on tasks of its family.
#   lm: a causal LM distilled on a text task      speech: speech translation      unlearning: forget/retain
#   privacy: teacher ensembles under a budget      vision: image features/classes  analysis: grids of small models
#   classification: a text classifier             transfer: pretrain on A, fine-tune on B, distill on B
FAMILIES = ("lm", "speech", "unlearning", "privacy", "vision", "analysis", "classification", "transfer")


@dataclass
class Recipe:
    """One run script: its settings and its body. The shell does the rest."""

    name: str  # method name in metrics.json and the benchmark
    family: str  # one of FAMILIES: which benchmark tasks it runs on
    configs: tuple[type, ...]  # settings dataclasses parsed from the flags; the shell adds RunConfig
    body: Callable[[RunContext], Outcome | None]  # None: stopped early (--stop-after); the same command resumes
    task: Callable[[RunContext], str] | None = None  # task name for the default run folder (default "default")
    label: Callable[[RunContext], str] | None = None  # run name from the settings (default: name)
    description: str = ""  # shown by --help
    # fills in, right after parsing, defaults that depend on other settings (the LLM recipe: --student-start paper
    # becomes the method's paper start), so that config.json records what the run does
    settle: Callable[[RunContext], None] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Recipe {self.name}: family must be one of {FAMILIES}, got {self.family!r}")


@dataclass
class Outcome:
    """What a recipe's body measured; the shell writes it into metrics.json."""

    task: str
    eval: dict[str, dict[str, float]]  # "student" (required), "teacher", "<baseline>_student", ...
    train: dict[str, Any]  # e.g. dataclasses.asdict(TrainResult) and anything else about training
    extra: dict[str, Any] = field(default_factory=dict)  # further top-level keys of metrics.json
    columns: list[str] | None = None  # eval metrics shown in the printed table (default: all of "student")


@dataclass
class RunContext:
    """What a recipe's body may use: its settings, its run folder, the cache, the accelerator."""

    name: str
    family: str
    out: Path
    cache: Path
    seed: int
    configs: dict[type, Any]
    run: RunConfig
    _accelerator: Any = None

    def cfg(self, cls: type) -> Any:
        """The parsed instance of one of the recipe's settings dataclasses."""
        try:
            return self.configs[cls]
        except KeyError:
            raise KeyError(f"{cls.__name__} is not among this recipe's configs") from None

    @property
    def accelerator(self):
        """Accelerate's Accelerator, created on first use (an analysis recipe may never need one)."""
        if self._accelerator is None:
            self._accelerator = make_accelerator(self.run)
        return self._accelerator

    @property
    def is_main_process(self) -> bool:
        from accelerate import PartialState

        return PartialState(cpu=cpu_only(self.run)).is_main_process

    def trainer(self, model, loss_fn, features, collate, train, subdir: str | None = None, **kwargs):
        """A core.train.Trainer writing into the run folder (or run folder/subdir, e.g. for a baseline)."""
        from core.train import Trainer

        out = self.out / subdir if subdir else self.out
        kwargs.setdefault("desc", subdir or self.name)
        return Trainer(model, loss_fn, features, collate, train, out, self.accelerator, **kwargs)

    def cached(self, kind: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """The cache folder <cache>/<kind>/<hash of key>, built once by `build(tmp_folder)`.

        The key holds everything that determines the artefact and nothing else. Concurrent runs that want the
        same entry wait on a file lock while one builds it; the folder appears by atomic rename, so a reader never
        sees half of it, and a builder killed midway leaves nothing that looks complete."""
        return cached_folder(self.cache / kind, key, build)


def make_accelerator(run: RunConfig):
    """The Accelerator of a run; a device that is not there is refused, never silently replaced."""
    import torch
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    if run.device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: no MPS device is available here; use --device cpu or auto")
    from core.precision import set_precision

    # transformers' own per-file progress bars would interleave with ours on every save and load.
    hf_logging.disable_progress_bar()
    set_precision(run.precision)  # what core.train and core.generate autocast to (core/precision.py)
    return Accelerator(cpu=cpu_only(run))


def cpu_only(run: RunConfig) -> bool:
    """Whether the run uses the CPU alone: --device cpu, or auto on a machine with no accelerator. Accelerate is
    told so (cpu=True), which is also what makes it join the processes of a CPU multi-process launch (torchrun,
    accelerate launch) into one gloo group; without it each process of such a launch runs alone."""
    import torch

    if run.device == "cpu":
        return True
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return run.device == "auto" and not torch.cuda.is_available() and not mps


def parse_recipe(recipe: Recipe, argv: list[str] | None) -> RunContext:
    """Parse the flags into a RunContext (no folder created, nothing imported that the recipe does not need)."""
    description = recipe.description or module_doc(recipe.body)
    instances = parse((*recipe.configs, RunConfig), argv, prog=_prog(), description=description or None)
    configs = {type(c): c for c in instances}
    run = configs.pop(RunConfig)
    seeds = [c.seed for c in instances if hasattr(c, "seed")]
    ctx = RunContext(recipe.name, recipe.family, Path("."), cache_root(run), seeds[0] if seeds else 0, configs, run)
    if recipe.settle:
        recipe.settle(ctx)
    ctx.name = recipe.label(ctx) if recipe.label else recipe.name
    task = recipe.task(ctx) if recipe.task else "default"
    ctx.out = Path(run.out or Path("runs") / ctx.name / task / f"seed{ctx.seed}")
    return ctx


def module_doc(obj: Any) -> str:
    """The docstring of the module that defines `obj`: a run script's says what it does and shows the commands."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    return (getattr(module, "__doc__", None) or "").strip()


def _prog() -> str | None:
    """`python -m methods.taid.run` for --help's usage line when the script runs as a module (argparse's default is
    the file name, run.py, which every package shares)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else None


def run_config(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """config.json's content: every setting, grouped by dataclass, and the method's name and family."""
    config = to_dict(*ctx.configs.values(), ctx.run)
    config["method"] = {"name": ctx.name} | ({"family": recipe.family} if recipe.family != "lm" else {})
    return config


def config_of(recipe: Recipe, argv: list[str]) -> dict[str, Any]:
    """The configuration a command line stands for (the benchmark compares it with a run folder's)."""
    return run_config(recipe, parse_recipe(recipe, argv))


def run_recipe(recipe: Recipe, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, prepare the run folder, seed, run the body, write metrics.json, print the table.

    A complete run folder of the same configuration is shown, not rerun; an interrupted one resumes (the body's
    Trainers find their checkpoints); one of another configuration is refused unless --overwrite. A bad input
    found after the folder was created removes it again (when this call created it and no step completed)."""
    ctx = parse_recipe(recipe, argv)
    config = run_config(recipe, ctx)
    out = ctx.out
    done = read_metrics(out)
    if done is not None and done.get("config", {}).get("method") == config["method"] and not ctx.run.overwrite:
        prepare_run_dir(out, config, ctx.run.overwrite)  # refuses a different configuration
        print(f"[{ctx.name}] {out} is complete; showing its results (pass --overwrite to run again)", file=sys.stderr)
        print_summary(done)
        return done
    _make_cache(ctx.cache)
    created = not out.exists()
    with _run_lock(out) if ctx.is_main_process else contextlib.nullcontext():
        return _run_locked(recipe, ctx, config, created)


def _make_cache(cache: Path) -> None:
    """Create the cache folder up front: one that cannot be created (under /proc, through a file, on a read-only
    disk) is refused in one line before any work, rather than by the first write deep inside a recipe."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the cache folder {cache} ({exc.strerror or exc}); pass a writable --cache-dir "
            "(or set DISTILLAB_CACHE)"
        ) from exc
    if not cache.is_dir():
        raise ConfigError(f"the cache folder {cache} is not a folder; pass a folder as --cache-dir")


def run_lock_path(out: Path) -> Path:
    """The lock a live run holds on its folder (beside it, so that --overwrite can delete the folder)."""
    return out.parent / f".{out.name}.lock"


def run_is_live(out: Path) -> bool:
    """Whether another process holds the run folder's lock right now (core.bench skips such a run)."""
    from filelock import FileLock, Timeout

    lock_path = run_lock_path(out)
    if not lock_path.exists():
        return False
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


@contextlib.contextmanager
def _run_lock(out: Path):
    """One live run per run folder: a second one started with the same --out is refused at once."""
    from filelock import FileLock, Timeout

    lock_path = run_lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputDirError(
            f"another run is writing to {out} right now (it holds {lock_path}); wait for it to finish, "
            "or choose another --out"
        ) from None
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to the output folder {out} ({exc.strerror}); choose a writable --out"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _run_locked(recipe: Recipe, ctx: RunContext, config: dict[str, Any], created: bool) -> dict[str, Any]:
    out = ctx.out
    try:
        if ctx.is_main_process:
            prepare_run_dir(out, config, ctx.run.overwrite)
        if recipe.family == "lm" or ctx._accelerator is not None:
            ctx.accelerator.wait_for_everyone()
        from accelerate.utils import set_seed

        set_seed(ctx.seed)
        t_start = time.perf_counter()
        outcome = recipe.body(ctx)
    except NonFiniteLossError:
        raise  # keeps its checkpoints: the message names the last good one
    except DistillError:
        _drop_unstarted(out, created)
        raise
    except OSError as exc:  # a write refused in the cache or the run folder, wherever the body made it
        error = _unwritable(exc, ctx)
        if error is None:
            raise
        _drop_unstarted(out, created)
        raise error from exc
    if outcome is None:
        return {}
    if not ctx.is_main_process:
        return {}
    if "student" not in outcome.eval:
        raise ValueError(f"{recipe.name}: Outcome.eval must hold 'student'")
    device = str(ctx._accelerator.device) if ctx._accelerator is not None else _device_name(ctx.run)
    train = dict(outcome.train)
    train.setdefault("run_wall_s", time.perf_counter() - t_start)
    metrics = {
        "method": ctx.name,
        **({"family": recipe.family} if recipe.family != "lm" else {}),
        "task": outcome.task,
        "run_dir": str(out),
        "seed": ctx.seed,
        "eval": outcome.eval,
        "train": train,
        **outcome.extra,
        "config": config,
        "env": env_info(device),
    }
    if outcome.columns is not None:
        metrics["summary_columns"] = list(outcome.columns)
    write_metrics(out, metrics)
    png = _plot_training(out, ctx.name)
    for folder in sorted(out.glob("**/checkpoints")):  # the student's and any baseline's trained in the run folder
        shutil.rmtree(folder, ignore_errors=True)
    print_summary(metrics)
    if png is not None:
        print(f"plot: {png}", file=sys.stderr)
    print(f"run folder: {out}", file=sys.stderr)
    return metrics


def _plot_training(out: Path, name: str) -> Path | None:
    """training.png beside log.jsonl: the loss, learning rate and gradient norm of every step of the run's own
    training (every family's Trainer writes log.jsonl into the run folder); None when the run trained nothing there."""
    if not (out / "log.jsonl").is_file():
        return None
    from core.plots import plot_log

    return plot_log(out / "log.jsonl", ["loss", "lr", "grad_norm"], out / "training.png", f"{name}: training")


def _drop_unstarted(out: Path, created: bool) -> None:
    """Remove a run folder this call created when no step completed in it (a failed start leaves nothing)."""
    if created and out.exists() and not (out / "checkpoints").exists():
        shutil.rmtree(out, ignore_errors=True)


# Refused writes: read-only or not permitted, a path through a file, a full disk or quota.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}
_FULL = {errno.ENOSPC, errno.EDQUOT}


def _unwritable(exc: OSError, ctx: RunContext) -> DistillError | None:
    """One line for a write refused inside the cache (--cache-dir) or the run folder (--out), else None. Caught once
    here, it covers every place a recipe writes there (tokenizers, teachers, baselines, teacher caches, a family's
    own cache files), however the write was made."""
    if exc.errno not in _UNWRITABLE | _FULL or not exc.filename:
        return None
    path = Path(os.fsdecode(exc.filename)).absolute()
    for root, flag, what in ((ctx.cache, "--cache-dir", "cache folder"), (ctx.out, "--out", "run folder")):
        root = root.absolute()
        if path == root or root in path.parents:
            if exc.errno in _FULL:
                return ResourceError(
                    f"the disk of the {what} {root} is full ({exc.strerror} writing {path}; {free_space(root)} free); "
                    f"free space there or pass another {flag}, then rerun the same command"
                )
            return ConfigError(f"cannot write the {what} {root} ({exc.strerror}: {path}); pass a writable {flag}")
    return None


def _device_name(run: RunConfig) -> str:
    import torch

    if run.device != "auto":
        return run.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def summary_rows(evals: dict[str, dict[str, float]], method: str) -> list[tuple[str, dict[str, float]]]:
    """Rows of the printed table: reference models first (teacher, SFT), baselines, the method's student last."""
    rows = []
    if "teacher" in evals:
        rows.append(("teacher", evals["teacher"]))
    if "sft_student" in evals:
        rows.append(("sft student", evals["sft_student"]))
    for key, values in evals.items():
        if key in ("teacher", "sft_student", "student"):
            continue
        name = key.removesuffix("_student").replace("_", "-")
        rows.append((name + (" student" if key.endswith("_student") else ""), values))
    rows.append((f"{method} student", evals["student"]))
    return rows


def print_summary(metrics: dict[str, Any]) -> None:
    """The table at the end of a run: one row per model, one column per metric (per-group scores stay in the file)."""
    evals = metrics["eval"]
    columns = metrics.get("summary_columns") or [c for c in evals["student"] if "/" not in c]
    train = metrics["train"]
    head = f"\n{metrics['method']} on {metrics['task']} (seed {metrics['seed']})"
    if "steps" in train and "tokens_per_s" in train:
        unit = train.get("unit", "tokens")
        head += f": {train['steps']} steps, {train['tokens_per_s']:.0f} {unit}/s"
        if "peak_mem_mb" in train:
            head += f", peak memory {train['peak_mem_mb']:.0f} MB"
    print(head)
    print(format_table(summary_rows(evals, metrics["method"]), columns))


def one_line(message: str) -> str:
    """A message as one line: a library's multi-line text quoted inside an error joins its lines."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """For run.py's `__main__`: typed errors become one clear line on stderr and exit status 2; Ctrl-C one line
    and exit status 130 (the run resumes from its last checkpoint when the same command runs again)."""
    try:
        main(argv)
    except DistillError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, MemoryError) as exc:
        # A training step that runs out of memory says so itself (core.train, naming --batch-size); this is the rest:
        # evaluation by generation, sampling outside a step, building a cache.
        error = out_of_memory(
            exc,
            "outside a training step (evaluation, generation or building a cache)",
            "lower --eval-batch-size (prompts per generation batch) or --max-new-tokens, or the batch size of the "
            "step printed above",
        )
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

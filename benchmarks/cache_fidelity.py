"""What the teacher-logit cache loses on a real teacher: top-k mass, and KD loss and gradient against full logits.

    python benchmarks/cache_fidelity.py --n 64                          # SmolLM2-135M-Instruct on 64 Dolly examples
    python benchmarks/cache_fidelity.py --n 64 --students prune:6,prune:24,noise:0.5 --cache-dir DIR

Writes benchmarks/cache_fidelity.md (or --out) with the command, date, machine and versions, and prints it; the
numbers also go to the .json beside it. The committed cache_fidelity.md joins two runs (forward and reverse KL on 64
examples, the default; the other four divergences on 16) and a hand-written findings section: rerunning overwrites it.

What it measures (issue 12). The teacher is `--teacher` (default smollm2-135m-instruct, through
core.pretrained.resolve_model_folder); the data the first --n Dolly training examples in the teacher's chat template
at --max-length, as the LLM recipe encodes them (core.data.load_dolly, chat_prompts, encode_examples). For every k,
the cache is built by core.logit_cache.get_logit_cache with the arguments core.kdpath.KDPath.cache_for gives it
(float16 log-probs, the tail as one bucket) and the loss is core.objectives.make_kd_loss(teacher_cache=...), the
loss KDPath.loss returns for a cached batch. The reference is the same make_kd_loss on the full teacher logits.
Over the target (response) positions of the sample:
- top-k mass: 1 - exp(tail log-prob) as the cache stores it; mean and 5th percentile over positions;
- loss: relative error of the cached KD loss (summed over positions) against the full one, per divergence;
- gradient with respect to the student's logits: cosine similarity of the whole (positions x V) gradient and its
  relative norm error |g_cache - g_full| / |g_full|, and the 5th percentile of the per-position cosine.
Students (--students): `prune:K` is core.pretrained.prune_layers of the teacher, untrained (as a run starts);
`noise:S` is the teacher's own logits plus i.i.d. Gaussian noise of standard deviation S on every logit (a student
close to the teacher, at no forward cost).

Two alternatives are measured beside the cache (prototypes in this file, not in core): `dense-fp16`, the teacher's
full log-probability row stored in float16 (2 V bytes per token), and `topk+sampled` (Anshumann et al., 2025,
"Sparse Logit Sampling"): the top k exact plus m tokens drawn from the teacher's tail, weighted by the tail mass / m,
and the teacher's entropy: an unbiased estimate of the teacher row, so forward KL (its value and its gradient) is
unbiased; other divergences are not. Its bytes per token count the stored ids, weights and two floats. The same
store as core now builds it (`get_logit_cache(samples=m)`, the default of --teacher-cache) is the path
`cache k=K m=M`, read by make_kd_loss like the other caches.

Cost control: the teacher's transformer trunk runs once per example; every cache build and the reference reuse its
final hidden states (`TrunkMemo`), and only the output head is recomputed, exactly as each path computes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.data import Collator  # noqa: E402
from core.kdpath import CACHE_SEED  # noqa: E402
from core.logit_cache import TeacherLogitCache, get_logit_cache, teacher_fingerprint  # noqa: E402
from core.losses import DIVERGENCES, get_divergence  # noqa: E402
from core.objectives import make_kd_loss, shifted_targets, teacher_forward  # noqa: E402

CHUNK = 1024  # positions per chunk of the reference loss (any size gives the same loss and gradient)
StudentFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]  # (batch, teacher logits) -> (B, T, V)


# ----------------------------------------------------------------------------------------------------------------
# Models that replay tensors, so the project's loss functions run unchanged on precomputed logits
# ----------------------------------------------------------------------------------------------------------------


class Replay(torch.nn.Module):
    """A 'model' whose forward returns fixed logits (B, T, V): the loss under test sees them as a model's output."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, attention_mask=None, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


class TrunkMemo(torch.nn.Module):
    """A causal LM whose transformer trunk runs once per example: final hidden states are kept per example (its
    unpadded token ids) and reused, the output head is applied on every call. With right padding and a causal
    mask an example's hidden states do not depend on what it is batched with, so reuse changes nothing but time."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self._hidden: dict[bytes, torch.Tensor] = {}

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def state_dict(self, *args, **kwargs):  # the fingerprint of the wrapped teacher, not of a renamed copy
        return self.model.state_dict(*args, **kwargs)

    def forward(self, input_ids, attention_mask, output_hidden_states=False, logits_to_keep=0, **_):
        lengths = attention_mask.sum(-1).tolist()
        keys = [input_ids[row, :n].cpu().numpy().tobytes() for row, n in enumerate(lengths)]
        if not all(key in self._hidden for key in keys):
            with torch.no_grad():
                trunk = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
            for row, (key, n) in enumerate(zip(keys, lengths)):
                self._hidden[key] = trunk.last_hidden_state[row, :n].clone()  # (n, H), after the final norm
        hidden = torch.zeros(*input_ids.shape, self.config.hidden_size)  # (B, T, H); padding rows stay 0
        for row, (key, n) in enumerate(zip(keys, lengths)):
            hidden[row, :n] = self._hidden[key]
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.get_output_embeddings()(kept)  # (B, T or 1, V)
        return SimpleNamespace(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)


# ----------------------------------------------------------------------------------------------------------------
# Accumulating the comparison over batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Sums over the sample of one (student, divergence, path) against the full-logit reference."""

    loss_full: float = 0.0
    loss_path: float = 0.0
    dot: float = 0.0  # <g_path, g_full>
    norm_full: float = 0.0  # |g_full|^2
    norm_path: float = 0.0  # |g_path|^2
    norm_diff: float = 0.0  # |g_path - g_full|^2
    position_cosines: list[torch.Tensor] = field(default_factory=list)

    def add(self, loss_full: float, loss_path: float, grad_full: torch.Tensor, grad_path: torch.Tensor) -> None:
        """grad_*: (N, V) gradients with respect to the student's logits at the N target positions of a batch."""
        self.loss_full += loss_full
        self.loss_path += loss_path
        self.dot += float((grad_path * grad_full).sum())
        self.norm_full += float(grad_full.square().sum())
        self.norm_path += float(grad_path.square().sum())
        self.norm_diff += float((grad_path - grad_full).square().sum())
        self.position_cosines.append(F.cosine_similarity(grad_path, grad_full, dim=-1))

    def summary(self) -> dict[str, float]:
        cosines = torch.cat(self.position_cosines) if self.position_cosines else torch.zeros(1)
        return {
            "loss_rel_error": (self.loss_path - self.loss_full) / self.loss_full if self.loss_full else 0.0,
            "grad_cosine": self.dot / max((self.norm_full * self.norm_path) ** 0.5, 1e-30),
            "grad_rel_norm_error": (self.norm_diff / max(self.norm_full, 1e-30)) ** 0.5,
            "grad_cosine_p5": float(torch.quantile(cosines.double(), 0.05)),
        }


def loss_and_grad(loss_fn, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor):
    """(summed KD loss, its gradient (N, V) with respect to the student logits at the valid positions of `mask`)."""
    leaf = student_logits.detach().clone().requires_grad_(True)
    out = loss_fn(Replay(leaf), batch)
    out.loss_sum.backward()
    return float(out.loss_sum.detach()), leaf.grad[mask]


def topk_masses(cache: TeacherLogitCache, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The teacher's probability inside its top k at each target position (N,), as the cache stores it."""
    return -torch.expm1(cache.sparse_teacher(batch, mask).tail_logprob)


# ----------------------------------------------------------------------------------------------------------------
# The alternatives (prototypes): a dense float16 row, and top-k plus sampled tail (Anshumann et al., 2025)
# ----------------------------------------------------------------------------------------------------------------


def dense_fp16_logits(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher row as a dense float16 store would give it back: log-probabilities rounded to float16."""
    return F.log_softmax(teacher_logits.float(), dim=-1).half().float()


def sampled_target(
    teacher_logprobs: torch.Tensor, k: int, m: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """An unbiased estimate of the teacher rows (N, V) -> (N, V), and the number of distinct stored tail ids (N,).

    The top k are kept exactly; m ids are drawn with replacement from the teacher restricted to the rest, each
    weighted tail mass / m. E[estimate] = p at every id, so E[-sum estimate * log q] = cross-entropy(p, q)."""
    probs = teacher_logprobs.exp()
    top, indices = probs.topk(k, dim=-1) if k else (probs[:, :0], torch.zeros_like(probs[:, :0], dtype=torch.long))
    rest = probs.scatter(-1, indices, 0.0)  # (N, V)
    tail_mass = rest.sum(-1, keepdim=True)  # (N, 1)
    draws = torch.multinomial(rest / tail_mass, m, replacement=True, generator=generator)  # (N, m)
    estimate = torch.zeros_like(probs).scatter_(-1, indices, top)
    estimate.scatter_add_(-1, draws, (tail_mass / m).expand(-1, m))
    distinct = (torch.zeros_like(probs).scatter_(-1, draws, 1.0)).sum(-1)  # (N,)
    return estimate, distinct


def sampled_fkl_sum(
    student_logits: torch.Tensor, estimate: torch.Tensor, teacher_entropy: torch.Tensor
) -> torch.Tensor:
    """Forward KL summed over positions from an unbiased teacher estimate: sum(-H(p) - sum_v p_hat log q)."""
    return (-teacher_entropy - (estimate * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)).sum()


def sampled_bytes_per_token(k: int, distinct: float) -> float:
    """top k: float16 log-prob + uint16 id; tail: uint16 id + uint8 count per distinct draw; tail mass, entropy."""
    return k * (2 + 2) + distinct * (2 + 1) + 4 + 4


# ----------------------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------------------


def measure(
    teacher: torch.nn.Module,
    students: dict[str, StudentFn],
    features: Sequence[dict[str, list[int]]],
    ks: Sequence[int],
    divergences: Sequence[str],
    cache_dir: Path,
    tokenizer_key: str,
    pad_token_id: int,
    batch_size: int = 4,
    logprob_dtype: str = "float16",
    sampled: Sequence[tuple[int, int]] = (),
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Every number of the report; see the module docstring. `teacher` should be a TrunkMemo for a large model.

    sampled: (k, m) settings of the top-k + sampled-tail prototype and of core's sampled cache, `cache k=K m=M`
    (forward KL only)."""
    features = list(features)
    teacher_id = teacher_fingerprint(teacher)
    caches = {}
    for k in ks:  # as KDPath.cache_for builds them (it passes k, the temperature and the teacher's fingerprint)
        started = time.perf_counter()
        caches[k] = get_logit_cache(
            teacher,
            features,
            cache_dir,
            tokenizer_key=tokenizer_key,
            pad_token_id=pad_token_id,
            k=k,
            temperature=1.0,
            teacher_id=teacher_id,
            logprob_dtype=logprob_dtype,
        )
        progress(f"cache k={k}: {caches[k].bytes_per_token:.0f} bytes/token ({time.perf_counter() - started:.0f} s)")
    for k, m in sampled if "fkl" in divergences else ():  # the sampled tail as core builds it (KDPath's seed)
        caches[(k, m)] = get_logit_cache(
            teacher, features, cache_dir, tokenizer_key=tokenizer_key, pad_token_id=pad_token_id, k=k,
            temperature=1.0, teacher_id=teacher_id, logprob_dtype=logprob_dtype, samples=m, seed=CACHE_SEED,
        )  # fmt: skip
    divs = {name: get_divergence(name) for name in divergences}
    cached = {(name, k): make_kd_loss(None, div, teacher_cache=caches[k]) for name, div in divs.items() for k in ks}
    sampled_paths = {km: f"cache k={km[0]} m={km[1]}" for km in sampled if km in caches}  # core, fkl only
    cached |= {("fkl", km): make_kd_loss(None, divs["fkl"], teacher_cache=caches[km]) for km in sampled_paths}
    paths = [f"cache k={k}" for k in ks] + ["dense-fp16"] + [f"top{k}+sampled{m}" for k, m in sampled]
    paths += list(sampled_paths.values())
    comparisons = {(s, d, p): Comparison() for s in students for d in divergences for p in paths}
    masses: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    distinct: dict[tuple[int, int], list[torch.Tensor]] = {km: [] for km in sampled}
    generator = torch.Generator().manual_seed(seed)
    collate = Collator(pad_token_id)
    n_positions = 0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size])
        mask, _ = shifted_targets(batch["labels"])
        n_positions += int(mask.sum())
        teacher_logits = teacher_forward(teacher, batch)  # (B, T, V)
        for k in ks:
            masses[k].append(topk_masses(caches[k], batch, mask))
        fp16_teacher = dense_fp16_logits(teacher_logits)
        teacher_logprobs = F.log_softmax(teacher_logits[mask].float(), dim=-1)  # (N, V)
        entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)  # (N,)
        estimates = {}
        for km in sampled:
            estimates[km], count = sampled_target(teacher_logprobs, *km, generator)
            distinct[km].append(count)
        for student_name, student_fn in students.items():
            with torch.no_grad():
                student_logits = student_fn(batch, teacher_logits)  # (B, T, V)
            for name in divergences:
                # The full-logit reference, on the chunked path: exact (core.fused), and it skips prompt positions.
                reference = make_kd_loss(Replay(teacher_logits), divs[name], chunk_size=CHUNK)
                loss_full, grad_full = loss_and_grad(reference, student_logits, batch, mask)
                for k in ks:
                    loss, grad = loss_and_grad(cached[(name, k)], student_logits, batch, mask)
                    comparisons[(student_name, name, f"cache k={k}")].add(loss_full, loss, grad_full, grad)
                dense = make_kd_loss(Replay(fp16_teacher), divs[name], chunk_size=CHUNK)
                loss, grad = loss_and_grad(dense, student_logits, batch, mask)
                comparisons[(student_name, name, "dense-fp16")].add(loss_full, loss, grad_full, grad)
                if name != "fkl":
                    continue
                for km, path in sampled_paths.items():
                    loss, grad = loss_and_grad(cached[("fkl", km)], student_logits, batch, mask)
                    comparisons[(student_name, name, path)].add(loss_full, loss, grad_full, grad)
                for (k, m), estimate in estimates.items():
                    leaf = student_logits[mask].detach().clone().requires_grad_(True)  # (N, V)
                    loss = sampled_fkl_sum(leaf, estimate, entropy)
                    loss.backward()
                    comparisons[(student_name, name, f"top{k}+sampled{m}")].add(
                        loss_full, float(loss.detach()), grad_full, leaf.grad
                    )
        progress(f"examples {min(start + batch_size, len(features))}/{len(features)}")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    mass = {}
    for k in ks:
        values = torch.cat(masses[k]).double()
        mass[k] = {"mean": float(values.mean()), "p5": float(torch.quantile(values, 0.05))}
    costs = {f"cache k={k}": caches[k].bytes_per_token for k in ks}
    costs["dense-fp16"] = float(dense_fp16_bytes_per_token(vocab))
    costs |= {path: caches[km].bytes_per_token for km, path in sampled_paths.items()}
    for k, m in sampled:
        costs[f"top{k}+sampled{m}"] = sampled_bytes_per_token(k, float(torch.cat(distinct[(k, m)]).mean()))
    results = {key: c.summary() for key, c in comparisons.items() if c.position_cosines}  # sampled: fkl only
    return {"mass": mass, "results": results, "bytes_per_token": costs, "positions": n_positions, "vocab": vocab}


def dense_fp16_bytes_per_token(vocab: int) -> int:
    """Bytes per token of a dense float16 store, measured as the size of a safetensors file of 64 such rows / 64."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.safetensors"
        save_file({"logprobs": torch.zeros(64, vocab, dtype=torch.float16)}, str(path))
        return round(path.stat().st_size / 64)


# ----------------------------------------------------------------------------------------------------------------
# The command line and the report
# ----------------------------------------------------------------------------------------------------------------


def make_students(specs: Sequence[str], teacher_model: torch.nn.Module, seed: int) -> dict[str, StudentFn]:
    from core.pretrained import parse_prune, prune_layers

    students: dict[str, StudentFn] = {}
    for spec in specs:
        layers = parse_prune(spec)
        if layers is not None:
            model = prune_layers(teacher_model, layers).eval()
            students[spec] = (lambda m: lambda batch, _: teacher_forward(m, batch))(model)
        elif spec.startswith("noise:"):
            scale = float(spec.split(":", 1)[1])
            generator = torch.Generator().manual_seed(seed)
            students[spec] = (lambda s, g: lambda _, t: t + s * torch.randn(t.shape, generator=g))(scale, generator)
        else:
            raise SystemExit(f"--students {spec}: use prune:K or noise:S")
    return students


def report(args: argparse.Namespace, data: dict, seconds: float, command: str) -> str:
    ks = [int(k) for k in args.ks.split(",")]
    lines = [
        "# Teacher-logit cache fidelity (issue 12)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {seconds / 60:.1f} min  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; git {git_revision()}  ",
        f"Teacher {args.teacher} (vocabulary {data['vocab']:,}); {args.n} Dolly training examples (chat template, "
        f"--max-length {args.max_length}); {data['positions']:,} target positions. Students: "
        + ", ".join(f"`{s}`" for s in args.students.split(","))
        + " (prune:K = core.pretrained.prune_layers of the teacher, untrained; noise:S = the teacher's logits + "
        "N(0, S^2) on every logit).",
        "",
        "## Teacher probability mass inside the top k",
        "",
        "| k | mean | 5th percentile | cache bytes/token |",
        "|---|---|---|---|",
    ]
    for k in ks:
        lines.append(
            f"| {k} | {data['mass'][k]['mean']:.4f} | {data['mass'][k]['p5']:.4f} | "
            f"{data['bytes_per_token'][f'cache k={k}']:.0f} |"
        )
    lines += [
        "",
        "## KD loss and gradient through each path against the full teacher logits",
        "",
        "loss err: (loss_path - loss_full) / loss_full over all positions; grad cos: cosine of the whole gradient "
        "with respect to the student logits; grad err: |g_path - g_full| / |g_full|; cos p5: 5th percentile of the "
        "per-position cosine. dense-fp16 and top-k+sampled are prototypes (module docstring); sampled is forward KL "
        "only and one draw (unbiased: its error is noise, not bias).",
        "",
        "| student | divergence | path | bytes/token | loss err | grad cos | grad err | cos p5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (student, divergence, path), r in data["results"].items():
        lines.append(
            f"| {student} | {divergence} | {path} | {data['bytes_per_token'][path]:,.0f} | "
            f"{100 * r['loss_rel_error']:+.2f}% | {r['grad_cosine']:.4f} | {r['grad_rel_norm_error']:.4f} | "
            f"{r['grad_cosine_p5']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="Dolly training examples in the sample")
    parser.add_argument("--ks", default="16,64,256", help="cache k values, comma-separated")
    parser.add_argument("--students", default="prune:6,noise:0.5", help="prune:K and noise:S, comma-separated")
    parser.add_argument("--divergences", default="fkl,rkl", help=f"comma-separated, of {','.join(DIVERGENCES)}")
    parser.add_argument("--sampled", default="64:64", help="k:m settings of the top-k + sampled tail prototype")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default="/work/shared/data/instruct_eval")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache-dir", default=None, help="default: $DISTILLAB_CACHE or ~/.cache/distillab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cache_fidelity.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from core.data import DataConfig, chat_prompts, encode_examples, load_dolly
    from core.models import load_model
    from core.pretrained import resolve_model_folder
    from core.tokenizers import load_tokenizer

    started = time.perf_counter()
    cache = Path(args.cache_dir or os.environ.get("DISTILLAB_CACHE") or Path.home() / ".cache" / "distillab")
    folder = resolve_model_folder(args.teacher, cache)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder).eval()
    task = load_dolly(DataConfig(task="dolly", data_dir=args.data_dir, train_size=args.n, max_length=args.max_length))
    task = chat_prompts(task, tokenizer, "chat")
    features = encode_examples(tokenizer, task.train, args.max_length)
    features.sort(key=lambda f: len(f["input_ids"]))  # less padding per batch; the positions are the same
    sampled = [tuple(int(x) for x in s.split(":")) for s in args.sampled.split(",") if s]
    data = measure(
        TrunkMemo(model),
        make_students(args.students.split(","), model, seed=0),
        features,
        [int(k) for k in args.ks.split(",")],
        args.divergences.split(","),
        cache,
        tokenizer_key=f"path:{Path(folder).resolve()}",
        pad_token_id=tokenizer.pad_token_id,
        batch_size=args.batch_size,
        sampled=sampled,
        progress=lambda line: print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True),
    )
    raw = {**data, "results": {" | ".join(key): value for key, value in data["results"].items()}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))  # the numbers, before formatting
    command = "python benchmarks/cache_fidelity.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(args, data, time.perf_counter() - started, command.strip())
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

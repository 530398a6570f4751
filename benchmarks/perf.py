"""Performance benchmark: peak memory and time of the KD losses, the KD training step, and the teacher-logit cache.

    nox -s perf                                   # installs the `perf` extra (TRL) and runs this file
    python benchmarks/perf.py                     # everything (about 20-30 minutes on 2 CPU cores)
    python benchmarks/perf.py --only step,cache   # the KD step and the cache only (13-24 minutes by load)
    python benchmarks/perf.py --only loss --quick # one section, small sizes, one repeat
    python benchmarks/perf.py --smoke             # every case at toy sizes, in this process (seconds; a test)
    python benchmarks/perf.py --only real --out /tmp/real.md   # SmolLM2 -> prune:6 on Dolly (a few minutes)
    python benchmarks/perf.py --only gen [--gen-smollm]  # sampling: lean loop vs reference loop vs forward floor

Writes benchmarks/perf_results.md (or --out) with the machine, versions and git revision, and prints it.

How it measures (CPU; see docs/performance.md):
- every case runs in a fresh subprocess with 2 threads, so no case inherits another's allocations or caches;
- peak memory: the process's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs right
  before the measured region, minus the resident set at that moment. glibc is told to serve every allocation over
  64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS at once and the high-water mark is
  the peak of live tensors, not of the allocator's free lists. (tracemalloc does not see torch's allocations.)
- time: each case first runs at a tiny size (to page in kernels), then `repeats` times at full size; the median;
- step level: median time of an optimizer step after `warmup` steps, on the same models and batches for every loop;
  tokens/s = input tokens of a step / that median. The KD rows train through the public path of every run: the
  KD-path flags (--fused, --chunk-size, --teacher-cache, --teacher-cache-k) parsed into core.kdpath.KDPathConfig,
  a KDPath built from it as core.pipeline builds it, its loss as methods.vanilla takes it, core.train.Trainer. The
  cached rows build the cache before the timed run and then release the teacher (KDPath.release_teacher), so their
  memory is that of a run that trains from the cache alone.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD_ENV = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    # Idle OpenMP threads sleep instead of spinning, so a case's CPU time counts its work, not its waiting for a
    # thread that another process has descheduled (the machine is shared; CPU time is the contention-robust number).
    "OMP_WAIT_POLICY": "PASSIVE",
}

# Step-level setup (fixed by issue 6): teacher 4 layers x 256, student 2 layers x 128, batch 8 x 128 tokens.
TEACHER = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=704)
STUDENT = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=352)
BATCH, SEQ, PROMPT = 8, 128, 64  # each example: 64 prompt tokens (labels -100), then 64 completion tokens


@dataclass(frozen=True)
class Shape:
    """Models and batch of the step level."""

    teacher: dict
    student: dict
    batch: int
    seq: int
    prompt: int  # the first `prompt` tokens of each example have labels -100


SHAPES = {
    "full": Shape(TEACHER, STUDENT, BATCH, SEQ, PROMPT),
    # --smoke: toy sizes, so that a test runs every case in seconds (its numbers mean nothing)
    "smoke": Shape(
        dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32),
        batch=2,
        seq=16,
        prompt=8,
    ),
}
IN_PROCESS = False  # --smoke: run the cases in this process (no isolation; a check that they run, not a measurement)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers (run in the child)
# ----------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak resident memory (MB) of a region, above the resident memory at its start."""

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the high-water mark (Linux >= 4.0)
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kb = _status_kb("VmHWM")
        self.delta_mb = (self.peak_kb - self.start_kb) / 1024
        self.peak_mb = self.peak_kb / 1024


def _llama(vocab: int, dims: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, **dims
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _features(vocab: int, n: int, shape: Shape = SHAPES["full"], seed: int = 0) -> list[dict[str, list[int]]]:
    """Fixed-length examples: `prompt` prompt tokens (labels -100) + `seq - prompt` completion tokens; no padding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, shape.seq), generator=gen).tolist()
    return [{"input_ids": row, "labels": [-100] * shape.prompt + row[shape.prompt :]} for row in ids]


# ----------------------------------------------------------------------------------------------------------------
# Loss level
# ----------------------------------------------------------------------------------------------------------------


def checkpointed_divergence_sum(divergence, student_logits, teacher_logits, mask, chunk_size):
    """The chunked path core.losses.divergence_sum had before issue 6 (commit 3410bda), kept here to compare:
    valid rows gathered into copies, each chunk recomputed in the backward pass by activation checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat_mask = mask.reshape(-1).bool()
    student = student_logits.reshape(-1, student_logits.shape[-1])[flat_mask]
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[flat_mask]
    total = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    for start in range(0, student.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(
            lambda s, t: divergence(s, t).sum(), student[chunk], teacher[chunk], use_reentrant=False
        )
    return total


def loss_case(path: str, vocab: int, tokens: int, divergence: str, repeats: int) -> dict:
    """Forward + backward of the KD loss over `tokens` positions, all valid (the worst case for memory)."""
    import torch
    import torch.nn.functional as F

    from core.fused import LinearHead, chunked_divergence_sum, default_chunk_size, divergence_sum, fused_divergence_sum
    from core.losses import get_divergence

    fn = get_divergence(divergence)
    student_h, teacher_h = STUDENT["hidden_size"], TEACHER["hidden_size"]

    def make(vocab: int, tokens: int):
        gen = torch.Generator().manual_seed(0)
        mask = torch.ones(1, tokens + 1, dtype=torch.bool)
        mask[:, -1] = False  # unshifted layout: the last position predicts nothing
        if path in ("plain", "checkpointed", "chunked"):  # start from the logits, as the loss sees them
            student = torch.randn(1, tokens + 1, vocab, generator=gen).requires_grad_()
            teacher = torch.randn(1, tokens + 1, vocab, generator=gen)
            return mask, (student,), teacher
        hidden = torch.randn(1, tokens + 1, student_h, generator=gen).requires_grad_()
        weight = (0.05 * torch.randn(vocab, student_h, generator=gen)).requires_grad_()
        teacher = LinearHead(torch.randn(1, tokens + 1, teacher_h, generator=gen), torch.randn(vocab, teacher_h) / 16)
        return mask, (hidden, weight), teacher

    def run(mask, leaves, teacher) -> None:
        chunk = default_chunk_size(leaves[-1].shape[0] if path.endswith("hidden") or path == "fused" else vocab)
        if path == "plain":  # what word_level_kd_sum does without chunking: shift, gather valid rows, one call
            loss = divergence_sum(fn, leaves[0][:, :-1], teacher[:, :-1], mask[:, :-1])
        elif path == "checkpointed":
            loss = checkpointed_divergence_sum(fn, leaves[0][:, :-1], teacher[:, :-1], mask[:, :-1], chunk)
        elif path == "chunked":
            loss = chunked_divergence_sum(fn, leaves[0], teacher, mask, chunk)
        elif path == "plain-hidden":  # project the full logits of both, then the plain loss
            student_logits = F.linear(leaves[0], leaves[1])
            with torch.no_grad():
                teacher_logits = F.linear(teacher.hidden, teacher.weight)
            loss = divergence_sum(fn, student_logits[:, :-1], teacher_logits[:, :-1], mask[:, :-1])
        elif path == "fused":
            loss = fused_divergence_sum(fn, LinearHead(*leaves), teacher, mask, chunk)
        else:
            raise ValueError(path)
        loss.backward()

    run(*make(512, 64))  # page in the kernels at a tiny size
    mask, leaves, teacher = make(vocab, tokens)
    times, cpu, peaks = [], [], []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        with PeakMemory() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            run(mask, leaves, teacher)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peaks.append(mem.delta_mb)
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_mb": max(peaks), "times": times}


# ----------------------------------------------------------------------------------------------------------------
# Step level
# ----------------------------------------------------------------------------------------------------------------


def step_case(loop: str, vocab: int, steps: int, warmup: int, flags: str = "", shape: str = "full") -> dict:
    """One training run of `warmup + steps` optimizer steps, timed step by step. loop: `plain` (the PyTorch loop),
    `trl` (TRL's GKDTrainer), `sft` (core.train on cross-entropy), or `kd`: core.train on the word-level KD loss of the
    KD path that `flags` select, built as a run builds it (kd_path_loss)."""
    dims = SHAPES[shape]
    n_steps = warmup + steps
    features = _features(vocab, dims.batch * n_steps, dims)
    student = _llama(vocab, dims.student, seed=1)
    teacher = None if loop == "sft" else _llama(vocab, dims.teacher, seed=0).eval().requires_grad_(False)
    stamps: list[tuple[float, float]] = []  # (wall, process CPU time) at the end of each optimizer step
    kd = None
    with tempfile.TemporaryDirectory() as tmp:
        if loop == "plain":
            run = _plain_loop(student, teacher, features, n_steps, stamps, dims.batch)
        elif loop == "trl":
            run = _trl_loop(student, teacher, features, n_steps, stamps, tmp, dims)
        elif loop == "sft":
            from core.objectives import causal_lm_loss

            run = _trainer_loop(student, causal_lm_loss, features, n_steps, stamps, tmp, dims.batch)
        elif loop == "kd":
            kd, loss_fn = kd_path_loss(flags, teacher, features, Path(tmp) / "cache")
            teacher = None  # from here on only the KD path holds the teacher (and not even it with the cache)
            gc.collect()
            run = _trainer_loop(student, loss_fn, features, n_steps, stamps, tmp, dims.batch)
        else:
            raise ValueError(loop)
        with PeakMemory() as mem:
            run()
    intervals = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][warmup - 1 :]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][warmup - 1 :]
    step_s = statistics.median(intervals)
    return {
        "step_s": step_s,
        "cpu_s": statistics.median(cpu),
        "tokens_per_s": dims.batch * dims.seq / step_s,
        "peak_rss_mb": mem.peak_mb,
        "peak_delta_mb": mem.delta_mb,
        "steps_timed": len(intervals),
        **({"kd_path": kd.summary()} if kd is not None else {}),
    }


def kd_path_loss(flags: str, teacher, features, cache_root: Path):
    """The KD path and loss that a run given `flags` trains with: the flags parsed into KDPathConfig by the parser of
    every run (core.config.parse), the KDPath built as core.pipeline._llm_body builds it, its forward-KL loss taken
    as methods.vanilla takes it. With --teacher-cache the cache is built here (not timed) and the teacher released:
    every batch comes from `features`, so the run trains from the cache alone."""
    from core.config import parse
    from core.kdpath import KDPath, KDPathConfig
    from core.losses import get_divergence

    (cfg,) = parse((KDPathConfig,), flags.split())
    kd = KDPath(cfg, teacher, cache_root, "bench", pad_token_id=0)
    loss_fn = kd.loss(get_divergence("fkl"), features=features)
    if cfg.teacher_cache:
        kd.release_teacher()
    return kd, loss_fn


def _plain_loop(student, teacher, features, n_steps, stamps, batch_size):
    """The KD loop a PyTorch user writes: full logits of both, forward KL on the completion tokens."""
    import torch
    import torch.nn.functional as F

    from core.data import Collator

    collate = Collator(pad_token_id=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batches = [collate(features[i * batch_size : (i + 1) * batch_size]) for i in range(n_steps)]

    def run() -> None:
        student.train()
        for batch in batches:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            valid = batch["labels"][:, 1:] != -100
            log_q = F.log_softmax(logits[:, :-1][valid].float(), dim=-1)
            log_p = F.log_softmax(teacher_logits[:, :-1][valid].float(), dim=-1)
            loss = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / valid.sum()  # KL(p || q)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            stamps.append((time.perf_counter(), time.process_time()))

    return run


def _trainer_loop(student, loss_fn, features, n_steps, stamps, tmp, batch_size):
    """core.train.Trainer, the loop of every run, on `loss_fn`."""
    from accelerate import Accelerator

    from core.data import Collator
    from core.train import TrainConfig, Trainer

    cfg = TrainConfig(
        steps=n_steps, batch_size=batch_size, lr=1e-4, warmup_steps=0, checkpoint_every=0, log_every=1, seed=0
    )
    trainer = Trainer(
        student,
        loss_fn,
        features,
        Collator(pad_token_id=0),
        cfg,
        Path(tmp) / "run",
        Accelerator(cpu=True),
        on_step_end=lambda step, loss, logs: stamps.append((time.perf_counter(), time.process_time())),
    )
    return trainer.train


def _trl_loop(student, teacher, features, n_steps, stamps, tmp, dims: Shape):
    """TRL's GKDTrainer off-policy: lmbda = 0 (no student samples), beta = 0 (forward KL), fixed completions."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from core.data import Collator
    from core.tokenizers import train_bpe

    tokenizer: PreTrainedTokenizerFast = train_bpe(["a b c d e f g"], 300)  # only its pad id is read

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

    args = GKDConfig(
        output_dir=str(Path(tmp) / "trl"),
        per_device_train_batch_size=dims.batch,
        gradient_accumulation_steps=1,
        max_steps=n_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        max_length=dims.seq,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=10,
        seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=Collator(pad_token_id=0),
        train_dataset=Dataset.from_list(features),
        processing_class=tokenizer,
        callbacks=[Stamp()],
    )
    return trainer.train


# ----------------------------------------------------------------------------------------------------------------
# Cache quality
# ----------------------------------------------------------------------------------------------------------------


def cache_quality_case(ks: list[int], n_examples: int) -> dict:
    """Bytes per token and KL(full teacher || cached teacher) on the embedded default teacher (trained on first use
    and cached under $DISTILLAB_CACHE), over the completion tokens of its training data."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from core.config import ModelConfig
    from core.data import DataConfig, encode_examples, load_task
    from core.logit_cache import get_logit_cache
    from core.objectives import final_hidden_and_head, shifted_targets
    from core.teacher import get_teacher, get_tokenizer

    torch.set_num_threads(2)
    cache_dir = Path(os.environ.get("DISTILLAB_CACHE", Path.home() / ".cache" / "distillab"))
    data, model_cfg = DataConfig(), ModelConfig()
    task = load_task(data)
    tokenizer, tokenizer_key = get_tokenizer(model_cfg, data, task, cache_dir)
    teacher, _ = get_teacher(model_cfg, data, task, tokenizer, tokenizer_key, cache_dir, Accelerator(cpu=True))
    features = encode_examples(tokenizer, task.train[:n_examples], data.max_length)
    from core.data import Collator

    batch = Collator(tokenizer.pad_token_id)(features)
    mask, _ = shifted_targets(batch["labels"])
    with torch.no_grad():
        head = final_hidden_and_head(teacher, batch)
        logp = F.log_softmax(F.linear(head.hidden[mask], head.weight, head.bias).float(), -1)  # (N, V)
    vocab = logp.shape[-1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            cache = get_logit_cache(
                teacher, features, tmp, tokenizer_key=tokenizer_key, pad_token_id=tokenizer.pad_token_id, k=k
            )
            sparse = cache.sparse_teacher(batch, mask)
            kk = min(k, vocab)
            # The cached distribution over the vocabulary: the stored top-k, the tail mass spread evenly over the
            # other V - k tokens (the most a reader of the cache can say about them).
            approx = torch.full_like(logp, 0.0)
            if kk < vocab:
                approx += (sparse.tail_logprob - torch.log(torch.tensor(float(vocab - kk)))).unsqueeze(-1)
            approx.scatter_(-1, sparse.indices, sparse.logprobs)
            approx = approx - approx.logsumexp(-1, keepdim=True)  # fp16 rounding leaves it a hair off 1
            kl = (logp.exp() * (logp - approx)).sum(-1)
            tail_mass = sparse.tail_logprob.exp() if kk < vocab else torch.zeros(len(sparse))
            rows.append(
                {
                    "k": k,
                    "bytes_per_token": cache.bytes_per_token,
                    "kl_mean": kl.mean().item(),
                    "kl_max": kl.max().item(),
                    "tail_mass_mean": tail_mass.mean().item(),
                }
            )
    return {"vocab": vocab, "tokens": int(mask.sum()), "rows": rows}


def cache_bytes_case(vocab: int, ks: list[int]) -> dict:
    """Bytes per token on disk at a large vocabulary (independent of the teacher's distribution)."""
    import torch

    from core.logit_cache import get_logit_cache

    torch.set_num_threads(2)
    teacher = _llama(vocab, dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64), 0)
    features = _features(vocab, 64)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            cache = get_logit_cache(teacher, features, tmp, tokenizer_key="bench", pad_token_id=0, k=k, teacher_id="t")
            out[k] = cache.bytes_per_token
    return out


# ----------------------------------------------------------------------------------------------------------------
# Real LLM: SmolLM2-135M-Instruct teacher, prune:K student, Dolly (issue 31)
# ----------------------------------------------------------------------------------------------------------------

REAL = dict(
    teacher="smollm2-135m-instruct", prune=6, batch=8, max_length=256, data_dir="/work/shared/data/instruct_eval"
)


def matmul_rate(seconds: float = 1.5, n: int = 1024, dtype: str = "float32") -> dict:
    """The machine's matrix-multiply rate in this process (torch.matmul of n x n in `dtype`, 2 n^3 FLOPs each), per
    second of wall time and per second of process CPU time (the contention-robust one on a shared machine)."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    torch.matmul(a, b)  # page in
    count, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or count < 3:
        torch.matmul(a, b)
        count += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    flops = 2 * n**3 * count
    return {"gflops_wall": flops / wall / 1e9, "gflops_cpu": flops / cpu / 1e9}


def _real_setup(smoke: bool):
    """(teacher, student, tokenizer pad id, features, teacher id): SmolLM2 and prune:K on Dolly as the LLM recipe
    encodes them (chat template, --max-length); at --smoke a tiny random Llama and one of its layers on random
    examples of random lengths."""
    import torch

    from core.pretrained import prune_layers

    if smoke:
        dims = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
        teacher = _llama(64, dims, seed=0).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        features = []
        for _ in range(48):
            prompt, completion = (int(x) for x in torch.randint(2, 12, (2,), generator=gen))
            ids = torch.randint(1, 64, (prompt + completion,), generator=gen).tolist()
            features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        return teacher, prune_layers(teacher, 1), 0, features, "smoke"
    from core.data import DataConfig, chat_prompts, encode_examples, load_dolly
    from core.models import load_model
    from core.pretrained import resolve_model_folder
    from core.tokenizers import load_tokenizer

    cache = Path(os.environ.get("DISTILLAB_CACHE") or Path.home() / ".cache" / "distillab")
    folder = resolve_model_folder(REAL["teacher"], cache)
    tokenizer = load_tokenizer(folder)
    teacher = load_model(folder).eval().requires_grad_(False)
    data = DataConfig(task="dolly", data_dir=REAL["data_dir"], max_length=REAL["max_length"])
    task = chat_prompts(load_dolly(data), tokenizer, "chat")
    features = encode_examples(tokenizer, task.train, data.max_length)
    return teacher, prune_layers(teacher, REAL["prune"]), tokenizer.pad_token_id, features, f"path:{folder}"


def _flops_per_token(model) -> int:
    """Model FLOPs of one token's forward pass: 2 x the parameters that multiply it (the decoder and the head; the
    input embedding is a lookup, counted once even when tied to the head). Attention's score products are left out
    (at 256 positions they are under 10% of a SmolLM2 layer's)."""
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    if head.data_ptr() == embedding.data_ptr():
        return 2 * params  # tied: the one matrix is the head
    return 2 * (params - embedding.numel())


def real_case(steps: int, warmup: int, k: int = 64, smoke: bool = False) -> dict:
    """Every row of the real-LLM section in this one process: the same student initialisation, batches and threads.

    Rows (each `warmup + steps` optimizer steps on the batches of steps 0, 1, ...; timed after the warm-up):
    - `plain SFT`, `plain KD`: the PyTorch loop a user writes (full logits; F.cross_entropy, or F.kl_div against the
      live teacher's full logits), on the batches core.train draws (length-grouped); `(seeded order)`: the same loop
      on the batches of the order before issue 31 (example_indices without lengths), which is what today's numbers
      were measured on;
    - `sft`: core.train.Trainer on core.objectives.causal_lm_loss, the SFT baseline of every run;
    - `kd <flags>`: the KD step of `python -m methods.vanilla.run --variant kd --teacher smollm2-135m-instruct
      --student prune:K <flags>`: KDPathConfig parsed from the flags, the KDPath built as core.pipeline builds it
      (pretrained teacher), its forward-KL loss in core.train.Trainer. `kd` (no flags) is the default: forward KL
      from the teacher cache, fused; its cache is built first, over the examples the timed steps draw (not timed;
      its time is reported as the build row)."""
    import copy

    import torch
    import torch.nn.functional as F

    from core.config import parse
    from core.data import Collator
    from core.kdpath import KDPath, KDPathConfig
    from core.losses import get_divergence
    from core.objectives import causal_lm_loss
    from core.pipeline import default_length_group
    from core.train import TrainConfig, example_indices, train_indices

    torch.set_num_threads(2)
    rate = matmul_rate(0.2 if smoke else 1.5)
    rate_bf16 = matmul_rate(0.2 if smoke else 1.5, dtype="bfloat16")
    teacher, initial, pad, features, teacher_id = _real_setup(smoke)
    batch_size = 2 if smoke else REAL["batch"]
    n_steps = warmup + steps
    grouping = default_length_group(pretrained_teacher=True)  # as a run with SmolLM2 as its teacher gets it
    cfg = TrainConfig(steps=n_steps, batch_size=batch_size, lr=1e-5, warmup_steps=0, checkpoint_every=0, seed=0,
                      length_group=grouping)  # fmt: skip
    grouped = [train_indices(s, features, cfg) for s in range(n_steps)]
    seeded = [example_indices(s, len(features), batch_size, 0) for s in range(n_steps)]
    collate = Collator(pad)
    student_flops, teacher_flops = _flops_per_token(initial), _flops_per_token(teacher)

    def plain(kind: str, order, bf16: bool = False):
        def run(student, stamps):
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
            for indices in order:
                batch = collate([features[i] for i in indices])
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the AMP recipe: forwards only
                    logits = student(**inputs).logits[:, :-1]
                    valid = batch["labels"][:, 1:] != -100
                    if kind == "sft":
                        loss = F.cross_entropy(logits[valid].float(), batch["labels"][:, 1:][valid]) * 1.0
                    else:
                        with torch.no_grad():
                            teacher_logits = teacher(**inputs).logits[:, :-1]
                        log_q = F.log_softmax(logits[valid].float(), dim=-1)
                        log_p = F.log_softmax(teacher_logits[valid].float(), dim=-1)
                        loss = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / valid.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                stamps.append((time.perf_counter(), time.process_time()))

        return run, order

    def ours(loss_fn, precision: str = "fp32"):
        def run(student, stamps):
            from accelerate import Accelerator

            from core.train import Trainer

            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(
                    student, loss_fn, features, collate, cfg, Path(tmp) / "run", Accelerator(cpu=True),
                    on_step_end=lambda step, loss, logs: stamps.append((time.perf_counter(), time.process_time())),
                    precision=precision,
                )  # fmt: skip
                trainer.train()

        return run, grouped

    seen = sorted({i for order in grouped for i in order})
    cache_root = Path(tempfile.mkdtemp(prefix="perf-real-cache-"))
    rows: dict[str, dict] = {}

    def kd(flags: str):
        precision = "bf16" if flags.endswith("--precision bf16") else "fp32"
        flags = flags.removesuffix("--precision bf16").strip()
        (path_cfg,) = parse((KDPathConfig,), flags.split())
        path = KDPath(path_cfg, teacher, cache_root, "bench-real", pad, pretrained_teacher=True, student=initial)
        fkl = get_divergence("fkl")
        build = None
        if path.reads_cache(fkl):
            t0, c0 = time.perf_counter(), time.process_time()
            path.cache_for([features[i] for i in seen], 1.0)  # the examples the timed steps draw
            build = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            loss_fn = path.loss(fkl, features=[features[i] for i in seen])
            path.release_teacher()
        else:
            loss_fn = path.loss(fkl, features=features)
        return ours(loss_fn, precision), path, build

    loops = {
        "plain SFT (seeded order)": (plain("sft", seeded), None, None),
        "plain SFT": (plain("sft", grouped), None, None),
        "sft": (ours(causal_lm_loss), None, None),
        "plain KD (seeded order)": (plain("kd", seeded), None, None),
        "plain KD": (plain("kd", grouped), None, None),
        "kd --teacher-cache false": None,  # fused, live teacher
        "kd": None,  # the default on a pretrained teacher: forward KL from the cache, fused
        # --precision bf16 (bfloat16 autocast around the forwards), beside the plain loops under the same autocast
        "plain SFT bf16": (plain("sft", grouped, bf16=True), None, None),
        "sft --precision bf16": (ours(causal_lm_loss, "bf16"), None, None),
        "plain KD bf16": (plain("kd", grouped, bf16=True), None, None),
        "kd --teacher-cache false --precision bf16": None,
        "kd --precision bf16": None,
    }
    for name, loop in loops.items():
        if loop is None:
            loop = kd(name[len("kd") :].strip())
        (run, order), path, build = loop
        student = copy.deepcopy(initial).train()
        stamps: list[tuple[float, float]] = []
        gc.collect()
        t_start, c_start = time.perf_counter(), time.process_time()
        run(student, stamps)
        stamps = [(t_start, c_start), *stamps]
        timed = order[warmup:]
        wall = stamps[-1][0] - stamps[warmup][0]
        cpu = stamps[-1][1] - stamps[warmup][1]
        batches = [collate([features[i] for i in indices]) for indices in timed]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        positions = sum(b["attention_mask"].numel() for b in batches)
        flops = tokens * (3 * student_flops + (teacher_flops if "KD" in name or name.startswith("kd") else 0))
        if name in ("kd", "kd --precision bf16"):
            flops = tokens * 3 * student_flops  # the teacher ran when the cache was built (the build row)
        rows[name] = {
            "wall_s": wall, "cpu_s": cpu, "steps": len(timed), "tokens": tokens, "positions": positions,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "flops": flops,
            **({"kd_path": path.summary()} if path is not None else {}),
            **({"cache_build": build | {"examples": len(seen)}} if build else {}),
        }  # fmt: skip
        del student
    shutil.rmtree(cache_root, ignore_errors=True)
    return {
        "matmul": rate,
        "matmul_bf16": rate_bf16,
        "student_params": sum(p.numel() for p in initial.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_flops_per_token": student_flops,
        "teacher_flops_per_token": teacher_flops,
        "n_examples": len(features),
        "rows": rows,
    }


def section_real(steps: int, warmup: int, log, smoke: bool = False, k: int = 64) -> list[str]:
    result = child({"kind": "real", "steps": steps, "warmup": warmup, "k": k, "smoke": smoke})
    log(f"real: {result}")
    title = "## Real LLM: SmolLM2-135M-Instruct -> prune:6 on Dolly, batch 8, --max-length 256"
    if "error" in result:
        return [title, "", f"error: {result['error']}"]
    rows, rate = result["rows"], result["matmul"]
    lines = [
        title,
        "",
        f"Teacher {result['teacher_params'] / 1e6:.1f}M parameters, student {result['student_params'] / 1e6:.1f}M "
        f"(prune:{REAL['prune']}, untrained), {result['n_examples']:,} Dolly training examples in the chat template, "
        f"2 threads, all rows in one process (benchmarks/perf.py real_case). Each row trains {warmup} warm-up + "
        f"{steps} timed optimizer steps on the batches of steps 0, 1, ... (the same batches for every row but the "
        "`(seeded order)` ones, which take the order before issue 31). tokens/s = non-padding tokens of the timed "
        "steps over their time; padding = padded positions / all positions of those batches. Ratios are on CPU time "
        "(process user + system: robust to other processes on a shared machine); wall time beside it. Matmul share "
        f"= model FLOPs (6 x parameters per token trained, 2 x the teacher's per token it reads live; attention "
        "scores left out) per CPU-second over the torch.matmul rate measured in the same process "
        f"({rate['gflops_cpu']:.1f} GFLOP/s per CPU-second, {rate['gflops_wall']:.1f} per wall-second, float32 "
        f"1024 x 1024; the bf16 rows' over bfloat16's, {result['matmul_bf16']['gflops_cpu']:.1f} per CPU-second). "
        "The bf16 rows (`--precision bf16`: the forwards under bfloat16 autocast, weights, optimizer and losses in "
        "float32) are compared with the float32 plain loops in the x columns; `plain ... bf16` is the plain loop "
        "under the same autocast.",
        "",
        "| row | padding | tokens/s (wall) | tokens/s (CPU) | x plain SFT (CPU) | x plain KD (CPU) | "
        "x same plain loop, seeded order (CPU) | matmul share (CPU) | KD path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        if "tokens_per_cpu_s" not in row:
            continue
        base = rows["plain KD (seeded order)" if "KD" in name or name.startswith("kd") else "plain SFT (seeded order)"]
        row_rate = result["matmul_bf16"] if "bf16" in name else rate
        share = row["flops"] / row["cpu_s"] / (row_rate["gflops_cpu"] * 1e9)
        lines.append(
            f"| {name} | {1 - row['tokens'] / row['positions']:.1%} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_cpu_s']:.0f} | {row['tokens_per_cpu_s'] / rows['plain SFT']['tokens_per_cpu_s']:.2f} | "
            f"{row['tokens_per_cpu_s'] / rows['plain KD']['tokens_per_cpu_s']:.2f} | "
            f"{row['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f} | {share:.1%} | "
            f"{row.get('kd_path', {}).get('path', '-')} |"
        )
    sft, kd = rows["sft"], rows["kd"]
    build = kd.get("cache_build", {})
    lines += [
        "",
        f"KD step from the cache / SFT step (CPU time per non-padding token): "
        f"{sft['tokens_per_cpu_s'] / kd['tokens_per_cpu_s']:.2f} (wall {sft['tokens_per_s'] / kd['tokens_per_s']:.2f}). "
        "Before issue 31 a run's KD step cost what `plain KD (seeded order)` costs (73 tokens/s measured; its "
        "SFT step 132, as `plain SFT (seeded order)`): column `x same plain loop, seeded order` is the speed-up over that. Cache build "
        f"(teacher forward over the {build.get('examples', 0)} examples the timed steps draw, "
        f"k = {k}, 64 tail samples): {build.get('cpu_s', 0):.1f} CPU-s, {build.get('wall_s', 0):.1f} wall-s, once per "
        "teacher and data for every run, seed and method that reads it.",
    ]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The parent: run every case in its own process, write the tables
# ----------------------------------------------------------------------------------------------------------------


# Cases that measure time only (sampling) run without the two settings above that serve the memory measurement and
# CPU-time accounting: the mmap threshold returns every freed tensor over 64 KiB to the OS (so decoding, which frees
# many small tensors a token, pays a page fault per allocation), and passive waiting puts the second OpenMP thread
# to sleep after every operation. Measured on the embedded teacher-mixed loop (2 threads, git 33ccee1): each alone
# cut the tokens/s by a quarter to a half against the process defaults a run has.
TIMING_ONLY = {"generation", "store_generation"}
MEMORY_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "OMP_WAIT_POLICY")


def child_env(kind: str) -> dict[str, str]:
    """The environment of a case's subprocess: CHILD_ENV over this process's, less MEMORY_SETTINGS for a timing-only
    case (unless this process set them itself)."""
    env = {**os.environ, **CHILD_ENV}
    if kind in TIMING_ONLY:
        for name in MEMORY_SETTINGS:
            env.pop(name)
            if name in os.environ:
                env[name] = os.environ[name]
    env.setdefault("DISTILLAB_CACHE", str(Path(tempfile.gettempdir()) / "distillab-perf-cache"))
    return env


def child(case: dict) -> dict:
    if IN_PROCESS:
        return run_case(dict(case))
    env = child_env(case["kind"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


def run_case(case: dict) -> dict:
    kind = case.pop("kind")
    if kind == "loss":
        return loss_case(**case)
    if kind == "step":
        return step_case(**case)
    if kind == "cache_quality":
        return cache_quality_case(**case)
    if kind == "cache_bytes":
        return cache_bytes_case(**case)
    if kind == "real":
        return real_case(**case)
    if kind == "generation":
        return generation_case(**case)
    if kind == "store_generation":
        return store_generation_case(**case)
    raise ValueError(kind)


def _fmt(value, spec=".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if b[key] else None  # at toy sizes (--smoke) a peak can round to 0 MB


def section_loss(quick: bool, repeats: int, log, smoke: bool = False) -> list[str]:
    vocabs = [512] if smoke else [8_192, 32_768] if quick else [8_192, 32_768, 151_936]
    token_counts = [64] if smoke else [512] if quick else [512, 2_048]
    paths = ["plain", "checkpointed", "chunked", "plain-hidden", "fused"]
    lines = [
        "## Loss level: forward + backward of the forward-KL sum (all positions valid)",
        "",
        "Peak = resident memory above the inputs (MB). `plain`, `checkpointed` and `chunked` start from the logits",
        "(B x T x V, float32) and produce their gradient; `plain-hidden` and `fused` start from the final hidden states",
        f"(student {STUDENT['hidden_size']}, teacher {TEACHER['hidden_size']} wide) and the heads, and produce the",
        "gradients of the student's hidden states and head. Chunk: core.fused.default_chunk_size (2^24 logits).",
        "",
        "| vocab | tokens | path | wall (s) | CPU (s) | peak (MB) | CPU / plain | wall / plain | peak / plain |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        for tokens in token_counts:
            results = {}
            for path in paths:
                reps = repeats if vocab * tokens <= 32_768 * 2_048 else 2  # the largest: 2 (each ~1-2 min)
                results[path] = child(
                    {
                        "kind": "loss",
                        "path": path,
                        "vocab": vocab,
                        "tokens": tokens,
                        "divergence": "fkl",
                        "repeats": reps,
                    }
                )
                log(f"loss {vocab} {tokens} {path}: {results[path]}")
            for path in paths:
                r = results[path]
                base = results["plain-hidden" if path in ("plain-hidden", "fused") else "plain"]
                if "error" in r:
                    lines.append(f"| {vocab:,} | {tokens:,} | {path} | error | {r['error']} | | | | |")
                    continue
                ok = "error" not in base
                lines.append(
                    f"| {vocab:,} | {tokens:,} | {path} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mb']:.0f} | "
                    f"{_fmt(_ratio(r, base, 'cpu_s') if ok else None, '.2f')} | "
                    f"{_fmt(_ratio(r, base, 'time_s') if ok else None, '.2f')} | "
                    f"{_fmt(_ratio(r, base, 'peak_mb') if ok else None, '.3f')} |"
                )
    return lines


def _rounds(cases: dict[str, dict], rounds: int, log) -> dict[str, list[dict]]:
    """Run every case once per round, round-robin, so that each loop sees the same mix of machine load; a ratio is
    then taken within a round (cases measured minutes apart, not tens of minutes)."""
    out: dict[str, list[dict]] = {name: [] for name in cases}
    for round_ in range(rounds):
        for name, case in cases.items():
            result = child(dict(case))
            log(f"round {round_} {name}: {result}")
            out[name].append(result)
    return out


def _median_ratio(a: list[dict], b: list[dict], key: str) -> float | None:
    pairs = [x[key] / y[key] for x, y in zip(a, b) if "error" not in x and "error" not in y and y[key]]
    return statistics.median(pairs) if pairs else None


def _summary(results: list[dict], key: str, reduce=statistics.median) -> float | None:
    values = [r[key] for r in results if "error" not in r]
    return reduce(values) if values else None


def _kd_loop(flags: str) -> tuple[str, dict]:
    """A row of the step tables: the KD path a run given `flags` trains on."""
    return f"kd {flags}".strip(), {"loop": "kd", "flags": flags}


def section_step(quick: bool, steps: int, warmup: int, rounds: int, log, shape: str = "full") -> list[str]:
    dims = SHAPES[shape]
    vocabs = [512] if shape == "smoke" else [8_192] if quick else [8_192, 32_768]
    loops = dict([("plain", {"loop": "plain"}), ("trl", {"loop": "trl"})])
    if shape == "smoke" and importlib.util.find_spec("trl") is None:
        del loops["trl"]  # an optional extra (pip install .[perf]); a full run shows the row's error instead
    # "": today's default (fused where the heads allow it); "--fused false": the default before issue 31
    loops.update(_kd_loop(flags) for flags in ("--fused false", "", "--chunk-size 512", "--fused"))
    lines = [
        "## Step level: one optimizer step of forward-KL distillation",
        "",
        f"Teacher {dims.teacher['num_hidden_layers']} x {dims.teacher['hidden_size']}, student "
        f"{dims.student['num_hidden_layers']} x {dims.student['hidden_size']} (Llama, random init), batch {dims.batch} x "
        f"{dims.seq} tokens ({dims.prompt} prompt + {dims.seq - dims.prompt} completion, no padding), AdamW, clipping "
        f"at 1, 2 threads. Each loop runs {rounds} times (round-robin, a fresh process each); each run times {steps} "
        f"steps after {warmup} warm-up steps. Step = median over runs of the median step; ratios = median over rounds "
        "of the ratio within a round, on CPU time (process user + system time: robust to other processes on a shared "
        "machine) and on wall time. `plain`: the loop a PyTorch user writes (full logits, F.kl_div); `trl`: TRL's "
        "GKDTrainer with lmbda 0, beta 0 (forward KL on fixed completions); `kd <flags>`: the KD step of a run given "
        "those flags (`python -m methods.vanilla.run --variant kd <flags>`): the flags parsed into "
        "core.kdpath.KDPathConfig, a KDPath built from it as core.pipeline does, its loss in core.train.Trainer. Peak "
        "RSS = the training run's resident-set high-water mark (max over runs); delta = above the resident set after "
        "the models and data were built.",
        "",
        "| vocab | loop | wall step (s) | tokens/s | CPU step (s) | x plain (CPU) | x trl (CPU) | x plain (wall) | "
        "x trl (wall) | peak RSS (MB) | peak delta (MB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        cases = {
            name: {"kind": "step", "vocab": vocab, "steps": steps, "warmup": warmup, "shape": shape, **loop}
            for name, loop in loops.items()
        }
        results = _rounds(cases, rounds, log)
        for name, runs in results.items():
            step_s = _summary(runs, "step_s")
            if step_s is None:
                lines.append(f"| {vocab:,} | {name} | error | {runs[0].get('error', '')} | | | | | | | |")
                continue
            trl = results.get("trl", [])
            lines.append(
                f"| {vocab:,} | {name} | {step_s:.3f} | {dims.batch * dims.seq / step_s:.0f} | "
                f"{_summary(runs, 'cpu_s'):.3f} | "
                f"{_fmt(_median_ratio(results['plain'], runs, 'cpu_s'), '.2f')} | "
                f"{_fmt(_median_ratio(trl, runs, 'cpu_s'), '.2f')} | "
                f"{_fmt(_median_ratio(runs, results['plain'], 'tokens_per_s'), '.2f')} | "
                f"{_fmt(_median_ratio(runs, trl, 'tokens_per_s'), '.2f')} | "
                f"{_summary(runs, 'peak_rss_mb', max):.0f} | {_summary(runs, 'peak_delta_mb', max):.0f} |"
            )
    return lines


def _hit_rate(runs: list[dict]) -> str:
    rates = {r["kd_path"]["cache"]["hit_rate"] for r in runs if "cache" in r.get("kd_path", {})}
    return ", ".join(_fmt(rate, ".2f") for rate in sorted(rates, key=str)) or "-"


def section_cache(quick: bool, steps: int, warmup: int, rounds: int, log, k: int = 64, shape: str = "full"):
    vocabs = [512] if shape == "smoke" else [8_192] if quick else [8_192, 32_768]
    loops = dict([("sft", {"loop": "sft"})])
    loops.update(_kd_loop(f"--teacher-cache --teacher-cache-k {k}{fused}") for fused in (" --fused", ""))
    lines = [
        "## Teacher-logit cache",
        "",
        f"A KD step from the cache (`--teacher-cache --teacher-cache-k {k}`; with `--fused`, or full student logits)",
        "against an SFT step of the same student in the same loop (core.train), same setup and rounds as the",
        "step-level table. The cache is built before the timed run (not timed), then the KD path releases the teacher",
        "(KDPath.release_teacher): the memory is that of a run that trains from the cache alone. Hit rate: the share",
        "of training examples whose teacher rows came from the cache (KDPath.summary, as metrics.json records it).",
        "",
        "| vocab | loop | wall step (s) | CPU step (s) | step / SFT step (CPU) | step / SFT step (wall) | peak RSS (MB) | "
        "hit rate |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        cases = {
            name: {"kind": "step", "vocab": vocab, "steps": steps, "warmup": warmup, "shape": shape, **loop}
            for name, loop in loops.items()
        }
        results = _rounds(cases, rounds, log)
        for name, runs in results.items():
            step_s = _summary(runs, "step_s")
            if step_s is None:
                lines.append(f"| {vocab:,} | {name} | error | {runs[0].get('error', '')} | | | | |")
                continue
            rel = _median_ratio(runs, results["sft"], "step_s")
            rel_cpu = _median_ratio(runs, results["sft"], "cpu_s")
            lines.append(
                f"| {vocab:,} | {name} | {step_s:.3f} | {_summary(runs, 'cpu_s'):.3f} | {_fmt(rel_cpu, '.2f')} | "
                f"{_fmt(rel, '.2f')} | {_summary(runs, 'peak_rss_mb', max):.0f} | {_hit_rate(runs)} |"
            )
    if shape == "smoke":  # size and fidelity need a 151,936-token vocabulary and the embedded teacher: not toys
        return lines
    ks = [8, 32, 64, 256]
    size = child({"kind": "cache_bytes", "vocab": 151_936, "ks": ks})
    log(f"cache bytes: {size}")
    quality = child({"kind": "cache_quality", "ks": ks, "n_examples": 256 if quick else 2_000})
    log(f"cache quality: {quality}")
    lines += [
        "",
        "Size and fidelity. Bytes per token: the shard files on disk over the target tokens (float16 log-probs, int32",
        "ids above 65,536 tokens else uint16, a float32 tail, per-example offsets and keys). KL(full || cached): the",
        "cached distribution is the stored top-k with the tail mass spread evenly over the other tokens; measured on",
        "the embedded default teacher (core.teacher, 4 x 256, trained on the `ops` task) over the completion tokens of",
        "its first training examples.",
        "",
    ]
    if "error" in quality:
        lines.append(f"cache quality: error {quality['error']}")
    else:
        lines += [
            f"| k | bytes/token at V = 151,936 | bytes/token at V = {quality['vocab']} | mean tail mass | "
            "mean KL (nats) | max KL (nats) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in quality["rows"]:
            big = size.get(str(row["k"])) if "error" not in size else None
            lines.append(
                f"| {row['k']} | {_fmt(big, '.1f')} | {row['bytes_per_token']:.1f} | {row['tail_mass_mean']:.2e} | "
                f"{row['kl_mean']:.2e} | {row['kl_max']:.2e} |"
            )
        lines.append(f"\n({quality['tokens']:,} completion tokens.)")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Generation (issue 31): sampled tokens/s of core.generate, lean loop against the reference loop, and the forward
# ----------------------------------------------------------------------------------------------------------------

# The embedded task's models and MiniLLM's rollout shape: teacher 4 x 256, student 2 x 64, vocabulary 512,
# 32 prompts of 7-10 tokens, 12 new tokens. SmolLM2: the real-LLM pair, 8 prompts of 48-64 tokens, 32 new tokens.
GEN_SHAPES = {
    "embedded": dict(vocab=512, batch=32, prompt=(7, 10), new=12),
    "smollm2": dict(vocab=None, batch=8, prompt=(48, 64), new=32),
    "smoke": dict(vocab=64, batch=4, prompt=(3, 5), new=4),
}
EMBEDDED_TEACHER = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=704)
EMBEDDED_STUDENT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def _gen_models(shape: str):
    if shape == "smollm2":
        from core.models import load_model
        from core.pretrained import prune_layers, resolve_model_folder

        cache = Path(os.environ.get("DISTILLAB_CACHE", Path(tempfile.gettempdir()) / "distillab-perf-cache"))
        teacher = load_model(resolve_model_folder("smollm2-135m-instruct", cache))
        return teacher.eval(), prune_layers(teacher, 6).eval(), teacher.config.vocab_size
    vocab = GEN_SHAPES[shape]["vocab"]
    dims = (
        (SHAPES["smoke"].teacher, SHAPES["smoke"].student) if shape == "smoke" else (EMBEDDED_TEACHER, EMBEDDED_STUDENT)
    )
    return _llama(vocab, dims[0], 0).eval(), _llama(vocab, dims[1], 1).eval(), vocab


def _gen_prompts(spec: dict, vocab: int, n: int) -> list[list[int]]:
    """n random prompts of the shape's lengths (seeded: the same prompts in every case), each starting with token 1."""
    import torch

    gen = torch.Generator().manual_seed(0)
    lo, hi = spec["prompt"]
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [[1] + torch.randint(3, vocab, (k - 1,), generator=gen).tolist() for k in lengths]


def _forward_floor(model, ids, mask, repeats: int) -> tuple[float, float]:
    """Median seconds of one batch x 1 token step after the prompt `ids`: the model's forward with HF's
    DynamicCache (cropped back to the prompt after each step) and core.generate's lean step."""
    import torch

    import core.generate as G

    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    token, pos = ids[:, -1:], positions[:, -1:] + 1
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.cache
        decoder = G._LeanDecoder(model, width + 1)
        decoder.prefill(ids, mask, positions)

        def hf_step():
            model(input_ids=token, attention_mask=full, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)  # back to the prompt, so every timed step sees the same cache

        def lean_step():
            decoder.step(token[:, 0], pos[:, 0], full.bool(), width)

        result = []
        for fn in (hf_step, lean_step):
            fn()
            times = []
            for _ in range(5 * repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result.append(statistics.median(times))
    return result[0], result[1]


def generation_case(shape: str, mixed: bool, repeats: int, precision: str = "fp32") -> dict:
    """Sampled tokens/s of core.generate.sample_completions, the reference loop (HF generate alone; the two-model
    loop for the mixture) and the lean loop alternately in this process, same prompts and seeds (the tokens are
    compared); and the forward rate: one batch x 1 token forward with the KV cache, through the model's forward
    (HF DynamicCache) and through the lean step. EOS is -1, so every row runs the full length (fixed work).
    `precision` bf16: everything under bfloat16 autocast, as --precision bf16 runs it. The teacher is frozen, as a
    run freezes it."""

    import core.generate as G
    from core.precision import autocast

    teacher, student, vocab = _gen_models(shape)
    teacher.requires_grad_(False)
    spec = GEN_SHAPES[shape]
    prompts = _gen_prompts(spec, vocab, spec["batch"])
    mix = {"mix_model": teacher, "mix_alpha": 0.2} if mixed else {}

    def sample(fast: bool, seed: int):
        G.FAST_DECODING = fast
        start, cpu = time.perf_counter(), time.process_time()
        out = G.sample_completions(student, prompts, -1, 0, spec["new"], seed=seed, precision=precision, **mix)
        return time.perf_counter() - start, time.process_time() - cpu, out

    sample(False, 0), sample(True, 0)  # warm-up
    runs: dict[bool, list] = {False: [], True: []}
    identical = True
    for r in range(repeats):
        ref, lean = sample(False, r + 1), sample(True, r + 1)
        runs[False].append(ref)
        runs[True].append(lean)
        identical &= ref[2] == lean[2]
    tokens = sum(len(c) for c in runs[True][0][2])

    # The forward floor: batch x 1 token with a warm KV cache, for each model of the loop.
    ids, mask = G.left_padded(prompts, 0)
    forward = {}
    for name, model in [("student", student), ("teacher", teacher)] if mixed else [("student", student)]:
        with autocast("cpu", precision):
            forward[f"{name}_hf_s"], forward[f"{name}_lean_s"] = _forward_floor(model, ids, mask, repeats)
    ref_s = statistics.median(r[0] for r in runs[False])
    lean_s = statistics.median(r[0] for r in runs[True])
    # Matrix products of one call: every model's forward over the prompt (batch x width) and the new tokens' steps.
    models = [student, teacher] if mixed else [student]
    positions = spec["batch"] * (ids.shape[1] + spec["new"] - 1)
    rate = matmul_rate(0.2 if shape == "smoke" else 1.0, dtype="bfloat16" if precision == "bf16" else "float32")
    return {
        "flops": positions * sum(_flops_per_token(m) for m in models),
        "matmul_gflops_wall": rate["gflops_wall"],
        "tokens": tokens,
        "batch": spec["batch"],
        "steps": spec["new"],
        "ref_s": ref_s,
        "lean_s": lean_s,
        "ref_cpu_s": statistics.median(r[1] for r in runs[False]),
        "lean_cpu_s": statistics.median(r[1] for r in runs[True]),
        "identical": identical,
        **forward,
    }


# (loop, rollouts per decoding loop, precision)
STORE_LOOPS = (
    ("reference", 32, "fp32"), ("lean", 32, "fp32"), ("lean", 64, "fp32"), ("lean", 256, "fp32"),
    ("lean", 64, "bf16"), ("lean", 256, "bf16"),
)  # fmt: skip


def store_generation_case(shape: str, repeats: int, rollouts: int = 256) -> dict:
    """MiniLLM's store on the embedded models: `rollouts` teacher-mixed completions (alpha 0.2) of the same prompts,
    sampled in decoding loops of 32 (a micro-batch: MiniLLM's rollouts before issue 31, by the reference loop and by
    the lean one) or of 64 and 256 (--rollout-chunk), in float32 and under --precision bf16. Each loop is seeded
    by its first rollout, as the store seeds it, so the two loops of 32 sample the same tokens (compared) and larger
    loops other draws of the same mixture. The teacher is frozen, as a run freezes it."""

    import core.generate as G

    teacher, student, vocab = _gen_models(shape)
    teacher.requires_grad_(False)
    spec = GEN_SHAPES[shape]
    prompts = _gen_prompts(spec, vocab, rollouts)

    def sample(loop: str, chunk: int, precision: str, seed: int):
        G.FAST_DECODING = loop == "lean"
        start, cpu = time.perf_counter(), time.process_time()
        out = []
        for first in range(0, rollouts, chunk):
            out += G.sample_completions(
                student, prompts[first : first + chunk], -1, 0, spec["new"], seed=seed * 100_003 + first,
                mix_model=teacher, mix_alpha=0.2, precision=precision,
            )  # fmt: skip
        return time.perf_counter() - start, time.process_time() - cpu, out

    for key in STORE_LOOPS:
        sample(*key, 0)  # warm-up
    runs: dict[tuple, list] = {key: [] for key in STORE_LOOPS}
    for r in range(repeats):
        for key in STORE_LOOPS:
            runs[key].append(sample(*key, r + 1))
    same = all(a[2] == b[2] for a, b in zip(runs[STORE_LOOPS[0]], runs[STORE_LOOPS[1]]))
    return {
        "rollouts": rollouts,
        "new": spec["new"],
        "same_tokens_32": same,
        "rows": [
            {
                "loop": key[0],
                "chunk": key[1],
                "precision": key[2],
                "tokens": sum(len(c) for c in runs[key][0][2]),
                "s": statistics.median(x[0] for x in runs[key]),
                "cpu_s": statistics.median(x[1] for x in runs[key]),
            }
            for key in STORE_LOOPS
        ],
    }


def section_generation(quick: bool, repeats: int, log, smoke: bool = False, smollm: bool = False) -> list[str]:
    shapes = ["smoke"] if smoke else ["embedded"] + (["smollm2"] if smollm else [])
    lines = [
        "## Generation: sampled tokens/s of core.generate.sample_completions (issue 31)",
        "",
        "Reference = the loops before issue 31 (HF `generate` alone; the two-model KV-cache loop `_sample_mixture` for",
        "the teacher-mixed rows, alpha 0.2); lean = core.generate's lean loop (`_decode`). Both alternate in one",
        "process on the same prompts and seeds; `same tokens` compares every sampled token. EOS never fires, so every",
        "row samples the full length. Forward floor = tokens/s if each new token cost only the model forwards of one",
        "batch x 1 token step with a warm KV cache (HF forward with its DynamicCache / the lean step), summed over the",
        "loop's models: what sampling cannot beat without cheaper forwards. Median of the repeats. bf16: both loops",
        "and the floor under `--precision bf16` (bfloat16 autocast). The teacher is frozen, as in a run. Matmul",
        "share: the lean loop's model FLOPs (2 x the parameters that multiply a token, per model, over the prompt's",
        "and the new tokens' positions; attention scores left out) per wall-second over the torch.matmul rate of",
        "1024 x 1024 in the row's precision, measured in the same process.",
        "",
        "| models | sampling | precision | batch x new | reference tok/s | lean tok/s | lean / reference "
        "| CPU s ref / lean | same tokens | forward floor tok/s (HF / lean step) | lean / lean floor | matmul share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, mixed, precision in itertools.product(shapes, (False, True), ("fp32", "bf16")):
        log(f"generation {shape} {'mixed' if mixed else 'plain'} {precision}")
        case = {"kind": "generation", "shape": shape, "mixed": mixed, "repeats": repeats, "precision": precision}
        r = child(case)
        label = "teacher-mixed" if mixed else "plain (student)"
        if "error" in r:
            lines.append(f"| {shape} | {label} | {precision} | | {r['error']} | | | | | | | |")
            continue
        models = ["student", "teacher"] if mixed else ["student"]
        floor_hf = r["batch"] / sum(r[f"{m}_hf_s"] for m in models)
        floor_lean = r["batch"] / sum(r[f"{m}_lean_s"] for m in models)
        ref_rate, lean_rate = r["tokens"] / r["ref_s"], r["tokens"] / r["lean_s"]
        lines.append(
            f"| {shape} | {label} | {precision} | {r['batch']} x {r['steps']} | {ref_rate:.0f} | {lean_rate:.0f} | "
            f"{r['ref_s'] / r['lean_s']:.2f} | {r['ref_cpu_s']:.2f} / {r['lean_cpu_s']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} | {floor_hf:.0f} / {floor_lean:.0f} | {lean_rate / floor_lean:.2f} | "
            f"{r['flops'] / r['lean_s'] / (r['matmul_gflops_wall'] * 1e9):.1%} |"
        )
    if smoke:
        return lines
    log("generation: MiniLLM's store, decoding loops of 32 / 64 / 256")
    r = child({"kind": "store_generation", "shape": "embedded", "repeats": repeats})
    lines += [
        "",
        "MiniLLM's rollout store on the embedded models: 256 teacher-mixed completions (alpha 0.2, 12 new tokens, EOS",
        "off) of the same prompts, in decoding loops of 32 (a micro-batch: MiniLLM's rollouts before issue 31), or of",
        "64 and 256 (`--rollout-chunk`; default 64), in float32 and under `--precision bf16` (bfloat16 matrix products:",
        "other roundings, so other draws). Each loop is seeded by its first rollout as the store seeds it: the two loops",
        "of 32 sample the same tokens, the other rows other draws of the same mixture. The teacher is frozen, as in a",
        "run. Median of the repeats.",
        "",
        "| loop | rollouts per loop | precision | sampled tokens | s | tokens/s | x reference loops of 32 | CPU s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    if "error" in r:
        return lines + [f"| {r['error']} | | | | | | | |"]
    base = r["rows"][0]["tokens"] / r["rows"][0]["s"]
    for row in r["rows"]:
        rate = row["tokens"] / row["s"]
        lines.append(
            f"| {row['loop']} | {row['chunk']} | {row['precision']} | {row['tokens']} | {row['s']:.3f} | {rate:.0f} | "
            f"{rate / base:.2f} | {row['cpu_s']:.3f} |"
        )
    lines.append("")
    lines.append(f"Loops of 32, reference and lean: same tokens: {'yes' if r['same_tokens_32'] else 'NO'}.")
    return lines


def header() -> list[str]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except Exception as exc:  # an optional extra: report, do not fail
        trl_version = f"not importable ({type(exc).__name__})"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
        git = rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        git = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    smoke = ["- --smoke: toy sizes, every case in this process: this checks that the cases run, it measures nothing"]
    return [
        "# distillab performance benchmark",
        "",
        f"`python benchmarks/perf.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        *(smoke if IN_PROCESS else []),
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; git {git}",
        "- load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"- machine: {cpu}, {os.cpu_count()} CPUs visible, 2 threads per case, Linux {platform.release()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl_version}",
        "- timings on a shared machine are noisy: compare ratios within a table (measured in one run), not across runs",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", default="loss,step,cache,real,gen", help="comma-separated sections: loss, step, cache, real, gen"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps")
    parser.add_argument(
        "--smoke", action="store_true", help="every case at toy sizes, in this process: checks that they run (seconds)"
    )
    parser.add_argument(
        "--gen-smollm", action="store_true", help="gen section: also SmolLM2-135M-Instruct and its prune:6 student"
    )
    parser.add_argument("--cache-k", type=int, default=64, help="cache section: the --teacher-cache-k measured")
    parser.add_argument("--repeats", type=int, default=3, help="loss level: repeats per case (the median is shown)")
    parser.add_argument(
        "--steps", type=int, default=None, help="step level: timed steps per run (default 5; --quick 3)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="step level: untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="step level: runs per loop, round-robin")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "perf_results.md"), help="where to write the table")
    args = parser.parse_args(argv)
    if args.case:
        import torch

        torch.set_num_threads(2)
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    global IN_PROCESS
    IN_PROCESS = args.smoke
    quick = args.quick or args.smoke
    shape = "smoke" if args.smoke else "full"
    steps = args.steps or (2 if args.smoke else 3 if args.quick else 5)
    warmup = 1 if args.smoke else args.warmup
    repeats = 1 if quick else args.repeats
    rounds = 1 if quick else args.rounds

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    lines = header()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    for section in sections:
        sections_by_name = {
            "loss": lambda: section_loss(quick, repeats, log, smoke=args.smoke),
            "step": lambda: section_step(quick, steps, warmup, rounds, log, shape),
            "cache": lambda: section_cache(quick, steps, warmup, rounds, log, args.cache_k, shape),
            "real": lambda: section_real(args.steps or 2, 1, log, smoke=args.smoke, k=args.cache_k),
            "gen": lambda: section_generation(quick, repeats, log, smoke=args.smoke, smollm=args.gen_smollm),
        }
        body = sections_by_name[section]()
        lines += body + [""]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(
        f"Total benchmark time: {time.perf_counter() - t0:.0f} s; load average (1, 5, 15 min) at the end: {load}."
    )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from core.io import atomic_write_text

    atomic_write_text(args.out, text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

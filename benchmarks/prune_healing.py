"""How much a depth-pruned SmolLM2 loses, and how fast distillation on generic text heals it (issue 12).

    python benchmarks/prune_healing.py --layers 6,10,15,20,25                 # perplexity of each cut, no training
    python benchmarks/prune_healing.py --layers 6 --heal-steps 150            # then heal prune:6, report every 50
    python benchmarks/prune_healing.py --layers 24,20,15 --rules even,block-influence,greedy-ppl   # selection rules
    python benchmarks/prune_healing.py --layers 20 --rules block-influence --heal-steps 100 --report-every 25 \
        --rouge-n 8                                                          # the healing curve with ROUGE-L

The teacher is `--teacher` (default smollm2-135m-instruct, through core.pretrained.resolve_model_folder); a student
`prune:K` is core.pretrained.prune_layers of it, as `--student prune:K` builds it. The score is the perplexity of the
responses of the first --n held-out Dolly examples (instruct_eval/dolly/valid.jsonl) with their prompts in the
teacher's chat template, encoded as the LLM recipe encodes them (core.data.load_dolly, chat_prompts,
encode_examples at --max-length, scored by core.metrics.perplexity): the responses are the targets, the prompts are
context.

Selection rules (--rules, core.pretrained.select_layers): `even` keeps evenly spaced layers; `block-influence` and
`greedy-ppl` score the blocks on --calibration Dolly training examples (the last rows of dolly/dev.jsonl, which the
suites' first-200 training rows and the held-out valid.jsonl do not contain), encoded as the recipe encodes them.
Healing heals the cut of the last rule listed.

Healing (--heal-steps N): forward KL (core.losses.forward_kl, the teacher's full distribution) on every token of
generic English sentences that no evaluation set contains: the first 20,000 lines of Multi30k's train.en and of
CommonGen's train targets, shuffled with a fixed seed, each cut to 64 tokens; AdamW at --lr with 20 warmup steps
and cosine decay over N, batches of --batch-size, gradient norm clipped to 1. This is Minitron's recipe
(distillation on pretraining text) at a CPU's scale. The teacher runs live here (the exact forward KL); a run's
--heal-steps (core/healing.py) reads it through the teacher-logit cache with the sampled tail, an unbiased estimate
of the same loss. Prints one line per report, and a markdown table of the curve at the end; nothing is written.

With --rouge-n N > 0 every report (step 0, the cut before healing, included) also gives the ROUGE-L of greedy answers
(--max-new-tokens, default 64) to the first N of the held-out prompts (core.metrics.evaluate_model, the recipe's
evaluation), and the teacher's on the same prompts as the reference. Wall time is the healing's own (training steps
only; the evaluations are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.losses import forward_kl  # noqa: E402

HEAL_LINES = 20_000  # from each of the two corpora
HEAL_TOKENS = 64
WARMUP = 20


def heal_corpus(data_root: Path, tokenizer, seed: int = 0) -> list[list[int]]:
    lines = (data_root / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()[:HEAL_LINES]
    lines += (data_root / "commongen" / "commongen.train.tgt.txt").read_text(encoding="utf-8").splitlines()[:HEAL_LINES]
    random.Random(seed).shuffle(lines)
    return [tokenizer(line, add_special_tokens=False)["input_ids"][:HEAL_TOKENS] for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="6", help="comma-separated K of prune:K")
    parser.add_argument("--n", type=int, default=40, help="held-out Dolly examples scored")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--rules", default="even", help="comma-separated: even, block-influence, greedy-ppl")
    parser.add_argument("--calibration", type=int, default=16, help="Dolly training examples scoring the blocks")
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--rouge-n", type=int, default=0, help="held-out prompts answered for ROUGE-L (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from core.config import RunConfig, cache_root
    from core.data import Collator, DataConfig, chat_prompts, encode_examples, load_dolly
    from core.metrics import evaluate_model, perplexity
    from core.models import load_model
    from core.pretrained import prune_layers, resolve_model_folder, select_layers

    layers = [int(k) for k in args.layers.split(",")]
    folder = resolve_model_folder(args.teacher, args.cache_dir or cache_root(RunConfig()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = load_model(folder).eval().requires_grad_(False)
    data = DataConfig(task="dolly", data_dir=str(args.data_root / "instruct_eval"), eval_sets="dolly",
                      eval_size=args.n, max_length=args.max_length)  # fmt: skip
    task = chat_prompts(load_dolly(data), tokenizer, "chat")
    collate = Collator(tokenizer.pad_token_id)

    def score(model: torch.nn.Module) -> float:  # the recipe's perplexity of the held-out responses (no graph)
        return perplexity(model, tokenizer, task.eval, args.max_length, batch_size=8)

    rouge_task = dataclasses.replace(task, eval=task.eval[: args.rouge_n]) if args.rouge_n else None

    def rouge(model: torch.nn.Module) -> float | None:  # greedy answers to the first --rouge-n held-out prompts
        if rouge_task is None:
            return None
        model.eval()
        scores, _ = evaluate_model(model, tokenizer, rouge_task, args.max_length, 8, args.max_new_tokens)
        return scores["rougeL"]

    teacher_rouge = rouge(teacher)
    print(f"teacher {args.teacher}: Dolly valid perplexity {score(teacher):.2f} ({len(task.eval)} examples)"
          + (f", ROUGE-L {teacher_rouge:.1f} on {args.rouge_n} prompts" if teacher_rouge is not None else ""))  # fmt: skip
    calibration = [f["input_ids"] for f in encode_examples(tokenizer, task.train[-args.calibration :], args.max_length)]
    for k in layers:
        for rule in args.rules.split(","):
            start = time.perf_counter()
            keep = select_layers(teacher, k, rule, calibration)
            chosen = time.perf_counter() - start
            student = prune_layers(teacher, k, keep)
            removed = [i for i in range(teacher.config.num_hidden_layers) if i not in keep]
            print(f"prune:{k} {rule} (removes {removed}; chosen in {chosen:.0f} s): {score(student):,.1f}", flush=True)
    if not args.heal_steps:
        return
    corpus = heal_corpus(args.data_root, tokenizer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    def schedule(step: int) -> float:
        return (
            min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step, args.heal_steps) / args.heal_steps))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rows_out = []

    def report(step: int, kl: float | None, wall: float) -> None:
        ppl, rl = score(student), rouge(student)
        student.train()
        rows_out.append((step, wall, kl, ppl, rl))
        print(f"step {step}: KL {kl if kl is not None else float('nan'):.3f}, {wall:.0f} s healing, "
              f"perplexity {ppl:,.1f}" + (f", ROUGE-L {rl:.1f}" if rl is not None else ""), flush=True)  # fmt: skip

    report(0, None, 0.0)
    student.train()
    wall = 0.0
    for step in range(1, args.heal_steps + 1):
        start = time.perf_counter()
        rows = corpus[(step - 1) * args.batch_size : step * args.batch_size]
        batch = collate([{"input_ids": row, "labels": row} for row in rows])
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(logits[mask], teacher_logits[mask]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        wall += time.perf_counter() - start
        if step % args.report_every == 0 or step == args.heal_steps:
            report(step, loss.item(), wall)
    print(
        "\n| healing steps | wall time (s) | batch forward KL | held-out perplexity | ROUGE-L |\n|---|---|---|---|---|"
    )
    for step, seconds, kl, ppl, rl in rows_out:
        print(f"| {step} | {seconds:.0f} | {'-' if kl is None else f'{kl:.3f}'} | {ppl:,.1f} | "
              f"{'-' if rl is None else f'{rl:.1f}'} |")  # fmt: skip
    if teacher_rouge is not None:
        print(f"| teacher | | | {score(teacher):.2f} | {teacher_rouge:.1f} |")


if __name__ == "__main__":
    main()

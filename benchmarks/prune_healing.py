"""How much a depth-pruned SmolLM2 loses, and how fast distillation on generic text heals it (issue 12).

    python benchmarks/prune_healing.py --layers 6,10,15,20,25                 # perplexity of each cut, no training
    python benchmarks/prune_healing.py --layers 6 --heal-steps 150            # then heal prune:6, report every 50
    python benchmarks/prune_healing.py --layers 24,20,15 --rules even,block-influence,greedy-ppl   # selection rules
    python benchmarks/prune_healing.py --layers 20 --rules block-influence --heal-steps 100 --report-every 25 \
        --rouge-n 8                                                          # the healing curve with ROUGE-L
    python benchmarks/prune_healing.py --layers 24,20,15 --rules block-influence,even --heal-steps 60 \
        --report-every 20 --rouge-n 20 --json curve.json --png curve.png     # every cut healed, one plot

The teacher is `--teacher` (default smollm2-135m-instruct, through core.pretrained.resolve_model_folder); a student
`prune:K` is core.pretrained.prune_layers of it, as `--student prune:K` builds it. The score is the perplexity of the
responses of the first --n held-out Dolly examples (instruct_eval/dolly/valid.jsonl) with their prompts in the
teacher's chat template, encoded as the LLM recipe encodes them (core.data.load_dolly, chat_prompts,
encode_examples at --max-length, scored by core.metrics.perplexity): the responses are the targets, the prompts are
context.

Selection rules (--rules, core.pretrained.select_layers): `even` keeps evenly spaced layers; `block-influence` and
`greedy-ppl` score the blocks on --calibration Dolly training examples (the last rows of dolly/dev.jsonl, which the
suites' first-200 training rows and the held-out valid.jsonl do not contain), encoded as the recipe encodes them.
Healing heals every cut listed (each K with each rule), each from the cut itself, in lockstep on the same batches:
the teacher's logits of a batch are computed once and serve every cut. --json writes every curve's rows, --png plots
them (perplexity and ROUGE-L against healing steps).

Healing (--heal-steps N): forward KL (core.losses.forward_kl, the teacher's full distribution) on every token of
generic English sentences that no evaluation set contains: the first 20,000 lines of Multi30k's train.en and of
CommonGen's train targets, shuffled with a fixed seed, each cut to 64 tokens; AdamW at --lr with 20 warmup steps
and cosine decay over N, batches of --batch-size, gradient norm clipped to 1. This is Minitron's recipe
(distillation on pretraining text) at a CPU's scale. The teacher runs live here (the exact forward KL); a run's
--heal-steps (core/healing.py) reads it through the teacher-logit cache with the sampled tail, an unbiased estimate
of the same loss. Prints one line per report, and a markdown table of each curve at the end; nothing is written
unless --json or --png says where.

With --rouge-n N > 0 every report (step 0, the cut before healing, included) also gives the ROUGE-L of greedy answers
(--max-new-tokens, default 64) to the first N of the held-out prompts (core.metrics.evaluate_model, the recipe's
evaluation), and the teacher's on the same prompts as the reference. Wall time is the healing's own (training steps
only, the teacher's forward excluded as a run's cached healing excludes it; the evaluations are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
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
    parser.add_argument("--json", type=Path, default=None, help="write every curve's rows here")
    parser.add_argument("--png", type=Path, default=None, help="plot the curves here")
    parser.add_argument("--from-logs", type=Path, nargs="+", default=None,
                        help="train nothing: read the curves from these runs' printed output, then --json / --png")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_logs:
        curves, reference = curves_from_logs(args.from_logs)
        for curve in curves:
            print_table(f"prune:{curve['layers']} {curve['rule']}", curve["rows"])
        write_outputs(args, curves, reference)
        return

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

    teacher_rouge, teacher_ppl = rouge(teacher), score(teacher)
    print(f"teacher {args.teacher}: Dolly valid perplexity {teacher_ppl:.2f} ({len(task.eval)} examples)"
          + (f", ROUGE-L {teacher_rouge:.1f} on {args.rouge_n} prompts" if teacher_rouge is not None else ""))  # fmt: skip
    calibration = [f["input_ids"] for f in encode_examples(tokenizer, task.train[-args.calibration :], args.max_length)]
    n_layers = teacher.config.num_hidden_layers
    cuts: list[Healing] = []
    for k in layers:
        for rule in args.rules.split(","):
            start = time.perf_counter()
            keep = select_layers(teacher, k, rule, calibration)
            chosen = time.perf_counter() - start
            removed = [i for i in range(n_layers) if i not in keep]
            student = prune_layers(teacher, k, keep)
            cut_ppl = score(student)
            print(f"prune:{k} {rule} (removes {removed}; chosen in {chosen:.0f} s): {cut_ppl:,.1f}", flush=True)
            if args.heal_steps:  # healed below from this very cut; its step-0 perplexity is this score
                cuts.append(Healing(k, rule, keep, student, args, cut_ppl))
    if not args.heal_steps:
        return
    corpus = heal_corpus(args.data_root, tokenizer)
    for cut in cuts:
        cut.report(0, None, score, rouge)
    for step in range(1, args.heal_steps + 1):  # every cut trains on the same batch; the teacher runs once for all
        rows = corpus[(step - 1) * args.batch_size : step * args.batch_size]
        batch = collate([{"input_ids": row, "labels": row} for row in rows])
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        for cut in cuts:
            loss = cut.step(batch, mask, target)
            if step % args.report_every == 0 or step == args.heal_steps:
                cut.report(step, loss, score, rouge)
    curves = []
    for cut in cuts:
        removed = [i for i in range(n_layers) if i not in cut.keep]
        curves.append({"layers": cut.k, "rule": cut.rule, "removed": removed, "rows": cut.rows})
        print_table(f"prune:{cut.k} {cut.rule} (removes {removed})", cut.rows)
    reference = {"perplexity": teacher_ppl, "rougeL": teacher_rouge}
    print(f"| teacher | | | {reference['perplexity']:.2f} | "
          f"{'-' if teacher_rouge is None else f'{teacher_rouge:.1f}'} |")  # fmt: skip
    write_outputs(args, curves, reference)


def write_outputs(args, curves: list[dict], reference: dict) -> None:
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "teacher": reference,
                                         "curves": curves}, indent=1))  # fmt: skip
        print(f"wrote {args.json}")
    if args.png:
        plot_curves(curves, reference, args.png)
        print(f"wrote {args.png}")


REPORT = re.compile(
    r"prune:(\d+) (\S+) step (\d+): KL (\S+), (\d+) s healing, perplexity ([\d,]*\.?\d+)(?:, ROUGE-L ([\d.]+))?"
)
CUT = re.compile(r"prune:(\d+) (\S+) \(removes \[([\d, ]*)\];")
TEACHER = re.compile(r"Dolly valid perplexity ([\d.]+) \(\d+ examples\)(?:, ROUGE-L ([\d.]+))?")


def curves_from_logs(paths: list[Path]) -> tuple[list[dict], dict]:
    """The curves of runs of this script from what they printed (progress bars' carriage returns ignored), for a run
    stopped before it wrote --json: the rows reported so far."""
    curves: dict[tuple[int, str], dict] = {}
    reference: dict = {}
    for path in paths:
        for line in path.read_text(errors="replace").replace("\r", "\n").splitlines():
            if match := CUT.search(line):
                curve = curves.setdefault(
                    (int(match[1]), match[2]), {"layers": int(match[1]), "rule": match[2], "rows": []}
                )
                curve["removed"] = [int(i) for i in match[3].split(",") if i.strip()]
            elif match := TEACHER.search(line):
                reference = {"perplexity": float(match[1]), "rougeL": float(match[2]) if match[2] else None}
            elif match := REPORT.search(line):
                k, rule = int(match[1]), match[2]
                curve = curves.setdefault((k, rule), {"layers": k, "rule": rule, "rows": []})
                curve["rows"].append({"step": int(match[3]), "wall_s": float(match[5]),
                                      "kl": None if match[4] == "nan" else float(match[4]),
                                      "perplexity": float(match[6].replace(",", "")),
                                      "rougeL": float(match[7]) if match[7] else None})  # fmt: skip
    return list(curves.values()), reference


class Healing:
    """One cut student healing: AdamW at --lr, WARMUP warmup steps then cosine decay over --heal-steps, gradient
    norm clipped to 1; `rows` is its curve (step 0 is the cut before healing). `wall` counts its own training steps
    only: the teacher's forward is shared by every cut (a run's cached healing does not run it either)."""

    def __init__(self, k: int, rule: str, keep: list[int], student: torch.nn.Module, args, perplexity: float) -> None:
        self.k, self.rule, self.keep, self.student = k, rule, keep, student
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
        steps = args.heal_steps

        def schedule(step: int) -> float:
            return min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.rows: list[dict] = []
        self.wall = 0.0
        self.perplexity = perplexity  # the latest score: the cut's, until a report after training

    def step(self, batch: dict, mask: torch.Tensor, target: torch.Tensor) -> float:
        start = time.perf_counter()
        self.student.train()
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(logits[mask], target).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.wall += time.perf_counter() - start
        return loss.item()

    def report(self, step: int, kl: float | None, score, rouge) -> None:
        """Scores the student (the perplexity at step 0 is the cut's, already scored) and prints and keeps the row."""
        if step:
            self.perplexity = score(self.student)
        ppl, rl = self.perplexity, rouge(self.student)
        self.rows.append({"step": step, "wall_s": self.wall, "kl": kl, "perplexity": ppl, "rougeL": rl})
        print(f"prune:{self.k} {self.rule} step {step}: KL {kl if kl is not None else float('nan'):.3f}, "
              f"{self.wall:.0f} s healing, perplexity {ppl:,.1f}" + (f", ROUGE-L {rl:.1f}" if rl is not None else ""),
              flush=True)  # fmt: skip


def print_table(title: str, rows_out: list[dict]) -> None:
    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"\n{title}\n\n| healing steps | wall time (s) | batch forward KL | held-out perplexity | ROUGE-L |")
    print("|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['step']} | {r['wall_s']:.0f} | {cell(r['kl'], '.3f')} | {r['perplexity']:,.1f} | "
              f"{cell(r['rougeL'], '.1f')} |")  # fmt: skip


def plot_curves(curves: list[dict], reference: dict, path: Path) -> None:
    """Held-out perplexity (log scale) and ROUGE-L against healing steps, one line per cut and rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for curve in curves:
        steps = [r["step"] for r in curve["rows"]]
        style = "-" if curve["rule"] == "block-influence" else "--"
        label = f"prune:{curve['layers']} {curve['rule']}"
        line = left.plot(steps, [r["perplexity"] for r in curve["rows"]], style, marker="o", ms=3, label=label)[0]
        if curve["rows"][0]["rougeL"] is not None:
            right.plot(steps, [r["rougeL"] for r in curve["rows"]], style, marker="o", ms=3, color=line.get_color())
    left.axhline(reference["perplexity"], color="k", lw=0.8, label="teacher")
    if reference["rougeL"] is not None:
        right.axhline(reference["rougeL"], color="k", lw=0.8)
        for share in (0.4, 0.8):
            right.axhline(share * reference["rougeL"], color="grey", lw=0.6, ls=":")
    left.set(yscale="log", xlabel="healing steps", ylabel="held-out Dolly perplexity")
    right.set(xlabel="healing steps", ylabel="ROUGE-L (greedy)", title="dotted: 40 % and 80 % of the teacher")
    left.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

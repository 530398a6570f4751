"""A small training job run in a separate process by the resume and fault-tolerance tests.

    python tests/core/train_job.py OUT STEPS [--checkpoint-every N] [--kill-in-checkpoint K]

--kill-in-checkpoint K sends SIGKILL to this process in the middle of writing its K-th checkpoint (after the
model and optimizer files, before the trainer state), the worst moment for a crash.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.data import Collator, DataConfig, encode_examples, load_ops  # noqa: E402
from core.models import build_model  # noqa: E402
from core.objectives import causal_lm_loss  # noqa: E402
from core.tokenizers import train_bpe  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402


def setup(n_train: int = 64):
    task = load_ops(DataConfig(train_size=n_train, eval_size=8))
    tokenizer = train_bpe([e.prompt + e.target for e in task.train], 320)
    return tokenizer, encode_examples(tokenizer, task.train, 64)


def train(out: Path, tokenizer, features, **cfg) -> Trainer:
    model = build_model("tiny", tokenizer, seed=0)
    cfg = TrainConfig(**{"warmup_steps": 2, "checkpoint_every": 0, **cfg})
    trainer = Trainer(
        model, causal_lm_loss, features, Collator(tokenizer.pad_token_id), cfg, out, Accelerator(cpu=True)
    )
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--kill-in-checkpoint", type=int, default=0)
    args = parser.parse_args()
    if args.kill_in_checkpoint:
        real_save, seen = torch.save, {"n": 0}

        def save(obj, path, *a, **k):
            if str(path).endswith("scheduler.pt"):
                seen["n"] += 1
                if seen["n"] == args.kill_in_checkpoint:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)

        torch.save = save
    tokenizer, features = setup()
    train(args.out, tokenizer, features, steps=args.steps, batch_size=4, checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    main()

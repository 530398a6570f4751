"""A training job with per-process state, launched on 2 CPU processes by tests/core/test_distributed.py.

    accelerate launch --num_processes 2 --cpu tests/core/process_state_job.py OUT STEPS DUMP [--stop-after N]
    accelerate launch --num_processes 2 --cpu tests/core/process_state_job.py OUT STEPS DUMP --load-only

Each process adds the examples of its own shard of every batch to its own core.replay.ReplayBuffer (as DistiLLM
adds its own samples) and draws from Python's and torch's global RNG, seeded per process, so no two processes hold
the same state. After training, or with --load-only after restoring the newest checkpoint without training, each
process writes its buffer and its next RNG draws to DUMP/rank_R.json.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.data import Collator  # noqa: E402
from core.models import build_model  # noqa: E402
from core.objectives import causal_lm_loss  # noqa: E402
from core.replay import ReplayBuffer  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402
from tests.core.train_job import setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("dump", type=Path)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--load-only", action="store_true")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    random.seed(100 + rank)  # what set_seed(seed, device_specific=True) does: another stream on each process
    torch.manual_seed(100 + rank)
    tokenizer, features = setup()
    buffer = ReplayBuffer(capacity=6)  # 2 examples a step on each process: full after 3 steps, then FIFO

    def prepare_batch(model, batch, step: int, index: int):
        rows = batch["input_ids"].tolist()  # this process's shard of the step
        buffer.add({"input_ids": row, "labels": row} for row in rows)
        random.random(), torch.rand(1)  # advance both global RNGs, as sampling or dropout would
        return batch

    cfg = TrainConfig(steps=args.steps, batch_size=4, warmup_steps=2, checkpoint_every=0, stop_after=args.stop_after)
    model = build_model("tiny", tokenizer, seed=0)
    trainer = Trainer(
        model,
        causal_lm_loss,
        features,
        Collator(tokenizer.pad_token_id),
        cfg,
        args.out,
        accelerator,
        state={"replay_buffer": buffer},
        prepare_batch=prepare_batch,
    )
    if args.load_only:
        trainer.load_checkpoint(trainer.latest_checkpoint())
    else:
        trainer.train()
    args.dump.mkdir(parents=True, exist_ok=True)
    record = {
        "step": trainer.step,
        "buffer": [item["input_ids"] for item in buffer.state_dict()["items"]],
        "python_rng": [random.random() for _ in range(3)],
        "torch_rng": torch.rand(3).tolist(),
    }
    (args.dump / f"rank_{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

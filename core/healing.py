"""A cut student that keeps what it knew: which layers `--student prune:K` keeps, and the healing stage (issue 30).

    --prune-rule even|block-influence|greedy-ppl   which K layers (core.pretrained.select_layers); default
                      block-influence, the best measured rule (benchmarks/prune_rules.md: SmolLM2-135M at 24 of 30
                      layers 32.1 held-out Dolly perplexity against 221 evenly spaced, at 20 layers 113 against 50,322)
    --heal-steps N    forward-KL distillation of the cut student from the teacher on generic text, N steps, before
                      anything else trains (0: none)
    --heal-data DIR   that text: the English sentences of DIR/multi30k/train.en and DIR/commongen/commongen.train.tgt.txt
                      (the shared data root); default: the run's own training prompts and responses
    --heal-lr LR      the healing's peak learning rate
    --heal-batch-size B  texts per healing step (default: the run's --batch-size)

Layer selection. The calibration text is the run's first CALIBRATION_EXAMPLES training examples, encoded as the recipe
encodes them (prompt in the chat template + response, core.data.encode_examples at --max-length; the token ids of the
whole example). The selection is deterministic given the teacher and that text, so it is computed once and stored
in <cache>/prune/<key>.json (key: teacher folder, K, rule, calibration ids); later runs read it.

Healing. Every token of each healing text is a target (labels = input ids). The loss is word-level forward KL,
KL(p_teacher || q_student) per token, averaged over tokens (core.objectives.make_kd_loss with core.losses.forward_kl),
read from the teacher-logit cache with the sampled tail (core.kdpath / core.logit_cache at the run's
--teacher-cache-k and --teacher-cache-samples): the teacher runs once over the healing text, and the sampled tail
makes the loss and its gradient unbiased for forward KL (exact when k >= the vocabulary). Healing trains with the
run's batch size and optimizer settings but its own steps, learning rate and seed 0, on heal_steps x batch_size
texts (one pass, no text seen twice; the run's training examples cycle when fewer; --heal-batch-size sets
its batch apart from the run's), and is cached like the SFT
baseline (core.teacher.train_cached): the key holds the student cut, the teacher, the healing text, its training
settings and the cache's k and m, not the run's seed or method, so every method and seed of a suite starts from one
healed student, as the papers' students start from one pretrained checkpoint. A second run loads it and trains
nothing.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.config import HEAL_FILES
from core.io import atomic_write_json, stable_hash

CALIBRATION_EXAMPLES = 16  # the run's first training examples score the blocks (issue 30: 16, as measured)
HEAL_LINES = 20_000  # read from the head of each file (as benchmarks/prune_healing.py), then shuffled with seed 0
HEAL_TOKENS = 64  # each healing text is cut to this many tokens
HEAL_SEED = 0  # healing's data order and tail sample: one healed student for every seed of a suite


def selected_layers(teacher, teacher_folder: str, k: int, rule: str, rows: list[list[int]], cache: Path) -> list[int]:
    """The K layers `rule` keeps (core.pretrained.select_layers), computed once per teacher, K, rule and calibration
    text and read back from <cache>/prune/ after that."""
    from core.pretrained import select_layers

    key = {"teacher": str(teacher_folder), "k": k, "rule": rule, "calibration": stable_hash(rows)}
    path = cache / "prune" / f"{stable_hash(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())["kept"]
    kept = select_layers(teacher, k, rule, rows)
    atomic_write_json(path, {"key": key, "kept": kept})
    return kept


def heal_features(heal_data: str | None, tokenizer, train_features: list[dict], rows: int) -> list[dict]:
    """The healing texts as training features (every token a target): `rows` lines of --heal-data, or the run's
    training examples (prompt + response) when it is None."""
    if heal_data is None:
        return [{"input_ids": f["input_ids"], "labels": list(f["input_ids"])} for f in train_features]
    lines: list[str] = []
    for name in HEAL_FILES:
        lines += (Path(heal_data) / name).read_text(encoding="utf-8").splitlines()[:HEAL_LINES]
    random.Random(HEAL_SEED).shuffle(lines)
    features = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"][:HEAL_TOKENS]
        if len(ids) >= 2:  # at least one next-token target
            features.append({"input_ids": ids, "labels": list(ids)})
        if len(features) == rows:
            break
    return features


class HealLoss:
    """The healing loss: forward KL, KL(p_teacher || q_student) per target token, through the teacher-logit cache
    (core.kdpath.KDPath.loss with core.losses.forward_kl). The cache is built on the first call, so a healed student
    found in the cache needs no teacher pass at all; `built` says whether any step ran."""

    def __init__(self, path, features: list[dict]) -> None:
        self.path, self.features, self.built = path, features, None

    def __call__(self, model, batch):
        from core.losses import forward_kl

        if self.built is None:
            self.built = self.path.loss(forward_kl, features=self.features)
        return self.built(model, batch)


def heal_student(setup, model_cfg, path_cfg, teacher, teacher_source: str, teacher_tokenizer_key: str):
    """(healed model, TrainResult, cache folder, info for metrics.json): the cut student of `setup` distilled from
    `teacher` by forward KL through the teacher-logit cache, trained once per key (module docstring)."""
    from core.kdpath import KDPath
    from core.logit_cache import data_fingerprint
    from core.teacher import train_cached

    batch_size = model_cfg.heal_batch_size or setup.train.batch_size
    train = replace(setup.train, steps=model_cfg.heal_steps, lr=model_cfg.heal_lr, seed=HEAL_SEED, stop_after=None,
                    batch_size=batch_size)  # fmt: skip
    features = heal_features(model_cfg.heal_data, setup.tokenizer, setup.features, train.steps * train.batch_size)
    cache_cfg = replace(path_cfg, teacher_cache=True, fused=False, chunk_size=None)
    path = KDPath(cache_cfg, teacher, setup.cache, teacher_tokenizer_key, setup.tokenizer.pad_token_id)
    loss_fn = HealLoss(path, features)

    cut = replace(setup, start=None, healed=None, train=train)
    key: dict[str, Any] = {
        **cut.key(),
        "teacher": teacher_source,
        "heal_data": data_fingerprint(features),
        **cache_cfg.result_key(),
    }
    model, result, folder = train_cached(
        f"heal-{setup.model.student.replace(':', '')}",
        key,
        cut.build_student,
        features,
        setup.tokenizer,
        train,
        setup.cache,
        setup.accelerator,
        loss_fn=loss_fn,
    )
    if loss_fn.built is not None:
        print(f"[heal] healed the cut student in {result.steps} steps; cached in {folder}", file=sys.stderr)
    else:
        print(f"[heal] loaded the healed student from {folder} (cached: no healing step ran)", file=sys.stderr)
    info = {
        "steps": model_cfg.heal_steps,
        "lr": model_cfg.heal_lr,
        "batch_size": batch_size,
        "data": model_cfg.heal_data or "the run's training prompts and responses",
        "texts": len(features),
        "loss": "forward KL through the teacher-logit cache",
        **cache_cfg.result_key(),
        "folder": str(folder),
        "trained_now": loss_fn.built is not None,
    }
    return model, result, folder, info

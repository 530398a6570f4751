"""DNKD: decoupled non-parametric (kNN) knowledge distillation for end-to-end speech translation.

    python -m speech.dnkd.run                                   # embedded synthetic task, a few minutes on 2 cores
    python -m speech.dnkd.run --task digits                     # spoken digits (FSDD), unseen test speaker
    python -m speech.dnkd.run --task s2t --data-dir MUSTC/en-de --train-split train_st --eval-split tst-COMMON_st

One run, three students on the same budget, initialisation and data order:
  1. ce      label-smoothed cross-entropy (the base ST model); its decoder states over the training set become the
             datastore (keys) with the next target tokens (values);
  2. knn_kd  CE + lambda KL(p_kNN || p_S), the kNN teacher of every training token retrieved once beforehand;
  3. dnkd    CE + alpha TCKD + beta NCKD against the same kNN teacher (the run's "student").
Each is evaluated by greedy decoding on the held-out split: BLEU, chrF (sacrebleu) and exact match.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from core.config import comma_list, require
from core.errors import ConfigError
from core.io import atomic_dir, atomic_write_text, stable_hash
from core.plots import plot_log
from core.shell import Outcome, Recipe, RunContext, cli, run_recipe
from core.train import LossOutput, TrainConfig
from speech import data as sd
from speech.datastore import Datastore, knn_distribution
from speech.dnkd.loss import dnkd_loss_sum, knn_kd_loss_sum
from speech.features import compute_split, load_split
from speech.models import (
    PRESETS,
    build_model,
    collate,
    count_frames,
    count_target_tokens,
    decoder_states,
    evaluate,
    forward,
    label_smoothed_nll,
    make_feature,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared" / "data"
TASKS = ("synthetic", "digits", "multi30k", "s2t")
TASK_NAMES = {"synthetic": "synthetic-speech", "digits": "spoken-digits", "multi30k": "voiced-multi30k", "s2t": "s2t"}
FEATURE_VERSION = 2  # bump when features.py changes what it computes
BASELINES = ("ce", "knn_kd")


@dataclass
class SpeechData:
    """The speech translation task and its features."""

    task: str = field(default="synthetic", metadata={"help": f"one of {', '.join(TASKS)} (see speech/data.py)"})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "digits: the FSDD recordings folder; multi30k: its folder; s2t: the folder of the tsv "
                  "manifests (default for digits/multi30k: ../shared/data/...)"},
    )  # fmt: skip
    train_split: str = field(default="train_st", metadata={"help": "s2t: training manifest name (without .tsv)"})
    eval_split: str = field(default="tst-COMMON_st", metadata={"help": "s2t: evaluation manifest name"})
    n_train: int | None = field(
        default=None,
        metadata={"help": "training utterances (default: synthetic 1200, digits 1500, multi30k 2000, s2t all)"},
    )
    n_eval: int | None = field(
        default=None,
        metadata={"help": "evaluation utterances (default: synthetic 200, digits 300, multi30k 200, s2t all)"},
    )
    test_speakers: str = field(default="theo", metadata={"help": "digits: comma-separated speakers held out for test"})
    n_mels: int = field(default=40, metadata={"help": "log-mel filterbank channels"})
    vocab_size: int = field(
        default=1000, metadata={"help": "BPE vocabulary for open-vocabulary targets (multi30k, s2t)"}
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "s2t" and self.data_dir is None:
            raise ConfigError("--task s2t needs --data-dir, the folder holding <split>.tsv manifests")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"--data-dir {self.data_dir} is not a folder")
        for name in ("n_train", "n_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 8 <= self.n_mels <= 128:
            raise ConfigError(f"--n-mels must be in [8, 128], got {self.n_mels}")
        if self.vocab_size < 300:
            raise ConfigError(f"--vocab-size must be at least 300 (256 byte symbols + specials), got {self.vocab_size}")
        if not comma_list(self.test_speakers, "--test-speakers"):
            raise ConfigError("--test-speakers must name at least one speaker")


@dataclass
class SpeechModelConfig:
    """The Speech2Text model and its cross-entropy."""

    preset: str = field(default="tiny", metadata={"help": f"model size: {', '.join(PRESETS)}"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing epsilon of the CE term"})
    dropout: float = field(default=0.1, metadata={"help": "dropout of the transformer layers"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "longest translation at evaluation (default: 2 + longest training target)"}
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class DNKDConfig:
    """The datastore, the kNN teacher and the decoupled KD weights."""

    k: int = field(default=16, metadata={"help": "neighbours retrieved per target token"})
    knn_temperature: float = field(default=10.0, metadata={"help": "T in p_kNN = softmax(-d / T) (squared L2 d)"})
    alpha: float = field(default=1.0, metadata={"help": "weight of TCKD (target class vs rest)"})
    beta: float = field(default=8.0, metadata={"help": "weight of NCKD (among the non-target classes)"})
    kd_weight: float = field(default=1.0, metadata={"help": "lambda of the plain kNN-KD rival: CE + lambda KL"})
    index: str = field(default="auto", metadata={"help": "faiss index: auto (flat up to 200k keys), flat, ivfpq"})
    keep_self: bool = field(
        default=False,
        metadata={"help": "let a training token retrieve its own datastore entry (distance 0) as a neighbour"},
    )
    compare: str = field(
        default="ce,knn_kd", metadata={"help": "students evaluated beside DNKD: a comma list of ce, knn_kd ('' none)"}
    )

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if not self.knn_temperature > 0:
            raise ConfigError(f"--knn-temperature must be positive, got {self.knn_temperature}")
        require(self, "non-negative", lambda v: v >= 0, "alpha", "beta", "kd_weight")
        if self.index not in ("auto", "flat", "ivfpq"):
            raise ConfigError(f"--index must be auto, flat or ivfpq, got {self.index!r}")
        unknown = [c for c in self.compare_list if c not in BASELINES]
        if unknown:
            raise ConfigError(f"--compare names {unknown}; choose from {', '.join(BASELINES)} (or '' for none)")

    @property
    def compare_list(self) -> list[str]:
        return comma_list(self.compare, "--compare")


@dataclass
class SpeechTrainConfig(TrainConfig):
    """Optimization (core.train's settings; defaults for the tiny speech model from scratch)."""

    steps: int = field(default=300, metadata={"help": "optimizer steps of each of the three students"})
    lr: float = field(
        default=5e-3, metadata={"help": "peak learning rate (AdamW); 5e-3 learned fastest of 2e-3, 5e-3, 1e-2"}
    )


# -- data ------------------------------------------------------------------------------------------------------


def load_task(cfg: SpeechData, cache: Path) -> sd.SpeechTask:
    n = {k: v for k, v in (("n_train", cfg.n_train), ("n_eval", cfg.n_eval)) if v is not None}
    if cfg.task == "synthetic":
        return sd.synthetic_task(**n)
    if cfg.task == "digits":
        speakers = tuple(s.strip() for s in cfg.test_speakers.split(",") if s.strip())
        return sd.digits_task(cfg.data_dir or SHARED / "fsdd" / "recordings", test_speakers=speakers, **n)
    if cfg.task == "multi30k":
        return sd.multi30k_task(cfg.data_dir or SHARED / "multi30k", cache / "espeak", **n)
    return sd.s2t_task(cfg.data_dir, cfg.train_split, cfg.eval_split, cfg.n_train, cfg.n_eval)


def cached_features(ctx: RunContext, task: sd.SpeechTask, n_mels: int) -> tuple[list, list]:
    """Filterbanks of every utterance, computed once per (task content, feature settings)."""
    content = stable_hash([(u.id, u.target, u.speaker) for u in task.train + task.eval])
    key = {"task": task.name, "content": content, "n_mels": n_mels, "version": FEATURE_VERSION}

    def build(folder: Path) -> None:
        compute_split(task.train, n_mels, folder / "train.safetensors", "train")
        compute_split(task.eval, n_mels, folder / "eval.safetensors", "eval")

    folder = ctx.cached("speech-features", key, build)
    return load_split(folder / "train.safetensors", len(task.train)), load_split(
        folder / "eval.safetensors", len(task.eval)
    )


# -- losses ----------------------------------------------------------------------------------------------------


def ce_loss(epsilon: float):
    def loss_fn(model, batch) -> LossOutput:
        logits, _ = forward(model, batch)  # (B, L, V)
        return LossOutput(label_smoothed_nll(logits, batch["labels"], epsilon).sum())

    return loss_fn


def teacher_probs(batch, vocab_size: int, temperature: float) -> torch.Tensor:
    return knn_distribution(batch["knn_distances"], batch["knn_values"], vocab_size, temperature)  # (B, L, V)


def knn_kd_loss(epsilon: float, cfg: DNKDConfig):
    def loss_fn(model, batch) -> LossOutput:
        logits, _ = forward(model, batch)
        teacher = teacher_probs(batch, logits.shape[-1], cfg.knn_temperature)
        ce = label_smoothed_nll(logits, batch["labels"], epsilon)
        loss, kl = knn_kd_loss_sum(logits, batch["labels"], teacher, ce, cfg.kd_weight)
        return LossOutput(loss, {"kl": float(kl.detach().mean()) if len(kl) else 0.0})

    return loss_fn


def dnkd_loss(epsilon: float, cfg: DNKDConfig):
    def loss_fn(model, batch) -> LossOutput:
        logits, _ = forward(model, batch)
        teacher = teacher_probs(batch, logits.shape[-1], cfg.knn_temperature)
        ce = label_smoothed_nll(logits, batch["labels"], epsilon)
        loss, terms = dnkd_loss_sum(logits, batch["labels"], teacher, ce, cfg.alpha, cfg.beta)
        n = max(len(terms["tckd"]), 1)
        logs = {
            "tckd": float(terms["tckd"].detach().sum()) / n,
            "nckd": float(terms["nckd"].detach().sum()) / n,
            "nckd_defined": float(terms["nckd_defined"].float().sum()) / n,
        }
        return LossOutput(loss, logs)

    return loss_fn


# -- the datastore ---------------------------------------------------------------------------------------------


def knn_targets(ctx: RunContext, model, features: list, cfg: DNKDConfig) -> dict[str, torch.Tensor]:
    """Neighbours of every training token in the datastore of `model`'s decoder states, built once per run
    (kept in the run folder, so a resumed run does not rebuild it)."""
    folder = ctx.out / "datastore"
    file = folder / "knn.safetensors"
    if file.is_file():
        return load_file(str(file))
    t0 = time.perf_counter()
    keys, values = decoder_states(model, features)  # (N, d), (N,)
    t_keys = time.perf_counter() - t0
    store = Datastore.build(keys.numpy(), values.numpy(), cfg.index)
    t_index = time.perf_counter() - t0 - t_keys
    own = None if cfg.keep_self else np.arange(len(store))
    distances, neighbour_values = store.neighbours(store.keys, cfg.k, own=own)
    t_search = time.perf_counter() - t0 - t_keys - t_index
    out = {
        "distances": torch.from_numpy(distances),
        "values": torch.from_numpy(neighbour_values),
        "gold": values,
    }
    with atomic_dir(folder) as tmp:
        save_file(out, str(tmp / "knn.safetensors"))
        index_kind = type(store.index).__name__
        stats = {"keys": len(store), "dim": int(keys.shape[1]), "index": index_kind, "keys_s": t_keys,
                 "index_s": t_index, "search_s": t_search}  # fmt: skip
        atomic_write_text(tmp / "build.json", json.dumps(stats, indent=2) + "\n")
    return out


def teacher_stats(knn: dict[str, torch.Tensor], vocab_size: int, temperature: float) -> dict[str, float]:
    """How the kNN teacher looks over the training tokens, each in percent (the unit of every share in metrics.json,
    as BLEU, chrF and exact match): top-1 agreement with the gold token, its mean mass on the gold token, and how
    often it puts no mass off the gold token (NCKD undefined there)."""
    probs = knn_distribution(knn["distances"], knn["values"], vocab_size, temperature)  # (N, V)
    gold = knn["gold"]
    p_gold = probs.gather(-1, gold[:, None]).squeeze(-1)
    return {
        "teacher_top1_agreement": 100.0 * float((probs.argmax(-1) == gold).float().mean()),
        "teacher_mean_p_gold": 100.0 * float(p_gold.mean()),  # a percentage, as every share in metrics.json
        "teacher_one_hot_on_gold": 100.0 * float((p_gold >= 1.0 - 1e-6).float().mean()),
        "mean_neighbour_sq_distance": float(knn["distances"][torch.isfinite(knn["distances"])].mean()),
    }


def attach_neighbours(features: list, knn: dict[str, torch.Tensor]) -> list:
    """Per-utterance slices of the (N, k) neighbour arrays, in decoder_states' order (utterance, position)."""
    out, offset = [], 0
    for f in features:
        n = len(f["labels"])
        out.append({**f, "knn_values": knn["values"][offset : offset + n],
                    "knn_distances": knn["distances"][offset : offset + n]})  # fmt: skip
        offset += n
    if offset != len(knn["values"]):
        raise RuntimeError(f"datastore has {len(knn['values'])} entries but the training set {offset} tokens")
    return out


# -- the recipe ------------------------------------------------------------------------------------------------


def body(ctx: RunContext) -> Outcome | None:
    data_cfg, model_cfg, cfg, train = (
        ctx.cfg(SpeechData),
        ctx.cfg(SpeechModelConfig),
        ctx.cfg(DNKDConfig),
        ctx.cfg(SpeechTrainConfig),
    )
    task = load_task(data_cfg, ctx.cache)
    vocab = sd.TargetVocab.for_task(task, data_cfg.vocab_size)
    train_fbank, eval_fbank = cached_features(ctx, task, data_cfg.n_mels)
    features = [make_feature(f, vocab.encode(u.target), vocab) for f, u in zip(train_fbank, task.train)]
    references = [u.target for u in task.eval]
    max_new = model_cfg.max_new_tokens or 2 + max(len(f["labels"]) for f in features)
    kwargs = {"count_fn": count_target_tokens, "throughput_fn": count_frames, "unit": "frames"}

    def new_model():
        return build_model(model_cfg.preset, len(vocab), data_cfg.n_mels, seed=train.seed, dropout=model_cfg.dropout)

    def fit(model, loss_fn, feats, subdir):
        trainer = ctx.trainer(model, loss_fn, feats, collate, train, subdir=subdir, **kwargs)
        result = trainer.train()
        if not trainer.finished:  # --stop-after: say where, as the LLM runs do (core.pipeline)
            print(
                f"[{subdir or ctx.name}] stopped at step {trainer.step} of {train.steps}; rerun the same command to "
                "resume",
                file=sys.stderr,
            )
            return None, None
        return result, model

    # 1. the base ST model (CE): the datastore's source, and the CE row of the table
    ce_result, ce_model = fit(new_model(), ce_loss(model_cfg.label_smoothing), features, "baselines/ce")
    if ce_result is None:
        return None
    # 2. the kNN teacher of every training token
    knn = knn_targets(ctx, ce_model, features, cfg)
    kd_features = attach_neighbours(features, knn)
    stats = teacher_stats(knn, len(vocab), cfg.knn_temperature)
    build = json.loads((ctx.out / "datastore" / "build.json").read_text())
    # 3. plain kNN-KD and 4. DNKD, same initialisation, data order and budget
    results, evals, outputs = {}, {}, {}
    if "knn_kd" in cfg.compare_list:
        results["knn_kd_student"], kd_model = fit(new_model(), knn_kd_loss(model_cfg.label_smoothing, cfg), kd_features,
                                                  "baselines/knn_kd")  # fmt: skip
        if kd_model is None:
            return None
        evals["knn_kd_student"], outputs["knn_kd"] = evaluate(kd_model, eval_fbank, references, vocab, max_new)
    result, student = fit(new_model(), dnkd_loss(model_cfg.label_smoothing, cfg), kd_features, None)
    if student is None:
        return None
    evals["student"], outputs["dnkd"] = evaluate(student, eval_fbank, references, vocab, max_new)
    if "ce" in cfg.compare_list:
        evals["ce_student"], outputs["ce"] = evaluate(ce_model, eval_fbank, references, vocab, max_new)
    save_model(student, str(ctx.out / "student.safetensors"))  # tied embeddings stored once
    plot_log(ctx.out / "log.jsonl", ["loss", "tckd", "nckd", "nckd_defined"], ctx.out / "dnkd_terms.png",
             title=f"DNKD on {task.name} (seed {train.seed})")  # fmt: skip
    lines = [json.dumps({"id": u.id, "speaker": u.speaker, "reference": u.target, **{k: v[i] for k, v in outputs.items()}},
                        ensure_ascii=False) for i, u in enumerate(task.eval)]  # fmt: skip
    atomic_write_text(ctx.out / "samples.jsonl", "\n".join(lines) + "\n")
    baselines = {"ce_student": asdict(ce_result)} | {k: asdict(v) for k, v in results.items()}
    return Outcome(
        task=task.name,
        eval={k: evals[k] for k in ("ce_student", "knn_kd_student", "student") if k in evals},
        train={
            **asdict(result),
            "baselines": baselines,
            "datastore": {**build, **stats},
            "train_utterances": len(task.train),
            "eval_utterances": len(task.eval),
        },  # fmt: skip
        columns=["bleu", "chrf", "exact_match"],
    )


RECIPE = Recipe(
    name="dnkd",
    family="speech",
    configs=(SpeechData, SpeechModelConfig, DNKDConfig, SpeechTrainConfig),
    body=body,
    task=lambda ctx: TASK_NAMES[ctx.cfg(SpeechData).task],
    description="DNKD (kNN teacher + decoupled KD) for end-to-end speech translation, beside CE and plain kNN-KD.",
)


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    cli(main)

"""How a run computes word-level KD: the speed features of core.fused and core.logit_cache, as flags of every run.

    --fused            no full logits: both models' logits are projected from their final hidden states, a chunk
                       of valid positions at a time (exact; core.fused)
    --chunk-size C     full logits, but the loss and its gradient C positions at a time (exact; core.fused)
    --teacher-cache    the teacher's top-k log-probabilities, m ids sampled from the rest and its entropy, computed
                       once over the training data and read back (core.logit_cache), shared by every method,
                       baseline and seed of the same teacher and data; forward KL reads it without bias
    --teacher-cache-k  that k
    --teacher-cache-samples  that m (default 64; 0: the tail as one bucket, which reads forward KL low)

Defaults (issue 31; docs/performance.md, "Which methods read the cache"): with neither flag given, --fused is on
wherever both models' logits are their last hidden state times a linear head (it is exact), and on a pretrained
teacher (--teacher: SmolLM2, a folder, a .gguf) every forward-KL loss (the KD baselines, vanilla KD) reads the teacher
cache, which its sampled tail makes unbiased for forward KL, while every other loss and method keeps the live teacher
(nothing is refused). The embedded teacher stays live: it is small beside its student and the cache would run it over
the whole 20,000-example task for runs that see fewer examples. `--teacher-cache` (true) makes every KD loss read the
cache, as below; `--teacher-cache false` / `--fused false` turn the defaults off.

Below the vocabulary size (k < V) the cache holds the teacher's distribution only through the top k and a sample,
which makes forward KL (value and gradient) unbiased and nothing else: on SmolLM2-135M at k = 64 the tail bucket
reads reverse KL 78% low with a gradient unrelated to the true one, and JSD, TVD and the skew KLs with gradient
cosines 0.83-0.90 (benchmarks/cache_fidelity.md). So every other divergence, and every method that reads the
teacher's full logits (`teacher_logits`: TAID, GKD, DistiLLM, SinKD), is refused at make_loss time with a
ConfigError; at k >= V the cache is exact and serves them all. (TAID's target softmax(t log p + (1 - t) log q) is
not linear in p, so a sampled tail gives it no unbiased gradient either.)

The LLM recipe (core.pipeline) builds one `KDPath` per run and hands it to the method (`Context.kd`) and to the
word-level KD baselines, so every KD student of a run takes the same path; metrics.json records which one ran
(`train.kd_path`), with the cache's bytes per token and hit rate. A batch the cache does not hold (an on-policy
batch of generated text) falls back to running the teacher, and counts as a miss.

Training from the cache alone: once `loss` (or `teacher_logits`) has built the cache of every training set the run
trains on, `KDPath.release_teacher()` drops the path's reference to the teacher, so its memory is freed where nothing
else holds it (benchmarks/perf.py measures the cached step this way). A miss after that is a DataError, not a teacher
forward: release only when every batch comes from the cached training data (not with on-policy methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError, DataError
from core.logit_cache import TeacherLogitCache, example_key, get_logit_cache, teacher_fingerprint
from core.losses import DIVERGENCES, Divergence, divergence_temperature, forward_kl
from core.objectives import make_kd_loss, projects_from_hidden, shifted_targets, teacher_forward
from core.train import LossOutput

CACHE_SEED = 0  # the seed of the sampled tail (in the cache key): every run of a teacher and data shares one cache


@dataclass
class KDPathConfig:
    """How word-level KD reads the teacher and computes the loss (docs/performance.md)."""

    teacher_cache: bool | None = field(
        default=None,
        metadata={
            "help": "train from the teacher's cached top-k log-probs and sampled tail (computed once, shared across "
            "runs). Unset: forward-KL losses read it when the teacher is pretrained (--teacher), every other loss "
            "runs the teacher live; true: every KD loss reads it (k < V: forward KL only); false: the live teacher"
        },
    )
    teacher_cache_k: int = field(
        default=64,
        metadata={"help": "k of the teacher cache (below the vocabulary size, forward KL only: module docstring)"},
    )
    teacher_cache_samples: int = field(
        default=64,
        metadata={"help": "tail ids sampled per position into the teacher cache (unbiased forward KL; 0: one bucket)"},
    )
    fused: bool | None = field(
        default=None,
        metadata={
            "help": "project logits from hidden states chunk by chunk (exact). Unset: on where both models' logits "
            "are their last hidden state times a linear head and --chunk-size is not given; false: full logits"
        },
    )
    chunk_size: int | None = field(
        default=None, metadata={"help": "evaluate the KD loss this many positions at a time (exact)"}
    )

    def __post_init__(self) -> None:
        if self.teacher_cache_k < 1:
            raise ConfigError(f"--teacher-cache-k must be at least 1, got {self.teacher_cache_k}")
        if self.teacher_cache_samples < 0:
            raise ConfigError(f"--teacher-cache-samples must be at least 0, got {self.teacher_cache_samples}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be at least 1, got {self.chunk_size}")

    @property
    def explicit(self) -> bool:
        """Whether a flag asked for a path (--teacher-cache, --fused or --chunk-size given as on)."""
        return bool(self.teacher_cache or self.fused or self.chunk_size is not None)

    def result_key(self) -> dict[str, Any]:
        """What of the path changes a trained student (for cache keys): only the teacher cache (an unbiased
        estimate, not the same gradient); the fused and chunked paths compute the same loss and gradient as the
        plain one."""
        return {"teacher_cache_k": self.teacher_cache_k, "teacher_cache_samples": self.teacher_cache_samples}


class KDPath:
    """One run's word-level KD path: builds KD losses, opens (or builds) the teacher cache on first use."""

    def __init__(
        self,
        cfg: KDPathConfig,
        teacher: torch.nn.Module | None,
        cache_root: Path,
        tokenizer_key: str,
        pad_token_id: int,
        pretrained_teacher: bool = False,
        student: torch.nn.Module | None = None,
    ) -> None:
        """pretrained_teacher: the run's teacher is a pretrained model (--teacher), which makes forward KL read the
        teacher cache unless --teacher-cache says otherwise. student: a model of the run's student architecture,
        to decide the fused path when --fused is unset (default: the teacher decides alone)."""
        self.cfg, self.teacher, self.cache_root = cfg, teacher, cache_root
        # forward KL reads the cache: asked for, or by default on a pretrained teacher
        self.cache_fkl = bool(cfg.teacher_cache) or (cfg.teacher_cache is None and pretrained_teacher)
        if cfg.fused is not None:
            self.fused = cfg.fused
        else:  # exact, and the fastest path wherever both heads are linear (docs/performance.md)
            models = [m for m in (teacher, student) if m is not None]
            self.fused = cfg.chunk_size is None and bool(models) and all(projects_from_hidden(m) for m in models)
        self.tokenizer_key, self.pad_token_id = tokenizer_key, pad_token_id
        self._caches: dict[tuple[str, float], TeacherLogitCache] = {}  # by (data fingerprint, temperature)
        self._opened: dict[tuple[int, float], tuple[Any, TeacherLogitCache]] = {}  # by (id of features, temperature)
        self._teacher_id: str | None = None
        self.hits = 0  # examples whose teacher rows came from the cache
        self.misses = 0  # examples the cache does not hold (the teacher ran for their batch)

    def reads_cache(self, divergence: Divergence) -> bool:
        """Whether a KD loss with this divergence reads the teacher cache: every divergence under --teacher-cache
        (k < V refuses all but forward KL), forward KL alone by default on a pretrained teacher."""
        return bool(self.cfg.teacher_cache) or (
            self.cache_fkl and getattr(divergence, "func", divergence) is forward_kl
        )

    def result_key(self, divergence: Divergence) -> dict[str, Any]:
        """The part of a KD student's cache key that the path decides: the teacher cache's k and m when the loss
        reads it (core.pipeline.get_kd_baseline)."""
        return self.cfg.result_key() if self.reads_cache(divergence) else {}

    @property
    def name(self) -> str:
        """The path in words, as metrics.json records it: plain, chunked, fused, each optionally + cache(k) (m:
        summary()); the cache part names the forward-KL losses' path where only they read it."""
        cfg = self.cfg
        student = "fused" if self.fused else ("chunked" if cfg.chunk_size is not None else "plain")
        if cfg.teacher_cache:
            return student + f"+cache(k={cfg.teacher_cache_k})"
        return student + (f"+cache(k={cfg.teacher_cache_k}, forward KL)" if self.cache_fkl else "")

    def cache_for(self, features: list[dict[str, list[int]]], temperature: float) -> TeacherLogitCache:
        """The teacher cache over `features` at `temperature`, built on first use (keyed by teacher and data)."""
        from core.logit_cache import data_fingerprint

        seen = (id(features), temperature)  # per-step callers pass the same list: hash its examples only once
        if seen in self._opened:
            return self._opened[seen][1]
        key = (data_fingerprint(features), temperature)
        if key not in self._caches:
            teacher = self._live_teacher("building a teacher cache over new data")
            if self._teacher_id is None:
                self._teacher_id = teacher_fingerprint(teacher)
            self._caches[key] = get_logit_cache(
                teacher,
                features,
                self.cache_root,
                tokenizer_key=self.tokenizer_key,
                pad_token_id=self.pad_token_id,
                k=self.cfg.teacher_cache_k,
                temperature=temperature,
                samples=self.cfg.teacher_cache_samples,
                seed=CACHE_SEED,
                teacher_id=self._teacher_id,
                progress=True,
            )
        self._opened[seen] = (features, self._caches[key])  # holds `features`, so its id is not reused
        return self._caches[key]

    def covers(self, cache: TeacherLogitCache, batch: dict[str, torch.Tensor]) -> bool:
        """Whether every example of the batch is in the cache; counts hits and misses."""
        lengths = batch["attention_mask"].sum(-1).tolist()
        found = [
            example_key(batch["input_ids"][row, :n], batch["labels"][row, :n]) in cache for row, n in enumerate(lengths)
        ]
        if all(found):
            self.hits += len(found)
            return True
        self.misses += len(found)
        return False

    def loss(self, divergence: Divergence, kd_ratio: float = 1.0, features=None):
        """Word-level KD (core.objectives.make_kd_loss) on this path. `features`: the data the loss trains on (the
        teacher cache is built over it); required with --teacher-cache."""
        cfg, fused = self.cfg, self.fused
        if not self.reads_cache(divergence):
            return make_kd_loss(self.teacher, divergence, kd_ratio, cfg.chunk_size, fused)
        if features is None:
            raise ValueError("KDPath.loss needs the training features when the teacher cache is on")
        function = getattr(divergence, "func", divergence)
        if function is not forward_kl:
            name = {fn: key for key, fn in DIVERGENCES.items()}.get(function, getattr(function, "__name__", "?"))
            self.require_exact_cache(f"the divergence {name}")
        cache = self.cache_for(features, divergence_temperature(divergence))
        cached = make_kd_loss(None, divergence, kd_ratio, cfg.chunk_size, fused, teacher_cache=cache)

        def loss_fn(model, batch) -> LossOutput:
            if self.covers(cache, batch):
                return cached(model, batch)
            # Built per miss, not captured up front, so that release_teacher() leaves no reference in this closure.
            teacher = self._live_teacher("a batch the teacher cache does not hold")
            return make_kd_loss(teacher, divergence, kd_ratio, cfg.chunk_size, fused)(model, batch)

        return loss_fn

    def teacher_logits(self, batch: dict[str, torch.Tensor], features=None, temperature: float = 1.0) -> torch.Tensor:
        """The teacher's full (B, T, V) scores for a method that needs every logit (TAID's interpolation).

        Without the cache: the teacher's logits. With it (k >= V only, `require_exact_cache`): log-probabilities
        rebuilt from the cache at the valid positions (zeros elsewhere). Log-probabilities differ from logits by a
        constant per position, which a softmax ignores, so a method that only applies softmax-invariant operations
        gets exactly the live teacher's distribution."""
        if not self.cfg.teacher_cache:
            return teacher_forward(self.teacher, batch)
        self.require_exact_cache("a method that reads every teacher logit")
        if features is None:
            raise ValueError("KDPath.teacher_logits needs the training features when the teacher cache is on")
        cache = self.cache_for(features, temperature)
        if not self.covers(cache, batch):
            return teacher_forward(self._live_teacher("a batch the teacher cache does not hold"), batch)
        mask, _ = shifted_targets(batch["labels"])
        sparse = cache.sparse_teacher(batch, mask)  # (N, k), (N, k), (N,)
        vocab = cache.vocab_size
        rest = max(vocab - sparse.logprobs.shape[-1], 1)
        rows = (sparse.tail_logprob - torch.log(torch.tensor(float(rest)))).unsqueeze(-1).expand(-1, vocab).clone()
        rows.scatter_(-1, sparse.indices, sparse.logprobs)  # (N, V)
        dense = torch.zeros(*mask.shape, vocab, dtype=rows.dtype, device=rows.device)  # (B, T, V)
        dense[mask] = rows
        return dense

    def require_exact_cache(self, what: str) -> None:
        """Refuse `what` (a divergence other than forward KL, or a method reading `teacher_logits`) on a teacher cache
        below the vocabulary size, where only forward KL is honest (module docstring). Call it in make_loss."""
        if not self.cfg.teacher_cache:
            return
        vocab = self._vocab_size()
        if vocab is None or self.cfg.teacher_cache_k >= vocab:
            return
        raise ConfigError(
            f"{what} through --teacher-cache-k {self.cfg.teacher_cache_k} (< the vocabulary, {vocab}) is not "
            "honest: only forward KL reads a top-k cache without bias (on SmolLM2-135M at k = 64 reverse KL reads "
            "78% low with an unrelated gradient, JSD/TVD/skew KLs have gradient cosines 0.83-0.90: "
            f"benchmarks/cache_fidelity.md); drop --teacher-cache (the live teacher) or pass --teacher-cache-k {vocab}"
        )

    def _vocab_size(self) -> int | None:
        if self.teacher is not None:
            return self.teacher.get_output_embeddings().weight.shape[0]
        return next((cache.vocab_size for cache in self._caches.values()), None)

    def release_teacher(self) -> None:
        """Drop this path's reference to the teacher, to train from the teacher cache alone (module docstring)."""
        if not self.cache_fkl:
            raise ConfigError("KDPath.release_teacher: without --teacher-cache every KD step runs the teacher")
        self.teacher = None

    def _live_teacher(self, need: str) -> torch.nn.Module:
        if self.teacher is None:
            raise DataError(
                f"{need} needs the teacher, which KDPath.release_teacher() let go: release it only when the teacher "
                "cache holds every training batch"
            )
        return self.teacher

    def require_full_logits(self, method: str, chunked: bool = False) -> None:
        """For a method whose own loss needs every teacher logit (it reads them through `teacher_logits`): --fused
        cannot apply to it (and --chunk-size only where the method chunks its loss); refuse rather than ignore."""
        if self.cfg.fused or (self.cfg.chunk_size is not None and not chunked):
            flags = "--fused" if chunked else "--fused and --chunk-size"
            raise ConfigError(
                f"{method} computes its loss on full logits: {flags} do not apply to it (--teacher-cache does)"
            )

    def summary(self) -> dict[str, Any]:
        """What metrics.json records: the path, and for the teacher cache its size per token and hit rate."""
        out: dict[str, Any] = {"path": self.name}
        if self.cache_fkl:
            lookups = self.hits + self.misses
            out["cache"] = {
                "k": self.cfg.teacher_cache_k,
                "samples": self.cfg.teacher_cache_samples,
                "bytes_per_token": [c.bytes_per_token for c in self._caches.values()],
                "folders": [str(c.folder) for c in self._caches.values()],
                "hit_rate": self.hits / lookups if lookups else None,
                "hits": self.hits,
                "misses": self.misses,
            }
        return out

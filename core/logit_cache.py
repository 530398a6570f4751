"""The teacher-logit cache: run the teacher once over a dataset, keep its top-k per target token, train from it.

For every position that counts (a completion token: labels[t + 1] != -100), the cache stores the teacher's top-k
log-probabilities (float16 by default), their token ids (uint16 when the vocabulary fits, else int32) and the log
of the mass outside the top-k (float32, computed as a log-sum-exp over the complement, so it stays exact when the
top-k hold nearly everything). With `samples` = m > 0 (and k < V) it also stores m ids drawn with replacement from
the teacher's tail (p restricted to the ids outside the top k, renormalised; seeded by the key's `seed`, so a cache
is reproducible) and the teacher's entropy H(p) (float32): forward KL then reads -H(p) - sum_v p_hat_v log q_v with
p_hat = p on the top k plus P_tail / m per draw, an unbiased estimate of its value and gradient
(core.losses.sampled_forward_kl; Anshumann et al., 2025). No other divergence is unbiased from a sample of p, so a
sampled cache serves forward KL only (`check_divergence`). With m = 0 divergences compare the student with the cache
on k + 1 buckets, the tail as one bucket (core.losses.sparse_divergence): exact at k = V, but on SmolLM2-135M at
k = 64 it reads forward KL 6-13% low and reverse KL 78% low (benchmarks/cache_fidelity.md). At k = 64, m = 64 and a
49,152-token vocabulary that is 64 x (2 + 2) + 64 x 2 + 4 + 4 = 392 bytes per token, against 98,304 for a float16 row.

Layout (root: <cache>/logit_cache/<key hash>/, written by core.io.atomic_dir, so a reader sees either no cache or
a complete one):
    manifest.json         the key (teacher, tokenizer, data, k, temperature, samples, seed, format), sizes, shards
    shard_00000.safetensors
        topk_logprobs (N, k)  topk_indices (N, k)  tail_logprob (N,)   N = target tokens of the shard's examples
        sample_ids (N, m)     teacher_entropy (N,)                      only when m > 0 and k < V
        offsets (E + 1,)      example_keys (E, 16)                      E = examples of the shard
The key hashes the teacher's configuration and weights (or an id the caller vouches for), the tokenizer's key and
every example's token ids and labels: a changed teacher, tokenizer or data gets another folder, never a stale
cache. Student seeds, methods and epochs are not in the key, so they all reuse one cache. A batch finds its rows
by a hash of each example's unpadded tokens and labels, so no collator or data-order change is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.data import IGNORE_INDEX, Collator
from core.errors import ConfigError, DataError
from core.fused import SparseTeacher, default_chunk_size
from core.io import atomic_dir, atomic_write_json, stable_hash
from core.losses import Divergence, divergence_temperature, forward_kl
from core.objectives import final_hidden_and_head, shifted_targets

# 2: the sampled tail and the entropy (issue 12); 3: the teacher runs over each shard's examples longest first, in
# batches of similar length (issue 31), which changes the order of the seeded tail draws. An older cache is another
# key, so rebuilt.
CACHE_FORMAT = 3
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A hash of the teacher's configuration and every parameter and buffer, byte for byte."""
    digest = hashlib.sha256()
    config = getattr(teacher, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in teacher.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def example_key(input_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> bytes:
    """16 bytes that identify an encoded example (its token ids and its labels)."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).cpu().numpy().tobytes()
    lab = torch.as_tensor(labels, dtype=torch.int64).cpu().numpy().tobytes()
    return hashlib.blake2b(ids + b"|" + lab, digest_size=16).digest()


def data_fingerprint(features: Sequence[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for feature in features:
        digest.update(example_key(feature["input_ids"], feature["labels"]))
    return digest.hexdigest()[:32]


def target_count(labels: Sequence[int]) -> int:
    """Positions of an example that predict a label (position t predicts labels[t + 1])."""
    return sum(1 for label in list(labels)[1:] if label != IGNORE_INDEX)


class TeacherLogitCache:
    """A built cache, opened for reading: `sparse_teacher(batch, mask)` gives the SparseTeacher of a batch."""

    def __init__(self, folder: str | Path, expected_key: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.folder} is not a complete teacher-logit cache (no manifest.json); rebuild it")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.folder} has cache format {self.manifest.get('format')}, expected {CACHE_FORMAT}")
        if expected_key is not None and self.manifest["key"] != expected_key:
            changed = sorted(k for k in expected_key if self.manifest["key"].get(k) != expected_key[k])
            raise DataError(f"the teacher-logit cache {self.folder} was built for another {', '.join(changed)}")
        self.k: int = self.manifest["k"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.temperature: float = self.manifest["temperature"]
        self.samples: int = self.manifest["key"]["samples"]  # 0 when k >= V or the tail is one bucket
        self._shards = [safe_open(str(self.folder / s["file"]), framework="pt") for s in self.manifest["shards"]]
        self._offsets = [f.get_tensor("offsets").tolist() for f in self._shards]
        self._index: dict[bytes, tuple[int, int]] = {}  # example key -> (shard, example within the shard)
        for shard, handle in enumerate(self._shards):
            for row, key in enumerate(handle.get_tensor("example_keys").numpy()):
                self._index.setdefault(key.tobytes(), (shard, row))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        """Whether the example of this key (core.logit_cache.example_key) is in the cache."""
        return key in self._index

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["bytes"] / max(self.manifest["n_tokens"], 1)

    def check_divergence(self, divergence: Divergence) -> None:
        """The cached log-probabilities are at one temperature; the divergence must use the same. A sampled tail
        estimates p without bias, which makes forward KL unbiased and no other divergence: they are refused."""
        if self.samples and getattr(divergence, "func", divergence) is not forward_kl:
            raise ConfigError(
                f"the teacher-logit cache {self.folder} holds a sampled tail, which only forward KL reads without "
                "bias; build one with samples=0 and k = the vocabulary size for other divergences"
            )
        temperature = divergence_temperature(divergence)
        if abs(temperature - self.temperature) > 1e-12:
            raise ConfigError(
                f"the teacher-logit cache {self.folder} holds log-probabilities at temperature {self.temperature}, "
                f"but the divergence uses {temperature}; build a cache at that temperature"
            )

    def example(self, key: bytes) -> tuple[torch.Tensor, ...]:
        """(top-k log-probs (n, k), token ids (n, k), tail log-prob (n,)) of one example's n target positions, then
        (sampled tail ids (n, m), entropy (n,)) when the cache samples its tail."""
        if key not in self._index:
            raise DataError(
                f"an example of this batch is not in the teacher-logit cache {self.folder}: the cache was built "
                "on other data (or another tokenizer / --max-length); rebuild it for this data"
            )
        shard, row = self._index[key]
        handle, start, end = self._shards[shard], self._offsets[shard][row], self._offsets[shard][row + 1]
        names = ["topk_logprobs", "topk_indices", "tail_logprob"]
        names += ["sample_ids", "teacher_entropy"] if self.samples else []
        return tuple(handle.get_slice(name)[start:end] for name in names)

    def sparse_teacher(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> SparseTeacher:
        """The cached teacher at the valid positions of a right-padded batch, in the row-major order of `mask`."""
        parts: list[tuple[torch.Tensor, ...]] = []
        lengths = batch["attention_mask"].sum(-1).tolist()
        for row, length in enumerate(lengths):
            ids, labels = batch["input_ids"][row, :length], batch["labels"][row, :length]
            part = self.example(example_key(ids, labels))
            if part[0].shape[0] != int(mask[row].sum()):
                raise DataError(
                    f"the teacher-logit cache {self.folder} has {part[0].shape[0]} target positions for an example "
                    f"that has {int(mask[row].sum())} in this batch; rebuild the cache"
                )
            parts.append(part)
        device = mask.device
        dtypes = (torch.float32, torch.int64, torch.float32, torch.int64, torch.float32)
        # Each part converted before the concatenation: under bf16 autocast torch.cat refuses the float16 values.
        columns = [torch.cat([p[i].to(dtypes[i]) for p in parts]).to(device) for i in range(len(parts[0]))]
        return SparseTeacher(*columns)


def cache_key(
    teacher_id: str,
    tokenizer_key: str,
    features: Sequence[dict[str, list[int]]],
    k: int,
    temperature: float,
    samples: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_id,
        "tokenizer": tokenizer_key,
        "data": data_fingerprint(features),
        "k": k,
        "temperature": temperature,
        "samples": samples,
        "seed": seed,
    }


def get_logit_cache(
    teacher: torch.nn.Module,
    features: Sequence[dict[str, list[int]]],
    cache_dir: str | Path,
    *,
    tokenizer_key: str,
    pad_token_id: int,
    k: int = 64,
    temperature: float = 1.0,
    teacher_id: str | None = None,
    batch_size: int = 16,
    shard_examples: int = 8192,
    logprob_dtype: str = "float16",
    samples: int = 0,
    seed: int = 0,
    progress: bool = False,
    after_shard: Callable[[int], None] | None = None,
) -> TeacherLogitCache:
    """Open the cache of (teacher, tokenizer, data, k, temperature, samples, seed) under `cache_dir`, building it
    first if absent.

    samples: m ids drawn per position from the teacher's tail, seeded by `seed` (module docstring; 0: the tail as
    one bucket; ignored at k >= V, where there is no tail).
    teacher_id: what identifies the teacher in the key (default: a hash of its configuration and weights).
    after_shard: called with the shard number after each shard is written (tests use it to interrupt a build)."""
    if k < 1:
        raise ConfigError(f"the teacher-logit cache needs k >= 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"the teacher-logit cache needs a positive temperature, got {temperature}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ConfigError(f"logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    if samples < 0:
        raise ConfigError(f"the teacher-logit cache needs samples >= 0, got {samples}")
    if not features:
        raise DataError("cannot build a teacher-logit cache over no examples")
    if k >= teacher.get_output_embeddings().weight.shape[0]:
        samples, seed = 0, 0  # the top k hold every id: nothing to sample, one cache for any m
    key = cache_key(teacher_id or teacher_fingerprint(teacher), tokenizer_key, features, k, temperature, samples, seed)
    folder = Path(cache_dir) / "logit_cache" / stable_hash(key)
    if not (folder / "manifest.json").is_file():
        # Always in float32 (autocast off, whatever --precision): one cache serves runs of either precision.
        device_type = next(teacher.parameters()).device.type
        with atomic_dir(folder) as tmp, torch.autocast(device_type, enabled=False):
            _build(
                teacher,
                features,
                tmp,
                key,
                pad_token_id,
                batch_size,
                shard_examples,
                logprob_dtype,
                progress,
                after_shard,
            )
    return TeacherLogitCache(folder, expected_key=key)


def teacher_topk(
    hidden_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float,
    samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Top-k log-probabilities, their ids and the log tail mass of logits = rows @ weight.T + bias at temperature;
    with samples = m > 0 also m ids drawn with replacement from the tail (p outside the top k, renormalised) and the
    entropy of p.

    rows (N, H) -> (N, k), (N, k), (N,)[, (N, m), (N,)]; projected in chunks, so no N x V tensor is alive at once."""
    vocab = weight.shape[0]
    columns: list[list[torch.Tensor]] = [[] for _ in range(5 if samples else 3)]
    for start in range(0, hidden_rows.shape[0], default_chunk_size(vocab)):
        logits = F.linear(hidden_rows[start : start + default_chunk_size(vocab)], weight, bias)  # (c, V)
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        top, idx = logp.topk(min(k, vocab), dim=-1)
        if k < vocab:
            tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # log of the mass outside the top-k
        else:
            tail = torch.full_like(top[:, 0], float("-inf"))
        parts = [top, idx, tail]
        if samples:
            rest = logp.exp().scatter(-1, idx, 0.0)  # (c, V): p outside the top k (multinomial renormalises)
            empty = rest.sum(-1, keepdim=True) <= 0  # a tail that underflows to 0: any id, its weight is 0
            draws = torch.multinomial(torch.where(empty, 1.0, rest), samples, replacement=True, generator=generator)
            parts += [draws, -(logp.exp() * logp).sum(-1)]  # (c, m), entropy (c,)
        for column, part in zip(columns, parts):
            column.append(part)
    return tuple(torch.cat(column) for column in columns)


def _build(
    teacher: torch.nn.Module,
    features: Sequence[dict[str, list[int]]],
    out: Path,
    key: dict[str, Any],
    pad_token_id: int,
    batch_size: int,
    shard_examples: int,
    logprob_dtype: str,
    progress: bool,
    after_shard: Callable[[int], None] | None,
) -> None:
    k, temperature, samples = key["k"], key["temperature"], key["samples"]
    device = next(teacher.parameters()).device
    generator = torch.Generator(device=device).manual_seed(key["seed"]) if samples else None
    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0]
    index_dtype = torch.uint16 if vocab <= 2**16 else torch.int32
    collate = Collator(pad_token_id)
    shards: list[dict[str, Any]] = []
    total_bytes = total_tokens = positions = filled = 0
    was_training = teacher.training
    teacher.eval()
    try:
        for shard_start in tqdm(
            range(0, len(features), shard_examples), desc="teacher-logit cache", disable=not progress
        ):
            shard_features = features[shard_start : shard_start + shard_examples]
            # Longest first, in batches of similar length: little padding for the teacher to run over. The rows are
            # stored in the shard's own order (offsets per example), so only the order of the seeded draws depends
            # on this.
            order = sorted(range(len(shard_features)), key=lambda i: -len(shard_features[i]["input_ids"]))
            rows: list[tuple[torch.Tensor, ...]] = [()] * len(shard_features)  # per example: its columns
            for start in range(0, len(order), batch_size):
                members = order[start : start + batch_size]
                batch = {k_: v.to(device) for k_, v in collate([shard_features[i] for i in members]).items()}
                mask, _ = shifted_targets(batch["labels"])
                positions += batch["attention_mask"].numel()
                filled += int(batch["attention_mask"].sum())
                with torch.no_grad():
                    signal = final_hidden_and_head(teacher, batch)
                    top, idx, tail, *sampled = teacher_topk(
                        signal.hidden[mask], signal.weight, signal.bias, k, temperature, samples, generator
                    )
                columns = [
                    top.to("cpu", LOGPROB_DTYPES[logprob_dtype]),
                    idx.to("cpu", torch.int32).to(index_dtype),
                    tail.to("cpu", torch.float32),
                ]
                if samples:
                    columns += [sampled[0].to("cpu", torch.int32).to(index_dtype), sampled[1].to("cpu", torch.float32)]
                per_row = mask.sum(-1).tolist()  # the valid positions are row-major: each example's are contiguous
                for i, parts in zip(members, zip(*(column.split(per_row) for column in columns))):
                    rows[i] = parts
            counts = [part[0].shape[0] for part in rows]
            values, indices, tails = ([part[c] for part in rows] for c in range(3))
            draws, entropies = ([part[c] for part in rows] for c in (3, 4)) if samples else ([], [])
            offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
            offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
            keys = torch.tensor(
                [list(example_key(f["input_ids"], f["labels"])) for f in shard_features], dtype=torch.uint8
            )
            name = f"shard_{len(shards):05d}.safetensors"
            tensors = {
                "topk_logprobs": torch.cat(values),
                "topk_indices": torch.cat(indices),
                "tail_logprob": torch.cat(tails),
                **({"sample_ids": torch.cat(draws), "teacher_entropy": torch.cat(entropies)} if samples else {}),
                "offsets": offsets,
                "example_keys": keys,
            }
            save_file(tensors, str(out / name))
            size = (out / name).stat().st_size
            shards.append(
                {"file": name, "n_examples": len(shard_features), "n_tokens": int(offsets[-1]), "bytes": size}
            )
            total_bytes += size
            total_tokens += int(offsets[-1])
            if after_shard is not None:
                after_shard(len(shards) - 1)
    finally:
        teacher.train(was_training)
    atomic_write_json(
        out / "manifest.json",
        {
            "format": CACHE_FORMAT,
            "key": key,
            "k": k,
            "temperature": temperature,
            "vocab_size": vocab,
            "logprob_dtype": logprob_dtype,
            "index_dtype": str(index_dtype).removeprefix("torch."),
            "n_examples": len(features),
            "n_tokens": total_tokens,
            "bytes": total_bytes,
            "padding_share": 1.0 - filled / max(positions, 1),  # of the teacher's batches while building
            "shards": shards,
        },
    )

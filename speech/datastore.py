"""The kNN datastore (Khandelwal et al. 2021, kNN-MT) and the kNN teacher distribution.

Keys are decoder states f(x, y_<t) of a trained translation model over its training set, values the tokens y_t
that followed. A query state retrieves its k nearest keys by squared Euclidean distance d_i, and

    p_kNN(y) = sum_{i in kNN, v_i = y} exp(-d_i / T) / sum_{j in kNN} exp(-d_j / T)          (kNN-MT, Eq. 2)

Search is faiss: an exact flat index for small stores, an inverted file with product quantisation (IVF-PQ, as
kNN-MT's official code uses) for large ones, chosen by size. `brute_force_search` is the plain torch reference
the tests and benchmarks/datastore.py compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import ConfigError

FLAT_MAX_KEYS = 200_000  # "auto" uses an exact flat index up to this many keys, IVF-PQ above


def _faiss():
    import faiss

    return faiss


def build_index(keys: np.ndarray, kind: str = "auto", nprobe: int = 32, seed: int = 0):
    """A faiss index over `keys` (N, d) float32. kind: flat (exact), ivfpq (approximate), auto (by size).

    IVF-PQ: nlist = sqrt(N) cells (at most 4096, kNN-MT's value; faiss' guide suggests 4-16 sqrt(N), we take
    less so that training the coarse quantiser stays within a minute on two CPU cores), d/4 sub-quantisers of 8 bits each (code
    size d/4 bytes; d must be divisible by 4), `nprobe` cells searched per query (kNN-MT: 32)."""
    faiss = _faiss()
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = keys.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_KEYS else "ivfpq"
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "ivfpq":
        if d % 4:
            raise ConfigError(f"an IVF-PQ index needs a key dimension divisible by 4, got {d}; use --index flat")
        nlist = max(1, min(4096, int(math.sqrt(n))))
        if n < 39 * nlist:  # faiss wants at least 39 training points per centroid
            nlist = max(1, n // 39)
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8)
        rng = np.random.default_rng(seed)
        sample = keys[rng.choice(n, size=min(n, max(64 * nlist, 10_000)), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ConfigError(f"--index must be auto, flat or ivfpq, got {kind!r}")
    index.add(keys)
    return index


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (Q, k): squared L2 distances ascending, ids into the keys (-1 where fewer exist)."""
    distances, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return distances, ids


def brute_force_search(
    keys: torch.Tensor, queries: torch.Tensor, k: int, dtype: torch.dtype = torch.float64, max_elements: int = 2**25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest keys by squared L2, with torch: |q|^2 - 2 q.k + |k|^2, in `dtype`, chunked over queries so
    that at most `max_elements` distances are alive at once."""
    keys = keys.to(dtype)
    key_norms = (keys**2).sum(-1)  # (N,)
    chunk = max(1, max_elements // max(len(keys), 1))
    out_d, out_i = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk].to(dtype)
        d = (q**2).sum(-1, keepdim=True) - 2 * q @ keys.T + key_norms  # (chunk, N)
        dist, idx = torch.topk(d, min(k, len(keys)), dim=-1, largest=False)
        out_d.append(dist.clamp(min=0).float())
        out_i.append(idx)
    return torch.cat(out_d), torch.cat(out_i)


def drop_self(distances: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k + 1 neighbours of each training query, remove the query's own entry (or, where an approximate
    index missed it, the farthest one), leaving k."""
    keep = ids != own[:, None]  # (Q, k + 1)
    missed = keep.all(axis=1)
    keep[missed, -1] = False
    q = len(ids)
    return distances[keep].reshape(q, k), ids[keep].reshape(q, k)


def knn_distribution(
    distances: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float
) -> torch.Tensor:
    """p_kNN (..., V) from neighbour distances (..., k) and their values (..., k).

    Neighbours with value -1 or distance +inf are padding and get no mass; a row with no real neighbour is all
    zeros (callers mask it)."""
    valid = (values >= 0) & torch.isfinite(distances)
    scores = torch.where(valid, -distances.float() / temperature, torch.full_like(distances.float(), -math.inf))
    weights = torch.softmax(scores, dim=-1)  # Eq. 2: softmax(-d / T) over the k neighbours
    weights = torch.nan_to_num(weights, nan=0.0)  # an all-padding row: 0/0
    probs = torch.zeros(*values.shape[:-1], vocab_size, dtype=weights.dtype, device=weights.device)
    return probs.scatter_add_(-1, values.clamp(min=0), weights * valid)  # sum over neighbours with v_i = y


@dataclass
class Datastore:
    """Keys (N, d), values (N,) and a faiss index over the keys."""

    keys: np.ndarray
    values: np.ndarray
    index: object

    @classmethod
    def build(cls, keys, values, kind: str = "auto") -> Datastore:
        keys = np.ascontiguousarray(np.asarray(keys, dtype=np.float32))
        values = np.asarray(values, dtype=np.int64)
        if keys.ndim != 2 or len(keys) != len(values):
            raise ValueError(f"keys must be (N, d) and values (N,), got {keys.shape} and {values.shape}")
        return cls(keys, values, build_index(keys, kind))

    def __len__(self) -> int:
        return len(self.values)

    def neighbours(self, queries: np.ndarray, k: int, own: np.ndarray | None = None):
        """Distances (Q, k) and values (Q, k) of each query's k nearest entries; with `own` (each query's own
        entry id, for queries taken from the store itself), that entry is left out."""
        if own is None:
            distances, ids = faiss_search(self.index, queries, k)
        else:
            distances, ids = faiss_search(self.index, queries, k + 1)
            distances, ids = drop_self(distances, ids, np.asarray(own), k)
        values = np.where(ids >= 0, self.values[np.clip(ids, 0, None)], -1)
        distances = np.where(ids >= 0, distances, np.inf).astype(np.float32)
        return distances, values

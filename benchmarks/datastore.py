"""Benchmark of the kNN datastore (speech/datastore.py): faiss against brute-force torch.

    python benchmarks/datastore.py                       # 10^4, 10^5, 10^6 keys of dimension 64, 1000 queries, k 16
    python benchmarks/datastore.py --sizes 10000 100000 --dim 256 --json /tmp/datastore.json

For each store size N it reports, per backend: build time, memory of the index (faiss: its serialized size; torch:
the key matrix), queries per second, and retrieval agreement with the exact neighbours (recall@k: the share of
the exact k nearest keys that the backend returns; top-1: how often its nearest key is the exact nearest).

Backends: faiss IndexFlatL2 (exact), faiss IVF-PQ (what `--index auto` picks above 200,000 keys), and torch
(|q|^2 - 2 q.k + |k|^2 in float32, chunked, topk). The exact neighbours are the torch float64 search.
Keys are drawn from a mixture of 256 Gaussians (decoder states cluster by the token they predict); queries are
keys plus small noise. Threads: one (OMP_NUM_THREADS=1 and faiss.omp_set_num_threads(1)), unless --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from speech.datastore import brute_force_search, build_index, faiss_search  # noqa: E402


def make_keys(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32) * 3
    keys = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in blocks: no (n, dim) float64 temporary
        m = min(100_000, n - start)
        keys[start : start + m] = centres[rng.integers(0, 256, m)] + rng.standard_normal((m, dim), dtype=np.float32)
    return keys


def agreement(found: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    k = exact.shape[1]
    recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))
    return recall, float(np.mean(found[:, 0] == exact[:, 0]))


def bench_faiss(keys, queries, k, kind, exact) -> dict:
    import faiss

    t0 = time.perf_counter()
    index = build_index(keys, kind)
    build_s = time.perf_counter() - t0
    memory = len(faiss.serialize_index(index))
    t0 = time.perf_counter()
    _, ids = faiss_search(index, queries, k)
    search_s = time.perf_counter() - t0
    recall, top1 = agreement(ids, exact)
    return {"backend": f"faiss {type(index).__name__}", "build_s": build_s, "memory_mb": memory / 2**20,
            "qps": len(queries) / search_s, "recall_at_k": recall, "top1_agreement": top1}  # fmt: skip


def bench_torch(keys, queries, k, exact) -> dict:
    t0 = time.perf_counter()
    key_tensor = torch.from_numpy(keys).clone()  # "building" is holding the matrix
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = brute_force_search(key_tensor, torch.from_numpy(queries), k, dtype=torch.float32)
    search_s = time.perf_counter() - t0
    recall, top1 = agreement(ids.numpy(), exact)
    return {"backend": "torch brute force (float32)", "build_s": build_s,
            "memory_mb": key_tensor.numel() * 4 / 2**20, "qps": len(queries) / search_s,
            "recall_at_k": recall, "top1_agreement": top1}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64, help="key dimension (the tiny model's d_model is 64)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        keys = make_keys(n, args.dim)
        rng = np.random.default_rng(1)
        queries = keys[rng.choice(n, args.queries, replace=False)] + 0.1 * rng.standard_normal(
            (args.queries, args.dim), dtype=np.float32
        )
        _, exact = brute_force_search(torch.from_numpy(keys), torch.from_numpy(queries), args.k)
        exact = exact.numpy()
        for row in (
            bench_faiss(keys, queries, args.k, "flat", exact),
            bench_faiss(keys, queries, args.k, "ivfpq", exact),
            bench_torch(keys, queries, args.k, exact),
        ):
            rows.append({"keys": n, "dim": args.dim, **row})
            r = rows[-1]
            print(f"| {n:>9,} | {r['backend']:<28} | {r['build_s']:8.2f} | {r['memory_mb']:9.1f} | {r['qps']:10,.0f} | "
                  f"{r['recall_at_k']:.3f} | {r['top1_agreement']:.3f} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "cpus": os.cpu_count()}, indent=2))
    return rows


if __name__ == "__main__":
    print("| keys | backend | build s | memory MB | queries/s | recall@k | top-1 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    main()

"""The kNN datastore: p_kNN on hand-built neighbours, faiss against brute-force torch, leaving a query's own entry
out, and the IVF-PQ index chosen for large stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from speech.datastore import Datastore, brute_force_search, build_index, drop_self, faiss_search, knn_distribution


def test_knn_distribution_hand_computed():
    # neighbours at squared distances 1, 1, 3 with values 5, 5, 7; T = 2:
    #   weights exp(-1/2), exp(-1/2), exp(-3/2), divided by e^{-1/2}: 1, 1, e^{-1}
    #   p(5) = 2 / (2 + e^{-1}) = 0.844637, p(7) = e^{-1} / (2 + e^{-1}) = 0.155362, every other token 0
    probs = knn_distribution(torch.tensor([[1.0, 1.0, 3.0]]), torch.tensor([[5, 5, 7]]), vocab_size=9, temperature=2.0)
    expected = torch.zeros(1, 9)
    expected[0, 5] = 2 / (2 + math.exp(-1))
    expected[0, 7] = math.exp(-1) / (2 + math.exp(-1))
    torch.testing.assert_close(probs, expected)
    assert expected[0, 5].item() == pytest.approx(0.844637, abs=1e-6)


def test_knn_distribution_temperature_limits():
    d, v = torch.tensor([[1.0, 1.0, 3.0]]), torch.tensor([[5, 5, 7]])
    # T -> infinity: neighbour counts 2/3, 1/3; T -> 0: all mass on the nearest value
    hot = knn_distribution(d, v, 9, 1e9)
    assert hot[0, 5].item() == pytest.approx(2 / 3) and hot[0, 7].item() == pytest.approx(1 / 3)
    cold = knn_distribution(d, v, 9, 1e-3)
    assert cold[0, 5].item() == pytest.approx(1.0)


def test_knn_distribution_padding_gets_no_mass():
    d = torch.tensor([[0.0, float("inf")], [float("inf"), float("inf")]])
    v = torch.tensor([[2, -1], [-1, -1]])
    probs = knn_distribution(d, v, 4, 1.0)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_datastore_on_hand_built_keys():
    # 1-d keys 0, 1, 3, 4 with values 5, 5, 7, 2; the query 0.5 is at squared distances 0.25, 0.25, 6.25, 12.25
    store = Datastore.build(np.array([[0.0], [1.0], [3.0], [4.0]]), np.array([5, 5, 7, 2]))
    distances, values = store.neighbours(np.array([[0.5]]), k=3)
    np.testing.assert_allclose(distances, [[0.25, 0.25, 6.25]])
    assert sorted(values[0].tolist()) == [5, 5, 7]
    probs = knn_distribution(torch.from_numpy(distances), torch.from_numpy(values), 8, temperature=1.0)
    # p(7) = e^{-6.25} / (2 e^{-0.25} + e^{-6.25}) = e^{-6} / (2 + e^{-6})
    assert probs[0, 7].item() == pytest.approx(math.exp(-6) / (2 + math.exp(-6)), rel=1e-5)
    # asking for more neighbours than keys: the missing ones are padding (value -1, distance inf)
    distances, values = store.neighbours(np.array([[0.5]]), k=6)
    assert values[0, 4:].tolist() == [-1, -1] and np.isinf(distances[0, 4:]).all()


def test_faiss_flat_matches_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    d_faiss, i_faiss = faiss_search(build_index(keys, "flat"), queries, 8)
    d_torch, i_torch = brute_force_search(torch.from_numpy(keys), torch.from_numpy(queries), 8, max_elements=64 * 3000)
    np.testing.assert_array_equal(i_faiss, i_torch.numpy())
    np.testing.assert_allclose(d_faiss, d_torch.numpy(), rtol=1e-4, atol=1e-3)


def test_ivfpq_is_chosen_for_large_stores_and_mostly_agrees(monkeypatch):
    import speech.datastore as ds

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 16)).astype(np.float32) * 4
    keys = (centres[rng.integers(0, 50, 8000)] + rng.standard_normal((8000, 16))).astype(np.float32)
    monkeypatch.setattr(ds, "FLAT_MAX_KEYS", 1000)
    index = build_index(keys, "auto")
    assert type(index).__name__ == "IndexIVFPQ"
    queries = keys[:200] + 0.01 * rng.standard_normal((200, 16)).astype(np.float32)
    _, approx = faiss_search(index, queries, 10)
    _, exact = brute_force_search(torch.from_numpy(keys), torch.from_numpy(queries), 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact.numpy())])
    assert recall > 0.5  # product quantisation is approximate; measured recall is reported by the benchmark


def test_ivfpq_refuses_a_dimension_not_divisible_by_4():
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_index(np.zeros((100, 6), np.float32), "ivfpq")


def test_drop_self():
    distances = np.array([[0.0, 1.0, 2.0], [0.5, 0.7, 0.9]])
    ids = np.array([[4, 1, 2], [3, 8, 9]])
    d, i = drop_self(distances, ids, own=np.array([4, 7]), k=2)
    # row 0 drops its own id 4; row 1 does not contain its own id 7, so the farthest neighbour goes
    np.testing.assert_array_equal(i, [[1, 2], [3, 8]])
    np.testing.assert_array_equal(d, [[1.0, 2.0], [0.5, 0.7]])


def test_training_queries_do_not_retrieve_themselves():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    store = Datastore.build(keys, np.arange(50))  # value = own id, so a self-match would show up
    distances, values = store.neighbours(keys, k=3, own=np.arange(50))
    assert not (values == np.arange(50)[:, None]).any() and (distances > 0).all()
    _, with_self = store.neighbours(keys, k=3)
    assert (with_self[:, 0] == np.arange(50)).all()

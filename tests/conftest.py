import os
from pathlib import Path

import pytest

import core  # noqa: F401  (first, so that OpenMP threads sleep rather than spin: see core/__init__.py)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test caches teachers and tokenizers in a per-session temp folder, never in ~/.cache."""
    monkeypatch.setenv("DISTILLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture
def device():
    """The device of the `device`-marked tests: $DISTILLAB_TEST_DEVICE (cpu, cuda, cuda:1, ...), else cuda where torch
    sees one, else cpu. Each such test compares what runs there with a float64 reference on the CPU."""
    import torch

    name = os.environ.get("DISTILLAB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    found = torch.device(name)
    if found.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DISTILLAB_TEST_DEVICE={name}, but torch sees no CUDA device here")
    return found


def shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data)")
    return path


os.environ.setdefault("OMP_NUM_THREADS", "2")

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


def shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data)")
    return path


os.environ.setdefault("OMP_NUM_THREADS", "2")

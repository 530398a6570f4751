"""The teacher-logit cache: round trip, training from it, invalidation, and interrupted writes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from core.data import Collator
from core.errors import ConfigError, DataError
from core.logit_cache import TeacherLogitCache, cache_key, get_logit_cache
from core.losses import get_divergence
from core.objectives import make_kd_loss, shifted_targets

VOCAB = 37
ROOT = Path(__file__).resolve().parents[2]


def _teacher(seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _features(n=10, seed=0, vocab=VOCAB):
    """Encoded examples as core.data makes them: a prompt (labels -100), then the completion (labels = ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(2, 6, (2,), generator=gen))
        ids = torch.randint(1, vocab, (prompt + completion,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _batch(features):
    return Collator(pad_token_id=0)(features)


def _build(tmp_path, teacher=None, features=None, **kwargs):
    options = {"tokenizer_key": "tok-a", "pad_token_id": 0, "k": 5, "batch_size": 4, "shard_examples": 4}
    return get_logit_cache(teacher or _teacher(), features or _features(), tmp_path, **{**options, **kwargs})


def test_round_trip_equals_the_teachers_top_k(tmp_path):
    teacher, features = _teacher(), _features()
    cache = _build(tmp_path, teacher, features, logprob_dtype="float32", temperature=2.0)
    batch = _batch(features[3:9])  # crosses a shard boundary (4 examples a shard)
    mask, _ = shifted_targets(batch["labels"])
    sparse = cache.sparse_teacher(batch, mask)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[mask] / 2.0, dim=-1)  # (N, V): independent reference
    top, idx = logp.topk(5, dim=-1)
    assert torch.allclose(sparse.logprobs, top, atol=1e-5)
    assert torch.equal(sparse.indices, idx)
    assert torch.allclose(sparse.tail_logprob, torch.log1p(-top.exp().sum(-1)), atol=1e-5)
    assert len(cache) == len(features) and len(cache.manifest["shards"]) == 3


def test_storage_dtypes_and_bytes_per_token(tmp_path):
    cache = _build(tmp_path)
    assert cache.manifest["logprob_dtype"] == "float16" and cache.manifest["index_dtype"] == "uint16"
    # Per token: k = 5 float16 log-probs (10 bytes) + 5 uint16 ids (10) + a float32 tail (4) = 24 bytes, plus each
    # example's offset (8) and key (16) and the safetensors headers, spread over the tokens.
    assert 24 < cache.bytes_per_token < 24 + 100


def test_second_call_reuses_the_cache(tmp_path):
    calls = []
    first = _build(tmp_path, after_shard=calls.append)
    second = _build(tmp_path, after_shard=calls.append)
    assert calls == [0, 1, 2] and first.folder == second.folder


@pytest.mark.parametrize(
    "change",
    [
        {"teacher": "perturbed"},
        {"tokenizer_key": "tok-b"},
        {"features": "one label changed"},
        {"k": 6},
        {"temperature": 2.0},
    ],
)
def test_a_changed_teacher_tokenizer_or_data_builds_a_new_cache(tmp_path, change):
    teacher, features = _teacher(), _features()
    old = _build(tmp_path, teacher, features)
    kwargs = dict(change)
    if "teacher" in kwargs:
        teacher = _teacher()
        with torch.no_grad():
            teacher.lm_head.weight[0, 0] += 1e-3
        kwargs.pop("teacher")
    if "features" in kwargs:
        features = [dict(f) for f in features]
        features[2] = {"input_ids": features[2]["input_ids"], "labels": [-100] + features[2]["labels"][1:]}
        features[2]["labels"][-1] = -100
        kwargs.pop("features")
    calls = []
    new = _build(tmp_path, teacher, features, after_shard=calls.append, **kwargs)
    assert calls and new.folder != old.folder
    # The old folder refuses to serve the new key, and says what changed.
    new_key = new.manifest["key"]
    with pytest.raises(DataError, match="built for another"):
        TeacherLogitCache(old.folder, expected_key=new_key)


def test_a_batch_from_other_data_is_refused(tmp_path):
    cache = _build(tmp_path)
    batch = _batch(_features(seed=1)[:2])
    with pytest.raises(DataError, match="not in the teacher-logit cache"):
        cache.sparse_teacher(batch, shifted_targets(batch["labels"])[0])


def test_the_divergence_temperature_must_match(tmp_path):
    cache = _build(tmp_path, temperature=2.0)
    with pytest.raises(ConfigError, match="temperature 2.0"):
        make_kd_loss(None, get_divergence("fkl"), teacher_cache=cache)


@pytest.mark.parametrize("fused", [False, True])
def test_training_from_a_full_cache_equals_training_from_the_teacher(tmp_path, fused):
    # k = V keeps the whole distribution: the cached loss must equal the plain KD loss and gradient.
    teacher, features = _teacher(), _features()
    cache = _build(tmp_path, teacher, features, k=VOCAB, logprob_dtype="float32", temperature=1.5)
    fn = get_divergence("jsd", temperature=1.5, beta=0.3)
    batch = _batch(features[:6])
    grads = []
    for loss_fn in (make_kd_loss(teacher, fn, 0.5), make_kd_loss(None, fn, 0.5, teacher_cache=cache, fused=fused)):
        student = _teacher(seed=1)
        out = loss_fn(student, batch)
        out.loss_sum.backward()
        grads.append((out.loss_sum.detach(), [p.grad for p in student.parameters()]))
    (ref, ref_grads), (got, got_grads) = grads
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got_grads, ref_grads))


def test_an_interrupted_build_leaves_no_cache(tmp_path):
    def fail(shard):
        if shard == 1:
            raise KeyboardInterrupt  # as a Ctrl-C after the second shard is on disk

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, after_shard=fail)
    assert list((tmp_path / "logit_cache").iterdir()) == []  # neither the cache nor its temporary folder
    assert len(_build(tmp_path)) == 10  # and the next call builds it whole


def test_a_killed_build_leaves_no_cache(tmp_path):
    # A hard kill (no Python cleanup runs) after the first shard: only a dot-named temporary folder may remain,
    # which no reader opens; the next call builds the cache whole.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.core.test_logit_cache import _build
        _build(Path({str(tmp_path)!r}), after_shard=lambda shard: os.kill(os.getpid(), signal.SIGKILL))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == -9
    left = list((tmp_path / "logit_cache").iterdir())
    assert all(p.name.startswith(".") for p in left) and len(left) == 1
    assert not (left[0] / "manifest.json").exists()
    features = _features()
    cache = _build(tmp_path)
    key = cache_key(cache.manifest["key"]["teacher"], "tok-a", features, 5, 1.0)
    assert cache.manifest["key"] == key and len(cache) == len(features)


def test_the_teacher_runs_over_batches_of_similar_length(tmp_path):
    # Lengths 3, 5, 4, 6 in batches of 2. In file order the batches are (3, 5) and (4, 6): 2 x 5 + 2 x 6 = 22
    # positions for 18 tokens. Longest first they are (6, 5) and (4, 3): 2 x 6 + 2 x 4 = 20 positions, so the
    # padding share is 2 / 20 = 0.1. The rows still come back in each example's own place (round-trip test above).
    features = [{"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))} for n in (3, 5, 4, 6)]
    cache = _build(tmp_path, features=features, batch_size=2)
    assert cache.manifest["padding_share"] == pytest.approx(0.1)
    teacher = _teacher()
    batch = _batch(features)
    mask, _ = shifted_targets(batch["labels"])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    top = F.log_softmax(logits[mask], dim=-1).topk(5, dim=-1).values
    assert torch.allclose(cache.sparse_teacher(batch, mask).logprobs.float(), top, atol=2e-3)  # float16 storage

"""core.kdpath: training from the teacher cache alone after KDPath.release_teacher()."""

import gc
import weakref

import pytest
import torch

from core.errors import ConfigError, DataError
from core.kdpath import KDPath, KDPathConfig
from core.losses import get_divergence
from tests.core.test_logit_cache import VOCAB, _batch, _features, _teacher


def _cached_path(tmp_path, teacher):
    # k = V: the cache holds the whole distribution, so the cached loss equals the live one (float16 storage aside).
    return KDPath(KDPathConfig(teacher_cache=True, teacher_cache_k=VOCAB), teacher, tmp_path, "tok", 0)


def test_a_released_path_trains_from_the_cache_and_holds_no_teacher(tmp_path):
    teacher, features = _teacher(), _features()
    fkl = get_divergence("fkl")
    kd = _cached_path(tmp_path, teacher)
    loss_fn = kd.loss(fkl, features=features)  # builds the cache over `features`
    batch, student = _batch(features[:4]), _teacher(seed=1)
    before = loss_fn(student, batch).loss_sum.item()
    logits_before = kd.teacher_logits(batch, features=features)

    alive = weakref.ref(teacher)
    kd.release_teacher()
    del teacher
    gc.collect()
    assert alive() is None  # nothing of the path (nor its loss closure, nor the cache) still holds the teacher

    assert loss_fn(student, batch).loss_sum.item() == before  # the same cached rows, the same student
    assert torch.equal(kd.teacher_logits(batch, features=features), logits_before)
    assert (kd.hits, kd.misses) == (16, 0)  # 4 examples x 4 lookups (2 losses, 2 teacher_logits), all hits


def test_a_miss_after_release_is_one_line_not_a_teacher_forward(tmp_path):
    features = _features()
    kd = _cached_path(tmp_path, _teacher())
    loss_fn = kd.loss(get_divergence("fkl"), features=features)
    kd.release_teacher()
    other = _batch(_features(n=2, seed=7))  # examples the cache was not built over (as an on-policy batch)
    with pytest.raises(DataError, match=r"release_teacher\(\) let go") as err:
        loss_fn(_teacher(seed=1), other)
    assert "\n" not in str(err.value)
    assert kd.misses == 2
    with pytest.raises(DataError, match="building a teacher cache over new data"):
        kd.loss(get_divergence("fkl"), features=_features(n=3, seed=9))


def test_release_without_the_cache_is_refused(tmp_path):
    kd = KDPath(KDPathConfig(fused=True), _teacher(), tmp_path, "tok", 0)
    with pytest.raises(ConfigError, match="without --teacher-cache"):
        kd.release_teacher()
    assert kd.teacher is not None


def test_by_default_a_pretrained_teacher_serves_forward_kl_from_its_cache_and_the_rest_live(tmp_path):
    # Issue 31: forward KL is unbiased from the sampled-tail cache, so a pretrained teacher is read from it; every
    # other divergence keeps the live teacher (not refused, as an explicit --teacher-cache below k = V would be).
    teacher, features = _teacher(), _features()
    batch, student = _batch(features[:4]), _teacher(seed=1)
    kd = KDPath(KDPathConfig(teacher_cache_k=5), teacher, tmp_path, "tok", 0, pretrained_teacher=True)
    fkl, rkl = get_divergence("fkl"), get_divergence("rkl")
    assert kd.reads_cache(fkl) and not kd.reads_cache(rkl)
    kd.loss(fkl, features=features)(student, batch)
    assert (kd.hits, kd.misses) == (4, 0)
    kd.require_exact_cache("reverse KL")  # not refused: the live teacher serves it
    kd.loss(rkl, features=features)(student, batch)
    assert (kd.hits, kd.misses) == (4, 0)  # the reverse-KL loss never looked in the cache
    assert torch.equal(
        kd.teacher_logits(batch), teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    )
    assert kd.result_key(fkl) == {"teacher_cache_k": 5, "teacher_cache_samples": 64} and kd.result_key(rkl) == {}
    assert kd.name == "fused+cache(k=5, forward KL)" and kd.summary()["cache"]["hit_rate"] == 1.0


def test_by_default_the_embedded_teacher_runs_live_and_the_flags_override(tmp_path):
    teacher, fkl = _teacher(), get_divergence("fkl")
    live = KDPath(KDPathConfig(), teacher, tmp_path, "tok", 0)
    assert not live.reads_cache(fkl) and live.result_key(fkl) == {} and live.name == "fused"
    off = KDPath(KDPathConfig(teacher_cache=False, fused=False), teacher, tmp_path, "tok", 0, pretrained_teacher=True)
    assert not off.reads_cache(fkl) and off.name == "plain"
    assert KDPath(KDPathConfig(chunk_size=4), teacher, tmp_path, "tok", 0).name == "chunked"  # exact, as asked
    forced = KDPath(KDPathConfig(teacher_cache=True), teacher, tmp_path, "tok", 0)
    assert forced.reads_cache(get_divergence("rkl"))  # --teacher-cache: every loss (refused below k = V at make_loss)


def test_the_cache_flag_is_a_bare_switch_or_an_explicit_value():
    from core.config import parse

    def cfg(*argv):
        return parse((KDPathConfig,), list(argv))[0]

    assert cfg().teacher_cache is None and cfg().fused is None
    assert cfg("--teacher-cache").teacher_cache is True and cfg("--fused").fused is True
    assert cfg("--teacher-cache", "false").teacher_cache is False and cfg("--fused", "false").fused is False

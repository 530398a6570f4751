"""Log-mel filterbank features, computed once per utterance and cached.

We use transformers' Speech2TextFeatureExtractor: it computes Kaldi-compatible log-mel filterbanks (25 ms Povey
window, 10 ms shift, pre-emphasis 0.97, mel scale 1127 ln(1 + f/700) between 20 Hz and Nyquist, inputs scaled to
the int16 range as Kaldi does) with numpy when torchaudio is absent. torchaudio is deliberately not a dependency:
its wheels are pinned to one torch release, and the project does not pin torch.

The cache is one safetensors file per split, a tensor per utterance (named by its index), inside a folder
keyed by the task's settings and the feature settings (core.shell's RunContext.cached: locked, atomic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from core.errors import DataError
from speech.data import SAMPLE_RATE, Utterance, resample


def extractor(n_mels: int):
    from transformers import Speech2TextFeatureExtractor

    return Speech2TextFeatureExtractor(
        feature_size=n_mels,
        num_mel_bins=n_mels,
        sampling_rate=SAMPLE_RATE,
        do_ceptral_normalize=False,  # done by `utterance_cmvn`, which cannot divide by a zero deviation
    )


def utterance_cmvn(feats: np.ndarray) -> np.ndarray:
    """Per-utterance mean and variance normalization of each channel, as fairseq's UtteranceCMVN: the variance is
    floored at 1e-10, so a constant channel (silence, a pure tone) becomes 0 instead of NaN."""
    x = feats.astype(np.float64)
    mean = x.mean(axis=0)
    var = np.maximum((x**2).mean(axis=0) - mean**2, 1e-10)
    return ((x - mean) / np.sqrt(var)).astype(np.float32)


def fbank(audio: np.ndarray, rate: int, n_mels: int = 40, cmvn: bool = True, _cache: dict = {}) -> np.ndarray:  # noqa: B006
    """(frames, n_mels) log-mel filterbank of a mono waveform in [-1, 1]; frames = 1 + (samples - 400) // 160."""
    if n_mels not in _cache:
        _cache[n_mels] = extractor(n_mels)
    audio = resample(np.asarray(audio, np.float32), rate)
    if len(audio) < 400:  # shorter than one 25 ms window: pad with silence rather than fail
        audio = np.pad(audio, (0, 400 - len(audio)))
    out = _cache[n_mels](audio, sampling_rate=SAMPLE_RATE, return_tensors="np", return_attention_mask=False)
    feats = out["input_features"][0].astype(np.float32)
    return utterance_cmvn(feats) if cmvn else feats


def utterance_features(utt: Utterance, n_mels: int, cmvn: bool = True) -> np.ndarray:
    array, rate = utt.load()
    if rate == 0:  # a precomputed filterbank (fairseq .npy)
        if array.ndim != 2 or array.shape[1] != n_mels:
            raise DataError(
                f"utterance {utt.id}: its stored features have shape {array.shape}, expected (frames, {n_mels})"
            )
        return array
    return fbank(array, rate, n_mels, cmvn)


def compute_split(utterances: Sequence[Utterance], n_mels: int, file: Path, desc: str) -> None:
    tensors = {
        str(i): torch.from_numpy(utterance_features(u, n_mels))
        for i, u in enumerate(tqdm(utterances, desc=f"fbank {desc}", mininterval=1.0, leave=False))
    }
    save_file(tensors, str(file))


def load_split(file: Path, n: int) -> list[torch.Tensor]:
    tensors = load_file(str(file))
    if len(tensors) != n:
        raise DataError(f"feature cache {file} holds {len(tensors)} utterances, expected {n}; delete it to rebuild")
    return [tensors[str(i)] for i in range(n)]

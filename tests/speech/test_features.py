"""Log-mel filterbanks on synthesized sines: shapes, the band that holds the energy, resampling, normalization."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speech.features import fbank


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def mel_band(freq: float, n_mels: int = 40, low: float = 20.0, high: float = 8000.0) -> int:
    """Which triangular filter is centred nearest `freq` (Kaldi: mel = 1127 ln(1 + f / 700), n_mels + 2 points
    equally spaced in mel between 20 Hz and Nyquist, filter i centred on point i + 1)."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    step = (mel(high) - mel(low)) / (n_mels + 1)
    return round((mel(freq) - mel(low)) / step) - 1


def test_mel_band_by_hand():
    # mel(1000) = 1127 ln(1 + 1000/700) = 999.99; mel(20) = 31.75, mel(8000) = 2840.0; step = 2808.3 / 41 = 68.50
    # (999.99 - 31.75) / 68.50 = 14.13 -> point 14 -> filter 13
    assert mel_band(1000.0) == 13
    # mel(3000) = 1876.5 -> (1876.5 - 31.75) / 68.50 = 26.93 -> point 27 -> filter 26
    assert mel_band(3000.0) == 26


def test_shape_one_second():
    # 25 ms windows (400 samples) every 10 ms (160): 1 + (16000 - 400) // 160 = 98 frames
    assert fbank(sine(1000, 16000), 16000, n_mels=40).shape == (98, 40)
    assert fbank(sine(1000, 16000), 16000, n_mels=80).shape == (98, 80)


@pytest.mark.parametrize("freq", [1000.0, 3000.0])
def test_energy_in_the_right_mel_band(freq):
    feats = fbank(sine(freq, 16000), 16000, n_mels=40, cmvn=False)  # (98, 40) log energies
    assert int(feats.mean(0).argmax()) == mel_band(freq)
    # a pure tone: the peak band is far above the bands away from it (log-energy difference > 5 nats)
    assert feats.mean(0).max() - feats.mean(0)[mel_band(freq) + 8] > 5.0


def test_8khz_input_is_resampled():
    # FSDD's 8 kHz recordings: resampled to 16 kHz first, so 1 s gives 98 frames and the tone stays in its band
    feats = fbank(sine(1000, 8000), 8000, n_mels=40, cmvn=False)
    assert feats.shape == (98, 40) and int(feats.mean(0).argmax()) == mel_band(1000.0)


def test_utterance_cmvn():
    feats = fbank(sine(1500, 16000) + 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    np.testing.assert_allclose(feats.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(feats.std(0), 1.0, atol=1e-2)


def test_shorter_than_one_window_still_gives_a_frame():
    assert fbank(np.zeros(100, np.float32), 16000).shape == (1, 40)


def test_constant_channels_are_zero_not_nan():
    # silence and a pure tone have channels of constant log energy: their deviation is 0
    assert np.isfinite(fbank(np.zeros(16000, np.float32), 16000)).all()
    feats = fbank(sine(1000, 16000), 16000)
    assert np.isfinite(feats).all()

"""Bad-input sweep of speech (tests/sweep.py): every numeric flag of speech.dnkd at nan, 0, -1 and huge; every
audio and manifest reader on truncated, empty, wrongly typed and wrongly encoded files. One line and exit 2
naming the flag or file, or accepted; nothing trains."""

import io

import numpy as np
import pytest
from scipy.io import wavfile

from tests.sweep import SPOILS, check_flag, check_reader, flag_cases, spoilt


@pytest.mark.parametrize("module, flag, kind, value", flag_cases(["speech.dnkd.run"]))
def test_numeric_flag(module, flag, kind, value, tmp_path, capsys):
    check_flag(module, flag, kind, value, tmp_path, capsys)


def _audio_files() -> dict[str, bytes]:
    import soundfile

    t = np.arange(4000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wav, flac, npy = io.BytesIO(), io.BytesIO(), io.BytesIO()
    wavfile.write(wav, 8000, (tone * 32767).astype(np.int16))
    soundfile.write(flac, tone, 8000, format="FLAC")
    np.save(npy, np.zeros((20, 40), dtype=np.float32))
    return {"a.wav": wav.getvalue(), "b.flac": flac.getvalue(), "c.npy": npy.getvalue()}


LAYOUTS = {
    "s2t": "id\taudio\tn_frames\ttgt_text\nu1\ta.wav\t50\teins zwei\nu2\tb.flac\t50\tdrei\nu3\tc.npy\t20\tvier\n",
    "plain": "a.wav\teins zwei\nb.flac\tdrei\nc.npy\tvier\n",
}


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_manifest_and_audio_readers(layout, spoil, tmp_path, capsys):
    """The manifest, then each audio file it names, spoilt in turn: reading the manifest and loading every
    utterance answers in one line naming the spoilt file."""
    from speech.data import read_s2t_manifest

    files = {"train.tsv": LAYOUTS[layout].encode(), **_audio_files()}
    for name in files:
        folder = tmp_path / name
        folder.mkdir()
        for other, content in files.items():
            (folder / other).write_bytes(spoilt(content, spoil) if other == name else content)

        def read(folder=folder):
            for utterance in read_s2t_manifest(folder / "train.tsv"):
                utterance.load()

        check_reader(read, (name,), capsys)
